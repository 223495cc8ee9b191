"""A local server that speaks enough of the OpenAI and Anthropic HTTP APIs for tests: chat
completions, responses and messages, as JSON or as streamed SSE, with request ids and errors.

    with FakeLLM() as llm:
        OpenAI(api_key="x", base_url=llm.openai_url)       # .../v1
        Anthropic(api_key="x", base_url=llm.anthropic_url)
        llm.fail_next(429)                                  # the next request answers 429
        llm.requests                                        # (path, body) of every request

The answer is `reply` (word by word when streamed, `chunk_delay_s` apart); token counts are
the words of the request's messages and of the reply. A request with `tools` is answered
with a call of the first tool (arguments {"city": "Paris"}).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k in ("content", "text", "input"))
    return 0


class FakeLLM:
    def __init__(self, reply: str = "Hello from the fake model", chunk_delay_s: float = 0.0):
        self.reply = reply
        self.cached_tokens = 2  # reported as cached input (OpenAI) / cache reads (Anthropic)
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._failures: list[tuple[int, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                fake._serve(self, self.path.split("?")[0], body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.openai_url = self.url + "/v1"
        self.anthropic_url = self.url
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail_next(self, status: int, message: str = "the fake model failed") -> None:
        with self._lock:
            self._failures.append((status, message))

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, path: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append((path, body))
            failure = self._failures.pop(0) if self._failures else None
            request_id = f"req_{next(self._ids)}"
        anthropic = path.endswith("/messages")
        id_header = "request-id" if anthropic else "x-request-id"
        if failure is not None:
            status, message = failure
            error = (
                {"type": "error", "error": {"type": "api_error", "message": message}}
                if anthropic
                else {"error": {"message": message, "type": "server_error", "code": None}}
            )
            self._json(handler, status, error, {id_header: request_id})
            return
        if path.endswith("/chat/completions"):
            kind = "chat"
            tokens_in = _words(body.get("messages"))
        elif path.endswith("/responses"):
            kind = "responses"
            tokens_in = _words(body.get("input")) + _words(body.get("instructions"))
        elif anthropic:
            kind = "messages"
            tokens_in = _words(body.get("messages")) + _words(body.get("system"))
        else:
            self._json(handler, 404, {"error": {"message": f"no route {path}"}}, {})
            return
        model = body.get("model", "fake-model")
        tool = _first_tool(body)
        words = self.reply.split(" ")
        tokens_out = len(words)
        if not body.get("stream"):
            answer = getattr(self, f"_{kind}_json")(model, tool, tokens_in, tokens_out)
            self._json(handler, 200, answer, {id_header: request_id})
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header(id_header, request_id)
        handler.end_headers()
        events = getattr(self, f"_{kind}_events")(body, model, tool, words, tokens_in)
        for name, data in events:
            chunk = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            handler.wfile.write(chunk.encode())
            handler.wfile.flush()
            if self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)

    @staticmethod
    def _json(
        handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str]
    ) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    # -- OpenAI chat completions -----------------------------------------------------------

    def _chat_json(self, model: str, tool: str | None, n_in: int, n_out: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.reply}
        finish = "stop"
        if tool:
            message = {"role": "assistant", "content": None, "tool_calls": [_openai_call(tool)]}
            finish = "tool_calls"
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": n_in,
                "completion_tokens": n_out,
                "total_tokens": n_in + n_out,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            },
        }

    def _chat_events(
        self, body: dict[str, Any], model: str, tool: str | None, words: list[str], n_in: int
    ) -> list[tuple[str | None, str]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[None, str]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
            return None, json.dumps(data)

        out = [chunk({"role": "assistant", "content": ""})]
        if tool:
            call = _openai_call(tool)
            args = call["function"]["arguments"]
            first = {**call, "index": 0, "function": {"name": tool, "arguments": ""}}
            out.append(chunk({"tool_calls": [first]}))
            for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            out.append(chunk({}, "tool_calls"))
        else:
            for i, word in enumerate(words):
                out.append(chunk({"content": word if i == 0 else " " + word}))
            out.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": n_in,
                "completion_tokens": len(words),
                "total_tokens": n_in + len(words),
            }
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
            out.append((None, json.dumps(data)))
        out.append((None, "[DONE]"))
        return out

    # -- OpenAI responses ------------------------------------------------------------------

    def _responses_json(
        self, model: str, tool: str | None, n_in: int, n_out: int, status: str = "completed"
    ) -> dict[str, Any]:
        if tool:
            output: list[dict[str, Any]] = [
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_1",
                    "name": tool,
                    "arguments": '{"city": "Paris"}',
                    "status": "completed",
                }
            ]
        else:
            output = [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.reply, "annotations": []}],
                }
            ]
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": status,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": n_in,
                "output_tokens": n_out,
                "total_tokens": n_in + n_out,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _responses_events(
        self, body: dict[str, Any], model: str, tool: str | None, words: list[str], n_in: int
    ) -> list[tuple[str | None, str]]:
        seq = itertools.count()
        start = self._responses_json(model, tool, n_in, 0, status="in_progress")
        start["output"], start["usage"] = [], None
        out: list[tuple[str | None, str]] = [
            _event("response.created", {"response": start, "sequence_number": next(seq)})
        ]
        done = self._responses_json(model, tool, n_in, len(words))
        item = done["output"][0]

        def add(name: str, **data: Any) -> None:
            out.append(_event(name, {**data, "sequence_number": next(seq)}))

        # The event order of the real API, which the SDK's own stream helper checks.
        opening = {**item, "status": "in_progress"}
        opening = {**opening, "content": []} if not tool else {**opening, "arguments": ""}
        add("response.output_item.added", output_index=0, item=opening)
        if tool:
            add(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=0,
                delta=item["arguments"],
            )
            add(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=0,
                arguments=item["arguments"],
            )
        else:
            empty = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
            add("response.content_part.added", **where, part=empty)
            for i, word in enumerate(words):
                add(
                    "response.output_text.delta",
                    **where,
                    delta=word if i == 0 else " " + word,
                    logprobs=[],
                )
            add("response.output_text.done", **where, text=self.reply, logprobs=[])
            add("response.content_part.done", **where, part=item["content"][0])
        add("response.output_item.done", output_index=0, item=item)
        out.append(_event("response.completed", {"response": done, "sequence_number": next(seq)}))
        return out

    # -- Anthropic messages ----------------------------------------------------------------

    def _messages_json(self, model: str, tool: str | None, n_in: int, n_out: int) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.reply}]
        stop = "end_turn"
        if tool:
            content = [
                {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {"city": "Paris"}}
            ]
            stop = "tool_use"
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": n_in,
                "output_tokens": n_out,
                "cache_read_input_tokens": self.cached_tokens,
            },
        }

    def _messages_events(
        self, body: dict[str, Any], model: str, tool: str | None, words: list[str], n_in: int
    ) -> list[tuple[str | None, str]]:
        start = self._messages_json(model, tool, n_in, 1)
        start["content"], start["stop_reason"] = [], None
        out = [_event("message_start", {"message": start})]
        if tool:
            block = {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}
            out.append(_event("content_block_start", {"index": 0, "content_block": block}))
            for piece in ('{"city": ', '"Paris"}'):
                delta = {"type": "input_json_delta", "partial_json": piece}
                out.append(_event("content_block_delta", {"index": 0, "delta": delta}))
        else:
            block = {"type": "text", "text": ""}
            out.append(_event("content_block_start", {"index": 0, "content_block": block}))
            for i, word in enumerate(words):
                delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
                out.append(_event("content_block_delta", {"index": 0, "delta": delta}))
        out.append(_event("content_block_stop", {"index": 0}))
        stop = {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None}
        out.append(_event("message_delta", {"delta": stop, "usage": {"output_tokens": len(words)}}))
        out.append(_event("message_stop", {}))
        return out


def _event(name: str, data: dict[str, Any]) -> tuple[str, str]:
    return name, json.dumps({"type": name, **data})


def _first_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    if not tools:
        return None
    tool = tools[0]
    return (tool.get("function") or {}).get("name") or tool.get("name")


def _openai_call(tool: str) -> dict[str, Any]:
    return {
        "id": "call_1",
        "type": "function",
        "function": {"name": tool, "arguments": '{"city": "Paris"}'},
    }
