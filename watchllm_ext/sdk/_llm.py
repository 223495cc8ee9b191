"""What the OpenAI and Anthropic integrations share: wrapping one method of one client object,
timing a call, following a stream to its end, and logging the prompt_call.

Nothing here imports `openai` or `anthropic`: the objects are read by attribute, so the SDK
works with whatever version the application has, and a field that is missing is left out of
the event rather than failing the user's call.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ._events import capture
from .context import RunContext, _current, current_run, new_id

_WRAPPED = "__watchllm_wrapped__"


def get(obj: Any, *path: str) -> Any:
    """obj.a.b (or obj["a"]["b"]), None where any step is missing."""
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def as_dict(value: Any) -> Any:
    """A message or content part as plain JSON (pydantic objects by model_dump)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    return capture(value)


def tokens(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_details(call: Call, usage: Any, paths: dict[str, tuple[str, ...]]) -> None:
    """Token details the provider reports (cached input, reasoning, cache writes), kept in
    response_metadata under `paths`' names when present."""
    for name, path in paths.items():
        value = tokens(get(usage, *path))
        if value:
            call.usage_details[name] = value


def to_messages(messages: Any, system: Any = None) -> list[dict[str, Any]] | str | None:
    """Chat messages in the contract's shape: role, content (text or a list of parts), and
    name / tool_call_id when present; other keys (tool_calls, ...) are not part of it."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _content(system)})
    if isinstance(messages, str):
        if not out:
            return messages
        messages = [{"role": "user", "content": messages}]
    for message in messages or ():
        data = as_dict(message)
        if not isinstance(data, dict):
            data = {"role": "user", "content": str(data)}
        role = data.get("role") or data.get("type") or "user"
        item: dict[str, Any] = {"role": str(role)[:64], "content": _content(data.get("content"))}
        if item["content"] is None and data.get("output") is not None:  # a tool's output item
            item["content"] = _content(data["output"])
        for key in ("name", "tool_call_id"):
            if isinstance(data.get(key), str):
                item[key] = data[key]
        out.append(item)
    return out[-1000:] or None


def _content(content: Any) -> Any:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [as_dict(p) for p in content]
        return [p if isinstance(p, dict) else {"type": "text", "text": str(p)} for p in parts]
    return str(as_dict(content))


def json_or_text(text: Any) -> Any:
    """Tool arguments as sent (a JSON string) parsed when they parse."""
    import json

    if not isinstance(text, str):
        return capture(text)
    try:
        return json.loads(text)
    except ValueError:
        return text


class Call:
    """One model call: started at creation, logged once by `finish` (after the answer, or
    when a stream ends, fails or is closed) under the run that was current at the start."""

    def __init__(
        self, client: Any, provider: str, api: str, request: dict[str, Any], prompt: Any
    ) -> None:
        self.client = client
        self.provider = provider
        self.api = api
        self.context: RunContext | None = current_run()
        self.event_id = new_id()
        self.started = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.model = request.get("model")
        self.prompt = prompt
        self.stream = bool(request.get("stream"))
        self.first_token_ms: float | None = None
        self.done = False
        # Filled from the answer, or chunk by chunk from a stream.
        self.text: list[str] = []
        self.tool_calls: dict[Any, dict[str, Any]] = {}
        self.tokens_input: int | None = None
        self.tokens_output: int | None = None
        self.finish_reason: Any = None
        self.request_id: str | None = None
        self.response_id: str | None = None
        # Token details beside the two counts (cached, reasoning, cache writes).
        self.usage_details: dict[str, int] = {}

    def first_chunk(self) -> None:
        if self.first_token_ms is None:
            self.first_token_ms = (time.perf_counter() - self.t0) * 1000.0

    def finish(self, error: BaseException | None = None, closed_early: bool = False) -> None:
        if self.done:
            return
        self.done = True
        latency_ms = (time.perf_counter() - self.t0) * 1000.0
        meta: dict[str, Any] = {"api": self.api, "stream": self.stream}
        for key, value in (
            ("request_id", self.request_id),
            ("response_id", self.response_id),
            ("finish_reason", self.finish_reason),
            ("time_to_first_token_ms", self.first_token_ms),
        ):
            if value is not None:
                meta[key] = value if isinstance(value, str | float | int) else str(value)
        if closed_early:
            meta["closed_early"] = True
        meta.update(self.usage_details)
        status, message = "success", None
        if error is not None:
            name = type(error).__name__
            status = "timeout" if "Timeout" in name else "error"
            message = f"{name}: {error}"[:10_000]
            code = getattr(error, "status_code", None)
            if isinstance(code, int):
                meta["status_code"] = code
            request_id = getattr(error, "request_id", None)
            if isinstance(request_id, str):
                meta["request_id"] = request_id
        calls = [
            {
                k: v
                for k, v in (
                    ("id", c.get("id")),
                    ("tool_name", c.get("name") or "unknown"),
                    ("tool_input", json_or_text(c.get("arguments"))),
                )
                if v is not None
            }
            for c in self.tool_calls.values()
        ]
        fields: dict[str, Any] = {
            "event_id": self.event_id,
            "timestamp": self.started,
            "model": self.model if isinstance(self.model, str) else None,
            "provider": self.provider,
            "prompt": self.prompt,
            "response": "".join(self.text) if self.text else None,
            "tokens_input": self.tokens_input,
            "tokens_output": self.tokens_output,
            "latency_ms": latency_ms,
            "status": status,
            "error_message": message,
            "response_metadata": meta,
        }
        if calls:
            fields["tool_calls"] = calls[:256]
        token = _current.set(self.context)
        try:
            self.client.log_prompt_call(**fields)
        except Exception:  # strict mode or an odd answer: never fail the user's model call
            self.client._drop("invalid", 1, f"{self.provider} {self.api} call could not be logged")
        finally:
            _current.reset(token)


class SyncStream:
    """A provider's stream, passed through item by item; the call is logged at its end."""

    def __init__(self, stream: Any, call: Call, on_item: Callable[[Call, Any], None]) -> None:
        self._stream = stream
        self._call = call
        self._on_item = on_item
        call.request_id = call.request_id or _header_id(stream)

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._stream)
        except StopIteration:
            self._call.finish()
            raise
        except BaseException as exc:
            self._call.finish(exc)
            raise
        self._call.first_chunk()
        _safely(self._on_item, self._call, item)
        return item

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._call.finish(closed_early=True)
        self._stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class AsyncStream:
    def __init__(self, stream: Any, call: Call, on_item: Callable[[Call, Any], None]) -> None:
        self._stream = stream
        self._call = call
        self._on_item = on_item
        call.request_id = call.request_id or _header_id(stream)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._stream.__anext__()
        except StopAsyncIteration:
            self._call.finish()
            raise
        except BaseException as exc:
            self._call.finish(exc)
            raise
        self._call.first_chunk()
        _safely(self._on_item, self._call, item)
        return item

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._call.finish(closed_early=True)
        await self._stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _safely(fn: Callable[[Call, Any], None], call: Call, item: Any) -> None:
    # Reading an unexpected chunk shape must not break the user's stream.
    try:
        fn(call, item)
    except Exception:
        call.finish_reason = call.finish_reason or "unreadable_chunk"


def _header_id(stream: Any) -> str | None:
    headers = get(stream, "response", "headers")
    if headers is None:
        return None
    return headers.get("x-request-id") or headers.get("request-id")


def wrap_method(
    resource: Any,
    name: str,
    client: Callable[[], Any],
    provider: str,
    api: str,
    prompt_of: Callable[[dict[str, Any]], Any],
    read_answer: Callable[[Call, Any], None],
    read_item: Callable[[Call, Any], None],
) -> None:
    """Replace `resource.<name>` on this one object (never its class) by a timed version."""
    original = getattr(resource, name, None)
    if original is None or getattr(original, _WRAPPED, False):
        return

    def start(kwargs: dict[str, Any]) -> Call | None:
        sdk = client()
        if not sdk.enabled:
            return None
        try:
            prompt = prompt_of(kwargs)
        except Exception:
            prompt = None
        return Call(sdk, provider, api, kwargs, prompt)

    def answered(call: Call, result: Any) -> Any:
        if call.stream:
            return result  # wrapped by the caller, sync or async
        call.request_id = getattr(result, "_request_id", None)
        _safely(read_answer, call, result)
        call.finish()
        return result

    async def finish_async(call: Call, pending: Any) -> Any:
        try:
            result = await pending
        except BaseException as exc:
            call.finish(exc)
            raise
        if call.stream:
            return AsyncStream(result, call, read_item)
        return answered(call, result)

    # One wrapper for both kinds of client: the async client's methods return an awaitable
    # (they are not always coroutine functions once the SDK's decorators wrap them).
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = start(kwargs)
        if call is None:
            return original(*args, **kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            call.finish(exc)
            raise
        if inspect.isawaitable(result):
            return finish_async(call, result)
        if call.stream:
            return SyncStream(result, call, read_item)
        return answered(call, result)

    setattr(wrapper, _WRAPPED, True)
    setattr(resource, name, wrapper)


class StreamManager:
    """A provider's stream helper (`with client.messages.stream(...) as stream:`): the call
    is logged when the block ends, from the helper's own snapshot of the answer (the helper
    reads the stream itself, so no chunk passes through us: no time to first token)."""

    def __init__(
        self,
        manager: Any,
        call: Call,
        final_of: Callable[[Any], Any],
        read_final: Callable[[Call, Any], None],
    ) -> None:
        self._manager = manager
        self._call = call
        self._final_of = final_of
        self._read_final = read_final
        self._stream: Any = None

    def _opened(self, stream: Any) -> Any:
        self._stream = stream
        self._call.request_id = _header_id(stream)
        return stream

    def _closing(self, exc: BaseException | None) -> None:
        try:
            snapshot = self._final_of(self._stream)
        except Exception:  # nothing arrived (an error before the first event)
            snapshot = None
        if snapshot is not None:
            _safely(self._read_final, self._call, snapshot)
        self._call.finish(exc)

    def __enter__(self) -> Any:
        try:
            return self._opened(self._manager.__enter__())
        except BaseException as exc:
            self._call.finish(exc)
            raise

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        self._closing(exc)
        return self._manager.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Any:
        try:
            return self._opened(await self._manager.__aenter__())
        except BaseException as exc:
            self._call.finish(exc)
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        self._closing(exc)
        return await self._manager.__aexit__(exc_type, exc, tb)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)


def wrap_stream_manager(
    resource: Any,
    name: str,
    client: Callable[[], Any],
    provider: str,
    api: str,
    prompt_of: Callable[[dict[str, Any]], Any],
    final_of: Callable[[Any], Any],
    read_final: Callable[[Call, Any], None],
) -> None:
    """Replace the stream helper `resource.<name>` on this one object by one whose context
    manager logs the call at the end of its block."""
    original = getattr(resource, name, None)
    if original is None or getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sdk = client()
        manager = original(*args, **kwargs)
        if not sdk.enabled:
            return manager
        try:
            prompt = prompt_of(kwargs)
        except Exception:
            prompt = None
        call = Call(sdk, provider, api, {**kwargs, "stream": True}, prompt)
        return StreamManager(manager, call, final_of, read_final)

    setattr(wrapper, _WRAPPED, True)
    setattr(resource, name, wrapper)
