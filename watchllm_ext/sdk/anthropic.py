"""Anthropic: `wrap(Anthropic())` or `wrap(AsyncAnthropic())` logs every `messages.create`.

    from anthropic import Anthropic
    from watchllm_ext.sdk import WatchLLM
    from watchllm_ext.sdk.anthropic import wrap

    watchllm = WatchLLM()
    client = wrap(Anthropic())         # the same object, messages.create timed

Wraps `client.messages.create` of the object handed in (no global patching), sync and
async, with `stream=True` or not: model, input and output tokens, latency, time to first
token, stop reason, tool uses, status, error and the request id, one prompt_call per call
(a stream is logged when it ends, fails or is closed). The `system` prompt is logged as the
first message. The `messages.stream(...)` helper is wrapped too: logged when its `with`
block ends, from the helper's snapshot of the message (no time to first token there).
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._llm import Call, get, to_messages, tokens, usage_details, wrap_method, wrap_stream_manager

# input_tokens excludes these: cache reads and writes are priced apart.
DETAILS = {
    "cache_read_input_tokens": ("cache_read_input_tokens",),
    "cache_creation_input_tokens": ("cache_creation_input_tokens",),
}

C = TypeVar("C")


def wrap(client: C, watchllm: Any = None) -> C:
    """Instrument this Anthropic / AsyncAnthropic object; returns it. `watchllm` is the
    WatchLLM client to log to (by default the one made last, resolved at each call)."""

    def sdk() -> Any:
        from .core import get_client

        return watchllm or get_client()

    messages = getattr(client, "messages", None)
    if messages is not None:
        wrap_method(
            messages,
            "create",
            sdk,
            "anthropic",
            "messages",
            lambda kw: to_messages(kw.get("messages"), kw.get("system")),
            _read_message,
            _read_event,
        )
        wrap_stream_manager(
            messages,
            "stream",
            sdk,
            "anthropic",
            "messages.stream",
            lambda kw: to_messages(kw.get("messages"), kw.get("system")),
            lambda stream: stream.current_message_snapshot,
            _read_message,
        )
    return client


def _read_message(call: Call, message: Any) -> None:
    call.model = get(message, "model") or call.model
    call.response_id = get(message, "id")
    call.tokens_input = tokens(get(message, "usage", "input_tokens"))
    call.tokens_output = tokens(get(message, "usage", "output_tokens"))
    usage_details(call, get(message, "usage"), DETAILS)
    call.finish_reason = get(message, "stop_reason")
    for i, block in enumerate(get(message, "content") or []):
        kind = get(block, "type")
        if kind == "text" and isinstance(get(block, "text"), str):
            call.text.append(get(block, "text"))
        elif kind == "tool_use":
            call.tool_calls[i] = {
                "id": get(block, "id"),
                "name": get(block, "name"),
                "arguments": get(block, "input"),
            }


def _read_event(call: Call, event: Any) -> None:
    kind = get(event, "type")
    if kind == "message_start":
        message = get(event, "message")
        call.model = get(message, "model") or call.model
        call.response_id = get(message, "id")
        call.tokens_input = tokens(get(message, "usage", "input_tokens"))
        usage_details(call, get(message, "usage"), DETAILS)
    elif kind == "content_block_start":
        block = get(event, "content_block")
        if get(block, "type") == "tool_use":
            call.tool_calls[get(event, "index")] = {
                "id": get(block, "id"),
                "name": get(block, "name"),
                "arguments": "",
            }
    elif kind == "content_block_delta":
        delta = get(event, "delta")
        if get(delta, "type") == "text_delta" and isinstance(get(delta, "text"), str):
            call.text.append(get(delta, "text"))
        elif get(delta, "type") == "input_json_delta":
            entry = call.tool_calls.get(get(event, "index"))
            if entry is not None:
                entry["arguments"] += get(delta, "partial_json") or ""
    elif kind == "message_delta":
        output = tokens(get(event, "usage", "output_tokens"))
        if output is not None:
            call.tokens_output = output
        call.finish_reason = get(event, "delta", "stop_reason") or call.finish_reason
