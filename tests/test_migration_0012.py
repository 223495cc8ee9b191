"""Migration 0012 (cheaper inserts) on every store: a store with events upgrades and gives every
analytics answer it gave before; inserts after it write compact parts; lookups by id and by
parent find events stored before and after it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from stores import EVERY_STORE, StoreBackend
from test_clickhouse_store import PROJECT, RANGES, build_events, named_queries

from watchllm_ext.analytics import queries as Q
from watchllm_ext.analytics.rollup import refresh_rollups
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.store import Store, apply_migrations, load_migrations
from watchllm_ext.store.migrations import tracking_table_statements
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS, input_json

pytestmark = EVERY_STORE


def migrate_to(store: Store, last: int) -> None:
    """Every migration up to `last`, recorded as applied, as an older WatchLLM left it."""
    for statement in tracking_table_statements(None):
        store.execute(statement)
    for migration in load_migrations():
        if migration.version > last:
            continue
        for statement in migration.statements():
            store.execute(statement)
        store.execute(
            "INSERT INTO schema_migrations (version, name, checksum)"
            " SELECT {v:UInt32}, {n:String}, {c:String}",
            {"v": migration.version, "n": migration.name, "c": migration.checksum},
        )


def insert(store: Store, events: list[Any]) -> None:
    # The store sink's way in (input tables, parts first), without its migration check.
    for table, body in input_json(events).items():
        store.insert_json(table, body, JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]


def family(name: str, timestamp: str) -> list[Any]:
    """An event and its child, a second later."""
    base = {"event_type": "error", "run_id": f"run-{name}", "project_id": PROJECT}
    return EVENT_LIST_ADAPTER.validate_python(
        [
            {**base, "event_id": name, "timestamp": timestamp, "error_type": "Timeout",
             "error_message": f"{name} failed"},
            {**base, "event_id": f"{name}-kid", "parent_event_id": name,
             "timestamp": timestamp.replace(":05", ":06").replace(":03.004", ":04"),
             "error_type": "Timeout", "error_message": "retry failed"},
        ]
    )  # fmt: skip


def every_answer(store: Store, rolled: bool) -> dict[str, Any]:
    return {name: store.query(sql, params) for name, (sql, params) in named_queries(rolled).items()}


def tables(store: Store) -> set[str]:
    rows = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    return {r["name"] for r in rows}


def new_part_types(store: Store) -> list[str]:
    rows = store.query(
        "SELECT part_type FROM system.parts WHERE database = currentDatabase()"
        " AND table = 'events' AND active ORDER BY modification_time DESC, name DESC LIMIT 1"
    )
    return [r["part_type"] for r in rows]


def test_a_store_with_events_upgrades_with_the_same_answers(store_backend: StoreBackend) -> None:
    store = store_backend.open("upgrade")
    try:
        migrate_to(store, 11)
        insert(store, build_events() + family("old", "2026-01-02T03:04:05Z"))
        assert {"event_times", "event_times_mv"} <= tables(store)
        assert refresh_rollups(store, max_hours=2000, margin=timedelta(0)) > 60
        raw_before = every_answer(store, rolled=False)
        old = {"project": PROJECT, "event_id": "old"}
        kids_before = store.query(Q.EVENT_CHILDREN, old)
        assert kids_before == [{"event_id": "old-kid"}]
        rolled_before = every_answer(store, rolled=True)
        dirty_before = store.query(Q.DIRTY_HOURS, {"limit": 2000})

        assert apply_migrations(store)[0] == "0012_cheaper_inserts"

        assert not {"event_times", "event_times_mv"} & tables(store)
        (create,) = store.query(
            "SELECT create_table_query AS q FROM system.tables"
            " WHERE database = currentDatabase() AND name = 'events'"
        )
        assert "min_rows_for_wide_part = 100000" in create["q"]
        assert "idx_parent_event_id" not in create["q"] and "idx_run_id" in create["q"]
        assert every_answer(store, rolled=False) == raw_before
        assert every_answer(store, rolled=True) == rolled_before
        assert store.query(Q.DIRTY_HOURS, {"limit": 2000}) == dirty_before
        assert store.query(Q.EVENT_CHILDREN, old) == kids_before
        # The comparison is not of empty answers.
        assert raw_before["event[7-1]"] and raw_before["event_tool_calls[t1]"]
        assert rolled_before[f"stats_sums[{len(RANGES) - 1}]"]

        # After it: a new event and its child are found by id and by parent.
        later = family("new", "2026-01-05T01:02:03.004Z")
        insert(store, later)
        args = {"project": PROJECT, "event_id": "new"}
        (found,) = store.query(Q.EVENT, args)
        assert found["error_message"] == "new failed"
        assert store.query(Q.EVENT_CHILDREN, args) == [{"event_id": "new-kid"}]
    finally:
        store.close()


def test_an_insert_writes_one_compact_part(store_backend: StoreBackend) -> None:
    # What the migration is for: an insert of ~13 MB (over ClickHouse's 10 MB default for a
    # wide part, a file per column) writes one compact part; before 0012 it was wide.
    prompt = "why is the sky blue " * 200  # 4,000 characters
    events = EVENT_LIST_ADAPTER.validate_python(
        [
            {
                "event_id": f"big-{i}",
                "event_type": "prompt_call",
                "run_id": f"run-{i // 10}",
                "project_id": PROJECT,
                "timestamp": f"2026-01-05T01:{i // 60 % 60:02d}:{i % 60:02d}Z",
                "model": "gpt-4o",
                "prompt": prompt,
                "response": prompt[::-1],
            }
            for i in range(1_600)
        ]
    )
    for last, part_type in ((11, "Wide"), (12, "Compact")):
        store = store_backend.open(f"v{last}")
        try:
            migrate_to(store, last)
            insert(store, events)
            assert new_part_types(store) == [part_type], last
        finally:
            store.close()
