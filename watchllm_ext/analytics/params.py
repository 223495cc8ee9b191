"""Query-string parameters of the analytics routes: parsed, checked, or 400 naming them."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import available_timezones

from starlette.datastructures import QueryParams

from ..auth import Principal
from ..errors import echo, other_project
from ..route_params import bad
from ..schema import (
    MAX_ID_CHARS,
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    PROJECT_ID_RE,
    RFC3339,
    is_id,
)

# `period`, on every route that takes a time range (docs/ANALYTICS.md, "Time range").
PERIODS = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "12h": timedelta(hours=12),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
DEFAULT_PERIOD = "24h"
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
# Timeseries with group_by: at most `groups` series of their own (the top ones by `rank_by`),
# and the rest summed into one OTHER_GROUP series, so that the answer stays bounded whatever
# the number of distinct models; and at most MAX_POINTS points (buckets x series) in all.
DEFAULT_GROUPS = 10
MAX_GROUPS = 50
MAX_POINTS = 20_000
OTHER_GROUP = "(other)"
# Measures a group can be ranked by: public name -> the column of the timeseries query.
RANK_BY = ("events", "requests", "errors", "cost", "tokens")
_DIGITS = re.compile(r"[0-9]{1,9}")
# Project ids as keys take them (schema.ProjectId).
MAX_TZ_CHARS = 64


# The names the shared parsers below read. A route declares what it accepts with these and
# its own names (route_params.accepts); any other query parameter is a 400 (`Query`).
PROJECT = ("project_id",)  # project()
RANGE = ("period", "from", "to")  # time_range()
PAGE = ("limit", "cursor")  # limit(), cursor()


def project(params: QueryParams, principal: Principal) -> str:
    """`project_id`: a project's key reads its own project, so it may leave it out (another
    project is 403). An operator key is instance-wide (docs/API.md, "Keys and scopes"): it
    has no project to fall back on, so it must name the one it reads, and may name any."""
    project_id = params.get("project_id")
    if project_id is not None and not PROJECT_ID_RE.fullmatch(project_id):
        shown = echo(project_id)
        raise bad("project_id", f"not a project id (1-64 of A-Z a-z 0-9 _ . -): {shown!r}")
    if principal.can("operator"):
        if project_id is None:
            raise bad(
                "project_id",
                "required with an operator key, which reads every project:"
                " name one, e.g. project_id=default",
            )
        return project_id
    if project_id is None:
        return principal.project_id
    if project_id != principal.project_id:
        raise other_project(principal.project_id, project_id)
    return project_id


# `from` and `to` take the grammar of event timestamps (schema.RFC3339: RFC 3339's date-time,
# ASCII digits, a space for the T as its section 5.6 allows, at most 9 fraction digits, read
# to the microsecond); this is the same without a zone, to say the zone is what is missing.
_NO_ZONE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?)?"
)


def _instant(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    if len(raw) > 64:
        raise bad(name, "not an RFC 3339 time (too long)")
    # A "+" left unescaped in a query string arrives as a space: "...T00:00:00 02:00".
    text = raw.replace(" ", "+") if "T" in raw or "t" in raw else raw
    if RFC3339.fullmatch(text) is None:
        # fromisoformat alone also took ISO 8601's other forms (20260101T000000Z, +0200,
        # week dates, a comma fraction), and not RFC 3339's lower-case t and z.
        if _NO_ZONE.fullmatch(text) is not None:
            raise bad(name, "the time needs a zone, e.g. 2026-01-01T00:00:00Z")
        raise bad(name, f"not an RFC 3339 time: {echo(raw)!r} (like 2026-01-01T00:00:00Z)")
    try:
        value = datetime.fromisoformat(text.upper())
    except ValueError:  # digits out of range: month 13, hour 25
        raise bad(
            name, f"not an RFC 3339 time: {echo(raw)!r} (like 2026-01-01T00:00:00Z)"
        ) from None
    try:
        in_range = MIN_TIMESTAMP <= value <= MAX_TIMESTAMP
        value = value.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
        in_range = False
    if not in_range:
        raise bad(name, "must be between 1970-01-01 and 2100-01-01, as event timestamps are")
    return value


@dataclass(frozen=True)
class Range:
    start: datetime
    end: datetime

    @property
    def length(self) -> timedelta:
        return self.end - self.start


def time_range(params: QueryParams) -> Range:
    """The time range of every analytics route that takes one: `period` back from `to` (now
    by default), or `from`/`to`; the last 24 hours when neither `period` nor `from` is given.
    `period` with `from` is a 400: two starts."""
    end = _instant(params, "to") or datetime.now(UTC)
    start = _instant(params, "from")
    period = params.get("period")
    if period is not None:
        if period not in PERIODS:
            shown = echo(period, 16)
            raise bad("period", f"must be one of {', '.join(PERIODS)}, not {shown!r}")
        if start is not None:
            raise bad("period", "give either period or from, not both (period counts back from to)")
        start = end - PERIODS[period]
    if start is None:
        start = end - PERIODS[DEFAULT_PERIOD]
    if start >= end:
        raise bad("from", "must be before to")
    if end - start > MAX_RANGE:
        raise bad("from", "the range may span at most 10 years")
    return Range(start, end)


@cache
def python_zones() -> frozenset[str]:
    """The IANA zones Python knows. ZoneInfo() alone also opens any file under the zone
    folder (`right/UTC`, `__pycache__`, `Europe`), which ClickHouse then refuses."""
    return frozenset(available_timezones())


def zone(params: QueryParams, known: frozenset[str]) -> str:
    """`tz`, one of `known`: the zones both Python and the store's ClickHouse know (the route
    passes them, see routes.py), so that bucket starts computed on either side agree."""
    name = params.get("tz", "UTC")
    if len(name) > MAX_TZ_CHARS or name not in known:
        shown = echo(name, MAX_TZ_CHARS)
        raise bad("tz", f"unknown time zone {shown!r} (use an IANA name like Europe/Paris)")
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
    return whole(params, "limit", default, maximum)


def whole(params: QueryParams, name: str, default: int, maximum: int) -> int:
    """A whole number in 1..maximum, in ASCII digits (int() also takes '٣', '1_0', ' 7')."""
    raw = params.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw):
        raise bad(name, f"not a whole number between 1 and {maximum}: {raw[:40]!r}")
    value = int(raw)
    if not 1 <= value <= maximum:
        raise bad(name, f"must be between 1 and {maximum}")
    return value


def text(params: QueryParams, name: str, max_chars: int = 256) -> str:
    value = params.get(name) or ""
    if len(value) > max_chars:
        raise bad(name, f"longer than {max_chars} characters")
    if not _utf8(value):
        raise bad(name, "not valid UTF-8 text")
    return value


def _utf8(value: str) -> bool:
    """False for text holding a lone surrogate, which no UTF-8 encoder (nor ClickHouse's
    parameter binding) can send."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def ident(value: str, name: str) -> str:
    """An event or run id from the path: what the event schema accepts as an id, or 400."""
    if not is_id(value):
        raise bad(name, f"not an id: 1 to {MAX_ID_CHARS} of A-Z a-z 0-9 _ . : -, not dots alone")
    return value


def encode_cursor(ts: str, key: str) -> str:
    raw = json.dumps({"ts": ts, "id": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{1,6}")


def cursor(params: QueryParams) -> tuple[datetime, str] | None:
    raw = params.get("cursor")
    if raw is None:
        return None
    try:
        if len(raw) > 1024:  # a real cursor is about 100 characters
            raise ValueError("long")
        data: Any = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        # Exactly what encode_cursor writes: strptime alone takes other scripts' digits.
        if not isinstance(data, dict) or data.keys() != {"ts", "id"}:
            raise ValueError("keys")
        if not isinstance(data["ts"], str) or _CURSOR_TIME.fullmatch(data["ts"]) is None:
            raise ValueError("ts")
        ts = datetime.strptime(data["ts"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
        key = data["id"]
        # Only what a page can end on: an id as stored, a time in the events' range.
        if not isinstance(key, str) or not is_id(key):
            raise TypeError("id")
        if not MIN_TIMESTAMP <= ts < MAX_TIMESTAMP:
            raise ValueError("ts")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise bad("cursor", "malformed; pass next_cursor from the previous page as it is") from None
    return ts, key
