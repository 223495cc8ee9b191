"""Guardian's bookkeeping, free of I/O: sliding windows fed by the ingest stream, figures
from the store, and the episodes they open and close.

A key is (rule, project, subject): the subject is the run or user id of a per-run or per-user
rule, None for a per-project one. Its value is the stream window's figure or the last figure
read from the store (per-project rules only): for a sum (cost, failures) the larger, so a
breach seen by either opens the episode and it closes once neither sees it; for a rate or a
percentile the stream's when it has enough events, else the stored one. Windows are in
wall-clock time, and an event counts at its own timestamp: an import of last month's data
opens nothing.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ..sdk.context import new_id
from .alert import Alert
from .rules import GuardianRule

Key = tuple[str, str, str | None]  # (rule name, project id, subject)
Source = Literal["stream", "rollup"]

# Bounds on memory: samples kept per key (the oldest go first) and keys per rule (the least
# recently fed key that is not firing goes first).
MAX_SAMPLES_PER_KEY = 100_000
MAX_KEYS_PER_RULE = 10_000
SUMS = ("cost_usd", "failures")


@dataclass
class Window:
    """(timestamp s, value) samples of one key, oldest first."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, ts: float, value: float) -> None:
        self.samples.append((ts, value))
        if len(self.samples) > MAX_SAMPLES_PER_KEY:
            self.samples.popleft()

    def expire(self, since: float) -> None:
        samples = self.samples
        while samples and samples[0][0] < since:
            samples.popleft()


@dataclass
class Episode:
    episode_id: str
    started_at: datetime
    source: Source


def figure(rule: GuardianRule, values: list[float]) -> float | None:
    """The rule's figure over a window's values, or None with too few to judge."""
    if len(values) < rule.min_events:
        return None
    if rule.metric == "cost_usd" or rule.metric == "failures":
        return math.fsum(values)
    if rule.metric == "error_rate":
        return math.fsum(values) / len(values)
    ordered = sorted(values)  # latency_p95_ms: nearest rank
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def sample(rule: GuardianRule, event: Any) -> float | None:
    """What one event adds to a window of this rule (None: nothing)."""
    kind = event.event_type
    if rule.metric == "failures":
        return 1.0 if kind in rule.failure_types else None
    if kind != "prompt_call":
        return None
    if rule.metric == "cost_usd":
        cost = getattr(event, "cost_estimate_usd", None)
        return float(cost) if cost is not None else None
    if rule.metric == "error_rate":
        return 0.0 if getattr(event, "status", "success") == "success" else 1.0
    latency = getattr(event, "latency_ms", None)
    return float(latency) if latency is not None else None


def subject_of(rule: GuardianRule, event: Any) -> str | Literal[False] | None:
    """The subject an event counts for, or False when the rule has none for it (a per-user
    rule and an event without a user)."""
    if rule.per == "project":
        return None
    value = getattr(event, "run_id" if rule.per == "run" else "user_id", None)
    return value if value else False


def _ts(event: Any, now: float) -> float:
    stamp = getattr(event, "timestamp", None)
    if isinstance(stamp, datetime):
        return min(stamp.timestamp(), now)  # one from the future counts as now
    return now


class Engine:
    """Feed it events (`observe`) and stored figures (`observe_stored`); `evaluate` returns
    the episodes opened and closed since the last call, as Alerts. Thread-safe."""

    def __init__(
        self, rules: Iterable[GuardianRule], clock: Callable[[], float] | None = None
    ) -> None:
        import time

        self.rules = {rule.name: rule for rule in rules}
        self.clock = clock or time.time
        self.windows: dict[Key, Window] = {}
        # Per rule, its keys with windows, least recently fed first (the bound's order).
        self.fed: dict[str, OrderedDict[Key, None]] = {name: OrderedDict() for name in self.rules}
        self.stored: dict[Key, float | None] = {}
        self.episodes: dict[Key, Episode] = {}
        self._lock = threading.Lock()

    def observe(self, events: Iterable[Any], enabled: Callable[[str], bool]) -> set[Key]:
        """Add a stored batch to the windows of the projects Guardian is on for; returns the
        keys touched (to evaluate)."""
        now = self.clock()
        touched: set[Key] = set()
        decided: dict[str, bool] = {}
        with self._lock:
            for event in events:
                project = event.project_id
                rules = [r for r in self.rules.values() if r.applies_to(project)]
                if not rules:
                    continue
                if project not in decided:
                    decided[project] = enabled(project)
                if not decided[project]:
                    continue
                ts = _ts(event, now)
                for rule in rules:
                    if ts < now - rule.window_s:
                        continue
                    value = sample(rule, event)
                    subject = subject_of(rule, event) if value is not None else False
                    if value is None or subject is False:
                        continue
                    key = (rule.name, project, subject)
                    window = self.windows.get(key)
                    if window is None:
                        window = self.windows[key] = Window()
                        self._bound(rule, key)
                    else:
                        self.fed[rule.name].move_to_end(key)
                    window.add(ts, value)
                    touched.add(key)
        return touched

    def _bound(self, rule: GuardianRule, key: Key) -> None:
        """Note a new key of the rule; past the bound, drop the least recently fed key that
        is not firing (O(1) but for a run of firing keys at the front)."""
        fed = self.fed[rule.name]
        fed[key] = None
        if len(fed) <= MAX_KEYS_PER_RULE:
            return
        for old in fed:
            if old not in self.episodes and old != key:
                del fed[old]
                self.windows.pop(old, None)
                return

    def observe_stored(self, rule: GuardianRule, project: str, value: float | None) -> Key:
        """The rule's figure for a project read from the store (per-project rules)."""
        key = (rule.name, project, None)
        with self._lock:
            self.stored[key] = value
        return key

    def forget_project(self, project: str) -> None:
        """Guardian was turned off for a project: its windows go, so its episodes recover."""
        with self._lock:
            for key in [k for k in self.windows if k[1] == project]:
                del self.windows[key]
                self.fed[key[0]].pop(key, None)
            for key in [k for k in self.stored if k[1] == project]:
                del self.stored[key]

    def projects(self) -> set[str]:
        with self._lock:
            return {k[1] for k in self.windows} | {k[1] for k in self.episodes}

    def value(self, key: Key, now: float) -> tuple[float | None, Source]:
        rule = self.rules[key[0]]
        window = self.windows.get(key)
        streamed = None
        if window is not None:
            window.expire(now - rule.window_s)
            streamed = figure(rule, [v for _, v in window.samples])
            if not window.samples:
                del self.windows[key]
                self.fed[rule.name].pop(key, None)
        stored = self.stored.get(key)
        if stored is None:
            return streamed, "stream"
        if streamed is None:
            return stored, "rollup"
        # A sum read from the store can only lag behind (count less), so the larger one is
        # right. A rate or a percentile read a moment ago may be above what the stream sees
        # now (the store sink is behind the stream): the stream's figure wins when it has one.
        if rule.metric in SUMS and stored > streamed:
            return stored, "rollup"
        return streamed, "stream"

    def evaluate(self, keys: Iterable[Key] | None = None) -> list[Alert]:
        """Open or close episodes for `keys` (every key known when None)."""
        now = self.clock()
        at = datetime.fromtimestamp(now, UTC)
        alerts: list[Alert] = []
        with self._lock:
            if keys is None:
                keys = set(self.windows) | set(self.stored) | set(self.episodes)
            for key in sorted(keys, key=lambda k: (k[0], k[1], k[2] or "")):
                rule = self.rules.get(key[0])
                if rule is None:
                    continue
                value, source = self.value(key, now)
                over = value is not None and value > rule.threshold
                episode = self.episodes.get(key)
                if over and episode is None:
                    episode = Episode(new_id(), at, source)
                    self.episodes[key] = episode
                    alerts.append(
                        Alert(
                            "firing",
                            rule,
                            key[1],
                            key[2],
                            value,
                            episode.episode_id,
                            at,
                            at,
                            source,
                        )
                    )
                elif not over and episode is not None:
                    del self.episodes[key]
                    alerts.append(
                        Alert(
                            "recovered",
                            rule,
                            key[1],
                            key[2],
                            value,
                            episode.episode_id,
                            episode.started_at,
                            at,
                            source,
                        )
                    )
        return alerts

    def blocked(self, project: str, user_id: str | None) -> Alert | None:
        """The firing block rule that denies this project (or this user of it), if any."""
        with self._lock:
            for (name, proj, subject), episode in self.episodes.items():
                rule = self.rules[name]
                if not rule.block or proj != project:
                    continue
                if subject is None or (user_id is not None and subject == user_id):
                    return Alert(
                        "firing",
                        rule,
                        proj,
                        subject,
                        None,
                        episode.episode_id,
                        episode.started_at,
                        episode.started_at,
                        episode.source,
                    )
        return None
