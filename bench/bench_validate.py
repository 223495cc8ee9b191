"""Per-event cost of the ingest steps that run in Python, in one process, beside a baseline.

    python bench/bench_validate.py              # 1,000-event batches, best of 60
    python bench/bench_validate.py --runs 200

The body is bench_ingest.py's realistic batch (prompt calls of ~1.1 KB). Each step runs on
the same body `--runs` times; the best time is reported per event, and as a ratio to the
baseline measured in the same run: pydantic-core parsing the body to Python objects
(`from_json`), the least any validation of this body can cost.

Steps: `validate_fast` (the server's all-valid path: one pydantic-core pass over the raw
bytes into event models); `fast_validate.validate_fast` (msgspec structs derived from the
contract, then the same event models), with its msgspec decoding alone beside it (the
strictness checks without the models); the spool encoding (`app._encode_events`) and the Arrow
tables for the store (`store.rows.tables_for`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import make_event
from pydantic_core import from_json

from watchllm_ext import fast_validate
from watchllm_ext.app import _encode_events
from watchllm_ext.ingest import validate_fast
from watchllm_ext.store.rows import tables_for


def best_us_per_event(fn: Callable[[], Any], runs: int, n: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    n = args.events
    body = json.dumps({"events": [make_event(i, "v1") for i in range(n)]}).encode()
    events = validate_fast(body, "batch")
    assert events is not None and len(events) == n, "the bench body must be valid"
    fast = fast_validate.validate_fast(body, "batch")
    assert fast is not None and _encode_events(fast) == _encode_events(events), "same events"
    baseline = best_us_per_event(lambda: from_json(body), args.runs, n)
    steps = {
        "validate_fast": lambda: validate_fast(body, "batch"),
        "fast_validate.validate_fast": lambda: fast_validate.validate_fast(body, "batch"),
        "  of which msgspec decoding": lambda: fast_validate._decode_batch(body),
        "encode for the spool": lambda: _encode_events(events),
        "Arrow tables for the store": lambda: tables_for(events),
    }
    print(f"{n} events per batch, {len(body) // n} bytes each; best of {args.runs} runs")
    print(f"  {'baseline: from_json (parse only)':<34} {baseline:7.2f} us/event   1.00x")
    for name, fn in steps.items():
        cost = best_us_per_event(fn, args.runs, n)
        print(f"  {name:<34} {cost:7.2f} us/event  {cost / baseline:5.2f}x")


if __name__ == "__main__":
    main()
