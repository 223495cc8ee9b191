"""The chDB-backed ClickHouse HTTP test fixture (tests/chfixture.py), driven by the real
clickhouse-connect client: what a store plugin built on clickhouse-connect will rely on."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import clickhouse_connect
import httpx
import lz4.frame
import pyarrow as pa
import pytest
from chfixture import Fixture, analyze, engine_error, start_fixture, zstd
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from clickhouse_connect.driver.external import ExternalData

USER = "watchllm"
PASSWORD = "s3cret:with colon"

TRICKY = "tab\there, 'single' \"double\" back\\slash\nnewline ünïcode"

EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS events (
    id UInt32,
    name String,
    note Nullable(String),
    ts DateTime64(3, 'UTC'),
    tags Array(String),
    kind LowCardinality(String)
) ENGINE = MergeTree ORDER BY id
"""


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    fixture = start_fixture(tmp_path_factory.mktemp("chfixture"), USER, PASSWORD)
    yield fixture
    fixture.stop()
    assert "Traceback" not in fixture.log(), fixture.log()


@pytest.fixture
def connect(fx: Fixture) -> Iterator[Any]:
    clients: list[Client] = []

    def make(fixture: Fixture | None = None, **kwargs: Any) -> Client:
        client = clickhouse_connect.get_client(**(fixture or fx).client_kwargs(**kwargs))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(connect: Any) -> Client:
    return connect()


@pytest.fixture
def table(client: Client) -> str:
    name = f"events_{uuid.uuid4().hex[:8]}"
    client.command(EVENTS_DDL.replace("events", name, 1))
    return name


ROWS = [
    [1, TRICKY, None, dt.datetime(2026, 1, 2, 3, 4, 5, 678000), ["a", "b'c"], "prompt_call"],
    [2, "plain", "n", dt.datetime(2026, 1, 2, 3, 4, 6), [], "error"],
]
COLUMNS = ["id", "name", "note", "ts", "tags", "kind"]


def test_connects_and_reports_the_engine_version(fx: Fixture, client: Client) -> None:
    assert client.server_version is not None
    assert client.server_version.split(".")[0].isdigit()
    assert client.command("SELECT version()") == client.server_version
    assert client.ping()
    assert fx.url == f"http://watchllm:s3cret%3Awith%20colon@127.0.0.1:{fx.port}/"
    with httpx.Client(timeout=10) as http:
        assert http.get(f"http://127.0.0.1:{fx.port}/ping").text == "Ok.\n"


def test_command_creates_and_answers(client: Client, table: str) -> None:
    summary = client.command(
        f"INSERT INTO {table} (id, name, ts, kind) VALUES (7, 'x', now(), 'k')"
    )
    assert summary.written_rows == 1
    assert client.command(f"SELECT count() FROM {table}") == 1
    assert client.command(f"EXISTS TABLE {table}") == 1
    assert client.command("SELECT '' WHERE 0") == ""


@pytest.mark.parametrize("compress", [True, "lz4", "zstd", "gzip", False])
def test_native_insert_and_select_round_trip(connect: Any, table: str, compress: Any) -> None:
    client = connect(compress=compress)
    summary = client.insert(table, ROWS, column_names=COLUMNS)
    assert summary.written_rows == 2
    result = client.query(f"SELECT {', '.join(COLUMNS)} FROM {table} ORDER BY id")
    assert result.column_names == tuple(COLUMNS)
    assert [list(row) for row in result.result_rows] == ROWS


def test_large_native_insert_in_many_blocks(client: Client, table: str) -> None:
    rows = [[i, "x" * 50, None, dt.datetime(2026, 1, 1), [str(i)], "k"] for i in range(60_000)]
    assert client.insert(table, rows, column_names=COLUMNS).written_rows == 60_000
    assert client.command(f"SELECT count(), sum(id) FROM {table}") == ["60000", "1799970000"]


def test_insert_arrow_and_query_arrow(client: Client, table: str) -> None:
    arrow = pa.table(
        {
            "id": pa.array([1, 2], pa.uint32()),
            "name": [TRICKY, "b"],
            "note": [None, "n"],
            "ts": pa.array(
                [dt.datetime(2026, 1, 2, 3, 4, 5, 678000), dt.datetime(2026, 1, 2)],
                pa.timestamp("ms", tz="UTC"),
            ),
            "tags": [["x"], []],
            "kind": ["k1", "k2"],
        }
    )
    assert client.insert_arrow(table, arrow).written_rows == 2
    back = client.query_arrow(f"SELECT * FROM {table} ORDER BY id")
    assert back.column("name").to_pylist() == [TRICKY, "b"]
    assert back.column("note").to_pylist() == [None, "n"]
    assert back.column("tags").to_pylist() == [["x"], []]
    assert back.column("ts").to_pylist()[0].replace(tzinfo=None) == dt.datetime(
        2026, 1, 2, 3, 4, 5, 678000
    )


def test_query_parameters_of_several_types(client: Client) -> None:
    when = dt.datetime(2026, 3, 4, 5, 6, 7, 891000)
    result = client.query(
        "SELECT {s:String} AS s, {a:Array(String)} AS a, {t:DateTime64(3)} AS t, "
        "{n:Nullable(String)} AS n, {m:Nullable(UInt32)} AS m, {i:UInt64} AS i",
        parameters={"s": TRICKY, "a": [TRICKY, "", "x]y"], "t": when, "n": None, "m": 5, "i": 9},
    )
    assert result.result_rows == [(TRICKY, [TRICKY, "", "x]y"], when, None, 5, 9)]


def test_parameters_filter_rows(client: Client, table: str) -> None:
    client.insert(table, ROWS, column_names=COLUMNS)
    found = client.query(
        f"SELECT id FROM {table} WHERE name = {{name:String}} AND ts >= {{since:DateTime64(3)}}",
        parameters={"name": TRICKY, "since": dt.datetime(2026, 1, 2, 3, 4, 5, 678000)},
    )
    assert found.result_rows == [(1,)]


def test_long_parameters_go_as_a_form_and_external_data_works(client: Client) -> None:
    long_value = "y" * 30_000  # past clickhouse-connect's URL limit: multipart/form-data
    assert client.query("SELECT length({v:String})", parameters={"v": long_value}).result_rows == [
        (30_000,)
    ]
    external = ExternalData(
        file_name="lookup", data=b"1\tone\n2\ttwo\n", structure=["k UInt32", "v String"]
    )
    result = client.query("SELECT v FROM lookup ORDER BY k", external_data=external)
    assert result.result_rows == [("one",), ("two",)]


def test_a_parameter_over_the_servers_field_limit_is_refused(fx: Fixture, client: Client) -> None:
    # ClickHouse's HTMLForm refuses a value over http_max_field_value_size (128 KiB), in a
    # form as in the URL (there counted URL-encoded), with a Poco exception: code 1000, 500.
    limit = client.command("SELECT getSetting('http_max_field_value_size')")
    assert limit == 131072
    query = "SELECT length({v:String})"
    assert client.query(query, parameters={"v": "y" * limit}).result_rows == [(limit,)]
    with pytest.raises(DatabaseError) as caught:
        client.query(query, parameters={"v": "y" * (limit + 1)})  # as a multipart form
    assert caught.value.code == 1000
    assert "HTML Form Exception: Field value too long" in str(caught.value)
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def post(params: dict[str, str], body: bytes) -> tuple[int, str, str]:
        # http.client, not httpx: httpx refuses URLs over 64 KiB before sending them
        connection = http.client.HTTPConnection("127.0.0.1", fx.port, timeout=10)
        try:
            connection.request("POST", "/?" + urlencode(params), body, {"Authorization": auth})
            response = connection.getresponse()
            text = response.read().decode()
            return response.status, response.getheader("X-ClickHouse-Exception-Code", ""), text
        finally:
            connection.close()

    # in the URL: 'a' is sent as is, so 131,072 fit; "'" is sent as %27, so 43,691 do not
    assert post({"param_v": "a" * limit}, query.encode()) == (200, "", f"{limit}\n")
    status, code, text = post({"param_v": "'" * 43_691}, query.encode())
    assert (status, code) == (500, "1000")
    assert text.startswith(
        "Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: Field value too long"
    )
    assert "Too many form fields" in post({f"param_p{i}": "1" for i in range(1001)}, b"SELECT 1")[2]


def test_settings_apply_to_one_query_only(client: Client) -> None:
    default = client.command("SELECT getSetting('max_threads')")
    assert client.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    assert client.query(
        "SELECT getSetting('max_threads')", settings={"max_threads": 5}
    ).result_rows == [(5,)]
    assert client.command("SELECT getSetting('max_threads')") == default
    with pytest.raises(DatabaseError) as caught:
        client.command("SELECT 1", settings={"no_such_setting_here": 1})
    assert caught.value.code == 115


def test_client_settings_go_with_every_request(connect: Any) -> None:
    client = connect(settings={"max_threads": 2})
    assert client.command("SELECT getSetting('max_threads')") == 2


def test_a_session_keeps_set_and_temporary_tables(connect: Any) -> None:
    session = connect(session_id=f"s-{uuid.uuid4()}")
    other = connect(autogenerate_session_id=False)
    default = other.command("SELECT getSetting('max_threads')")
    session.command("SET max_threads = 3")
    assert session.command("SELECT getSetting('max_threads')") == 3
    # A per-query setting in the session does not replace the session's own value.
    assert session.command("SELECT getSetting('max_threads')", settings={"max_threads": 4}) == 4
    assert session.command("SELECT getSetting('max_threads')") == 3
    assert other.command("SELECT getSetting('max_threads')") == default
    session.command("CREATE TEMPORARY TABLE scratch (x UInt8)")
    session.insert("scratch", [[1], [2]], column_names=["x"])
    assert session.command("SELECT sum(x) FROM scratch") == 3
    with pytest.raises(DatabaseError) as caught:
        other.command("SELECT sum(x) FROM scratch")
    assert caught.value.code == 60


def test_sessions_expire_and_can_be_checked(fx: Fixture) -> None:
    url = f"http://127.0.0.1:{fx.port}/"
    session = {"session_id": f"s-{uuid.uuid4()}", "session_timeout": "1"}
    with httpx.Client(timeout=10, auth=(USER, PASSWORD)) as http:
        missing = http.post(url, params={**session, "session_check": "1"}, content=b"SELECT 1")
        assert missing.headers["X-ClickHouse-Exception-Code"] == "372"
        assert http.post(url, params=session, content=b"SET max_threads = 7").status_code == 200
        kept = http.post(
            url,
            params={**session, "session_check": "1"},
            content=b"SELECT getSetting('max_threads')",
        )
        assert kept.text == "7\n"
        time.sleep(1.3)
        gone = http.post(url, params={**session, "session_check": "1"}, content=b"SELECT 1")
        assert gone.headers["X-ClickHouse-Exception-Code"] == "372"


def test_database_parameter(fx: Fixture, connect: Any) -> None:
    admin = connect(autogenerate_session_id=False)
    admin.command("CREATE DATABASE IF NOT EXISTS fixture_db")
    admin.command("CREATE TABLE IF NOT EXISTS fixture_db.only_here (x UInt8) ENGINE = Memory")
    scoped = connect(database="fixture_db")
    assert scoped.command("SELECT currentDatabase()") == "fixture_db"
    assert scoped.command("EXISTS TABLE only_here") == 1
    assert admin.command("SELECT currentDatabase()") == "default"


def test_wrong_password_is_516(fx: Fixture) -> None:
    with pytest.raises(DatabaseError) as caught:
        clickhouse_connect.get_client(**fx.client_kwargs(password="wrong"))
    assert caught.value.code == 516
    assert "516" in str(caught.value)
    assert "AUTHENTICATION_FAILED" in str(caught.value)
    with httpx.Client(timeout=10) as http:
        response = http.post(
            f"http://127.0.0.1:{fx.port}/",
            content=b"SELECT 1",
            headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": "nope"},
        )
    assert response.status_code == 403
    assert response.headers["X-ClickHouse-Exception-Code"] == "516"
    assert response.text.startswith(f"Code: 516. DB::Exception: {USER}: Authentication failed")


def test_unknown_database_is_81(fx: Fixture) -> None:
    with pytest.raises(DatabaseError) as caught:
        clickhouse_connect.get_client(**fx.client_kwargs(database="no_such_db"))
    assert caught.value.code == 81
    assert "81" in str(caught.value)
    assert "UNKNOWN_DATABASE" in str(caught.value)


def test_syntax_error_is_62_and_unknown_table_60(client: Client) -> None:
    with pytest.raises(DatabaseError) as caught:
        client.query("SELEC 1")
    assert caught.value.code == 62
    assert caught.value.name == "SYNTAX_ERROR"
    with pytest.raises(DatabaseError) as caught:
        client.command("SELECT * FROM no_such_table")
    assert caught.value.code == 60


def test_bad_insert_data_is_an_error(client: Client, table: str) -> None:
    with pytest.raises(DatabaseError) as caught:
        client.raw_insert(table, ["id", "name"], b"not-a-number\tx\n", fmt="TabSeparated")
    assert caught.value.code == 27
    assert client.command(f"SELECT count() FROM {table}") == 0


def test_http_details(fx: Fixture) -> None:
    url = f"http://127.0.0.1:{fx.port}/"
    with httpx.Client(timeout=10, auth=(USER, PASSWORD)) as http:
        ok = http.post(
            url,
            params={"query_id": "q-1", "default_format": "JSONEachRow"},
            content=b"SELECT 1 AS x",
        )
        assert ok.status_code == 200
        assert ok.json() == {"x": 1}
        assert ok.headers["X-ClickHouse-Query-Id"] == "q-1"
        assert ok.headers["X-ClickHouse-Format"] == "JSONEachRow"
        assert ok.headers["X-ClickHouse-Timezone"]
        assert ok.headers["X-ClickHouse-Server-Display-Name"]
        assert json.loads(ok.headers["X-ClickHouse-Summary"])["read_rows"] == "1"
        # the query in the URL and the data in the body, gzip-compressed
        http.post(url, content=b"CREATE TABLE http_t (a UInt8, b String) ENGINE = Memory")
        insert = http.post(
            url,
            params={"query": "INSERT INTO http_t FORMAT TabSeparated"},
            content=gzip.compress(b"1\tx\n2\ty\n"),
            headers={"Content-Encoding": "gzip"},
        )
        assert insert.status_code == 200, insert.text
        assert "X-ClickHouse-Format" not in insert.headers
        assert json.loads(insert.headers["X-ClickHouse-Summary"])["written_rows"] == "2"
        # GET is read-only, as on a server
        denied = http.get(url, params={"query": "DROP TABLE http_t"})
        assert denied.headers["X-ClickHouse-Exception-Code"] == "164"
        missing = http.post(url, content=b"SELECT * FROM http_missing")
        assert (missing.status_code, missing.headers["X-ClickHouse-Exception-Code"]) == (404, "60")
        multi = http.post(url, content=b"SELECT 1; SELECT 2")
        assert multi.headers["X-ClickHouse-Exception-Code"] == "62"
        assert "Multi-statements" in multi.text
        assert http.post(url, content=b"").headers["X-ClickHouse-Exception-Code"] == "62"
        compressed = http.post(
            url, content=b"SELECT repeat('a', 1000)", headers={"Accept-Encoding": "zstd"}
        )
        assert compressed.headers["Content-Encoding"] == "zstd"
        assert zstd.decompress(compressed.content) == b"a" * 1000 + b"\n"


def test_an_insert_streams_its_body_while_other_queries_run(fx: Fixture, client: Client) -> None:
    # As on a server: the insert starts with the first chunk of its (lz4) body, and another
    # query runs meanwhile and sees it running. Buffering the body first, or one query at a
    # time, would not show it (or would wait for ever: the body waits for that query).
    client.command("CREATE TABLE stream_t (a UInt32) ENGINE = MergeTree ORDER BY a")
    frame = lz4.frame.compress(b"".join(b"%d\n" % i for i in range(100_000)))
    running: list[str] = []

    def body() -> Iterator[bytes]:
        yield frame[:1000]
        # The server starts the insert once it has read the first piece: look until it shows
        # (one look right after the send could come before it; CI saw that once).
        deadline = time.monotonic() + 10
        while not (running and running[-1]) and time.monotonic() < deadline:
            running.append(
                client.command(
                    "SELECT query FROM system.processes WHERE query LIKE 'INSERT INTO stream_t%'"
                )
            )
            if not running[-1]:
                time.sleep(0.02)
        yield frame[1000:]

    url = f"http://127.0.0.1:{fx.port}/"
    with httpx.Client(timeout=30, auth=(USER, PASSWORD)) as http:
        done = http.post(
            url,
            params={"query": "INSERT INTO stream_t FORMAT TSV"},
            content=body(),
            headers={"Content-Encoding": "lz4"},
        )
        assert done.status_code == 200, done.text
        assert running and "INSERT INTO stream_t" in running[-1]
        assert client.command("SELECT count(), sum(a) FROM stream_t") == ["100000", "4999950000"]
        # a stream cut short is refused whole, and the connection serves the next request
        cut = http.post(
            url,
            params={"query": "INSERT INTO stream_t FORMAT TSV"},
            content=iter([frame[:1000], frame[1000:-4]]),
            headers={"Content-Encoding": "lz4"},
        )
        assert (cut.status_code, cut.headers["X-ClickHouse-Exception-Code"]) == (500, "617")
        assert "truncated lz4 frame" in cut.text
        assert http.post(url, content=b"SELECT count() FROM stream_t").text == "100000\n"


def test_auto_created_database_without_the_strict_flag(tmp_path: Path, connect: Any) -> None:
    with start_fixture(tmp_path, database_must_exist=False) as lenient:
        client = connect(lenient, database="made_on_demand")
        assert client.command("SELECT currentDatabase()") == "made_on_demand"


def test_stopped_fixture_is_an_operational_error(tmp_path: Path, connect: Any) -> None:
    fixture = start_fixture(tmp_path, USER, PASSWORD)
    try:
        client = connect(fixture)
        assert client.command("SELECT 1") == 1
    finally:
        fixture.stop()
    assert not fixture.alive()
    with pytest.raises(OperationalError):
        client.query("SELECT 1")


def test_statement_analysis() -> None:
    """The INSERT/data split follows ClickHouse's parser: after the format name, spaces and
    one line break are skipped, so binary data that starts with a newline byte survives."""
    head = b"INSERT INTO db.format (format, b) SETTINGS x = 'FORMAT' "
    text = head + b"FORMAT Native  \n\n\x01"
    insert = analyze(text)
    assert (insert.insert_head, insert.insert_format) == (head, "Native")
    assert text[insert.data_start :] == b"\n\x01"
    values = analyze(b"insert into t values (1, 'a')")
    assert (values.insert_format, values.data_start) == ("Values", len(b"insert into t values"))
    assert analyze(b"INSERT INTO t SELECT 1 FORMAT Native").insert_head is None
    assert analyze(b"SELECT format FROM t FORMAT JSON").result_format == "JSON"
    assert analyze(b"SELECT 'a;b' -- ; x\n").multi_at is None
    assert analyze(b"SELECT 1; SELECT 2").multi_at == 10
    error = engine_error(
        RuntimeError(
            "Code: 73. DB::Exception: Code: 73. DB::Exception: Unknown format X. "
            "(UNKNOWN_FORMAT) (version 26.9.2.1). (UNKNOWN_FORMAT)"
        )
    )
    assert (error.code, error.name, error.message) == (73, "UNKNOWN_FORMAT", "Unknown format X")
    assert error.status == 404
