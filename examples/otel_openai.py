"""An OpenAI app traced with OpenTelemetry reports to WatchLLM with no WatchLLM code: the
standard OTEL_EXPORTER_OTLP_* variables point its exporter at WatchLLM's OTLP receiver.

    export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:8787
    export OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer%20$KEY"
    export OTEL_SERVICE_NAME=otel-openai-example
    python examples/otel_openai.py --instrumentation openai-v2

Needs `pip install -e '.[examples]'` and OPENAI_API_KEY (or OPENAI_BASE_URL for an
OpenAI-compatible server). `--instrumentation openinference` uses OpenInference's OpenAI
instrumentation instead of OpenTelemetry's own; `--model` picks the model (gpt-4o-mini).
The app makes one span of its own around two calls (a plain one and a streamed one): WatchLLM
stores the three spans as sent and makes each call a prompt_call, nested under the app's span,
with model, tokens, latency and a cost from its price tables. It prints the trace id, which is
the run id in WatchLLM (`/v1/analytics/runs/<trace id>`).
No OpenAI key? `python examples/fastapi_app.py` serves a fake OpenAI-compatible model at
http://127.0.0.1:8000/fake-llm/v1, offline: set OPENAI_BASE_URL to that and OPENAI_API_KEY to any
value.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from openai import OpenAI
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
except ImportError as exc:  # one line, not a traceback: say which extra installs it
    sys.exit(f"error: {exc.name} is missing: pip install -e '.[examples]'")

NO_KEY = (
    "error: set OPENAI_API_KEY: this example calls the model (for an OpenAI-compatible"
    " server, OPENAI_BASE_URL and any key it takes; offline, the fake one that"
    " examples/fastapi_app.py serves: OPENAI_BASE_URL=http://127.0.0.1:8000/fake-llm/v1)"
)


def instrument(name: str, provider: TracerProvider) -> None:
    if name == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        # Message content is recorded only when asked for (it may hold personal data).
        os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
        OpenAIInstrumentor().instrument(tracer_provider=provider)
    else:
        from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInference

        OpenInference().instrument(tracer_provider=provider)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--instrumentation", choices=["openai-v2", "openinference"], default="openai-v2"
    )
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    if not os.environ.get("OPENAI_API_KEY"):
        sys.exit(NO_KEY)
    # The usual OpenTelemetry setup: the exporter reads its endpoint, headers, compression and
    # timeout from OTEL_EXPORTER_OTLP_*, the resource its service name from OTEL_SERVICE_NAME.
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    instrument(args.instrumentation, provider)
    client = OpenAI()
    question = [{"role": "user", "content": "In one sentence: why is the sky blue?"}]
    with provider.get_tracer("otel-openai-example").start_as_current_span("answer") as span:
        done = client.chat.completions.create(model=args.model, messages=question)
        print(done.choices[0].message.content)
        stream = client.chat.completions.create(
            model=args.model,
            messages=question,
            stream=True,
            stream_options={"include_usage": True},  # so the stream reports its tokens
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    provider.shutdown()  # sends what the batch processor still holds
    print(f"trace {span.get_span_context().trace_id:032x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
