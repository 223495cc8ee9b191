"""The embedded chDB store: migrations once, schema.sql in step, bound parameters, the lock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from watchllm_ext.schema import EVENT_ADAPTER
from watchllm_ext.store import StoreLockedError, apply_migrations, load_migrations
from watchllm_ext.store.migrations import Migration
from watchllm_ext.store.rows import tables_for
from watchllm_plugins.chdb_store import ChdbStore

SCHEMA_SQL = Path(__file__).resolve().parents[1] / "clickhouse" / "schema.sql"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChdbStore]:
    s = ChdbStore(tmp_path / "chdb")
    yield s
    s.close()


def _create_statements(store: ChdbStore) -> dict[str, str]:
    rows = store.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = currentDatabase()"
        " AND name != 'schema_migrations'"
    )
    return {r["name"]: r["create_table_query"] for r in rows}


def test_migrations_apply_once(store: ChdbStore) -> None:
    assert apply_migrations(store) == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert apply_migrations(store) == []
    rows = store.query("SELECT version, name FROM schema_migrations")
    assert len(rows) == len(load_migrations())


def test_schema_sql_matches_the_migrations(tmp_path: Path) -> None:
    migrated = ChdbStore(tmp_path / "a")
    try:
        apply_migrations(migrated)
        from_migrations = _create_statements(migrated)
    finally:
        migrated.close()
    fresh = ChdbStore(tmp_path / "b")
    try:
        for statement in Migration(0, "schema", SCHEMA_SQL.read_text()).statements():
            fresh.execute(statement)
        from_schema = _create_statements(fresh)
    finally:
        fresh.close()
    assert from_schema == from_migrations
    assert {"events", "tool_calls", "agent_steps", "spans", "traces"} <= set(from_schema)


def test_interrupted_migration_converges(store: ChdbStore) -> None:
    # Half of migration 0001 ran (the events table exists), its record did not: rerun works.
    first = load_migrations()[0]
    store.execute(first.statements()[0])
    assert apply_migrations(store)[0] == "0001_initial"
    assert "traces" in _create_statements(store)


def test_parameters_are_bound_not_formatted(store: ChdbStore) -> None:
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


def test_second_open_of_a_folder_names_the_holder(store: ChdbStore) -> None:
    with pytest.raises(StoreLockedError, match=r"in use by process \d+"):
        ChdbStore(store.path)


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
    store: ChdbStore, sql_type: str, value: object, expected: object
) -> None:
    rows = store.query(f"SELECT {{v:{sql_type}}} AS v", {"v": value})
    assert rows == [{"v": value if expected is None else expected}]


def test_datetime_parameters_keep_milliseconds(store: ChdbStore) -> None:
    from datetime import UTC, datetime

    value = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    rows = store.query("SELECT toString({v:DateTime64(3, 'UTC')}) AS v", {"v": value})
    assert rows == [{"v": "2026-01-02 03:04:05.678"}]
