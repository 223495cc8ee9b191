"""What a quota check adds to a request: no quota, the memory backend, the Redis backend.

Two measurements in one run, each beside no quota:

1. hook: the quota plugin's `check_quota` awaited on its own (one event loop, nothing else
   running), per call: the cost of the check itself (for Redis, one round trip of the Lua
   script on loopback);
2. http: three real `watchllm serve` processes (quota_backend off, memory, redis), no store
   (the store's work is the same in all three), durability=memory; one client sends 1-event
   batches over a kept-alive connection to each in turn, so the three see the same machine
   at the same moments. Added latency = p50/p99 of a server minus the same of `off`.

Aim (issue 16): under 0.5 ms p99 added with Redis on loopback. Needs Debian's redis-server
(`apt-get install redis-server`).

    python bench/bench_quota.py            # 20,000 hook calls, 6,000 requests per server
    python bench/bench_quota.py --quick    # a tenth of that
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import http.client
import json
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

PLANS = {"default": {"events_per_minute": 10**9, "events_per_day": 10**12}}


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


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
    return proc, f"redis://127.0.0.1:{port}/0"


def bench_hook(redis_url: str, calls: int) -> dict[str, tuple[float, float]]:
    from watchllm_ext.auth import Principal
    from watchllm_ext.quotas.plugin import QuotaPlugin
    from watchllm_ext.settings import Settings

    principal = Principal("bench", frozenset({"ingest"}))
    out: dict[str, tuple[float, float]] = {}
    fallbacks: dict[str, int] = {}

    async def run(backend: str) -> list[float]:
        settings = Settings(
            quota_backend=backend,
            redis_url=redis_url,
            quota_plans=PLANS,
            create_default_key=False,
            # A late answer (a loaded machine) falls back; it is counted and printed, and
            # must not turn into refusals that end the run.
            quota_fallback_events_per_minute=10**9,
            data_dir=Path(tempfile.mkdtemp(prefix="wl-bench-quota-")),
        )
        plugin = QuotaPlugin(settings)
        for _ in range(200):  # warm up: connections, the script's SHA in Redis
            await plugin.check_quota(principal, 1, None)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            decision = await plugin.check_quota(principal, 1, None)
            times.append((time.perf_counter() - started) * 1000)
            assert decision is None, decision
        fallbacks[backend] = sum(plugin.fallbacks.values())
        await plugin.backend.close()
        return times

    for backend in ("memory", "redis"):
        out[backend] = percentiles(asyncio.run(run(backend)))
    if fallbacks["redis"]:
        print(f"({fallbacks['redis']} Redis answers came later than 50 ms: fallbacks)")
    return out


def start_server(folder: Path, name: str, env: dict[str, str]) -> tuple[Any, int]:
    port = free_port()
    data = folder / name
    data.mkdir()
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


def bench_http(folder: Path, redis_url: str, requests: int) -> dict[str, tuple[float, float]]:
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
    }
    conns = {
        name: http.client.HTTPConnection("127.0.0.1", port) for name, (_, port) in servers.items()
    }
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(
        {"events": [{"event_type": "prompt_call", "run_id": "r1", "model": "gpt-4o"}]}
    ).encode()
    times: dict[str, list[float]] = {name: [] for name in servers}

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
    for _ in range(requests):
        for name in servers:  # in turn: the three see the same machine at the same moments
            times[name].append(post(name))
    for conn in conns.values():
        conn.close()
    for proc, _ in servers.values():
        stop(proc)
    return {name: percentiles(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the calls")
    parser.add_argument("--calls", type=int, default=20_000, help="hook calls per backend")
    parser.add_argument("--requests", type=int, default=6_000, help="requests per server")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.requests = args.calls // 10, args.requests // 10
    atexit.register(stop_all)
    folder = Path(tempfile.mkdtemp(prefix="wl-bench-quota-"))
    redis_proc, redis_url = start_redis(folder)
    hook = bench_hook(redis_url, args.calls)
    print(f"check_quota alone, {args.calls:,} calls each (ms):")
    print(f"  {'backend':<8} {'p50':>8} {'p99':>8}")
    for name, (p50, p99) in hook.items():
        print(f"  {name:<8} {p50:>8.3f} {p99:>8.3f}")
    http_ = bench_http(folder, redis_url, args.requests)
    base50, base99 = http_["off"]
    print(f"\nPOST /v1/events/batch (1 event), {args.requests:,} requests per server (ms):")
    print(f"  {'quota':<8} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10}")
    for name, (p50, p99) in http_.items():
        print(f"  {name:<8} {p50:>8.3f} {p99:>8.3f} {p50 - base50:>10.3f} {p99 - base99:>10.3f}")
    stop(redis_proc)


if __name__ == "__main__":
    main()
