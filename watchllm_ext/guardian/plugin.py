"""The Guardian plugin: a sink that feeds every stored batch to the rule windows, a background
task that re-checks them (and the stored figures) every `guardian_interval_s`, stores alert
events, calls `on_alert` once per episode start and recovery, and a `check_quota` that
denies a blocked project or user.

A block denies the host middleware's pre-request check (`n_events=0`: the LLM call is not
made); ingestion of the project's telemetry goes on, so the figures that end the episode
keep arriving and nothing of the incident is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any

import anyio

from ..auth import Principal
from ..errors import Problem
from ..flags import GUARDIAN, feature_enabled
from ..hookspecs import BackgroundTask, hookimpl
from ..observability.metrics import ops_metrics
from ..quota import QuotaDecision
from ..sdk.context import local_apps
from ..settings import Settings, SettingsError
from ..store import Store
from .alert import Alert, printable, window_text
from .engine import MAX_SUBJECTS_PER_PROJECT, Engine, Key
from .rules import GuardianRule
from .stored import now_utc, project_stats, recent_projects, stored_figure

log = logging.getLogger("watchllm.guardian")

FLAG = GUARDIAN  # a known flag (flags/known.py)
# How long the sink waits for its app to finish starting (it may get a batch replayed from
# the spool before the app is registered).
ATTACH_TIMEOUT_S = 30.0
# Batches at least this big are fed to the windows on a worker thread, off the event loop.
OFFLOAD_EVENTS = 500
# Projects whose flag is followed, to log its turning off and on once (the first ones seen on).
MAX_FOLLOWED_PROJECTS = 100_000
# Ended episodes named in the "turned off" log line (the rest are counted).
MAX_LISTED_EPISODES = 10


class Guardian:
    name = "guardian"  # the sink's name (its spool cursor)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings.guardian_rules)
        self.wl: Any = None
        self.pending: deque[Alert] = deque()
        self._wake: asyncio.Event | None = None
        # Per project Guardian has been on for: is its flag on now (see _flag).
        self.flag_on: dict[str, bool] = {}

    # --- hooks ---

    @hookimpl
    def register_sinks(self, settings: Settings, store: Store | None) -> Any:
        return self if self.engine.rules else None

    @hookimpl
    def register_background_tasks(
        self, settings: Settings, store: Store | None
    ) -> BackgroundTask | None:
        return partial(self.run, store) if self.engine.rules else None

    @hookimpl
    def check_quota(
        self, principal: Principal, n_events: int, user_id: str | None
    ) -> QuotaDecision | None:
        if n_events != 0:
            return None
        alert = self.engine.blocked(principal.project_id, user_id)
        if alert is None:
            return None
        who = f"user {alert.subject!r} of project" if alert.subject else "project"
        return QuotaDecision(
            False,
            retry_after_s=self.settings.guardian_interval_s,
            reason=f"Guardian rule {alert.rule.name!r} blocks {who} {alert.project_id!r}"
            f" ({alert.rule.metric} over {alert.rule.threshold:g} in"
            f" {window_text(alert.rule.window_s)}) until it recovers",
        )

    def metric_families(self) -> list[Any]:
        """Subjects dropped at the per-project bound, by rule (read at scrape time)."""
        from prometheus_client.core import CounterMetricFamily

        evictions = CounterMetricFamily(
            "watchllm_guardian_evictions",
            "Runs or users whose Guardian window was dropped because their project had"
            f" {MAX_SUBJECTS_PER_PROJECT:,} others under the rule (least recently fed first)",
            labels=["rule"],
        )
        for rule in self.engine.rules:
            evictions.add_metric([rule], self.engine.evicted.get(rule, 0))
        return [evictions]

    # --- the sink ---

    async def write(self, events: Any) -> None:
        if self.wl is None:
            await self._attach()
        # The flags are asked here, on the loop (the hook's promise); the windows are fed on
        # a worker thread for a big batch (~7 us an event for four rules), inline otherwise.
        projects = {event.project_id for event in events}
        on = {p: self._flag(p) for p in projects if self.engine.rules_of(p)}
        if not any(on.values()):
            return
        if len(events) >= OFFLOAD_EVENTS:
            alerts = await anyio.to_thread.run_sync(self._observe, events, on)
        else:
            alerts = self._observe(events, on)
        self._queue(alerts)

    def _observe(self, events: Any, on: dict[str, bool]) -> list[Alert]:
        touched = self.engine.observe(events, lambda project: on.get(project, False))
        return self.engine.evaluate(touched) if touched else []

    # --- the background task ---

    async def run(self, store: Store | None) -> None:
        await self._attach()
        self._wake = asyncio.Event()
        send, receive = anyio.create_memory_object_stream[Alert](1000)
        interval = self.settings.guardian_interval_s
        async with send, receive, anyio.create_task_group() as tg:
            tg.start_soon(self._notify_loop, receive)
            next_check = anyio.current_time() + interval
            while True:
                with anyio.move_on_after(max(0.0, next_check - anyio.current_time())):
                    await self._wake.wait()
                self._wake.clear()
                if anyio.current_time() >= next_check:
                    next_check = anyio.current_time() + interval
                    await self._check(store)
                while self.pending:
                    alert = await self._record(self.pending.popleft())
                    await send.send(alert)  # waits while the notifiers catch up

    async def _check(self, store: Store | None) -> None:
        """Turned-off projects are forgotten; stored figures refreshed; every key judged."""
        present = self.engine.projects()
        off = {project for project, on in self.flag_on.items() if not on}
        for project in present | off:  # the off ones too: to see them turned on again
            if not self._flag(project) and project in present:
                # What a batch judged while the flag flipped may have left.
                self._forget(project)
        if store is not None:
            try:
                await self._read_stored(store)
            except Exception:
                log.exception("Guardian could not read the stored figures; using the stream's")
        self._queue(self.engine.evaluate())

    async def _read_stored(self, store: Store) -> None:
        """The per-project rules' figures from the store (queries on a worker thread; the
        flags asked on the loop, as the hook says)."""
        now = now_utc()
        rules = [r for r in self.engine.rules.values() if r.per == "project"]
        if not rules:
            return
        recent: list[str] = []
        if any(r.project == "*" for r in rules):
            since = now - timedelta(seconds=max(r.window_s for r in rules))
            recent = await anyio.to_thread.run_sync(recent_projects, store, since)
            # A project whose events all left the window is read once more, so its stored
            # figure falls back instead of staying at the last value forever.
            recent = sorted(set(recent) | self.engine.stored_projects())
        enabled: dict[str, bool] = {}
        for rule in rules:
            for project in recent if rule.project == "*" else [rule.project]:
                if project not in enabled:
                    enabled[project] = self._flag(project)
        wanted = [
            (rule, project)
            for rule in rules
            for project in (recent if rule.project == "*" else [rule.project])
            if enabled[project]
        ]

        def read() -> list[tuple[GuardianRule, str, float | None]]:
            return [
                (
                    rule,
                    project,
                    stored_figure(rule, project_stats(store, project, rule.window_s, now)),
                )
                for rule, project in wanted
            ]

        for rule, project, value in await anyio.to_thread.run_sync(read):
            # Turned off while the store was read (a batch's flag look-up meanwhile forgot the
            # project): its figure would start a new episode, a second "firing" for nothing.
            if self.flag_on.get(project) is False:
                continue
            self.engine.observe_stored(rule, project, value)

    def _queue(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        metrics = ops_metrics(self.wl) if self.wl is not None else None
        for alert in alerts:
            if metrics is not None:
                metrics.alerts.labels(alert.rule.name, alert.state).inc()
                firing = metrics.firing.labels(alert.rule.name)
                if alert.state == "firing":
                    firing.inc()
                else:
                    firing.dec()
        self.pending.extend(alerts)
        if self._wake is not None:
            self._wake.set()

    async def _record(self, alert: Alert) -> Alert:
        """Log the alert and store its event (firing only); the alert with its event id."""
        (log.warning if alert.state == "firing" else log.info)("Guardian %s", alert.summary())
        if alert.state != "firing":
            return alert
        event = alert_event(alert)
        principal = Principal(alert.project_id, frozenset({"ingest"}), key_id="guardian")
        try:
            # Not the project's usage: a quota (a plan used up, say) must not keep the record
            # of an alert from the store while on_alert is told of it.
            await self.wl.ingest(principal, [event], quota=False)
        except Problem as exc:
            # The problem may quote the event (its user id): one line whatever it holds.
            log.error(
                "Guardian could not store the alert event of %s: %s",
                alert.rule.name,
                printable(str(exc)),
            )
            return alert
        return replace(alert, event_id=event["event_id"])

    async def _notify_loop(self, receive: Any) -> None:
        """One alert at a time, in order: a recovery never overtakes its firing notice."""
        async for alert in receive:
            await notify(self.wl.pm, alert)

    # --- helpers ---

    def _flag(self, project: str) -> bool:
        """The flag for a project (`_enabled`), following its changes for a project Guardian
        has been on for: turned off, the project is forgotten without recovery notices (its
        figures were not judged back under a threshold; a window emptied by the flag would
        read as one) and that is logged once; turned on again, logged once."""
        on = self._enabled(project)
        was = self.flag_on.get(project)
        if was is None:
            if on and len(self.flag_on) < MAX_FOLLOWED_PROJECTS:
                self.flag_on[project] = True
        elif on != was:
            self.flag_on[project] = on
            if on:
                log.info("Guardian is on again for project %s (flag %r)", printable(project), FLAG)
            else:
                self._turned_off(project)
        return on

    def _turned_off(self, project: str) -> None:
        ended = self._forget(project)
        who = printable(project)
        if not ended:
            log.warning(
                "Guardian is off for project %s (flag %r): its rules are not checked", who, FLAG
            )
            return
        names = [
            key[0] + (f" {self.engine.rules[key[0]].per} {printable(key[2])}" if key[2] else "")
            for key in ended[:MAX_LISTED_EPISODES]
        ]
        if len(ended) > MAX_LISTED_EPISODES:
            names.append(f"and {len(ended) - MAX_LISTED_EPISODES} more")
        log.warning(
            "Guardian is off for project %s (flag %r): its rules are not checked; %d firing"
            " episode(s) end without a recovery notice: %s",
            who,
            FLAG,
            len(ended),
            ", ".join(names),
        )

    def _forget(self, project: str) -> list[Key]:
        """Drop a project's windows and episodes (engine.forget_project); the firing gauge
        follows. Returns the keys whose episode ended."""
        ended = self.engine.forget_project(project)
        if ended and self.wl is not None:
            firing = ops_metrics(self.wl).firing
            for key in ended:
                firing.labels(key[0]).dec()
        return ended

    def _enabled(self, project: str) -> bool:
        if self.wl is None:
            return False
        principal = Principal(project, frozenset())
        return feature_enabled(self.wl.pm, FLAG, principal, None, default=False)

    async def _attach(self) -> None:
        """Find the running app this plugin belongs to (its plugin manager holds us)."""
        with anyio.fail_after(ATTACH_TIMEOUT_S):
            while self.wl is None:
                for app in local_apps():
                    pm = getattr(app, "pm", None)
                    if pm is not None and pm.is_registered(self):
                        self.wl = app
                        break
                else:
                    await anyio.sleep(0.01)


async def notify(pm: Any, alert: Alert) -> None:
    """Call every `on_alert` implementation; one that raises (or whose awaitable raises) is
    logged and does not keep the others from being called."""
    for impl in reversed(pm.hook.on_alert.get_hookimpls()):
        try:
            result = impl.function(*[alert for _ in impl.argnames])
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_alert of plugin %s failed for %s", impl.plugin_name, alert.rule.name)


def alert_event(alert: Alert) -> dict[str, Any]:
    """The stored event of a firing alert (docs/EVENTS.md: cost_threshold_exceeded or
    performance_alert), with the rule and its figures in `metadata`."""
    rule = alert.rule
    value = alert.value or 0.0
    event: dict[str, Any] = {
        "event_id": f"guardian-{alert.episode_id}",
        "run_id": alert.subject if rule.per == "run" and alert.subject else f"guardian-{rule.name}",
        "timestamp": alert.at.isoformat().replace("+00:00", "Z"),
        "tags": ["guardian", f"rule:{rule.name}"],
        "metadata": {
            "guardian_rule": rule.name,
            "metric": rule.metric,
            "per": rule.per,
            "subject": alert.subject,
            "block": rule.block,
            "episode_id": alert.episode_id,
            "source": alert.source,
            "window_s": rule.window_s,
        },
    }
    if rule.per == "user" and alert.subject:
        event["user_id"] = alert.subject
    if rule.metric == "cost_usd":
        event.update(
            event_type="cost_threshold_exceeded",
            threshold_usd=float(rule.threshold),
            actual_usd=float(value),
            window=window_text(rule.window_s),
        )
    else:
        event.update(
            event_type="performance_alert",
            metric=rule.metric,
            threshold=float(rule.threshold),
            actual=float(value),
            window=window_text(rule.window_s),
        )
    return event


def make_plugin(settings: Settings) -> Guardian:
    names = [rule.name for rule in settings.guardian_rules]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        # A rule's name keys its episodes, alerts and metrics: two rules cannot share one.
        raise SettingsError(
            f"invalid setting guardian_rules (env WATCHLLM_GUARDIAN_RULES): rule name"
            f" {twice[0]!r} is used twice"
        )
    return Guardian(settings)
