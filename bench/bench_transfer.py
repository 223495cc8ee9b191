"""Export and import speed (docs/MOVING.md, "Speed"): a generated embedded folder is exported
with `watchllm export` and imported with `watchllm import`, each a real process, timed, with
its peak memory.

    python bench/bench_transfer.py --events 10000000             # into tests/chfixture.py
    python bench/bench_transfer.py --events 1000000 --url 'http://u:p@host:8123/empty_db'

The folder has N events (prompt calls with about 500 bytes of random text each, a worst
case for file sizes) and N/10 tool calls over three months, in two projects (acme 80%,
other 20%), made in chDB with INSERT ... SELECT FROM numbers(N). Without --url the import
goes to the test fixture (ClickHouse's HTTP interface served by chDB, one query at a time,
on this machine), which is not a real server. Everything is written under --work (a new
temporary folder by default), which is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHLLM = [sys.executable, "-m", "watchllm_ext.cli"]
STAMP = (
    "toDateTime64('2026-01-01 00:00:00', 3, 'UTC')"
    " + toIntervalMillisecond(number * 777 % (90 * 86400000))"
)

EVENTS = f"""
INSERT INTO events (project_id, event_id, event_type, run_id, timestamp, user_id, tags, env,
  metadata, prompt, model, provider, tokens_input, tokens_output, cost_estimate_usd,
  cost_source, response, tool_call_count, status, latency_ms, ingested_at)
SELECT if(number % 5 = 0, 'other', 'acme'), concat('e', toString(number)), 'prompt_call',
  concat('run-', toString(intDiv(number, 10))), {STAMP}, concat('user-', toString(number % 1000)),
  ['t1', 'x'], 'prod', '{{"k": 1}}',
  concat('Summarise document ', toString(number), ': ', randomPrintableASCII(300)),
  ['gpt-4o', 'gpt-4o-mini', 'claude'][number % 3 + 1], 'openai', number % 4000, number % 1500,
  (number % 1000) / 100000, 'computed', concat('Answer: ', randomPrintableASCII(200)), 0,
  if(number % 17 = 0, 'error', 'success'), number % 8000, now64(3)
FROM numbers(__N__)
"""
TOOL_CALLS = f"""
INSERT INTO tool_calls (project_id, event_id, call_index, source, run_id, timestamp, tool_name,
  tool_input, tool_output, status, latency_ms, ingested_at)
SELECT if(number % 5 = 0, 'other', 'acme'), concat('e', toString(number)), 0, 'prompt_call',
  concat('run-', toString(intDiv(number, 10))), {STAMP}, 'search', '{{"q": "x"}}',
  randomPrintableASCII(100), 'success', 5, now64(3)
FROM numbers(__N__)
"""


def generate(data_dir: Path, n: int) -> None:
    from watchllm_ext.store import apply_migrations
    from watchllm_plugins.chdb_store import ChdbStore

    store = ChdbStore(data_dir / "chdb")
    try:
        apply_migrations(store)
        store.execute(EVENTS.replace("__N__", str(n)))
        store.execute(TOOL_CALLS.replace("__N__", str(n // 10)))
    finally:
        store.close()


def timed(*args: str) -> tuple[float, float, str]:
    """Run `watchllm ARGS`: (seconds, peak RSS in MB, its output). A child's peak RSS starts
    at its parent's RSS when it forks, so this process keeps away from chDB."""
    started = time.monotonic()
    process = subprocess.Popen(
        [*WATCHLLM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    if process.returncode != 0:
        raise SystemExit(f"watchllm {args[0]} failed ({process.returncode}):\n{output}")
    return time.monotonic() - started, usage.ru_maxrss / 1024, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--url", help="an empty database on a ClickHouse server")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_into:  # in a child process, so that this one stays small (see timed)
        generate(args.generate_into, args.events)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    fixture = None
    try:
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--events",
                str(args.events),
                "--generate-into",
                str(work / "data"),
            ],
            check=True,
        )
        print(f"generated {args.events:,} events in {time.monotonic() - started:.0f} s")
        url = args.url
        if url is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from chfixture import start_fixture

            fixture = start_fixture(work / "fixture", "bench", "bench")
            store_url = fixture.url + "default"
            url = fixture.url + "bench"
            from watchllm_plugins.clickhouse_store import ClickHouseStore

            admin = ClickHouseStore(store_url)
            admin.execute("CREATE DATABASE bench")
            admin.close()
        export = work / "export"
        seconds, rss, _ = timed("export", str(export), "--data-dir", str(work / "data"))
        size = sum(p.stat().st_size for p in export.rglob("*.parquet"))
        total = args.events + args.events // 10
        print(
            f"export: {seconds:.1f} s, {total / seconds:,.0f} rows/s, {size / 1e6:,.0f} MB of"
            f" Parquet, peak RSS {rss:,.0f} MB"
        )
        seconds, rss, output = timed("import", str(export), "--url", url)
        verify = next(line for line in output.splitlines() if line.startswith("all "))
        print(
            f"import: {seconds:.1f} s, {total / seconds:,.0f} rows/s, peak RSS {rss:,.0f} MB"
            f" ({verify})"
        )
    finally:
        if fixture is not None:
            fixture.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
