"""/healthz latency while the server is busy: does any work starve the event loop?

Against a real `watchllm serve` child process (embedded chDB store, spool with fsync), a
prober asks GET /healthz every 10 ms on a kept-alive connection and records each latency, in
three phases of one run:

1. idle: nothing else happens (the baseline);
2. ingest storm: 16 clients at once each POST one 10,000-event batch (`--batches`,
   `--events`), in `--rounds` rounds; the events name 2,000 models (`--models`) spread over a
   33-hour window, which phase 3 reads;
3. heaviest analytics query: GET /v1/analytics/timeseries?group_by=model&interval=1m over
   that window (1,980 one-minute buckets x 2,000 models), `--queries` times in a row;
4. declined bodies: `--declined` batches one after another that the fast validator will not
   take (`--declined-events` events, each with free-form JSON nested 190 levels deep, one with
   an invalid run_id: a 207): about 7 MB each, whose parse and event-by-event validation
   hold Python's GIL for seconds wherever they run.
5. resent batches: the storm's first round sent again `--resent` times, as a client that
   retries or a load generator with one body sends them: every event is stored already, and
   the store sink drops the copies.

Printed: p50 / p99 / max of /healthz per phase, and the ratios to the idle baseline of the
same run. Target (issue 9): p99 under 50 ms in every phase.

    python bench/bench_healthz.py              # the full run (about 2-3 minutes on 2 cores)
    python bench/bench_healthz.py --rounds 1 --queries 2   # quicker
    python bench/bench_healthz.py --rounds 1 --batches 4 --queries 1 --declined 4  # phase 4
    python bench/bench_healthz.py --rounds 1 --queries 1 --declined 0 --resent 4  # phase 5
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import free_port, spawn, stop, stop_all  # noqa: E402

PROJECT = "bench"
WINDOW_START = datetime(2026, 3, 14, tzinfo=UTC)
PROBE_EVERY_S = 0.01


def make_batch(round_no: int, batch_no: int, n: int, models: int, window_min: int) -> bytes:
    """n prompt_call events (~600 bytes each) over `models` models and the window."""
    events = []
    for i in range(n):
        k = (round_no * 1_000_003 + batch_no * 10_007 + i) * 7919
        at = WINDOW_START + timedelta(seconds=k % (window_min * 60), milliseconds=k % 1000)
        events.append(
            {
                "event_id": f"r{round_no}-b{batch_no}-{i}",
                "event_type": "prompt_call",
                "run_id": f"run-{round_no}-{batch_no}-{i // 8}",
                "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "model": f"model-{(batch_no * n + i) % models:04d}",
                "provider": "openai",
                "tokens_input": 100 + k % 2_400,
                "tokens_output": 20 + k % 700,
                "prompt": "How do I reset my password? " * 7,
                "response": "Open the settings page and choose Reset password. " * 4,
                "status": "success",
                "latency_ms": 180.0 + k % 3_800,
                "user_id": f"user-{k % 5_000}",
                "tags": ["chat", "support"],
                "env": "production",
            }
        )
    return json.dumps({"events": events}, separators=(",", ":")).encode()


def make_declined(round_no: int, n: int) -> bytes:
    """n error events the fast validator declines (metadata 190 levels deep), the last with
    an invalid run_id: the detailed path, answered 207."""
    deep = json.loads('{"a":' * 190 + "1" + "}" * 190)
    events = [
        {
            "event_id": f"declined-{round_no}-{i}",
            "event_type": "error",
            "run_id": "no spaces allowed" if i == n - 1 else f"declined-{round_no}",
            "timestamp": WINDOW_START.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "error_type": "ValueError",
            "error_message": "a deep one",
            "metadata": deep,
        }
        for i in range(n)
    ]
    return json.dumps({"events": events}, separators=(",", ":")).encode()


class Prober(threading.Thread):
    """GET /healthz every PROBE_EVERY_S on one kept-alive connection; latencies by phase."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.phase = "idle"
        self.samples: dict[str, list[float]] = {}
        self.failures: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.done.is_set():
            phase = self.phase
            start = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                ok = False
            took = time.perf_counter() - start
            if ok:
                self.samples.setdefault(phase, []).append(took)
            else:
                self.failures[phase] = self.failures.get(phase, 0) + 1
            time.sleep(PROBE_EVERY_S)
        conn.close()


def request(
    port: int, method: str, path: str, key: str, body: bytes | None = None
) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Authorization": f"Bearer {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    start = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), time.perf_counter() - start
    finally:
        conn.close()


def start_server(work: Path, settings: list[str]) -> tuple[Any, int, str]:
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    data_dir = work / "data"
    # What `watchllm serve` reads from its folder; warning: no access-log line per request.
    toml = ['log_level = "warning"', "create_default_key = false", *settings]
    (work / "watchllm.toml").write_text("\n".join(toml) + "\n")
    key = KeyStore(Settings(data_dir=data_dir).keys_path).create(PROJECT, scope="admin")
    port = free_port()
    proc = spawn(
        [
            sys.executable,
            "-m",
            "watchllm_ext.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        log=work / "serve.log",
        cwd=work,
    )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError("watchllm serve exited:\n" + (work / "serve.log").read_text())
        try:
            if request(port, "GET", "/readyz", key)[0] == 200:
                return proc, port, key
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("watchllm serve did not become ready; see serve.log")
        time.sleep(0.2)


def stored(port: int, key: str) -> int:
    status, body, _ = request(port, "GET", "/v1/admin/count?table=events", key)
    if status != 200:
        raise RuntimeError(f"/v1/admin/count answered {status}: {body[:300]!r}")
    return int(json.loads(body)["count"])


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": p99 * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=16, help="concurrent batches per round")
    parser.add_argument("--events", type=int, default=10_000, help="events per batch")
    parser.add_argument("--rounds", type=int, default=3, help="storm rounds")
    parser.add_argument("--models", type=int, default=2_000, help="distinct models")
    parser.add_argument("--window-min", type=int, default=1_980, help="minutes the events span")
    parser.add_argument("--queries", type=int, default=5, help="analytics queries in a row")
    parser.add_argument("--declined", type=int, default=3, help="declined bodies in a row")
    parser.add_argument(
        "--declined-events", type=int, default=5_000, help="events per declined body"
    )
    parser.add_argument("--resent", type=int, default=2, help="rounds of resent batches")
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle baseline seconds")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        help="a watchllm.toml line for the server, e.g. --setting ingest_threads=2",
    )
    args = parser.parse_args(argv)
    atexit.register(stop_all)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-healthz-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building {args.rounds} x {args.batches} batches of {args.events} events...", flush=True)
    rounds = [
        [make_batch(r, b, args.events, args.models, args.window_min) for b in range(args.batches)]
        for r in range(args.rounds)
    ]
    mib = len(rounds[0][0]) / 2**20
    proc, port, key = start_server(work, args.setting)
    prober = Prober(port)
    prober.start()
    figures: dict[str, Any] = {"batch_mib": round(mib, 2)}
    try:
        print(f"idle baseline, {args.idle_s:g} s...", flush=True)
        time.sleep(args.idle_s)

        prober.phase = "ingest storm"
        print(
            f"ingest storm: {args.rounds} rounds of {args.batches} x {args.events} events"
            f" ({mib:.1f} MiB each)...",
            flush=True,
        )
        started = time.perf_counter()
        statuses: list[int] = []
        with ThreadPoolExecutor(args.batches) as pool:
            for batches in rounds:
                results = pool.map(
                    lambda b: request(port, "POST", "/v1/events/batch", key, b), batches
                )
                statuses.extend(status for status, _, _ in results)
        accept_s = time.perf_counter() - started
        total = args.rounds * args.batches * args.events
        figures["storm"] = {
            "statuses": sorted(set(statuses)),
            "accept_s": round(accept_s, 2),
            "accepted_events_s": round(total / accept_s),
        }
        prober.phase = "settling"  # the store takes the rest in; not part of any phase
        deadline = time.monotonic() + 600
        while stored(port, key) < total and time.monotonic() < deadline:
            time.sleep(0.5)

        prober.phase = "analytics query"
        end = WINDOW_START + timedelta(minutes=args.window_min)
        path = (
            f"/v1/analytics/timeseries?project_id={PROJECT}&group_by=model&interval=1m"
            f"&from={WINDOW_START:%Y-%m-%dT%H:%M:%SZ}&to={end:%Y-%m-%dT%H:%M:%SZ}"
        )
        print(f"analytics: {args.queries} x GET {path}", flush=True)
        query: list[dict[str, Any]] = []
        for _ in range(args.queries):
            status, body, took = request(port, "GET", path, key)
            query.append({"status": status, "s": round(took, 2), "kib": len(body) // 1024})
        figures["analytics"] = query

        # Made before the phase: building them holds this process's GIL, which would delay
        # the prober's thread and show as the server's latency.
        prober.phase = "settling"
        bodies = [make_declined(r, args.declined_events) for r in range(args.declined)]
        prober.phase = "declined bodies"
        print(f"declined bodies: {args.declined} x {args.declined_events} events", flush=True)
        declined: list[dict[str, Any]] = []
        for body in bodies:
            status, _, took = request(port, "POST", "/v1/events/batch", key, body)
            declined.append({"status": status, "s": round(took, 2), "mib": len(body) >> 20})
        figures["declined"] = declined

        prober.phase = "resent batches"
        print(f"resent batches: {args.resent} x the storm's first round", flush=True)
        started = time.perf_counter()
        resent: list[int] = []
        with ThreadPoolExecutor(args.batches) as pool:
            for _ in range(args.resent):
                results = pool.map(
                    lambda b: request(port, "POST", "/v1/events/batch", key, b), rounds[0]
                )
                resent.extend(status for status, _, _ in results)
        took = time.perf_counter() - started
        # The copies are dropped in the store sink: wait for it, then nothing more is stored.
        prober.phase = "settling"
        time.sleep(3)
        figures["resent"] = {
            "statuses": sorted(set(resent)),
            "accepted_events_s": round(args.resent * args.batches * args.events / took),
            "stored_after": stored(port, key),
        }
        prober.phase = "done"
    finally:
        prober.done.set()
        prober.join(timeout=70)
        stop(proc)

    idle = summary(prober.samples["idle"])
    print()
    print(
        f"{'phase':<18} {'probes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'p50 x idle':>11} {'p99 x idle':>11}  failures"
    )
    for phase in ("idle", "ingest storm", "analytics query", "declined bodies", "resent batches"):
        if not prober.samples.get(phase):
            continue  # --queries 0
        s = summary(prober.samples[phase])
        figures[phase] = {k: round(v, 2) for k, v in s.items()}
        print(
            f"{phase:<18} {s['n']:>7} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
            f" {s['max_ms']:>8.2f} {s['p50_ms'] / idle['p50_ms']:>10.1f}x"
            f" {s['p99_ms'] / idle['p99_ms']:>10.1f}x  {prober.failures.get(phase, 0)}"
        )
    storm = figures["storm"]
    print(
        f"\ningest: answers {storm['statuses']}, {storm['accepted_events_s']} events/s accepted"
        f" ({storm['accept_s']} s for {total} events)"
    )
    print(
        "analytics answers:",
        ", ".join(f"{q['status']} in {q['s']} s ({q['kib']} KiB)" for q in figures["analytics"]),
    )
    print(
        "declined bodies:",
        ", ".join(f"{d['status']} in {d['s']} s ({d['mib']} MiB)" for d in figures["declined"]),
    )
    again = figures["resent"]
    print(
        f"resent batches: answers {again['statuses']}, {again['accepted_events_s']} events/s"
        f" accepted; events stored after them {again['stored_after']} (of {total}: copies"
        " dropped)"
    )
    busy = ("ingest storm", "analytics query", "declined bodies", "resent batches")
    worst = max(figures[p]["p99_ms"] for p in busy if p in figures)
    print(f"target p99 < 50 ms while busy: {'met' if worst < 50 else 'NOT met'} ({worst:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
