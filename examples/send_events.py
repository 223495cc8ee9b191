"""Send one event of each of the eight types to a running WatchLLM with the light client.

watchllm serve                                   # prints a key on first start
python examples/send_events.py --key wllm_...    # [--url http://127.0.0.1:8787]
"""

from __future__ import annotations

import argparse
import uuid

from watchllm_ext.sdk import WatchLLMClient


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8787")
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    with WatchLLMClient(args.url, args.key) as client:
        result = client.send(events(run_id))
    print(f"HTTP {result.status}: accepted {result.accepted} events of run {run_id}")
    for rejected in result.rejected:
        print("rejected:", rejected)


if __name__ == "__main__":
    main()
