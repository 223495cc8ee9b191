"""The v1 event contract: eight event types, discriminated by `event_type`.

Strict on purpose: unknown fields are rejected by name, timestamps need a zone, counts cannot
be negative, and every string and list has a size limit (the constants below, documented in
docs/EVENTS.md). This module imports only pydantic so the SDK can share it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import to_json

# Size limits (characters for strings, items for lists).
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 1_000_000  # prompt, response, stack traces, tool input/output
MAX_SHORT_TEXT_CHARS = 10_000  # error messages, reasoning summaries, claims
MAX_TAGS = 64
MAX_TAG_CHARS = 128
MAX_TOOL_CALLS = 256
MAX_MESSAGES = 1_000
MAX_JSON_CHARS = 1_000_000  # metadata, tool input/output, expected/actual once serialised
# ClickHouse DateTime64 covers 1900-2299; we accept a narrower, saner window.
MIN_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP = datetime(2100, 1, 1, tzinfo=UTC)  # the hourly rollup keeps 32-bit DateTime hours
# Numeric ranges (inclusive), checked by pydantic-core. Each is far above any real value and
# small enough that every SQL conversion of it, and every sum of it over any number of events,
# is exact (docs/EVENTS.md, "Numeric ranges"; analytics/queries.py clamps rows stored before).
MAX_TOKENS = 2**32 - 1  # the UInt32 columns; sums are UInt128, so any count of events fits
MAX_STEP_NUMBER = 2**32 - 1  # the UInt32 column
# 30 days: longer than any call, tool run or agent step; timestamp + latency stays in 2100.
MAX_LATENCY_MS = 30 * 24 * 3600 * 1000.0
# One call: the dearest model at its largest context costs a few thousand dollars; a million
# leaves room for events that report a whole batch. 1e6 USD = 1e15 nano-USD < 2**53, so the
# nano-USD integer of any accepted cost is exact, and UInt128 sums of them cannot wrap.
MAX_COST_USD = 1_000_000.0
# A budget or a spend over a window (cost_threshold_exceeded): a trillion dollars is more
# than any organisation spends; cents stay exact in a double (1e14 < 2**53).
MAX_SPEND_USD = 1_000_000_000_000.0
# A performance_alert's threshold and actual, in the metric's own unit (ms, %, tokens/s, ...),
# either sign: integers stay exact in a double (< 2**53).
MAX_METRIC_ABS = 1_000_000_000_000_000.0

EVENT_TYPES = (
    "prompt_call",
    "tool_call",
    "agent_step",
    "error",
    "assertion_failed",
    "hallucination_detected",
    "cost_threshold_exceeded",
    "performance_alert",
)

# An id: letters, digits and `_ . : -`, not dots alone ("." and ".." are path segments that
# browsers and HTTP clients resolve away: such an event could not be fetched by its URL).
ID_PATTERN = r"[A-Za-z0-9_.:\-]*[A-Za-z0-9_:\-][A-Za-z0-9_.:\-]*"
ID_RE = re.compile(ID_PATTERN)
# The same, anchored: as Id states it (and pydantic's errors quote it), and as OpenAPI says it.
ID_FIELD_PATTERN = f"^{ID_PATTERN}$"


def is_id(value: str) -> bool:
    """Whether `value` is an id the event contract takes (Id)."""
    return len(value) <= MAX_ID_CHARS and ID_RE.fullmatch(value) is not None


Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_FIELD_PATTERN),
]
# A project id: what keys, events, query parameters and admin routes all accept. (ProjectId
# states the same rule as a length and a pattern: its error messages quote that pattern.)
PROJECT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
PROJECT_ID_RE = re.compile(PROJECT_ID_PATTERN)
ProjectId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"),
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
ShortText = Annotated[str, StringConstraints(max_length=MAX_SHORT_TEXT_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_CHARS)]
Tokens = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]
LatencyMs = Annotated[StrictFloat, Field(ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)]
CostUsd = Annotated[StrictFloat, Field(ge=0, le=MAX_COST_USD, allow_inf_nan=False)]
SpendUsd = Annotated[StrictFloat, Field(ge=0, le=MAX_SPEND_USD, allow_inf_nan=False)]
MetricValue = Annotated[
    StrictFloat, Field(ge=-MAX_METRIC_ABS, le=MAX_METRIC_ABS, allow_inf_nan=False)
]
Status = Literal["success", "error", "timeout", "assertion_failed", "warning"]
Severity = Literal["info", "low", "medium", "high", "critical"]
Env = Literal["production", "staging", "development"]
CostSource = Literal["client", "computed", "unknown"]


def _check_json_size(value: Any) -> Any:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and len(value) > MAX_JSON_CHARS:
            raise ValueError(f"longer than {MAX_JSON_CHARS} characters")
        return value
    text = to_json(value, fallback=str)
    if len(text) > MAX_JSON_CHARS:
        # Its UTF-8 bytes: an "é" counts 2, a CJK character 3 (what the store holds).
        raise ValueError(f"larger than {MAX_JSON_CHARS} bytes as JSON (UTF-8)")
    # A number literal too large for a double (1e999) parses as infinity; refuse it here as
    # in number fields. The cheap byte test keeps the exact check off the common path.
    if (b"Infinity" in text or b"NaN" in text) and not _all_finite(value):
        raise ValueError("holds a number that is not finite (NaN or out of range)")
    return value


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    return True


# The timestamp grammar (docs/EVENTS.md): RFC 3339 date-time, which allows t/z in lower case
# and (its section 5.6 note) a space for the T; seconds required, a zone required, at most 9
# fraction digits (nanoseconds; stored in milliseconds). pydantic's own parser is laxer: it
# takes "1700000000" as epoch seconds and "1700000000000" as milliseconds, +0100, hh:mm and
# a comma fraction, so this fullmatch runs first; pydantic-core still checks the values and
# the range. ASCII digits only: \d would take other scripts' digits.
RFC3339 = re.compile(  # also the analytics' `from` and `to` (analytics/params.py)
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_rfc3339_match = RFC3339.fullmatch
TIMESTAMP_FORM = (
    "RFC 3339 with a timezone (Z or +hh:mm), like 2026-01-01T12:00:00Z"
    " or 2026-01-01T12:00:00.123+02:00"
)


def _rfc3339_text(value: Any) -> Any:
    if isinstance(value, str):
        if _rfc3339_match(value) is not None:
            return value
    elif isinstance(value, datetime):
        return value  # from Python (the SDK): pydantic checks the zone and the range
    raise ValueError(f"timestamp must be {TIMESTAMP_FORM}")


# Free-form JSON, bounded once serialised (a deep or wide object cannot slip past).
Json = Annotated[Any, AfterValidator(_check_json_size)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_check_json_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class Client(_Strict):
    hostname: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    sdk_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    platform: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None


class ChatMessage(_Strict):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    # Text or a list of content parts (free-form JSON): bounded and finite like metadata, or
    # NaN and 1e999 inside the parts would be stored as null.
    content: Annotated[Text | list[dict[str, Any]] | None, AfterValidator(_check_json_size)] = None
    name: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] | None = None


class ToolCallItem(_Strict):
    """One tool call made by a prompt call (the `tool_calls[]` of a prompt_call)."""

    id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] | None = None
    tool_name: Name
    tool_input: Json = None
    tool_output: Json = None
    status: Status | None = None
    latency_ms: LatencyMs | None = None
    error_message: ShortText | None = None


# Optional in a request, never in storage: the server fills a missing (or null) event_id with
# a UUIDv7 and a missing timestamp with the request's receipt time before any hook sees the
# event (ingest._finish), and the spool refuses to read back an event without them
# (require_server_filled). Only a client-chosen id makes a retry idempotent.
SERVER_FILLED = ("event_id", "timestamp")


class BaseEvent(_Strict):
    event_id: Id | None = Field(
        default=None,
        description="Filled by the server (a UUIDv7) when missing; send your own to make a"
        " retry idempotent.",
    )
    # Optional in the body: the project always comes from the API key, and a body that names
    # another project is refused (403) before validation.
    project_id: ProjectId | None = None
    run_id: Id
    # Range checked by pydantic-core itself (the Field before the BeforeValidator keeps it
    # in Rust: after it, pydantic checks the range in Python, 5x slower); the before-validator
    # holds strings to the RFC 3339 grammar above (numbers, and epoch numbers as strings, are
    # refused: seconds or milliseconds would be ambiguous).
    timestamp: (
        Annotated[
            AwareDatetime,
            Field(ge=MIN_TIMESTAMP, lt=MAX_TIMESTAMP),
            BeforeValidator(_rfc3339_text),
        ]
        | None
    ) = Field(default=None, description="Filled by the server (the receipt time) when missing.")
    parent_event_id: Id | None = None
    user_id: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    session_id: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    release: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = None
    env: Env = "production"
    # None rather than a default Client(): building a model per event halves ingest speed.
    client: Client | None = None
    metadata: JsonObject = Field(default_factory=dict)


class PromptCallEvent(BaseEvent):
    event_type: Literal["prompt_call"]
    prompt: Text | Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    model: Name | None = None
    provider: Name | None = None
    tokens_input: Tokens | None = None
    tokens_output: Tokens | None = None
    cost_estimate_usd: CostUsd | None = None
    # Set by the server's cost transform (client / computed / unknown), never by the client.
    cost_source: SkipJsonSchema[CostSource | None] = None  # not part of the request schema
    response: Text | None = None
    response_metadata: JsonObject = Field(default_factory=dict)
    status: Status = "success"
    latency_ms: LatencyMs | None = None
    error_message: ShortText | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(max_length=MAX_TOOL_CALLS)] = Field(
        default_factory=list
    )

    @field_validator("cost_source", mode="before")
    @classmethod
    def _cost_source_is_ours(cls, value: Any, info: ValidationInfo) -> Any:
        # Runs only when the input names the field (defaults are not validated); events read
        # back from the server's own spool are validated with the `trusted` context.
        if info.context and info.context.get("trusted"):
            return value
        raise ValueError("cost_source is set by the server; send cost_estimate_usd instead")


class ToolCallEvent(BaseEvent):
    event_type: Literal["tool_call"]
    tool_name: Name
    tool_input: Json = None
    tool_output: Json = None
    status: Status = "success"
    latency_ms: LatencyMs | None = None
    error_message: ShortText | None = None


class AgentStepEvent(BaseEvent):
    event_type: Literal["agent_step"]
    step_number: Annotated[StrictInt, Field(ge=0, le=MAX_STEP_NUMBER)]
    step_name: Name | None = None
    reasoning: Text | None = None
    action: Text | None = None
    observation: Text | None = None
    status: Status = "success"
    latency_ms: LatencyMs | None = None


class ErrorEvent(BaseEvent):
    event_type: Literal["error"]
    error_type: Name
    error_message: ShortText
    stack_trace: Text | None = None


class AssertionFailedEvent(BaseEvent):
    event_type: Literal["assertion_failed"]
    assertion_name: Name
    expected: Json = None
    actual: Json = None
    severity: Severity = "medium"


class HallucinationDetectedEvent(BaseEvent):
    event_type: Literal["hallucination_detected"]
    detection_method: Name
    confidence: Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
    claim: Text
    evidence: Text | None = None
    severity: Severity = "medium"


class CostThresholdExceededEvent(BaseEvent):
    event_type: Literal["cost_threshold_exceeded"]
    threshold_usd: SpendUsd
    actual_usd: SpendUsd
    window: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PerformanceAlertEvent(BaseEvent):
    event_type: Literal["performance_alert"]
    metric: Name
    threshold: MetricValue
    actual: MetricValue
    window: Annotated[str, StringConstraints(min_length=1, max_length=64)]


Event = Annotated[
    PromptCallEvent
    | ToolCallEvent
    | AgentStepEvent
    | ErrorEvent
    | AssertionFailedEvent
    | HallucinationDetectedEvent
    | CostThresholdExceededEvent
    | PerformanceAlertEvent,
    Field(discriminator="event_type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


def require_server_filled(events: list[Any]) -> list[Any]:
    """The stored contract: every event read back (spool, dead letters) has both server-filled
    fields; a record without them was not written by this server and is refused."""
    for index, event in enumerate(events):
        # By attribute: the server's event structs (ingest/fast_validate.py) or models.
        if event.event_id is None or event.timestamp is None:
            missing = [name for name in SERVER_FILLED if getattr(event, name) is None]
            raise ValueError(f"stored event {index} has no {' or '.join(missing)}")
    return events


MODELS_BY_TYPE: dict[str, type[BaseEvent]] = {
    "prompt_call": PromptCallEvent,
    "tool_call": ToolCallEvent,
    "agent_step": AgentStepEvent,
    "error": ErrorEvent,
    "assertion_failed": AssertionFailedEvent,
    "hallucination_detected": HallucinationDetectedEvent,
    "cost_threshold_exceeded": CostThresholdExceededEvent,
    "performance_alert": PerformanceAlertEvent,
}
