"""The cluster form of the schema (watchllm_ext/store/cluster.py, clickhouse/cluster/layout.toml).

No ClickHouse cluster (nor Keeper) can run here, so the cluster DDL is checked in three ways:
- every rendered statement parses in ClickHouse (chDB's formatQuery), and has the engines,
  ON CLUSTER clauses and Distributed tables the layout promises;
- the sharding keys, evaluated by ClickHouse on real rows, keep every copy of an event on one
  shard and a run's whole tree (events, tool calls, steps, spans) on one shard;
- the rendered DDL, with only the cluster parts removed (ON CLUSTER, replication, and the
  Distributed engine replaced by a pass-through Buffer over the same local table), runs on
  chDB, and every named analytics query gives the same answers on that layout as on the
  single-node schema.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from chfixture import Fixture, start_fixture
from test_clickhouse_store import answers, build_events

from watchllm_ext.settings import SettingsError, load_settings
from watchllm_ext.store import StoreError, load_migrations
from watchllm_ext.store.cluster import ClusterFormError, for_cluster, load_layout
from watchllm_ext.store.migrations import apply_migrations, in_form_for, tracking_table_statements
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS, input_json, tables_for
from watchllm_plugins.chdb_store import ChdbStore
from watchllm_plugins.clickhouse_store import ClickHouseStore

CLUSTER = "wl_cluster"


def cluster_statements() -> list[str]:
    out = tracking_table_statements(CLUSTER)
    for migration in load_migrations():
        out += in_form_for(migration.statements(), CLUSTER)
    return out


def single_node_tables() -> dict[str, str]:
    """Table name -> its CREATE statement, from the single-node migrations."""
    found = {}
    for statement in tracking_table_statements(None) + [
        s for m in load_migrations() for s in m.statements()
    ]:
        match = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement)
        if match:
            found[match[1]] = statement
    return found


def after_engine(create: str) -> str:
    found = re.search(r"\s((?:PARTITION BY|ORDER BY)\b.*)$", create, re.S)
    assert found, create
    return found[1]


@pytest.fixture
def chdb(tmp_path: Path) -> Iterator[ChdbStore]:
    store = ChdbStore(tmp_path / "chdb")
    yield store
    store.close()


# --- rendering ------------------------------------------------------------------------------


def test_every_cluster_statement_parses(chdb: ChdbStore) -> None:
    statements = cluster_statements()
    assert len(statements) > 20
    for statement in statements:
        # formatQuery parses without running: ON CLUSTER and Replicated engines need Keeper.
        (row,) = chdb.query("SELECT formatQuery({q:String}) AS f", {"q": statement})
        assert row["f"], statement


def test_engines_sharding_and_on_cluster() -> None:
    layout = load_layout()
    statements = cluster_statements()
    tables = single_node_tables()
    inputs = {t: tables.pop(t) for t in layout.input_tables}
    assert set(tables) == set(layout.sharding_key), "every table has a sharding key, no more"
    # Input tables (Null engine) store nothing: the same table on every node, no replica.
    for table in inputs:
        (create,) = [s for s in statements if re.match(rf"CREATE TABLE IF NOT EXISTS {table}\b", s)]
        assert create.startswith(f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER '{CLUSTER}'")
        assert create.endswith("ENGINE = Null") and "Replicated" not in create
        assert not [s for s in statements if f" {table}_local" in s]
    for table, create in tables.items():
        (local,) = [
            s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table}_local ")
        ]
        engine = re.search(r"ENGINE = (\w+)\((.*?)\)\s*(?:PARTITION|ORDER)", local, re.S)
        assert engine, local
        single = re.search(r"ENGINE = (\w+)(?:\((.*?)\))?\s*(?:PARTITION|ORDER)", create, re.S)
        assert single
        # The same engine in its replicated form, with its own arguments kept after the
        # replication path (per shard) and replica name.
        assert engine[1] == "Replicated" + single[1]
        args = [a.strip() for a in engine[2].split(",")]
        assert args[:2] == ["'/clickhouse/tables/{shard}/{database}/{table}'", "'{replica}'"]
        assert args[2:] == ([single[2]] if single[2] else [])
        # Everything after the engine (partitioning, ordering: the dedup key) is unchanged.
        assert after_engine(local) == after_engine(create)
        (dist,) = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ")]
        assert dist == (
            f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER '{CLUSTER}' AS {table}_local\n"
            f"ENGINE = Distributed('{CLUSTER}', currentDatabase(), '{table}_local',"
            f" {layout.sharding_key[table]})"
        )
    # The rows of one run go to one shard: every run-keyed table shards on (project, run).
    for table in ("events", "tool_calls", "agent_steps"):
        assert layout.sharding_key[table] == "cityHash64(project_id, run_id)"
    assert layout.sharding_key["spans"] == "cityHash64(project_id, trace_id)"
    for statement in statements:
        if statement.startswith(("CREATE", "ALTER")):
            assert f" ON CLUSTER '{CLUSTER}'" in statement.split("\n")[0], statement
    # The materialized views fire on each node's local inserts and write beside them...
    views = [s for s in statements if "MATERIALIZED VIEW" in s]
    fed = [v for v in views if re.search(r"FROM (events_input|event_parts_input)\b", v)]
    local = [v for v in views if v not in fed]
    assert {re.search(r" TO (\w+) AS", v)[1] for v in local} == {
        "rollup_marks_local",
        "event_times_local",
        "event_children_local",
        "event_ids_local",
    }
    assert all("FROM events_local" in v for v in local)
    # ... but those of the input tables write to the Distributed tables: a row inserted on
    # any node goes to the shard of its key, beside the other copies of its event.
    assert sorted(re.search(r" TO (\w+) AS", v)[1] for v in fed) == [
        "agent_steps",
        "events",
        "tool_calls",
        "tool_calls",
    ]
    assert not any("_local" in v for v in fed)
    # Indexes and mutations are on the tables that hold data; a change to the column list (a
    # new column, a type) on both, the local table first. One-off inserts go through
    # Distributed.
    alters = [s for s in statements if s.startswith("ALTER")]
    for before, alter in itertools.pairwise(["ALTER TABLE -", *alters]):
        table = alter.split()[2]
        if not table.endswith("_local"):
            assert before.split()[2] == f"{table}_local" and " COLUMN " in alter, alter
    assert [a.split()[2] for a in alters if "hourly_usage_by_project" in a] == [
        "hourly_usage_by_project_local",
        "hourly_usage_by_project",
    ]
    assert [s.split()[2] for s in statements if s.startswith("INSERT")] == [
        "rollup_marks",
        "event_times",
        "event_children",
        "hourly_totals_by_project",
        "rollup_marks",
        "event_ids",
    ]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (
            "ALTER TABLE events ADD COLUMN IF NOT EXISTS note Nullable(String) CODEC(ZSTD(3))",
            [
                "ALTER TABLE events_local ON CLUSTER 'c' ADD COLUMN IF NOT EXISTS note"
                " Nullable(String) CODEC(ZSTD(3))",
                "ALTER TABLE events ON CLUSTER 'c' ADD COLUMN IF NOT EXISTS note Nullable(String)",
            ],
        ),
        (
            "ALTER TABLE spans MODIFY COLUMN span_events"
            " TTL toDateTime(start_time) + toIntervalDay(7)",
            [
                "ALTER TABLE spans_local ON CLUSTER 'c' MODIFY COLUMN span_events TTL"
                " toDateTime(start_time) + toIntervalDay(7)"
            ],
        ),
        (
            "ALTER TABLE events MODIFY COLUMN prompt REMOVE TTL",
            ["ALTER TABLE events_local ON CLUSTER 'c' MODIFY COLUMN prompt REMOVE TTL"],
        ),
        (
            "ALTER TABLE events MODIFY COLUMN metric String",
            [
                "ALTER TABLE events_local ON CLUSTER 'c' MODIFY COLUMN metric String",
                "ALTER TABLE events ON CLUSTER 'c' MODIFY COLUMN metric String",
            ],
        ),
        (
            "ALTER TABLE events ADD COLUMN x String CODEC(ZSTD(3))"
            " TTL toDateTime(timestamp) + toIntervalDay(3) AFTER env",
            [
                "ALTER TABLE events_local ON CLUSTER 'c' ADD COLUMN x String CODEC(ZSTD(3))"
                " TTL toDateTime(timestamp) + toIntervalDay(3) AFTER env",
                "ALTER TABLE events ON CLUSTER 'c' ADD COLUMN x String AFTER env",
            ],
        ),
        (
            "ALTER TABLE events MODIFY COLUMN prompt TTL toDateTime(timestamp) + toIntervalDay(9),"
            " MODIFY COLUMN response TTL toDateTime(timestamp) + toIntervalDay(9)",
            [
                "ALTER TABLE events_local ON CLUSTER 'c' MODIFY COLUMN prompt TTL"
                " toDateTime(timestamp) + toIntervalDay(9), MODIFY COLUMN response TTL"
                " toDateTime(timestamp) + toIntervalDay(9)"
            ],
        ),
        ("INSERT INTO events SELECT * FROM events", ["INSERT INTO events SELECT * FROM events"]),
        # 0012: a setting of the stored parts, and a view and table dropped on every node
        (
            "ALTER TABLE events MODIFY SETTING min_rows_for_wide_part = 100000",
            [
                "ALTER TABLE events_local ON CLUSTER 'c'"
                " MODIFY SETTING min_rows_for_wide_part = 100000"
            ],
        ),
        (
            "DROP VIEW IF EXISTS event_times_mv",
            ["DROP VIEW IF EXISTS event_times_mv ON CLUSTER 'c'"],
        ),
        (
            "DROP TABLE IF EXISTS event_times",
            [
                "DROP TABLE IF EXISTS event_times ON CLUSTER 'c'",
                "DROP TABLE IF EXISTS event_times_local ON CLUSTER 'c'",
            ],
        ),
        ("DROP TABLE IF EXISTS events_input", ["DROP TABLE IF EXISTS events_input ON CLUSTER 'c'"]),
    ],
)
def test_alter_and_insert_forms(statement: str, expected: list[str]) -> None:
    assert for_cluster(statement, "c") == expected


@pytest.mark.parametrize(
    ("statement", "why"),
    [
        (
            "CREATE TABLE IF NOT EXISTS newtable (a UInt8) ENGINE = MergeTree ORDER BY a",
            "sharding key",
        ),
        ("CREATE TABLE IF NOT EXISTS events (a UInt8) ENGINE = Memory", "MergeTree"),
        (
            "CREATE TABLE IF NOT EXISTS events (a UInt8)"
            " ENGINE = ReplacingMergeTree(toUInt64(a)) ORDER BY a",
            "too complex",
        ),
        ("ALTER TABLE nosuch ADD INDEX i a TYPE minmax", "does not know"),
        ("DROP TABLE events", "no cluster form"),
        ("DROP TABLE IF EXISTS nosuch", "does not know"),
        (
            "CREATE MATERIALIZED VIEW IF NOT EXISTS m TO rollup_marks AS SELECT * FROM events"
            " JOIN spans USING (project_id)",
            "JOIN",
        ),
    ],
)
def test_statements_without_a_cluster_form_are_refused(statement: str, why: str) -> None:
    with pytest.raises(ClusterFormError, match=why):
        for_cluster(statement, "c")


# --- the sharding keys, evaluated by ClickHouse on real rows --------------------------------


def test_sharding_keeps_duplicates_and_runs_together(chdb: ChdbStore) -> None:
    from watchllm_ext.store import apply_migrations

    apply_migrations(chdb)
    tables = tables_for(build_events())
    for _ in range(2):  # every row delivered twice, as after a crash replay
        for table, data in tables.items():
            chdb.insert(table, data)
    layout = load_layout()
    shards = 5
    for table in ("events", "tool_calls", "agent_steps", "spans"):
        (sorting,) = chdb.query(
            "SELECT sorting_key FROM system.tables"
            " WHERE database = currentDatabase() AND name = {t:String}",
            {"t": table},
        )
        key = layout.sharding_key[table]
        dedup_key = sorting["sorting_key"]
        split = chdb.query(
            f"SELECT count() AS n FROM (SELECT {dedup_key}, uniqExact({key} % {shards}) AS s"
            f" FROM {table} GROUP BY {dedup_key} HAVING s > 1)"
        )
        assert split == [{"n": 0}], f"copies of one {table} row would sit on two shards"
    (spread,) = chdb.query(
        f"SELECT uniqExact({layout.sharding_key['events']} % 5) AS s FROM events"
    )
    assert spread["s"] == shards, "events do not spread over the shards"
    runs = chdb.query(
        f"""
        SELECT project_id, run, uniqExact(shard) AS s FROM (
            SELECT project_id, run_id AS run, {layout.sharding_key["events"]} % {shards} AS shard
            FROM events
            UNION ALL SELECT project_id, run_id, {layout.sharding_key["tool_calls"]} % {shards}
            FROM tool_calls
            UNION ALL SELECT project_id, run_id, {layout.sharding_key["agent_steps"]} % {shards}
            FROM agent_steps
            UNION ALL SELECT project_id, trace_id, {layout.sharding_key["spans"]} % {shards}
            FROM spans
        ) GROUP BY project_id, run HAVING s > 1
        """
    )
    assert runs == [], "a run's tree would be split over shards"


# --- the cluster DDL executed with only the cluster parts removed ---------------------------


def strip_cluster(statement: str) -> str:
    """The cluster form minus what needs a cluster: no ON CLUSTER, no replication, and a
    Buffer that passes every insert straight through to the local table in place of the
    Distributed engine (a Buffer also passes FINAL on to it)."""
    statement = re.sub(r" ON CLUSTER '[^']*'", "", statement)
    statement = re.sub(r"\bReplicated(\w+)\('[^']*', '[^']*'(?:, )?", r"\1(", statement)
    return re.sub(
        r"ENGINE = Distributed\('[^']*', currentDatabase\(\), '(\w+)', .*\)$",
        r"ENGINE = Buffer(currentDatabase(), \1, 1, 0, 0, 0, 0, 0, 0)",
        statement,
    )


class StrippedCluster:
    """chDB running the cluster form of every migration, cluster parts removed."""

    name = "chdb-cluster-layout"
    cluster = CLUSTER

    def __init__(self, store: ChdbStore) -> None:
        self.store = store
        self.executed: list[str] = []

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.executed.append(sql)
        self.store.execute(strip_cluster(sql), params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.store.query(sql, params)

    def insert(self, table: str, data: pa.Table) -> None:
        self.store.insert(table, data)

    def insert_json(self, table: str, body: bytes, settings: Mapping[str, Any]) -> None:
        self.store.insert_json(table, body, settings)

    def version(self) -> str:
        return self.store.version()

    def close(self) -> None:
        self.store.close()


def test_cluster_layout_gives_the_same_answers(tmp_path: Path) -> None:
    tables = tables_for(build_events())
    single = ChdbStore(tmp_path / "single")
    try:
        want = answers(single, tables)
    finally:
        single.close()
    layout = StrippedCluster(ChdbStore(tmp_path / "cluster"))
    try:
        got = answers(layout, tables)
        # The data really sits in the local tables, and the marks view fired on them.
        counts = layout.query(
            "SELECT name, total_rows FROM system.tables WHERE database = currentDatabase()"
            " AND name LIKE '%\\_local' ORDER BY name"
        )
        executed = layout.executed
    finally:
        layout.close()
    assert any(" ON CLUSTER " in s for s in executed) and any("Distributed(" in s for s in executed)
    rows = {r["name"]: r["total_rows"] for r in counts}
    assert rows["events_local"] > 1500 and rows["tool_calls_local"] > 0
    assert rows["rollup_marks_local"] > 0 and rows["hourly_usage_by_project_local"] > 0
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name


def test_json_inserts_on_the_cluster_layout_give_the_same_answers(tmp_path: Path) -> None:
    # The store sink's path (migration 0010's input tables) through the cluster form, against
    # the Arrow path on a single node.
    events = build_events()
    single = ChdbStore(tmp_path / "single")
    try:
        want = answers(single, tables_for(events))
    finally:
        single.close()
    layout = StrippedCluster(ChdbStore(tmp_path / "cluster"))
    try:
        apply_migrations(layout)  # type: ignore[arg-type]
        for table, body in input_json(events).items():
            layout.insert_json(table, body, JSON_INPUT_SETTINGS)
        got = answers(layout, {})
        (row,) = layout.query("SELECT count() AS n FROM events_local")
    finally:
        layout.close()
    assert row["n"] > 1500
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name


# --- settings and the store -----------------------------------------------------------------


def test_cluster_name_needs_a_server_and_a_plain_name() -> None:
    with pytest.raises(SettingsError, match="cluster_name needs clickhouse_url"):
        load_settings(cluster_name="wl")
    with pytest.raises(
        SettingsError, match=r"invalid setting cluster_name \(argument cluster_name\)"
    ):
        load_settings(cluster_name="w'l", clickhouse_url="http://h/")
    assert load_settings(cluster_name="wl", clickhouse_url="http://h/").cluster_name == "wl"


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    fixture = start_fixture(tmp_path_factory.mktemp("chfixture"))
    yield fixture
    fixture.stop()


def test_an_unknown_cluster_is_one_clear_line(fx: Fixture) -> None:
    with pytest.raises(StoreError) as caught:
        ClickHouseStore(fx.url + "default", cluster="nosuch")
    message = str(caught.value)
    assert "cluster 'nosuch' is not defined" in message and "WATCHLLM_CLUSTER_NAME" in message
    assert "\n" not in message


# --- watchllm migrate --print-sql -----------------------------------------------------------


def _print_sql(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", "migrate", "--print-sql", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _statements(script: str) -> list[str]:
    body = "\n".join(line for line in script.splitlines() if not line.startswith("--"))
    return [part.strip() for part in body.split(";\n") if part.strip().rstrip(";")]


def test_print_sql_is_what_migrate_runs(tmp_path: Path) -> None:
    assert [s.rstrip(";") for s in _statements(_print_sql("--cluster", CLUSTER))] == (
        cluster_statements()
    )
    # The single-node script, run by hand, builds the same tables as the migrations.
    by_hand = ChdbStore(tmp_path / "by-hand")
    try:
        for statement in _statements(_print_sql()):
            by_hand.execute(statement.rstrip(";"))
        tables = by_hand.query(
            "SELECT name, create_table_query FROM system.tables"
            " WHERE database = currentDatabase() ORDER BY name"
        )
    finally:
        by_hand.close()
    migrated = ChdbStore(tmp_path / "migrated")
    try:
        from watchllm_ext.store import apply_migrations

        apply_migrations(migrated)
        want = migrated.query(
            "SELECT name, create_table_query FROM system.tables"
            " WHERE database = currentDatabase() ORDER BY name"
        )
    finally:
        migrated.close()
    assert tables == want
