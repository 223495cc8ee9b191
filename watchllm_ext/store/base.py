"""What a store is: something that runs ClickHouse SQL with bound parameters and takes
columnar inserts. chDB (embedded) and a ClickHouse server both fit behind this."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pyarrow as pa


class StoreError(Exception):
    """The store refused or failed an operation. `permanent` errors will never succeed on
    retry (a row the store rejects); others (store down, timeout) may."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class StoreUnavailable(StoreError):
    """The store cannot be reached now (down, unreachable, timing out); a retry may work.
    Unlike other errors at start, it lets `serve` start and accept into the spool."""


class StoreLockedError(StoreError):
    """The data folder is in use by another process."""


@runtime_checkable
class Store(Protocol):
    name: str
    # Optional: the ClickHouse cluster the tables are spread over (migrations then run in
    # their cluster form, see cluster.py); absent or None on a single node. Read it with
    # cluster_of(store).
    # Optional: True when no other process can write to the store (chDB's locked folder), so
    # the store sink need not look for copies of an event that raced its insert (store_sink.py);
    # absent or False otherwise.

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        """Run a statement with no result (DDL, INSERT … SELECT)."""

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT; user input only through `{name:Type}` parameters."""

    def insert(self, table: str, data: pa.Table) -> None:
        """Insert an Arrow table whose column names are columns of `table`."""

    # Optional: insert_json(table, body, settings) inserts JSONEachRow text (one JSON array of
    # objects; bytes, or pieces of it in a list or another iterable: store/rows.py Body)
    # parsed by ClickHouse with `settings`; the store sink sends events that way (store/rows.py
    # input_json, migration 0010). A store without it gets Arrow tables.

    def version(self) -> str:
        """The ClickHouse version string."""

    def close(self) -> None:
        """Release the store (and its data folder lock)."""


def cluster_of(store: Store) -> str | None:
    """The store's cluster, None for a single node (or a store that predates clusters)."""
    return getattr(store, "cluster", None)
