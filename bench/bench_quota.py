"""What a quota check adds to a request: no quota, the memory backend, the Redis backend.

Two measurements in one run, each beside no quota:

1. hook: the quota plugin's `check_quota` awaited on its own (uvloop, as `watchllm serve`
   runs; nothing else running), per call: the cost of the check itself. For Redis, where the
   time goes: the round trip alone (PING on the check's own connection), the check as served
   (EVALSHA pipelined on that connection, watchllm_ext/quotas/resp.py), the same check through
   redis-py's asyncio client (the client used before), and the Lua script's own time inside
   Redis (INFO commandstats). The kinds take turns in blocks, so they see the same machine.
2. http: four real `watchllm serve` processes (quota_backend off, memory, redis, and redis
   with its checks through redis-py as before), no store (the store's work is the same in
   all), durability=memory; one client sends 1-event batches over a kept-alive connection
   to each in turn, so they all see the same machine
   at the same moments. Added latency = p50/p99 of a server minus the same of `off`, per
   round; the median round is reported (a shared machine stalls now and then: one stall in
   one server's requests moves its p99 alone).

Aim (issue 16): under 0.5 ms p99 added with Redis on loopback. Needs Debian's redis-server
(`apt-get install redis-server`).

    python bench/bench_quota.py            # 20,000 hook calls, 3 rounds of 3,000 requests
    python bench/bench_quota.py --quick    # a tenth of that
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import free_port, spawn, stop, stop_all  # noqa: E402

# An option of redis-py's in the URL (its default value): the checks then go through redis-py.
REDIS_PY_OPTION = "?health_check_interval=0"
PLANS = {"default": {"events_per_minute": 10**9, "events_per_day": 10**12}}


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


NICE = 0  # --nice: how much the benchmark's processes are favoured over the machine's others


def favour(pid: int) -> None:
    """Run `pid` at priority -NICE (root only). On a shared machine, other work preempts the
    servers now and then; a stall in one request of one server moves that server's p99 by
    milliseconds, far more than a quota check. Favoured, they see fewer stalls."""
    if NICE:
        os.setpriority(os.PRIO_PROCESS, pid, -NICE)


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    program = shutil.which("redis-server")
    if program is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    proc = spawn(
        [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)],
        log=folder / "redis.log",
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    favour(proc.pid)
    return proc, f"redis://127.0.0.1:{port}/0"


HOOK_KINDS = {
    "memory": "check_quota, memory backend",
    "ping": "Redis round trip alone (PING)",
    "redis": "check_quota, Redis (as served)",
    "redis-py": "check_quota, Redis via redis-py",
}


def bench_hook(redis_url: str, calls: int) -> dict[str, tuple[float, float]]:
    import uvloop

    from watchllm_ext.auth import Principal
    from watchllm_ext.quotas.plugin import QuotaPlugin
    from watchllm_ext.quotas.resp import encode
    from watchllm_ext.settings import Settings

    principal = Principal("bench", frozenset({"ingest"}))
    times: dict[str, list[float]] = {kind: [] for kind in HOOK_KINDS}
    fallbacks = 0

    def plugin(backend: str, url: str = redis_url) -> QuotaPlugin:
        settings = Settings(
            quota_backend=backend,
            redis_url=url,
            quota_plans=PLANS,
            create_default_key=False,
            # A late answer (a loaded machine) falls back; it is counted and printed, and
            # must not turn into refusals that end the run.
            quota_fallback_events_per_minute=10**9,
            data_dir=Path(tempfile.mkdtemp(prefix="wl-bench-quota-")),
        )
        return QuotaPlugin(settings)

    async def run() -> None:
        nonlocal fallbacks
        memory, served = plugin("memory"), plugin("redis")
        old = plugin("redis", redis_url + REDIS_PY_OPTION)
        fast = served.backend._fast  # type: ignore[attr-defined]
        ping = encode(["PING"])
        await fast.connect()

        async def round_trip() -> None:
            assert await fast.ready().send(ping).future == b"PONG"

        calls_of = {
            "memory": lambda: memory.check_quota(principal, 1, None),
            "ping": round_trip,
            "redis": lambda: served.check_quota(principal, 1, None),
            "redis-py": lambda: old.check_quota(principal, 1, None),
        }
        for call in calls_of.values():  # warm up: connections, the script's SHA in Redis
            for _ in range(200):
                await call()
        block = 500
        for _ in range(0, calls, block):  # in turns: each kind sees the same moments
            for kind, call in calls_of.items():
                series = times[kind]
                for _ in range(block):
                    started = time.perf_counter()
                    decision = await call()
                    series.append((time.perf_counter() - started) * 1000)
                    assert decision is None, decision
        fallbacks = sum(served.fallbacks.values()) + sum(old.fallbacks.values())
        for each in (memory, served, old):
            await each.backend.close()

    uvloop.run(run())
    if fallbacks:
        print(f"({fallbacks} Redis answers came later than 50 ms: fallbacks)")
    return {kind: percentiles(values) for kind, values in times.items()}


def script_time_us(redis_url: str) -> float:
    """Redis's own time per EVALSHA (the Lua check), from INFO commandstats."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec_per_call", 0.0))


def start_server(folder: Path, name: str, env: dict[str, str]) -> tuple[Any, int]:
    port = free_port()
    data = folder / name
    data.mkdir()
    (folder / "none.toml").write_text("")  # named: no watchllm.toml of the cwd is read
    settings = {
        "WATCHLLM_DATA_DIR": str(data),
        "WATCHLLM_KEYS_FILE": str(folder / "keys.sqlite3"),
        "WATCHLLM_CONFIG": str(folder / "none.toml"),
        "WATCHLLM_CREATE_DEFAULT_KEY": "false",
        "WATCHLLM_DURABILITY": "memory",
        "WATCHLLM_LOG_LEVEL": "warning",
        "WATCHLLM_DISABLE_PLUGINS": "chdb_store,clickhouse_store",
        **env,
    }
    # processes.spawn drops the caller's WATCHLLM_* variables; these go on the command line.
    args = ["env", *(f"{k}={v}" for k, v in settings.items())]
    args += [sys.executable, "-m", "watchllm_ext.cli", "serve", "--port", str(port)]
    proc = spawn(args, log=folder / f"{name}.log")
    favour(proc.pid)
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name} did not start: see {folder}/{name}.log")
        time.sleep(0.1)
    return proc, port


def bench_http(
    folder: Path, redis_url: str, requests: int, rounds: int
) -> list[dict[str, tuple[float, float]]]:
    from watchllm_ext.keys import KeyStore

    key = KeyStore(folder / "keys.sqlite3").create("bench", scope="ingest")
    plans = json.dumps(PLANS)
    servers = {
        "off": start_server(folder, "off", {}),
        "memory": start_server(
            folder, "memory", {"WATCHLLM_QUOTA_BACKEND": "memory", "WATCHLLM_QUOTA_PLANS": plans}
        ),
        "redis": start_server(
            folder,
            "redis",
            {
                "WATCHLLM_QUOTA_BACKEND": "redis",
                "WATCHLLM_QUOTA_PLANS": plans,
                "WATCHLLM_REDIS_URL": redis_url,
                "WATCHLLM_QUOTA_FALLBACK_EVENTS_PER_MINUTE": str(10**9),
            },
        ),
        # The same, with the checks through redis-py (as before resp.py): a URL option of
        # redis-py's (this one its default) sends them there.
        "redis-py": start_server(
            folder,
            "redis-py",
            {
                "WATCHLLM_QUOTA_BACKEND": "redis",
                "WATCHLLM_QUOTA_PLANS": plans,
                "WATCHLLM_REDIS_URL": redis_url + REDIS_PY_OPTION,
                "WATCHLLM_QUOTA_FALLBACK_EVENTS_PER_MINUTE": str(10**9),
            },
        ),
    }
    conns = {
        name: http.client.HTTPConnection("127.0.0.1", port) for name, (_, port) in servers.items()
    }
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(
        {"events": [{"event_type": "prompt_call", "run_id": "r1", "model": "gpt-4o"}]}
    ).encode()

    def post(name: str) -> float:
        conn = conns[name]
        started = time.perf_counter()
        conn.request("POST", "/v1/events/batch", body=body, headers=headers)
        answer = conn.getresponse()
        answer.read()
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status != 202:
            sys.exit(f"{name} answered {answer.status}")
        return elapsed

    for _ in range(300):  # warm up
        for name in servers:
            post(name)
    results = []
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(requests):
            for name in servers:  # in turn: all see the same machine at the same moments
                times[name].append(post(name))
        results.append({name: percentiles(values) for name, values in times.items()})
    for conn in conns.values():
        conn.close()
    for proc, _ in servers.values():
        stop(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the calls")
    parser.add_argument("--calls", type=int, default=20_000, help="hook calls per backend")
    parser.add_argument(
        "--requests", type=int, default=3_000, help="requests per server in each round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of HTTP requests")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the client, servers and Redis at this much higher priority (root only;"
        " on a shared machine: fewer stalls from other work)",
    )
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    favour(os.getpid())
    if args.quick:
        args.calls, args.requests = args.calls // 10, args.requests // 10
    atexit.register(stop_all)
    folder = Path(tempfile.mkdtemp(prefix="wl-bench-quota-"))
    redis_proc, redis_url = start_redis(folder)
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        + (f", benchmark at priority -{NICE}" if NICE else "")
    )
    hook = bench_hook(redis_url, args.calls)
    print(f"\nOne quota check on its own, {args.calls:,} calls each (ms):")
    print(f"  {'':<34} {'p50':>8} {'p99':>8}")
    for kind, (p50, p99) in hook.items():
        print(f"  {HOOK_KINDS[kind]:<34} {p50:>8.3f} {p99:>8.3f}")
    print(f"  the Lua check inside Redis: {script_time_us(redis_url):.1f} µs a call")
    rounds = bench_http(folder, redis_url, args.requests, args.rounds)
    print(
        f"\nPOST /v1/events/batch (1 event), {args.rounds} rounds of {args.requests:,} requests"
        " per server (ms):"
    )
    print(f"  {'round':<6} {'quota':<8} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10}")
    added: dict[str, list[tuple[float, float]]] = {"memory": [], "redis": [], "redis-py": []}
    for i, result in enumerate(rounds, 1):
        base50, base99 = result["off"]
        for name, (p50, p99) in result.items():
            print(
                f"  {i:<6} {name:<8} {p50:>8.3f} {p99:>8.3f} {p50 - base50:>10.3f}"
                f" {p99 - base99:>10.3f}"
            )
            if name in added:
                added[name].append((p50 - base50, p99 - base99))
    print("  median of the rounds, added:")
    for name, values in added.items():
        p50 = statistics.median(v[0] for v in values)
        p99 = statistics.median(v[1] for v in values)
        print(f"  {'':<6} {name:<8} {'':>8} {'':>8} {p50:>10.3f} {p99:>10.3f}")
    stop(redis_proc)


if __name__ == "__main__":
    main()
