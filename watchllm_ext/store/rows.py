"""Validated events -> one Arrow table per ClickHouse table (the columnar insert path).

Column names and types here mirror clickhouse/migrations; tests insert every event type
and read each column back, so a drift between the two fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
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

# Fields whose value is free-form JSON: stored as JSON text.
_JSON_FIELDS = frozenset(
    {"tool_input", "tool_output", "expected", "actual", "response_metadata", "metadata"}
)
# Event fields stored under another column name (performance_alert's `actual` is handled
# apart: assertion_failed has an `actual` too, stored as JSON text).
_RENAMED = {
    "window": "alert_window",
    "threshold": "metric_threshold",
}


def _json(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return to_json(value).decode()


_EVENT_COLUMNS = EVENTS_SCHEMA.names
_COLUMN_INDEX = {name: i for i, name in enumerate(_EVENT_COLUMNS)}
_RAW, _JSON, _PROMPT, _COUNT, _CLIENT = range(5)


@cache
def _plan(model: type[BaseEvent]) -> tuple[tuple[int, str, int], ...]:
    """For one event model: (column index, field name, how to convert) per stored field.

    Worked out once per event type, so each event is one pass over its fields.
    """
    event_type = model.model_fields["event_type"].annotation.__args__[0]  # Literal["..."]
    plan = []
    for name in model.model_fields:
        if name == "client":
            plan.append((-1, name, _CLIENT))
        elif name == "prompt":
            plan.append((_COLUMN_INDEX["prompt"], name, _PROMPT))
        elif name == "tool_calls":
            plan.append((_COLUMN_INDEX["tool_call_count"], name, _COUNT))
        elif name == "actual" and event_type == "performance_alert":
            plan.append((_COLUMN_INDEX["metric_actual"], name, _RAW))
        elif name in _RENAMED:
            plan.append((_COLUMN_INDEX[_RENAMED[name]], name, _RAW))
        elif name in _JSON_FIELDS:
            plan.append((_COLUMN_INDEX[name], name, _JSON))
        else:
            plan.append((_COLUMN_INDEX[name], name, _RAW))
    return tuple(plan)


_CLIENT_COLUMNS = (
    (_COLUMN_INDEX["client_hostname"], "hostname"),
    (_COLUMN_INDEX["client_sdk_version"], "sdk_version"),
    (_COLUMN_INDEX["client_platform"], "platform"),
)
_TOOL_CALL_COUNT = _COLUMN_INDEX["tool_call_count"]
_INGESTED_AT = _COLUMN_INDEX["ingested_at"]


def event_row(event: BaseEvent, ingested_at: datetime) -> list[Any]:
    """The `events` row of one event, as values in EVENTS_SCHEMA order."""
    row: list[Any] = [None] * len(_EVENT_COLUMNS)
    row[_TOOL_CALL_COUNT] = 0
    row[_INGESTED_AT] = ingested_at
    data = event.__dict__
    for index, name, kind in _plan(type(event)):
        value = data[name]
        if kind == _RAW:
            row[index] = value
        elif kind == _JSON:
            row[index] = _json(value)
        elif kind == _PROMPT:
            row[index] = (
                value
                if value is None or isinstance(value, str)
                else _json([m.model_dump(exclude_none=True) for m in value])
            )
        elif kind == _COUNT:
            row[index] = len(value)
        elif value is not None:  # _CLIENT
            for column, attr in _CLIENT_COLUMNS:
                row[column] = getattr(value, attr)
    return row


def _columnar(rows: list[list[Any]], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    return pa.Table.from_arrays(
        [pa.array(col, type=field.type) for col, field in zip(columns, schema, strict=True)],
        schema=schema,
    )


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
    event_rows = []
    tool_rows: list[dict[str, Any]] = []
    step_rows = []
    for event in events:
        assert isinstance(event, BaseEvent)
        event_rows.append(event_row(event, ingested_at))
        event_type = event.__dict__["event_type"]
        if event_type in ("prompt_call", "tool_call"):
            tool_rows.extend(tool_call_rows(event, ingested_at))
        elif event_type == "agent_step":
            step_rows.append(agent_step_row(event, ingested_at))
    tables = {"events": _columnar(event_rows, EVENTS_SCHEMA)}
    if tool_rows:
        tables["tool_calls"] = pa.Table.from_pylist(tool_rows, schema=TOOL_CALLS_SCHEMA)
    if step_rows:
        tables["agent_steps"] = pa.Table.from_pylist(step_rows, schema=AGENT_STEPS_SCHEMA)
    return tables
