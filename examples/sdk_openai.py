"""OpenAI calls logged by wrapping the client object: a plain call, a streamed one and a tool
call, inside one run.

    export OPENAI_API_KEY=sk-...            # or OPENAI_BASE_URL for an OpenAI-compatible server
    WATCHLLM_API_KEY=$KEY WATCHLLM_BASE_URL=http://127.0.0.1:8787 python examples/sdk_openai.py

Needs the `openai` package (`pip install openai`); `--model` picks the model (gpt-4o-mini).
Each call becomes one prompt_call with model, tokens, latency, time to first token and the
request id; the server prices it from its tables.
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
except ImportError:  # one line, not a traceback
    sys.exit("error: this example needs the openai package: pip install openai")

from watchllm_ext.sdk import WatchLLM
from watchllm_ext.sdk.openai import wrap

NO_KEY = (
    "error: set OPENAI_API_KEY: this example calls the model (for an OpenAI-compatible"
    " server, OPENAI_BASE_URL and any key it takes; offline, the fake one that"
    " examples/fastapi_app.py serves: OPENAI_BASE_URL=http://127.0.0.1:8000/fake-llm/v1)"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    if not os.environ.get("OPENAI_API_KEY"):
        sys.exit(NO_KEY)
    watchllm = WatchLLM()
    client = wrap(OpenAI(), watchllm)
    question = [{"role": "user", "content": "In one sentence: why is the sky blue?"}]
    with watchllm.run(name="openai-example") as run:
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
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        client.chat.completions.create(model=args.model, messages=ask, tools=[WEATHER])
    watchllm.close()
    stats = watchllm.stats()
    print(f"run {run.run_id}: {stats['sent']} events sent, {stats['dropped_total']} dropped")
    return 0 if stats["dropped_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
