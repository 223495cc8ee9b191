"""Per-event cost of the ingest steps that run in Python, in one process, beside a baseline.

    python bench/bench_validate.py              # 1,000-event batches, best of 60
    python bench/bench_validate.py --runs 200

The body is bench_ingest.py's realistic batch (prompt calls of ~1.1 KB). Each step runs on
the same body `--runs` times; the best time is reported per event, and as a ratio to the
baseline measured in the same run: pydantic-core parsing the body to Python objects
(`from_json`), the least any validation of this body can cost.

Steps, the server's path first: `validate_fast` (msgspec structs derived from the contract,
ingest/fast_validate.py), with its msgspec decoding alone beside it; `finish_fast` (the project,
fill-in and the built-in cost transform on the structs); the spool encoding
(`app._encode_events`) and decoding (`app._decode_events`, what the writer reads back). Then
what pydantic costs for the same work (the path before the structs, and the one a body with
anything off still takes): validating the body into models, encoding and decoding them;
and a whole batch with one bad event, through the slow path that names the bad field.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import make_event
from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic_core import from_json

from watchllm_ext.app import _decode_events, _encode_events
from watchllm_ext.auth import Principal
from watchllm_ext.ingest.fast_validate import validate_fast
from watchllm_ext.ingest.validate import finish_fast, validate_items
from watchllm_ext.plugins import get_plugin_manager
from watchllm_ext.schema import EVENT_LIST_ADAPTER, Event
from watchllm_ext.settings import load_settings


class _BatchBody(BaseModel):
    """The batch as pydantic reads it (the server's fast path before the structs)."""

    model_config = ConfigDict(extra="forbid")
    events: list[Event]


_PYDANTIC_BATCH = TypeAdapter(_BatchBody)
_TRUSTED = {"trusted": True}


def best_us_per_event(
    fn: Callable[[], Any], runs: int, n: int, before: Callable[[], Any] | None = None
) -> float:
    """The best of `runs` timed calls of `fn`, per event; `before` runs untimed before each."""
    best = float("inf")
    for _ in range(runs):
        if before is not None:
            before()
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
    raw = [make_event(i, "v1") for i in range(n)]
    body = json.dumps({"events": raw}).encode()
    bad = copy.deepcopy(raw)
    bad[n // 2]["tokens_input"] = -1  # one bad event: the slow path, with its answer
    bad_body = json.dumps({"events": bad}).encode()

    pm = get_plugin_manager(load_settings(), entry_points=False)
    principal = Principal(project_id="bench", key_id="bench", scopes=frozenset({"ingest"}))
    structs = validate_fast(body, "batch")
    assert structs is not None and len(structs) == n, "the bench body must be valid"
    finish_fast(structs, principal, pm)  # filled in and costed: what the spool gets
    payload = _encode_events(structs)
    models = EVENT_LIST_ADAPTER.validate_json(payload, context=_TRUSTED)
    pydantic_payload = EVENT_LIST_ADAPTER.dump_json(models, exclude_none=True)
    assert json.loads(payload) == json.loads(pydantic_payload), "same keys and values"
    outcome = validate_items(from_json(bad_body)["events"], principal, pm)
    assert len(outcome.accepted) == n - 1 and len(outcome.rejected) == 1

    def fresh_finish() -> None:
        events = validate_fast(body, "batch")
        assert events is not None
        finish_fast(events, principal, pm)

    def slow_path() -> None:
        validate_items(from_json(bad_body)["events"], principal, pm)

    baseline = best_us_per_event(lambda: from_json(body), args.runs, n)
    decode_cost = best_us_per_event(lambda: validate_fast(body, "batch"), args.runs, n)
    steps: dict[str, Callable[[], Any] | float] = {
        "validate_fast (msgspec structs)": decode_cost,
        "validate_fast + finish_fast": fresh_finish,
        "encode for the spool": lambda: _encode_events(structs),
        "decode from the spool": lambda: _decode_events(payload),
        "pydantic: validate the batch": lambda: _PYDANTIC_BATCH.validate_json(body),
        "pydantic: encode for the spool": lambda: EVENT_LIST_ADAPTER.dump_json(
            models, exclude_none=True
        ),
        "pydantic: decode from the spool": lambda: EVENT_LIST_ADAPTER.validate_json(
            payload, context=_TRUSTED
        ),
        "one bad event: the slow path": slow_path,
    }
    print(f"{n} events per batch, {len(body) // n} bytes each; best of {args.runs} runs")
    print(f"  {'baseline: from_json (parse only)':<36} {baseline:7.2f} us/event   1.00x")
    for name, step in steps.items():
        cost = step if isinstance(step, float) else best_us_per_event(step, args.runs, n)
        print(f"  {name:<36} {cost:7.2f} us/event  {cost / baseline:5.2f}x")


if __name__ == "__main__":
    main()
