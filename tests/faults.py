"""Test-only plugin: the real chDB store, made to fail on demand, to test store outages.

While the file `<data_dir>/store-down` exists, every insert (Arrow or JSON, and the version
check of /readyz) raises a retryable StoreError, as a ClickHouse server that is down would; reads
made by the tests still work. It is loaded by dotted path
(WATCHLLM_PLUGINS=faults with tests/ on PYTHONPATH) or passed to create_app; it is not
shipped with WatchLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watchllm_ext import Settings, hookimpl
from watchllm_ext.store import StoreError
from watchllm_plugins.chdb_store import ChdbStore


class FlakyChdbStore(ChdbStore):
    def __init__(self, path: Path, marker: Path) -> None:
        super().__init__(path)
        self.marker = marker

    def _check(self) -> None:
        if self.marker.exists():
            raise StoreError("the store is down (test marker)")

    def insert(self, table: str, data: Any) -> None:
        self._check()
        super().insert(table, data)

    def insert_json(self, table: str, body: bytes, settings: Any) -> None:
        self._check()
        super().insert_json(table, body, settings)

    def open_insert(self, table: str, settings: Any) -> Any:
        self._check()
        return super().open_insert(table, settings)

    def version(self) -> str:
        self._check()
        return super().version()


@hookimpl(tryfirst=True)
def register_store(settings: Settings) -> FlakyChdbStore:
    return FlakyChdbStore(settings.store_path, settings.data_dir / "store-down")
