"""The embedded store: chDB (the ClickHouse engine in this process), data in a local folder.

Registered with `trylast`, so a plugin that provides another store (a ClickHouse server)
takes precedence. chDB opens one data folder per process and fails obscurely when a second
process opens the same folder, so we hold a FolderLock that names the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from watchllm_ext import Settings, hookimpl
from watchllm_ext.locks import FolderLock, FolderLocked
from watchllm_ext.store import StoreError, StoreLockedError
from watchllm_ext.store.params import format_params
from watchllm_ext.store.rows import OneArray

log = logging.getLogger("watchllm.chdb")
# How long closing the store waits for a statement that is still running.
CLOSE_WAIT_S = 60.0
VERSION_WAIT_S = 0.5  # version()'s wait for each handle


# Below this much free space (or 8 times an insert's JSON, or 5% of the disk) inserts take the
# way that checks for room (ChdbStore.insert_json).
LOW_DISK_BYTES = 1 << 30
MAX_STREAMS = 2  # inserts in parts at once (the store sink's events and their parts)


def _store_error(exc: Exception) -> StoreError:
    """chDB's exception as a StoreError: permanent when ClickHouse says the data is wrong
    (type and value errors never succeed on a retry), passing otherwise."""
    message = str(exc)
    permanent_codes = ("CANNOT_CONVERT_TYPE", "TYPE_MISMATCH", "CANNOT_PARSE", "TOO_LARGE")
    return StoreError(message, permanent=any(code in message for code in permanent_codes))


def _setting_literal(value: Any) -> str:
    """A setting's value in SQL: numbers as they are, anything else a quoted string."""
    if isinstance(value, bool | int | float):
        return str(int(value)) if isinstance(value, bool) else str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class ChdbStore:
    name = "chdb"
    cluster = None
    # Only this process writes to the folder (FolderLock): see Store.exclusive.
    exclusive = True

    def __init__(self, path: Path) -> None:
        from chdb import session

        self.path = path.resolve()
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds every prompt
        try:
            self._lock: FolderLock | None = FolderLock(self.path, "data folder")
        except FolderLocked as exc:
            raise StoreLockedError(str(exc)) from None
        self._lock_calls = threading.Lock()
        # Reads (`query`) go through a second handle on the same engine, one at a time on
        # it: chDB runs statements of two handles in parallel, so a dashboard's or the API's
        # read no longer waits behind an insert of tens of thousands of rows (0.3-1 s).
        self._lock_reads = threading.Lock()
        handles: list[Any] = []
        try:
            while len(handles) < 2:
                handles.append(session.Session(str(self.path)))
        except Exception as exc:
            for handle in handles:
                handle.close()
            self._release_lock()
            raise StoreError(f"cannot open the chDB folder {self.path}: {exc}") from exc
        self._session, self._reads = handles
        # Handles for inserts sent in parts (open_insert), opened as first needed: a stream
        # keeps its handle from its first part to its end, and the main handle stays free.
        self._stream_handles: list[tuple[Any, threading.Lock]] = []
        self._lock_streams = threading.Lock()  # (the list, _closing)
        self._closing = False

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock_reads:
            result = self._on(self._reads, sql, "JSONEachRow", params)
        text = result.data() if result is not None else ""
        # split("\n"), not splitlines(): that also splits at U+0085 and U+2028 inside strings.
        return [json.loads(line) for line in text.split("\n") if line]

    def insert(self, table: str, data: pa.Table) -> None:
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        columns = ", ".join(f"`{name}`" for name in data.column_names)
        # chDB's Python() table function reads the Arrow table from this frame by name.
        arrow_rows = data  # noqa: F841 - referenced by name inside the SQL below
        sql = f"INSERT INTO {table} ({columns}) SELECT * FROM Python(arrow_rows)"
        self._run(sql, "CSV", None, exclusive=True)

    def insert_json(
        self, table: str, body: bytes | Iterable[bytes | memoryview], settings: Mapping[str, Any]
    ) -> None:
        """Insert `body` (JSONEachRow: objects one a line, or one JSON array of them; whole or
        in pieces, a list or another iterable, each handed to chDB as it is), parsed by
        ClickHouse in its own threads with `settings`."""
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        clause = ", ".join(f"{name} = {_setting_literal(v)}" for name, v in settings.items())
        sql = f"INSERT INTO {table} SETTINGS {clause}" if clause else f"INSERT INTO {table}"
        pieces = [body] if isinstance(body, bytes) else list(body)
        try:
            if self._room_for(sum(len(piece) for piece in pieces)):
                with self._lock_calls, self._session.send_insert(sql, "JSONEachRow") as inserter:
                    for piece in pieces:
                        inserter.append(piece)
                    inserter.finish()
            else:
                # chDB's streaming insert does not report a part it had no room to write: it
                # returns as if it had (rows_written and all), and the rows are gone. A query
                # reserves the room first and raises NOT_ENOUGH_SPACE (the writer then retries,
                # the events wait in the spool), at ~3x the CPU: only near a full disk.
                text = b"".join(pieces).decode()
                with self._lock_calls:
                    self._session.query(f"{sql} FORMAT JSONEachRow\n{text}", "CSV")
        except Exception as exc:
            raise _store_error(exc) from exc

    def open_insert(self, table: str, settings: Mapping[str, Any]) -> JsonArrayInsert:
        """An insert into `table` of one JSON array (JSONEachRow, as insert_json) whose events
        come in parts: ClickHouse parses each part as it is appended, in its own threads, and
        the rows land at `finish()`, all at once (none at `cancel()`). So a burst's insert is
        mostly done when its last events arrive. Raises StoreError near a full disk (where
        insert_json checks for room first) or when every stream handle is busy."""
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        if not self._room_for(0):
            raise StoreError("the disk is nearly full: the insert goes whole (insert_json)")
        clause = ", ".join(f"{name} = {_setting_literal(v)}" for name, v in settings.items())
        sql = f"INSERT INTO {table} SETTINGS {clause}" if clause else f"INSERT INTO {table}"
        handle, lock = self._free_stream_handle()
        try:
            inserter = handle.send_insert(sql, "JSONEachRow")
        except Exception as exc:
            lock.release()
            raise _store_error(exc) from exc
        return JsonArrayInsert(self, inserter, lock)

    def _free_stream_handle(self) -> tuple[Any, threading.Lock]:
        """A stream handle that no stream holds, its lock taken (opened if none is free)."""
        from chdb import session

        with self._lock_streams:
            for handle, lock in self._stream_handles:
                if lock.acquire(blocking=False):
                    return handle, lock
            if self._closing:
                raise StoreError("the store is closing")
            if len(self._stream_handles) >= MAX_STREAMS:
                raise StoreError("every stream handle of the store is busy")
            try:
                handle = session.Session(str(self.path))
            except Exception as exc:
                raise StoreError(f"cannot open a chDB handle: {exc}") from exc
            lock = threading.Lock()
            lock.acquire()
            self._stream_handles.append((handle, lock))
            return handle, lock

    def _room_for(self, size: int) -> bool:
        """Whether the store's disk has room to spare for an insert of `size` bytes of JSON:
        its parts take less, and merges reserve their own. Never is near a full disk."""
        try:
            disk = os.statvfs(self.path)
        except OSError:
            return False
        free = disk.f_bavail * disk.f_frsize
        return free >= max(LOW_DISK_BYTES, 8 * size, disk.f_blocks * disk.f_frsize // 20)

    def stream_arrow(
        self, sql: str, params: Mapping[str, Any] | None = None, rows_per_batch: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Run a SELECT; yield its rows as Arrow record batches, so memory stays at about one
        batch whatever the answer's size (used by `watchllm export`). Holds the store for
        the whole iteration: finish or close the iterator promptly."""
        with self._lock_calls:
            try:
                stream = self._session.send_query(sql, "Arrow", params=format_params(params))
                reader = stream.record_batch(rows_per_batch=rows_per_batch)
            except Exception as exc:
                raise _store_error(exc) from exc
            try:
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        return
                    except Exception as exc:
                        raise StoreError(str(exc)) from exc
                    yield batch
            finally:
                reader.close()
                stream.close()

    def version(self) -> str:
        """ClickHouse's version, from whichever handle is free first (/readyz asks it): a long
        analytics read on the read handle is the store at work, not the store down."""
        for handle, lock in ((self._reads, self._lock_reads), (self._session, self._lock_calls)):
            if lock.acquire(timeout=VERSION_WAIT_S):
                try:
                    result = self._on(handle, "SELECT version() AS v", "JSONEachRow", None)
                finally:
                    lock.release()
                return str(json.loads(result.data())["v"])
        raise StoreError(f"both chDB handles stayed busy for {2 * VERSION_WAIT_S:g} s")

    def close(self) -> None:
        # After the statement running now, if any: closing the session under an insert that a
        # worker thread still runs (a cancelled sink's) deadlocks chDB and can crash the
        # process at exit.
        waited = self._lock_calls.acquire(timeout=CLOSE_WAIT_S)
        if not waited:
            log.warning("chDB: a statement still ran after %.0fs; closing anyway", CLOSE_WAIT_S)
        read_done = self._lock_reads.acquire(timeout=CLOSE_WAIT_S)
        with self._lock_streams:
            self._closing = True  # no handle is opened from now on
            streams, self._stream_handles = self._stream_handles, []
        streams_done = [lock.acquire(timeout=CLOSE_WAIT_S) for _, lock in streams]
        try:
            for handle, _ in streams:
                handle.close()
            self._reads.close()
            self._session.close()
        finally:
            for (_, lock), done in zip(streams, streams_done, strict=True):
                if done:
                    lock.release()
            if read_done:
                self._lock_reads.release()
            if waited:
                self._lock_calls.release()
            self._release_lock()

    def _run(
        self, sql: str, fmt: str, params: Mapping[str, Any] | None, exclusive: bool = False
    ) -> Any:
        """A statement on the main handle, one at a time (a handle runs one statement).
        `exclusive`: no read beside it either (an insert that reads its rows through
        Python() needs the GIL from ClickHouse's threads: a read beside it can deadlock)."""
        with self._lock_calls, self._lock_reads if exclusive else contextlib.nullcontext():
            return self._on(self._session, sql, fmt, params)

    @staticmethod
    def _on(handle: Any, sql: str, fmt: str, params: Mapping[str, Any] | None) -> Any:
        """A statement on `handle` (its lock held by the caller); errors as StoreError."""
        try:
            return handle.query(sql, fmt, params=format_params(params))
        except Exception as exc:
            raise _store_error(exc) from exc

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class JsonArrayInsert:
    """ChdbStore.open_insert's insert: `append` each body (a JSON array, whole or in pieces:
    store/rows.py Body), then `finish` or `cancel`, once. The bodies' events are sent as one
    array. Its calls may come from different threads, one at a time."""

    def __init__(self, store: ChdbStore, inserter: Any, lock: threading.Lock) -> None:
        self._store = store
        self._inserter = inserter
        self._lock: threading.Lock | None = lock  # the handle's, held until the end
        self._array = OneArray()

    def append(self, body: bytes | Iterable[bytes | memoryview]) -> None:
        try:
            pieces = self._array.pieces(body)
        except ValueError as exc:
            raise StoreError(str(exc), permanent=True) from exc
        # insert_json's rule for all it has sent: the rows are written at the end, at once.
        if pieces and not self._store._room_for(self._array.sent_bytes):
            raise StoreError("the disk is nearly full: the insert goes whole (insert_json)")
        for piece in pieces:
            self._send(piece)

    def finish(self) -> None:
        end = self._array.end()
        if end is None:
            self.cancel()  # nothing was sent: no statement to end
            return
        try:
            self._send(end)
            try:
                self._inserter.finish()
            except Exception as exc:
                raise _store_error(exc) from exc
        except BaseException:
            # A parse error found at the end leaves the handle's insert open: ended here, or
            # every later insert on the handle would be refused ("already active").
            self.cancel()
            raise
        self._end()

    def cancel(self) -> None:
        try:
            self._inserter.cancel()
        except Exception as exc:  # (already ended)
            log.debug("chDB: cancelling an insert: %s", exc)
        finally:
            self._end()

    def _send(self, piece: bytes | memoryview) -> None:
        try:
            self._inserter.append(piece)
        except Exception as exc:
            raise _store_error(exc) from exc

    def _end(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


@hookimpl(trylast=True)
def register_store(settings: Settings) -> ChdbStore:
    return ChdbStore(settings.store_path)
