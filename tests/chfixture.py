"""A TEST FIXTURE, NOT A CLICKHOUSE SERVER: ClickHouse's HTTP interface served by chDB.

No modern ClickHouse server can be installed where these tests run, so this module serves the
part of ClickHouse's HTTP interface that clickhouse-connect uses, on 127.0.0.1 only, backed by
chDB (the ClickHouse engine as a library, so SQL, types, formats and error texts are the
engine's own). It runs in its own process because chDB opens one data folder per process and
the test process already uses chDB with other folders:

    python tests/chfixture.py --port PORT --data-dir DIR [--user U --password P]
                              [--database-must-exist] [--parent-pid PID]

or, from a test, ``with start_fixture(tmp_path) as fx: clickhouse_connect.get_client(
**fx.client_kwargs())``. It is for tests only: one user, no TLS, no access control beyond
that user's password, results buffered in memory.

What it supports (the parts clickhouse-connect sends, read from its source):

* ``GET/HEAD /ping`` and ``GET /`` without a query answer ``Ok.\\n``.
* Queries on any other path, ``POST`` or ``GET``: the ``query`` URL parameter, the body, or
  both (``query + "\\n" + body``, as the server joins them); ``multipart/form-data`` bodies
  (clickhouse-connect's form encoding) with ``query``/``param_*`` fields and external-data
  files (``<name>_structure`` or ``<name>_types``, ``<name>_format``), which become temporary
  tables for the one query.
* ``param_<name>`` query parameters, given to chDB as the raw text ClickHouse parses.
* The server's limits on URL parameters and form fields (``http_max_fields``,
  ``http_max_field_name_size``, ``http_max_field_value_size``: 1000 fields, 4 KiB names,
  128 KiB values by default, read from the engine): a request over one is refused as by
  ClickHouse's form reader (HTTP 500, ``Poco::Exception. Code: 1000, e.code() = 0, HTML Form
  Exception: Field value too long``), in the URL (sizes URL-encoded) as in a form. URLs up to
  ``http_max_uri_size`` (1 MiB) are read.
* Concurrent requests run concurrently, as on a server, each on its own chDB connection.
* ``database`` (or the ``X-ClickHouse-Database`` header), ``default_format`` (or the
  ``X-ClickHouse-Format`` header, default TabSeparated), ``query_id``, ``session_id`` with
  ``session_timeout`` (default 60 s, at most 3600), ``session_check`` and ``close_session``;
  ``wait_end_of_query``, ``buffer_size``, ``client_protocol_version``, ``role`` and
  ``quota_key`` are accepted and ignored (results are always buffered whole; the protocol
  probe then fails, as through a proxy, and the client falls back to plain Native).
* Every other URL parameter is a ClickHouse setting, applied with ``SET`` for that query
  only; an unknown one fails with 115 UNKNOWN_SETTING as on a server. A ``GET`` outside a
  session runs with ``readonly=2``, as on a server.
* Sessions: each ``session_id`` has its own chDB connection, so ``SET``, ``USE`` and
  temporary tables last for the session and are not seen outside it. A second request in a
  session that is busy fails with 373 SESSION_IS_LOCKED; idle sessions expire.
* INSERT with inline data (``... FORMAT <fmt>`` then data, or ``VALUES``): the statement is
  split from its data the way ClickHouse's parser does and the data is streamed into chDB's
  ``send_insert`` in that format (Native, Arrow, RowBinary, TSV, CSV, JSONEachRow, Values,
  Parquet, ...). Where the whole statement is in the ``query`` URL parameter and the body is
  all data (what clickhouse-connect's inserts send), the body goes into the insert chunk by
  chunk as it arrives and is decompressed, never whole in memory. ``INSERT ... SELECT`` and
  ``FROM INFILE`` run as ordinary queries.
* Result formats: whatever the query's ``FORMAT`` clause or ``default_format`` names (Native,
  Arrow, ArrowStream, Parquet, RowBinaryWithNamesAndTypes, TabSeparated*, JSON*, CSV*, ...).
* Authentication: HTTP Basic, ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers, or the
  ``user``/``password`` URL parameters (mixing them is refused as on a server). A wrong user
  or password gets HTTP 403 with ``X-ClickHouse-Exception-Code: 516`` and ``Code: 516.
  DB::Exception: <user>: Authentication failed: ... (AUTHENTICATION_FAILED)``.
* Request bodies with ``Content-Encoding`` zstd, lz4 (frames, several concatenated, as
  clickhouse-connect sends one per block), gzip, deflate, and br if ``brotli`` is installed.
  Responses are compressed (zstd, then br, lz4, gzip, deflate, in ClickHouse's order of
  preference) when ``Accept-Encoding`` asks and ``enable_http_compression`` is on (chDB's
  default is on).
* Response headers: ``X-ClickHouse-Query-Id``, ``X-ClickHouse-Summary`` (read/written rows
  and bytes, elapsed), ``X-ClickHouse-Server-Display-Name``, and for statements with a result
  ``X-ClickHouse-Format`` and ``X-ClickHouse-Timezone``.
* Errors: the engine's ``Code: N. DB::Exception: ... (NAME) (version V)`` text with
  ``X-ClickHouse-Exception-Code: N`` and the HTTP status a server gives for that code (400,
  403, 404, 500, ... from ClickHouse's exceptionCodeToHTTPStatus); empty queries and
  multi-statements are refused with 62 SYNTAX_ERROR as over HTTP.

What it does not support:

* ClickHouse's own block compression: ``compress=1`` / ``decompress=1`` fail with 48
  NOT_IMPLEMENTED (clickhouse-connect uses HTTP Content-Encoding instead).
* Streaming of results: they are computed whole before the response starts, so there are no
  ``X-ClickHouse-Progress`` headers and no mid-stream exceptions (``X-ClickHouse-Exception-Tag``).
* Users, roles, quotas, grants, TLS, the TCP protocol, ``/play``, ``/replicas_status``,
  ``/dashboard``, HTTP handler configuration, query cancellation on client close, and
  ``KILL QUERY`` for queries of other requests.
* ``result_rows`` / ``result_bytes`` in the summary are 0 / the body size (chDB does not
  report the number of result rows).
* An INSERT whose statement part uses ``{name:Type}`` parameters runs through chDB's
  ordinary query path, so its inline data is limited by ``max_query_size``.
* Settings given in the URL of a ``SET`` statement in a session are not applied (the
  statement runs alone), and a ``GET`` inside a session does not get ``readonly=2`` (chDB
  could not undo it for the session).
* The ``X-ClickHouse-Timezone`` of a session that ran ``SET session_timezone`` is asked of the
  engine; otherwise it is the URL's ``session_timezone`` or the engine's time zone.

Without ``--database-must-exist`` a ``database`` parameter naming a database that does not
exist creates it (a convenience for tests); with it, as on a server, the request fails with
81 UNKNOWN_DATABASE. ``start_fixture`` passes the flag unless told otherwise.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import lz4.frame

try:  # the same zstd clickhouse-connect uses
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]

try:
    import brotli  # type: ignore[import-not-found]
except ImportError:
    brotli = None

HOST = "127.0.0.1"
DISPLAY_NAME = "chfixture"
DEFAULT_SESSION_TIMEOUT = 60
MAX_URI_SIZE = 1 << 20  # ClickHouse's http_max_uri_size
CLOSE_WAIT_S = 30.0  # at shutdown, how long requests still running are waited for
MAX_SESSION_TIMEOUT = 3600

# URL parameters the HTTP interface consumes itself; every other one is a setting.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "query_id",
        "compress",
        "decompress",
        "user",
        "password",
        "quota_key",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "stacktrace",
    }
)

# chDB's own pseudo formats that a ClickHouse server does not have.
CHDB_ONLY_FORMATS = frozenset({"dataframe", "arrowtable", "debug", "datastore"})

# Statements whose first word means they produce a result set (X-ClickHouse-Format etc.).
RESULT_KINDS = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "("}
)

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp).
_STATUS_BY_NAME: dict[str, int] = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        (
            "UNKNOWN_USER",
            "WRONG_PASSWORD",
            "AUTHENTICATION_FAILED",
            "SET_NON_GRANTED_ROLE",
            "ACCESS_DENIED",
        ),
        403,
    ),
    **dict.fromkeys(
        (
            "BAD_ARGUMENTS",
            "CANNOT_COMPILE_REGEXP",
            "CANNOT_PARSE_TEXT",
            "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING",
            "CANNOT_PARSE_DATE",
            "CANNOT_PARSE_DATETIME",
            "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
            "CANNOT_PARSE_IPV4",
            "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
            "CANNOT_PARSE_UUID",
            "DUPLICATE_COLUMN",
            "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST",
            "UNKNOWN_TYPE_OF_AST_NODE",
            "THERE_IS_NO_COLUMN",
            "TOO_DEEP_AST",
            "TOO_BIG_AST",
            "UNEXPECTED_AST_STRUCTURE",
            "SYNTAX_ERROR",
            "INCORRECT_DATA",
            "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        ),
        400,
    ),
    **dict.fromkeys(
        (
            "UNKNOWN_TABLE",
            "UNKNOWN_FUNCTION",
            "UNKNOWN_IDENTIFIER",
            "UNKNOWN_TYPE",
            "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE",
            "UNKNOWN_SETTING",
            "UNKNOWN_DIRECTION_OF_SORTING",
            "UNKNOWN_AGGREGATE_FUNCTION",
            "UNKNOWN_FORMAT",
            "UNKNOWN_DATABASE_ENGINE",
            "UNKNOWN_TYPE_OF_QUERY",
            "UNKNOWN_ROLE",
        ),
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_CONTENT_TYPES = (
    ("TabSeparated", "text/tab-separated-values; charset=UTF-8"),
    ("TSV", "text/tab-separated-values; charset=UTF-8"),
    ("CSV", "text/csv; charset=UTF-8"),
    ("JSONEachRow", "application/x-ndjson; charset=UTF-8"),
    ("JSON", "application/json; charset=UTF-8"),
    ("Pretty", "text/plain; charset=UTF-8"),
    ("XML", "application/xml; charset=UTF-8"),
)
_TEXT_PLAIN = "text/plain; charset=UTF-8"

_CODE_PREFIX = re.compile(r"Code: (\d+)\. DB::Exception: ")
_NESTED_PREFIX = re.compile(r"Code: \d+\. DB::Exception: (?=Code: \d+\. DB::Exception: )")
_NAME_AT_END = re.compile(r"\(([A-Z][A-Z0-9_]*)\)(?= \(version [^)]*\)|\s*$)")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- errors ------------------------------------------------------------------------------


class ChError(Exception):
    """A ClickHouse exception: its code, its name and its message text."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)

    def body(self, version: str) -> bytes:
        text = f"Code: {self.code}. DB::Exception: {self.message}"
        if not text.rstrip(".").endswith(f"({self.name})"):
            text = f"{text.rstrip('.')}. ({self.name})"
        return f"{text} (version {version})\n".encode()


class FormError(ChError):
    """What the server answers when its HTTP form reader (Poco's HTMLForm) refuses a request:
    not a DB::Exception but a Poco one, code 1000, HTTP 500."""

    def __init__(self, message: str) -> None:
        super().__init__(1000, "POCO_EXCEPTION", message)

    def body(self, version: str) -> bytes:
        text = f"Poco::Exception. Code: 1000, e.code() = 0, HTML Form Exception: {self.message}"
        return f"{text} (version {version})\n".encode()


@dataclass(frozen=True)
class FormLimits:
    """The server's limits on URL parameters and form fields (http_max_fields,
    http_max_field_name_size, http_max_field_value_size): ClickHouse's HTMLForm refuses a
    request over any of them, whether the values travel in the URL or in a multipart body."""

    max_fields: int = 1000
    max_name_size: int = 4096
    max_value_size: int = 131072

    def check(self, fields: Iterable[tuple[int, int]]) -> None:
        """Check (name size, value size) pairs, sizes as sent (URL-encoded in a URL)."""
        for count, (name_size, value_size) in enumerate(fields):
            if self.max_fields and count == self.max_fields:
                raise FormError("Too many form fields")
            if name_size > self.max_name_size:
                raise FormError("Field name too long")
            if value_size > self.max_value_size:
                raise FormError("Field value too long")

    def check_url(self, query_string: bytes) -> None:
        if query_string:
            self.check(
                (len(name), len(value))
                for name, _, value in (part.partition(b"=") for part in query_string.split(b"&"))
            )


def engine_error(exc: BaseException) -> ChError:
    """The ChError in a chDB exception's text (chDB wraps it in prefixes and repeats it)."""
    text = str(exc)
    start = text.find("Code: ")
    if start < 0:
        return ChError(1001, "STD_EXCEPTION", text.strip() or type(exc).__name__)
    text = text[start:].strip()
    while True:
        nested = _NESTED_PREFIX.match(text)
        if nested is None:
            break
        text = text[nested.end() :]
    found = _CODE_PREFIX.match(text)
    if found is None:
        return ChError(1001, "STD_EXCEPTION", text)
    code = int(found.group(1))
    message = text[found.end() :]
    name_at = _NAME_AT_END.search(message)
    if name_at is None:
        return ChError(code, "UNKNOWN_EXCEPTION", message.strip())
    message = message[: name_at.start()].rstrip()
    if message.endswith("."):
        message = message[:-1]
    return ChError(code, name_at.group(1), message)


# --- statements --------------------------------------------------------------------------

_TOKEN = re.compile(
    rb"""
      (?P<ws>\s+)
    | (?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?\*/)
    | (?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<num>[0-9][0-9A-Za-z_.]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass
class Token:
    kind: str
    text: bytes
    start: int
    end: int
    depth: int

    @property
    def upper(self) -> str:
        return self.text.decode("latin-1").upper() if self.kind == "word" else ""


def tokens(text: bytes, start: int = 0) -> Iterator[Token]:
    """Significant tokens (no whitespace or comments) with their bracket depth."""
    depth = 0
    for match in _TOKEN.finditer(text, start):
        kind = match.lastgroup or "other"
        if kind in ("ws", "comment"):
            continue
        value = match.group()
        if kind == "other" and value in b")]}":
            depth = max(0, depth - 1)
        yield Token(kind, value, match.start(), match.end(), depth)
        if kind == "other" and value in b"([{":
            depth += 1


@dataclass
class Statement:
    kind: str  # first word, upper case ("(" for a parenthesised select)
    insert_head: bytes | None = None  # INSERT with inline data: the statement without FORMAT
    insert_format: str = ""
    data_start: int = 0
    result_format: str | None = None  # a FORMAT clause of a statement with a result
    multi_at: int | None = None  # where a second statement starts


def analyze(text: bytes) -> Statement:
    """Classify a statement the way ClickHouse's parser splits an INSERT from its data."""
    stream = tokens(text)
    first = next(stream, None)
    if first is None:
        return Statement(kind="")
    kind = first.upper or first.text.decode("latin-1")
    if kind == "INSERT":
        return _analyze_insert(text, stream)
    statement = Statement(kind=kind)
    previous: Token = first
    pending_format: Token | None = None
    format_name: str | None = None
    for token in stream:
        if statement.multi_at is not None:
            continue
        if previous.kind == "other" and previous.text == b";" and previous.depth == 0:
            statement.multi_at = token.start
            continue
        if pending_format is not None:
            pending_format = None
            if token.kind == "word":
                format_name = token.text.decode()
                previous = token
                continue
        if format_name is not None:
            # FORMAT <name> counts only where it ends the statement (or before SETTINGS).
            if token.upper == "SETTINGS" or token.text == b";":
                statement.result_format = format_name
            format_name = None
        if token.depth == 0 and token.upper == "FORMAT" and previous.text != b".":
            pending_format = token
        previous = token
    if format_name is not None:
        statement.result_format = format_name
    return statement


def _analyze_insert(text: bytes, stream: Iterator[Token]) -> Statement:
    statement = Statement(kind="INSERT")
    previous = ""
    for token in stream:
        word = token.upper
        is_keyword = (
            token.depth == 0 and word and previous not in ("INTO", "TABLE", "FUNCTION", ".")
        )
        if is_keyword and word in ("SELECT", "WITH", "INFILE"):
            return statement  # INSERT ... SELECT or FROM INFILE: an ordinary query
        if is_keyword and word == "VALUES":
            statement.insert_head = text[: token.start]
            statement.insert_format = "Values"
            statement.data_start = token.end
            return statement
        if is_keyword and word == "FORMAT":
            name = next(stream, None)
            if name is None or name.kind != "word":
                return statement
            statement.insert_head = text[: token.start]
            statement.insert_format = name.text.decode()
            # Data starts after spaces and one line break following the format name.
            position = name.end
            while position < len(text) and text[position] in b" \t\f":
                position += 1
            if text.startswith(b"\r", position):
                position += 1
            if text.startswith(b"\n", position):
                position += 1
            statement.data_start = position
            return statement
        previous = word or token.text.decode("latin-1")
    return statement


# --- compression -------------------------------------------------------------------------


def _lz4_frames() -> Any:
    return lz4.frame.LZ4FrameDecompressor()


def _zstd_frames() -> Any:
    return zstd.ZstdDecompressor()


def _gzip_members() -> Any:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)


# Incremental decompressors of one frame (member, stream) each, by Content-Encoding: each has
# decompress(data), eof and unused_data (where the next frame starts).
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "zstd": _zstd_frames,
    "lz4": _lz4_frames,
    "gzip": _gzip_members,
    "x-gzip": _gzip_members,
    "deflate": zlib.decompressobj,
}
_DECODER_ERRORS = {
    "zstd": (561, "ZSTD_DECODER_FAILED"),
    "lz4": (617, "LZ4_DECODER_FAILED"),
    "br": (369, "BROTLI_READ_FAILED"),
}


def decode_chunks(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Undo a request's Content-Encoding as the body arrives, chunk by chunk, as a server
    does (several concatenated frames/members allowed); br is decoded once read whole."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity", "none"):
        yield from chunks
        return
    new = _DECOMPRESSORS.get(encoding)
    if new is None:
        body = b"".join(chunks)
        if body:
            yield decode_body(body, encoding)
        return
    try:
        frame = None
        for chunk in chunks:
            while chunk:
                frame = frame or new()
                out = frame.decompress(chunk)
                if out:
                    yield out
                chunk = b""
                if frame.eof:  # the rest is the next frame
                    chunk, frame = frame.unused_data, None
        if frame is not None:
            raise ValueError(f"truncated {encoding} frame")
    except ChError:
        raise
    except Exception as exc:
        code, name = _DECODER_ERRORS.get(encoding, (354, "ZLIB_INFLATE_FAILED"))
        raise ChError(code, name, f"Cannot decompress the {encoding} request body: {exc}") from exc


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo a request's Content-Encoding (several concatenated frames/members allowed)."""
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity", "none"):
        return body
    if encoding in _DECOMPRESSORS:
        return b"".join(decode_chunks([body], encoding))
    if encoding == "br" and brotli is not None:
        try:
            return brotli.decompress(body)
        except Exception as exc:
            code, name = _DECODER_ERRORS["br"]
            raise ChError(code, name, f"Cannot decompress the br request body: {exc}") from exc
    raise ChError(
        48,
        "NOT_IMPLEMENTED",
        f"Unknown compression method '{encoding}' (chfixture supports zstd, lz4, gzip, deflate"
        f"{', br' if brotli is not None else ''})",
    )


def choose_encoding(accept: str) -> str | None:
    """ClickHouse's chooseHTTPCompressionMethod, limited to what we can produce."""
    for name in ("zstd", "br", "lz4", "gzip", "deflate"):
        if name in accept and (name != "br" or brotli is not None):
            return name
    return None


def encode_body(body: bytes, encoding: str, level: int) -> bytes:
    if encoding == "zstd":
        return zstd.compress(body)
    if encoding == "br":
        return brotli.compress(body)
    if encoding == "lz4":
        return lz4.frame.compress(body)
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=level)
    return zlib.compress(body, level)


# --- requests ----------------------------------------------------------------------------


@dataclass
class ExternalTable:
    name: str
    structure: str
    fmt: str
    data: bytes


@dataclass
class Call:
    """One query, as the HTTP layer hands it to the engine."""

    text: bytes
    statement: Statement
    method: str
    database: str | None = None
    default_format: str = "TabSeparated"
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    session_timeout: int = DEFAULT_SESSION_TIMEOUT
    session_check: bool = False
    close_session: bool = False
    external: list[ExternalTable] = field(default_factory=list)
    # An INSERT whose statement is all in the URL: its data, the body as it arrives
    data: Iterator[bytes] | None = None


@dataclass
class Outcome:
    body: bytes
    summary: dict[str, str]
    result_format: str | None = None
    timezone: str | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """Fields and files of a multipart/form-data body."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if found is None:
        raise ChError(36, "BAD_ARGUMENTS", "multipart/form-data without a boundary")
    delimiter = b"--" + found.group(1).encode("latin-1")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, _, content = part.partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        name = re.search(r'\bname="([^"]*)"', disposition)
        if name is None:
            continue
        if re.search(r'\bfilename="', disposition):
            files[name.group(1)] = content
        else:
            fields[name.group(1)] = content.decode("utf-8")
    return fields, files


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- the engine --------------------------------------------------------------------------


@dataclass
class _Handle:
    """A chDB connection with what we track of its state.

    In a session, URL settings stay SET after their request (the `overlay`) and are put
    back to the session's own values (`own`, read once from system.settings) only when a
    later request does not want them, or before a SET statement: clickhouse-connect sends
    the same settings with every request, and reading system.settings costs milliseconds.
    The session's own database is kept the same way.
    """

    conn: Any
    database: str = "default"  # what the connection uses now
    own_database: str = "default"  # the session's (changed by USE)
    overlay: dict[str, str] = field(default_factory=dict)
    own: dict[str, tuple[str, bool]] = field(default_factory=dict)  # value, changed
    ran_set: bool = False  # a SET ran on it, so ask the engine for its time zone


@dataclass
class _Session:
    session_id: str
    timeout: int
    handle: _Handle | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False

    def expired(self, now: float) -> bool:
        return not self.busy and now - self.last_used > self.timeout


class Engine:
    """chDB behind ClickHouse's HTTP semantics: requests run concurrently, each on its own
    connection (a session's on the session's, one at a time)."""

    def __init__(self, data_dir: Path, *, database_must_exist: bool = True) -> None:
        import chdb

        self._connect: Callable[[str], Any] = chdb.connect
        self.path = str(Path(data_dir).resolve())
        Path(self.path).mkdir(parents=True, exist_ok=True)
        self.database_must_exist = database_must_exist
        # Requests run concurrently, as on a server, each on its own chDB connection (a
        # session's requests one at a time on the session's). close() waits for them.
        self._requests = threading.Condition()
        self._in_flight = 0
        self._sessions_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._to_close: list[_Handle] = []
        # The root connection keeps the engine up between requests.
        self._root = self._connect(self.path)
        row = self._root.query(
            "SELECT version(), timezone(), toString(getSetting('enable_http_compression'))",
            "TabSeparated",
        )
        self.version, self.timezone, compression = row.bytes().decode().strip().split("\t")
        self.http_compression_default = _truthy(compression)
        limits = self._root.query(
            "SELECT getSetting('http_max_fields'), getSetting('http_max_field_name_size'),"
            " getSetting('http_max_field_value_size')",
            "TabSeparated",
        )
        self.form_limits = FormLimits(*map(int, limits.bytes().decode().split()))

    # sessions

    def _checkout(self, call: Call) -> _Session | None:
        if call.session_id is None:
            return None
        now = time.monotonic()
        with self._sessions_lock:
            session = self._sessions.get(call.session_id)
            if session is not None and session.expired(now):
                del self._sessions[call.session_id]
                if session.handle is not None:
                    self._to_close.append(session.handle)
                session = None
            if session is None:
                if call.session_check:
                    raise ChError(372, "SESSION_NOT_FOUND", f"Session {call.session_id} not found")
                session = _Session(call.session_id, call.session_timeout)
                self._sessions[call.session_id] = session
            elif session.busy:
                raise ChError(
                    373,
                    "SESSION_IS_LOCKED",
                    f"Session {call.session_id} is locked by a concurrent client",
                )
            session.busy = True
            session.timeout = call.session_timeout
            return session

    def _checkin(self, session: _Session, close: bool) -> None:
        with self._sessions_lock:
            session.busy = False
            session.last_used = time.monotonic()
            if close and self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]
                if session.handle is not None:
                    self._to_close.append(session.handle)
                    session.handle = None

    def _reap(self) -> None:
        now = time.monotonic()
        with self._sessions_lock:
            for session_id, session in list(self._sessions.items()):
                if session.expired(now):
                    del self._sessions[session_id]
                    if session.handle is not None:
                        self._to_close.append(session.handle)
            doomed, self._to_close = self._to_close, []
        for handle in doomed:
            self._close_handle(handle)

    @staticmethod
    def _close_handle(handle: _Handle) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            handle.conn.close()

    def close(self) -> None:
        with self._requests:
            self._requests.wait_for(lambda: not self._in_flight, timeout=CLOSE_WAIT_S)
            with self._sessions_lock:
                handles = [s.handle for s in self._sessions.values() if s.handle is not None]
                handles += self._to_close
                self._sessions.clear()
                self._to_close = []
            for handle in handles:
                self._close_handle(handle)
            self._root.close()

    # queries

    def execute(self, call: Call) -> Outcome:
        session = self._checkout(call)
        try:
            with self._in_request():
                self._reap()
                if session is None:
                    handle = _Handle(self._connect(self.path))
                    try:
                        return self._run(handle, call, in_session=False)
                    finally:
                        self._close_handle(handle)
                if session.handle is None:
                    session.handle = _Handle(self._connect(self.path))
                return self._run(session.handle, call, in_session=True)
        finally:
            if session is not None:
                self._checkin(session, close=call.close_session)

    @contextlib.contextmanager
    def _in_request(self) -> Iterator[None]:
        with self._requests:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._requests:
                self._in_flight -= 1
                self._requests.notify_all()

    def _query(self, handle: _Handle, sql: str | bytes, fmt: str = "TabSeparated") -> Any:
        try:
            return handle.conn.query(sql, fmt)
        except Exception as exc:
            raise engine_error(exc) from None

    def _use(self, handle: _Handle, database: str) -> None:
        try:
            self._query(handle, f"USE {_quote_identifier(database)}")
        except ChError as exc:
            if exc.name != "UNKNOWN_DATABASE" or self.database_must_exist:
                raise
            self._query(handle, f"CREATE DATABASE IF NOT EXISTS {_quote_identifier(database)}")
            self._query(handle, f"USE {_quote_identifier(database)}")
        handle.database = database

    def _current_database(self, handle: _Handle) -> str:
        return self._query(handle, "SELECT currentDatabase()").bytes().decode().strip()

    def _set(self, handle: _Handle, name: str, value: str) -> None:
        if not _IDENTIFIER.match(name):
            raise ChError(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
        self._query(handle, f"SET {name} = {_quote_string(value)}")

    def _set_overlay(self, handle: _Handle, settings: dict[str, str]) -> None:
        """Make the session connection run with its own settings plus `settings`."""
        for name in [name for name in handle.overlay if name not in settings]:
            self._put_back(handle, name)
        unknown = [name for name in settings if name not in handle.own and _IDENTIFIER.match(name)]
        if unknown:
            names = ", ".join(_quote_string(name) for name in unknown)
            rows = self._query(
                handle,
                f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})",
                "JSONEachRow",
            )
            for line in rows.bytes().splitlines():
                row = json.loads(line)
                handle.own[row["name"]] = (row["value"], bool(row["changed"]))
        for name, value in settings.items():
            own = handle.own.get(name)
            current = handle.overlay.get(name, own[0] if own is not None else None)
            if current == value:
                continue
            self._set(handle, name, value)  # an unknown setting fails here, as on a server
            handle.overlay[name] = value

    def _put_back(self, handle: _Handle, name: str) -> None:
        handle.overlay.pop(name, None)
        value, changed = handle.own.get(name, ("", False))
        if not changed:
            literal = "DEFAULT"
        elif len(value) >= 2 and value[0] == value[-1] == "'":
            literal = value  # system.settings shows some values as literals already
        else:
            literal = _quote_string(value)
        self._query(handle, f"SET {name} = {literal}")

    def _run(self, handle: _Handle, call: Call, *, in_session: bool) -> Outcome:
        statement = call.statement
        settings = dict(call.settings)
        if in_session:
            if call.database or handle.database != handle.own_database:
                wanted = call.database or handle.own_database
                if wanted != handle.database:
                    self._use(handle, wanted)
            if statement.kind == "SET":
                # The statement changes the session's own settings: run it on them alone.
                for name in list(handle.overlay):
                    self._put_back(handle, name)
                handle.own.clear()
            else:
                self._set_overlay(handle, settings)
        else:
            if call.database:
                self._use(handle, call.database)
            if call.method in ("GET", "HEAD") and "readonly" not in settings:
                settings["readonly"] = "2"  # last: a server makes idempotent requests read-only
            for name, value in settings.items():
                self._set(handle, name, value)
        created: list[str] = []
        try:
            for table in call.external:
                created.append(table.name)
                self._external_table(handle, table)
            outcome = self._statement(handle, call)
            if outcome.result_format is not None:
                outcome.timezone = self._timezone(handle, settings)
            if statement.kind == "SET":
                handle.ran_set = True
            if statement.kind == "USE":
                handle.database = handle.own_database = self._current_database(handle)
            return outcome
        finally:
            if in_session:
                for name in created:
                    with contextlib.suppress(ChError):
                        self._query(handle, f"DROP TEMPORARY TABLE IF EXISTS {name}")

    def _timezone(self, handle: _Handle, settings: dict[str, str]) -> str:
        if handle.ran_set:
            return self._query(handle, "SELECT timezone()").bytes().decode().strip()
        return settings.get("session_timezone") or self.timezone

    def _external_table(self, handle: _Handle, table: ExternalTable) -> None:
        self._query(
            handle,
            f"CREATE TEMPORARY TABLE {_quote_identifier(table.name)} ({table.structure}) "
            "ENGINE = Memory",
        )
        name = _quote_identifier(table.name)
        self._insert(handle, f"INSERT INTO {name}", table.fmt, [table.data])

    def _insert(
        self, handle: _Handle, sql: str, fmt: str, data: Iterable[bytes | memoryview]
    ) -> Any:
        try:
            with handle.conn.send_insert(sql, fmt) as inserter:
                for piece in data:
                    if len(piece):
                        inserter.append(piece)
                return inserter.finish()
        except ChError:  # the body's (a bad compressed stream, a client gone)
            raise
        except Exception as exc:
            raise engine_error(exc) from None

    def _statement(self, handle: _Handle, call: Call) -> Outcome:
        statement = call.statement
        started = time.monotonic()
        if statement.insert_head is not None and not (call.params):
            data = call.data or [memoryview(call.text)[statement.data_start :]]
            done = self._insert(
                handle,
                statement.insert_head.decode("utf-8"),
                statement.insert_format,
                data,
            )
            return Outcome(
                b"",
                _summary(
                    written_rows=done.rows_written,
                    written_bytes=done.bytes_written,
                    elapsed=time.monotonic() - started,
                ),
            )
        try:
            result = handle.conn.query(call.text, call.default_format, params=call.params or None)
        except Exception as exc:
            raise engine_error(exc) from None
        body = result.bytes() or b""
        produces_result = statement.kind in RESULT_KINDS
        return Outcome(
            body,
            _summary(
                read_rows=result.rows_read(),
                read_bytes=result.bytes_read(),
                written_rows=result.rows_written(),
                written_bytes=result.bytes_written(),
                result_bytes=len(body) if produces_result else 0,
                elapsed=result.elapsed(),
            ),
            result_format=(statement.result_format or call.default_format)
            if produces_result
            else None,
        )


def _summary(
    *,
    read_rows: int = 0,
    read_bytes: int = 0,
    written_rows: int = 0,
    written_bytes: int = 0,
    result_bytes: int = 0,
    elapsed: float = 0.0,
) -> dict[str, str]:
    return {
        "read_rows": str(read_rows),
        "read_bytes": str(read_bytes),
        "written_rows": str(written_rows),
        "written_bytes": str(written_bytes),
        "total_rows_to_read": str(read_rows),
        "result_rows": "0",
        "result_bytes": str(result_bytes),
        "elapsed_ns": str(int(elapsed * 1_000_000_000)),
    }


# --- the HTTP layer ----------------------------------------------------------------------

Headers = list[tuple[str, str]]


class RequestBody:
    """A request body, read as it arrives: whole (read) or chunk by chunk (chunks), once.
    `receive` returns the next chunk and whether more follow."""

    def __init__(self, receive: Callable[[], tuple[bytes, bool]]) -> None:
        self._receive = receive
        self._more = True

    @classmethod
    def of(cls, body: bytes) -> RequestBody:
        return cls(lambda: (body, False))

    def chunks(self) -> Iterator[bytes]:
        while self._more:
            chunk, self._more = self._receive()
            if chunk:
                yield chunk

    def read(self) -> bytes:
        return b"".join(self.chunks())


class Service:
    """ClickHouse's HTTP request handling over an Engine: (method, path, ...) -> response."""

    def __init__(self, engine: Engine, user: str = "default", password: str = "") -> None:
        self.engine = engine
        self.user = user
        self.password = password

    def handle(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: dict[str, str],
        body: bytes | RequestBody,
    ) -> tuple[int, Headers, bytes]:
        params = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        if isinstance(body, bytes):
            body = RequestBody.of(body)
        if method in ("GET", "HEAD"):  # small if any; whether there is one decides /ping
            body = RequestBody.of(body.read())
        query_id = params.get("query_id") or str(uuid.uuid4())
        common: Headers = [
            ("X-ClickHouse-Server-Display-Name", DISPLAY_NAME),
            ("Keep-Alive", "timeout=30"),
        ]
        if path == "/ping" or (
            path == "/" and method in ("GET", "HEAD") and "query" not in params and not body.read()
        ):
            return 200, [*common, ("Content-Type", "text/html; charset=UTF-8")], b"Ok.\n"
        common.append(("X-ClickHouse-Query-Id", _header_value(query_id)))
        try:
            self.engine.form_limits.check_url(query_string)
            self._authenticate(headers, params)
            call = self._call(method, params, headers, body)
            outcome = self.engine.execute(call)
        except ChError as exc:
            return self._error(exc, common)
        except Exception as exc:  # a fixture bug: still answer as the server would
            return self._error(
                ChError(1001, "STD_EXCEPTION", f"chfixture: {type(exc).__name__}: {exc}"), common
            )
        response: Headers = [*common]
        if outcome.result_format is not None:
            response += [
                ("Content-Type", _content_type(outcome.result_format)),
                ("X-ClickHouse-Format", outcome.result_format),
                ("X-ClickHouse-Timezone", outcome.timezone or self.engine.timezone),
            ]
        else:
            response.append(("Content-Type", _TEXT_PLAIN))
        summary = json.dumps(outcome.summary, separators=(",", ":"))
        response.append(("X-ClickHouse-Summary", summary))
        content = outcome.body
        enabled = call.settings.get("enable_http_compression")
        if content and (
            _truthy(enabled) if enabled is not None else self.engine.http_compression_default
        ):
            encoding = choose_encoding(headers.get("accept-encoding", "").lower())
            if encoding is not None:
                level = int(call.settings.get("http_zlib_compression_level") or 3)
                content = encode_body(content, encoding, level)
                response.append(("Content-Encoding", encoding))
        return 200, response, content

    def _error(self, exc: ChError, common: Headers) -> tuple[int, Headers, bytes]:
        headers = [
            *common,
            ("Content-Type", _TEXT_PLAIN),
            ("X-ClickHouse-Exception-Code", str(exc.code)),
        ]
        return exc.status, headers, exc.body(self.engine.version)

    def _authenticate(self, headers: dict[str, str], params: dict[str, str]) -> None:
        def failed(message: str) -> ChError:
            return ChError(516, "AUTHENTICATION_FAILED", message)

        header_user = headers.get("x-clickhouse-user", "")
        header_key = headers.get("x-clickhouse-key", "")
        authorization = headers.get("authorization", "")
        in_params = "user" in params or "password" in params
        if header_user or header_key:
            if authorization:
                raise failed(
                    "Invalid authentication: it is not allowed to use X-ClickHouse HTTP "
                    "headers and Authorization HTTP header simultaneously"
                )
            if in_params:
                raise failed(
                    "Invalid authentication: it is not allowed to use X-ClickHouse HTTP "
                    "headers and authentication via parameters simultaneously"
                )
            if not header_user:
                raise failed("Got an empty user name from X-ClickHouse HTTP headers")
            user, password = header_user, header_key
        elif authorization:
            if in_params:
                raise failed(
                    "Invalid authentication: it is not allowed to use Authorization HTTP "
                    "header and authentication via parameters simultaneously"
                )
            scheme, _, info = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise failed(
                    f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported"
                )
            try:
                decoded = base64.b64decode(info.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise failed("Invalid authentication: bad Basic credentials") from None
            user, _, password = decoded.partition(":")
            if not user:
                raise failed("Got an empty user name from Authorization HTTP header")
        else:
            user = params.get("user", "default")
            password = params.get("password", "")
        if user != self.user or password != self.password:
            raise failed(
                f"{user}: Authentication failed: password is incorrect, or there is no user "
                "with such name"
            )

    def _call(
        self, method: str, params: dict[str, str], headers: dict[str, str], body: RequestBody
    ) -> Call:
        if _truthy(params.get("compress")) or _truthy(params.get("decompress")):
            raise ChError(
                48,
                "NOT_IMPLEMENTED",
                "chfixture does not implement ClickHouse's native block compression "
                "(compress/decompress parameters); use HTTP Content-Encoding",
            )
        content_type = headers.get("content-type", "")
        files: dict[str, bytes] = {}
        data = None
        if content_type.lower().startswith("multipart/form-data"):
            fields, files = parse_multipart(body.read(), content_type)
            self.engine.form_limits.check(
                [(len(name.encode()), len(value.encode())) for name, value in fields.items()]
                + [(len(name.encode()), 0) for name in files]  # files have no value limit
            )
            params = {**params, **fields}
            text = params.get("query", "").encode()
        else:
            encoding = headers.get("content-encoding", "")
            query = params.get("query", "").encode()
            head = query + b"\n"
            inline = analyze(head) if query else None
            if (
                inline is not None
                and inline.insert_head is not None
                and inline.data_start == len(head)
                and not any(name.startswith("param_") for name in params)
            ):
                # INSERT ... FORMAT in the URL, the data in the body: streamed into the insert
                # as it arrives and is decompressed, as a server does (no copy of it whole).
                text, data = head, decode_chunks(body.chunks(), encoding)
            else:
                raw = decode_body(body.read(), encoding)
                text = query + b"\n" + raw if query and raw else query or raw
        if not text.strip():
            raise ChError(62, "SYNTAX_ERROR", "Empty query")
        statement = analyze(text)
        if statement.multi_at is not None and statement.insert_head is None:
            rest = text[statement.multi_at : statement.multi_at + 40].decode("utf-8", "replace")
            raise ChError(
                62,
                "SYNTAX_ERROR",
                "Syntax error (Multi-statements are not allowed): failed at position "
                f"{statement.multi_at + 1}: {rest}",
            )
        default_format = (
            headers.get("x-clickhouse-format") or params.get("default_format") or "TabSeparated"
        )
        if default_format.lower() in CHDB_ONLY_FORMATS:
            raise ChError(73, "UNKNOWN_FORMAT", f"Unknown format {default_format}")
        external: list[ExternalTable] = []
        external_params: set[str] = set()
        for name, data in files.items():
            if not _IDENTIFIER.match(name):
                raise ChError(36, "BAD_ARGUMENTS", f"Bad external table name '{name}'")
            keys = (f"{name}_structure", f"{name}_types", f"{name}_format")
            external_params.update(keys)
            structure = params.get(keys[0], "")
            if not structure and params.get(keys[1]):
                types = _split_top_level(params[keys[1]])
                structure = ", ".join(f"_{i} {kind}" for i, kind in enumerate(types, 1))
            if not structure:
                raise ChError(
                    36,
                    "BAD_ARGUMENTS",
                    f"Neither structure nor types have not been provided for external table "
                    f"{name}. Use fields {name}_structure or {name}_types to do so.",
                )
            external.append(ExternalTable(name, structure, params.get(keys[2]) or "TSV", data))
        session_timeout = DEFAULT_SESSION_TIMEOUT
        if params.get("session_timeout"):
            raw = params["session_timeout"]
            if not raw.isdigit():
                raise ChError(374, "INVALID_SESSION_TIMEOUT", f"Invalid session timeout: '{raw}'")
            session_timeout = int(raw)
            if session_timeout > MAX_SESSION_TIMEOUT:
                raise ChError(
                    374,
                    "INVALID_SESSION_TIMEOUT",
                    f"Session timeout '{raw}' is larger than max_session_timeout: "
                    f"{MAX_SESSION_TIMEOUT}",
                )
        settings = {
            name: value
            for name, value in params.items()
            if name not in TRANSPORT_PARAMS
            and not name.startswith("param_")
            and name not in external_params
        }
        return Call(
            text=text,
            statement=statement,
            method=method,
            database=headers.get("x-clickhouse-database") or params.get("database") or None,
            default_format=default_format,
            settings=settings,
            params={k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")},
            session_id=params.get("session_id") or None,
            session_timeout=session_timeout,
            session_check=_truthy(params.get("session_check")),
            close_session=_truthy(params.get("close_session")),
            external=external,
            data=data,
        )


def _content_type(fmt: str) -> str:
    for prefix, content_type in _CONTENT_TYPES:
        if fmt.startswith(prefix):
            return content_type
    return "application/octet-stream"


def _header_value(value: str) -> str:
    return value.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace("\n", "")


class Asgi:
    """The Service as a bare ASGI app (uvicorn runs it); chDB work runs in a thread."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import anyio.from_thread
        import anyio.to_thread

        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await anyio.to_thread.run_sync(self.service.engine.close)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }

        async def next_chunk() -> tuple[bytes, bool]:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ChError(210, "NETWORK_ERROR", "the client closed the connection")
            return message.get("body", b""), bool(message.get("more_body"))

        def handle() -> tuple[int, Headers, bytes]:
            # The worker thread reads the body from the event loop as it needs it (uvicorn
            # stops reading the socket while a chunk waits: the body is never all in memory).
            body = RequestBody(lambda: anyio.from_thread.run(next_chunk))
            try:
                return self.service.handle(
                    scope["method"], scope["path"], scope["query_string"], headers, body
                )
            finally:
                for _ in body.chunks():  # what the answer did not need, so the connection
                    pass  # can serve its next request

        try:
            status, response_headers, content = await anyio.to_thread.run_sync(handle)
        except ChError:  # the client is gone
            return
        response_headers = [*response_headers, ("Content-Length", str(len(content)))]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else content}
        )


def _exit_with(parent_pid: int) -> None:
    """SIGTERM ourselves (a clean uvicorn shutdown) once the process that started us is gone,
    so a killed test run leaves no server behind."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="chfixture-parent-watch", daemon=True).start()


def serve(
    port: int,
    data_dir: Path,
    user: str,
    password: str,
    *,
    database_must_exist: bool,
    parent_pid: int | None = None,
) -> None:
    import uvicorn

    engine = Engine(data_dir, database_must_exist=database_must_exist)
    if parent_pid is not None:
        _exit_with(parent_pid)
    app = Asgi(Service(engine, user, password))
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
        # h11, not httptools: httptools refuses a URL over 64 KiB, a server takes up to
        # http_max_uri_size (1 MiB); the request line and headers must fit in this buffer.
        http="h11",
        h11_max_incomplete_event_size=MAX_URI_SIZE + 64 * 1024,
    )


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="TEST FIXTURE (not a ClickHouse server): ClickHouse's HTTP interface on "
        "127.0.0.1, backed by chDB."
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--user", default="default")
    parser.add_argument("--password", default=os.environ.get("CHFIXTURE_PASSWORD", ""))
    parser.add_argument(
        "--database-must-exist",
        action="store_true",
        help="fail with 81 UNKNOWN_DATABASE, as a server does, instead of creating the "
        "database a request names",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="shut down when this process (the one that started us) is gone",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    serve(
        args.port,
        args.data_dir,
        args.user,
        args.password,
        database_must_exist=args.database_must_exist,
        parent_pid=args.parent_pid,
    )


# --- starting it from tests --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        return response.status == 200 and response.read() == b"Ok.\n"
    except OSError:
        return False
    finally:
        connection.close()


@dataclass
class Fixture:
    """A running fixture process. Stop it with .stop() or use it as a context manager."""

    host: str
    port: int
    user: str
    password: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return (
            f"http://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/"
        )

    def client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Arguments for clickhouse_connect.get_client against this fixture."""
        return {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "password": self.password,
            "interface": "http",
            **overrides,
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (uvicorn shuts down and chDB closes), SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        else:
            self.process.wait()

    def __enter__(self) -> Fixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fixture(
    tmp_path: Path,
    user: str = "default",
    password: str = "",
    *,
    data_dir: Path | None = None,
    database_must_exist: bool = True,
    timeout: float = 60.0,
) -> Fixture:
    """Start the fixture in a subprocess on a free loopback port; wait for GET /ping."""
    folder = Path(tmp_path) / "chfixture"
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or folder / "data"
    failure = ""
    for attempt in range(3):
        port = _free_port()
        log_path = folder / f"server-{port}.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--user",
            user,
            "--parent-pid",
            str(os.getpid()),
        ]
        if database_must_exist:
            command.append("--database-must-exist")
        env = {**os.environ, "CHFIXTURE_PASSWORD": password}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        fixture = Fixture(HOST, port, user, password, Path(data_dir), log_path, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _ping(port, timeout=1.0):
                return fixture
            time.sleep(0.05)
        fixture.stop()
        failure = fixture.log()
        if "address already in use" not in failure.lower() or attempt == 2:
            break
    raise RuntimeError(f"the chfixture server did not start:\n{failure}")


if __name__ == "__main__":
    main()
