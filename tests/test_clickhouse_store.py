"""The ClickHouse-server store (plugins/clickhouse_store.py), driven through clickhouse-connect
against tests/chfixture.py (ClickHouse's HTTP interface served by chDB in a subprocess):
migrations; the same answers as the embedded chDB store for every analytics query, raw and
from the rollup; concurrent use from threads; a whole server run over HTTP; and the failures
an operator meets (server down, wrong password, missing database, a server that stops
mid-ingest and comes back, a timeout, a migration interrupted half-way)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import chfixture
import clickhouse_connect
import httpx
import pytest
from chfixture import Fixture, start_fixture
from conftest import free_port
from stores import EVERY_STORE, FIXTURE_PASSWORD, FIXTURE_USER, ClickHouseTarget, StoreBackend
from test_analytics import START, make_events
from test_ingest import ALL_TYPES

from watchllm_ext.analytics import queries as Q
from watchllm_ext.analytics.rollup import refresh_rollups
from watchllm_ext.builtins.store_sink import StoreSink, lookup_times
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.settings import Settings
from watchllm_ext.store import StoreError, StoreUnavailable, apply_migrations, load_migrations
from watchllm_ext.store.rows import tables_for
from watchllm_plugins import clickhouse_store
from watchllm_plugins.chdb_store import ChdbStore
from watchllm_plugins.clickhouse_store import ClickHouseStore, parse_url, register_store

USER = FIXTURE_USER
PASSWORD = FIXTURE_PASSWORD  # characters that must be URL-encoded in the URL
PROJECT = "acme"
TRICKY = "tab\there 'single' \"double\" back\\slash\nnewline ünïcode \u2028 ✓ 🚀"
TABLES = {"events", "tool_calls", "agent_steps", "spans", "traces", "hourly_usage_by_project"}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def fx(chfixture_server: Fixture) -> Fixture:
    """The session's chfixture (tests/stores.py), which the every-store tests use too."""
    return chfixture_server


def create_database(fixture: Fixture, name: str | None = None) -> str:
    name = name or f"w_{uuid.uuid4().hex[:10]}"
    admin = clickhouse_connect.get_client(**fixture.client_kwargs(autogenerate_session_id=False))
    try:
        admin.command(f"CREATE DATABASE IF NOT EXISTS {name}")
    finally:
        admin.close()
    return name


@pytest.fixture
def database(chfixture_target: ClickHouseTarget) -> Iterator[str]:
    """A database of this test's own on the session's chfixture, dropped after it."""
    name = chfixture_target.create_database()
    yield name
    chfixture_target.drop_database(name)


@pytest.fixture
def store(fx: Fixture, database: str) -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(fx.url + database)
    yield s
    s.close()


def list_tables(store: Any) -> set[str]:
    rows = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    return {r["name"] for r in rows}


def build_events(n: int = 1500) -> list[Any]:
    raw = make_events(n, seed=7, project=PROJECT) + make_events(200, seed=8, project="other")
    raw += [{**e, "project_id": PROJECT} for e in ALL_TYPES]
    raw.append(
        {
            "event_id": "tricky",
            "event_type": "prompt_call",
            "run_id": "run-tricky",
            "project_id": PROJECT,
            "timestamp": "2026-01-02T10:00:00.001Z",
            "model": "gpt-4o",
            "prompt": TRICKY,
            "response": TRICKY,
            "tags": [TRICKY, "x"],
            "metadata": {"k": TRICKY},
        }
    )
    return EVENT_LIST_ADAPTER.validate_python(raw)


def parse_url_params(url: str) -> dict[str, Any]:
    u = parse_url(url)
    return {k: getattr(u, k) for k in u.__dataclass_fields__}


# --- the URL ------------------------------------------------------------------------------------


def test_url_parts_and_defaults() -> None:
    assert parse_url_params("http://h") == {
        "scheme": "http",
        "host": "h",
        "port": 8123,
        "user": "default",
        "password": "",
        "database": "default",
        "compress": "lz4",
        "connect_timeout": 10.0,
        "send_receive_timeout": 300.0,
        "pool_size": 40,
    }
    u = parse_url(
        "HTTPS://us%40er:p%40ss%3Aw%2Frd%20%25@ch.example.com/analytics"
        "?compress=none&connect_timeout=2.5&send_receive_timeout=30&pool_size=8"
    )
    assert (u.scheme, u.host, u.port, u.user, u.password, u.database) == (
        "https",
        "ch.example.com",
        8443,
        "us@er",
        "p@ss:w/rd %",
        "analytics",
    )
    assert (u.compress, u.connect_timeout, u.send_receive_timeout, u.pool_size) == (
        False,
        2.5,
        30.0,
        8,
    )
    assert parse_url("http://[::1]:9000/").address == "[::1]:9000"
    assert parse_url("https://u:secret@h:1/db").redacted() == "https://u@h:1/db"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://u:secret@h/db", "scheme"),
        ("http://u:secret@/db", "no host"),
        ("http://u:secret@h:99999/db", "out of range"),
        ("http://u:secret@h/db/more", "only the database"),
        ("http://u:secret@h/db?secure=1", "unknown option 'secure'"),
        ("http://u:secret@h/db?compress=snappy", "compress must be"),
        ("http://u:secret@h/db?send_receive_timeout=0", "send_receive_timeout must be"),
        ("http://u:secret@h/db?connect_timeout=soon", "connect_timeout must be"),
        ("http://u:secret@h/db?pool_size=0", "pool_size must be"),
    ],
)
def test_bad_urls_are_named_without_the_password(url: str, why: str) -> None:
    with pytest.raises(StoreError) as caught:
        parse_url(url)
    assert why in str(caught.value) and "WATCHLLM_CLICKHOUSE_URL" in str(caught.value)
    assert "secret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_register_store_only_when_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WATCHLLM_CLICKHOUSE_URL", raising=False)
    assert register_store(Settings(data_dir=tmp_path)) is None

    class OldSettings:  # a Settings without the clickhouse_url field: the env is read
        pass

    assert clickhouse_store.configured_url(OldSettings()) is None  # type: ignore[arg-type]
    monkeypatch.setenv("WATCHLLM_CLICKHOUSE_URL", "http://h:1/db")
    assert clickhouse_store.configured_url(OldSettings()) == "http://h:1/db"  # type: ignore[arg-type]


# --- migrations -------------------------------------------------------------------------------


def test_register_store_and_migrations_apply_once(
    fx: Fixture, database: str, tmp_path: Path
) -> None:
    url = fx.url + database
    settings: Any = (
        Settings(data_dir=tmp_path, clickhouse_url=url)
        if "clickhouse_url" in Settings.model_fields
        else type("S", (), {"clickhouse_url": url})()
    )
    store = register_store(settings)
    assert isinstance(store, ClickHouseStore) and store.name == "clickhouse"
    try:
        expected = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
        assert apply_migrations(store) == expected
        assert apply_migrations(store) == []
        assert list_tables(store) >= TABLES
        assert store.version() == fx_version(fx)
    finally:
        store.close()
    store.close()  # closing twice is harmless


def fx_version(fx: Fixture) -> str:
    client = clickhouse_connect.get_client(**fx.client_kwargs(autogenerate_session_id=False))
    try:
        return str(client.server_version)
    finally:
        client.close()


def test_migration_interrupted_half_way_converges(store: ClickHouseStore) -> None:
    first = load_migrations()[0]
    for statement in first.statements()[:2]:  # events and tool_calls, then "a crash"
        store.execute(statement)
    assert {"events", "tool_calls"} <= list_tables(store)
    assert "traces" not in list_tables(store)
    names = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert apply_migrations(store) == names
    # 0002 half-way: its first table exists, the record does not.
    store.execute("DELETE FROM schema_migrations WHERE version = 2")
    store.execute("DROP VIEW rollup_marks_mv")
    store.execute("DROP TABLE rollup_marks")
    assert apply_migrations(store) == [names[1]]
    assert TABLES | {"rollup_marks", "rollup_marks_mv"} <= list_tables(store)
    assert apply_migrations(store) == []


# --- the same answers as chDB -----------------------------------------------------------------

RANGES = [
    (START, START + timedelta(days=3)),
    (START + timedelta(hours=5, minutes=17, seconds=3), START + timedelta(days=1, hours=7)),
    (START + timedelta(minutes=10), START + timedelta(minutes=50)),
]
SERIES = [
    (("Hour", None), 6, "UTC"),
    (("Hour", "event_type"), 1, "Asia/Kolkata"),
    (("Minute", "model"), 15, "UTC"),
    (("Day", "status"), 1, "America/New_York"),
]
_LOG_DEFAULTS = {
    "has_cursor": 0,
    "cursor_ts": START + timedelta(days=3),
    "cursor_id": "",
    "status": "",
    "event_type": "",
    "model": "",
    "run_id": "",
    "user_id": "",
    "tag": "",
    "q": "",
}


def named_queries(rolled: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every named analytics query with realistic parameters, by a readable name; with
    `rolled`, stats and timeseries may read whole hours from the rollup, as the routes do."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, (lo, hi) in enumerate(RANGES):
        first = lo.replace(minute=0, second=0, microsecond=0)  # whole hours inside, as routes
        first += timedelta(hours=1) if first < lo else timedelta(0)
        end = hi.replace(minute=0, second=0, microsecond=0)
        base = {
            "project": PROJECT,
            "from": lo,
            "to": hi,
            "first_hour": first,
            "end_hour": end if rolled else first,
        }
        out[f"clean_hours[{i}]"] = (
            Q.CLEAN_HOURS,
            {"project": PROJECT, "first_hour": first, "end_hour": end},
        )
        out[f"stats_sums[{i}]"] = (Q.STATS_SUMS, base)
        out[f"stats_states[{i}]"] = (Q.STATS_STATES, base)
        for key, step, tz in SERIES:
            out[f"timeseries{key}[{i}]"] = (Q.TIMESERIES[key], {**base, "step": step, "tz": tz})
    window = {"project": PROJECT, "from": RANGES[0][0], "to": RANGES[0][1], "limit": 100}
    cursor = {"has_cursor": 1, "cursor_ts": START + timedelta(days=1, milliseconds=5)}
    for name, extra in {
        "all": {},
        "cursor": {**cursor, "cursor_id": "7-500"},
        "errors_of_a_model": {"status": "error", "model": "gpt-4o", "limit": 1000},
        "text_and_tag": {"q": "DOGS", "tag": "t-even", "limit": 1000},
        "run_and_type": {"run_id": "run-7-3", "event_type": "tool_call", "limit": 1000},
        "user": {"user_id": "user-5", "limit": 1000},
        "tricky_text": {"q": "'single' \"double\" back\\slash", "limit": 1000},
        "tricky_tag": {"tag": TRICKY},
    }.items():
        out[f"logs[{name}]"] = (Q.LOGS, {**_LOG_DEFAULTS, **window, **extra})
    for event_id in ("7-0", "7-1", "7-2", "p1", "t1", "a1", "x1", "as1", "h1", "c1", "pa1"):
        args = {"project": PROJECT, "event_id": event_id}
        out[f"event[{event_id}]"] = (Q.EVENT, args)
        out[f"event_tool_calls[{event_id}]"] = (Q.EVENT_TOOL_CALLS, args)
        out[f"event_agent_steps[{event_id}]"] = (Q.EVENT_AGENT_STEPS, args)
        out[f"event_children[{event_id}]"] = (Q.EVENT_CHILDREN, args)
    out["event[tricky]"] = (Q.EVENT, {"project": PROJECT, "event_id": "tricky"})
    runs = {"project": PROJECT, "from": RANGES[0][0], "to": RANGES[0][1], "limit": 7}
    out["runs"] = (Q.RUNS, {**runs, "has_cursor": 0, "cursor_ts": RANGES[0][1], "cursor_id": ""})
    out["runs[cursor]"] = (
        Q.RUNS,
        {**runs, **cursor, "cursor_id": "run-7-9", "limit": 1000},
    )
    for run_id in ("run-7-0", "run-7-13", "run-1", "run-tricky", "no-such-run"):
        # Run trees are bounded in bytes (the API's budget): one far above these runs.
        args = {"project": PROJECT, "run_id": run_id, "max_bytes": 1 << 40, "limit": 10_000}
        out[f"run[{run_id}]"] = (Q.RUN, args)
        out[f"run_events[{run_id}]"] = (Q.RUN_EVENTS, args)
        out[f"run_spans[{run_id}]"] = (Q.RUN_SPANS, args)
    out["traces"] = ("SELECT * FROM traces ORDER BY project_id, run_id", {})
    out["other_project"] = (
        "SELECT count() AS n, sum(tokens_input) AS t FROM events FINAL"
        " WHERE project_id = {p:String}",
        {"p": "other"},
    )
    return out


def answers(store: Any, tables: dict[str, Any]) -> dict[str, Any]:
    """Load the tables into a fresh store and collect every answer, raw then rolled up."""
    apply_migrations(store)
    for table, data in tables.items():
        store.insert(table, data)
    got: dict[str, Any] = {"tables": sorted(list_tables(store) & TABLES)}
    got["dirty_hours"] = store.query(Q.DIRTY_HOURS, {"limit": 2000})
    for name, (sql, params) in named_queries(False).items():
        got[f"raw {name}"] = store.query(sql, params)
    got["refreshed"] = refresh_rollups(store, margin=timedelta(0))
    clean = {
        i: store.query(*named_queries(True)[f"clean_hours[{i}]"])[0]["n"]
        for i in range(len(RANGES))
    }
    got["clean"] = clean
    for name, (sql, params) in named_queries(True).items():
        got[f"rolled {name}"] = store.query(sql, params)
    return got


def test_same_answers_as_chdb_for_every_named_query(tmp_path: Path, store: ClickHouseStore) -> None:
    tables = tables_for(build_events())
    embedded = ChdbStore(tmp_path / "chdb")
    try:
        want = answers(embedded, tables)
    finally:
        embedded.close()
    got = answers(store, tables)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    # The comparison is not of empty answers.
    assert got["refreshed"] > 60 and got["clean"][0] == 72
    sums = got["rolled stats_sums[0]"]
    assert sum(r["events"] for r in sums) > 1500 and isinstance(sums[0]["tokens_input"], int)
    (states,) = got["rolled stats_states[0]"]
    assert states["distinct_runs"] > 10 and len(states["latency_quantiles"]) == 4
    assert len(got["raw logs[all]"]) == 100 and got["raw event[tricky]"][0]["tags"][0].startswith(
        "tab\there"
    )
    assert got["raw logs[tricky_tag]"] and got["raw run[run-7-0]"]
    # rollup == raw on the server path too, where the routes read the rollup: not for
    # minute buckets, nor in a zone whose offset is not whole hours (Asia/Kolkata).
    for name in want:
        if name.startswith(("raw stats", "raw timeseries")) and not any(
            skip in name for skip in ("'Minute'", "'event_type'")
        ):
            assert got["rolled" + name[3:]] == got[name], name


def test_a_value_with_a_unicode_line_separator(store: ClickHouseStore) -> None:
    # JSON text escapes \n but not U+0085 (NEL): the lines are split at "\n" only.
    value = "a\u0085b\u2028c\x1cd"
    assert store.query("SELECT {v:String} AS v", {"v": value}) == [{"v": value}]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\n",
        b'{"a":1,"b":[1.5,-0.0,1e-400,18446744073709551616],"c":null}\n{"a":"x\xc2\x85y"}\n',
        b'{"a":1,"a":2}\n',
        b'{"u":"\\ud83d\\ude80 \\u0000"}\n',
        # msgspec refuses these; json.loads reads (or refuses) them as the chDB store does
        b'{"a":NaN,"b":Infinity}\n',
        b'{"a":1e400}\n',
        b'{"a":"\\ud800"}\n',
    ],
)
def test_answers_are_read_as_json_loads_reads_each_line(body: bytes) -> None:
    assert clickhouse_store._rows(body) == [json.loads(x) for x in body.split(b"\n") if x]


@pytest.mark.parametrize("body", [b'{"a":"\xff"}\n', b'{"a":"\x1c"}\n', b'{"a":1\n'])
def test_a_bad_answer_fails_as_json_loads_fails(body: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        clickhouse_store._rows(body)
    with pytest.raises(ValueError) as expected:
        [json.loads(x) for x in body.split(b"\n") if x]
    assert type(caught.value) is type(expected.value)


def test_a_parameter_over_the_servers_field_limit(store: ClickHouseStore) -> None:
    # A server refuses any parameter value over http_max_field_value_size (128 KiB), sent in
    # the URL or in a form: callers must split long id lists into smaller queries.
    limit = 131072
    assert store.query("SELECT length({v:String}) AS n", {"v": "a" * limit}) == [{"n": limit}]
    with pytest.raises(StoreError, match="http_max_field_value_size") as caught:
        store.query("SELECT length({v:String}) AS n", {"v": "a" * (limit + 1)})
    assert "Field value too long" in str(caught.value) and not caught.value.permanent


def test_values_have_the_chdb_types(store: ClickHouseStore) -> None:
    (row,) = store.query(
        "SELECT toUInt64(18446744073709551615) AS u, toInt64(-5) AS i, 1.5 AS f,"
        " [1, 2] AS a, CAST(NULL AS Nullable(String)) AS n, {t:DateTime64(3, 'UTC')} AS t,"
        " {d:DateTime('UTC')} AS d, {h:Array(DateTime('UTC'))} AS h, {b:UInt8} AS b,"
        " toDecimal64(1.25, 2) AS dec",
        {
            "t": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            "d": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "h": ["2026-01-01 00:00:00", "2026-01-01 01:00:00"],
            "b": 1,
        },
    )
    assert row == {
        "u": 18446744073709551615,
        "i": -5,
        "f": 1.5,
        "a": [1, 2],
        "n": None,
        "t": "2026-01-02 03:04:05.678",
        "d": "2026-01-02 03:04:05",
        "h": ["2026-01-01 00:00:00", "2026-01-01 01:00:00"],
        "b": 1,
        "dec": 1.25,
    }
    # A statement without placeholders is sent as it is, parameters or not (no %-format).
    assert store.query("SELECT '100%' AS p", {"unused": 1}) == [{"p": "100%"}]


# --- threads -------------------------------------------------------------------------------------


def test_one_store_from_many_threads(store: ClickHouseStore) -> None:
    apply_migrations(store)
    batches = [
        EVENT_LIST_ADAPTER.validate_python(make_events(100, seed=100 + i, project=PROJECT))
        for i in range(6)
    ]
    errors: list[BaseException] = []
    answers_seen: list[int] = []

    def insert(events: list[Any]) -> None:
        try:
            for table, data in tables_for(events).items():
                store.insert(table, data)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(5):
                rows = store.query(
                    Q.STATS_SUMS,
                    {
                        "project": PROJECT,
                        "from": RANGES[0][0],
                        "to": RANGES[0][1],
                        "first_hour": RANGES[0][0],
                        "end_hour": RANGES[0][0],
                    },
                )
                answers_seen.append(sum(int(r["events"]) for r in rows))
                assert store.version()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(b,)) for b in batches]
    threads += [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(answers_seen) == 30 and all(0 <= n <= 600 for n in answers_seen)
    assert store.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 600


def test_a_query_with_more_ids_than_a_parameter_holds(store: ClickHouseStore) -> None:
    # 30,000 ids (~500 KB, past the 128 KiB a parameter may hold) in one request, as a
    # temporary table; ids outside the schema's alphabet come back as they were.
    odd = ["tab\there", "new\nline", "back\\slash", "cr\rlf", "", TRICKY, "quote'\""]
    ids = [f"id-{i:06d}" for i in range(30_000)] + odd
    rows = store.query_with_ids(
        "SELECT count() AS n, uniqExact(id) AS u, countIf(id LIKE {p:String}) AS m FROM ids",
        {"p": "id-01%"},
        ids,
    )
    assert rows == [{"n": len(ids), "u": len(ids), "m": 10_000}]
    found = store.query_with_ids("SELECT id FROM ids WHERE NOT startsWith(id, 'id-')", None, odd)
    assert sorted(r["id"] for r in found) == sorted(odd)
    assert store.query_with_ids("SELECT count() AS n FROM ids", None, []) == [{"n": 0}]
    assert store.query_with_ids("SELECT id FROM ids", None, [""]) == [{"id": ""}]


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", "none"])
def test_json_rows_in_pieces_with_every_compression(
    fx: Fixture, database: str, compress: str
) -> None:
    store = ClickHouseStore(f"{fx.url}{database}?compress={compress}")
    try:
        store.execute("CREATE TABLE j (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
        rows = b"".join(b'{"a":%d,"s":"row %d"}\n' % (i, i) for i in range(5000))
        pieces = [memoryview(rows)[:70_000], b"", memoryview(rows)[70_000:]]
        store.insert_json("j", pieces, {"input_format_skip_unknown_fields": 1})
        assert store.query("SELECT count() AS n, sum(a) AS s FROM j") == [
            {"n": 5000, "s": 12_497_500}
        ]
    finally:
        store.close()


class _RecordingProxy:
    """A loopback TCP proxy in front of the fixture that keeps what the client sent, to
    read the insert's HTTP request as it went on the wire."""

    def __init__(self, port: int) -> None:
        self.sent = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            for source, sink, record in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, record), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record:
                    self.sent += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def _dechunk(body: bytes) -> tuple[bytes, int]:
    """The data of a chunked HTTP body and its number of chunks."""
    data, chunks = bytearray(), 0
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(data), chunks
        data += body[:size]
        chunks += 1
        body = body[size + 2 :]


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", "none"])
def test_an_insert_body_is_sent_chunked_as_it_is_compressed(
    fx: Fixture, database: str, compress: str
) -> None:
    # The body goes as it is compressed, piece by piece (Transfer-Encoding: chunked, the
    # statement in the URL), so the server parses while the rest is compressed and the body
    # is never joined whole: the chunks decompress to the pieces, in order.
    proxy = _RecordingProxy(fx.port)
    url = fx.url.replace(f":{fx.port}/", f":{proxy.port}/") + f"{database}?compress={compress}"
    store = ClickHouseStore(url)
    try:
        store.execute("CREATE TABLE j (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
        rows = [b'{"a":%d,"s":"%s"}\n' % (i, os.urandom(200).hex().encode()) for i in range(3000)]
        pieces = [b"".join(rows[i : i + 500]) for i in range(0, 3000, 500)]
        proxy.sent.clear()
        store.insert_json("j", pieces, {})
        head, _, body = bytes(proxy.sent).partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        assert headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in headers
        assert "INSERT+INTO+j+FORMAT+JSONEachRow" in request_line
        data, chunks = _dechunk(body)
        encoding = "" if compress == "none" else compress
        assert headers.get("content-encoding", "") == encoding
        assert chfixture.decode_body(data, encoding) == b"".join(pieces)
        assert chunks >= len(pieces)  # one chunk a piece at least, none joined
        assert store.query("SELECT count() AS n FROM j") == [{"n": 3000}]
    finally:
        store.close()
        proxy.close()


@EVERY_STORE
def test_lookup_times_of_one_project_and_of_several(store_backend: StoreBackend) -> None:
    # lookup_times lists a batch of one project in one pass and groups several projects'
    # ids by project; either way it answers the stored copies of the keys it is given,
    # from a list, a set or an iterator alike.
    store = store_backend.open()
    try:
        apply_migrations(store)
        store.execute(
            "INSERT INTO event_ids (project_id, event_id, timestamp) VALUES"
            " ('acme', 'a1', fromUnixTimestamp64Milli(toInt64(1000))),"
            " ('acme', 'a2', fromUnixTimestamp64Milli(toInt64(2000))),"
            " ('acme', 'a2', fromUnixTimestamp64Milli(toInt64(2500))),"
            " ('other', 'a1', fromUnixTimestamp64Milli(toInt64(3000)))"
        )
        one = [("acme", "a1"), ("acme", "a2"), ("acme", "nope")]
        want_one = {("acme", "a1"): [1000], ("acme", "a2"): [2000, 2500]}
        assert lookup_times(store, one) == want_one
        assert lookup_times(store, set(one)) == want_one
        assert lookup_times(store, iter(one)) == want_one
        assert lookup_times(store, one, repeated_only=True) == {("acme", "a2"): [2000, 2500]}
        several = [*one, ("other", "a1"), ("other", "a2")]
        assert lookup_times(store, several) == {**want_one, ("other", "a1"): [3000]}
        assert lookup_times(store, iter(several), repeated_only=True) == {
            ("acme", "a2"): [2000, 2500]
        }
        assert lookup_times(store, []) == {}
    finally:
        store.close()


def test_the_store_sink_stores_a_large_batch_once(store: ClickHouseStore) -> None:
    # One write of 20,000 events, as the writer hands the store sink (inserts sized for
    # ClickHouse): its id look-ups, before and after the insert, must fit the server's 128 KiB
    # limit on a parameter value, which the fixture enforces as a server does.
    apply_migrations(store)
    events = EVENT_LIST_ADAPTER.validate_python(make_events(20_000, seed=11, project=PROJECT))
    sink = StoreSink(store, 50_000)
    for _ in range(2):  # the second write finds every id stored: nothing is added
        anyio.run(sink.write, events)
        assert store.query("SELECT count() AS n FROM events FINAL") == [{"n": 20_000}]


# --- a whole server ---------------------------------------------------------------------------


def _start_server(server_factory: Any, url: str, **overrides: Any) -> Any:
    if "clickhouse_url" in Settings.model_fields:
        return server_factory((clickhouse_store,), clickhouse_url=url, **overrides)

    class Plugin:  # until Settings has clickhouse_url
        @clickhouse_store.hookimpl
        def register_store(self, settings: Settings) -> ClickHouseStore:
            return ClickHouseStore(url)

    return server_factory((Plugin(),), **overrides)


def test_end_to_end_over_http(fx: Fixture, database: str, server_factory: Any) -> None:
    server = _start_server(server_factory, fx.url + database)
    assert server.wl.store.name == "clickhouse"
    events = make_events(400, seed=3)
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    stats = server.client.get(
        "/v1/analytics/stats",
        params={
            "project_id": PROJECT,
            "from": "2026-01-01T00:00:00Z",
            "to": "2026-01-04T00:00:00Z",
        },
        headers=server.headers(),
    )
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["total_events"] == 400
    assert body["total_requests"] == sum(e["event_type"] == "prompt_call" for e in events)
    assert body["distinct_runs"] == 40
    store_info = server.client.get("/v1/admin/store", headers=server.headers()).json()
    assert store_info["store"] == "clickhouse" and store_info["version"] == fx_version(fx)
    tables = server.client.get("/v1/admin/tables", headers=server.headers()).json()["tables"]
    assert set(tables) >= TABLES
    ready = server.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["store"]["name"] == "clickhouse"
    # nothing was written to an embedded chDB folder
    assert not server.settings.store_path.exists()


# --- failures ---------------------------------------------------------------------------------


def test_server_down_at_start() -> None:
    port = free_port()
    with pytest.raises(StoreError) as caught:
        ClickHouseStore(f"http://{USER}:x@127.0.0.1:{port}/db?connect_timeout=2")
    message = str(caught.value)
    assert message == f"cannot reach ClickHouse at 127.0.0.1:{port}: connection refused"
    assert not caught.value.permanent


def test_wrong_password(fx: Fixture) -> None:
    with pytest.raises(StoreError) as caught:
        ClickHouseStore(f"http://{USER}:wrong@127.0.0.1:{fx.port}/default")
    message = str(caught.value)
    assert message.startswith(f"ClickHouse refused the user/password for user {USER!r}")
    assert f"127.0.0.1:{fx.port}" in message and "wrong" not in message and "\n" not in message
    assert not caught.value.permanent


def test_missing_database(fx: Fixture) -> None:
    with pytest.raises(StoreError) as caught:
        ClickHouseStore(fx.url + "no_such_db")
    assert str(caught.value).startswith(
        f"database no_such_db does not exist on 127.0.0.1:{fx.port}"
    )
    assert "\n" not in str(caught.value) and not caught.value.permanent


def test_bad_rows_are_permanent_and_a_missing_table_is_not(store: ClickHouseStore) -> None:
    apply_migrations(store)
    good = tables_for(EVENT_LIST_ADAPTER.validate_python(make_events(1, project=PROJECT)))
    events = good["events"]
    bad = events.set_column(
        events.schema.get_field_index("timestamp"), "timestamp", [["not a time"]]
    )
    with pytest.raises(StoreError) as caught:
        store.insert("events", bad)
    assert caught.value.permanent and "CANNOT_PARSE_DATETIME" in str(caught.value)
    with pytest.raises(StoreError) as caught:
        store.insert("no_such_table", events)
    assert not caught.value.permanent and "UNKNOWN_TABLE" in str(caught.value)
    with pytest.raises(StoreError) as caught:
        store.insert("events; DROP TABLE events", events)
    assert caught.value.permanent


def test_timeout(fx: Fixture, database: str) -> None:
    slow = ClickHouseStore(fx.url + database + "?send_receive_timeout=0.3")
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            slow.query("SELECT sleep(1) AS x")
        assert time.monotonic() - started < 0.9
        assert str(caught.value) == (
            f"ClickHouse at 127.0.0.1:{fx.port} did not answer within 0.3 s"
            " (send_receive_timeout) running a query"
        )
        assert not caught.value.permanent
    finally:
        slow.close()
    # The fixture runs one query at a time: wait for the sleep to end before the next test.
    after = ClickHouseStore(fx.url + database)
    try:
        assert after.query("SELECT 1 AS x") == [{"x": 1}]
    finally:
        after.close()


def restart_fixture(old: Fixture) -> Fixture:
    """A new fixture process on the same port and data folder as a stopped one."""
    command = [
        sys.executable,
        chfixture.__file__,
        "--port",
        str(old.port),
        "--data-dir",
        str(old.data_dir),
        "--user",
        old.user,
        "--parent-pid",
        str(os.getpid()),
        "--database-must-exist",
    ]
    log_path = old.log_path.with_name(f"restarted-{old.port}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "CHFIXTURE_PASSWORD": old.password},
        )
    fixture = Fixture(old.host, old.port, old.user, old.password, old.data_dir, log_path, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fixture.alive():
        try:
            if httpx.get(f"http://127.0.0.1:{old.port}/ping", timeout=1).text == "Ok.\n":
                return fixture
        except httpx.HTTPError:
            time.sleep(0.05)
    fixture.stop()
    raise RuntimeError(f"the fixture did not restart:\n{fixture.log()}")


def test_server_stops_mid_ingest_and_comes_back(tmp_path: Path, server_factory: Any) -> None:
    first = start_fixture(tmp_path / "own", USER, PASSWORD)
    fixtures = [first]
    try:
        url = first.url + create_database(first)
        server = _start_server(server_factory, url, sink_retry_initial_s=0.05, sink_retry_max_s=0.3)
        events = make_events(300, seed=5)
        post = server.client.post
        r = post("/v1/events/batch", headers=server.headers(), json={"events": events[:100]})
        assert r.status_code == 202
        server.flush()
        first.stop()

        # Down: inserts fail with a retryable error; ingestion still answers 202 (spool).
        probe_tables = tables_for(
            EVENT_LIST_ADAPTER.validate_python([{**events[0], "project_id": PROJECT}])
        )
        with pytest.raises(StoreError) as caught:
            server.wl.store.insert("events", probe_tables["events"])
        assert not caught.value.permanent
        assert str(caught.value) == f"cannot reach ClickHouse at 127.0.0.1:{first.port}:" + (
            " connection refused"
        )
        r = post("/v1/events/batch", headers=server.headers(), json={"events": events[100:]})
        assert r.status_code == 202
        writer = server.wl.writer
        deadline = time.monotonic() + 20
        while writer.stats()["sinks"]["store:clickhouse"]["retries_total"] < 2:
            assert time.monotonic() < deadline, writer.stats()
            time.sleep(0.05)
        sink = writer.stats()["sinks"]["store:clickhouse"]
        assert sink["lag_events"] == 200 and sink["dead_letter_events_total"] == 0
        assert "cannot reach ClickHouse" in sink["last_error"]

        # Back on the same port and data: the spooled events are delivered.
        fixtures.append(restart_fixture(first))
        server.flush()
        sink = writer.stats()["sinks"]["store:clickhouse"]
        assert sink["lag_events"] == 0 and sink["delivered_events_total"] == 300
        n = server.query("SELECT count() AS n FROM events FINAL")[0]["n"]
        assert n == 300
        server.stop()
    finally:
        for fixture in fixtures:
            fixture.stop()


def test_serve_starts_while_the_server_is_down_and_catches_up(
    tmp_path: Path, server_factory: Any
) -> None:
    """A WatchLLM process that starts during a ClickHouse outage (a rolling restart, say)
    accepts into its spool, says so on /readyz, and applies the schema and delivers
    everything once the server is back."""
    first = start_fixture(tmp_path / "own", USER, PASSWORD)
    fixtures = [first]
    try:
        database = create_database(first)
        url = first.url + database + "?connect_timeout=1"
        first.stop()
        server = _start_server(server_factory, url, sink_retry_initial_s=0.05, sink_retry_max_s=0.3)
        assert server.wl.migrations_applied == []
        events = make_events(120, seed=9)
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": events}
        )
        assert r.status_code == 202
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        store_check = ready.json()["checks"]["store"]
        assert not store_check["ok"] and "cannot reach ClickHouse" in store_check["detail"]

        fixtures.append(restart_fixture(first))
        server.flush()
        assert server.query("SELECT count() AS n FROM events FINAL") == [{"n": 120}]
        # The whole schema was applied once the server was back (by the app's task or by
        # the store sink before its first insert, whichever came first).
        recorded = server.query("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == [m.version for m in load_migrations()]
        assert server.client.get("/readyz").status_code == 200
        server.stop()
    finally:
        for fixture in fixtures:
            fixture.stop()


def test_while_the_server_is_down_one_thread_connects_and_the_rest_fail_at_once() -> None:
    """A server that takes connections but never answers: callers must not queue behind
    each other's timeouts (that would fill the worker threads the whole app shares)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        url = f"http://{USER}:x@127.0.0.1:{port}/db?connect_timeout=1&send_receive_timeout=2"
        store = ClickHouseStore(url, wait_for_server=True)  # accepts, never answers: waits
        with pytest.raises(StoreUnavailable):
            store.version()  # the failure at start, reported again without a new try
        time.sleep(1.1)  # then the next call tries again
        n_connections = len(accepted)
        errors: list[Exception] = []

        def call() -> None:
            try:
                store.version()
            except StoreError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 6 and all(isinstance(e, StoreUnavailable) for e in errors)
        # One thread tried (one new connection); the others failed at once instead of
        # queueing behind its timeout.
        assert sum("still connecting" in str(e) for e in errors) == 5
        assert len(accepted) - n_connections == 1
        store.close()
        before = len(accepted)
        with pytest.raises(StoreError, match="closed"):
            store.version()  # a closed store does not connect again
        time.sleep(0.3)
        assert len(accepted) == before
    finally:
        stop.set()
        acceptor.join(5)
        for s in accepted:
            s.close()
        listener.close()
