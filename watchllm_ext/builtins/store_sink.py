"""Built-in sink: every accepted batch goes into the store's tables.

The events go in as their JSON (the spool's own bytes where nothing needs rewriting:
writer.batch_json), `INSERT ... FORMAT JSONEachRow` into the input tables of migration 0010,
whose materialized views build the rows of events, tool_calls and agent_steps in
ClickHouse's threads (store/rows.py input_json). A store without insert_json gets the Arrow
tables of store/rows.py tables_for, as before. A batch holds up to `store_insert_max_events`
events (the writer's flush interval still applies): ClickHouse works best with large inserts.

Idempotency (docs/EVENTS.md): one event per (project_id, event_id), whatever its timestamp.
The event tables are ordered by time (range scans stay fast), so a copy with another timestamp
is another row that FINAL cannot collapse; the sink keeps such copies out instead:

1. within a batch, the first copy of an id is kept;
2. the batch's ids are looked up in `event_ids` (ordered by id in granules of 256 rows: a
   primary-key read whose cost does not grow with the table) and a copy whose id is stored
   is dropped: the first copy stored wins, whatever its timestamp or content. The events
   table is written last, after tool_calls and agent_steps, so an id in `event_ids` (kept
   by a view on events) has all its rows: a replay after a crash in the
   middle of a batch inserts again only what had not landed, and still lands exactly once;
3. where another process may write to the same store (a ClickHouse server), the ids are
   looked up again after the insert: two copies that raced past step 2 are then both
   visible, and the one with the later timestamp is deleted from every table that holds it
   (same timestamps collapse as always). The rollup of its hour is deleted too, so the hour is
   read raw until recomputed. Either racing process may find it; both delete the same copy.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import anyio
import numpy as np

from ..delivery.writer import (
    EventsJson,
    EventsJsonBatch,
    SinkError,
    batch_json,
    piece_events,
    piece_keys,
)
from ..hookspecs import hookimpl
from ..ingest.fast_validate import to_models
from ..otel.rows import SpanRow, encode_rows
from ..serving.tuning import lower_native_threads
from ..settings import Settings
from ..store import Store, StoreError, apply_migrations
from ..store.base import cluster_of
from ..store.cluster import quote
from ..store.migrations import in_form_for
from ..store.rows import (
    EVENTS_INPUT,
    JSON_INPUT_SETTINGS,
    PARTS_INPUT,
    Body,
    SpoolPieces,
    input_json,
    spool_pieces,
    tables_for,
)

# Characters of ids per lookup query (the ids, their quotes and commas): a ClickHouse server
# refuses a parameter value over http_max_field_value_size (128 KiB by default), whether it
# travels in the URL or as a form field, and URL-encoded ids stay within http_max_uri_size.
LOOKUP_CHARS = 100_000
# The tables holding rows of an event, keyed by (project_id, event_id, timestamp): a dropped
# copy is deleted from each. event_ids last: the others are found through it.
EVENT_TABLES = (
    "events",
    "tool_calls",
    "agent_steps",
    "event_children",
    "event_ids",
)
# Per-hour rollups, (project_id, hour): deleted for the hours of a deleted copy, because a
# recomputation replaces only the groups (model, type, status) the hour still has.
ROLLUP_TABLES = ("hourly_usage_by_project", "hourly_totals_by_project")

SPANS_TABLE = "spans"
Key = tuple[str, str]  # (project_id, event_id)
# The schema's id alphabet (schema.Id): such ids need no escaping inside a quoted literal.
log = logging.getLogger("watchllm.store_sink")
_PLAIN_IDS = re.compile(r"[A-Za-z0-9_.:\-]*")


class _ArrayText:
    """An Array(String) parameter already in ClickHouse's text form. Both stores format a
    value they do not know with str() (clickhouse-connect's format_bind_value); formatting a
    list of ids item by item costs ~4 us an id, one join a few percent of that."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def _ids_param(ids: list[str]) -> _ArrayText | list[str]:
    joined = "', '".join(ids)
    if _PLAIN_IDS.fullmatch(joined.replace("', '", "")):
        return _ArrayText(f"['{joined}']")
    return ids  # not from the schema: formatted (and escaped) item by item


def lookup_times(
    store: Store, keys: Iterable[Key], repeated_only: bool = False
) -> dict[Key, list[int]]:
    """The stored timestamps (ms, ascending) of each of `keys` that is stored; with
    `repeated_only`, of those stored with several timestamps only (the copies to drop after
    an insert: the server answers a few rows, not one per id of the batch)."""
    by_project = _ids_by_project(keys)
    sql = (
        "SELECT event_id, groupUniqArray(toUnixTimestamp64Milli(timestamp)) AS times"
        " FROM event_ids WHERE project_id = {project:String} AND event_id IN %s"
        " GROUP BY event_id" + (" HAVING length(times) > 1" if repeated_only else "")
    )
    # A server store sends the ids as external data, one request however many (~1/4 of the
    # server's CPU of parameter-sized chunks for 50,000 ids); not on a cluster, where the
    # external table's reach to the shards is not verified: there, and on chDB, in chunks.
    with_ids = getattr(store, "query_with_ids", None) if cluster_of(store) is None else None
    found: dict[Key, list[int]] = {}
    for project, ids in by_project.items():
        if with_ids is not None:
            answers = [with_ids(sql % "ids", {"project": project}, ids)]
        else:
            answers = [
                store.query(
                    sql % "{ids:Array(String)}", {"project": project, "ids": _ids_param(chunk)}
                )
                for chunk in _chunks(ids, LOOKUP_CHARS)
            ]
        for rows in answers:
            for row in rows:
                # 64-bit integers come as JSON strings (ClickHouse's default quoting).
                found[(project, row["event_id"])] = sorted(int(ms) for ms in row["times"])
    return found


def _ids_by_project(keys: Iterable[Key]) -> dict[str, list[str]]:
    """The ids of `keys`, by project. A batch is usually of one project: its ids are then
    listed in one C-level pass (~3 ms for 50,000 keys against ~15 grouping them one by one,
    on the writer's thread, which holds the GIL the requests need)."""
    listed = keys if isinstance(keys, list | set | frozenset) else list(keys)
    projects = set(map(itemgetter(0), listed))
    if len(projects) == 1:
        return {projects.pop(): list(map(itemgetter(1), listed))}
    by_project: dict[str, list[str]] = {}
    for project, event_id in listed:
        by_project.setdefault(project, []).append(event_id)
    return by_project


def _chunks(ids: list[str], max_chars: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    chars = 0
    for event_id in ids:
        if chunk and chars + len(event_id) > max_chars:
            yield chunk
            chunk, chars = [], 0
        chunk.append(event_id)
        chars += len(event_id) + 3  # quotes and comma
    if chunk:
        yield chunk


def first_copies(events: Sequence[Any], stored: Iterable[Key]) -> list[Any]:
    """The events to insert: the first copy of each id in the batch, unless the id is stored."""
    return [events[at] for at in _new_at(piece_keys(events), set(stored))]


def _keys_of(events: Sequence[Any]) -> list[Key]:
    """(project_id, event_id) of each event, in order: of a list of events or of a batch of
    worker-made records (EventsJsonBatch) alike."""
    return events.event_keys() if type(events) is EventsJsonBatch else piece_keys(events)


def _new_at(keys: Sequence[Key], seen: set[Key]) -> list[int]:
    """Where in `keys` each key not in `seen` first comes; those keys join `seen`."""
    found: list[int] = []
    for at, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            found.append(at)
    return found


def first_json_copies(batch: EventsJsonBatch, drop: Iterable[Key]) -> EventsJsonBatch:
    """first_copies for a batch of records worker processes made: a record whose every event
    is kept stays its bytes, one whose every event goes is left out unread, and only one that
    holds both is decoded. A resent batch (a client's retry, a load generator sending one
    body again and again) then costs no decoding; before, each of its records was decoded in
    one msgspec call on the sink's thread, holding the GIL for tens of milliseconds at a time
    (`/healthz` took 1-3 s to answer under a stream of resent 10 MB batches)."""
    seen: set[Key] = set(drop)
    pieces: list[Any] = []
    for piece in batch.pieces:
        keys = piece_keys(piece)
        wanted = _new_at(keys, seen)
        if len(wanted) == len(keys):
            pieces.append(piece)
        elif wanted:
            events = piece_events(piece)
            pieces.append([events[at] for at in wanted])
    return EventsJsonBatch(pieces)


def drop_later_copies(store: Store, stored: dict[Key, list[int]]) -> int:
    """Delete every stored copy but the earliest of ids stored with several timestamps, and
    the rollups of their hours. Returns the number of copies deleted."""
    losers = [(key, ms) for key, times in stored.items() for ms in times[1:]]
    if not losers:
        return 0
    # Literals, not parameters: an ON CLUSTER statement is replayed from its text on every
    # node. Ids and projects are restricted by the schema to [A-Za-z0-9_.:-], and quoted.
    by_project: dict[str, list[str]] = {}
    for (project, event_id), ms in losers:
        by_project.setdefault(project, []).append(f"({quote(event_id)}, {int(ms)})")
    cluster = cluster_of(store)
    for table in EVENT_TABLES:
        for project, pairs in by_project.items():
            delete = (
                f"DELETE FROM {table} WHERE project_id = {quote(project)}"
                f" AND (event_id, toUnixTimestamp64Milli(timestamp)) IN [{', '.join(pairs)}]"
            )
            for statement in in_form_for([delete], cluster):  # on t_local, on a cluster
                store.execute(statement)
    # After the deletes: an hour the rollup computed with the deleted copy is read raw, and
    # recomputed (its mark is newer than any rollup left), from now on.
    hours: dict[str, set[int]] = {}
    for (project, _), ms in losers:
        hours.setdefault(project, set()).add(ms // 3_600_000 * 3_600)
    for project, starts in hours.items():
        listed = ", ".join(f"toDateTime({h}, 'UTC')" for h in sorted(starts))
        for table in ROLLUP_TABLES:
            delete = (
                f"DELETE FROM {table} WHERE project_id = {quote(project)} AND hour IN ({listed})"
            )
            for statement in in_form_for([delete], cluster):
                store.execute(statement)
        marks = ", ".join(f"({quote(project)}, toDateTime({h}, 'UTC'), now64(6))" for h in starts)
        store.execute(f"INSERT INTO rollup_marks (project_id, hour, marked_at) VALUES {marks}")
    return len(losers)


_HASH_SLICE = 2_048  # keys hashed at once (SeenIds.positions): ~0.5 ms of the GIL


class SeenIds:
    """A Bloom filter of the (project, event id) pairs stored, for a store only this process
    writes to: an id it has never seen is new for sure, so only the few that hit the filter
    (its false positives, ~1% when full, and the real copies) are looked up in the store. A
    look-up of random ids reads most granules of `event_ids` (~100 ms per 1,000 ids at two
    million stored, growing with the table). A batch's keys are hashed in one pass and their
    bits read and set with numpy: ~0.3 us a key to check and ~0.4 to add (in Python, bit by
    bit, it was 0.5 and 0.9, on the GIL that requests need). Python's str hash is salted per
    process, which is fine: the filter lives and dies with the process."""

    BITS_PER_ID = 12  # three bit positions per id
    # At least a million ids (1.5 MB): a filter that fills up is rebuilt from the store
    # (0.6-1 us an id stored, on a worker thread, mostly holding the GIL: 130-210 ms at
    # 200,000 ids), which with the old minimum of 65,536 a fresh store did in its first
    # seconds of load, and again at 131,072, stalling the requests of those moments.
    MIN_CAPACITY = 1 << 20

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, self.MIN_CAPACITY)
        self.size = self.capacity * self.BITS_PER_ID
        self.bits = np.zeros(self.size // 8 + 1, dtype=np.uint8)
        self.count = 0

    @staticmethod
    def hashes(keys: Sequence[Key]) -> np.ndarray:
        """The keys' hashes (Python's, as uint64): what a filter of any size places."""
        # In slices: one fromiter over a 50,000-key batch held the GIL ~12 ms at once (C code
        # does not let go of it at the switch interval); between slices the event loop can.
        return np.concatenate(
            [
                np.fromiter(map(hash, keys[i : i + _HASH_SLICE]), dtype=np.int64)
                for i in range(0, len(keys), _HASH_SLICE)
            ]
            or [np.empty(0, dtype=np.int64)]
        ).view(np.uint64)

    def positions_of(self, hashes: np.ndarray) -> np.ndarray:
        """The three bit positions of each hash, one row a key: its low and high halves and
        their sum, modulo the size."""
        a = (hashes & 0xFFFF_FFFF) % self.size
        b = (hashes >> 32) % self.size
        return np.stack((a, b, (a + b) % self.size), axis=1)

    def positions(self, keys: Sequence[Key]) -> np.ndarray:
        """positions_of the keys' hashes. The sink computes them once for a batch, to check
        its keys and, once inserted, to add them."""
        return self.positions_of(self.hashes(keys))

    def add(self, key: Key) -> None:
        self.add_all([key])

    def __contains__(self, key: object) -> bool:
        assert isinstance(key, tuple)
        return bool(self.maybe_stored([key]))

    def add_all(self, keys: Iterable[Key]) -> None:
        self.add_hashes(self.hashes(keys if isinstance(keys, list) else list(keys)))

    def add_hashes(self, hashes: np.ndarray) -> None:
        self.add_positions(self.positions_of(hashes))

    def add_positions(self, positions: np.ndarray) -> None:
        flat = positions.ravel()
        # ufunc.at: a byte that several positions share gets every bit (`|=` would keep one).
        np.bitwise_or.at(self.bits, flat >> 3, (1 << (flat & 7)).astype(np.uint8))
        self.count += len(positions)

    def maybe_stored(self, keys: Iterable[Key], positions: np.ndarray | None = None) -> set[Key]:
        """The keys that may be stored: all three bits of the key set."""
        listed = keys if isinstance(keys, list) else list(keys)
        if positions is None:
            positions = self.positions(listed)
        hit = ((self.bits[positions >> 3] >> (positions & 7)) & 1).all(axis=1)
        return {listed[i] for i in np.flatnonzero(hit).tolist()}

    @property
    def full(self) -> bool:
        return self.count > self.capacity

    @classmethod
    def of_store(cls, store: Store) -> SeenIds:
        """Every pair in `event_ids` (~1 us an id of this process's CPU, a few seconds per
        million). Read a page at a time in the key's order, each page's query holding the
        store only while chDB answers it (stream_arrow holds it for the whole iteration:
        read whole, it kept the sink's inserts out for the time of the whole build); the ids
        are hashed in slices, between which other threads get the GIL."""
        (row,) = store.query("SELECT count() AS n FROM event_ids")
        seen = cls(2 * int(row["n"]))
        stream = getattr(store, "stream_arrow", None)  # optional (chDB has it)
        if stream is None:
            sql = "SELECT project_id, event_id FROM event_ids"
            seen.add_all((r["project_id"], r["event_id"]) for r in store.query(sql))
            return seen
        after: Key | None = None
        while True:
            where = (
                ""
                if after is None  # the key's own terms: the primary index narrows the read
                else " WHERE project_id > {p:String} OR (project_id = {p:String} AND"
                " event_id > {e:String})"
            )
            sql = (
                f"SELECT project_id, event_id FROM event_ids{where}"
                f" ORDER BY project_id, event_id LIMIT {_BUILD_PAGE}"
            )
            params = None if after is None else {"p": after[0], "e": after[1]}
            page = list(stream(sql, params, _BUILD_PAGE))  # whole: the store is free after it
            rows = sum(batch.num_rows for batch in page)
            for batch in page:
                for i in range(0, batch.num_rows, _HASH_SLICE):
                    part = batch.slice(i, _HASH_SLICE)
                    keys = list(
                        zip(part.column(0).to_pylist(), part.column(1).to_pylist(), strict=True)
                    )
                    seen.add_hashes(cls.hashes(keys))
                    after = keys[-1]
            if rows < _BUILD_PAGE:
                return seen


_BUILD_PAGE = 65_536  # ids read by one query of SeenIds.of_store


class Hashed(NamedTuple):
    """A batch's keys hashed for a filter of stored ids, and their bit positions in `seen`."""

    hashes: np.ndarray
    seen: SeenIds | None
    positions: np.ndarray | None


class StoreSink:
    # Events are read by attribute only: the writer hands over its structs as they are.
    reads_structs = True
    # Span rows are inserted as the spool's JSON (write_spans): no row objects are needed.
    reads_span_payloads = True
    # So are events a worker process made (writer.EventsJsonBatch): their ids and input
    # bodies came with them, and only a batch with copies to drop is decoded.
    reads_events_json = True

    def __init__(
        self, store: Store, max_batch_events: int | None = None, streamed: bool = True
    ) -> None:
        self.store = store
        # Bursts fed to the store as they come (open_stream), when it takes inserts in parts
        # (store_insert_streamed): the writer asks only a sink whose `streaming` is true.
        self.streaming = streamed and getattr(store, "open_insert", None) is not None
        self.name = f"store:{store.name}"
        # The writer's batch for this sink (None: the writer's flush_max_events).
        self.max_batch_events = max_batch_events
        # The schema is checked (and completed) before the first insert: after a start with
        # the store down, the app applies it when the store is back, and rows must not land
        # in tables whose later migrations (views, backfills) have not run yet.
        self._schema_checked = False
        # Look-up and insert as one step in this process; only a store that other processes
        # may write to (not chDB, locked to this one) needs the check after the insert.
        self._one_at_a_time = threading.Lock()
        self._shared = not getattr(store, "exclusive", False)
        # On a store no other process writes to: the filter of stored ids, built from the
        # store on a thread of its own from the first write on, and again (bigger) when full.
        # Until the first is ready every id of a batch is looked up in the store: built
        # before the first insert, ~1 us an id stored, it held back the first events after
        # a restart (16 s at nine million stored) and stalled requests for the GIL meanwhile.
        self._seen: SeenIds | None = None
        self._building: threading.Thread | None = None
        self._built: SeenIds | None = None  # the builder's result, taken by the next write
        self._inserted_meanwhile: list[np.ndarray] = []  # hashes inserted while it builds

    async def write(self, events: Sequence[Any]) -> None:
        await anyio.to_thread.run_sync(self._write, events)

    def _write(self, events: Sequence[Any]) -> None:
        self._check_schema()
        with self._one_at_a_time:
            kept, inserted, hashed = self._first_stored(events)
            if not kept:
                return
            self._insert(kept)
            self._remember(inserted, hashed)
            if self._shared:
                repeated = lookup_times(self.store, inserted, repeated_only=True)
                drop_later_copies(self.store, repeated)

    def _check_schema(self) -> None:
        if not self._schema_checked:
            try:
                apply_migrations(self.store)  # two small queries when it is up to date
            except StoreError as exc:  # never permanent here: the events wait in the spool
                raise SinkError(f"the store's schema is not ready: {exc}") from exc
            self._schema_checked = True

    def _first_stored(
        self, events: Sequence[Any], earlier: set[Key] | None = None
    ) -> tuple[Sequence[Any], set[Key], Hashed | None]:
        """(Under _one_at_a_time.) The events to insert (steps 1 and 2 of the module's
        docstring; `earlier`: keys already sent in the same insert, kept out as stored ones
        are), their keys, and those keys' hashes (and bit positions in the filter of stored
        ids) when the filter made them: made once, used twice.
        The writer's own list when nothing is dropped: its JSON is the spool's bytes."""
        as_json = type(events) is EventsJsonBatch
        batch_keys = set(_keys_of(events))
        keys: Iterable[Key] = batch_keys
        hashed = None
        if not self._shared:
            self._use_built_filter()
            if self._seen is None or self._seen.full:
                self._build_filter()
            listed = list(batch_keys)
            hashed = Hashed(SeenIds.hashes(listed), self._seen, None)
            if self._seen is not None:
                hashed = hashed._replace(positions=self._seen.positions_of(hashed.hashes))
                keys = self._seen.maybe_stored(listed, hashed.positions)
        stored = lookup_times(self.store, keys)
        # A race earlier left several copies (a crash before its check, say).
        drop_later_copies(self.store, stored)
        repeated = batch_keys & earlier if earlier else None
        if not stored and not repeated and len(batch_keys) == len(events):
            return events, batch_keys, hashed  # every id new and once (the usual case)
        drop = stored.keys() | (repeated or set())
        # A batch of worker-made records is filtered record by record, unread where it can.
        kept: Any = first_json_copies(events, drop) if as_json else first_copies(events, drop)
        if len(kept) == len(events):  # every event kept: the batch's keys, once each
            return events, batch_keys, hashed
        return kept, set(_keys_of(kept)), None

    def _remember(self, inserted: set[Key], hashed: Hashed | None) -> None:
        """(Under _one_at_a_time.) Stored now: `inserted` goes into the filter of stored ids
        (`hashed`: their hashes, when made already)."""
        if self._shared:
            return
        if hashed is None:
            hashed = Hashed(SeenIds.hashes(list(inserted)), None, None)
        if self._seen is not None:
            if hashed.positions is not None and hashed.seen is self._seen:
                self._seen.add_positions(hashed.positions)
            else:
                self._seen.add_hashes(hashed.hashes)
        if self._building is not None:
            self._inserted_meanwhile.append(hashed.hashes)

    def _build_filter(self) -> None:
        """Start building the filter from the store on a thread of its own, unless one is
        being built. (Under _one_at_a_time: what is inserted from now on is kept for it.)"""
        if self._building is not None:
            return
        self._inserted_meanwhile = []

        def build() -> None:
            try:
                self._built = SeenIds.of_store(self.store)
            except Exception as exc:  # the store went away, say: the next write tries again
                log.warning("the store sink's filter of stored ids was not built: %s", exc)

        self._building = threading.Thread(target=build, name="watchllm-seen-ids", daemon=True)
        self._building.start()

    def _use_built_filter(self) -> None:
        """Take the builder's filter once it is done, with the ids inserted since it began
        (its pages may have been read before they were stored). Under _one_at_a_time."""
        building = self._building
        if building is None or building.is_alive():
            return
        built, self._built, self._building = self._built, None, None
        meanwhile, self._inserted_meanwhile = self._inserted_meanwhile, []
        if built is not None:
            for hashes in meanwhile:
                built.add_hashes(hashes)
            self._seen = built

    async def write_spans(self, rows: Sequence[SpanRow]) -> None:
        await anyio.to_thread.run_sync(self._write_spans, rows)

    def _write_spans(self, rows: Sequence[SpanRow]) -> None:
        # Exactly once without a look-up: a re-sent span is the same row (same start time,
        # trace and span id: the table's key), which `spans` (ReplacingMergeTree) collapses.
        if not self._schema_checked:
            try:
                apply_migrations(self.store)
            except StoreError as exc:
                raise SinkError(f"the store's schema is not ready: {exc}") from exc
            self._schema_checked = True
        insert_json = getattr(self.store, "insert_json", None)
        if insert_json is None:
            raise SinkError(f"store {self.store.name} cannot insert JSON rows", permanent=True)
        lower_native_threads()  # chDB's threads made since the last insert yield to requests
        # The writer's batch (otel.rows.RowsJson, or a SpanBatch after a restart) goes as its
        # spool records' own bytes, in pieces, as events do; any other list of rows is encoded.
        body = spool_pieces(rows) or encode_rows(rows)
        insert_json(SPANS_TABLE, body, JSON_INPUT_SETTINGS)

    def open_stream(self) -> StoreStream | None:
        """One insert fed batch by batch (the writer's Sink.open_stream), on a store that
        takes inserts in parts (open_insert); None for the others (whole batches)."""
        if not self.streaming:
            return None
        self._check_schema()
        lower_native_threads()  # chDB's threads made since the last insert yield to requests
        return StoreStream(self)

    def _insert(self, events: Sequence[Any]) -> None:
        lower_native_threads()  # chDB's threads made since the last insert yield to requests
        insert_json = getattr(self.store, "insert_json", None)
        if insert_json is not None:
            bodies = _bodies(events)
            # events last: once an id is in event_ids (step 2) all its rows are stored.
            for table in sorted(bodies, key=lambda name: name == EVENTS_INPUT):
                insert_json(table, bodies[table], JSON_INPUT_SETTINGS)
            return
        try:
            if type(events) is EventsJsonBatch:
                events = events.events()
            tables = tables_for(to_models(events))  # tables_for reads models
        except Exception as exc:  # a row that cannot be built will never be built
            raise SinkError(f"cannot build rows: {exc}", permanent=True) from exc
        for table in sorted(tables, key=lambda name: name == "events"):
            self.store.insert(table, tables[table])


class StoreStream:
    """One insert of the store sink that takes the writer's batches as they come (the
    writer's streamed delivery): each batch's new events (steps 1 and 2) are sent at once,
    ClickHouse parses them meanwhile, and they are stored at `finish`, all together; after
    `cancel`, none of them. An input table's insert opens with its first rows; at the end the
    parts' table goes first, as in StoreSink._insert. (Its calls come on the writer's worker
    threads, one at a time.)"""

    def __init__(self, sink: StoreSink) -> None:
        self.sink = sink
        self.inserts: dict[str, Any] = {}  # by input table: the store's open_insert
        self.keys: set[Key] = set()  # of every event sent
        self.sent: list[tuple[set[Key], Hashed | None]] = []  # for the filter, at the end

    def feed(self, events: Sequence[Any]) -> None:
        sink = self.sink
        with sink._one_at_a_time:
            kept, inserted, hashed = sink._first_stored(events, self.keys)
        if not kept:
            return
        for table, body in _bodies(kept).items():
            insert = self.inserts.get(table)
            if insert is None:
                insert = self.inserts[table] = sink.store.open_insert(table, JSON_INPUT_SETTINGS)
            insert.append(body)
        self.keys |= inserted
        self.sent.append((inserted, hashed))

    def finish(self) -> None:
        try:
            for table in sorted(self.inserts, key=lambda name: name == EVENTS_INPUT):
                self.inserts[table].finish()
                del self.inserts[table]  # (one whose finish failed has ended itself)
        except BaseException:
            self.cancel()  # events whose parts are not stored must not be either
            raise
        sink = self.sink
        with sink._one_at_a_time:
            for inserted, hashed in self.sent:
                sink._remember(inserted, hashed)
            if sink._shared and self.keys:  # step 3
                drop_later_copies(sink.store, lookup_times(sink.store, self.keys, True))

    def cancel(self) -> None:
        inserts, self.inserts = self.inserts, {}
        for table, insert in inserts.items():
            try:
                insert.cancel()
            except Exception as exc:  # the others are cancelled all the same
                log.warning("cancelling the insert into %s failed: %s", table, exc)


def _bodies(events: Sequence[Any]) -> dict[str, Body]:
    """The input tables' JSON bodies of the events (store/rows.py input_json)."""
    try:
        if type(events) is EventsJsonBatch:
            return _worker_bodies(events)
        return input_json(events, batch_json)
    except Exception as exc:  # a row that cannot be built will never be built
        raise SinkError(f"cannot build rows: {exc}", permanent=True) from exc


def _worker_bodies(batch: EventsJsonBatch) -> dict[str, Body]:
    """input_json's bodies of a batch with records worker processes made: each such
    record's input (its spool bytes, or its rewritten rows) and parts as they came, the other
    records' made here (input_json); all of them sent in pieces, in order."""
    rows: list[bytes | memoryview] = []
    parts: list[bytes | memoryview] = []
    for piece in batch.pieces:
        if type(piece) is EventsJson:
            rows.append(piece.payload if piece.rows is None else piece.rows)
            if piece.parts is not None:
                parts.append(piece.parts)
            continue
        bodies = input_json(piece, batch_json)
        for listed, table in ((rows, EVENTS_INPUT), (parts, PARTS_INPUT)):
            body = bodies.get(table)
            if isinstance(body, SpoolPieces):
                listed.extend(body.payloads)  # the records' bytes, each a JSON array
            elif body is not None:
                assert isinstance(body, bytes)  # (input_json encodes into one array)
                listed.append(body)
    found: dict[str, Body] = {}
    if parts:
        found[PARTS_INPUT] = SpoolPieces(parts)
    found[EVENTS_INPUT] = SpoolPieces(rows)
    return found


@hookimpl(trylast=True)
def register_sinks(settings: Settings, store: Store | None) -> StoreSink | None:
    if store is None:
        return None
    return StoreSink(store, settings.store_insert_max_events, settings.store_insert_streamed)
