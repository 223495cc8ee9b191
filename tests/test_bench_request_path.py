"""bench/bench_request_path.py: the single-event request path in-process, each variant in a
process of its own with the app's lifespan running, every request answered 202 before its
figures count. A short run end to end, as docs/BENCHMARKS.md gives the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_request_path.py"


def test_quick_run_reports_each_variant_against_the_memory_log(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--requests", "500", "--only", "spool-always",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())["medians"]
    assert set(figures) == {"memory-log", "spool-always"}  # the baseline always runs
    for variant in figures.values():
        assert variant["requests_s"] > 0 and variant["loop_us_per_request"] > 0
    assert "spool-always" in done.stdout and "x base" in done.stdout


def test_a_bad_count_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--concurrency", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--concurrency must be" in done.stderr


def test_lane_pairs_compare_the_lane_with_starlettes_layers(tmp_path: Path) -> None:
    out = tmp_path / "pairs.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--lane-pairs", "2", "--requests", "300", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert len(figures["pairs"]) == 2 and all(a > 0 and b > 0 for a, b in figures["pairs"])
    assert "lane / Starlette" in done.stdout
