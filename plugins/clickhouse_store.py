"""A ClickHouse server as the store, through clickhouse-connect over HTTP(S).

Used instead of the embedded chDB store when `clickhouse_url` is set (env
WATCHLLM_CLICKHOUSE_URL)::

    http(s)://user:password@host:port/database?compress=lz4&connect_timeout=10
                                                &send_receive_timeout=300&pool_size=40

The user defaults to `default`, the port to 8123 (http) or 8443 (https), the database to
`default`; user and password are URL-decoded (write `%40` for `@`, `%3A` for `:`). The
database must exist. Options: `compress` (lz4, zstd, gzip, br, true or none; lz4 by
default), `connect_timeout` and `send_receive_timeout` (seconds, fractions allowed), and
`pool_size` (HTTP connections kept open; 40 by default, anyio's worker-thread count).

The store is one clickhouse-connect client without a session, shared by every worker
thread (the core calls stores from threads): without a session each call is an independent
HTTP request on the shared connection pool, so calls may run concurrently.

Answers are the chDB store's, value for value: queries run with FORMAT JSONEachRow and are
parsed line by line as there, with the JSON output settings that shape values (64-bit
integers as numbers, DateTime as 'YYYY-MM-DD hh:mm:ss.mmm') pinned to chDB's where the
server's defaults differ. Parameters go as `{name:Type}` server-side bindings formatted as
for chDB (datetimes by watchllm_ext.store.params, which keeps milliseconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import msgspec
import pyarrow as pa

from watchllm_ext import Settings, hookimpl
from watchllm_ext.settings import clickhouse_url_problem, masked_clickhouse_url
from watchllm_ext.store import StoreError, StoreUnavailable
from watchllm_ext.store.params import format_param
from watchllm_ext.store.rows import OneArray

log = logging.getLogger("watchllm.clickhouse")

ENV_URL = "WATCHLLM_CLICKHOUSE_URL"
DEFAULT_PORTS = {"http": 8123, "https": 8443}
DEFAULT_POOL_SIZE = 40  # anyio's default number of worker threads
_COMPRESSION = {"lz4": "lz4", "zstd": "zstd", "gzip": "gzip", "br": "br", "true": True}
_NO_COMPRESSION = ("none", "false", "0", "off", "no")

# Output settings that decide how values look in JSONEachRow, as chDB has them. Only those
# whose value on the server differs are sent with each query (none on a current server).
_JSON_OUTPUT = {
    "output_format_json_quote_64bit_integers": "0",
    "output_format_json_quote_64bit_floats": "0",
    "output_format_json_quote_denormals": "0",
    "output_format_json_quote_decimals": "0",
    "output_format_json_named_tuples_as_objects": "1",
    "date_time_output_format": "simple",
}

# Statements (DDL, INSERT ... SELECT, the migration record's INSERT ... VALUES) run
# synchronously: with async_insert on in a user profile, parameters in VALUES are not
# substituted (ClickHouse issues 67117, 70741). Sent only where the server's value differs.
_STATEMENTS = {"async_insert": "0"}

# On a cluster (tables are Distributed, see watchllm_ext/store/cluster.py):
# - a query on a Distributed table whose IN/JOIN subquery reads another one runs that
#   subquery once and ships its result to the shards (GLOBAL), instead of being refused;
# - an insert returns only once every shard has its rows, so the writer advances its spool
#   cursor past events that are on the shards, not queued on this node.
# (The insert setting is distributed_foreground_insert, insert_distributed_sync on older
# servers: see _sync_insert_name.)
_CLUSTER_QUERIES = {"distributed_product_mode": "global"}
# ON CLUSTER CREATE statements are normalised on the initiator (table names resolved in the
# connection's database) from 23.7 (distributed_ddl_entry_format_version 5).
_CLUSTER_MIN_VERSION = (23, 7)
# While the server is down, how long a failed connect is reported again before a new try.
_RETRY_CONNECT_S = 1.0

# Errors about the data, which no retry can fix: the writer dead-letters such a batch.
_PERMANENT_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        25,  # CANNOT_PARSE_ESCAPE_SEQUENCE
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        128,  # TOO_LARGE_ARRAY_SIZE
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        376,  # CANNOT_PARSE_UUID
        467,  # CANNOT_PARSE_BOOL
    }
)
_PERMANENT_NAMES = ("CANNOT_PARSE", "CANNOT_CONVERT_TYPE", "TYPE_MISMATCH", "TOO_LARGE")
# The server (or the cluster behind it) cannot serve now: a retry later may work. Treated
# like a server that is down: serve starts and spools, the writer retries.
_UNAVAILABLE_CODES = frozenset(
    {
        159,  # TIMEOUT_EXCEEDED (an ON CLUSTER statement waiting for a host)
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        225,  # NO_ZOOKEEPER
        242,  # TABLE_IS_READ_ONLY (a replica without Keeper)
        279,  # ALL_CONNECTION_TRIES_FAILED (a shard down)
        999,  # KEEPER_EXCEPTION
    }
)
_GATEWAY_DOWN = re.compile(r"HTTP status (?:502|503|504)\b")
_AUTHENTICATION_FAILED = 516
# Poco's HTTP form reader refused the request: a URL parameter or form field over the
# server's http_max_field_value_size (128 KiB by default; for a query parameter, in the URL
# or in a form alike), http_max_field_name_size or http_max_fields.
_POCO_EXCEPTION = 1000
_FORM_LIMITS = "http_max_field_value_size, http_max_field_name_size, http_max_fields"
_UNKNOWN_DATABASE = 81

# Query answers (JSONEachRow) are read with msgspec: ~7 times faster than json.loads a line at a
# time (a 50,000-row id look-up: ~0.9 against ~6 us a row, in the writer's thread, which holds
# the GIL the event loop needs). It gives json.loads's values; where it refuses a line that
# json.loads reads or refuses differently (NaN, a number beyond a float, invalid UTF-8), the
# answer is read line by line with json.loads, as the chDB store reads it.
_ROWS = msgspec.json.Decoder()

# TabSeparated's escapes, for the ids of query_with_ids.
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

_PLACEHOLDER = re.compile(r"\{\s*[A-Za-z_][A-Za-z0-9_]*\s*:")
_SERVER_TEXT = re.compile(r"server response:\s*(.*)", re.DOTALL)
_TRAILERS = re.compile(r"(\s*\((?:for url|version) [^()]*(?:\([^()]*\))?[^()]*\))+\s*$")


# Request bodies for insert_json are compressed as they are sent, one piece at a time (a
# generator: the HTTP body goes chunked), so the server parses the first rows while the last
# are compressed: the compression is off the insert's critical path (~1 us an event with
# lz4, all of it before the first byte was sent when the body was compressed whole), and the
# body is never held twice. lz4, zstd and zlib release the GIL while they compress.


def _lz4(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    import lz4.frame

    compressor = lz4.frame.LZ4FrameCompressor()  # one frame over all the pieces
    yield compressor.begin()
    for piece in pieces:
        yield compressor.compress(piece)
    yield compressor.flush()


def _zstd(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    try:  # the zstd clickhouse-connect uses: Python 3.14's, else backports.zstd
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        except ImportError:  # clickhouse-connect before 0.9 used zstandard
            import zstandard

            yield zstandard.ZstdCompressor().compress(b"".join(pieces))
            return
    compressor = zstd.ZstdCompressor()  # one frame over all the pieces
    for piece in pieces:
        yield compressor.compress(piece)
    yield compressor.flush()


def _gzip(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    import zlib

    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # one gzip member
    for piece in pieces:
        yield compressor.compress(piece)
    yield compressor.flush()


# Request body compressors for insert_json, by clickhouse-connect's write_compression name.
_COMPRESSORS: dict[str, Callable[[Iterable[bytes | memoryview]], Iterator[bytes]]] = {
    "lz4": _lz4,
    "zstd": _zstd,
    "gzip": _gzip,
}


def _differing(client: Any, wanted: Mapping[str, str]) -> dict[str, str]:
    """The settings of `wanted` whose value for our user on this server differs."""
    server = client.server_settings
    return {
        key: value
        for key, value in wanted.items()
        if key in server and str(server[key].value) != value
    }


def _sync_insert_name(client: Any) -> str:
    # The newer name where the server knows it; older servers have only the first one.
    if "distributed_foreground_insert" in client.server_settings:
        return "distributed_foreground_insert"
    return "insert_distributed_sync"


def _release(client: Any, pool: Any) -> None:
    from clickhouse_connect.driver import httputil

    try:
        if client is not None:
            client.close()
    finally:
        if pool is not None:
            pool.clear()  # our pool: the client leaves it open
            httputil.all_managers.pop(pool, None)


@dataclass(frozen=True)
class ClickHouseURL:
    """The parts of a `clickhouse_url`."""

    scheme: str
    host: str
    port: int
    user: str
    password: str
    database: str
    compress: bool | str = "lz4"
    connect_timeout: float = 10.0
    send_receive_timeout: float = 300.0
    pool_size: int = DEFAULT_POOL_SIZE

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def redacted(self) -> str:
        """The URL without its password, for messages and logs."""
        return f"{self.scheme}://{quote(self.user, safe='')}@{self.address}/{self.database}"


def parse_url(url: str) -> ClickHouseURL:
    """Parse `http(s)://user:password@host:port/database?options`; StoreError if bad, by the
    rules the settings check clickhouse_url with (one set: clickhouse_url_problem), named
    without the password."""
    problem = clickhouse_url_problem(url)
    if problem is not None:
        shown = masked_clickhouse_url(url)
        raise StoreError(f"bad ClickHouse URL {shown!r} ({ENV_URL}): {problem}", permanent=True)
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "compress":
            lowered = value.strip().lower()
            options[name] = False if lowered in _NO_COMPRESSION else _COMPRESSION[lowered]
        elif name == "pool_size":
            options[name] = int(value)
        else:
            options[name] = float(value)
    return ClickHouseURL(
        scheme=scheme,
        host=parts.hostname or "",
        port=parts.port or DEFAULT_PORTS[scheme],
        user=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        database=unquote(parts.path.strip("/")) or "default",
        **options,
    )


def _bind_value(value: Any) -> Any:
    # Datetimes as watchllm_ext.store.params formats them for chDB (with milliseconds; older
    # clickhouse-connect versions drop them); the text needs no escaping, so the client sends
    # it as is. Every other value clickhouse-connect formats as format_param does.
    if isinstance(value, datetime):
        return format_param(value)
    if isinstance(value, list | tuple):
        return type(value)(_bind_value(item) for item in value)
    return value


def _bind(sql: str, params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # Without a {name:Type} placeholder clickhouse-connect would %-format the SQL instead.
    if not params or not _PLACEHOLDER.search(sql):
        return None
    return {name: _bind_value(value) for name, value in params.items()}


def _rows(body: bytes) -> list[dict[str, Any]]:
    """The objects of a JSONEachRow answer, as json.loads reads each line (see _ROWS)."""
    try:
        return _ROWS.decode_lines(body)
    except msgspec.DecodeError:
        # One object per "\n"; JSON strings escape newlines, so no other split is safe
        # (str.splitlines would also split inside a string at U+0085 or U+2028).
        return [json.loads(line) for line in body.split(b"\n") if line]


def _is_permanent(code: int | None, name: str | None) -> bool:
    if code in _PERMANENT_CODES:
        return True
    return bool(name) and any(part in name for part in _PERMANENT_NAMES)


def _server_text(exc: Exception) -> str:
    """The server's message on one line, without clickhouse-connect's wrapping."""
    text = str(exc)
    found = _SERVER_TEXT.search(text)
    if found:
        text = found.group(1)
    text = _TRAILERS.sub("", text.strip())
    return " ".join(text.split())


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


class ClickHouseStore:
    """The Store protocol on a ClickHouse server (see the module docstring)."""

    name = "clickhouse"

    def __init__(
        self, url: str | ClickHouseURL, cluster: str | None = None, *, wait_for_server: bool = False
    ) -> None:
        """Connect to the server. A server that cannot be reached raises StoreUnavailable, or
        with `wait_for_server` is connected to on first use (every call raises
        StoreUnavailable until then), so `serve` can start and spool while it is down. A
        wrong password, a missing database or an unknown cluster always raise here."""
        self.url = url if isinstance(url, ClickHouseURL) else parse_url(url)
        self.cluster = cluster
        self._client: Any = None
        self._pool: Any = None
        self._closed = False
        self._connecting = threading.Lock()
        self._last_failure: tuple[float, StoreError] | None = None
        self._json_settings: dict[str, str] = {}
        self._statement_settings: dict[str, str] = {}
        self._insert_settings: dict[str, str] = {}
        try:
            self._connect()
        except StoreUnavailable as exc:
            if not wait_for_server:
                raise
            self._last_failure = (time.monotonic(), exc)
            log.debug("%s; connecting on first use", exc)  # the app says what it does then

    def _connect(self) -> None:
        import clickhouse_connect
        from clickhouse_connect.driver import httputil
        from urllib3 import Timeout

        u = self.url
        proxy = httputil.check_env_proxy(u.scheme, u.host, u.port)
        proxies = {f"{u.scheme}_proxy": proxy} if proxy else {}
        pool = client = None
        try:
            pool = httputil.get_pool_manager(maxsize=u.pool_size, **proxies)
            client = clickhouse_connect.get_client(
                interface=u.scheme,
                host=u.host,
                port=u.port,
                username=u.user,
                password=u.password,
                database=u.database,
                compress=u.compress,
                # The constructor takes whole seconds; the exact values are set below.
                connect_timeout=max(1, math.ceil(u.connect_timeout)),
                send_receive_timeout=max(1, math.ceil(u.send_receive_timeout)),
                pool_mgr=pool,
                autogenerate_session_id=False,
                client_name="watchllm",
            )
            client.timeout = Timeout(connect=u.connect_timeout, read=u.send_receive_timeout)
            # Everything is settled on local variables; the client is published last, so no
            # other thread uses it without its settings or before the cluster is checked.
            json_settings = _differing(client, _JSON_OUTPUT)
            statement_settings = _differing(client, _STATEMENTS)
            insert_settings: dict[str, str] = {}
            if self.cluster:
                self._check_cluster(client, self.cluster)
                sync_insert = {_sync_insert_name(client): "1"}
                json_settings = {**json_settings, **_CLUSTER_QUERIES}
                statement_settings = {**statement_settings, **_CLUSTER_QUERIES, **sync_insert}
                insert_settings = sync_insert
        except Exception as exc:
            _release(client, pool)
            raise self._error(exc, "connecting") from exc
        self._json_settings = json_settings
        self._statement_settings = statement_settings
        self._insert_settings = insert_settings
        self._pool, self._client = pool, client
        log.info("ClickHouse %s at %s (database %s)", client.server_version, u.address, u.database)

    def _connected(self) -> Any:
        """The client, connecting first if the server was down at start. While the server is
        down, one thread tries at a time and the others fail at once with the last error
        (for about a second), so callers do not queue behind connect timeouts."""
        client = self._client
        if client is not None:
            return client
        if self._closed:
            raise StoreError(f"the store for {self.url.address} is closed")
        failure = self._last_failure
        if failure and time.monotonic() - failure[0] < _RETRY_CONNECT_S:
            raise failure[1]
        if not self._connecting.acquire(blocking=False):
            raise StoreUnavailable(f"still connecting to ClickHouse at {self.url.address}")
        try:
            if self._client is None and not self._closed:
                try:
                    self._connect()
                except StoreUnavailable as exc:
                    self._last_failure = (time.monotonic(), exc)
                    raise
                self._last_failure = None
            if self._client is None:
                raise StoreError(f"the store for {self.url.address} is closed")
            return self._client
        finally:
            self._connecting.release()

    # --- the Store protocol ---------------------------------------------------------------

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        try:
            self._connected().command(
                sql, parameters=_bind(sql, params), settings=self._statement_settings or None
            )
        except Exception as exc:
            raise self._error(exc, "running a statement") from exc

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._json_query(sql, params, "running a query")

    def query_with_ids(
        self, sql: str, params: Mapping[str, Any] | None, ids: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Run `sql`, which reads `ids` from a table named `ids` (one column, `id String`):
        they go with the query as ClickHouse external data, a temporary table in the request
        (TSV). One request however many ids, and no limit of a query parameter's size
        (http_max_field_value_size, 128 KiB): a look-up of 50,000 ids costs the server about
        a quarter of the CPU of `IN {ids:Array(String)}` in parameter-sized chunks."""
        from clickhouse_connect.driver.external import ExternalData

        text = "\n".join(ids)
        # Ids of the schema's alphabet need no escaping (the common case: one join); others
        # get TabSeparated's escapes.
        if "\\" in text or "\t" in text or "\r" in text or text.count("\n") != len(ids) - 1:
            text = "\n".join(value.translate(_TSV_ESCAPES) for value in ids)
        data = (text + "\n").encode() if ids else b""
        table = ExternalData(
            file_name="ids", data=data, fmt="TabSeparated", structure=["id String"]
        )
        return self._json_query(sql, params, f"running a query with {len(ids)} ids", table)

    def _json_query(
        self, sql: str, params: Mapping[str, Any] | None, doing: str, external_data: Any = None
    ) -> list[dict[str, Any]]:
        """The rows of `sql` (FORMAT JSONEachRow, read as the chDB store reads them); a
        failure raises the StoreError of _error, saying what it was `doing`."""
        try:
            body = self._connected().raw_query(
                sql,
                parameters=_bind(sql, params),
                settings=self._json_settings or None,
                fmt="JSONEachRow",
                external_data=external_data,
            )
        except Exception as exc:
            raise self._error(exc, doing) from exc
        return _rows(body)

    def insert(self, table: str, data: pa.Table) -> None:
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        if data.num_rows == 0:
            return
        try:
            # Columnar: the Arrow table goes as one Arrow IPC body (INSERT ... FORMAT Arrow).
            self._connected().insert_arrow(table, data, settings=self._insert_settings or None)
        except Exception as exc:
            raise self._error(exc, f"inserting {data.num_rows} rows into {table}") from exc

    def insert_json(
        self, table: str, body: bytes | Iterable[bytes | memoryview], settings: Mapping[str, Any]
    ) -> None:
        """Insert `body` (JSONEachRow: objects one a line, or one JSON array of them; whole or
        in pieces, a list or another iterable), parsed by the server with `settings`: one
        HTTP request, its body sent chunked as it is compressed (as the URL says), never joined
        into one bytes object.

        A broken connection is not retried here (clickhouse-connect replays only whole
        bytes bodies): the insert fails with StoreUnavailable and the store sink's next try
        looks its ids up again, so what landed is not inserted twice."""
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        sent = [0]  # bytes handed over, counted as they go (the pieces may be made as they go)

        def counted(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
            for piece in pieces:
                sent[0] += len(piece)
                yield piece

        pieces = counted([body] if isinstance(body, bytes) else body)
        try:
            client = self._connected()
            # The URL's `compress`, as insert_arrow uses it; raw_insert sends the body as it
            # is given, so it is compressed here.
            compression = getattr(client, "write_compression", None)
            if compression in _COMPRESSORS:
                chunks = _COMPRESSORS[compression](pieces)
            else:
                compression = None
                chunks = iter(pieces)
            # A generator (not bytes): the statement goes in the URL and the body as it is.
            client.raw_insert(
                table,
                insert_block=chunks,
                settings={**settings, **self._insert_settings},
                fmt="JSONEachRow",
                compression=compression,
            )
        except Exception as exc:
            raise self._error(exc, f"inserting {sent[0]} bytes of JSON into {table}") from exc

    def open_insert(self, table: str, settings: Mapping[str, Any]) -> QueuedInsert:
        """An insert into `table` of one JSON array whose events come in parts: one HTTP
        request (insert_json's) whose chunked body is sent as the parts are appended, so the
        server parses them meanwhile; the rows land when `finish()` ends the body, and none
        when `cancel()` breaks it off (the server then refuses the unfinished body)."""
        if not table.isidentifier():
            raise StoreError(f"bad table name {table!r}", permanent=True)
        return QueuedInsert(self, table, settings)

    def version(self) -> str:
        # Asked each time (not the version read at connect): /readyz uses this as its check.
        try:
            return str(self._connected().command("SELECT version()"))
        except Exception as exc:
            raise self._error(exc, "asking its version") from exc

    def close(self) -> None:
        self._closed = True  # no reconnect after this
        client, self._client = self._client, None
        pool, self._pool = self._pool, None
        _release(client, pool)

    def __repr__(self) -> str:
        return f"ClickHouseStore({self.url.redacted()!r})"

    def _check_cluster(self, client: Any, cluster: str) -> None:
        hosts = client.command(
            "SELECT count() FROM system.clusters WHERE cluster = {cluster:String}",
            parameters={"cluster": cluster},
        )
        if not int(hosts):
            raise StoreError(
                f"cluster {cluster!r} is not defined on ClickHouse at {self.url.address}"
                " (see SELECT DISTINCT cluster FROM system.clusters): fix cluster_name"
                " (WATCHLLM_CLUSTER_NAME) or the server's remote_servers"
            )
        version = tuple(int(part) for part in re.findall(r"\d+", client.server_version)[:2])
        if version < _CLUSTER_MIN_VERSION:
            minimum = ".".join(map(str, _CLUSTER_MIN_VERSION))
            raise StoreError(
                f"ClickHouse {client.server_version} at {self.url.address} is too old for"
                f" cluster_name: the cluster DDL needs {minimum} or later"
            )

    # --- errors -----------------------------------------------------------------------------

    def _error(self, exc: Exception, doing: str) -> StoreError:
        """One clear line for the errors people meet; `permanent` only for data errors."""
        from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError
        from urllib3.exceptions import (
            ConnectTimeoutError,
            NameResolutionError,
            NewConnectionError,
            ProtocolError,
            ReadTimeoutError,
        )

        u = self.url
        code = getattr(exc, "code", None)
        name = getattr(exc, "name", None)
        if isinstance(exc, StoreError):
            return exc
        if code == _AUTHENTICATION_FAILED:
            return StoreError(
                f"ClickHouse refused the user/password for user {u.user!r} at {u.address}"
                f" (516 AUTHENTICATION_FAILED): check the user and password in {ENV_URL}"
            )
        if code == _UNKNOWN_DATABASE:
            return StoreError(
                f"database {u.database} does not exist on {u.address} (81 UNKNOWN_DATABASE):"
                f" create it (CREATE DATABASE {u.database}) or name another in {ENV_URL}"
            )
        if code == _POCO_EXCEPTION and "HTML Form Exception" in str(exc):
            return StoreError(
                f"ClickHouse at {u.address} refused the request {doing}: {_server_text(exc)}"
                f" (a parameter over the server's {_FORM_LIMITS})"
            )
        if code in _UNAVAILABLE_CODES:
            text = _server_text(exc)
            return StoreUnavailable(f"ClickHouse at {u.address} failed {doing}: {text}")
        if code is not None:
            return StoreError(
                f"ClickHouse at {u.address} failed {doing}: {_server_text(exc)}",
                permanent=_is_permanent(code, name),
            )
        chain = _causes(exc)
        for cause in chain:
            # NewConnectionError (and NameResolutionError, one of them) subclasses
            # ConnectTimeoutError in urllib3, so it is tested first.
            if isinstance(cause, NameResolutionError):
                return StoreUnavailable(f"cannot reach ClickHouse at {u.address}: unknown host")
            if isinstance(cause, NewConnectionError | ConnectionRefusedError):
                reason = next(
                    (c.strerror for c in chain if isinstance(c, OSError) and c.strerror), None
                )
                return StoreUnavailable(
                    f"cannot reach ClickHouse at {u.address}: {(reason or str(cause)).lower()}"
                )
            if isinstance(cause, ConnectTimeoutError):
                return StoreUnavailable(
                    f"cannot reach ClickHouse at {u.address}: no connection within"
                    f" {u.connect_timeout:g} s (connect_timeout)"
                )
            if isinstance(cause, ReadTimeoutError | TimeoutError):
                return StoreUnavailable(
                    f"ClickHouse at {u.address} did not answer within"
                    f" {u.send_receive_timeout:g} s (send_receive_timeout) {doing}"
                )
            if isinstance(cause, ProtocolError | ConnectionError):
                return StoreUnavailable(
                    f"the connection to ClickHouse at {u.address} broke {doing}: {cause}"
                )
        if isinstance(exc, ProgrammingError):  # refused by the client before it was sent
            return StoreError(f"ClickHouse client error {doing}: {exc}", permanent=True)
        if isinstance(exc, DatabaseError):
            text = _server_text(exc)
            if _GATEWAY_DOWN.search(str(exc)):  # a proxy in front of a server that is down
                return StoreUnavailable(f"ClickHouse at {u.address} failed {doing}: {text}")
            return StoreError(f"ClickHouse at {u.address} failed {doing}: {text}")
        return StoreError(f"ClickHouse at {u.address} failed {doing}: {exc!r}")


_UNSET = object()


def configured_url(settings: Settings) -> str | None:
    """`settings.clickhouse_url`; WATCHLLM_CLICKHOUSE_URL where Settings has no such field."""
    url = getattr(settings, "clickhouse_url", _UNSET)
    if url is _UNSET:
        url = os.environ.get(ENV_URL)
    return url or None


class _Cancelled(Exception):
    """Breaks off a QueuedInsert's body (raised in the HTTP client's thread)."""


_END = object()
# How long finish() waits for the request to end (its statement's own time), and cancel()
# for the request to be broken off.
STREAM_END_WAIT_S = 600.0
CANCEL_WAIT_S = 5.0


class QueuedInsert:
    """ClickHouseStore.open_insert's insert: insert_json on a thread of its own, its body's
    pieces taken from a queue that `append` fills. Calls come one at a time."""

    def __init__(self, store: ClickHouseStore, table: str, settings: Mapping[str, Any]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._array = OneArray()
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(store, table, settings), name="watchllm-insert", daemon=True
        )
        self._started = False

    def append(self, body: bytes | Iterable[bytes | memoryview]) -> None:
        self._raise_error()
        try:
            pieces = self._array.pieces(body)
        except ValueError as exc:
            raise StoreError(str(exc), permanent=True) from exc
        if not pieces:
            return
        if not self._started:  # the request starts with the first events
            self._started = True
            self._thread.start()
        for piece in pieces:
            self._queue.put(piece)

    def finish(self) -> None:
        end = self._array.end()
        if end is None:
            return  # nothing was sent: no request was made
        self._queue.put(end)
        self._queue.put(_END)
        self._thread.join(STREAM_END_WAIT_S)
        if self._thread.is_alive():
            self.cancel()
            raise StoreError(f"an insert's request did not end in {STREAM_END_WAIT_S:.0f} s")
        self._raise_error()

    def cancel(self) -> None:
        """Break the request's body off at once (what is queued is not sent): the server
        refuses an unfinished body."""
        self._cancelled.set()
        self._queue.put(_END)  # wakes a body waiting for its next piece
        if self._started:
            self._thread.join(CANCEL_WAIT_S)  # a connection still being made may take longer

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _pieces(self) -> Iterator[bytes | memoryview]:
        while True:
            piece = self._queue.get()
            if self._cancelled.is_set():
                raise _Cancelled("the insert was cancelled")
            if piece is _END:
                return
            yield piece

    def _run(self, store: ClickHouseStore, table: str, settings: Mapping[str, Any]) -> None:
        try:
            store.insert_json(table, self._pieces(), settings)
        except BaseException as exc:
            self._error = exc
            # What the client stopped reading stays queued: nothing waits for it.


@hookimpl
def register_store(settings: Settings) -> ClickHouseStore | None:
    url = configured_url(settings)
    if not url:
        return None
    # A server that is down at start is connected to when it is back; serve spools meanwhile.
    cluster = getattr(settings, "cluster_name", None)
    return ClickHouseStore(url, cluster=cluster, wait_for_server=True)
