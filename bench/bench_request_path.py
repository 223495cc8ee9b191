"""The single-event request path in-process, without HTTP: what WatchLLM's own code costs.

    python bench/bench_request_path.py                 # 40,000 requests a variant, 3 rounds
    python bench/bench_request_path.py --quick         # a smoke run
    python bench/bench_request_path.py --lane-pairs 30 # the ingest lane against Starlette's layers

`concurrency` tasks (32, as the wrk benchmark's connections) call the app as ASGI, each
posting one prompt call at a time with a new event id to /v1/projects/bench/events, in one
uvloop event loop with the app's lifespan running: the real spool, writer and (for the last
variant) the chDB store sink in a temp folder, `watchllm serve`'s process tuning. No socket,
no uvicorn, no wrk: the figures are the app's own, far steadier than an HTTP run on a shared
machine, so a change of a few microseconds a request shows (bench_ingest.py --versus is still
what judges one over HTTP).

Variants, each its own process, alternating round by round; the baseline is the first:
  memory-log      the in-memory log (durability=memory), no sink: validation, hooks, answer
  spool-never     the spool written, never fsynced (spool_fsync=never), no sink
  spool-always    the spool fsynced before each answer (the default, group commit), no sink
  serve           the default with the store sink: what `watchllm serve` runs

Per variant: requests/s, the event loop's CPU a request (its thread's CPU time), the
process's CPU a request, and requests/s as a ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from processes import core_name  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "memory-log": {"durability": "memory", "disable_plugins": ["store_sink"]},
    "spool-never": {"spool_fsync": "never", "disable_plugins": ["store_sink"]},
    "spool-always": {"disable_plugins": ["store_sink"]},
    "serve": {},
}
PROJECT = "bench"


def _scope(key: str, body: bytes) -> dict[str, Any]:
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"),
        (b"host", b"127.0.0.1"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": f"/v1/projects/{PROJECT}/events",
        "raw_path": f"/v1/projects/{PROJECT}/events".encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8787),
        "headers": headers, "state": {},
    }  # fmt: skip


async def _post(app: Any, key: str, body: bytes) -> int:
    """One request through the app as ASGI: its status."""
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client waits for its answer
        raise AssertionError("unreachable")

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(key, body), receive, send)
    return status


async def _clients(app: Any, key: str, todo: list[bytes], concurrency: int) -> dict[int, int]:
    """`concurrency` clients posting the bodies one at a time; the count of each status."""
    statuses: dict[int, int] = {}

    async def client() -> None:
        while todo:
            status = await _post(app, key, todo.pop())
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


class _Lifespan:
    """The app's lifespan (startup on enter, shutdown on exit), as a server runs it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> None:
        await self.to_app.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.to_app.get, self.from_app.put))
        started = await self.from_app.get()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app did not start: {started}")

    async def __aexit__(self, *exc: object) -> None:
        await self.to_app.put({"type": "lifespan.shutdown"})
        await self.from_app.get()
        await self.task


def _app(data: str, settings: dict[str, Any], entry_points: bool = True) -> tuple[Any, str]:
    from watchllm_ext.app import create_app
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    values = {"data_dir": data, "create_default_key": False, "log_level": "warning"}
    s = Settings(**{**values, **settings})
    key = KeyStore(s.keys_path).create(PROJECT, scope="admin", name="bench")
    return create_app(s, entry_points=entry_points), key


def _bodies(n: int, first: int = 0) -> list[bytes]:
    from bench_ingest import make_event

    event = make_event(7, mark="single")
    return [
        json.dumps({**event, "event_id": f"single-{i}"}, separators=(",", ":")).encode()
        for i in range(first, first + n)
    ]


async def _drive(settings: dict[str, Any], requests: int, concurrency: int) -> dict[str, float]:
    tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

    with tempfile.TemporaryDirectory() as data:
        app, key = _app(data, settings)
        app.state.watchllm.open_store()
        tune_for_serving(app.state.watchllm.settings.store_threads_nice)
        # The bodies are made before the clock starts: only the app's work is timed.
        bodies = _bodies(requests + 2_000)
        async with _Lifespan(app):
            await _clients(app, key, bodies[requests:], concurrency)  # warm-up
            todo = bodies[:requests]
            cpu0, loop0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            statuses = await _clients(app, key, todo, concurrency)
            elapsed = time.perf_counter() - t0
            loop_cpu, cpu = time.thread_time() - loop0, time.process_time() - cpu0
    if statuses != {202: requests}:
        raise RuntimeError(f"not every request was answered 202: {statuses}")
    return {
        "requests_s": requests / elapsed,
        "loop_us_per_request": loop_cpu / requests * 1e6,
        "cpu_us_per_request": cpu / requests * 1e6,
    }


async def _lane_pairs(pairs: int, block: int, concurrency: int) -> list[tuple[float, float]]:
    """The ingest lane (ingest/lane.py) against Starlette's layers: two apps in this process,
    one with its lane and one without (spool, fsync always, no store: entry points off), and
    blocks of `block` requests to one then the other, the order alternating. A pair's two
    blocks meet the same machine, a second apart: (lane, Starlette) event-loop us a request."""
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        lane, lane_key = _app(one, {}, entry_points=False)
        plain, plain_key = _app(two, {}, entry_points=False)
        plain.set_lane(None)
        sides = {"lane": (lane, lane_key), "starlette": (plain, plain_key)}
        figures: dict[str, list[float]] = {"lane": [], "starlette": []}
        sent = 0
        async with _Lifespan(lane), _Lifespan(plain):
            for n in range(pairs + 1):  # the first pair warms up
                for name in ("lane", "starlette") if n % 2 == 0 else ("starlette", "lane"):
                    app, key = sides[name]
                    todo = _bodies(block, sent)
                    sent += block
                    loop0 = time.thread_time()
                    statuses = await _clients(app, key, todo, concurrency)
                    if statuses != {202: block}:
                        raise RuntimeError(f"not every request was answered 202: {statuses}")
                    if n:
                        figures[name].append((time.thread_time() - loop0) / block * 1e6)
    return list(zip(figures["lane"], figures["starlette"], strict=True))


def role_variant(name: str, requests: int, concurrency: int) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_drive(VARIANTS[name], requests, concurrency))))


def lane_pairs(pairs: int, block: int, concurrency: int, out: Path | None) -> int:
    import uvloop

    tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

    tune_for_serving(0)
    found = uvloop.run(_lane_pairs(pairs, block, concurrency))
    ratios = [lane / plain for lane, plain in found]
    print(f"single events in-process, {pairs} pairs of {block:,}-request blocks, {concurrency} at"
          " once (spool, fsync always, no store); event loop us a request, medians")  # fmt: skip
    print(f"  ingest lane        {statistics.median(f[0] for f in found):6.1f}")
    print(f"  Starlette's layers {statistics.median(f[1] for f in found):6.1f}")
    print(f"  lane / Starlette   x{statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}] pair by pair")  # fmt: skip
    if out:
        out.write_text(json.dumps({"pairs": found, "ratios": ratios}, indent=1))
    return 0


def measure(name: str, requests: int, concurrency: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, str(HERE), "--role", name, "--requests", str(requests),
         "--concurrency", str(concurrency)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument("--requests", type=int, default=None, help="a variant's requests a round")
    parser.add_argument("--concurrency", type=int, default=32, help="requests at once")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="variants to run")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--lane-pairs", type=int, metavar="N",
        help="instead: N pairs of blocks, the ingest lane against Starlette's layers (one process)",
    )  # fmt: skip
    parser.add_argument("--role", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    requests = args.requests or (2_000 if args.quick else 40_000)
    if not 1 <= args.concurrency <= 1_000 or not 1 <= requests <= 10_000_000:
        parser.error("--concurrency must be 1-1,000 and --requests 1-10,000,000")
    if args.lane_pairs is not None and not 1 <= args.lane_pairs <= 1_000:
        parser.error("--lane-pairs must be 1-1,000")
    if args.role:
        role_variant(args.role, requests, args.concurrency)
        return 0
    if args.lane_pairs:
        return lane_pairs(args.lane_pairs, args.requests or 2_000, args.concurrency, args.json)
    rounds = args.rounds or (1 if args.quick else 3)
    names = [n for n in VARIANTS if not args.only or n in args.only or n == "memory-log"]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(measure(name, requests, args.concurrency))
            res = runs[name][-1]
            print(f"  round {r + 1} {name:13s} {res['requests_s']:9,.0f} req/s", flush=True)
    medians = {
        n: {k: statistics.median(run[k] for run in runs[n]) for k in runs[n][0]} for n in names
    }
    base = medians["memory-log"]["requests_s"]
    print(f"\nsingle events in-process, {requests:,} requests x {rounds} rounds, "
          f"{args.concurrency} at once, medians; baseline: memory-log")  # fmt: skip
    print(f"{'variant':14s} {'req/s':>9s} {'x base':>7s} {'loop us/req':>12s} {'cpu us/req':>11s}")
    for n in names:
        m = medians[n]
        print(f"{n:14s} {m['requests_s']:9,.0f} {m['requests_s'] / base:7.2f} "
              f"{m['loop_us_per_request']:12.1f} {m['cpu_us_per_request']:11.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
