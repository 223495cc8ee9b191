"""How an OpenTelemetry span becomes a `spans` row and, when it is LLM work, a v1 event.

The rules read both the OpenTelemetry GenAI semantic conventions (current and deprecated keys)
and OpenInference. Each rule is a row of the tables below: which attribute keys are read, in
order of preference, for which event field. Bump MAPPING_VERSION when a rule changes meaning;
it is stored with every mapped event (metadata `otel.mapping_version`) so old and new rows can
be told apart.

Input is a `Span` of plain Python values (the receiver decodes OTLP protobuf or JSON into it);
nothing here does I/O.

One rule comes before all others (version 2): a span carrying `watchllm.event_type` is a v1
event that another WatchLLM's exporter sink (otel/export.py) forwarded, and it becomes exactly
that event again, with its original ids, type and fields (the "forwarded events" section
below says which attribute holds which field). So events go WatchLLM -> OTLP -> WatchLLM
unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import msgspec

from ..schema import (
    MAX_COST_USD,
    MAX_LATENCY_MS,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_SHORT_TEXT_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MODELS_BY_TYPE,
)
from .ids import MAX_DURATION_NS, MAX_NS, event_id_of
from .rows import SpanRow

# 2: forwarded WatchLLM events (watchllm.event_type) come back as sent; 3: event ids are
# "<trace id>-<span id>" (ids.py), no longer the span id alone (unique only in its trace)
MAPPING_VERSION = 3

# The event keeps what no rule read (the `spans` row keeps everything): at most this many
# attributes, each value cut to this many characters of JSON, so the event stays valid.
MAX_METADATA_ATTRIBUTES = 256
MAX_METADATA_VALUE_CHARS = 2_000
# Event fields holding free-form JSON or long text.
_JSON_FIELDS = ("tool_input", "tool_output", "response_metadata", "metadata")
_TEXT_FIELDS = ("prompt", "response", "reasoning", "action", "observation", "stack_trace")

# isinstance(x, _MAPPING) is isinstance(x, Mapping), with the usual case (a dict, from JSON)
# matched by type before the ABC's slower check.
_MAPPING = (dict, Mapping)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A start is before 2100 and an end at most 30 days after it (ids.py): the latest time held.
_MAX_NS = MAX_NS + MAX_DURATION_NS - 1
_MAX_START_NS = MAX_NS - 1  # a start (an event's timestamp) stays before 2100


@dataclass(slots=True)
class SpanEvent:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any] = field(default_factory=dict)


class Span(msgspec.Struct):
    """One OTLP span, decoded: ids in lowercase hex, times in Unix nanoseconds, attribute
    values as str / bool / int / float / list / dict (AnyValue's bytes as base64 text).
    A struct (made in C) rather than a dataclass: a third of the time to make, per span."""

    trace_id: str
    span_id: str
    name: str
    start_unix_nano: int
    end_unix_nano: int
    parent_span_id: str | None = None
    kind: str = "internal"  # unspecified, internal, server, client, producer, consumer
    status_code: str = "unset"  # unset, ok, error
    status_message: str = ""
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    resource: dict[str, Any] = msgspec.field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    events: list[SpanEvent] = msgspec.field(default_factory=list)
    links: list[dict[str, Any]] = msgspec.field(default_factory=list)
    # The `spans` row's text of each attribute, when the decoder or the in-process exporter
    # made it on the way (the attributes dict itself if every value is a string); None:
    # span_row makes it.
    attribute_texts: dict[str, str] | None = None


# --- the rules ----------------------------------------------------------------------------------

# Which event type a span becomes, from gen_ai.operation.name or openinference.span.kind.
PROMPT_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
TOOL_OPERATIONS = frozenset({"execute_tool"})
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent", "invoke_workflow"})
OPENINFERENCE_KINDS = {
    "LLM": "prompt_call",
    "EMBEDDING": "prompt_call",
    "TOOL": "tool_call",
    "AGENT": "agent_step",
}

# Event field <- attribute keys, first present wins.
MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name")
PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
INPUT_TOKEN_KEYS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.token_count.prompt",
)
OUTPUT_TOKEN_KEYS = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
)
COST_KEYS = ("gen_ai.usage.cost", "llm.cost.total")
TOOL_NAME_KEYS = ("gen_ai.tool.name", "tool.name")
TOOL_INPUT_KEYS = ("gen_ai.tool.call.arguments", "tool.parameters", "input.value")
TOOL_OUTPUT_KEYS = ("gen_ai.tool.call.result", "output.value")
AGENT_NAME_KEYS = ("gen_ai.agent.name", "agent.name")
USER_KEYS = ("user.id", "enduser.id")
SESSION_KEYS = ("session.id", "gen_ai.conversation.id")
INPUT_MESSAGES_KEYS = ("gen_ai.input.messages",)
OUTPUT_MESSAGES_KEYS = ("gen_ai.output.messages",)
INPUT_TEXT_KEYS = ("gen_ai.prompt", "input.value")
OUTPUT_TEXT_KEYS = ("gen_ai.completion", "output.value")
# Kept in response_metadata under their own key.
RESPONSE_METADATA_KEYS = (
    "gen_ai.response.id",
    "gen_ai.response.finish_reasons",
    "gen_ai.request.temperature",
    "gen_ai.request.top_p",
    "gen_ai.request.top_k",
    "gen_ai.request.max_tokens",
    "gen_ai.request.seed",
    "gen_ai.request.stop_sequences",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.reasoning.output_tokens",
    "llm.token_count.total",
    "llm.invocation_parameters",
)
# Read to classify or copied elsewhere; never listed as not understood.
CLASSIFY_KEYS = ("gen_ai.operation.name", "openinference.span.kind")
# Indexed message keys: gen_ai.prompt.{i}.role, llm.input_messages.{i}.message.content, ...
INDEXED_MESSAGE_PREFIXES = {
    "input": ("gen_ai.prompt.", "llm.input_messages."),
    "output": ("gen_ai.completion.", "llm.output_messages."),
}
# Span events that carry message content (the deprecated GenAI event form).
INPUT_MESSAGE_EVENTS = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
OUTPUT_MESSAGE_EVENTS = ("gen_ai.choice",)

# Resource attributes -> event fields.
ENVIRONMENTS = {"production", "staging", "development"}
ENVIRONMENT_KEYS = ("deployment.environment.name", "deployment.environment")

# Forwarded WatchLLM events (the first rule; written by otel/export.py, read back here).
# A span whose `watchllm.event_type` is one of the contract's types is that event:
#   watchllm.event_id / run_id / parent_event_id  the original ids (the span's own ids are
#                                                 these, or a hash of them when not hex)
#   span start time                               timestamp (to the microsecond)
#   FORWARDED_GENAI_KEYS below                    the fields GenAI has a key for
#   gen_ai.input.messages + watchllm.prompt_form  prompt: "text" (one user message with one
#                                                 text part) or "messages" (PROMPT_PART_FORMS)
#   watchllm.prompt                               prompt as JSON, only when the GenAI form
#                                                 above cannot hold it exactly
#   gen_ai.output.messages                        response (one assistant message, one part)
#   watchllm.<field>                              every other field: text, numbers, booleans
#                                                 as they are, FORWARDED_JSON_FIELDS as JSON text
# Not read back: project_id (the receiving key's project owns the event) and cost_source (the
# receiving server sets it; a forwarded cost is the client's there).
WATCHLLM_EVENT_TYPE = "watchllm.event_type"
FORWARDED_GENAI_KEYS = {
    "model": "gen_ai.response.model",
    "provider": "gen_ai.provider.name",
    "tokens_input": "gen_ai.usage.input_tokens",
    "tokens_output": "gen_ai.usage.output_tokens",
    "cost_estimate_usd": "gen_ai.usage.cost",
    "tool_name": "gen_ai.tool.name",
    "tool_input": "gen_ai.tool.call.arguments",
    "tool_output": "gen_ai.tool.call.result",
    "step_name": "gen_ai.agent.name",
    "error_type": "error.type",
}
# Free-form or structured fields: sent as their JSON text, so any JSON value (a string
# included) comes back as it was.
FORWARDED_JSON_FIELDS = frozenset(
    {
        "tool_input",
        "tool_output",
        "expected",
        "actual",
        "metadata",
        "response_metadata",
        "tool_calls",
        "client",
        "tags",
    }
)
# Fields with a rule of their own (ids, time, messages) or never read back.
FORWARDED_OWN_FIELDS = frozenset(
    {
        "event_type",
        "event_id",
        "run_id",
        "parent_event_id",
        "timestamp",
        "project_id",
        "cost_source",
        "prompt",
        "response",
    }
)
# How a chat message's content is a GenAI part: text as a text part, text with a
# tool_call_id as a tool_call_response part, a list of parts as those parts.
PROMPT_PART_FORMS = ("text", "tool_call_response", "parts")


def event_type_of(span: Span) -> str | None:
    """The v1 event type a span maps to, or None for a span that is not LLM work and did
    not fail."""
    forwarded = span.attributes.get(WATCHLLM_EVENT_TYPE)
    if isinstance(forwarded, str) and forwarded in MODELS_BY_TYPE:
        return forwarded
    operation = span.attributes.get("gen_ai.operation.name")
    if not isinstance(operation, str):
        operation = None
    if operation in PROMPT_OPERATIONS:
        return "prompt_call"
    if operation in TOOL_OPERATIONS:
        return "tool_call"
    if operation in AGENT_OPERATIONS:
        return "agent_step"
    kind = span.attributes.get("openinference.span.kind")
    if isinstance(kind, str) and kind.upper() in OPENINFERENCE_KINDS:
        return OPENINFERENCE_KINDS[kind.upper()]
    if span.status_code == "error":
        return "error"
    return None


# --- the mapping --------------------------------------------------------------------------------


class Mapped(msgspec.Struct):
    """A span's row for `spans`, its event (or None) and the attribute keys no rule read.
    `forwarded`: the event is one a WatchLLM exporter sent (its fields are the sender's, not
    built by the rules here, so they get the full validation). A struct: made per span."""

    row: SpanRow
    event: dict[str, Any] | None
    unmapped: list[str]
    forwarded: bool = False


def map_span(span: Span, project_id: str = "", received_at: datetime = _EPOCH) -> Mapped:
    """The span's row (for `project_id`, received at `received_at`), and its event if any."""
    event_type = event_type_of(span)
    row = span_row(span, event_type, project_id, received_at)
    start = row.start_time
    if event_type is None:
        return Mapped(row, None, [])
    # Only a span with watchllm.event_type can be a forwarded event (most have none).
    forwarded = forwarded_event(span) if WATCHLLM_EVENT_TYPE in span.attributes else None
    if forwarded is not None:
        # Every attribute was written by the exporter for this event: none is "not understood".
        return Mapped(row, forwarded, [], forwarded=True)
    used: set[str] = set(CLASSIFY_KEYS)
    event = _common(span, event_type, used, start)
    build = _BUILDERS[event_type]
    build(span, event, used)
    # The keys no rule read (a list comprehension, the prefix test only on those), sorted.
    unmapped = [k for k in span.attributes if k not in used]
    if unmapped:
        unmapped = sorted([k for k in unmapped if not k.startswith(_INDEXED_PREFIXES)])
    otel: dict[str, Any] = {
        "otel.mapping_version": MAPPING_VERSION,
        "otel.span_name": span.name,
        "otel.span_kind": span.kind,
    }
    if span.scope_name:
        otel["otel.scope"] = span.scope_name
    if unmapped:
        otel["otel.attributes"] = {
            k: _bounded(span.attributes[k]) for k in unmapped[:MAX_METADATA_ATTRIBUTES]
        }
        if len(unmapped) > MAX_METADATA_ATTRIBUTES:
            otel["otel.attributes_left_out"] = len(unmapped) - MAX_METADATA_ATTRIBUTES
    event["metadata"] = otel
    return Mapped(row, _within_limits(event), unmapped)


def span_row(
    span: Span, event_type: str | None, project_id: str = "", received_at: datetime = _EPOCH
) -> SpanRow:
    """The `spans` row: every attribute, resource attribute, event and link as sent."""
    resource = _resource_facts(span.resource)
    start_ns, end_ns = span.start_unix_nano, span.end_unix_nano
    # The struct is made directly (no dict of its fields first: a microsecond a span).
    return SpanRow(
        project_id=project_id,
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id,
        name=span.name,
        kind=span.kind,
        start_time=_datetime(start_ns, _MAX_START_NS),
        end_time=_datetime(end_ns if end_ns > start_ns else start_ns),
        duration_ms=_latency_ms(span),
        status_code=span.status_code,
        status_message=span.status_message,
        service_name=resource.service_name,
        scope_name=span.scope_name,
        scope_version=span.scope_version,
        event_type=event_type,
        attributes=_attribute_texts(span),
        resource_attributes=resource.texts,
        # JSON documents (the run tree counts and lists them): a NaN or Infinity attribute
        # becomes its text, as in the event's fields, not JSON no reader takes.
        span_events=_json_text(
            _finite(
                [
                    {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": e.attributes}
                    for e in span.events
                ]
            )
        )
        if span.events
        else "[]",
        links=_json_text(_finite(span.links)) if span.links else "[]",
        ingested_at=received_at,
    )


def attribute_texts(attributes: dict[str, Any]) -> dict[str, str]:
    """Span.attribute_texts of these attributes (the in-process exporter's; the decoder
    makes equal ones its own way, so both ways in give equal spans)."""
    for value in attributes.values():
        if type(value) is not str:
            # Most values are strings, kept as they are without a call.
            return {k: v if type(v) is str else _attr_text(v) for k, v in attributes.items()}
    return attributes


def _attribute_texts(span: Span) -> dict[str, str]:
    texts = span.attribute_texts
    return texts if texts is not None else attribute_texts(span.attributes)


def _common(span: Span, event_type: str, used: set[str], start: datetime) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_id": event_id_of(span.trace_id, span.span_id),
        "run_id": span.trace_id,
        # The row's start time, as a datetime: the JSON encoder writes it as RFC 3339 (Z) in
        # C, where isoformat() took ~2 us; the validators read both forms alike.
        "timestamp": start,
    }
    if span.parent_span_id:
        event["parent_event_id"] = event_id_of(span.trace_id, span.parent_span_id)
    _put(event, "user_id", _short(_first_text(span.attributes, USER_KEYS, used)))
    _put(event, "session_id", _short(_first_text(span.attributes, SESSION_KEYS, used)))
    resource = _resource_facts(span.resource)
    _put(event, "release", resource.release)
    _put(event, "env", resource.env)
    if resource.client:
        event["client"] = dict(resource.client)  # the event's own: later steps may edit it
    return event


@dataclass(slots=True, frozen=True)
class _ResourceFacts:
    """What the row and the event take from a span's resource, worked out once a resource:
    the spans of one resource share its dict (the decoder and the in-process exporter give
    each span the same object), and a 512-span batch has one or a few resources."""

    resource: dict[str, Any]  # held, so that the identity check below stays sound
    texts: dict[str, str]
    service_name: str
    release: str | None
    env: str | None
    client: dict[str, str]


_last_resource: _ResourceFacts | None = None


def _resource_facts(resource: dict[str, Any]) -> _ResourceFacts:
    global _last_resource
    facts = _last_resource  # one read: another thread may replace it meanwhile, harmlessly
    if facts is not None and facts.resource is resource:
        return facts
    env = None
    for key in ENVIRONMENT_KEYS:
        value = _text(resource.get(key))
        if value in ENVIRONMENTS:
            env = value
            break
    client = {
        "hostname": _short(_text(resource.get("host.name"))),
        "platform": _short(_text(resource.get("service.name"))),
        "sdk_version": _short(_text(resource.get("telemetry.sdk.version")), 64),
    }
    facts = _ResourceFacts(
        resource=resource,
        texts={k: _attr_text(v) for k, v in resource.items()},
        service_name=_text(resource.get("service.name")) or "",
        release=_short(_text(resource.get("service.version"))),
        env=env,
        client={k: v for k, v in client.items() if v},
    )
    _last_resource = facts
    return facts


def _prompt_call(span: Span, event: dict[str, Any], used: set[str]) -> None:
    attrs = span.attributes
    model = _first_text(attrs, MODEL_KEYS, used) or _invoked_model(attrs)
    _put(event, "model", _short(model))
    _put(event, "provider", _short(_first_text(attrs, PROVIDER_KEYS, used)))
    _put(event, "tokens_input", _first_count(attrs, INPUT_TOKEN_KEYS, used))
    _put(event, "tokens_output", _first_count(attrs, OUTPUT_TOKEN_KEYS, used))
    _put(event, "cost_estimate_usd", _first_cost(attrs, COST_KEYS, used))
    _put(event, "latency_ms", _latency_ms(span))
    prompt = _messages(span, "input", used)
    if prompt is None:
        prompt = _first_text(attrs, INPUT_TEXT_KEYS, used)
    _put(event, "prompt", prompt)
    output = _messages(span, "output", used)
    response = _joined_text(output) if output is not None else None
    if response is None:
        response = _first_text(attrs, OUTPUT_TEXT_KEYS, used)
    _put(event, "response", response)
    meta = {k: attrs[k] for k in RESPONSE_METADATA_KEYS if k in attrs}
    used.update(meta)
    if meta:
        event["response_metadata"] = meta
    _status(span, event)


def _tool_call(span: Span, event: dict[str, Any], used: set[str]) -> None:
    attrs = span.attributes
    name = _first_text(attrs, TOOL_NAME_KEYS, used) or _tool_name_from_span(span.name)
    event["tool_name"] = _short(name) or "tool"
    _put(event, "tool_input", _json_value(_first(attrs, TOOL_INPUT_KEYS, used)))
    _put(event, "tool_output", _json_value(_first(attrs, TOOL_OUTPUT_KEYS, used)))
    _put(event, "latency_ms", _latency_ms(span))
    _status(span, event)


def _agent_step(span: Span, event: dict[str, Any], used: set[str]) -> None:
    attrs = span.attributes
    event["step_number"] = 0  # OTel has no step number; the tree and timestamps order steps
    _put(event, "step_name", _short(_first_text(attrs, AGENT_NAME_KEYS, used) or span.name))
    _put(event, "action", _first_text(attrs, ("input.value",), used))
    _put(event, "observation", _first_text(attrs, ("output.value",), used))
    _put(event, "latency_ms", _latency_ms(span))
    if span.status_code == "error":
        event["status"] = "error"


def _error(span: Span, event: dict[str, Any], used: set[str]) -> None:
    exception = next((e for e in span.events if e.name == "exception"), None)
    details = exception.attributes if exception else {}
    error_type = _text(details.get("exception.type")) or _first_text(
        span.attributes, ("error.type", "exception.type"), used
    )
    message = _text(details.get("exception.message")) or span.status_message
    event["error_type"] = _short(error_type) or "span_error"
    event["error_message"] = message or f"span {span.name!r} ended with status error"
    _put(event, "stack_trace", _text(details.get("exception.stacktrace")))


_BUILDERS = {
    "prompt_call": _prompt_call,
    "tool_call": _tool_call,
    "agent_step": _agent_step,
    "error": _error,
}


def _status(span: Span, event: dict[str, Any]) -> None:
    if span.status_code == "error":
        event["status"] = "error"
        message = span.status_message or _exception_message(span)
        if message:
            event["error_message"] = message


def _exception_message(span: Span) -> str | None:
    for e in span.events:
        if e.name == "exception":
            return _text(e.attributes.get("exception.message"))
    return None


# --- forwarded WatchLLM events ---------------------------------------------------------------


def forwarded_event(span: Span) -> dict[str, Any] | None:
    """The event a WatchLLM exporter sent as this span (see FORWARDED_GENAI_KEYS), or None
    for a span that is not one."""
    attrs = span.attributes
    event_type = attrs.get(WATCHLLM_EVENT_TYPE)
    if not isinstance(event_type, str) or event_type not in MODELS_BY_TYPE:
        return None
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_id": _forwarded_text(attrs.get("watchllm.event_id"))
        or event_id_of(span.trace_id, span.span_id),
        "run_id": _forwarded_text(attrs.get("watchllm.run_id")) or span.trace_id,
        "timestamp": _datetime(span.start_unix_nano, _MAX_START_NS),
    }
    parent = _forwarded_text(attrs.get("watchllm.parent_event_id"))
    if not parent and span.parent_span_id:
        parent = event_id_of(span.trace_id, span.parent_span_id)
    if parent:
        event["parent_event_id"] = parent
    text_fields = _text_fields(event_type)
    for name in MODELS_BY_TYPE[event_type].model_fields:
        if name in FORWARDED_OWN_FIELDS:
            continue
        key = FORWARDED_GENAI_KEYS.get(name)
        value = attrs[key] if key in attrs else attrs.get(f"watchllm.{name}")
        if value is None:
            continue
        if name in FORWARDED_JSON_FIELDS and isinstance(value, str):
            value = _json_or_text(value)
        elif name in text_fields and not isinstance(value, str):
            # Text that reads as JSON ("42", "true"), which a WatchLLM forwarding its stored
            # span sends typed (export.typed_value): its text again.
            value = _attr_text(value)
        event[name] = value
    if event_type == "prompt_call":
        prompt = _forwarded_prompt(attrs)
        if prompt is not None:
            event["prompt"] = prompt
        response = _json_or_text(_text(attrs.get("gen_ai.output.messages")) or "")
        if isinstance(response, list):
            texts = [
                p.get("content")
                for m in response
                if isinstance(m, _MAPPING)
                for p in (m.get("parts") or [])
                if isinstance(p, _MAPPING)
            ]
            if texts and all(isinstance(t, str) for t in texts):
                event["response"] = "".join(texts)
    return event


def prompt_to_genai(prompt: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """A prompt as GenAI input messages, and its form (watchllm.prompt_form). Messages are
    plain dicts with the contract's keys (role, content, name, tool_call_id)."""
    if isinstance(prompt, str):
        return [{"role": "user", "parts": [{"type": "text", "content": prompt}]}], "text"
    out: list[dict[str, Any]] = []
    for message in prompt:
        content = message.get("content")
        call_id = message.get("tool_call_id")
        if isinstance(content, str) and call_id is not None:
            parts = [{"type": "tool_call_response", "id": call_id, "response": content}]
        elif isinstance(content, str):
            parts = [{"type": "text", "content": content}]
        elif isinstance(content, list):
            parts = list(content)
        else:
            parts = []
        genai: dict[str, Any] = {"role": message.get("role"), "parts": parts}
        if message.get("name") is not None:
            genai["name"] = message["name"]
        out.append(genai)
    return out, "messages"


def prompt_from_genai(messages: Any, form: Any) -> str | list[dict[str, Any]] | None:
    """The inverse of prompt_to_genai (None when the messages are not in its form). The
    exporter checks that this gives its prompt back, and sends watchllm.prompt otherwise."""
    if not isinstance(messages, list) or not all(isinstance(m, _MAPPING) for m in messages):
        return None
    if form == "text":
        if len(messages) == 1:
            parts = messages[0].get("parts")
            if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], _MAPPING):
                content = parts[0].get("content")
                if isinstance(content, str):
                    return content
        return None
    out: list[dict[str, Any]] = []
    for genai in messages:
        message: dict[str, Any] = {"role": genai.get("role")}
        parts = genai.get("parts")
        parts = parts if isinstance(parts, list) else []
        only = parts[0] if len(parts) == 1 and isinstance(parts[0], _MAPPING) else {}
        call_id = None
        if set(only) == {"type", "content"} and only["type"] == "text":
            content: Any = only["content"]
        elif set(only) == {"type", "id", "response"} and only["type"] == "tool_call_response":
            content, call_id = only["response"], only["id"]
        else:
            content = parts or None
        if content is not None:
            message["content"] = content
        if genai.get("name") is not None:
            message["name"] = genai["name"]
        if call_id is not None:
            message["tool_call_id"] = call_id
        out.append(message)
    return out


@cache
def _text_fields(event_type: str) -> frozenset[str]:
    """The event type's fields that hold text only (their JSON schema's type is string)."""
    out = set()
    for name, prop in MODELS_BY_TYPE[event_type].model_json_schema()["properties"].items():
        alternatives = [a for a in prop.get("anyOf", [prop]) if a.get("type") != "null"]
        if all(a.get("type") == "string" or "enum" in a or "const" in a for a in alternatives):
            out.add(name)
    return frozenset(out)


def _forwarded_text(value: Any) -> str | None:
    return None if value is None else _attr_text(value)


def _forwarded_prompt(attrs: Mapping[str, Any]) -> Any:
    exact = attrs.get("watchllm.prompt")
    if isinstance(exact, str):
        return _json_or_text(exact)
    if isinstance(exact, list):  # the JSON text, sent typed by a WatchLLM forwarding it again
        return exact
    messages = attrs.get("gen_ai.input.messages")
    if isinstance(messages, str):
        messages = _json_or_text(messages)
    return prompt_from_genai(messages, attrs.get("watchllm.prompt_form"))


def attribute_text(value: Any) -> str:
    """The text a `spans` row keeps of an attribute value (the exporter sends a value back
    typed only when this gives the stored text again)."""
    return _attr_text(value)


def _json_or_text(text: str) -> Any:
    try:
        return _loads(text)
    except ValueError:
        return text


# --- messages -----------------------------------------------------------------------------------


def _messages(span: Span, side: str, used: set[str]) -> list[dict[str, Any]] | None:
    """Chat messages from any of the three forms: a JSON attribute (current GenAI), indexed
    attributes (deprecated GenAI, OpenInference), span events (deprecated GenAI events)."""
    keys = INPUT_MESSAGES_KEYS if side == "input" else OUTPUT_MESSAGES_KEYS
    raw = _first(span.attributes, keys, used)
    if raw is not None:
        parsed = _json_value(raw)
        if isinstance(parsed, list):
            return [_message(m) for m in parsed if isinstance(m, _MAPPING)]
    indexed = _indexed_messages(span.attributes, INDEXED_MESSAGE_PREFIXES[side])
    if indexed:
        return indexed
    found: list[dict[str, Any]] = []
    for e in span.events:
        if side == "input" and e.name in INPUT_MESSAGE_EVENTS:
            content = e.attributes.get("content", e.attributes.get("gen_ai.event.content"))
            found.append(_message({"role": INPUT_MESSAGE_EVENTS[e.name], "content": content}))
        elif side == "output" and e.name in OUTPUT_MESSAGE_EVENTS:
            message = _json_value(e.attributes.get("message"))
            if isinstance(message, _MAPPING):
                found.append(_message({"role": "assistant", **message}))
            else:
                found.append(
                    _message({"role": "assistant", "content": e.attributes.get("content")})
                )
    return found or None


def _message(raw: Mapping[str, Any]) -> dict[str, Any]:
    role = raw.get("role")
    if type(role) is str and role:
        # The usual shapes, read without the general checks below: text content, or the
        # current GenAI form's parts that all hold text (anything else raises, and goes on).
        content = raw.get("content")
        if type(content) is str:
            return {"role": role[:64], "content": content}
        parts = raw.get("parts")
        if content is None and type(parts) is list:
            try:
                return {"role": role[:64], "content": "".join([p["content"] for p in parts])}
            except (KeyError, TypeError):
                pass
    role = _text(role) or "user"
    content = raw.get("content")
    if content is None and isinstance(raw.get("parts"), list):
        # The current GenAI form: parts of type text (others kept as JSON).
        texts = [p.get("content") for p in raw["parts"] if isinstance(p, _MAPPING)]
        if all(isinstance(t, str) for t in texts):
            content = "".join(texts)
        else:
            content = [dict(p) for p in raw["parts"] if isinstance(p, _MAPPING)]
    if content is not None and not isinstance(content, (str, list)):
        content = json.dumps(content, ensure_ascii=False, default=str)
    if isinstance(content, list):
        content = [p if isinstance(p, dict) else {"value": p} for p in content]
    message: dict[str, Any] = {"role": role[:64]}
    if content is not None:
        message["content"] = content
    return message


_INDEXED_PREFIXES = tuple(p for prefixes in INDEXED_MESSAGE_PREFIXES.values() for p in prefixes)


def _indexed(key: str) -> bool:
    return key.startswith(_INDEXED_PREFIXES)


def _indexed_messages(attrs: Mapping[str, Any], prefixes: Iterable[str]) -> list[dict[str, Any]]:
    """gen_ai.prompt.0.role / .content and llm.input_messages.0.message.role / .content."""
    by_index: dict[int, dict[str, Any]] = {}
    prefixes = tuple(prefixes)
    for key, value in attrs.items():
        if not key.startswith(prefixes):  # most keys: one check instead of one a prefix
            continue
        for prefix in prefixes:
            if not key.startswith(prefix):
                continue
            index, _, rest = key[len(prefix) :].partition(".")
            if not index.isdigit():
                continue
            rest = rest.removeprefix("message.")
            if rest in ("role", "content"):
                by_index.setdefault(int(index), {})[rest] = value
    return [_message(by_index[i]) for i in sorted(by_index)]


def _joined_text(messages: list[dict[str, Any]]) -> str | None:
    texts = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    return "\n".join(texts) if texts else None


# --- values -------------------------------------------------------------------------------------


def _first(attrs: Mapping[str, Any], keys: Iterable[str], used: set[str]) -> Any:
    """The value of the first key present; every key of the rule counts as understood."""
    found = None
    for key in keys:
        if key in attrs:
            used.add(key)
            if found is None:
                found = attrs[key]
    return found


# The largest llm.invocation_parameters read for its model: the JSON of a call's parameters
# is small; a bigger one (tool schemas inline, say) is kept, not parsed.
MAX_INVOCATION_PARAMETERS_CHARS = 64 * 1024


def _invoked_model(attrs: Mapping[str, Any]) -> str | None:
    """The model an OpenInference span asked for, from `llm.invocation_parameters` (a JSON
    object), when it names none in `llm.model_name`: a streamed call whose chunks carry no
    model would otherwise be stored without one, and so without a computed cost. (The
    attribute stays in response_metadata.)"""
    raw = attrs.get("llm.invocation_parameters")
    if not isinstance(raw, str) or len(raw) > MAX_INVOCATION_PARAMETERS_CHARS:
        return None
    try:
        parameters = json.loads(raw)
    except ValueError:
        return None
    model = parameters.get("model") if isinstance(parameters, dict) else None
    return model if isinstance(model, str) and model else None


def _first_text(attrs: Mapping[str, Any], keys: Iterable[str], used: set[str]) -> str | None:
    return _text(_first(attrs, keys, used))


def _first_count(attrs: Mapping[str, Any], keys: Iterable[str], used: set[str]) -> int | None:
    value = _first(attrs, keys, used)
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return value
    return None  # out of the contract's range: kept in `spans`, not made up here


def _first_cost(attrs: Mapping[str, Any], keys: Iterable[str], used: set[str]) -> float | None:
    value = _first(attrs, keys, used)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if math.isfinite(value) and 0 <= value <= MAX_COST_USD:
        return value
    return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _short(value: str | None, limit: int = MAX_NAME_CHARS) -> str | None:
    return value[:limit] if value else None


def _attr_text(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    return _json_text(value)


_encoder = msgspec.json.Encoder()


def _json_text(value: Any) -> str:
    """JSON text of a decoded attribute value (msgspec: about ten times json.dumps' speed);
    json.dumps for what msgspec writes otherwise (NaN and Infinity, which it makes null)."""
    try:
        text = _encoder.encode(value).decode()
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=False, default=str)
    # Only a text with a null can have come from NaN or Infinity: the walk is skipped else.
    if "null" in text and _has_non_finite(value):
        return json.dumps(value, ensure_ascii=False, default=str)
    return text


def _plain_json(value: Any) -> str | None:
    """msgspec's JSON text of `value` (None when it cannot write it); NaN and Infinity come
    out as null, so a caller that cares checks a text with a null again."""
    try:
        return _encoder.encode(value).decode()
    except (TypeError, ValueError):
        return None


def _has_non_finite(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return not math.isfinite(value)
    if kind is list or kind is tuple:
        return any(_has_non_finite(v) for v in value)
    if kind is dict:
        return any(_has_non_finite(v) for v in value.values())
    return False


def _json_value(value: Any) -> Any:
    """A JSON document sent as a string attribute, decoded; any other value as it is."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return _loads(value)
        except ValueError:
            return value
    return value


def _loads(text: str) -> Any:
    """json.loads' result, by msgspec (about five times faster) for the JSON it reads; what
    it refuses (NaN, 1e400, lone surrogates) or what is no JSON goes to json.loads, which
    reads the first two as before and raises ValueError for the others: a lone surrogate
    ("\\ud800") is text no JSON encoder writes, so the spool could not hold the event (the
    request failed whole); such a document stays the attribute's text."""
    try:
        try:
            value = _decoder.decode(text)
        except msgspec.DecodeError:
            value = json.loads(text)
            _encoder.encode(value)
    except UnicodeEncodeError:
        raise ValueError("a lone surrogate in the JSON text") from None
    except RecursionError:
        raise ValueError("JSON nested too deep to read") from None
    # Cheap first (two scans in C): fewer brackets than levels cannot be that deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        # An event holds free-form JSON of some 170 levels; a deeper document refused the
        # whole span, row and all (or failed a recursive rule). Kept as the text it came as.
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


# JSON sent as a string attribute is read as JSON up to this depth (real documents: under 10).
MAX_JSON_DEPTH = 64


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests lists and dicts more than `limit` deep (no recursion)."""
    level: list[Any] = [value] if type(value) in (dict, list) else []
    for _ in range(limit):
        level = [
            item
            for container in level
            for item in (container.values() if type(container) is dict else container)
            if type(item) in (dict, list)
        ]
        if not level:
            return False
    return True


_decoder = msgspec.json.Decoder()


def _tool_name_from_span(name: str) -> str:
    return name.removeprefix("execute_tool ").strip() or name


def _datetime(unix_nano: int, most: int = _MAX_NS) -> datetime:
    # Spans with times outside the contract's window (1970 to 2100) are refused before this
    # (ids.time_problem); the clamp only keeps a direct caller's span (map_span on a span no
    # receiver checked) from raising here or making an event the contract refuses.
    if not 0 <= unix_nano <= most:
        unix_nano = min(max(unix_nano, 0), most)
    # Positional microseconds: timedelta normalises them itself, faster than divmod first.
    return _EPOCH + timedelta(0, 0, unix_nano // 1000)


def _latency_ms(span: Span) -> float:
    ms = (span.end_unix_nano - span.start_unix_nano) / 1e6
    if ms <= 0:  # comparisons: cheaper than max() and min() calls, three times a span
        return 0.0
    return ms if ms < MAX_LATENCY_MS else MAX_LATENCY_MS


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (the contract refuses them): such doubles become text."""
    if not _has_non_finite(value):  # nearly always: a walk that builds nothing
        return value
    return _finite_copy(value)


def _finite_copy(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _finite_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_copy(v) for v in value]
    return value


def _bounded(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return value[:MAX_METADATA_VALUE_CHARS]
    if kind is bool or (kind is int and -_SHORT_INT < value < _SHORT_INT):
        return value  # its JSON text is far below the limit: no need to write it
    value = _finite(value)
    if isinstance(value, str):
        return value[:MAX_METADATA_VALUE_CHARS]
    text = json.dumps(value, ensure_ascii=False, default=str)
    return value if len(text) <= MAX_METADATA_VALUE_CHARS else text[:MAX_METADATA_VALUE_CHARS]


_SHORT_INT = 10**100  # an int below this has fewer than 102 characters of JSON


def _within_limits(event: dict[str, Any]) -> dict[str, Any]:
    """Cut what a span may carry beyond the contract's limits (the full values stay in the
    `spans` row): long texts, too many messages, non-finite numbers in JSON fields."""
    for key in _JSON_FIELDS:
        if key in event:
            text = _plain_json(event[key])
            if text is None or "null" in text:  # maybe NaN or Infinity: the long way
                event[key] = _finite(event[key])
                text = _json_text(event[key])
            if len(text) > MAX_TEXT_CHARS:
                event[key] = {} if key.endswith("metadata") else text[:MAX_TEXT_CHARS]
    for key in _TEXT_FIELDS:
        value = event.get(key)
        if isinstance(value, str):
            event[key] = value[:MAX_TEXT_CHARS]
    if isinstance(event.get("prompt"), list):
        messages = event["prompt"][:MAX_MESSAGES]
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = content[:MAX_TEXT_CHARS]
            elif isinstance(content, list):
                content = _finite(content)
                text = json.dumps(content, ensure_ascii=False, default=str)
                message["content"] = content if len(text) <= MAX_TEXT_CHARS else None
        event["prompt"] = messages
    if "error_message" in event:
        event["error_message"] = event["error_message"][:MAX_SHORT_TEXT_CHARS]
    return event


def _put(event: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value != "":
        event[key] = value
