"""Plans (the limits a project gets) and the windows usage is counted in.

A plan limits events per minute (a leaky bucket, the GCRA's equivalent form: the minute's
allowance can be spent at once, then it comes back at limit/60 events a second, so no window
edge allows a double burst), events per UTC day and per UTC month (billing periods: counters
that start again at midnight and on the 1st), payload bytes per month, and USD budgets
(the project's spend per month, a user's spend per day) that the host middleware checks
before an LLM call. A limit left out is no limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

# The windows, in the order the Lua script and the memory backend check them.
WINDOWS = ("minute", "day", "month", "payload_bytes")
# Seconds each window spans, for the RateLimit-Policy header (`w`); a month counts as 30 days.
WINDOW_SECONDS = {"minute": 60, "day": 86_400, "month": 2_592_000, "payload_bytes": 2_592_000}


class Plan(BaseModel):
    """The limits of one plan; None is unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    events_per_minute: int | None = Field(None, ge=1, le=10**12)
    events_per_day: int | None = Field(None, ge=1, le=10**15)
    events_per_month: int | None = Field(None, ge=1, le=10**15)
    payload_bytes_per_month: int | None = Field(None, ge=1, le=10**18)
    usd_per_month: float | None = Field(None, gt=0, le=1e12)
    user_usd_per_day: float | None = Field(None, gt=0, le=1e12)

    def limits(self) -> tuple[int, int, int, int]:
        """The four counted limits in WINDOWS order, 0 for none (as the Lua script takes them)."""
        return (
            self.events_per_minute or 0,
            self.events_per_day or 0,
            self.events_per_month or 0,
            self.payload_bytes_per_month or 0,
        )

    def counts_anything(self) -> bool:
        return any(self.limits())


def default_plans() -> dict[str, Plan]:
    return {"default": Plan()}


@dataclass(frozen=True, slots=True)
class Periods:
    """The calendar periods of one moment: the counter names and when they end."""

    day: str  # 20261130
    month: str  # 202611
    day_reset_s: float
    month_reset_s: float

    @property
    def day_ttl_s(self) -> int:
        # A counter outlives its day a little, so `usage show` just after midnight still works.
        return int(self.day_reset_s) + 3_600

    @property
    def month_ttl_s(self) -> int:
        return int(self.month_reset_s) + 86_400


def periods(now: datetime | None = None) -> Periods:
    """The periods of `now` (default: this moment). Asked once per quota check: the calendar
    work is done once a day, the rest is a subtraction."""
    global _today
    if now is None:
        at = time.time()
        day, month, day_ends, month_ends = _today  # one read: the tuple is replaced whole
        if day_ends - 86_400 <= at < day_ends:
            return Periods(day, month, day_ends - at, month_ends - at)
        found = _periods_at(datetime.fromtimestamp(at, UTC))
        _today = (found.day, found.month, at + found.day_reset_s, at + found.month_reset_s)
        return found
    return _periods_at(now)


# Today's periods: the day, the month, and when each ends (epoch seconds); set when first asked.
_today: tuple[str, str, float, float] = ("", "", 0.0, 0.0)


def _periods_at(now: datetime) -> Periods:
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Periods(
        day=now.strftime("%Y%m%d"),
        month=now.strftime("%Y%m"),
        day_reset_s=(next_day - now).total_seconds(),
        month_reset_s=(next_month - now).total_seconds(),
    )


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(now: datetime) -> datetime:
    return (month_start(now) + timedelta(days=32)).replace(day=1)
