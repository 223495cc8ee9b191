"""OpenAI: `wrap(OpenAI())` or `wrap(AsyncOpenAI())` logs every chat completion and response.

    from openai import OpenAI
    from watchllm_ext.sdk import WatchLLM
    from watchllm_ext.sdk.openai import wrap

    watchllm = WatchLLM()
    client = wrap(OpenAI())            # the same object, its two create methods timed

Wraps `client.chat.completions.create` and `client.responses.create` of the object handed in
(no global patching: other OpenAI clients are untouched), sync and async, streamed or not;
the `chat.completions.stream(...)` and `responses.stream(...)` helpers go through `create`
and are logged there.
Each call is one prompt_call: model, tokens (a stream reports them only when asked with
`stream_options={"include_usage": True}`), latency, time to first token, status, error, the
provider's request id; the server prices it from its tables. A stream is logged when it
ends, fails or is closed.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._llm import Call, get, to_messages, tokens, usage_details, wrap_method

CHAT_DETAILS = {
    "cached_tokens": ("prompt_tokens_details", "cached_tokens"),
    "reasoning_tokens": ("completion_tokens_details", "reasoning_tokens"),
}
RESPONSES_DETAILS = {
    "cached_tokens": ("input_tokens_details", "cached_tokens"),
    "reasoning_tokens": ("output_tokens_details", "reasoning_tokens"),
}

C = TypeVar("C")


def wrap(client: C, watchllm: Any = None) -> C:
    """Instrument this OpenAI / AsyncOpenAI object; returns it. `watchllm` is the WatchLLM
    client to log to (by default the one made last, resolved at each call)."""

    def sdk() -> Any:
        from .core import get_client

        return watchllm or get_client()

    completions = get(client, "chat", "completions")
    if completions is not None:
        wrap_method(
            completions,
            "create",
            sdk,
            "openai",
            "chat.completions",
            lambda kw: to_messages(kw.get("messages")),
            _read_completion,
            _read_chunk,
        )
        # chat.completions.stream(...) (the helper) goes through this create(stream=True):
        # it is logged there, with its time to first token; wrapping it too would log twice.
    responses = getattr(client, "responses", None)
    if responses is not None:
        wrap_method(
            responses,
            "create",
            sdk,
            "openai",
            "responses",
            lambda kw: to_messages(kw.get("input"), kw.get("instructions")),
            _read_response,
            _read_response_event,
        )
    return client


def _read_completion(call: Call, result: Any) -> None:
    call.model = get(result, "model") or call.model
    call.response_id = get(result, "id")
    call.tokens_input = tokens(get(result, "usage", "prompt_tokens"))
    call.tokens_output = tokens(get(result, "usage", "completion_tokens"))
    usage_details(call, get(result, "usage"), CHAT_DETAILS)
    choices = get(result, "choices") or []
    if choices:
        message = get(choices[0], "message")
        content = get(message, "content")
        if isinstance(content, str):
            call.text.append(content)
        for i, tool_call in enumerate(get(message, "tool_calls") or []):
            call.tool_calls[i] = {
                "id": get(tool_call, "id"),
                "name": get(tool_call, "function", "name"),
                "arguments": get(tool_call, "function", "arguments"),
            }
        call.finish_reason = get(choices[0], "finish_reason")


def _read_chunk(call: Call, chunk: Any) -> None:
    call.model = get(chunk, "model") or call.model
    call.response_id = call.response_id or get(chunk, "id")
    usage = get(chunk, "usage")
    if usage is not None:
        call.tokens_input = tokens(get(usage, "prompt_tokens"))
        call.tokens_output = tokens(get(usage, "completion_tokens"))
        usage_details(call, usage, CHAT_DETAILS)
    for choice in get(chunk, "choices") or []:
        delta = get(choice, "delta")
        content = get(delta, "content")
        if isinstance(content, str):
            call.text.append(content)
        for piece in get(delta, "tool_calls") or []:
            index = get(piece, "index")
            entry = call.tool_calls.setdefault(index, {"arguments": ""})
            if get(piece, "id"):
                entry["id"] = get(piece, "id")
            if get(piece, "function", "name"):
                entry["name"] = get(piece, "function", "name")
            entry["arguments"] += get(piece, "function", "arguments") or ""
        if get(choice, "finish_reason"):
            call.finish_reason = get(choice, "finish_reason")


def _read_response(call: Call, response: Any) -> None:
    call.model = get(response, "model") or call.model
    call.response_id = get(response, "id")
    call.tokens_input = tokens(get(response, "usage", "input_tokens"))
    call.tokens_output = tokens(get(response, "usage", "output_tokens"))
    usage_details(call, get(response, "usage"), RESPONSES_DETAILS)
    call.finish_reason = get(response, "status")
    call.text = []
    for i, item in enumerate(get(response, "output") or []):
        kind = get(item, "type")
        if kind == "message":
            for part in get(item, "content") or []:
                if get(part, "type") == "output_text" and isinstance(get(part, "text"), str):
                    call.text.append(get(part, "text"))
        elif kind == "function_call":
            call.tool_calls[i] = {
                "id": get(item, "call_id"),
                "name": get(item, "name"),
                "arguments": get(item, "arguments"),
            }


def _read_response_event(call: Call, event: Any) -> None:
    kind = get(event, "type")
    if kind == "response.output_text.delta":
        delta = get(event, "delta")
        if isinstance(delta, str):
            call.text.append(delta)
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        _read_response(call, get(event, "response"))
        if kind == "response.failed":
            call.finish_reason = "failed"
