"""Every store (tests/stores.py): migrations once, schema.sql in step, bound parameters; and
the embedded chDB store's folder lock."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from stores import EVERY_STORE, StoreBackend

from watchllm_ext.schema import EVENT_ADAPTER
from watchllm_ext.store import (
    Store,
    StoreError,
    StoreLockedError,
    apply_migrations,
    load_migrations,
)
from watchllm_ext.store.migrations import Migration
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS, tables_for
from watchllm_plugins.chdb_store import ChdbStore

pytestmark = EVERY_STORE

SCHEMA_SQL = Path(__file__).resolve().parents[1] / "clickhouse" / "schema.sql"


@pytest.fixture
def store(store_backend: StoreBackend) -> Iterator[Store]:
    s = store_backend.open()
    yield s
    s.close()


def _create_statements(store: Store) -> dict[str, str]:
    rows = store.query(
        "SELECT currentDatabase() AS db, name, create_table_query FROM system.tables"
        " WHERE database = currentDatabase() AND name != 'schema_migrations'"
    )
    # A statement names its own database (each store of a test has its own on ClickHouse).
    return {
        r["name"]: re.sub(rf"\b{re.escape(r['db'])}\.", "", r["create_table_query"]) for r in rows
    }


def test_migrations_apply_once(store: Store) -> None:
    assert apply_migrations(store) == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert apply_migrations(store) == []
    rows = store.query("SELECT version, name FROM schema_migrations")
    assert len(rows) == len(load_migrations())


def test_schema_sql_matches_the_migrations(store_backend: StoreBackend) -> None:
    migrated = store_backend.open("a")
    try:
        apply_migrations(migrated)
        from_migrations = _create_statements(migrated)
    finally:
        migrated.close()
    fresh = store_backend.open("b")
    try:
        for statement in Migration(0, "schema", SCHEMA_SQL.read_text()).statements():
            fresh.execute(statement)
        from_schema = _create_statements(fresh)
    finally:
        fresh.close()
    assert from_schema == from_migrations
    assert {"events", "tool_calls", "agent_steps", "spans", "traces"} <= set(from_schema)


def test_interrupted_migration_converges(store: Store) -> None:
    # Half of migration 0001 ran (the events table exists), its record did not: rerun works.
    first = load_migrations()[0]
    store.execute(first.statements()[0])
    assert apply_migrations(store)[0] == "0001_initial"
    assert "traces" in _create_statements(store)


def test_parameters_are_bound_not_formatted(store: Store) -> None:
    apply_migrations(store)
    event = EVENT_ADAPTER.validate_python(
        {
            "event_id": "e1",
            "event_type": "error",
            "run_id": "r",
            "project_id": "p",
            "timestamp": "2026-01-01T00:00:00Z",
            "error_type": "X",
            "error_message": "m",
        }
    )
    for table, data in tables_for([event]).items():
        store.insert(table, data)
    hostile = "p' OR '1'='1"
    rows = store.query(
        "SELECT count() AS n FROM events WHERE project_id = {p:String}", {"p": hostile}
    )
    assert rows == [{"n": 0}]
    assert store.query(
        "SELECT count() AS n FROM events WHERE project_id = {p:String}", {"p": "p"}
    ) == [{"n": 1}]


def test_data_errors_are_permanent_and_others_pass(store: Store) -> None:
    """A row ClickHouse cannot parse never goes in, so the sink dead-letters it at once
    (permanent); a failure of another kind may pass, so the writer retries it."""
    apply_migrations(store)
    row = {
        "project_id": "p",
        "event_id": "e",
        "event_type": "prompt_call",
        "run_id": "r",
        "timestamp": "2026-01-01T00:00:00Z",
        "client": "{}",
        "tokens_input": "many",
    }
    with pytest.raises(StoreError) as refused:
        store.insert_json("events_input", json.dumps([row]).encode(), JSON_INPUT_SETTINGS)
    assert refused.value.permanent, str(refused.value)
    with pytest.raises(StoreError) as failed:
        store.query("SELECT count() FROM no_such_table")
    assert not failed.value.permanent, str(failed.value)


# Only the embedded store has a data folder to lock: a ClickHouse server is shared by design.
def test_second_open_of_a_folder_names_the_holder(tmp_path: Path) -> None:
    store = ChdbStore(tmp_path / "chdb")
    try:
        with pytest.raises(StoreLockedError, match=r"in use by process \d+"):
            ChdbStore(store.path)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("sql_type", "value", "expected"),
    [
        ("String", "tab\there, quote ' \" and \\ backslash\nnewline", None),
        ("Nullable(String)", None, None),
        ("Array(String)", ["a", "b'c", "t\tx\\"], None),
        ("UInt32", 7, None),
        ("Float64", 1.25, None),
        ("DateTime64(3, 'UTC')", "2026-01-02 03:04:05.678", "2026-01-02 03:04:05.678"),
    ],
)
def test_parameter_values_round_trip(
    store: Store, sql_type: str, value: object, expected: object
) -> None:
    rows = store.query(f"SELECT {{v:{sql_type}}} AS v", {"v": value})
    assert rows == [{"v": value if expected is None else expected}]


def test_datetime_parameters_keep_milliseconds(store: Store) -> None:
    from datetime import UTC, datetime

    value = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    rows = store.query("SELECT toString({v:DateTime64(3, 'UTC')}) AS v", {"v": value})
    assert rows == [{"v": "2026-01-02 03:04:05.678"}]


def test_each_test_has_a_store_of_its_own(store_backend: StoreBackend, store: Store) -> None:
    # What the parametrization promises: the store in the test id, and nothing in it yet.
    assert store.name == ("chdb" if store_backend.name == "chdb" else "clickhouse")
    tables = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    assert tables == []
    if store_backend.is_clickhouse:
        assert store.query("SELECT currentDatabase() AS db") == [{"db": store_backend.database()}]


def test_id_lookups_cover_events_stored_before_their_migration(store: Store) -> None:
    """Migration 0005's backfill: events already stored are found by id and by parent id,
    exactly as events inserted after it (through its materialized views)."""
    from conftest import prompt_call

    from watchllm_ext.analytics import queries as Q

    apply_migrations(store)
    events = [
        EVENT_ADAPTER.validate_python({**prompt_call("root"), "project_id": "p"}),
        EVENT_ADAPTER.validate_python(
            {**prompt_call("kid", parent_event_id="root"), "project_id": "p",
             "timestamp": "2026-01-02T03:04:06Z"}
        ),
    ]  # fmt: skip
    for table, data in tables_for(events).items():
        store.insert(table, data)
    args = {"project": "p", "event_id": "root"}
    want = (store.query(Q.EVENT, args), store.query(Q.EVENT_CHILDREN, args))
    assert want[0][0]["event_id"] == "root" and want[1] == [{"event_id": "kid"}]
    # As if the events had been stored before 0005: empty lookups, then its backfill (the
    # children; the ids' table of 0005, event_times, is event_ids since 0012, which 0010
    # filled the same way).
    store.execute("TRUNCATE TABLE event_ids")
    store.execute("TRUNCATE TABLE event_children")
    assert store.query(Q.EVENT, args) == [] and store.query(Q.EVENT_CHILDREN, args) == []
    (migration,) = [m for m in load_migrations() if m.name == "id_lookups"]
    for statement in migration.statements():
        if statement.startswith("INSERT INTO event_children"):
            store.execute(statement)
        elif statement.startswith("INSERT INTO event_times"):
            store.execute(statement.replace("INSERT INTO event_times", "INSERT INTO event_ids"))
    assert (store.query(Q.EVENT, args), store.query(Q.EVENT_CHILDREN, args)) == want


def test_the_store_sink_completes_the_schema_before_its_first_insert(store: Store) -> None:
    """After a start with the store down, the sink may deliver before the app has applied
    the schema: it applies it first, so no row lands before a view that should see it."""
    import anyio
    from conftest import prompt_call

    from watchllm_ext.analytics import queries as Q
    from watchllm_ext.builtins.store_sink import StoreSink

    assert "events" not in {
        r["name"]
        for r in store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    }
    event = EVENT_ADAPTER.validate_python({**prompt_call("first"), "project_id": "p"})
    anyio.run(StoreSink(store).write, [event])
    # The id lookup (migration 0005's view) saw the row: the whole schema was there first.
    found = store.query(Q.EVENT, {"project": "p", "event_id": "first"})
    assert [r["event_id"] for r in found] == ["first"]


def test_a_chdb_read_does_not_wait_for_an_insert(tmp_path: Path) -> None:
    """chDB: reads have a handle of their own on the engine, so one answers while an insert
    is still streaming its rows in (it used to wait for the insert's end)."""
    import json
    import threading

    from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

    def row(i: int) -> bytes:
        return json.dumps(
            {
                "project_id": "p",
                "trace_id": f"{i:032x}",
                "span_id": f"{i:016x}",
                "name": "chat",
                "start_time": "2026-01-05T01:02:03Z",
                "end_time": "2026-01-05T01:02:04Z",
                "ingested_at": "2026-01-05T02:00:00Z",
            }
        ).encode()

    store = ChdbStore(tmp_path / "chdb")
    streaming, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield b"[" + row(1)
        streaming.set()
        release.wait(30)
        yield b"," + row(2) + b"]"

    try:
        apply_migrations(store)
        insert = threading.Thread(
            target=store.insert_json, args=("spans", body(), JSON_INPUT_SETTINGS)
        )
        insert.start()
        assert streaming.wait(10)
        answers: list[list[dict[str, object]]] = []
        read = threading.Thread(
            target=lambda: answers.append(store.query("SELECT count() AS n FROM spans"))
        )
        read.start()
        read.join(10)
        assert not read.is_alive() and int(answers[0][0]["n"]) == 0  # the insert is not over
        release.set()
        insert.join(30)
        assert int(store.query("SELECT count() AS n FROM spans FINAL")[0]["n"]) == 2
    finally:
        release.set()
        store.close()
