"""Send one event of each of the eight types to a running WatchLLM with the light client.

    watchllm serve                          # its first start prints `Key: wllm_...`; KEY=that key
    python examples/send_events.py --key $KEY

The server is $WATCHLLM_BASE_URL, else http://127.0.0.1:8787 (`--url` to name another); the
key may come from $WATCHLLM_API_KEY instead of `--key`. The events are dated now. A server
that is not there, or that refuses the key, is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import httpx

from watchllm_ext.sdk import WatchLLMClient, WatchLLMError


def events(run_id: str) -> list[dict]:
    new = WatchLLMClient.new_event
    return [
        new(
            "prompt_call",
            run_id,
            model="gpt-4o",
            provider="openai",
            prompt=[{"role": "user", "content": "What is the weather in Paris?"}],
            response="Let me check.",
            tokens_input=12,
            tokens_output=5,
            latency_ms=640.0,
            tool_calls=[{"id": "call_1", "tool_name": "weather", "tool_input": {"city": "Paris"}}],
        ),
        new(
            "tool_call",
            run_id,
            tool_name="weather",
            tool_input={"city": "Paris"},
            tool_output={"temp_c": 18},
            latency_ms=120.0,
        ),
        new(
            "agent_step",
            run_id,
            step_number=1,
            step_name="answer",
            reasoning="have weather",
            action="reply",
            observation="done",
        ),
        new("error", run_id, error_type="TimeoutError", error_message="upstream slow"),
        new(
            "assertion_failed",
            run_id,
            assertion_name="mentions_city",
            expected="Paris",
            actual="London",
            severity="high",
        ),
        new(
            "hallucination_detected",
            run_id,
            detection_method="nli",
            confidence=0.82,
            claim="Paris is in Italy",
            evidence="Paris is in France",
            severity="medium",
        ),
        new("cost_threshold_exceeded", run_id, threshold_usd=5.0, actual_usd=6.2, window="1d"),
        new(
            "performance_alert",
            run_id,
            metric="latency_p95_ms",
            threshold=1000.0,
            actual=1800.0,
            window="5m",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description="Send one event of each type.")
    parser.add_argument(
        "--url",
        default=os.environ.get("WATCHLLM_BASE_URL") or "http://127.0.0.1:8787",
        help="the server (default: $WATCHLLM_BASE_URL or http://127.0.0.1:8787)",
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("WATCHLLM_API_KEY"),
        help="an ingest (or admin) key (default: $WATCHLLM_API_KEY)",
    )
    args = parser.parse_args()
    if not args.key:
        parser.error(
            "--key (or WATCHLLM_API_KEY) is required: the first `watchllm serve` prints one"
        )
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    try:
        with WatchLLMClient(args.url, args.key) as client:
            result = client.send(events(run_id))
    except httpx.HTTPError as exc:
        print(
            f"error: cannot reach {args.url}: {exc} (is `watchllm serve` running?)", file=sys.stderr
        )
        return 1
    except WatchLLMError as exc:
        print(f"error: {args.url} refused the events: {exc}", file=sys.stderr)
        return 1
    print(f"HTTP {result.status}: accepted {result.accepted} events of run {run_id}")
    for rejected in result.rejected:
        print("rejected:", rejected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
