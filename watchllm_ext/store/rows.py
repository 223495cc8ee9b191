"""Validated events -> one Arrow table per ClickHouse table (the columnar insert path).

Column names and types here mirror clickhouse/migrations; tests insert every event type
and read each column back, so a drift between the two fails loudly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
