"""Built-in sink: every accepted batch goes into the store's tables (columnar inserts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from ..hookspecs import hookimpl
from ..settings import Settings
from ..store import Store, StoreError, apply_migrations
from ..store.rows import tables_for
from ..writer import SinkError


class StoreSink:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.name = f"store:{store.name}"
        # The schema is checked (and completed) before the first insert: after a start with
        # the store down, the app applies it when the store is back, and rows must not land
        # in tables whose later migrations (views, backfills) have not run yet.
        self._schema_checked = False

    async def write(self, events: Sequence[Any]) -> None:
        await anyio.to_thread.run_sync(self._write, events)

    def _write(self, events: Sequence[Any]) -> None:
        try:
            tables = tables_for(events)
        except Exception as exc:  # a row that cannot be built will never be built
            raise SinkError(f"cannot build rows: {exc}", permanent=True) from exc
        if not self._schema_checked:
            try:
                apply_migrations(self.store)  # two small queries when it is up to date
            except StoreError as exc:  # never permanent here: the events wait in the spool
                raise SinkError(f"the store's schema is not ready: {exc}") from exc
            self._schema_checked = True
        # events first: the traces rollup and every analytics figure read it.
        for table, data in tables.items():
            self.store.insert(table, data)


@hookimpl(trylast=True)
def register_sinks(settings: Settings, store: Store | None) -> StoreSink | None:
    return StoreSink(store) if store is not None else None
