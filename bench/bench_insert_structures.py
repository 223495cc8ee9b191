"""What each structure of the embedded store's schema costs an insert (issue 10).

    python bench/bench_insert_structures.py                       # before/after, 10k and 50k
    python bench/bench_insert_structures.py --batch 10000 --variants current no-view:rollup_marks_mv
    python bench/bench_insert_structures.py --list                # the variants
    python bench/bench_insert_structures.py --variants all --rounds 2   # the ablation table

The ingest benchmark's events (bench_ingest.make_event: prompt calls, ~1 KB of JSON each),
as the store sink sends them (store/rows.py input_json), are inserted `--batch` events at a
time (`INSERT INTO events_input FORMAT JSONEachRow`, the sink's settings) into chDB, each
variant of the schema in a fresh folder in its own process. Reported per variant: the CPU of
that process during the inserts (chDB's threads included; user and kernel apart) per event
and per insert, and the wall time. Rounds alternate the variants; medians are printed.

CPU, not the rate, is the figure to compare when other work shares the cores: the rate moves
with the load; the CPU much less (but kernel time still grows when other processes create
and delete many files, see the 0012 migration). Say the load (`uptime`) beside the figures.

Variants: `v0011` is the schema as migrations 0001-0011 left it, `current` all migrations;
`bare` is bench_ingest's baseline (one plain MergeTree table). The others start from
clickhouse/schema.sql (the current schema) and remove one thing: `no-view:<name>` a
materialized view, `no-index:<name>` a skip index of events, `no-codecs` the ZSTD codecs
of events, `no-partition` its partitioning, `wide` the compact parts of 0012 (every part wide).
A `+ooi` suffix inserts with optimize_on_insert = 1 (ClickHouse's default, the sink's before
it set 0): `v0011+ooi` is the store as it was before migration 0012 and that setting. A `+1t`
suffix keeps each insert to one thread (ONE_THREAD_SETTINGS), `+pv` fills the views of the
input table in parallel (parallel_view_processing = 1); the `cores` column is the CPU over the
wall time (how many cores the inserts kept busy), e.g.

    python bench/bench_insert_structures.py --batch 6000 --variants current current+1t
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))


# An insert kept to one of chDB's threads (parsing, the views' blocks, the parts' writes).
ONE_THREAD_SETTINGS = {
    "max_threads": 1,
    "max_insert_threads": 1,
    "input_format_parallel_parsing": 0,
}


def _statements(sql: str) -> list[str]:
    from watchllm_ext.store.migrations import Migration

    return Migration(0, "schema", sql).statements()


def _migrations(last: int | None) -> list[str]:
    from watchllm_ext.store import load_migrations

    return [
        s for m in load_migrations() if last is None or m.version <= last for s in m.statements()
    ]


def _schema() -> list[str]:
    return _statements((ROOT / "clickhouse" / "schema.sql").read_text())


def _on_events(change: Callable[[str], str]) -> list[str]:
    return [
        change(s) if s.startswith("CREATE TABLE IF NOT EXISTS events (") else s for s in _schema()
    ]


def variant(name: str) -> list[str]:
    """The statements that make the schema of variant `name`."""
    name = name.removesuffix("+pv").removesuffix("+ooi").removesuffix("+1t")
    if name == "v0011":
        return _migrations(11)
    if name == "current":
        return _migrations(None)
    if name == "bare":
        from bench_ingest import BARE_CHDB_TABLE

        return [BARE_CHDB_TABLE.strip()]
    if name.startswith("no-view:"):
        view = name.removeprefix("no-view:")
        prefix = f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} "
        return [s for s in _schema() if not s.startswith(prefix)]
    if name.startswith("no-index:"):
        index = re.escape(name.removeprefix("no-index:"))
        return _on_events(lambda s: re.sub(rf",?\n\s*INDEX {index} [^\n]*?GRANULARITY 1", "", s))
    if name == "no-codecs":
        return _on_events(lambda s: s.replace(" CODEC(ZSTD(3))", ""))
    if name == "no-partition":
        return _on_events(lambda s: s.replace("PARTITION BY toYYYYMM(timestamp)\n", ""))
    if name == "wide":
        return _on_events(lambda s: s.replace(", min_rows_for_wide_part = 100000", ""))
    raise SystemExit(f"unknown variant {name!r} (--list shows them)")


VARIANTS = [
    "bare",
    "v0011",
    "current",
    "current+ooi",
    "no-view:rollup_marks_mv",
    "no-view:event_children_mv",
    "no-view:event_ids_mv",
    "no-index:idx_event_id",
    "no-index:idx_run_id",
    "no-codecs",
    "no-partition",
    "wide",
]


def write_bodies(events: int, batch: int, out: Path) -> None:
    """The sink's JSON bodies of `events` bench events, `batch` a body."""
    from bench_ingest import make_event

    from watchllm_ext.delivery.writer import EventBatch, batch_json
    from watchllm_ext.ingest.fast_validate import decode_stored, encode_events
    from watchllm_ext.schema import EVENT_LIST_ADAPTER
    from watchllm_ext.store.rows import input_json

    for n, start in enumerate(range(0, events, batch)):
        # bench_ingest's 1,000 events, each 1,000 with their own ids, as its batches are
        raw = [
            {**make_event(i % 1000, mark=f"b{i // 1000:05d}"), "project_id": "bench"}
            for i in range(start, min(events, start + batch))
        ]
        structs = decode_stored(encode_events(EVENT_LIST_ADAPTER.validate_python(raw)))
        handed = EventBatch(structs)  # as the writer hands it over: with the spool's bytes
        handed.payloads = [encode_events(structs)]
        for table, body in input_json(handed, batch_json).items():
            data = body if isinstance(body, bytes) else b"".join(bytes(p) for p in body)
            (out / f"{n:05d}.{table}.json").write_bytes(data)


def role_run(name: str, data: Path, work: Path) -> None:
    from chdb import session

    from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

    db = session.Session(str(work))
    for statement in variant(name):
        db.query(statement)
    settings = dict(JSON_INPUT_SETTINGS)
    if name.endswith("+ooi"):  # the merge on insert, as before optimize_on_insert = 0
        settings["optimize_on_insert"] = 1
    if name.endswith("+1t"):  # the insert on one thread (ONE_THREAD_SETTINGS)
        settings.update(ONE_THREAD_SETTINGS)
    if name.endswith("+pv"):  # the views of an input table filled at once, not one by one
        settings["parallel_view_processing"] = 1
    clause = ", ".join(
        f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()
    )
    bodies = [(p.name.split(".")[1], p.read_bytes()) for p in sorted(data.glob("*.json"))]
    if name == "bare":
        bodies = [("bare_events", body) for _, body in bodies]
    before, started = os.times(), time.perf_counter()
    for table, body in bodies:
        with db.send_insert(f"INSERT INTO {table} SETTINGS {clause}", "JSONEachRow") as ins:
            ins.append(body)
            ins.finish()
    wall, after = time.perf_counter() - started, os.times()
    table = "bare_events" if name == "bare" else "events"
    stored = int(db.query(f"SELECT count() FROM {table}", "CSV").data().strip())
    db.close()
    print(
        json.dumps(
            {
                "stored": stored,
                "inserts": len(bodies),
                "wall": wall,
                "user": after.user - before.user,
                "sys": after.system - before.system,
            }
        )
    )


def run_child(name: str, data: Path, temp: Path) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=temp))
    try:
        done = subprocess.run(
            [sys.executable, str(HERE), "--role", name, "--data", str(data), "--work", str(work)],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--batch", type=int, action="append", help="events an insert (repeatable; 10k and 50k)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=["v0011+ooi", "v0011", "current+ooi", "current", "bare"]
    )
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(VARIANTS))
        return
    if args.role:
        role_run(args.role, args.data, args.work)
        return
    if args.variants == ["all"]:
        args.variants = VARIANTS
    for name in args.variants:
        variant(name)  # an unknown name fails before any work
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    temp = Path(tempfile.mkdtemp(prefix="bench-insert-structures-"))
    try:
        for batch in args.batch or [10_000, 50_000]:
            data = temp / f"data-{batch}"
            data.mkdir()
            write_bodies(args.events, batch, data)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
            for rnd in range(args.rounds):
                order = args.variants if rnd % 2 == 0 else args.variants[::-1]
                for name in order:
                    got = run_child(name, data, temp)
                    if got["stored"] != args.events:
                        raise SystemExit(f"{name}: stored {got['stored']} of {args.events}")
                    runs[name].append(got)
            print(
                f"\n{args.events:,} events in inserts of {batch:,}, median of {args.rounds}"
                f" round(s); load average {os.getloadavg()[0]:.2f} at the end"
            )
            print(
                f"{'variant':<28}{'CPU us/ev':>10}{'user':>7}{'kernel':>8}"
                f"{'ms/insert':>11}{'events/s':>10}{'cores':>7}"
            )
            for name, results in runs.items():
                user = statistics.median(r["user"] for r in results)
                kernel = statistics.median(r["sys"] for r in results)
                cpu = statistics.median(r["user"] + r["sys"] for r in results)
                wall = statistics.median(r["wall"] for r in results)
                inserts = results[0]["inserts"]
                print(
                    f"{name:<28}{cpu / args.events * 1e6:10.1f}"
                    f"{user / args.events * 1e6:7.1f}{kernel / args.events * 1e6:8.1f}"
                    f"{cpu / inserts * 1e3:11.0f}{args.events / wall:10,.0f}{cpu / wall:7.2f}"
                )
            shutil.rmtree(data)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
