"""Insert throughput of the ClickHouse-server store beside the embedded chDB store.

    python bench/bench_clickhouse_insert.py                 # 200,000 events, 3 rounds
    python bench/bench_clickhouse_insert.py --events 20000 --rounds 1   # smoke run

The same Arrow tables (watchllm_ext.store.rows.tables_for of realistic events: prompt calls
with tool calls, tool calls, agent steps, errors; written once to Arrow IPC files and read
back before the clock starts) are inserted batch by batch, as the writer's store sink does,
through:

  chdb        ChdbStore.insert into a temp folder (chDB in the measuring process);
  clickhouse  ClickHouseStore.insert (clickhouse-connect insert_arrow, lz4) over HTTP into
              tests/chfixture.py on 127.0.0.1;
  ch-nocomp   the same with compress=none.

Each system runs in its own process (chDB opens one data folder per process; the fixture is
one more process). Rounds alternate between the systems and the median round is reported;
the clock covers the insert calls only (not the schema, the fixture's start or the reading
of the Arrow files), and the row counts are checked after each run.

The fixture is chDB behind a small Python HTTP server, one query at a time: the figures
measure the client path (Arrow IPC, HTTP, compression) plus that fixture, not the ingest
rate of a real ClickHouse server. Only 127.0.0.1 is contacted; every process started here
is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PROJECT = "bench"
SYSTEMS = ("chdb", "clickhouse", "ch-nocomp")

_WORDS_TEXT = (
    "summarise the customer ticket below and suggest a reply that is polite short and accurate "
    "the order arrived late and the box was damaged please refund the shipping cost and tell "
    "me when the replacement will ship thanks for reaching out we are sorry your order"
)
_WORDS = _WORDS_TEXT.split()


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def make_event(i: int) -> dict[str, Any]:
    """A realistic event: 70% prompt calls (some with tool calls), then tool calls, agent
    steps and errors; ~200-character prompts and responses, tags, metadata, client info."""
    rng = random.Random(i)
    seconds = rng.randrange(7 * 86_400)
    base = {
        "event_id": f"ev-{i:07d}",
        "project_id": PROJECT,
        "run_id": f"run-{i // 8:06d}",
        "timestamp": f"2026-03-{8 + seconds // 86_400:02d}T{seconds // 3600 % 24:02d}:"
        f"{seconds // 60 % 60:02d}:{seconds % 60:02d}.{rng.randrange(1000):03d}Z",
        "user_id": f"user-{rng.randint(1, 5_000)}",
        "session_id": f"sess-{i // 40:05d}",
        "tags": ["chat", rng.choice(["tier-1", "tier-2", "vip"])],
        "release": "2026.03.2",
        "env": "production",
        "client": {"hostname": "web-7", "sdk_version": "0.1.0", "platform": "python-3.12"},
        "metadata": {"customer_id": f"cus_{rng.randrange(10**8):08d}", "ab": rng.choice("ab")},
    }
    kind = rng.random()
    if kind < 0.7:
        event = {
            **base,
            "event_type": "prompt_call",
            "model": rng.choice(["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]),
            "provider": "openai",
            "tokens_input": rng.randint(150, 2_500),
            "tokens_output": rng.randint(20, 700),
            "cost_estimate_usd": round(rng.random() / 100, 6),
            "prompt": _text(rng, 200),
            "response": _text(rng, 200),
            "response_metadata": {"finish_reason": "stop"},
            "status": rng.choice(["success"] * 9 + ["error"]),
            "latency_ms": round(rng.uniform(180.0, 4_000.0), 1),
        }
        if rng.random() < 0.3:
            event["tool_calls"] = [
                {"tool_name": "search", "tool_input": {"q": _text(rng, 30)}, "tool_output": "ok"}
            ]
        return event
    if kind < 0.85:
        return {
            **base,
            "event_type": "tool_call",
            "tool_name": rng.choice(["search", "calculator", "crm_lookup"]),
            "tool_input": {"q": _text(rng, 40)},
            "tool_output": _text(rng, 120),
            "status": "success",
            "latency_ms": round(rng.uniform(5.0, 900.0), 1),
        }
    if kind < 0.95:
        return {
            **base,
            "event_type": "agent_step",
            "step_number": rng.randint(1, 12),
            "step_name": rng.choice(["plan", "act", "observe"]),
            "reasoning": _text(rng, 150),
            "action": "search",
            "observation": _text(rng, 100),
            "latency_ms": round(rng.uniform(1.0, 50.0), 1),
        }
    return {**base, "event_type": "error", "error_type": "Timeout", "error_message": "timed out"}


# --- data -------------------------------------------------------------------------------------


def write_batches(events: int, batch: int, folder: Path) -> dict[str, int]:
    """tables_for of each batch of events, as Arrow IPC files; the row count of each table."""
    import pyarrow as pa

    from watchllm_ext.schema import EVENT_LIST_ADAPTER
    from watchllm_ext.store.rows import tables_for

    totals: dict[str, int] = {}
    for index, start in enumerate(range(0, events, batch)):
        raw = [make_event(i) for i in range(start, min(events, start + batch))]
        tables = tables_for(EVENT_LIST_ADAPTER.validate_python(raw))
        for table, data in tables.items():
            totals[table] = totals.get(table, 0) + data.num_rows
            path = folder / f"{index:05d}.{table}.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, data.schema) as out:
                out.write_table(data)
    return totals


def read_batches(folder: Path) -> list[list[tuple[str, Any]]]:
    import pyarrow as pa

    batches: dict[str, list[tuple[str, Any]]] = {}
    for path in sorted(folder.glob("*.arrow")):
        index, table, _ = path.name.split(".")
        with pa.memory_map(str(path)) as source:
            data = pa.ipc.open_file(source).read_all()
        batches.setdefault(index, []).append((table, data.combine_chunks()))
    # events first, as the store sink does
    order = {"events": 0, "tool_calls": 1, "agent_steps": 2}
    return [sorted(b, key=lambda item: order.get(item[0], 9)) for _, b in sorted(batches.items())]


# --- one measured run (a child process) -----------------------------------------------------------


def create_schema(store: Any) -> None:
    # The migrations' statements without the schema_migrations record (whose INSERT ...
    # VALUES with parameters the test fixture cannot take); the tables are the same.
    from watchllm_ext.store import load_migrations

    for migration in load_migrations():
        for statement in migration.statements():
            store.execute(statement)


def measure(store: Any, batches: list[list[tuple[str, Any]]]) -> tuple[float, dict[str, int]]:
    create_schema(store)
    started = time.perf_counter()
    for batch in batches:
        for table, data in batch:
            store.insert(table, data)
    elapsed = time.perf_counter() - started
    counts = {
        table: int(store.query(f"SELECT count() AS n FROM {table}")[0]["n"])
        for table in ("events", "tool_calls", "agent_steps")
    }
    return elapsed, counts


def role_run(system: str, data: Path, work: Path) -> None:
    batches = read_batches(data)
    if system == "chdb":
        sys.path.insert(0, str(ROOT))
        from watchllm_plugins.chdb_store import ChdbStore

        store = ChdbStore(work / "chdb")
        try:
            elapsed, counts = measure(store, batches)
        finally:
            store.close()
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import clickhouse_connect
        from chfixture import start_fixture

        from watchllm_plugins.clickhouse_store import ClickHouseStore

        fixture = start_fixture(work)
        try:
            admin = clickhouse_connect.get_client(
                **fixture.client_kwargs(autogenerate_session_id=False)
            )
            admin.command("CREATE DATABASE IF NOT EXISTS watchllm")
            admin.close()
            options = "?compress=none" if system == "ch-nocomp" else ""
            store = ClickHouseStore(fixture.url + "watchllm" + options)
            try:
                elapsed, counts = measure(store, batches)
            finally:
                store.close()
        finally:
            fixture.stop()
    print(json.dumps({"system": system, "seconds": elapsed, "counts": counts}))


# --- the orchestrator -----------------------------------------------------------------------------


def run_child(system: str, data: Path, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, str(HERE), "--role", system, "--data", str(data), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the {system} run failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per insert batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--role", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role_run(args.role, args.data, args.work)
        return

    temp = Path(tempfile.mkdtemp(prefix="bench-ch-insert-"))
    try:
        data = temp / "data"
        data.mkdir()
        started = time.perf_counter()
        totals = write_batches(args.events, args.batch, data)
        print(
            f"{args.events:,} events in batches of {args.batch:,} -> rows {totals}"
            f" (built in {time.perf_counter() - started:.1f} s)"
        )
        results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        for rnd in range(args.rounds):
            order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                got = run_child(system, data, temp / f"r{rnd}-{system}")
                want = {t: totals.get(t, 0) for t in got["counts"]}
                if got["counts"] != want:
                    raise SystemExit(f"{system}: stored {got['counts']}, inserted {want}")
                results[system].append(got["seconds"])
                print(
                    f"  round {rnd + 1} {system:<10} {got['seconds']:6.2f} s"
                    f"  {args.events / got['seconds']:>10,.0f} events/s"
                )
        all_rows = sum(totals.values())
        median = {system: statistics.median(times) for system, times in results.items()}
        print(f"\nmedian of {args.rounds} round(s); {all_rows:,} rows in all three tables")
        print(f"{'system':<11} {'seconds':>8} {'events/s':>11} {'rows/s':>11} {'vs chdb':>8}")
        for system in SYSTEMS:
            seconds = median[system]
            print(
                f"{system:<11} {seconds:8.2f} {args.events / seconds:11,.0f}"
                f" {all_rows / seconds:11,.0f} {median['chdb'] / seconds:8.2f}"
            )
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
