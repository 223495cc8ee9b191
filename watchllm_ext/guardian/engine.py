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

# Bounds on memory: samples kept per key (the oldest go first) and subjects (runs, users)
# per rule and project (the least recently fed one that is not firing goes first). Per
# project, so one project's many users can never push another project's users out.
MAX_SAMPLES_PER_KEY = 100_000
MAX_SUBJECTS_PER_PROJECT = 10_000
SUMS = ("cost_usd", "failures")


# The latency sketch: buckets of 1% relative accuracy (DDSketch's mapping, the one
# ClickHouse's quantilesDD behind the analytics API uses), so a window of any size answers
# its p95 from a few hundred counts instead of sorting every sample.
SKETCH_ACCURACY = 0.01
_GAMMA = (1 + SKETCH_ACCURACY) / (1 - SKETCH_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
_ZERO = -(2**31)  # the bucket of 0 ms (and of anything under a nanosecond)


def _bucket(value: float) -> int:
    return math.ceil(math.log(value) / _LOG_GAMMA) if value > 1e-6 else _ZERO


def _bucket_value(index: int) -> float:
    return 0.0 if index == _ZERO else 2 * _GAMMA**index / (_GAMMA + 1)


@dataclass
class Window:
    """(timestamp s, value) samples of one key, oldest first, with their running sum (and,
    for a latency rule, their sketch): an event costs O(1) to add and to expire."""

    sketch: bool = False
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)

    def add(self, ts: float, value: float) -> None:
        self.samples.append((ts, value))
        self.total += value
        if self.sketch:
            index = _bucket(value)
            self.buckets[index] = self.buckets.get(index, 0) + 1
        if len(self.samples) > MAX_SAMPLES_PER_KEY:
            self._drop()

    def expire(self, since: float) -> None:
        samples = self.samples
        while samples and samples[0][0] < since:
            self._drop()
        if not samples:
            self.total = 0.0  # no drift carried over from the sums of floats

    def _drop(self) -> None:
        _, value = self.samples.popleft()
        self.total -= value
        if self.sketch:
            index = _bucket(value)
            left = self.buckets[index] - 1
            if left:
                self.buckets[index] = left
            else:
                del self.buckets[index]

    def quantile(self, q: float) -> float:
        """The nearest-rank q-quantile, within SKETCH_ACCURACY of the exact one."""
        rank = max(1, math.ceil(q * len(self.samples)))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return _bucket_value(index)
        return 0.0


@dataclass
class Episode:
    episode_id: str
    started_at: datetime
    source: Source


def figure(rule: GuardianRule, window: Window) -> float | None:
    """The rule's figure over a window, or None with too few events to judge."""
    n = len(window.samples)
    if n < rule.min_events or n == 0:
        return None
    if rule.metric == "cost_usd" or rule.metric == "failures":
        return max(0.0, window.total)
    if rule.metric == "error_rate":
        return max(0.0, window.total) / n
    return window.quantile(0.95)  # latency_p95_ms


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
        # Per (rule, project), its keys with windows, least recently fed first (the bound's
        # order); an entry goes when its last key does.
        self.fed: dict[tuple[str, str], OrderedDict[Key, None]] = {}
        # Per rule, subjects dropped at the bound (/metrics: watchllm_guardian_evictions_total).
        self.evicted: dict[str, int] = {}
        self.stored: dict[Key, float | None] = {}
        self.episodes: dict[Key, Episode] = {}
        # (project, subject) -> the firing block rules' alerts. Replaced whole, never changed
        # in place, so the quota check reads it without the lock (a batch may hold the lock
        # on a worker thread for a while).
        self.blocks: dict[tuple[str, str | None], tuple[Alert, ...]] = {}
        self._rules_of: dict[str, list[GuardianRule]] = {}
        self._lock = threading.Lock()

    def rules_of(self, project: str) -> list[GuardianRule]:
        found = self._rules_of.get(project)
        if found is None:
            found = [r for r in self.rules.values() if r.applies_to(project)]
            if len(self._rules_of) < 100_000:
                self._rules_of[project] = found
        return found

    def observe(self, events: Iterable[Any], enabled: Callable[[str], bool]) -> set[Key]:
        """Add a stored batch to the windows of the projects Guardian is on for; returns the
        keys touched (to evaluate)."""
        now = self.clock()
        touched: set[Key] = set()
        decided: dict[str, bool] = {}
        windows = self.windows
        with self._lock:
            for event in events:
                project = event.project_id
                on = decided.get(project)
                if on is None:
                    on = decided[project] = bool(self.rules_of(project)) and enabled(project)
                if not on:
                    continue
                ts = _ts(event, now)
                for rule in self.rules_of(project):
                    if ts < now - rule.window_s:
                        continue
                    value = sample(rule, event)
                    if value is None:
                        continue
                    subject = subject_of(rule, event)
                    if subject is False:
                        continue
                    key = (rule.name, project, subject)
                    window = windows.get(key)
                    if window is None:
                        window = windows[key] = Window(rule.metric == "latency_p95_ms")
                        self._bound(rule, key)
                    else:
                        self.fed[(rule.name, project)].move_to_end(key)
                    window.add(ts, value)
                    touched.add(key)
        return touched

    def _bound(self, rule: GuardianRule, key: Key) -> None:
        """Note a new key of the rule; past the project's bound, drop the project's least
        recently fed key that is not firing (O(1) but for a run of firing keys at the front)."""
        fed = self.fed.setdefault((rule.name, key[1]), OrderedDict())
        fed[key] = None
        if len(fed) <= MAX_SUBJECTS_PER_PROJECT:
            return
        for old in fed:
            if old not in self.episodes and old != key:
                del fed[old]
                self.windows.pop(old, None)
                self.evicted[rule.name] = self.evicted.get(rule.name, 0) + 1
                return

    def _unfeed(self, key: Key) -> None:
        fed = self.fed.get((key[0], key[1]))
        if fed is not None:
            fed.pop(key, None)
            if not fed:
                del self.fed[(key[0], key[1])]

    def stored_projects(self) -> set[str]:
        """The projects that have a stored figure now."""
        with self._lock:
            return {k[1] for k, v in self.stored.items() if v is not None}

    def observe_stored(self, rule: GuardianRule, project: str, value: float | None) -> Key:
        """The rule's figure for a project read from the store (per-project rules)."""
        key = (rule.name, project, None)
        with self._lock:
            self.stored[key] = value
        return key

    def forget_project(self, project: str) -> list[Key]:
        """Guardian was turned off for a project: its windows, stored figures, episodes and
        blocks go, without a recovery (nothing was judged back under a threshold). Returns
        the keys whose episode was ended so."""
        with self._lock:
            for key in [k for k in self.windows if k[1] == project]:
                del self.windows[key]
                self._unfeed(key)
            for key in [k for k in self.stored if k[1] == project]:
                del self.stored[key]
            ended = sorted(
                (k for k in self.episodes if k[1] == project), key=lambda k: (k[0], k[2] or "")
            )
            for key in ended:
                del self.episodes[key]
            for where in [w for w in self.blocks if w[0] == project]:
                del self.blocks[where]
        return ended

    def projects(self) -> set[str]:
        with self._lock:
            return {k[1] for k in self.windows} | {k[1] for k in self.episodes}

    def value(self, key: Key, now: float) -> tuple[float | None, Source]:
        rule = self.rules[key[0]]
        window = self.windows.get(key)
        streamed = None
        if window is not None:
            window.expire(now - rule.window_s)
            streamed = figure(rule, window)
            if not window.samples:
                del self.windows[key]
                self._unfeed(key)
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
                    alert = Alert(
                        "firing", rule, key[1], key[2], value, episode.episode_id, at, at, source
                    )
                    alerts.append(alert)
                    if rule.block:
                        where = (key[1], key[2])
                        self.blocks[where] = (*self.blocks.get(where, ()), alert)
                elif not over and episode is not None:
                    del self.episodes[key]
                    if rule.block:
                        where = (key[1], key[2])
                        left = tuple(a for a in self.blocks.get(where, ()) if a.rule is not rule)
                        if left:
                            self.blocks[where] = left
                        else:
                            self.blocks.pop(where, None)
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
        """The firing block rule that denies this project (or this user of it), if any.
        Lock-free: two dict reads per quota check."""
        blocks = self.blocks
        found = blocks.get((project, None))
        if not found and user_id is not None:
            found = blocks.get((project, user_id))
        return found[0] if found else None
