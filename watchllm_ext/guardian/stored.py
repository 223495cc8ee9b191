"""Rule figures read from the store with the analytics stats queries (the hourly rollup for
whole hours, raw events for the rest): what every process wrote, and what was stored before
a restart, which the in-memory stream windows never saw."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ..analytics import queries as Q
from ..analytics.models import Stats
from ..analytics.params import Range
from ..analytics.routes import _base_args, _rollup_window, _stats
from ..store import Store
from .rules import GuardianRule

RECENT_PROJECTS = """
SELECT DISTINCT project_id FROM events
WHERE timestamp >= {since:DateTime64(3, 'UTC')}
ORDER BY project_id
LIMIT 10000
"""


def recent_projects(store: Store, since: datetime) -> list[str]:
    """Projects with events since `since` (a rule for every project checks these)."""
    return [r["project_id"] for r in store.query(RECENT_PROJECTS, {"since": since})]


def project_stats(store: Store, project: str, window_s: float, now: datetime) -> Stats:
    span = Range(now - timedelta(seconds=window_s), now)
    window = _rollup_window(span)
    args = _base_args(project, span, window)
    sums = store.query(Q.STATS_SUMS, args)
    (states,) = store.query(Q.STATS_STATES, args)
    return _stats(project, span, sums, states, 0)


def stored_figure(rule: GuardianRule, stats: Stats) -> float | None:
    """The rule's figure from a project's stats over its window; None with too few events."""
    if rule.metric == "failures":
        count = sum(stats.events_by_type.get(kind, 0) for kind in rule.failure_types)
        return float(count) if count >= rule.min_events else None
    if stats.total_requests < rule.min_events:
        return None
    if rule.metric == "cost_usd":
        return stats.total_cost
    if rule.metric == "error_rate":
        return stats.error_rate
    return stats.latency_ms.p95


def now_utc() -> datetime:
    return datetime.now(UTC)
