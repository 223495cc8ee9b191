"""A small LLM app on FastAPI, observed and guarded by WatchLLM (mounted at /watchllm).

    pip install -e '.[server]'
    python examples/fastapi_app.py --port 8000
    curl -s -X POST localhost:8000/chat -H 'X-User-Id: alice' \
      -H 'Content-Type: application/json' -d '{"message": "hello"}'
    curl -sN 'localhost:8000/chat/stream?message=hello' -H 'X-User-Id: alice'
    curl -s -H "Authorization: Bearer $KEY" 'localhost:8000/watchllm/v1/analytics/logs?period=1h'

On its first start in a data folder (`--data-dir`, default ./.watchllm-app) it creates an
admin key of project "default" and prints it once as `KEY=wllm_...`; later starts keep it.
Every request to /chat gets a run (its id in the `X-WatchLLM-Run-Id` answer header), a
summary event (route, status, latency, user) and the LLM call made inside it, nested under
it. The user named by `X-User-Id` may spend `--budget-usd` a day (UTC, default $0.01; a call
of this app costs about $0.0016, so the seventh spends it): past it, /chat answers 429 with
Retry-After before calling the LLM. The spend a decision sees is up to ~5 s behind the calls
(docs/EMBEDDING.md, "Enforcement"), so calls sent less than that apart get a few more past
the budget before the first 429 (with 1.5 s between them, about nine).

The LLM is an OpenAI-compatible chat completions API at `--llm-url`; by default a fake one
this app serves itself at /fake-llm/v1 (so it runs offline, with no key). For a real one:
`--llm-url https://api.openai.com/v1` with OPENAI_API_KEY set. Ctrl-C stops it and flushes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

try:
    import httpx
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel

    from watchllm_ext import Settings, create_app
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.middleware import (
        Recorder,
        WatchLLMMiddleware,
        get_recorder,
        watchllm_route,
    )
    from watchllm_ext.serving.ports import port_problem
except ImportError as exc:  # one line, not a traceback: say which extra installs it
    sys.exit(f"error: {exc.name} is missing: pip install -e '.[server]'")

# A handler's recorder: its LLM calls join the request's run (module level: FastAPI resolves
# the annotation by name).
RecorderDep = Annotated[Recorder, Depends(get_recorder)]
FAKE_ANSWER = "WatchLLM saw this call: its tokens, cost and latency are in your run. " * 4


class Chat(BaseModel):
    message: str


def fake_llm_routes(app: FastAPI) -> None:
    """A stand-in for an OpenAI-compatible API: JSON answers and SSE streams, with usage."""

    @app.post("/fake-llm/v1/chat/completions", include_in_schema=False)
    @watchllm_route(enforce=False, record=False)  # the LLM's side, not the app's
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        usage = {
            "prompt_tokens": max(1, len(prompt.split())),
            "completion_tokens": len(FAKE_ANSWER.split()) * 3,
        }
        model = body.get("model", "gpt-4o")
        if not body.get("stream"):
            return {
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": FAKE_ANSWER}}],
                "usage": usage,
            }

        async def chunks() -> AsyncIterator[str]:
            for word in FAKE_ANSWER.split(" "):
                delta = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
                yield f"data: {json.dumps(delta)}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")


def build(data_dir: Path, port: int, llm_url: str | None, model: str, budget_usd: float) -> Any:
    watchllm = create_app(Settings(data_dir=data_dir, create_default_key=False))
    app = FastAPI(title="my LLM app")
    base = llm_url or f"http://127.0.0.1:{port}/fake-llm/v1"
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'fake')}"}
    llm = httpx.AsyncClient(base_url=base, headers=headers, timeout=60)

    @app.get("/")
    def home() -> dict[str, str]:
        return {"chat": "POST /chat", "stream": "GET /chat/stream", "watchllm": "/watchllm"}

    @app.post("/chat")
    async def chat(chat: Chat, rec: RecorderDep) -> dict[str, Any]:
        messages = [{"role": "user", "content": chat.message}]
        started = time.perf_counter()
        r = await llm.post("/chat/completions", json={"model": model, "messages": messages})
        r.raise_for_status()
        answer = r.json()
        text = answer["choices"][0]["message"]["content"]
        rec.prompt_call(
            model,
            provider="openai",
            prompt=messages,
            response=text,
            tokens_input=answer["usage"]["prompt_tokens"],
            tokens_output=answer["usage"]["completion_tokens"],
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        return {"answer": text, "run_id": rec.run_id}

    @app.get("/chat/stream")
    async def chat_stream(message: str, rec: RecorderDep) -> StreamingResponse:
        messages = [{"role": "user", "content": message}]
        body = {"model": model, "messages": messages, "stream": True}

        async def relay() -> AsyncIterator[str]:
            started = time.perf_counter()
            parts: list[str] = []
            usage: dict[str, int] = {}
            async with llm.stream("POST", "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        parts.append(piece)
                        yield f"data: {json.dumps(piece)}\n\n"  # to the client as it comes
            rec.prompt_call(
                model,
                provider="openai",
                prompt=messages,
                response="".join(parts),
                tokens_input=usage.get("prompt_tokens"),
                tokens_output=usage.get("completion_tokens"),
                latency_ms=(time.perf_counter() - started) * 1000,
            )

        return StreamingResponse(relay(), media_type="text/event-stream")

    @app.exception_handler(httpx.HTTPError)
    async def llm_down(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "llm_unavailable", "message": str(exc)}, status_code=502)

    if llm_url is None:
        fake_llm_routes(app)
    app.mount("/watchllm", watchllm)
    app.add_middleware(
        WatchLLMMiddleware,
        watchllm=watchllm,
        project_id="default",
        user_header="X-User-Id",
        user_daily_budget_usd=budget_usd,
    )
    return app


def first_key(data_dir: Path) -> str | None:
    """An admin key of project "default", made in the app's own key file when it has none."""
    keys = KeyStore(Settings(data_dir=data_dir).keys_path)
    if not keys.is_empty():
        return None
    return keys.create("default", scope="admin", name="created by examples/fastapi_app.py")


def main() -> int:
    parser = argparse.ArgumentParser(description="An LLM app on FastAPI with WatchLLM.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("WATCHLLM_DATA_DIR") or ".watchllm-app"),
        help="WatchLLM's data folder (default: $WATCHLLM_DATA_DIR or ./.watchllm-app)",
    )
    parser.add_argument("--llm-url", help="an OpenAI-compatible API (default: the built-in fake)")
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--budget-usd", type=float, default=0.01, help="per user per day (UTC)")
    args = parser.parse_args()
    # Before a key is made and printed for a server that cannot start.
    problem = port_problem(args.host, args.port)
    if problem is not None:
        sys.exit(f"error: {problem}")
    key = first_key(args.data_dir)
    if key:
        print(f"No API keys yet in {args.data_dir}: created an admin key of project 'default'.")
        print(f"KEY={key}")
    app = build(args.data_dir, args.port, args.llm_url, args.model, args.budget_usd)
    print(f"listening on http://{args.host}:{args.port} (WatchLLM at /watchllm)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
