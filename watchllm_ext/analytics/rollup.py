"""Keeps `hourly_usage_by_project` up to date: recompute complete hours that got events
since they were last computed (see clickhouse/migrations/0002_analytics_rollups.sql)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from ..store import Store
from . import queries

log = logging.getLogger("watchllm.rollup")

# A rollup is stamped a little before its query starts, so events whose insert overlapped
# the query mark the hour dirty again instead of being missed.
_MARGIN = timedelta(seconds=5)
# On a replicated cluster: the replica lag the rollup accepts (queries.py, _FRESH_REPLICAS)
# plus room for clock skew between the nodes and this host.
ROLLUP_MARGIN_CLUSTER = timedelta(seconds=90)


def parse_hour(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def refresh_rollups(store: Store, *, max_hours: int = 2000, margin: timedelta = _MARGIN) -> int:
    """Recompute dirty complete hours; returns how many (project, hour) pairs were done.

    `margin` is how far back the rollup is stamped; 0 only when nothing inserts meanwhile.
    """
    dirty = store.query(queries.DIRTY_HOURS, {"limit": max_hours})
    by_project: dict[str, list[datetime]] = defaultdict(list)
    for row in dirty:
        by_project[row["project_id"]].append(parse_hour(row["hour"]))
    for project, hours in by_project.items():
        computed_at = datetime.now(UTC) - margin
        for start in range(0, len(hours), 500):
            chunk = hours[start : start + 500]
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
    if dirty:
        log.debug("recomputed %d hourly rollups", len(dirty))
    return len(dirty)
