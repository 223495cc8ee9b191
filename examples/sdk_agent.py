"""A small agent traced with the Python SDK: one run, nested steps, tool calls, a model call
and a recorded error, then the run's tree as the analytics API shows it.

    watchllm serve                          # its first start prints `Key: wllm_...`; KEY=that key
    WATCHLLM_API_KEY=$KEY WATCHLLM_BASE_URL=http://127.0.0.1:8787 python examples/sdk_agent.py

It needs only the base install (`pip install -e .`, no extras). The key must be able to read as well
as ingest (the key the first `watchllm serve` prints can) to print the tree; with an ingest
key it prints the run id only.
"""

from __future__ import annotations

import os
import sys
import time

import httpx

from watchllm_ext.sdk import WatchLLM, observe

watchllm = WatchLLM(flush_interval_s=0.2)  # WATCHLLM_API_KEY, WATCHLLM_BASE_URL


@observe(as_type="tool_call")
def weather(city: str) -> dict[str, str]:
    time.sleep(0.01)
    return {"city": city, "forecast": "sunny"}


@observe
def plan(question: str) -> list[str]:
    watchllm.log_prompt_call(
        model="gpt-4o-mini",
        provider="openai",
        prompt=[{"role": "user", "content": question}],
        response="check the weather in Paris and Rome",
        tokens_input=14,
        tokens_output=9,
        latency_ms=310.0,
    )
    return ["Paris", "Rome"]


@observe
def answer(question: str) -> str:
    forecasts = [weather(city) for city in plan(question)]
    try:
        weather("Atlantis")["forecast"].upper()
        raise LookupError("no forecast for Atlantis")
    except LookupError as exc:
        watchllm.log_error(exc)  # recorded, handled: the run goes on
    return ", ".join(f"{f['city']}: {f['forecast']}" for f in forecasts)


def show(node: dict, depth: int = 0) -> None:
    event = node["event"]
    label = (
        event.get("tool_name")
        or event.get("step_name")
        or event.get("model")
        or event.get("error_type")
        or event["event_type"]
    )
    status = f" ({event['status']})" if event.get("status") else ""
    print(f"{'  ' * depth}- {event['event_type']} {label}{status}")
    for child in node["children"]:
        show(child, depth + 1)


def main() -> int:
    if not watchllm.enabled:
        print("set WATCHLLM_API_KEY (and WATCHLLM_BASE_URL)", file=sys.stderr)
        return 1
    with watchllm.run(name="weather-question", user_id="demo-user") as run:
        print(answer("What is the weather in Paris and Rome?"))
    watchllm.flush(10)
    stats = watchllm.stats()
    print(f"run {run.run_id}: {stats['sent']} events sent, {stats['dropped_total']} dropped")
    base = os.environ.get("WATCHLLM_BASE_URL", "http://127.0.0.1:8787")
    headers = {"Authorization": f"Bearer {watchllm.api_key}"}
    for _ in range(50):  # the server stores within its flush interval (1 s by default)
        got = httpx.get(f"{base}/v1/analytics/runs/{run.run_id}", headers=headers)
        if got.status_code != 404:
            break
        time.sleep(0.1)
    if got.status_code == 200:
        for node in got.json()["tree"]:
            show(node)
    watchllm.close()
    return 0 if stats["dropped_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
