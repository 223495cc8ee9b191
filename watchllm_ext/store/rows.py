"""Validated events -> what the store takes: the events' JSON for the input tables (the
store sink's path), or one Arrow table per ClickHouse table (imports, tests, the reference).

JSON (input_json): the contract's keys, one object per event, inserted with FORMAT
JSONEachRow into the Null-engine input tables of migration 0010, whose materialized views
build the rows in ClickHouse's own threads; Python only encodes the batch (one call) and
rewrites the few events whose JSON alone would be read differently (see _needs_fixing).

Arrow (tables_for): column names and types here mirror clickhouse/migrations; tests insert
every event type both ways and compare each column, so a drift between them fails loudly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from pydantic import BaseModel
from pydantic_core import to_json

from ..schema import BaseEvent

_TS = pa.timestamp("ms", tz="UTC")
_STR = pa.string()
_F64 = pa.float64()
_U32 = pa.uint32()

EVENTS_SCHEMA = pa.schema(
    [
        ("project_id", _STR),
        ("event_id", _STR),
        ("event_type", _STR),
        ("run_id", _STR),
        ("timestamp", _TS),
        ("parent_event_id", _STR),
        ("user_id", _STR),
        ("session_id", _STR),
        ("tags", pa.list_(_STR)),
        ("release", _STR),
        ("env", _STR),
        ("client_hostname", _STR),
        ("client_sdk_version", _STR),
        ("client_platform", _STR),
        ("metadata", _STR),
        ("prompt", _STR),
        ("model", _STR),
        ("provider", _STR),
        ("tokens_input", _U32),
        ("tokens_output", _U32),
        ("cost_estimate_usd", _F64),
        ("cost_source", _STR),
        ("response", _STR),
        ("response_metadata", _STR),
        ("tool_call_count", pa.uint16()),
        ("status", _STR),
        ("latency_ms", _F64),
        ("error_message", _STR),
        ("tool_name", _STR),
        ("tool_input", _STR),
        ("tool_output", _STR),
        ("step_number", _U32),
        ("step_name", _STR),
        ("reasoning", _STR),
        ("action", _STR),
        ("observation", _STR),
        ("error_type", _STR),
        ("stack_trace", _STR),
        ("assertion_name", _STR),
        ("expected", _STR),
        ("actual", _STR),
        ("severity", _STR),
        ("detection_method", _STR),
        ("confidence", _F64),
        ("claim", _STR),
        ("evidence", _STR),
        ("threshold_usd", _F64),
        ("actual_usd", _F64),
        ("alert_window", _STR),
        ("metric", _STR),
        ("metric_threshold", _F64),
        ("metric_actual", _F64),
        ("value_format", pa.uint8()),
        ("ingested_at", _TS),
    ]
)

TOOL_CALLS_SCHEMA = pa.schema(
    [
        ("project_id", _STR),
        ("event_id", _STR),
        ("call_index", pa.uint16()),
        ("source", _STR),
        ("run_id", _STR),
        ("timestamp", _TS),
        ("tool_call_id", _STR),
        ("tool_name", _STR),
        ("tool_input", _STR),
        ("tool_output", _STR),
        ("status", _STR),
        ("latency_ms", _F64),
        ("error_message", _STR),
        ("ingested_at", _TS),
    ]
)

AGENT_STEPS_SCHEMA = pa.schema(
    [
        ("project_id", _STR),
        ("event_id", _STR),
        ("run_id", _STR),
        ("timestamp", _TS),
        ("step_number", _U32),
        ("step_name", _STR),
        ("reasoning", _STR),
        ("action", _STR),
        ("observation", _STR),
        ("status", _STR),
        ("latency_ms", _F64),
        ("ingested_at", _TS),
    ]
)


# How a row's free-form fields are written (the events' value_format, migration 0008). Rows
# stored before it (0) kept a string sent in a JSON field as it was, so '{"a": 1}' sent as a
# string could not be told from the object; readers (analytics/routes.py) decode by this.
FORMAT_LEGACY = 0
FORMAT_JSON = 1  # JSON fields as _json() writes them; prompt is text
FORMAT_JSON_MESSAGES = 2  # as FORMAT_JSON, and prompt is a list of chat messages as JSON


def _json(value: Any) -> str | None:
    """A free-form field as text that reads back exactly (read_json): a string that would
    parse as JSON ('{"a": 1}', '123') is stored as a JSON string, any other string as it is
    (readable in the table, as before), any other value as JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value  # not JSON: read_json cannot mistake it for anything else
        except RecursionError:
            pass  # nested too deep to tell here: stored as a JSON string, which is flat
    return to_json(value).decode()


def read_json(text: Any) -> Any:
    """The value _json() stored: what parses is JSON, the rest is a string as it was.
    Also how rows from before value_format read (analytics/routes.py): there a string that
    parses was stored as it was, so it reads parsed, as it always did."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _prompt_text(value: Any) -> str | None:
    """A text prompt as it is (search and previews read it); chat messages as JSON."""
    if value is None or isinstance(value, str):
        return value
    return _json([m.model_dump(exclude_none=True) for m in value])


def _value_format(d: dict[str, Any]) -> int:
    prompt = d.get("prompt")
    return FORMAT_JSON if prompt is None or isinstance(prompt, str) else FORMAT_JSON_MESSAGES


def _client(attr: str) -> Any:
    def get(d: dict[str, Any]) -> Any:
        client = d.get("client")
        return getattr(client, attr) if client is not None else None

    return get


# Columns that are not one event field of the same name, as functions of the event's
# fields. Every other column is `fields.get(column)` (None where the type has no such field).
_DERIVED: dict[str, Any] = {
    "client_hostname": _client("hostname"),
    "client_sdk_version": _client("sdk_version"),
    "client_platform": _client("platform"),
    "metadata": lambda d: _json(d["metadata"]),
    "prompt": lambda d: _prompt_text(d.get("prompt")),
    "tool_call_count": lambda d: len(d.get("tool_calls") or ()),
    "response_metadata": lambda d: _json(d.get("response_metadata")),
    "tool_input": lambda d: _json(d.get("tool_input")),
    "tool_output": lambda d: _json(d.get("tool_output")),
    "expected": lambda d: _json(d.get("expected")),
    # `actual`: JSON of an assertion_failed, a number of a performance_alert.
    "actual": lambda d: _json(d.get("actual")) if d["event_type"] == "assertion_failed" else None,
    "metric_actual": lambda d: d.get("actual") if d["event_type"] == "performance_alert" else None,
    "alert_window": lambda d: d.get("window"),
    "metric_threshold": lambda d: d.get("threshold"),
    "value_format": _value_format,
}


def _events_table(fields: list[dict[str, Any]], ingested_at: datetime) -> pa.Table:
    """Column by column: one list comprehension per column is several times faster than
    building a row per event."""
    arrays = []
    for column in EVENTS_SCHEMA:
        name = column.name
        if name == "ingested_at":
            values: list[Any] = [ingested_at] * len(fields)
        elif name in _DERIVED:
            derive = _DERIVED[name]
            values = [derive(d) for d in fields]
        else:
            values = [d.get(name) for d in fields]
        arrays.append(pa.array(values, type=column.type))
    return pa.Table.from_arrays(arrays, schema=EVENTS_SCHEMA)


def tool_call_rows(event: BaseEvent, ingested_at: datetime) -> list[dict[str, Any]]:
    data = event.__dict__
    if data["event_type"] == "prompt_call" and not data["tool_calls"]:
        return []  # the common case: skip building anything
    base = {
        "project_id": event.project_id,
        "event_id": event.event_id,
        "run_id": event.run_id,
        "timestamp": event.timestamp,
        "ingested_at": ingested_at,
    }
    if data["event_type"] == "tool_call":
        return [
            {
                **base,
                "call_index": 0,
                "source": "tool_call",
                "tool_call_id": None,
                "tool_name": data["tool_name"],
                "tool_input": _json(data["tool_input"]),
                "tool_output": _json(data["tool_output"]),
                "status": data["status"],
                "latency_ms": data["latency_ms"],
                "error_message": data["error_message"],
            }
        ]
    if data["event_type"] == "prompt_call":
        return [
            {
                **base,
                "call_index": index,
                "source": "prompt_call",
                "tool_call_id": item.id,
                "tool_name": item.tool_name,
                "tool_input": _json(item.tool_input),
                "tool_output": _json(item.tool_output),
                "status": item.status,
                "latency_ms": item.latency_ms,
                "error_message": item.error_message,
            }
            for index, item in enumerate(data["tool_calls"])
        ]
    return []


def agent_step_row(event: BaseEvent, ingested_at: datetime) -> dict[str, Any]:
    data = event.__dict__
    return {
        "project_id": event.project_id,
        "event_id": event.event_id,
        "run_id": event.run_id,
        "timestamp": event.timestamp,
        "step_number": data["step_number"],
        "step_name": data["step_name"],
        "reasoning": data["reasoning"],
        "action": data["action"],
        "observation": data["observation"],
        "status": data["status"],
        "latency_ms": data["latency_ms"],
        "ingested_at": ingested_at,
    }


def tables_for(events: Sequence[BaseModel]) -> dict[str, pa.Table]:
    """The Arrow tables to insert for these events, keyed by ClickHouse table name.

    Tables with no rows are left out.
    """
    ingested_at = datetime.now(UTC)
    fields = [event.__dict__ for event in events]
    tool_rows: list[dict[str, Any]] = []
    step_rows = []
    for event, data in zip(events, fields, strict=True):
        assert isinstance(event, BaseEvent)
        event_type = data["event_type"]
        if event_type in ("prompt_call", "tool_call"):
            tool_rows.extend(tool_call_rows(event, ingested_at))
        elif event_type == "agent_step":
            step_rows.append(agent_step_row(event, ingested_at))
    tables = {"events": _events_table(fields, ingested_at)}
    if tool_rows:
        tables["tool_calls"] = pa.Table.from_pylist(tool_rows, schema=TOOL_CALLS_SCHEMA)
    if step_rows:
        tables["agent_steps"] = pa.Table.from_pylist(step_rows, schema=AGENT_STEPS_SCHEMA)
    return tables


# --- JSON for the input tables (migration 0010) -----------------------------------------------

# How ClickHouse reads the events' JSON into the input tables. Objects, arrays, numbers and
# booleans in a String column are read as their JSON text, exactly as written: free-form
# fields (metadata, tool_input, ...) and a prompt of chat messages are stored as the encoder
# wrote them, with no work in Python. A key the tables do not know is skipped, as the Arrow
# path ignores such attributes; a left-out key (None fields are left out) takes the default.
JSON_INPUT_SETTINGS: dict[str, Any] = {
    "input_format_json_read_objects_as_strings": 1,
    "input_format_json_read_arrays_as_strings": 1,
    "input_format_json_read_numbers_as_strings": 1,
    "input_format_json_read_bools_as_strings": 1,
    "input_format_json_named_tuples_as_objects": 1,
    "input_format_json_defaults_for_missing_elements_in_named_tuple": 1,
    "input_format_defaults_for_omitted_fields": 1,
    "input_format_null_as_default": 1,
    "input_format_skip_unknown_fields": 1,
    "date_time_input_format": "best_effort",
    # Not to run the ReplacingMergeTree merge over each inserted block (to collapse rows of
    # one key within it): that pass was half of chDB's CPU for a 50,000-event insert. The
    # sink never sends one key twice in an insert (first copy wins), and every read
    # collapses copies anyway (FINAL, LIMIT 1 BY), as it does those of two inserts.
    "optimize_on_insert": 0,
}
# The input tables: parts (tool calls, agent steps) first, events second, so that once an id
# is in event_ids every row of its event is stored (store_sink.py).
EVENTS_INPUT = "events_input"
PARTS_INPUT = "event_parts_input"
_HAS_PARTS = frozenset({"tool_call", "agent_step"})
# Free-form fields per event type whose value may be any JSON, a string included.
_FREE_FORM = {
    "tool_call": ("tool_input", "tool_output"),
    "assertion_failed": ("expected", "actual"),
}
_ITEM_FREE_FORM = ("tool_input", "tool_output")


def encode_events(events: Sequence[Any]) -> bytes:
    """The events as one JSON array, each as pydantic's dump_json(exclude_none=True) writes
    it: the spool's encoder (fast_validate.encode_events, msgspec; structs and pydantic
    models alike), so the store gets the JSON the spool holds."""
    from ..ingest.fast_validate import encode_events as encode

    return encode(events)


# What a JSON text can start with, after JSON whitespace (json.loads accepts NaN, Infinity).
_MAY_BE_JSON = re.compile(r'[ \t\n\r]*[\[{"\-0-9tfnNI]')


def _stored_differs(value: Any) -> bool:
    """Whether ClickHouse, reading `value`'s JSON into a String column, would store other
    text than _json(value): only a string that parses as JSON (stored as a JSON string).
    Most text cannot even start a JSON value: no json.loads is tried on it."""
    if not isinstance(value, str) or not _MAY_BE_JSON.match(value):
        return False
    return _json(value) is not value


def _needs_fixing(event: Any) -> bool:
    """Whether the event's JSON as encoded would be read differently from tables_for():
    a free-form string that parses as JSON, or a text prompt that starts with '[' (the view
    takes a prompt starting with '[' for chat messages). A few attribute reads an event."""
    event_type = event.event_type
    if event_type == "prompt_call":
        prompt = event.prompt
        if isinstance(prompt, str) and prompt.startswith("["):
            return True
        for item in event.tool_calls:
            if _stored_differs(item.tool_input) or _stored_differs(item.tool_output):
                return True
        return False
    fields = _FREE_FORM.get(event_type)
    if fields is None:
        return False
    return any(_stored_differs(getattr(event, name)) for name in fields)


def _fixed(event: Any, encode: Any) -> dict[str, Any]:
    """The event's JSON object with its fields in their stored form (rare: see _needs_fixing)."""
    data = json.loads(encode([event]))[0]
    if data["event_type"] == "prompt_call":
        if isinstance(data.get("prompt"), str):
            data["value_format"] = FORMAT_JSON
        for item in data.get("tool_calls") or ():
            for name in _ITEM_FREE_FORM:
                if isinstance(item.get(name), str):
                    item[name] = _json(item[name])
    for name in _FREE_FORM.get(data["event_type"], ()):
        if isinstance(data.get(name), str):
            data[name] = _json(data[name])
    return data


def _has_parts(event: Any) -> bool:
    event_type = event.event_type
    return event_type in _HAS_PARTS or (event_type == "prompt_call" and bool(event.tool_calls))


# A body for insert_json: JSON text, whole or in pieces sent one after the other (a list, or
# SpoolPieces, which makes each piece as the store asks for it).
Body = bytes | Iterable[bytes | memoryview]


# Records under OWN_PIECE_BYTES are joined into pieces of about PIECE_BYTES (spool_pieces).
PIECE_BYTES = 1 << 20
OWN_PIECE_BYTES = 64 << 10


class SpoolPieces:
    """The pieces of spool_pieces: each iteration makes them anew, one at a time, so a store
    that reads the body twice (a retry, a wrapper counting its bytes) gets all of it again."""

    def __init__(self, payloads: Sequence[bytes | memoryview]) -> None:
        self.payloads = payloads

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return _pieces(self.payloads)


def spool_pieces(events: Sequence[Any]) -> SpoolPieces | None:
    """The JSON array of the writer's batch (writer.EventBatch), made of its spool records'
    own bytes (each a JSON array of its events); None for any other list.

    A store takes the body piece by piece, with a Python call (and, in chDB's insert stream,
    a copy) per piece: a piece per record cost ~5 us a record, 30 ms of the GIL a second for
    single events. So small records are joined into pieces of about PIECE_BYTES (one copy
    each); a large one (a batch request's) goes as a view of its bytes, as is. One bytes
    object for the whole batch would cost a fresh allocation of its full size (~1.5 us an
    event for 50,000).

    The pieces are made one at a time, as the store iterates over them (SpoolPieces): a
    piece is let go of before the next is joined, whose memory it then reuses. A list of
    them all, alive until the insert ended, took new memory for each, and its page faults
    made joining a flush of 6,000 single events 6-15 ms on the GIL instead of ~3."""
    payloads = getattr(events, "payloads", None)
    if payloads is None:
        return None
    return SpoolPieces(payloads)


def _pieces(payloads: Sequence[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    group: list[bytes | memoryview] = [b"["]
    size = 1
    first = True
    for payload in payloads:
        if len(payload) <= 2:  # "[]" holds no event
            continue
        if not first:
            group.append(b",")
        first = False
        inner = memoryview(payload)[1:-1]
        if len(payload) >= OWN_PIECE_BYTES:
            yield b"".join(group)  # never empty: "[" or a comma at least
            yield inner
            group, size = [], 0
            continue
        group.append(inner)
        size += len(payload)
        if size >= PIECE_BYTES:
            yield b"".join(group)
            group, size = [], 0
    group.append(b"]")
    yield b"".join(group)


class OneArray:
    """JSON arrays sent one after the other as one array (an insert in parts, a store's
    open_insert): `pieces(body)` is what to send for each body (a JSON array, whole or in
    pieces: "[" opens the first piece, "]" ends the last), `end()` what ends the array."""

    def __init__(self) -> None:
        self.opened = False  # "[" is sent
        self.sent_bytes = 0  # of the bodies' events

    def pieces(self, body: Body) -> list[bytes | memoryview]:
        listed = [memoryview(piece) for piece in ([body] if isinstance(body, bytes) else body)]
        if not listed or listed[0][:1] != b"[" or listed[-1][-1:] != b"]":
            raise ValueError("an insert's body is not one JSON array")
        listed[0] = listed[0][1:]
        listed[-1] = listed[-1][:-1]
        inner = [piece for piece in listed if len(piece)]
        if not inner:
            return []  # "[]": no event
        self.sent_bytes += sum(len(piece) for piece in inner)
        opening = b"," if self.opened else b"["
        self.opened = True
        return [opening, *inner]

    def end(self) -> bytes | None:
        """The closing bracket, or None when nothing was sent (no statement to end)."""
        return b"]" if self.opened else None


def input_json(
    events: Sequence[Any], encode: Callable[[Sequence[Any]], bytes] = encode_events
) -> dict[str, Body]:
    """The bodies to insert for these events, keyed by input table (PARTS_INPUT first when
    present): each a JSON array of the events' objects, which JSONEachRow reads as rows.

    The writer's own batch goes as its spool records' bytes (spool_pieces: no encoding,
    one copy) unless an event in it needs rewriting (rare); any other list is encoded by
    `encode`."""
    fixes = [i for i, event in enumerate(events) if _needs_fixing(event)]
    parts = [event for event in events if _has_parts(event)]
    bodies: dict[str, Body] = {}
    if not fixes:
        if parts:
            bodies[PARTS_INPUT] = encode(parts)
        bodies[EVENTS_INPUT] = spool_pieces(events) or encode(events)
        return bodies
    fixed = {i: _fixed(events[i], encode) for i in fixes}
    rows: list[Any] = [fixed.get(i, event) for i, event in enumerate(events)]
    if parts:
        pairs = zip(rows, events, strict=True)
        bodies[PARTS_INPUT] = encode([row for row, event in pairs if _has_parts(event)])
    bodies[EVENTS_INPUT] = encode(rows)
    return bodies
