"""The span -> event mapping: GenAI (current and deprecated keys), OpenInference, errors,
and a property test that any span maps to an event the contract accepts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchllm_ext.ingest.fast_validate import encode_events, from_built, validate_list
from watchllm_ext.otel.mapping import (
    MAPPING_VERSION,
    Span,
    SpanEvent,
    map_span,
    prompt_from_genai,
    prompt_to_genai,
)
from watchllm_ext.schema import EVENT_ADAPTER

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z in ns
TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(**kw: Any) -> Span:
    base: dict[str, Any] = {
        "trace_id": TRACE,
        "span_id": "b7ad6b7169203331",
        "name": "chat gpt-4o",
        "start_unix_nano": T0,
        "end_unix_nano": T0 + 1_500_000_000,
        "parent_span_id": "00f067aa0ba902b7",
        "resource": {
            "service.name": "checkout",
            "service.version": "1.4.2",
            "deployment.environment.name": "staging",
            "host.name": "web-1",
        },
    }
    base.update(kw)
    return Span(**base)


def valid(event: dict[str, Any]) -> Any:
    return EVENT_ADAPTER.validate_python(dict(event, project_id="p"))


def test_genai_chat_span_with_current_keys() -> None:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.input.messages": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "Hi there"}]}]
        ),
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "Hello!"}]}]
        ),
        "server.address": "api.openai.com",
    }
    mapped = map_span(span(attributes=attrs))
    event = mapped.event
    assert event is not None
    assert event["event_type"] == "prompt_call"
    # Span ids are unique only within their trace: the event ids name both (ids.py).
    assert (event["event_id"], event["run_id"], event["parent_event_id"]) == (
        f"{TRACE}-b7ad6b7169203331",
        TRACE,
        f"{TRACE}-00f067aa0ba902b7",
    )
    assert event["timestamp"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert event["latency_ms"] == 1500.0
    assert event["model"] == "gpt-4o-2024-08-06" and event["provider"] == "openai"
    assert (event["tokens_input"], event["tokens_output"]) == (12, 7)
    assert event["prompt"] == [{"role": "user", "content": "Hi there"}]
    assert event["response"] == "Hello!"
    assert event["response_metadata"] == {"gen_ai.response.id": "chatcmpl-1"}
    assert (event["env"], event["release"]) == ("staging", "1.4.2")
    assert event["client"] == {"hostname": "web-1", "platform": "checkout"}
    # The attribute no rule read is kept in the metadata and reported.
    assert mapped.unmapped == ["server.address"]
    assert event["metadata"]["otel.attributes"] == {"server.address": "api.openai.com"}
    assert event["metadata"]["otel.mapping_version"] == MAPPING_VERSION
    valid(event)
    row = mapped.row
    assert row.event_type == "prompt_call" and row.service_name == "checkout"
    assert row.attributes["gen_ai.usage.input_tokens"] == "12"  # every attribute, as text
    assert row.duration_ms == 1500.0


def test_genai_deprecated_keys_and_message_events() -> None:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-3-5-sonnet",
        "gen_ai.usage.prompt_tokens": 3,
        "gen_ai.usage.completion_tokens": 4,
        "gen_ai.prompt.0.role": "system",
        "gen_ai.prompt.0.content": "Be brief",
        "gen_ai.prompt.1.role": "user",
        "gen_ai.prompt.1.content": "Hi",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": "Yo",
    }
    event = map_span(span(attributes=attrs)).event
    assert event is not None
    assert event["provider"] == "anthropic" and event["model"] == "claude-3-5-sonnet"
    assert (event["tokens_input"], event["tokens_output"]) == (3, 4)
    assert event["prompt"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi"},
    ]
    assert event["response"] == "Yo"
    assert "otel.attributes" not in event["metadata"]  # indexed keys are understood
    valid(event)

    events = [
        SpanEvent("gen_ai.user.message", T0, {"content": "What is 2+2?"}),
        SpanEvent("gen_ai.choice", T0, {"message": json.dumps({"content": "4"})}),
    ]
    event = map_span(span(attributes={"gen_ai.operation.name": "chat"}, events=events)).event
    assert event is not None
    assert event["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert event["response"] == "4"
    valid(event)


def test_openinference_llm_tool_and_agent_spans() -> None:
    llm = {
        "openinference.span.kind": "LLM",
        "llm.model_name": "gpt-4o-mini",
        "llm.provider": "openai",
        "llm.token_count.prompt": 20,
        "llm.token_count.completion": 5,
        "llm.token_count.total": 25,
        "llm.cost.total": 0.0012,
        "llm.input_messages.0.message.role": "user",
        "llm.input_messages.0.message.content": "Hello",
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.content": "Hi!",
        "session.id": "s-1",
        "user.id": "u-9",
    }
    event = map_span(span(attributes=llm)).event
    assert event is not None
    assert event["model"] == "gpt-4o-mini" and event["cost_estimate_usd"] == 0.0012
    assert event["prompt"] == [{"role": "user", "content": "Hello"}] and event["response"] == "Hi!"
    assert (event["session_id"], event["user_id"]) == ("s-1", "u-9")
    assert event["response_metadata"] == {"llm.token_count.total": 25}
    valid(event)

    # A streamed call whose chunks named no model: the model it asked for, from its
    # parameters (which stay in response_metadata); not from parameters that are no object.
    params = json.dumps({"model": "gpt-4o", "stream": True})
    streamed = {k: v for k, v in llm.items() if k != "llm.model_name"}
    event = map_span(span(attributes={**streamed, "llm.invocation_parameters": params})).event
    assert event is not None and event["model"] == "gpt-4o"
    assert event["response_metadata"]["llm.invocation_parameters"] == params
    valid(event)
    for odd in ('["gpt-4o"]', '{"model": 4}', '{"model": ""}', "{not json", "x" * 70_000):
        event = map_span(span(attributes={**streamed, "llm.invocation_parameters": odd})).event
        assert event is not None and "model" not in event, odd
    both = {**llm, "llm.invocation_parameters": params}
    assert map_span(span(attributes=both)).event["model"] == "gpt-4o-mini"  # type: ignore[index]

    tool = {"openinference.span.kind": "TOOL", "tool.name": "search", "input.value": '{"q": "x"}'}
    event = map_span(span(name="search", attributes=tool, status_code="error")).event
    assert event is not None
    assert event["event_type"] == "tool_call" and event["tool_name"] == "search"
    assert event["tool_input"] == {"q": "x"} and event["status"] == "error"
    valid(event)

    genai_tool = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.call.arguments": "[1, 2]",
        "gen_ai.tool.call.result": "3",
    }
    event = map_span(span(name="execute_tool add", attributes=genai_tool)).event
    assert event is not None
    assert (event["tool_name"], event["tool_input"], event["tool_output"]) == ("add", [1, 2], "3")
    valid(event)

    agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner"}
    event = map_span(span(name="invoke_agent planner", attributes=agent)).event
    assert event is not None
    assert event["event_type"] == "agent_step" and event["step_name"] == "planner"
    valid(event)


def test_failed_plain_span_becomes_an_error_and_other_spans_no_event() -> None:
    exc = SpanEvent(
        "exception",
        T0,
        {
            "exception.type": "TimeoutError",
            "exception.message": "upstream timed out",
            "exception.stacktrace": "Traceback ...",
        },
    )
    mapped = map_span(span(name="GET /db", status_code="error", events=[exc]))
    assert mapped.event is not None
    assert mapped.event["event_type"] == "error"
    assert mapped.event["error_type"] == "TimeoutError"
    assert mapped.event["error_message"] == "upstream timed out"
    assert mapped.event["stack_trace"] == "Traceback ..."
    valid(mapped.event)
    # An LLM span that failed stays a prompt call, with the status and the message.
    failed_llm = map_span(
        span(attributes={"gen_ai.operation.name": "chat"}, status_code="error", events=[exc])
    ).event
    assert failed_llm is not None
    assert failed_llm["status"] == "error" and failed_llm["error_message"] == "upstream timed out"
    plain = map_span(span(name="GET /health", attributes={"http.method": "GET"}))
    assert plain.event is None and plain.row.attributes == {"http.method": "GET"}


def test_out_of_range_values_are_left_out_not_made_up() -> None:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": -5,
        "gen_ai.usage.output_tokens": 2**40,
        "gen_ai.usage.cost": float("inf"),
        "gen_ai.request.model": "m" * 1000,
    }
    far = span(attributes=attrs, start_unix_nano=T0, end_unix_nano=T0 + 10**20)
    event = map_span(far).event
    assert event is not None
    assert "tokens_input" not in event and "tokens_output" not in event
    assert "cost_estimate_usd" not in event and len(event["model"]) == 256
    valid(event)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(
    [
        "gen_ai.operation.name",
        "openinference.span.kind",
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.cost",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.prompt.0.content",
        "gen_ai.prompt.x.role",
        "llm.input_messages.1.message.content",
        "gen_ai.tool.call.arguments",
        "tool.name",
        "input.value",
        "user.id",
        "session.id",
        "custom.key",
    ]
) | st.text(min_size=1, max_size=20)
_operation = st.sampled_from(
    ["chat", "embeddings", "execute_tool", "invoke_agent", "LLM", "TOOL", "AGENT", "other"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attrs=st.dictionaries(_keys, _values, max_size=12),
    operation=_operation,
    use_openinference=st.booleans(),
    status=st.sampled_from(["unset", "ok", "error"]),
    start=st.integers(min_value=-(2**63), max_value=2**64),
    duration=st.integers(min_value=-(10**12), max_value=10**22),
    messages=st.lists(
        st.fixed_dictionaries({"role": _values, "content": _values, "parts": _values}),
        max_size=3,
    ),
)
def test_any_span_maps_to_an_event_the_contract_accepts(
    attrs: dict[str, Any],
    operation: str,
    use_openinference: bool,
    status: str,
    start: int,
    duration: int,
    messages: list[dict[str, Any]],
) -> None:
    attrs = dict(attrs)
    key = "openinference.span.kind" if use_openinference else "gen_ai.operation.name"
    attrs[key] = operation
    attrs["gen_ai.input.messages"] = json.dumps(messages, default=str)
    mapped = map_span(
        span(
            attributes=attrs,
            status_code=status,
            start_unix_nano=start,
            end_unix_nano=start + duration,
        )
    )
    msgspec.json.encode(mapped.row)
    if mapped.event is not None:
        valid(mapped.event)
        same_as_validated(mapped.event)


def same_as_validated(event: dict[str, Any]) -> Any:
    """The struct the receiver builds directly (fast_validate.from_built) is the one the JSON
    round trip through the fast validator gives; None only where that path is needed."""
    built = from_built(event)
    through_json = validate_list(msgspec.json.encode([event]))
    if built is not None:
        assert through_json is not None and through_json == [built]
        assert encode_events([built]) == encode_events(through_json)
    return built


@pytest.mark.parametrize("depth", [65, 400, 5_000])
def test_json_text_nested_too_deep_stays_text(depth: int) -> None:
    """Messages or tool arguments sent as JSON text nested deeper than MAX_JSON_DEPTH stay
    their text in the event: the span (row and event) is stored, not refused with the
    interpreter's RecursionError."""
    from watchllm_ext.otel.mapping import MAX_JSON_DEPTH

    assert depth > MAX_JSON_DEPTH
    deep = "[" * depth + "]" * depth
    messages = '[{"role": "user", "parts": [{"type": "x", "v": ' + deep + "}]}]"
    chat = map_span(
        span(attributes={"gen_ai.operation.name": "chat", "gen_ai.input.messages": messages})
    )
    assert chat.event is not None and chat.row.attributes["gen_ai.input.messages"] == messages
    tool = map_span(
        span(
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.arguments": deep}
        )
    )
    assert tool.event is not None and tool.event["tool_input"] == deep
    for event in (chat.event, tool.event):
        built = same_as_validated(event)
        assert built is not None
        encode_events([built])
    shallow = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # at the limit: read as JSON
    tool = map_span(
        span(
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.call.arguments": shallow,
            }
        )
    )
    assert tool.event is not None and isinstance(tool.event["tool_input"], list)


def test_a_lone_surrogate_in_json_text_stays_text() -> None:
    # json.loads reads "\\ud800" as a lone surrogate, which no JSON encoder writes: such a
    # document is not read as messages (its text stays in the row), and the span's event can
    # be encoded for the spool (before, the whole request failed there).
    messages = '[{"role": "user", "content": "\\ud800"}]'
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.input.messages": messages}
    mapped = map_span(span(attributes=attrs))
    assert mapped.event is not None and "prompt" not in mapped.event
    assert mapped.row.attributes["gen_ai.input.messages"] == messages
    built = same_as_validated(mapped.event)
    assert built is not None
    encode_events([built])


def test_built_events_decline_what_the_checks_refuse() -> None:
    deep = "[" * 300 + "]" * 300  # free-form JSON deeper than the validators take
    attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.arguments": deep}
    event = map_span(span(attributes=attrs)).event
    # The mapping keeps JSON text that deep as text (mapping.MAX_JSON_DEPTH) ...
    assert event is not None and event["tool_input"] == deep
    # ... and the built path declines such a value wherever else it comes from.
    event["tool_input"] = msgspec.json.decode(deep)
    assert same_as_validated(event) is None  # the JSON path (and pydantic) decide
    # Metadata near the JSON size bound: checked (in bytes, as pydantic counts), not assumed.
    for letter, fits in (("e", True), ("é", False)):
        wide = {"gen_ai.operation.name": "chat"} | {f"k.{i}": letter * 2_000 for i in range(256)}
        event = map_span(span(attributes=wide)).event
        assert event is not None and (same_as_validated(event) is not None) is fits
    # A field only the server sets, or one the type has not: never built directly.
    chat = map_span(span(attributes={"gen_ai.operation.name": "chat"})).event
    assert chat is not None and same_as_validated(chat) is not None
    assert from_built(dict(chat, cost_source="client")) is None
    assert from_built(dict(chat, no_such_field=1)) is None
    assert from_built(dict(chat, prompt=[{"role": "user", "nope": 1}])) is None


# --- forwarded WatchLLM events (the exporter sink's spans, otel/export.py) ----------------------


def test_a_forwarded_event_comes_back_with_its_own_ids_type_and_fields() -> None:
    attrs = {
        "watchllm.event_type": "prompt_call",
        "watchllm.event_id": "evt-1",
        "watchllm.run_id": "run-1",
        "watchllm.parent_event_id": "evt-0",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "ignored-request-model",
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.provider.name": "openai",
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.cost": 0.25,
        "gen_ai.input.messages": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
        ),
        "watchllm.prompt_form": "text",
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "hello"}]}]
        ),
        "watchllm.tags": '["a"]',
        "watchllm.metadata": '{"k":[1,2]}',
        "watchllm.latency_ms": 12.5,
        "watchllm.status": "timeout",
        "watchllm.cost_source": "computed",  # the receiving server sets its own
        "watchllm.project_id": "other",  # not a field read back: the key's project owns it
    }
    mapped = map_span(span(attributes=attrs, status_code="error"))
    assert mapped.unmapped == []
    assert mapped.row.event_type == "prompt_call"
    assert mapped.event == {
        "event_type": "prompt_call",
        "event_id": "evt-1",
        "run_id": "run-1",
        "parent_event_id": "evt-0",
        "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
        "model": "gpt-4o",
        "provider": "openai",
        "tokens_input": 3,
        "cost_estimate_usd": 0.25,
        "prompt": "hi",
        "response": "hello",
        "tags": ["a"],
        "metadata": {"k": [1, 2]},
        "latency_ms": 12.5,
        "status": "timeout",
    }
    valid(mapped.event)


def test_the_forwarded_rule_comes_first_and_needs_a_contract_type() -> None:
    # A failed span that says it is an assertion_failed event is that event, not an error.
    attrs = {
        "watchllm.event_type": "assertion_failed",
        "watchllm.assertion_name": "is_json",
        "watchllm.expected": '"a string, as JSON"',
        "watchllm.actual": "{not json",  # not JSON: kept as the text it is
    }
    event = map_span(span(attributes=attrs, status_code="error")).event
    assert event is not None and event["event_type"] == "assertion_failed"
    assert (event["expected"], event["actual"]) == ("a string, as JSON", "{not json")
    # Without watchllm.event_id / run_id the span's own ids are the event's.
    assert (event["event_id"], event["run_id"]) == (f"{TRACE}-b7ad6b7169203331", TRACE)
    assert event["parent_event_id"] == f"{TRACE}-00f067aa0ba902b7"
    # An unknown type is no forwarded event: the other rules apply.
    bogus = map_span(span(attributes={"watchllm.event_type": "bogus"}, status_code="error"))
    assert bogus.event is not None and bogus.event["event_type"] == "error"
    assert bogus.unmapped == ["watchllm.event_type"]


def test_prompt_messages_go_to_genai_and_back_exactly() -> None:
    prompt = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": [{"type": "image_url", "url": "http://x/y.png"}]},
        {"role": "assistant"},
    ]
    messages, form = prompt_to_genai(prompt)
    assert form == "messages"
    assert messages[2] == {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": "call_1", "response": "42"}],
    }
    assert prompt_from_genai(messages, form) == prompt
    assert prompt_from_genai(*prompt_to_genai("plain text")) == "plain text"
    # A content list that reads as one text part cannot come back from GenAI alone: the
    # exporter sees it and sends watchllm.prompt, which wins.
    looks_like_text = [{"role": "user", "content": [{"type": "text", "content": "x"}]}]
    messages, form = prompt_to_genai(looks_like_text)
    assert prompt_from_genai(messages, form) != looks_like_text
    attrs = {
        "watchllm.event_type": "prompt_call",
        "gen_ai.input.messages": json.dumps(messages),
        "watchllm.prompt_form": form,
        "watchllm.prompt": json.dumps(looks_like_text),
    }
    event = map_span(span(attributes=attrs)).event
    assert event is not None and event["prompt"] == looks_like_text


def test_a_span_past_the_contracts_window_still_maps_to_a_valid_event() -> None:
    # The receiver refuses such spans (ids.time_problem); a direct caller of map_span gets
    # an event at the window's edge, not one the contract refuses (hypothesis found a start
    # near 2100 clamped past it once ends were let pass 2100 by up to 30 days).
    from watchllm_ext.otel.ids import MAX_NS

    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    for start in (MAX_NS - 1, MAX_NS, MAX_NS + 10**15, 2**64):
        mapped = map_span(span(attributes=attrs, start_unix_nano=start, end_unix_nano=start))
        assert mapped.event is not None
        event = valid(mapped.event)
        assert event.timestamp.year == 2099


@pytest.mark.parametrize("odd", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_attributes_of_span_events_and_links_stay_json(odd: float) -> None:
    """The row's span_events and links are JSON documents the run tree counts and lists: a
    NaN or Infinity attribute (OTLP's doubleValue "NaN") becomes its text, not NaN, which no
    JSON reader takes (the run tree then showed no event and no link)."""
    link = {"trace_id": TRACE, "span_id": "00f067aa0ba902b7", "attributes": {"w": [1.5, odd]}}
    row = map_span(span(events=[SpanEvent("retry", T0, {"delay": odd, "n": 2})], links=[link])).row
    events, links = json.loads(row.span_events), json.loads(row.links)  # strict: no NaN
    assert events == [
        {"name": "retry", "time_unix_nano": T0, "attributes": {"delay": repr(odd), "n": 2}}
    ]
    assert links[0]["attributes"] == {"w": [1.5, repr(odd)]}
    for text in (row.span_events, row.links):
        assert "NaN" not in text and "Infinity" not in text, text
