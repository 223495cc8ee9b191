"""bench/bench_otlp.py: its stream is what the SDK's exporter sends (512-span protobuf batches,
fresh ids, the GenAI and OpenInference spans it claims), and one short run end to end against
the bare baseline and a real WatchLLM server counts every span as queryable, none dropped.
Phoenix is not run here (it is not a dependency; the bench installs it into its own venv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from watchllm_ext.otel.decode import parse_protobuf, spans_of

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from bench_otlp import thread_cpu  # noqa: E402
from otlp_spans import BATCH_SPANS, make_bodies, read_bodies, write_bodies  # noqa: E402


def test_stream_is_sdk_batches_of_llm_traces(tmp_path: Path) -> None:
    made = make_bodies(3 * BATCH_SPANS - 7, seed=5)
    assert made.spans == 3 * BATCH_SPANS - 7
    assert len(made.bodies) == 3
    path = tmp_path / "bodies.bin"
    write_bodies(path, made.bodies)
    assert read_bodies(path) == made.bodies

    ids: set[tuple[bytes, bytes]] = set()
    ops: dict[str, int] = {}
    kinds: set[str] = set()
    per_body = []
    for body in made.bodies:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        n = 0
        for rs in req.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
            assert resource["service.name"] == "support-bot"
            for ss in rs.scope_spans:
                for span in ss.spans:
                    n += 1
                    ids.add((span.trace_id, span.span_id))
                    attrs = {kv.key: kv.value for kv in span.attributes}
                    if "gen_ai.operation.name" in attrs:
                        op = attrs["gen_ai.operation.name"].string_value
                        ops[op] = ops.get(op, 0) + 1
                    if "openinference.span.kind" in attrs:
                        kinds.add(attrs["openinference.span.kind"].string_value)
        per_body.append(n)
        # WatchLLM's own decoder takes every span of the body.
        assert len(spans_of(parse_protobuf(body)).spans) == n
    assert per_body == [BATCH_SPANS, BATCH_SPANS, BATCH_SPANS - 7]
    assert len(ids) == made.spans  # fresh trace and span ids: nothing collapses as a re-send
    assert {"chat", "execute_tool", "invoke_agent"} <= set(ops)
    assert {"LLM", "TOOL", "AGENT"} <= kinds
    assert 0 < made.llm_spans < made.spans


def test_short_run_bare_and_watchllm(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_otlp.py"),
            "--only",
            "bare",
            "--only",
            "watchllm",
            "--rate",
            "0",
            "--flat-spans",
            str(2 * BATCH_SPANS),
            "--conns",
            "2",
            "--max-wait-s",
            "120",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"bare", "watchllm"}
    for r in results.values():
        assert r["sent"] == 2 * BATCH_SPANS
        assert r["queryable"] == r["sent"] and r["dropped"] == 0, r
        assert r["statuses"] == {"200": 2}
        assert r["spans_s"] > 0
    wl = results["watchllm"]
    # The LLM spans are also events, each stored once.
    assert wl["extra"]["events"] == wl["expected_extra"]["events"] > 0
    assert "| flat out | watchllm |" in run.stdout


def test_thread_cpu_tells_the_main_thread_apart() -> None:
    """--profile's per-thread CPU: the event loop's thread is its own row, so a run shows
    whether the loop or the worker threads are the bottleneck."""
    done = threading.Event()

    def spin() -> None:
        started = time.thread_time()
        while time.thread_time() - started < 0.3:
            pass
        done.wait(10)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        time.sleep(0.5)  # the worker spins for 0.3 s of CPU, then waits, still alive
        cpu = thread_cpu(os.getpid())
    finally:
        done.set()
        worker.join()
    main = [name for name in cpu if name.endswith("(main: event loop)")]
    assert len(main) == 1, cpu
    others = sum(v for name, v in cpu.items() if name != main[0])
    assert others >= 0.2, cpu  # the worker's spin, counted apart from the main thread


def test_before_copy_imports_its_own_code(tmp_path: Path) -> None:
    """--before REV: the server of that system imports WatchLLM (and its store plugin and
    migrations) from the commit's copy, not from this checkout."""
    from bench_otlp import BEFORE_PACKAGES, before_copy

    root = before_copy("HEAD")
    try:
        where = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path[:0] = sys.argv[1:]; import watchllm_ext, "
                "watchllm_plugins.chdb_store as s, watchllm_clickhouse as c; "
                "print(watchllm_ext.__file__); print(s.__file__); print(list(c.__path__)[0])",
                str(root),
                str(root / BEFORE_PACKAGES),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        ).stdout.split()
    finally:
        shutil.rmtree(root)
    assert len(where) == 3
    assert all(p.startswith(str(root)) for p in where), where


def test_rounds_beside_a_commit(tmp_path: Path) -> None:
    """--before HEAD --rounds 2: each round runs both WatchLLMs, every span stored, and the
    report compares their medians."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [
            *(sys.executable, str(BENCH / "bench_otlp.py"), "--only", "watchllm"),
            *("--before", "HEAD", "--rounds", "2", "--rate", "0"),
            *("--flat-spans", str(BATCH_SPANS), "--conns", "1", "--max-wait-s", "120"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(r["system"] for r in results) == [
        "watchllm",
        "watchllm",
        "watchllm@HEAD",
        "watchllm@HEAD",
    ]
    for r in results:
        assert r["queryable"] == r["sent"] == BATCH_SPANS and r["dropped"] == 0, r
        assert r["extra"]["events"] == r["expected_extra"]["events"] > 0
    assert "flat out: watchllm / watchllm@HEAD (medians of 2 and 2 runs)" in run.stdout
