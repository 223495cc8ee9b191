"""What WatchLLMMiddleware adds to a host endpoint: latency with and without it, one run.

Three uvicorn child processes serve the same FastAPI host (one JSON endpoint that does a
little work, WatchLLM mounted at /watchllm and running in all three): `plain`; `middleware`
(WatchLLMMiddleware: a run context, a recorder, one summary event per request, check_quota
asked before the handler); `budget` (the same with the per-user daily budget on: a cached
spend read per user every `user_budget_cache_s`, 2 s). Each request names one of 100 users
(`X-User-Id`). The endpoint records nothing, so its summaries reach WatchLLM every
`summary_interval_s` (5 s; `--variant summary_interval_s=0`: every 0.1 s, as before).

A load generator in this process (asyncio, raw HTTP/1.1 keep-alive, 32 connections) runs,
alternating the two servers, `--rounds` rounds of:

- `paced`: 32 connections sending `--rate` requests/s in all, evenly spaced (open loop):
  the latency a request sees when the host is not saturated. Aim: p99 added < 0.2 ms.
- `saturated`: 32 connections each sending its next request as soon as the answer comes
  (closed loop): the host's throughput, and the latency once requests queue for the CPU.

Printed: p50 / p99 per mode and server, the server process's CPU per request (all its
threads, including the writer's delivery of the request's events) and the part of it on the
event loop (the main thread: what competes with the host's requests; the rest is the store's
threads, mostly chDB inserting the summaries), medians over the rounds, and the differences
to `plain`. On a shared machine the CPU figures are the steady ones.

`--before REV` adds a fourth server, `middleware@REV`: the same host with the middleware of
commit REV (exported with git archive and imported instead of the working tree), so a change
is measured before and after in one run, under the same load.

    python bench/bench_middleware.py                      # 3 rounds of 10 s each mode
    python bench/bench_middleware.py --rounds 1 --seconds 3 --rate 500   # quicker
    python bench/bench_middleware.py --before HEAD~3      # and the middleware of HEAD~3
    python bench/bench_middleware.py --flush-interval-s 5 # the store's inserts 5x bigger
    python bench/bench_middleware.py --no-store           # events spooled, never inserted
    python bench/bench_middleware.py --set spool_fsync=never  # any setting, every server
    python bench/bench_middleware.py --tune --set store_threads_nice=10  # as `serve` tunes
    python bench/bench_middleware.py --in-process --rounds 3 --before HEAD~3  # no HTTP
    python bench/bench_middleware.py --variant summary_interval_s=0  # and a middleware argument
    python bench/bench_middleware.py --only-paced         # no saturated rounds

`--variant KEY=VALUE` adds a server `middleware[KEY=VALUE]`: the middleware given that
constructor argument (VALUE as JSON, else as text), so that an argument is measured beside
its default in one run; repeatable.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import core_name, free_port, spawn, stop, stop_all  # noqa: E402

CONNECTIONS = 32
KINDS = ("plain", "middleware", "budget")
USERS = 100


def parse_kind(kind: str) -> tuple[str, dict[str, Any]]:
    """A server's kind as (plain, middleware or budget; the middleware's extra arguments):
    `middleware@REV` is `middleware`, `middleware[KEY=VALUE]` one with that argument."""
    base, _, arg = kind.split("@")[0].partition("[")
    return base, settings_overrides([arg.rstrip("]")]) if arg else {}


def host_app(kind: str, data_dir: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The host every server runs; `kind` is plain, middleware or budget, or a variant
    (`parse_kind`); `overrides` are WatchLLM settings (`--set`)."""
    kind, arguments = parse_kind(kind)
    from fastapi import FastAPI

    from watchllm_ext import Settings, create_app

    watchllm = create_app(
        Settings(data_dir=data_dir, create_default_key=False, **(overrides or {}))
    )
    app = FastAPI()

    @app.get("/hello/{name}")
    async def hello(name: str) -> dict[str, Any]:
        return {"hello": name, "letters": sorted(set(name))}

    app.mount("/watchllm", watchllm)
    if kind != "plain":
        from watchllm_ext.middleware import WatchLLMMiddleware

        budget = 100.0 if kind == "budget" else None
        app.add_middleware(
            WatchLLMMiddleware, watchllm=watchllm, user_daily_budget_usd=budget, **arguments
        )
    else:
        from watchllm_ext import lifespan

        app.router.lifespan_context = lifespan(watchllm)  # WatchLLM runs in both
    return app


def serve(kind: str, port: int, data_dir: Path, overrides: dict[str, Any], tune: bool) -> None:
    import uvicorn

    if tune:
        # What `watchllm serve` does to its process, and docs/EMBEDDING.md offers a host: the
        # start-up heap frozen, fewer collections, a 0.5 ms GIL switch interval, and the
        # store's native threads at store_threads_nice (--set store_threads_nice=10).
        tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

        tune_for_serving(int(overrides.get("store_threads_nice", 0)))

    uvicorn.run(
        host_app(kind, data_dir, overrides),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


# --- the load generator ---------------------------------------------------------------------


async def _connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _request(i: int) -> bytes:
    user = f"user-{i % USERS}"
    return (f"GET /hello/w{i % 1000} HTTP/1.1\r\nHost: bench\r\nX-User-Id: {user}\r\n\r\n").encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
    writer.write(_request(i))
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answer {head[:40]!r}")
    await reader.readexactly(length)


async def load(port: int, mode: str, seconds: float, rate: float) -> tuple[list[float], int]:
    """Latencies (seconds) of the requests answered in `seconds`, and their count."""
    conns = [await _connection(port) for _ in range(CONNECTIONS)]
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds

    async def closed(n: int) -> None:
        reader, writer = conns[n]
        i = n
        while loop.time() < end:
            sent = time.perf_counter()
            await _exchange(reader, writer, i)
            latencies.append(time.perf_counter() - sent)
            i += CONNECTIONS

    async def paced(n: int) -> None:
        # Connection n sends at start + (n + k * CONNECTIONS) / rate: evenly spaced overall.
        reader, writer = conns[n]
        k = 0
        while True:
            due = start + (n + k * CONNECTIONS) / rate
            if due >= end:
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            sent = time.perf_counter()
            await _exchange(reader, writer, n + k * CONNECTIONS)
            latencies.append(time.perf_counter() - sent)
            k += 1

    runner = closed if mode == "saturated" else paced
    await asyncio.gather(*(runner(n) for n in range(CONNECTIONS)))
    for _, writer in conns:
        writer.close()
    return latencies, len(latencies)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used: what a request costs
    the server, whatever else the machine runs meanwhile."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread: uvicorn's event loop, where the host's
    requests, the middleware and WatchLLM's validation run (chDB and the writer's blocking
    calls use other threads)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def export(rev: str, work: Path) -> Path:
    """Commit `rev` exported with git archive, laid out as the packages install (plugins/ is
    watchllm_plugins, ...): a folder to put first on a server's sys.path."""
    repo = HERE.parent
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    src = work / f"src-{sha[:12]}"
    src.mkdir()
    tar = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", sha], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    package_dir = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    py = work / f"py-{sha[:12]}"
    py.mkdir()
    for name, folder in package_dir.items():
        (py / name).symlink_to(src / folder, target_is_directory=True)
    print(f"middleware@{rev} is commit {sha[:12]} ({py})", flush=True)
    return py


def settings_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as Settings keywords: VALUE read as JSON when it is JSON
    (numbers, lists, true), else as text (Settings converts it as it converts env values)."""
    found: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: {item!r} is not KEY=VALUE")
        try:
            found[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            found[key.strip()] = value
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- in process: the event loop's CPU per request, without HTTP --------------------------


def in_process(kind: str, requests: int, rounds: int, overrides: dict[str, Any]) -> None:
    """Call the host app as uvicorn would (ASGI, in this process) `requests` times per round,
    flushing the middleware's outbox into WatchLLM every 1/10 of them (as its 0.1 s flusher
    does at 1,000 req/s), and print this thread's CPU per request: the host's, the
    middleware's and WatchLLM's validation and spooling of the summaries. Thread CPU, so the
    figure holds on a busy machine; the store's inserts run on other threads (not counted)."""
    from watchllm_ext.middleware.asgi import find_owner

    async def run() -> list[float]:
        app = host_app(kind, Path(tempfile.mkdtemp(prefix="bench-mw-")), overrides)
        wl = next(
            r.app.state.watchllm  # type: ignore[attr-defined]
            for r in app.routes
            if hasattr(getattr(getattr(r, "app", None), "state", None), "watchllm")
        )
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        life = asyncio.create_task(app(lifespan_scope, inbox.get, outbox.put))
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
        owner = find_owner(wl)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        def scope(i: int) -> dict[str, Any]:
            return {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "GET", "scheme": "http", "path": f"/hello/w{i % 1000}",
                "raw_path": f"/hello/w{i % 1000}".encode(), "query_string": b"",
                "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                "headers": [(b"host", b"bench"), (b"x-user-id", f"user-{i % USERS}".encode())],
            }  # fmt: skip

        for i in range(1000):  # warm up: the route cache, the budget's first read
            await app(scope(i), receive, send)
        await asyncio.sleep(0.5)
        per_request = []
        for _ in range(rounds):
            started = time.thread_time()
            for part in range(10):
                for i in range(requests // 10):
                    await app(scope(part * requests + i), receive, send)
                if owner is not None:
                    await owner.outbox.flush(wl, owner.principal)
            per_request.append((time.thread_time() - started) / requests * 1e6)
            await asyncio.sleep(0.2)
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await life
        return per_request

    figures = asyncio.run(run())
    print(f"{statistics.median(figures):.1f} {min(figures):.1f}", flush=True)


def wait_ready(port: int) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/hello/x", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server on port {port} did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="paced mode: requests/s")
    parser.add_argument(
        "--before", metavar="REV", help="also serve the middleware of this commit (git archive)"
    )
    parser.add_argument(
        "--flush-interval-s",
        type=float,
        help="WatchLLM's flush_interval_s in every server (how often the store gets an insert)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a WatchLLM setting in every server (VALUE as JSON, else as text); repeatable",
    )
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="no store sink: events are spooled, never inserted (the middleware without chDB)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="every server tunes its process as `watchllm serve` does (tuning.tune_for_serving)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure the event loop's CPU per request with no HTTP (ASGI calls in a process)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also serve the middleware with this constructor argument; repeatable",
    )
    parser.add_argument(
        "--only-paced",
        action="store_true",
        help="no saturated rounds (they load both cores: on a shared machine, the others' too)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flush_interval_s is not None:
        args.set.append(f"flush_interval_s={args.flush_interval_s}")
    if args.no_store:
        args.set.append("disable_plugins=store_sink")
    overrides = settings_overrides(args.set)
    if args.serve:
        if args.code is not None:
            sys.path.insert(0, str(args.code))  # that commit's packages, not the working tree
        serve(args.serve, args.port, args.data_dir, overrides, args.tune)
        return 0
    if args.measure:
        if args.code is not None:
            sys.path.insert(0, str(args.code))
        if args.tune:
            tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

            tune_for_serving(int(overrides.get("store_threads_nice", 0)))
        in_process(args.measure, 2000, args.rounds, overrides)
        return 0
    # The children get the settings as given (and parse them the same way).
    passed = [arg for item in args.set for arg in ("--set", item)]
    passed += ["--tune"] if args.tune else []

    atexit.register(stop_all)
    work = Path(tempfile.mkdtemp(prefix="bench-middleware-"))
    kinds = list(KINDS)
    code: dict[str, Path] = {}
    if args.before:
        kinds.insert(2, f"middleware@{args.before}")
        code[kinds[2]] = export(args.before, work)
    for item in args.variant:
        settings_overrides([item])  # a bad one fails here, not in a server
        kinds.insert(kinds.index("budget"), f"middleware[{item}]")
    if args.in_process:
        # One process per kind and round, the kinds alternated: each on a fresh interpreter.
        found: dict[str, list[float]] = {kind: [] for kind in kinds}
        for r in range(max(1, args.rounds)):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                extra = ["--code", str(code[kind])] if kind in code else []
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", kind, "--rounds", "5", *extra, *passed],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                found[kind].append(float(out[-2]))
                print(f"round {r + 1} {kind:{max(map(len, kinds))}} event-loop CPU"
                      f" {out[-2]} us/request (best {out[-1]})", flush=True)  # fmt: skip
        base = statistics.median(found["plain"])
        print("\nin process, 2,000 requests x 5 per run, medians:")
        for kind in kinds:
            value = statistics.median(found[kind])
            added = f"  added {value - base:+.1f} us" if kind != "plain" else ""
            print(f"{kind:{max(map(len, kinds))}} {value:.1f} us/request{added}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    ports = {}
    procs = {}
    for kind in kinds:
        ports[kind] = free_port()
        extra = ["--code", str(code[kind])] if kind in code else []
        extra += passed
        procs[kind] = spawn(
            [sys.executable, __file__, "--serve", kind, "--port", str(ports[kind]),
             "--data-dir", str(work / f"server-{len(procs)}"), *extra],
            log=work / f"server-{len(procs)}.log",
        )  # fmt: skip
    for kind in ports:
        wait_ready(ports[kind])
    results: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = {}
    for kind in ports:  # warm up: imports, the budget's cache, the route cache
        asyncio.run(load(ports[kind], "saturated", 2.0, args.rate))
    width = max(map(len, kinds))
    modes = ("paced",) if args.only_paced else ("paced", "saturated")
    for r in range(args.rounds):
        for mode in modes:
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                pid = procs[kind].pid
                before, loop_before = cpu_s(pid), loop_cpu_s(pid)
                lat, n = asyncio.run(load(ports[kind], mode, args.seconds, args.rate))
                time.sleep(1.5)  # the writer's flush of these requests' events is theirs too
                cpu_us = (cpu_s(pid) - before) / n * 1e6
                loop_us = (loop_cpu_s(pid) - loop_before) / n * 1e6
                figures = (
                    pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000, n / args.seconds, cpu_us, loop_us
                )  # fmt: skip
                results.setdefault((mode, kind), []).append(figures)
                print(
                    f"round {r + 1} {mode:9} {kind:{width}} p50 {figures[0]:.3f} ms"
                    f"  p99 {figures[1]:.3f} ms  {figures[2]:.0f} req/s"
                    f"  server CPU {cpu_us:.0f} us/req (event loop {loop_us:.0f})",
                    flush=True,
                )
    for proc in procs.values():
        stop(proc)
    print(f"\n{CONNECTIONS} connections, {args.rounds} rounds of {args.seconds:.0f} s, medians:")
    for mode in modes:
        label = f"{mode} ({args.rate:.0f} req/s)" if mode == "paced" else mode
        rows = {k: [statistics.median(col) for col in zip(*results[(mode, k)], strict=True)]
                for k in kinds}  # fmt: skip
        plain = rows["plain"]
        for kind in kinds:
            p50, p99, rps, cpu, loop_cpu = rows[kind]
            added = (
                f"  added p50 {p50 - plain[0]:+.3f} p99 {p99 - plain[1]:+.3f} ms"
                f" CPU {cpu - plain[3]:+.0f} us (loop {loop_cpu - plain[4]:+.0f})"
                if kind != "plain"
                else ""
            )
            print(
                f"{label:20} {kind:{width}} p50 {p50:.3f} p99 {p99:.3f} ms {rps:6.0f} req/s"
                f" CPU {cpu:.0f} us/req (loop {loop_cpu:.0f}){added}"
            )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
