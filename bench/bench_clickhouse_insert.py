"""Insert throughput of the store's two ways in, on the embedded chDB store and on the
ClickHouse-server store.

    python bench/bench_clickhouse_insert.py                 # 200,000 events, 3 rounds
    python bench/bench_clickhouse_insert.py --events 50000 --rounds 1   # smoke run

The same realistic events (prompt calls, some with tool calls, tool calls, agent steps,
errors) are inserted batch by batch (50,000 events, store_insert_max_events) in two forms,
prepared before the clock starts:

  json   the store sink's path: the events' JSON (store/rows.py input_json) into the input
         tables of migration 0010 (Store.insert_json, FORMAT JSONEachRow), whose materialized
         views build the rows in ClickHouse's threads;
  arrow  the Arrow tables of store/rows.py tables_for (Store.insert), the path before 0010;

into each system:

  chdb        ChdbStore in a temp folder (chDB in the measuring process);
  clickhouse  ClickHouseStore over HTTP (lz4) into tests/chfixture.py on 127.0.0.1.

Python's own cost per event of making each form (input_json from the structs the writer
hands over; tables_for) is measured too: with the spool's bytes the sink encodes nothing.

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
SYSTEMS = ("chdb-json", "chdb-arrow", "clickhouse-json", "clickhouse-arrow")

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


def write_batches(events: int, batch: int, folder: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Each batch of events as Arrow IPC files (tables_for) and JSON bodies (input_json); the
    row count of each table, and Python's CPU time per event to make each form."""
    import pyarrow as pa

    from watchllm_ext.delivery.writer import EventBatch, batch_json
    from watchllm_ext.ingest.fast_validate import decode_stored, encode_events
    from watchllm_ext.schema import EVENT_LIST_ADAPTER
    from watchllm_ext.store.rows import input_json, tables_for

    totals: dict[str, int] = {}
    cpu = {"tables_for": 0.0, "input_json": 0.0, "input_json_encoded": 0.0}
    for index, start in enumerate(range(0, events, batch)):
        raw = [make_event(i) for i in range(start, min(events, start + batch))]
        models = EVENT_LIST_ADAPTER.validate_python(raw)
        structs = decode_stored(encode_events(models))  # what the writer hands the sink
        t = time.process_time()
        tables = tables_for(models)
        cpu["tables_for"] += time.process_time() - t
        t = time.process_time()
        bodies = input_json(structs)  # encoding the structs (msgspec)
        cpu["input_json_encoded"] += time.process_time() - t
        handed = EventBatch(structs)  # as the writer hands it over: with the spool's bytes
        handed.payloads = [encode_events(structs)]
        t = time.process_time()
        input_json(handed, batch_json)
        cpu["input_json"] += time.process_time() - t
        for table, data in tables.items():
            totals[table] = totals.get(table, 0) + data.num_rows
            path = folder / f"{index:05d}.{table}.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, data.schema) as out:
                out.write_table(data)
        for n, (table, body) in enumerate(bodies.items()):
            (folder / f"{index:05d}.{n}.{table}.json").write_bytes(body)
    return totals, {name: seconds / events * 1e6 for name, seconds in cpu.items()}


def read_json_batches(folder: Path) -> list[list[tuple[str, bytes]]]:
    batches: dict[str, list[tuple[str, bytes]]] = {}
    for path in sorted(folder.glob("*.json")):  # parts before events, as the sink sends them
        index, _, table, _ = path.name.split(".")
        batches.setdefault(index, []).append((table, path.read_bytes()))
    return [b for _, b in sorted(batches.items())]


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
    from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

    create_schema(store)
    started = time.perf_counter()
    for batch in batches:
        for table, data in batch:
            if isinstance(data, bytes):
                store.insert_json(table, data, JSON_INPUT_SETTINGS)
            else:
                store.insert(table, data)
    elapsed = time.perf_counter() - started
    counts = {
        table: int(store.query(f"SELECT count() AS n FROM {table}")[0]["n"])
        for table in ("events", "tool_calls", "agent_steps")
    }
    return elapsed, counts


def role_run(system: str, data: Path, work: Path) -> None:
    batches: list[list[tuple[str, Any]]] = (
        read_json_batches(data) if system.endswith("-json") else read_batches(data)  # type: ignore[assignment]
    )
    cpu0 = time.process_time()
    if system.startswith("chdb"):
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
            store = ClickHouseStore(fixture.url + "watchllm")
            try:
                elapsed, counts = measure(store, batches)
            finally:
                store.close()
        finally:
            fixture.stop()
    cpu = time.process_time() - cpu0  # with chDB in this process, its threads too
    print(json.dumps({"system": system, "seconds": elapsed, "counts": counts, "cpu_s": cpu}))


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
    parser.add_argument("--batch", type=int, default=50_000, help="events per insert batch")
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
        totals, python_us = write_batches(args.events, args.batch, data)
        print(
            f"{args.events:,} events in batches of {args.batch:,} -> rows {totals}"
            f" (built in {time.perf_counter() - started:.1f} s)"
        )
        print(
            "Python CPU per event to make the insert: "
            + ", ".join(f"{name} {us:.2f} us" for name, us in python_us.items())
        )
        results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        cpus: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        for rnd in range(args.rounds):
            order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                got = run_child(system, data, temp / f"r{rnd}-{system}")
                want = {t: totals.get(t, 0) for t in got["counts"]}
                if got["counts"] != want:
                    raise SystemExit(f"{system}: stored {got['counts']}, inserted {want}")
                results[system].append(got["seconds"])
                cpus[system].append(got["cpu_s"])
                print(
                    f"  round {rnd + 1} {system:<10} {got['seconds']:6.2f} s"
                    f"  {args.events / got['seconds']:>10,.0f} events/s"
                )
        all_rows = sum(totals.values())
        median = {system: statistics.median(times) for system, times in results.items()}
        print(f"\nmedian of {args.rounds} round(s); {all_rows:,} rows in all three tables")
        print(
            f"{'system':<17} {'seconds':>8} {'events/s':>11} {'rows/s':>11}"
            f" {'vs chdb-json':>12} {'CPU us/ev':>10}"
        )
        for system in SYSTEMS:
            seconds = median[system]
            # chDB runs in the measuring process: its CPU is the insert's; for the server
            # store it is the client's alone.
            cpu_us = statistics.median(cpus[system]) / args.events * 1e6
            print(
                f"{system:<17} {seconds:8.2f} {args.events / seconds:11,.0f}"
                f" {all_rows / seconds:11,.0f} {median['chdb-json'] / seconds:12.2f}"
                f" {cpu_us:10.1f}"
            )
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
