"""Built-in background work: keep the hourly analytics rollup up to date (analytics/rollup.py)."""

from __future__ import annotations

import logging
from functools import partial

import anyio

from ..analytics.rollup import ROLLUP_MARGIN_CLUSTER, ProjectBackoff, refresh_projects
from ..hookspecs import BackgroundTask, hookimpl
from ..settings import Settings
from ..store import Store
from ..store.base import cluster_of

log = logging.getLogger("watchllm.rollup")


@hookimpl
def register_background_tasks(settings: Settings, store: Store | None) -> BackgroundTask | None:
    if store is None:
        return None

    if cluster_of(store):
        refresh = partial(refresh_projects, margin=ROLLUP_MARGIN_CLUSTER)
    else:
        refresh = refresh_projects
    # A project whose refresh fails waits one interval, then twice as long each time it fails
    # again, up to an hour; its hours are read raw meanwhile (slower, still exact).
    backoff = ProjectBackoff(initial_s=settings.rollup_interval_s, max_s=3600.0)

    async def keep_rollups() -> None:
        """Recompute the hours that got events, every rollup_interval_s; never fatal."""
        while True:
            await anyio.sleep(settings.rollup_interval_s)
            try:
                result = await anyio.to_thread.run_sync(
                    partial(refresh, store, skip=backoff.waiting())
                )
            except Exception:
                log.exception("refreshing the hourly rollups failed; trying again later")
                continue
            backoff.record(result)

    return keep_rollups
