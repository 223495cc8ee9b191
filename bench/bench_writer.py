"""The store side alone: what the writer, the spool and the store sink cost per stored event.

    python bench/bench_writer.py                      # this tree, 3 rounds of 100,000 events
    python bench/bench_writer.py --before f70e8fb     # and a commit, rounds alternating
    python bench/bench_writer.py --batch 1 --batches 20000 --in-flight 64   # single events

A real Writer on a real Spool (fsync always) with the real StoreSink on chDB (in a temp
folder) takes 1,000-event batches of validated event structs (--batch), four submits in
flight (--in-flight), as fast as it will; the clock stops when every event is stored. No
HTTP and no validation: the request path is not in the figures. Reported per stored event:
CPU of the Python threads (the event loop and the worker threads: the GIL time the requests
share with the store side) and of chDB's own threads, from /proc; and the event loop's lag
(a 2 ms sleep's overshoot) while the store works, which is what a request waits. The machine
is shared: compare figures of the same run, and read CPU per event rather than rates when
the load is high.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def thread_cpu() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
        except OSError:
            continue
        out[int(task.name)] = (stat[stat.index("(") + 1 : stat.rindex(")")], cpu)
    return out


def role_run(batches: int, size: int, in_flight: int) -> None:
    """One measurement with the code importable here (this tree or a --before copy)."""
    import gc

    import anyio
    from bench_ingest import make_event
    from chdb_store import ChdbStore
    from processes import core_name

    from watchllm_ext.app import _decode_events, _encode_events, _Encoded, prepare_store
    from watchllm_ext.builtins.store_sink import StoreSink
    from watchllm_ext.settings import Settings

    Spool = core_name("watchllm_ext.delivery.spool", "Spool")
    Writer = core_name("watchllm_ext.delivery.writer", "Writer")
    decode_stored = core_name("watchllm_ext.ingest.fast_validate", "decode_stored")

    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    store = ChdbStore(work / "chdb")
    prepare_store(store, Settings(data_dir=work))
    text = json.dumps([make_event(i, "M") | {"project_id": "bench"} for i in range(size)])

    def batch(tag: str) -> Any:
        payload = text.replace('"M-', f'"{tag}-').replace("-M-", f"-{tag}-").encode()
        events = _Encoded(decode_stored(payload))
        events.payload = payload
        return events

    warm = batch("warm")
    pending = [batch(f"b{n:05d}") for n in range(batches)]
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)  # as `watchllm serve` runs (serving/tuning.py)
    loop_tid = threading.get_native_id()

    async def main() -> dict[str, Any]:
        spool = Spool(work / "spool")
        sink = StoreSink(store, 50_000)
        async with Writer(
            [sink], spool, encode=_encode_events, decode=_decode_events, flush_interval_s=1.0
        ) as writer:
            await writer.submit(warm)
            assert await writer.flush(120)
            lags: list[float] = []

            async def lag() -> None:
                while True:
                    t = time.perf_counter()
                    await asyncio.sleep(0.002)
                    lags.append(time.perf_counter() - t - 0.002)

            monitor = asyncio.get_running_loop().create_task(lag())
            before, t0 = thread_cpu(), time.monotonic()
            slots = asyncio.Semaphore(in_flight)  # requests in flight

            async def one(events: Any) -> None:
                try:
                    await writer.submit(events)
                finally:
                    slots.release()

            async with anyio.create_task_group() as tg:
                while pending:
                    await slots.acquire()
                    tg.start_soon(one, pending.pop(0))  # the list lets go of it
            assert await writer.flush(600)
            elapsed, after = time.monotonic() - t0, thread_cpu()
            monitor.cancel()
        n = batches * size
        python = chdb = 0.0
        main_name = after[loop_tid][0]
        for tid, (name, cpu) in after.items():
            used = cpu - before.get(tid, (name, 0.0))[1]
            if tid == loop_tid or name == main_name:
                python += used
            else:
                chdb += used
        lags.sort()
        return {
            "events_s": n / elapsed,
            "python_us": python / n * 1e6,
            "chdb_us": chdb / n * 1e6,
            "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1e3 if lags else 0.0,
            "lag_max_ms": lags[-1] * 1e3 if lags else 0.0,
        }

    try:
        print(json.dumps(asyncio.run(main())))
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)


def measure(root: Path, batches: int, size: int, in_flight: int) -> dict[str, Any]:
    # Python threads are found by name (3.11 leaves them unnamed, chDB names its own); the
    # child imports the package, the bench helpers and the chDB plugin of `root`.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHLLM_")}
    env["PYTHONPATH"] = os.pathsep.join(str(root / d) for d in ("", "bench", "plugins"))
    out = subprocess.run(
        [
            *(sys.executable, str(HERE), "--role-run", "--batches", str(batches)),
            *("--batch", str(size), "--in-flight", str(in_flight)),
        ],
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=100, help="submits a round")
    p.add_argument("--batch", type=int, default=1_000, help="events a submit (a request)")
    p.add_argument("--in-flight", type=int, default=4, help="submits at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", metavar="REV", help="also measure this commit (git archive)")
    p.add_argument("--role-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role_run:
        role_run(args.batches, args.batch, args.in_flight)
        return 0
    trees = {"this tree": HERE.parents[1]}
    copy = None
    if args.before:
        copy = Path(tempfile.mkdtemp(prefix="bench-writer-before-"))
        archive = subprocess.run(
            ["git", "archive", args.before], cwd=HERE.parents[1], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
        shutil.copy(HERE.parent / "bench_ingest.py", copy / "bench")  # the same events
        trees = {f"before ({args.before})": copy, **trees}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    try:
        for rnd in range(args.rounds):
            for name, root in trees.items() if rnd % 2 == 0 else reversed(trees.items()):
                load = Path("/proc/loadavg").read_text().split()[0]
                r = measure(root, args.batches, args.batch, args.in_flight)
                results[name].append(r)
                print(
                    f"round {rnd + 1} {name:22s} load {load:>5s}: {r['events_s']:8,.0f} stored/s"
                    f"  Python {r['python_us']:5.2f} us/ev  chDB {r['chdb_us']:5.2f} us/ev"
                    f"  loop lag p99 {r['lag_p99_ms']:5.1f} ms, max {r['lag_max_ms']:6.1f} ms",
                    flush=True,
                )
    finally:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
    print("medians:")
    for name, rs in results.items():
        med = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]}
        print(
            f"  {name:22s} {med['events_s']:8,.0f} stored/s  Python {med['python_us']:5.2f}"
            f" us/ev  chDB {med['chdb_us']:5.2f} us/ev  loop lag p99 {med['lag_p99_ms']:.1f} ms,"
            f" max {med['lag_max_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
