"""bench/bench_ingest.py --versus: two real `watchllm serve` servers side by side, one per
side's code or settings; each batch burst is stored in full before its figures count, and
every single event answered 202 is stored once. Short runs end to end, as docs/BENCHMARKS.md
gives the command (fewer and smaller bursts; wrk, Debian's, for single events)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from system_packages import debian_program

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_ingest.py"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_versus_a_setting_runs_both_servers_and_reports_pair_by_pair(tmp_path: Path) -> None:
    out = tmp_path / "versus.json"
    done = run(
        "--versus-set", "flush_interval_s=0.5", "--part", "batch", "--rounds", "2",
        "--batches", "3", "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert "flush_interval_s" in figures["B"] and "flush_interval_s" not in figures["A"]
    for side in ("A", "B"):
        runs = figures["runs"][side]
        assert len(runs) == 2  # one burst a pair
        for r in runs:
            # Every accepted event was stored before the burst's figures were taken.
            assert r["events_s"] > 0 and r["accept_events_s"] >= r["events_s"]
            assert r["server_cpu_us_per_event"] > 0
    # Both servers say which code they serve (here both this tree's).
    assert done.stdout.count("serving the code in") == 2
    assert "B/A, pair by pair (2 pairs" in done.stdout
    assert "stored events/s" in done.stdout


def test_versus_single_events_counts_every_answer_stored(tmp_path: Path) -> None:
    debian_program("wrk")
    out = tmp_path / "versus.json"
    done = run(
        "--versus-set", "flush_interval_s=0.5", "--part", "single", "--quick", "--rounds", "1",
        "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert "runs" not in figures  # single events only
    for side in ("A", "B"):
        (run_,) = figures["single"][side]
        assert run_["rps"] > 0 and run_["requests"] > 0 and run_["non_2xx"] == 0
        assert 0 < run_["p50_ms"] <= run_["p99_ms"]
    assert "single events req/s" in done.stdout and "single p99 ms" in done.stdout


def test_versus_refuses_a_setting_that_does_not_parse(tmp_path: Path) -> None:
    done = run("--versus-set", "flush_interval_s=-1", cwd=tmp_path)
    assert done.returncode == 2
    assert "--versus-set" in done.stderr and "flush_interval_s" in done.stderr
    done = run("--versus-set", "no-equals-sign", cwd=tmp_path)
    assert done.returncode == 2 and "expected NAME=VALUE" in done.stderr
