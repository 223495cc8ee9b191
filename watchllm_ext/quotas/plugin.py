"""The quota plugin: plans, usage counting and budgets on the `check_quota` hook.

Built in and off by default (`quota_backend = "off"` registers nothing). `memory` counts in
this process (one server); `redis` counts in Redis, shared by every process in front of it.
Ingestion asks with the batch's event count: the batch is counted if it fits every window of
the project's plan, refused whole (429, with how many would fit) if not. The host middleware
asks with n_events=0 and a user: only the USD budgets are checked then, and nothing counted.

Redis down or slower than `quota_redis_timeout_ms`: `quota_failure_mode = "open"` (default)
counts in this process with the per-process fallback limit and adds what it took to Redis's
day and month counters once it is back; `"closed"` refuses with 429. Either is counted in
/metrics (watchllm_quota_fallbacks_total) and never answered 5xx. After a failure Redis is
left alone for REDIS_RETRY_S, so a hung Redis costs one timeout, not one per request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ..auth import Principal
from ..hookspecs import BackgroundTask, hookimpl
from ..quota import QuotaDecision
from ..settings import Settings
from ..store.base import Store
from ..store.folders import make_private_folder
from .budgets import SpendCache, month_spend_usd, user_day_spend_usd
from .engine import MemoryUsage, Outcome, QuotaUnavailable, UsageBackend
from .plans import WINDOW_SECONDS, WINDOWS, Periods, Plan, periods

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from starlette.routing import BaseRoute

log = logging.getLogger("watchllm.quotas")

NAME = "watchllm_ext.quotas.plugin"
REDIS_RETRY_S = 0.5  # after a Redis failure, serve from the fallback this long before retrying
PLAN_FILE = "quota-plans.json"  # the memory backend's plan assignments, in data_dir

_LIMIT_FIELD = {
    "minute": "events_per_minute",
    "day": "events_per_day",
    "month": "events_per_month",
    "payload_bytes": "payload_bytes_per_month",
}


# Settings that mean something only with quotas on (docs/QUOTAS.md).
QUOTA_SETTINGS = (
    "quota_plans",
    "quota_default_plan",
    "quota_project_plans",
    "redis_url",
    "quota_redis_timeout_ms",
    "quota_failure_mode",
    "quota_fallback_events_per_minute",
    "quota_budget_refresh_s",
    "stripe_webhook_secret",
    "stripe_price_plans",
    "stripe_ended_plan",
)


def make_plugin(settings: Settings) -> Any:
    if settings.quota_backend == "off":
        ignored = ignored_settings(settings)
        return _OffIgnoring(ignored) if ignored else _Off()
    if any(plan.payload_bytes_per_month for plan in settings.quota_plans.values()):
        return BytesQuotaPlugin(settings)
    return QuotaPlugin(settings)


class _Off:
    """Registered when quotas are off: no hooks, so ingestion pays nothing for them."""


class _OffIgnoring:
    """Quotas off, with quota settings set: a fresh shell that exports the plans or the Stripe
    secret but not the backend would start with no limits and a webhook route that answers
    404. Said once at start, naming what is ignored and what to set; still no ingestion hook."""

    def __init__(self, ignored: list[str]) -> None:
        self.ignored = ignored

    @hookimpl
    def register_background_tasks(self, settings: Settings, store: Store | None) -> None:
        # Called once when the server starts (not by CLI commands that only build the plugins).
        log.warning(
            "quota_backend is 'off', so %s %s ignored (no plan is enforced; /v1/usage and"
            " /v1/billing/stripe are not served): set quota_backend to 'memory' or 'redis'"
            " (env WATCHLLM_QUOTA_BACKEND) to use %s",
            ", ".join(self.ignored),
            "is" if len(self.ignored) == 1 else "are",
            "it" if len(self.ignored) == 1 else "them",
        )


def ignored_settings(settings: Settings) -> list[str]:
    """The quota settings that differ from their defaults (what quotas off ignores)."""
    fields = type(settings).model_fields
    return [
        name
        for name in QUOTA_SETTINGS
        if getattr(settings, name) != fields[name].get_default(call_default_factory=True)
    ]


class Counts:
    """Counts by project, added to by worker threads (the transform hooks, for big bodies)
    and taken by the event loop: under a lock, as `counts[project] += n` is a read and a
    write that another thread can come between, losing or doubling a count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_project: defaultdict[str, int] = defaultdict(int)

    def add(self, project: str, n: int) -> None:
        with self._lock:
            self._by_project[project] += n

    def take(self, project: str) -> int:
        """The project's count, which is 0 from then on."""
        with self._lock:
            return self._by_project.pop(project, 0)

    def projects(self) -> list[str]:
        with self._lock:
            return list(self._by_project)

    def any(self) -> bool:
        with self._lock:
            return any(self._by_project.values())


class QuotaPlugin:
    def __init__(self, settings: Settings, backend: UsageBackend | None = None) -> None:
        self.settings = settings
        self.plans: dict[str, Plan] = dict(settings.quota_plans)
        self.backend: UsageBackend = backend or _backend(settings)
        self.fallback = MemoryUsage()
        self.fallback_plan = Plan(events_per_minute=settings.quota_fallback_events_per_minute)
        # Plans assigned at run time (Stripe, `usage set --plan`), as the backend holds them.
        self.assigned: dict[str, str | None] = {}
        self.pending_bytes = Counts()
        self.carry_events = Counts()  # taken while Redis was away
        self.fallbacks = {"open": 0, "closed": 0}
        self.denials: dict[str, int] = defaultdict(int)
        self.errors = 0
        self.late_replies = 0  # checks given up at the timeout that Redis answered later
        self.store: Store | None = None
        self.spend = SpendCache(settings.quota_budget_refresh_s)
        self._down_until = 0.0
        self._down_since: float | None = None
        self._slow_in_a_row = 0
        self._count_bytes = any(plan.payload_bytes_per_month for plan in self.plans.values())
        self._warned_plans: set[str] = set()
        if isinstance(self.backend, MemoryUsage):
            self._load_plan_file()

    # --- plans ------------------------------------------------------------------------------

    def plan_for(self, project: str) -> tuple[str, Plan]:
        name = (
            self.assigned.get(project)
            or self.settings.quota_project_plans.get(project)
            or self.settings.quota_default_plan
        )
        plan = self.plans.get(name)
        if plan is None:
            # A plan assigned by billing that these settings do not define: the default's
            # limits, said once in the log.
            if name not in self._warned_plans:
                self._warned_plans.add(name)
                log.warning("plan %r is not in quota_plans: its projects get the default", name)
            return name, self.plans[self.settings.quota_default_plan]
        return name, plan

    async def assign_plan(self, project: str, plan: str | None, at: float | None = None) -> bool:
        applied = await self.backend.set_plan(project, plan, at)
        if applied:
            self.assigned[project] = plan
            if isinstance(self.backend, MemoryUsage):
                await anyio.to_thread.run_sync(self._save_plan_file)
        return applied

    def _plan_file(self) -> Path:
        return self.settings.data_dir / PLAN_FILE

    def _load_plan_file(self) -> None:
        assert isinstance(self.backend, MemoryUsage)
        try:
            data = json.loads(self._plan_file().read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); using the settings' plans", self._plan_file(), exc)
            return
        held = {p: (v[0], float(v[1])) for p, v in data.get("plans", {}).items()}
        self.backend.load_plans(held, list(data.get("billing_events", [])))
        self.assigned.update({p: v[0] for p, v in held.items()})

    def _save_plan_file(self) -> None:
        assert isinstance(self.backend, MemoryUsage)
        path = self._plan_file()
        make_private_folder(path.parent)
        data = {
            "plans": {p: list(v) for p, v in self.backend.plans_held().items()},
            "billing_events": self.backend.seen_ids(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # whole or not at all

    async def first_delivery(self, event_id: str) -> bool:
        first = await self.backend.first_delivery(event_id)
        if first and isinstance(self.backend, MemoryUsage):
            await anyio.to_thread.run_sync(self._save_plan_file)
        return first

    # --- hooks ------------------------------------------------------------------------------

    @hookimpl
    async def check_quota(
        self, principal: Principal, n_events: int, user_id: str | None
    ) -> QuotaDecision | None:
        project = principal.project_id
        name, plan = self.plan_for(project)
        if n_events <= 0:
            return await self._budgets(project, name, plan, user_id)
        p = periods()
        outcome = await self._count(project, n_events, name, plan, p)
        if outcome is None or isinstance(outcome, QuotaDecision):
            return outcome
        if outcome.allowed:
            return None
        self.denials[outcome.denied or "minute"] += 1
        return denial(outcome, plan, n_events, p)

    async def _count(
        self, project: str, n: int, name: str, plan: Plan, p: Periods
    ) -> Outcome | QuotaDecision | None:
        carry_events = self.carry_events.take(project)
        carry_bytes = self.pending_bytes.take(project)
        resting = time.monotonic() < self._down_until
        try:
            if resting:
                raise QuotaUnavailable("Redis failed moments ago")
            outcome, held = await self.backend.check(
                project, n, name, plan, p, carry_events, carry_bytes
            )
        except QuotaUnavailable as exc:
            # Not counted there: keep them for the next call that reaches it.
            if carry_events:
                self.carry_events.add(project, carry_events)
            if carry_bytes:
                self.pending_bytes.add(project, carry_bytes)
            if exc.request is not None:
                # Given up at the timeout but still in flight: Redis may run it yet.
                exc.request.on_late = partial(
                    self._late_reply, project, n, carry_events, carry_bytes
                )
            return self._fallback(project, n, p, exc, asked=not resting)
        self._slow_in_a_row = 0
        if self._down_since is not None:
            log.warning(
                "the quota backend is back after %.1f s", time.monotonic() - self._down_since
            )
            self._down_since = None
        if held != self.assigned.get(project) and not isinstance(self.backend, MemoryUsage):
            # Another process (or Stripe through it) changed the plan: from the next request.
            self.assigned[project] = held
        return outcome

    def _late_reply(
        self, project: str, n: int, carry_events: int, carry_bytes: int, reply: Any
    ) -> None:
        """The reply of a check given up at its timeout (answered by the fallback meanwhile).
        A script's answer means Redis ran it: it added the carry it was sent and, when the
        batch fitted, counted it. This process takes those back from what it will report, so
        each event is counted once (and a batch the fallback refused, not at all). A lost
        connection (LOST) or an error reply: Redis did not run it, or cannot say."""
        if not isinstance(reply, list):
            return
        self.late_replies += 1
        self.carry_events.add(project, -(carry_events + (n if reply[0] == 1 else 0)))
        self.pending_bytes.add(project, -carry_bytes)

    def _fallback(
        self, project: str, n: int, p: Periods, exc: Exception, asked: bool = True
    ) -> QuotaDecision | None:
        """Answer without the backend. `asked`: the backend was tried (and failed) for this
        request, rather than left alone after a failure moments ago."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "the quota backend failed (%s): failing %s until it answers",
                exc,
                self.settings.quota_failure_mode,
            )
        # Redis not there (refused, reset), or late several times in a row: leave it alone a
        # moment. One late answer sends only its own request to the fallback.
        # Only a failure of a real try restarts the rest: requests that come meanwhile must not
        # keep Redis left alone for ever under steady traffic.
        slow = isinstance(exc, QuotaUnavailable) and exc.slow
        if asked and slow:
            self._slow_in_a_row += 1
        if asked and (not slow or self._slow_in_a_row >= 3):
            self._down_until = now + REDIS_RETRY_S
        mode = self.settings.quota_failure_mode
        self.fallbacks[mode] += 1
        if mode == "closed":
            self.denials["unavailable"] += 1
            return QuotaDecision(
                False,
                retry_after_s=1,
                reason="the quota service is unavailable and quota_failure_mode is 'closed';"
                " retry shortly",
                extra={"field": "events", "window": "unavailable", "would_fit": 0},
            )
        outcome, _ = self.fallback.check_now(project, n, "fallback", self.fallback_plan, p)
        if outcome.allowed:
            # Reported to Redis once it answers again. A check that timed out is not counted
            # there: its connection is closed when it is given up, before Redis runs it.
            self.carry_events.add(project, n)
            return None
        self.denials["fallback"] += 1
        return denial(outcome, self.fallback_plan, n, p, plan_name="fallback")

    async def _budgets(
        self, project: str, name: str, plan: Plan, user_id: str | None
    ) -> QuotaDecision | None:
        store = self.store
        if store is None or (plan.usd_per_month is None and plan.user_usd_per_day is None):
            return None
        p = periods()
        try:
            if plan.usd_per_month is not None:
                spent = await self.spend.get(
                    ("month", project, p.month), lambda: month_spend_usd(store, project)
                )
                if spent >= plan.usd_per_month:
                    return self._over_budget(
                        f"project {project!r} has spent ${spent:.2f} of its ${plan.usd_per_month:g}"
                        f" monthly budget (plan {name!r})",
                        "usd_per_month",
                        p.month_reset_s,
                        "project",
                    )
            if plan.user_usd_per_day is not None and user_id:
                spent = await self.spend.get(
                    ("user", project, user_id, p.day),
                    lambda: user_day_spend_usd(store, project, user_id),
                )
                if spent >= plan.user_usd_per_day:
                    return self._over_budget(
                        f"user {user_id!r} has spent ${spent:.2f} of the ${plan.user_usd_per_day:g}"
                        f" daily budget per user (plan {name!r})",
                        "user_usd_per_day",
                        p.day_reset_s,
                        "user_id",
                    )
        except Exception as exc:
            # The store could not say what was spent: the failure mode decides, as for Redis.
            self.errors += 1
            log.warning("reading spend for budgets failed: %s", exc)
            mode = self.settings.quota_failure_mode
            self.fallbacks[mode] += 1
            if mode == "closed":
                return self._over_budget(
                    "spend cannot be read now and quota_failure_mode is 'closed'",
                    "unavailable",
                    1,
                    "project",
                )
        return None

    def _over_budget(self, reason: str, window: str, reset_s: float, field: str) -> QuotaDecision:
        self.denials[window] += 1
        return QuotaDecision(
            False,
            retry_after_s=reset_s,
            reset_s=reset_s,
            reason=reason,
            extra={"field": field, "window": window},
        )

    @hookimpl
    def refund_quota(self, principal: Principal, n_events: int) -> None:
        """Events the check counted but ingestion did not accept (a 207's invalid ones, a
        batch refused 422): taken off the day and month counters as a negative carry, with
        the project's next check or the background flush (within a second), so the day and
        month count accepted events only. The minute bucket keeps them: it limits the rate
        of what is sent, and they drain from it within the minute."""
        self.carry_events.add(principal.project_id, -n_events)

    def ingest_worker_twins(self) -> list[tuple[str, dict[str, Any]]] | None:
        """Nothing to do in an ingest worker process (ingest/worker.py) when no plan counts
        payload bytes; when one does, the events must be measured here (None)."""
        return None if self._count_bytes else []

    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        if not self._count_bytes:
            return
        # The whole event, not a list of big fields: a field left off such a list (an agent
        # step's observation, a tool call's output inside a prompt call) was stored uncounted.
        size = sum(payload_size(event) for event in events)
        if size:
            self.pending_bytes.add(principal.project_id, size)

    @hookimpl
    def register_background_tasks(self, settings: Settings, store: Store | None) -> BackgroundTask:
        self.store = store  # for the budgets' spend
        return _background(self)

    @hookimpl
    def register_routes(self, settings: Settings) -> list[BaseRoute]:
        from .routes import quota_routes

        return quota_routes(self)

    # --- usage (routes and CLI) ---------------------------------------------------------------

    async def flush_counts(self, p: Periods) -> None:
        """Send what the backend has yet to count: payload bytes of accepted events, events
        taken while Redis was away, corrections from late replies."""
        for project in {*self.pending_bytes.projects(), *self.carry_events.projects()}:
            events = self.carry_events.take(project)
            size = self.pending_bytes.take(project)
            if not events and not size:
                continue
            try:
                await self.backend.add_counts(project, events, size, p)
            except QuotaUnavailable:
                self.carry_events.add(project, events)
                self.pending_bytes.add(project, size)
                raise

    async def report(self, project: str) -> dict[str, Any]:
        """What `GET /v1/usage` and `watchllm usage show` answer."""
        name, plan = self.plan_for(project)
        p = periods()
        await self.flush_counts(p)
        held = await self.backend.get_plan(project)
        if held != self.assigned.get(project):
            self.assigned[project] = held
            name, plan = self.plan_for(project)
        used = (await self.backend.show(project, p, plan.events_per_minute or 0)).as_dict()
        limits = plan.model_dump()
        remaining = {}
        for window in WINDOWS:
            limit = limits[_LIMIT_FIELD[window]]
            if limit:
                remaining[window] = max(0, limit - int(used[window]))
        body: dict[str, Any] = {
            "project_id": project,
            "plan": name,
            "backend": self.backend.name,
            "limits": limits,
            "used": used,
            "remaining": remaining,
            "resets_in_s": {
                "minute": _minute_reset_s(used["minute"], plan.events_per_minute),
                "day": round(p.day_reset_s),
                "month": round(p.month_reset_s),
            },
        }
        store = self.store
        if store is not None:
            try:
                body["spent_usd_this_month"] = round(
                    await self.spend.get(
                        ("month", project, p.month), lambda: month_spend_usd(store, project)
                    ),
                    9,
                )
            except Exception as exc:
                log.warning("reading the month's spend for %s failed: %s", project, exc)
        return body

    def metric_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        fallbacks = CounterMetricFamily(
            "watchllm_quota_fallbacks",
            "Quota checks the backend (Redis, or the store for budgets) could not answer,"
            " by the failure mode applied",
            labels=["mode"],
        )
        for mode, n in self.fallbacks.items():
            fallbacks.add_metric([mode], n)
        yield fallbacks
        denials = CounterMetricFamily(
            "watchllm_quota_plan_denials",
            "Requests refused 429 by a plan's limit or budget, by window",
            labels=["window"],
        )
        for window, n in sorted(self.denials.items()):
            denials.add_metric([window], n)
        yield denials


class BytesQuotaPlugin(QuotaPlugin):
    """The quota plugin when a plan counts payload bytes: OpenTelemetry span rows are stored
    beside the events (and are most of what a non-LLM span stores), so they count too. A
    subclass, so that without such a plan no built-in implements `transform_spans` and the
    OTLP path skips that hook (a worker process's rows are then never decoded for it)."""

    @hookimpl
    def transform_spans(self, spans: list[Any], principal: Principal) -> None:
        # Every column of the row, as for an event: attributes with their keys, span events.
        size = sum(payload_size(row) for row in spans)
        if size:
            self.pending_bytes.add(principal.project_id, size)


def _background(plugin: QuotaPlugin) -> BackgroundTask:
    async def keep_usage() -> None:
        """Send counted payload bytes and carried events to the backend every second (so
        `usage show` is current between requests); close the backend at shutdown."""
        try:
            while True:
                await anyio.sleep(1.0)
                waiting = plugin.pending_bytes.any() or plugin.carry_events.any()
                if waiting and time.monotonic() >= plugin._down_until:
                    # Kept for the next try when it fails; the check path reports the outage.
                    with contextlib.suppress(QuotaUnavailable):
                        await plugin.flush_counts(periods())
        finally:
            with anyio.CancelScope(shield=True):
                await plugin.backend.close()

    return keep_usage


def _minute_reset_s(level: float, limit: int | None) -> float:
    return round(level * 60 / limit, 3) if limit else 0.0


def _backend(settings: Settings) -> UsageBackend:
    if settings.quota_backend == "redis":
        from .redis_backend import RedisUsage

        assert settings.redis_url  # the settings check that redis has a URL
        return RedisUsage(settings.redis_url, settings.quota_redis_timeout_ms / 1000)
    return MemoryUsage()


def denial(
    outcome: Outcome, plan: Plan, n: int, p: Periods, plan_name: str | None = None
) -> QuotaDecision:
    """The 429 for a refused batch: headers of the refusing window, how many would fit."""
    window = outcome.denied or "minute"
    index = WINDOWS.index(window)
    limit = plan.limits()[index]
    remaining = max(0, outcome.remaining[index])
    if window == "minute":
        retry_s = outcome.retry_ms / 1000
        reset_s = outcome.minute_reset_ms / 1000
    elif window == "day":
        retry_s = reset_s = p.day_reset_s
    else:
        retry_s = reset_s = p.month_reset_s
    name = plan_name or outcome.plan
    if window == "payload_bytes":
        reason = (
            f"the project has used its {limit:,} payload bytes of this month (plan {name!r});"
            " no event fits until the month ends"
        )
    elif n > limit:
        reason = (
            f"a batch of {n:,} events is larger than the {window} limit of {limit:,} events"
            f" (plan {name!r}): send at most {outcome.fit:,} now, in smaller batches"
        )
    else:
        reason = (
            f"a batch of {n:,} events does not fit the {window} limit of {limit:,} events"
            f" (plan {name!r}): {outcome.fit:,} would fit now; the batch was refused whole"
        )
    return QuotaDecision(
        False,
        retry_after_s=retry_s,
        limit=limit,
        remaining=remaining,
        reset_s=reset_s,
        reason=reason,
        policy=policy_header(plan),
        ratelimit=f'"{window}";r={remaining};t={max(0, round(reset_s))}',
        extra={
            "field": "events",
            "window": window,
            "limit": limit,
            "would_fit": outcome.fit,
            "plan": name,
        },
    )


def policy_header(plan: Plan) -> str | None:
    """RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers): one item per counted window."""
    items = [
        f'"{window}";q={limit};w={WINDOW_SECONDS[window]}'
        for window, limit in zip(WINDOWS, plan.limits(), strict=True)
        if limit
    ]
    return ", ".join(items) or None


def payload_size(value: Any) -> int:
    """Bytes a value takes as JSON text, near enough (no quotes or separators): the UTF-8
    length of every string in it (keys of objects included) and the text length of every
    number; 4 for true, false and null. An event, a span row or a chat message (a struct or a
    model) is the sum of its fields' values: the field names are not counted, nor the fields
    it does not have (None), so the size does not depend on how many fields the contract
    has."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, dict):
        return sum(payload_size(k) + payload_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(payload_size(v) for v in value)
    if value is None or isinstance(value, bool):
        return 4
    if isinstance(value, int | float):
        return len(repr(value))
    if isinstance(value, bytes | bytearray):
        return len(value)
    # An event or span row, a chat message or tool call inside one (struct or model).
    names = getattr(value, "__struct_fields__", None)
    size = 0
    if names is not None:
        # A struct's event_type is its tag, not a field: counted as a model's field is, so a
        # plugin that turns the events into models does not change their size.
        tag = getattr(type(value), "__struct_config__", None)
        if tag is not None and isinstance(tag.tag, str):
            size = len(tag.tag)
    else:
        names = getattr(type(value), "model_fields", None)
    if names:
        for name in names:
            field = getattr(value, name, None)
            if field is not None:
                size += payload_size(field)
        return size
    return len(str(value))
