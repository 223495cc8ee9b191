"""Keeps `hourly_usage_by_project` up to date: recompute complete hours that got events
since they were last computed (see clickhouse/migrations/0002_analytics_rollups.sql).

Each project is its own unit of work: a project whose recomputation fails is logged with its
name and skipped, the others are still refreshed. `ProjectBackoff` keeps a failing project out
of the following rounds for a growing delay, so its hours (which stay dirty) cannot take the
whole budget of every round either.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..store import Store, StoreUnavailable
from . import queries

log = logging.getLogger("watchllm.rollup")

# A rollup is stamped a little before its query starts, so events whose insert overlapped
# the query mark the hour dirty again instead of being missed.
_MARGIN = timedelta(seconds=5)
# On a replicated cluster: the replica lag the rollup accepts (queries.py, _FRESH_REPLICAS)
# plus room for clock skew between the nodes and this host.
ROLLUP_MARGIN_CLUSTER = timedelta(seconds=90)
# Hours recomputed by one statement.
_CHUNK_HOURS = 500


def parse_hour(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


@dataclass
class RefreshResult:
    """What one round did: (project, hour) pairs recomputed, the projects refreshed, and the
    projects that failed (with the error's text)."""

    hours: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def refresh_projects(
    store: Store,
    *,
    max_hours: int = 2000,
    margin: timedelta = _MARGIN,
    skip: Collection[str] = (),
) -> RefreshResult:
    """Recompute dirty complete hours, project by project, leaving out `skip`.

    A project that fails is logged and listed in the result; the others go on. Only a store
    that cannot be reached (StoreUnavailable) ends the round: every project would fail alike.
    `margin` is how far back the rollup is stamped; 0 only when nothing inserts meanwhile.
    """
    if skip:
        dirty = store.query(queries.DIRTY_HOURS_EXCEPT, {"limit": max_hours, "skip": list(skip)})
    else:
        dirty = store.query(queries.DIRTY_HOURS, {"limit": max_hours})
    by_project: dict[str, list[datetime]] = defaultdict(list)
    for row in dirty:
        by_project[row["project_id"]].append(parse_hour(row["hour"]))
    result = RefreshResult()
    for project, hours in by_project.items():
        try:
            _recompute(store, project, hours, margin)
        except StoreUnavailable:
            raise
        except Exception as exc:  # any fault of one project's data must not stop the others
            log.exception(
                "refreshing the hourly rollup of project %s failed (%d hours from %s);"
                " the other projects go on",
                project,
                len(hours),
                min(hours).isoformat(),
            )
            result.failed[project] = str(exc)
            continue
        result.hours += len(hours)
        result.done.append(project)
    if result.hours:
        log.debug("recomputed %d hourly rollups", result.hours)
    return result


def refresh_rollups(
    store: Store,
    *,
    max_hours: int = 2000,
    margin: timedelta = _MARGIN,
    skip: Collection[str] = (),
) -> int:
    """Recompute dirty complete hours; returns how many (project, hour) pairs were done
    (a project that fails is logged and not counted: see refresh_projects)."""
    return refresh_projects(store, max_hours=max_hours, margin=margin, skip=skip).hours


def _recompute(store: Store, project: str, hours: list[datetime], margin: timedelta) -> None:
    computed_at = datetime.now(UTC) - margin
    for start in range(0, len(hours), _CHUNK_HOURS):
        chunk = hours[start : start + _CHUNK_HOURS]
        args = {
            "project": project,
            "first": min(chunk),
            "last": max(chunk) + timedelta(hours=1),
            "hours": [h.strftime("%Y-%m-%d %H:%M:%S") for h in chunk],
            "computed_at": computed_at,
        }
        # The per-hour states first: RECOMPUTE_HOURS is what marks the hours clean.
        store.execute(queries.RECOMPUTE_HOURLY_TOTALS, args)
        store.execute(queries.RECOMPUTE_HOURS, args)


@dataclass
class ProjectBackoff:
    """Projects whose refresh failed, each left out until its retry time; the delay doubles
    with every failure in a row, from `initial_s` up to `max_s`."""

    initial_s: float
    max_s: float
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, tuple[float, float]] = field(default_factory=dict)  # retry at, delay

    def waiting(self) -> list[str]:
        """The projects to leave out of this round."""
        now = self.clock()
        return sorted(p for p, (retry_at, _) in self._state.items() if retry_at > now)

    def record(self, result: RefreshResult) -> None:
        """Note a round's failures; a project refreshed since is forgotten."""
        now = self.clock()
        for project in result.done:
            self._state.pop(project, None)
        for project in result.failed:
            _, delay = self._state.get(project, (0.0, 0.0))
            delay = min(self.max_s, delay * 2 if delay else self.initial_s)
            self._state[project] = (now + delay, delay)
