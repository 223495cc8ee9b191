"""A FastAPI app that mounts WatchLLM (at /watchllm) and sends its own OpenTelemetry spans to it
in-process: WatchLLMSpanExporter on the app's TracerProvider, no HTTP hop, no OTLP endpoint.

    pip install -e '.[examples]'
    python examples/otel_in_process.py --port 8000
    curl -s -X POST localhost:8000/ask -H 'Content-Type: application/json' \
      -d '{"question": "why is the sky blue?"}'
    curl -s -H "Authorization: Bearer $KEY" 'localhost:8000/watchllm/v1/analytics/runs?period=1h'

On its first start in a data folder (`--data-dir`, default ./.watchllm-otel) it creates an
admin key of project "default" and prints it once as `KEY=wllm_...`; later starts keep it.
Each /ask makes a span of its own ("POST /ask") around an OpenAI chat call that OpenTelemetry's
OpenAI instrumentation traces; both spans go to the mounted WatchLLM through the exporter, and
the answer gives the trace id, which is the run in WatchLLM
(`/watchllm/v1/analytics/runs/<trace id>`: the app's span with the prompt call under it).

The LLM is an OpenAI-compatible chat completions API at `--llm-url`; by default a fake one
this app serves itself at /fake-llm/v1 (so it runs offline, with no key). For a real one:
`--llm-url https://api.openai.com/v1` with OPENAI_API_KEY set. Ctrl-C stops it and flushes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI
    from openai import AsyncOpenAI
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind
    from pydantic import BaseModel

    from watchllm_ext import Settings, create_app, lifespan
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.otel.exporter import WatchLLMSpanExporter
    from watchllm_ext.serving.ports import port_problem
except ImportError as exc:  # one line, not a traceback: say which extra installs it
    sys.exit(f"error: {exc.name} is missing: pip install -e '.[examples]'")

FAKE_ANSWER = "Sunlight scatters off the air, and blue light scatters the most."


class Question(BaseModel):
    question: str


def ingest_key(data_dir: Path) -> tuple[str, str | None]:
    """The app's ingest key (made once, kept in the data folder), and the admin key made with
    it on the first start (None later: it was printed then)."""
    keys = KeyStore(data_dir / "keys.sqlite3")
    saved = data_dir / "otel-ingest.key"
    if saved.exists():
        return saved.read_text().strip(), None
    admin = keys.create("default", scope="admin")
    key = keys.create("default", scope="ingest")
    saved.write_text(key)
    saved.chmod(0o600)
    return key, admin


def build(data_dir: Path, port: int, llm_url: str | None, model: str) -> FastAPI:
    data_dir.mkdir(parents=True, exist_ok=True)
    key, admin = ingest_key(data_dir)
    if admin is not None:
        print(f"KEY={admin}", flush=True)
    watchllm = create_app(Settings(data_dir=data_dir, create_default_key=False))

    # The app's own tracing: its spans go to the WatchLLM mounted below, in this process.
    provider = TracerProvider(resource=Resource.create({"service.name": "otel-in-process"}))
    exporter = WatchLLMSpanExporter(watchllm, api_key=key)
    # Handing spans over in-process is cheap: every half second rather than the default 5 s.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
    os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    OpenAIInstrumentor().instrument(tracer_provider=provider)
    tracer = provider.get_tracer("otel-in-process")
    llm = AsyncOpenAI(
        base_url=llm_url or f"http://127.0.0.1:{port}/fake-llm/v1",
        api_key=os.environ.get("OPENAI_API_KEY", "fake"),
    )

    # lifespan(...) starts and stops the mounted WatchLLM with the app (Starlette runs no
    # lifespan of a mounted app). Ours runs inside it: at shutdown the provider hands over
    # its last spans while WatchLLM still runs, from a thread (the exporter waits on this
    # event loop, which must stay free meanwhile).
    @asynccontextmanager
    async def flush_spans(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(provider.shutdown)

    app = FastAPI(lifespan=lifespan(watchllm, host_lifespan=flush_spans))
    app.mount("/watchllm", watchllm)

    @app.get("/")
    def index() -> dict[str, str]:
        return {"ask": "POST /ask", "watchllm": "/watchllm"}

    @app.post("/ask")
    async def ask(body: Question) -> dict[str, str]:
        with tracer.start_as_current_span("POST /ask", kind=SpanKind.SERVER) as span:
            done = await llm.chat.completions.create(
                model=model, messages=[{"role": "user", "content": body.question}]
            )
            trace_id = f"{span.get_span_context().trace_id:032x}"
        return {"answer": done.choices[0].message.content or "", "trace_id": trace_id}

    @app.post("/fake-llm/v1/chat/completions")
    async def fake_llm(body: dict[str, Any]) -> dict[str, Any]:
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", model),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": FAKE_ANSWER},
                }
            ],
            "usage": {
                "prompt_tokens": words,
                "completion_tokens": len(FAKE_ANSWER.split()),
                "total_tokens": words + len(FAKE_ANSWER.split()),
            },
        }

    return app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("WATCHLLM_DATA_DIR") or ".watchllm-otel"),
        help="WatchLLM's data folder (default: $WATCHLLM_DATA_DIR or ./.watchllm-otel)",
    )
    parser.add_argument("--llm-url", help="an OpenAI-compatible API (default: the fake one)")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    # Before a key is made and printed for a server that cannot start.
    problem = port_problem(args.host, args.port)
    if problem is not None:
        sys.exit(f"error: {problem}")
    app = build(args.data_dir, args.port, args.llm_url, args.model)
    print(f"listening on http://{args.host}:{args.port} (WatchLLM at /watchllm)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
