"""What the Python SDK costs the application, and how fast it delivers.

Against a real `watchllm serve` child process (embedded chDB, spool with fsync), in one run:

1. caller cost: p50 / p99 / max of one `log_prompt_call` (typical fields: model, tokens,
   latency, a short prompt and response) timed on the caller's thread while the SDK's worker
   delivers in the background, beside a no-op call with the same arguments in the same run
   (what Python's call overhead alone costs). Target (issue 12): p99 under 50 us.
2. the same inside `client.run()` with an `@observe`d function per 10 events (context
   variables set and read), reported per log call;
3. throughput: `--events` events logged as fast as one thread can, then `flush()`: events
   per second from the first call to the last 2xx, and the counters of `client.stats()`.

    python bench/bench_sdk.py                  # 100,000 timed calls, 200,000 for throughput
    python bench/bench_sdk.py --calls 20000 --events 50000   # quicker
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import free_port, spawn, stop, stop_all  # noqa: E402

PROJECT = "bench"


def start_server(work: Path) -> tuple[Any, str, str]:
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    data_dir = work / "data"
    (work / "watchllm.toml").write_text('log_level = "warning"\ncreate_default_key = false\n')
    key = KeyStore(Settings(data_dir=data_dir).keys_path).create(PROJECT, scope="admin")
    port = free_port()
    args = [sys.executable, "-m", "watchllm_ext.cli", "serve", "--data-dir", str(data_dir)]
    proc = spawn([*args, "--port", str(port)], log=work / "serve.log", cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError("watchllm serve exited:\n" + (work / "serve.log").read_text())
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return proc, url, key
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("watchllm serve did not start; see serve.log")
        time.sleep(0.2)


def noop(**fields: Any) -> str:
    return "x"


def percentiles(ns: list[int]) -> dict[str, float]:
    ordered = sorted(ns)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1000,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1000,
        "max_us": ordered[-1] / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
    }


def time_calls(fn: Any, calls: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for i in range(calls):
        t0 = clock()
        fn(
            model="gpt-4o",
            provider="openai",
            prompt="What is the capital of France?",
            response="Paris.",
            tokens_input=12,
            tokens_output=3,
            latency_ms=420.5,
            metadata={"i": i},
        )
        out.append(clock() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="timed calls per series")
    parser.add_argument("--events", type=int, default=200_000, help="events for throughput")
    args = parser.parse_args()
    atexit.register(stop_all)

    from watchllm_ext.sdk import WatchLLM, observe

    work = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    proc, url, key = start_server(work)
    results: dict[str, Any] = {"calls": args.calls, "events": args.events}
    try:
        client = WatchLLM(api_key=key, base_url=url, max_queue=1_000_000)
        client.log_tool_call("warm-up")
        client.flush(30)
        gc.collect()
        # Interleaved halves: the no-op and the SDK see the same machine state.
        half = args.calls // 2
        base = time_calls(noop, half) + time_calls(noop, args.calls - half)
        sdk = time_calls(client.log_prompt_call, half)
        base += time_calls(noop, 1)
        sdk += time_calls(client.log_prompt_call, args.calls - half)
        results["noop"] = percentiles(base)
        results["log_prompt_call"] = percentiles(sdk)

        @observe(capture_input=False, capture_output=False)
        def step(n: int) -> None:
            for _ in range(n):
                client.log_prompt_call(model="gpt-4o", tokens_input=12, tokens_output=3)

        rounds = max(1, args.calls // 10)
        t0 = time.perf_counter_ns()
        with client.run(name="bench"):
            for _ in range(rounds):
                step(10)
        per_call = (time.perf_counter_ns() - t0) / (rounds * 11) / 1000
        results["in_run_with_observe_mean_us_per_event"] = round(per_call, 2)
        assert client.flush(300), client.stats()
        before = client.stats()["sent"]

        t0 = time.perf_counter()
        for i in range(args.events):
            client.log_prompt_call(model="gpt-4o", tokens_input=i % 1000, tokens_output=3)
        logged = time.perf_counter() - t0
        assert client.flush(600), client.stats()
        total = time.perf_counter() - t0
        stats = client.stats()
        results["throughput"] = {
            "log_calls_per_s": round(args.events / logged),
            "delivered_per_s": round((stats["sent"] - before) / total),
            "seconds": round(total, 2),
        }
        results["stats"] = {k: stats[k] for k in ("sent", "batches", "retries", "dropped_total")}
        client.close()
    finally:
        stop(proc)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
