"""bench/bench_protocol.py: the HTTP protocol's own CPU a request, ours against uvicorn's, in
processes of their own. A short run end to end, as docs/BENCHMARKS.md gives the command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_protocol.py"


def test_a_short_run_reports_both_protocols_against_uvicorns(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "2000", "--rounds", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = dict(re.findall(r"^(uvicorn|watchllm) +([\d.]+) µs", done.stdout, re.M))
    assert set(found) == {"uvicorn", "watchllm"}, done.stdout
    assert all(float(us) > 0 for us in found.values())
    assert "x1.00 uvicorn's" in done.stdout
