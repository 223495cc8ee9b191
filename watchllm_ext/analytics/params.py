"""Query-string parameters of the analytics routes: parsed, checked, or 400 naming them."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.datastructures import QueryParams

from ..auth import Principal
from ..errors import Problem, other_project
from ..schema import MAX_TIMESTAMP, MIN_TIMESTAMP

PERIODS = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
# Interval name -> (unit, step, length).
INTERVALS = {
    "1m": ("Minute", 1, timedelta(minutes=1)),
    "5m": ("Minute", 5, timedelta(minutes=5)),
    "15m": ("Minute", 15, timedelta(minutes=15)),
    "1h": ("Hour", 1, timedelta(hours=1)),
    "6h": ("Hour", 6, timedelta(hours=6)),
    "1d": ("Day", 1, timedelta(days=1)),
}
MAX_BUCKETS = 2000
MAX_RANGE = timedelta(days=3660)


def bad(name: str, message: str) -> Problem:
    return Problem(400, "bad_parameter", f"{name}: {message}", field=name)


def project(params: QueryParams, principal: Principal) -> str:
    project_id = params.get("project_id")
    if not project_id:
        raise bad("project_id", "required")
    if project_id != principal.project_id:
        raise other_project(principal.project_id, project_id)
    return project_id


def _instant(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace(" ", "+") if "T" in raw else raw)
    except ValueError:
        raise bad(name, f"not an RFC 3339 time: {raw!r}") from None
    if value.tzinfo is None:
        raise bad(name, "the time needs a zone, e.g. 2026-01-01T00:00:00Z")
    if not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise bad(name, "must be between 1970-01-01 and 2100-01-01, as event timestamps are")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Range:
    start: datetime
    end: datetime

    @property
    def length(self) -> timedelta:
        return self.end - self.start


def time_range(params: QueryParams, *, allow_period: bool = False) -> Range:
    """`from`/`to` (RFC 3339), or `period` back from `to`; the last 24 hours by default."""
    end = _instant(params, "to") or datetime.now(UTC)
    start = _instant(params, "from")
    period = params.get("period")
    if period is not None:
        if not allow_period:
            raise bad("period", "not a parameter of this route")
        if period not in PERIODS:
            raise bad("period", f"must be one of {', '.join(PERIODS)}")
        if start is not None:
            raise bad("period", "give either period or from, not both")
        start = end - PERIODS[period]
    if start is None:
        start = end - timedelta(hours=24)
    if start >= end:
        raise bad("from", "must be before to")
    if end - start > MAX_RANGE:
        raise bad("from", "the range may span at most 10 years")
    return Range(start, end)


def zone(params: QueryParams) -> str:
    name = params.get("tz", "UTC")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(
            "tz", f"unknown time zone {name!r} (use an IANA name like Europe/Paris)"
        ) from None
    return name


def interval(params: QueryParams, span: Range) -> str:
    name = params.get("interval")
    if name is None:
        length = span.length
        name = (
            "1m"
            if length <= timedelta(hours=1)
            else "5m"
            if length <= timedelta(hours=6)
            else "15m"
            if length <= timedelta(hours=24)
            else "1h"
            if length <= timedelta(days=7)
            else "6h"
            if length <= timedelta(days=31)
            else "1d"
        )
    if name not in INTERVALS:
        raise bad("interval", f"must be one of {', '.join(INTERVALS)}")
    if span.length / INTERVALS[name][2] > MAX_BUCKETS:
        raise bad("interval", f"gives more than {MAX_BUCKETS} buckets for this range")
    return name


def choice(params: QueryParams, name: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise bad(name, f"must be one of {', '.join(allowed)}")
    return value


def limit(params: QueryParams, default: int = 100, maximum: int = 1000) -> int:
    raw = params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad("limit", f"not a whole number: {raw!r}") from None
    if not 1 <= value <= maximum:
        raise bad("limit", f"must be between 1 and {maximum}")
    return value


def text(params: QueryParams, name: str, max_chars: int = 256) -> str:
    value = params.get(name) or ""
    if len(value) > max_chars:
        raise bad(name, f"longer than {max_chars} characters")
    return value


def encode_cursor(ts: str, key: str) -> str:
    raw = json.dumps({"ts": ts, "id": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor(params: QueryParams) -> tuple[datetime, str] | None:
    raw = params.get("cursor")
    if raw is None:
        return None
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        ts = datetime.strptime(data["ts"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
        key = data["id"]
        if not isinstance(key, str):
            raise TypeError("id")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise bad("cursor", "malformed; pass next_cursor from the previous page as it is") from None
    return ts, key
