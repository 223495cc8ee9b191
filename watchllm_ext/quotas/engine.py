"""The quota decision, and the in-memory usage backend (one process).

`decide` is the rule both backends apply: the Redis backend runs the same steps in Lua
(redis_backend.py), so one process and a fleet answer alike. A batch is allowed only whole:
it must fit in every counted window at once, and the answer says how many events would fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .plans import WINDOWS, Periods, Plan

# Float slack for the leaky bucket's level: 3.0000000001 events used is 3.
_EPS = 1e-9
MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """One check's answer. Windows are in WINDOWS order; -1 means the plan has no limit there."""

    allowed: bool
    fit: int  # events that would fit now (a batch of more is refused whole)
    denied: str | None  # the first window that refused, None when allowed
    remaining: tuple[int, int, int, int]  # after this batch when allowed, before it when not
    retry_ms: int  # when a refused batch could fit (0 when allowed)
    minute_reset_ms: int  # when the minute bucket is empty again
    plan: str = "default"


@dataclass(slots=True)
class Usage:
    """What a project has used in the current periods (the `usage show` answer)."""

    minute: float = 0.0
    day: int = 0
    month: int = 0
    payload_bytes: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
            # Rounded up, as the check does (decide: room is floor(limit - level)): a level
            # of 7.4 of 10 shows 8 used and 2 remaining, what a batch of 3 is then told.
            "minute": math.ceil(self.minute - _EPS),
            "day": self.day,
            "month": self.month,
            "payload_bytes": self.payload_bytes,
        }


class QuotaUnavailable(Exception):
    """The usage backend could not be asked (Redis down or slow). `slow` is a timeout (one
    late answer), as against an error (refused, reset: Redis is not there). `request`: the
    command given up at the timeout, still in flight; its `on_late` gets Redis's reply when it
    comes (resp.py), so what it counted there can be taken back here."""

    def __init__(self, message: str, *, slow: bool = False, request: Any = None) -> None:
        super().__init__(message)
        self.slow = slow
        self.request = request


class UsageBackend(Protocol):
    name: str

    async def check(
        self,
        project: str,
        n: int,
        plan_name: str,
        plan: Plan,
        p: Periods,
        carry_events: int = 0,
        carry_bytes: int = 0,
    ) -> tuple[Outcome, str | None]:
        """Count `n` events if they fit; returns the outcome and the plan name the backend
        holds for the project (None: none assigned), which may differ from `plan_name`."""
        ...

    async def add_counts(self, project: str, n_events: int, n_bytes: int, p: Periods) -> None:
        """Add to the day and month event counters and the month's payload bytes, without a
        check (either may be negative: a correction)."""
        ...

    async def show(self, project: str, p: Periods) -> Usage: ...

    async def set(self, project: str, p: Periods, values: dict[str, int]) -> None: ...

    async def reset(self, project: str, p: Periods) -> None: ...

    async def get_plan(self, project: str) -> str | None: ...

    async def set_plan(self, project: str, plan: str | None, at: float | None = None) -> bool:
        """Assign a plan (None: back to the settings' choice). With `at` (the time of the
        billing event), an assignment older than the one held is ignored; returns whether
        it was applied."""
        ...

    async def first_delivery(self, event_id: str) -> bool:
        """True the first time a billing event id is seen, False on a replay."""
        ...

    async def close(self) -> None: ...


def drained(used: float, limit: int, elapsed_ms: float) -> float:
    """The minute bucket's level after `elapsed_ms`: it drains at limit/60 events a second."""
    return max(0.0, used - max(0.0, elapsed_ms) * limit / MINUTE_MS)


def decide(
    n: int, limits: tuple[int, int, int, int], used: tuple[float, int, int, int]
) -> tuple[bool, int, int, tuple[int, int, int, int], int, int]:
    """(allowed, fit, index of the refusing window or -1, remaining, retry_ms, minute_reset_ms).

    `used` is the level of each window now (the minute bucket already drained). The same
    steps as CHECK_SCRIPT in redis_backend.py.
    """
    remaining = [-1, -1, -1, -1]
    fit = -1
    denied = -1
    for i in range(3):
        if limits[i] > 0:
            remaining[i] = max(0, math.floor(limits[i] - used[i] + _EPS))
            if fit < 0 or remaining[i] < fit:
                fit = remaining[i]
            if denied < 0 and remaining[i] < n:
                denied = i
    if limits[3] > 0:
        remaining[3] = max(0, limits[3] - int(used[3]))
        # Payload bytes are known only after a batch is validated: a project is refused once
        # it has used them up (the batch that crossed the line was taken).
        if remaining[3] == 0:
            fit = 0
            if denied < 0:
                denied = 3
    if fit < 0:
        fit = n  # nothing counted limits events
    allowed = denied < 0
    minute_limit = limits[0]
    level = used[0] + (n if allowed else 0)
    retry_ms = 0
    if not allowed and denied == 0:
        # When the bucket has drained enough for the batch (or, for a batch larger than the
        # whole minute's allowance, which never fits, when it is empty).
        excess = level + n - minute_limit if n <= minute_limit else level
        retry_ms = math.ceil(max(0.0, excess) * MINUTE_MS / minute_limit)
    reset_ms = math.ceil(level * MINUTE_MS / minute_limit) if minute_limit > 0 else 0
    if allowed:
        for i in range(3):
            if remaining[i] >= 0:
                remaining[i] -= n
    return (
        allowed,
        fit,
        denied,
        (remaining[0], remaining[1], remaining[2], remaining[3]),
        (retry_ms),
        reset_ms,
    )


@dataclass
class _ProjectState:
    minute: float = 0.0
    minute_at_ms: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # "day:20261130" -> events


class MemoryUsage:
    """Usage in this process's memory: exact within one process, lost at restart. Plan
    assignments made at run time (Stripe, `usage set --plan`) are kept by the plugin's plan
    file, not here."""

    name = "memory"

    def __init__(self, clock_ms: object = None) -> None:
        self._projects: dict[str, _ProjectState] = {}
        self._plans: dict[str, tuple[str | None, float]] = {}
        self._seen: dict[str, None] = {}
        self._clock = clock_ms or _monotonic_ms

    def _state(self, project: str, p: Periods) -> _ProjectState:
        state = self._projects.get(project)
        if state is None:
            state = self._projects[project] = _ProjectState(minute_at_ms=self._clock())  # type: ignore[operator]
        # Counters of past periods are dropped as new ones start.
        keep = {f"day:{p.day}", f"month:{p.month}", f"bytes:{p.month}"}
        if any(k not in keep for k in state.counters):
            state.counters = {k: v for k, v in state.counters.items() if k in keep}
        return state

    def _used(self, state: _ProjectState, p: Periods, limit: int, now_ms: float) -> Usage:
        minute = drained(state.minute, limit, now_ms - state.minute_at_ms) if limit else 0.0
        return Usage(
            minute=minute,
            day=state.counters.get(f"day:{p.day}", 0),
            month=state.counters.get(f"month:{p.month}", 0),
            payload_bytes=state.counters.get(f"bytes:{p.month}", 0),
        )

    async def check(
        self,
        project: str,
        n: int,
        plan_name: str,
        plan: Plan,
        p: Periods,
        carry_events: int = 0,
        carry_bytes: int = 0,
    ) -> tuple[Outcome, str | None]:
        return self.check_now(project, n, plan_name, plan, p, carry_events, carry_bytes)

    def check_now(
        self,
        project: str,
        n: int,
        plan_name: str,
        plan: Plan,
        p: Periods,
        carry_events: int = 0,
        carry_bytes: int = 0,
    ) -> tuple[Outcome, str | None]:
        """`check` without awaiting: one process, no I/O (the fallback path uses it too)."""
        state = self._state(project, p)
        if carry_events:
            self._add(state, p, carry_events)
        if carry_bytes:
            key = f"bytes:{p.month}"
            state.counters[key] = state.counters.get(key, 0) + carry_bytes
        limits = plan.limits()
        now = self._clock()  # type: ignore[operator]
        used = self._used(state, p, limits[0], now)
        allowed, fit, denied, remaining, retry_ms, reset_ms = decide(
            n, limits, (used.minute, used.day, used.month, used.payload_bytes)
        )
        if allowed:
            if limits[0]:
                state.minute, state.minute_at_ms = used.minute + n, now
            self._add(state, p, n)
        outcome = Outcome(
            allowed,
            fit,
            None if denied < 0 else WINDOWS[denied],
            remaining,
            retry_ms,
            reset_ms,
            plan_name,
        )
        held = self._plans.get(project)
        return outcome, held[0] if held else None

    @staticmethod
    def _add(state: _ProjectState, p: Periods, n: int) -> None:
        # n < 0 is a correction (refused events given back): never below 0, as in Redis (a
        # refund can land in the day after its check's).
        for key in (f"day:{p.day}", f"month:{p.month}"):
            state.counters[key] = max(0, state.counters.get(key, 0) + n)

    async def add_counts(self, project: str, n_events: int, n_bytes: int, p: Periods) -> None:
        state = self._state(project, p)
        if n_events:
            self._add(state, p, n_events)
        key = f"bytes:{p.month}"
        state.counters[key] = state.counters.get(key, 0) + n_bytes

    async def show(self, project: str, p: Periods, minute_limit: int = 0) -> Usage:
        return self._used(self._state(project, p), p, minute_limit, self._clock())  # type: ignore[operator]

    async def set(self, project: str, p: Periods, values: dict[str, int]) -> None:
        state = self._state(project, p)
        if "minute" in values:
            state.minute, state.minute_at_ms = float(values["minute"]), self._clock()  # type: ignore[operator]
        for window, key in (
            ("day", f"day:{p.day}"),
            ("month", f"month:{p.month}"),
            ("payload_bytes", f"bytes:{p.month}"),
        ):
            if window in values:
                state.counters[key] = int(values[window])

    async def reset(self, project: str, p: Periods) -> None:
        self._projects.pop(project, None)

    async def get_plan(self, project: str) -> str | None:
        held = self._plans.get(project)
        return held[0] if held else None

    async def set_plan(self, project: str, plan: str | None, at: float | None = None) -> bool:
        held = self._plans.get(project)
        if at is not None and held is not None and held[1] > at:
            return False
        self._plans[project] = (plan, at if at is not None else held[1] if held else 0.0)
        return True

    def plans_held(self) -> dict[str, tuple[str | None, float]]:
        return dict(self._plans)

    def load_plans(self, plans: dict[str, tuple[str | None, float]], seen: list[str]) -> None:
        self._plans.update(plans)
        self._seen.update(dict.fromkeys(seen))

    def seen_ids(self) -> list[str]:
        return list(self._seen)

    async def first_delivery(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        while len(self._seen) > MAX_SEEN_EVENTS:  # oldest first: dicts keep insertion order
            del self._seen[next(iter(self._seen))]
        return True

    async def close(self) -> None:
        return None


# Billing event ids remembered for replay detection (Stripe retries for up to 3 days).
MAX_SEEN_EVENTS = 10_000


def _monotonic_ms() -> float:
    return time.monotonic() * 1000.0
