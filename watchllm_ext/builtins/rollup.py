"""Built-in background work: keep the hourly analytics rollup up to date (analytics/rollup.py)."""

from __future__ import annotations

import logging
from functools import partial

import anyio

from ..analytics.rollup import ROLLUP_MARGIN_CLUSTER, refresh_rollups
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
        refresh = partial(refresh_rollups, margin=ROLLUP_MARGIN_CLUSTER)
    else:
        refresh = refresh_rollups

    async def keep_rollups() -> None:
        """Recompute the hours that got events, every rollup_interval_s; never fatal."""
        while True:
            await anyio.sleep(settings.rollup_interval_s)
            try:
                await anyio.to_thread.run_sync(refresh, store)
            except Exception:
                log.exception("refreshing the hourly rollups failed; trying again later")

    return keep_rollups
