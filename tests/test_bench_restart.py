"""bench/bench_restart.py: the first event's wait after a restart, a store with stored ids
against an empty one. A short run end to end, as docs/BENCHMARKS.md gives the command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_restart.py"


def test_a_short_run_reports_both_stores_and_their_ratio(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--ids", "20000", "--rounds", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    empty = re.search(r"empty store: ([\d.]+) s", done.stdout)
    big = re.search(r"20,000 ids stored: ([\d.]+) s \(x([\d.]+) the empty store's\)", done.stdout)
    assert empty and big, done.stdout
    assert float(empty[1]) > 0 and float(big[1]) > 0 and float(big[2]) > 0
