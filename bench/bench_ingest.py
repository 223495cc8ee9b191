"""Ingestion benchmarks for WatchLLM, with their baselines measured in the same run.

    python bench/bench_ingest.py             # full run (about 10 minutes on 2 cores)
    python bench/bench_ingest.py --quick     # smoke run (well under a minute of load)
    python bench/bench_ingest.py --snapshot  # benchmark a frozen copy of HEAD (git archive),
                                             # immune to edits of the tree during the run
    python bench/bench_ingest.py --profile   # add profiled passes: cProfile + py-spy top frames
    python bench/bench_ingest.py --gc-diagnostic --set spool_fsync=interval   # diagnostics

Needs wrk for part b (apt-get install -y wrk) and py-spy for --profile (pip install py-spy).

a. Batch endpoint end to end. A WatchLLM server (uvicorn, one worker, chDB in a temp folder,
   like `watchllm serve`) in its own process receives POST /v1/events/batch with 1,000-event
   batches of prompt_call events from a client in another process (a few keep-alive
   connections). Events/s counts only events that are in the store: after the load, the
   orchestrator polls GET /v1/admin/count until it reaches the number sent; the clock runs
   from the first request to that point. Baselines from the same payloads:
     (i)  in-process parse + validate_items + input_json + ChdbStore.insert_json, no HTTP, no
          writer
          (and (i'), the same with the server's all-valid fast path, when the core has one);
     (ii) a bare Starlette endpoint that reads the body, parses the JSON and answers 202;
     (iii) a bare chDB process inserting the same events into one plain MergeTree table in
          50,000-event JSONEachRow inserts: the embedded store's own limit on the machine.
   The same run can add WatchLLM with the ClickHouse-server store (tests/chfixture.py).
   WatchLLM runs twice: with the library's defaults (as a host app gets it) and with the
   process tuning `watchllm serve` applies (tuning.tune_for_serving: collector, GIL switch
   interval, the store's threads at store_threads_nice); the targets are read on the latter.
   Diagnostic rows: the request path alone (no sink, in-memory log) and, with
   --gc-diagnostic, the server with gc.freeze() and larger collector thresholds.
b. Single-event endpoint. wrk (32 connections) posts one event per request to
   /v1/projects/bench/events, and the same body to the bare Starlette endpoint; requests/s,
   p50 and p99 latency, and the ratio of the two. WatchLLM runs twice as in part a (library
   defaults, and `watchllm serve`'s tuning: the targets are read there); diagnostic row: the
   request path alone.

The machine is shared and small (2 cores), so every figure is printed next to a baseline
measured in the same run; rounds alternate between the systems compared and the median
round is reported. Only 127.0.0.1 is ever contacted. Every process started here is stopped
before the script exits.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import cProfile
import hashlib
import http.client
import io
import json
import os
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from processes import core_name, free_port, spawn, stop, stop_all
from sample_text import PROMPT_WORDS, REPLY_WORDS, text

HERE = Path(__file__).resolve()
BATCH_SIZE = 1_000
MARK = "@@B@@"  # replaced in the template body by a tag unique to each batch
PROJECT = "bench"

TARGET_BATCH_EVENTS_S = 100_000  # accepted (validated, spooled, fsynced)
TARGET_STORED_EVENTS_S = 40_000  # stored in the embedded store
TARGET_BARE_CHDB_RATIO = 0.5  # stored / bare chDB (50,000-event JSONEachRow inserts)
TARGET_SINGLE_RATIO = 0.5
TARGET_SINGLE_P99_MS = 15.0  # issue 10: p99 under 15 ms at 32 connections

WRK_MISSING = (
    "wrk is not installed; it is the load generator for the single-event benchmark (a Python "
    "client would be the bottleneck on a small machine).\n"
    "Install it with:  apt-get update && apt-get install -y wrk   (Debian/Ubuntu)\n"
    "             or:  brew install wrk                          (macOS)\n"
    "or run only the batch part:  python bench/bench_ingest.py --part batch"
)

# --- payloads ---------------------------------------------------------------------------------


def make_event(i: int, mark: str = MARK) -> dict[str, Any]:
    """One realistic prompt_call: gpt-4o, tokens, ~200-char prompt and response, tags,
    metadata, client info. `mark` is in every id so that one template serves all batches."""
    rng = random.Random(i)
    seconds = rng.randrange(86_400)
    return {
        "event_id": f"{mark}-{i:04d}",
        "event_type": "prompt_call",
        "run_id": f"run-{mark}-{i // 8:03d}",
        "timestamp": f"2026-03-14T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:"
        f"{seconds % 60:02d}.{rng.randrange(1000):03d}Z",
        "model": "gpt-4o",
        "provider": "openai",
        "tokens_input": rng.randint(150, 2_500),
        "tokens_output": rng.randint(20, 700),
        "prompt": text(rng, PROMPT_WORDS, 200),
        "response": text(rng, REPLY_WORDS, 200),
        "response_metadata": {"finish_reason": "stop", "system_fingerprint": "fp_9f2a1c"},
        "status": "success",
        "latency_ms": round(rng.uniform(180.0, 4_000.0), 1),
        "user_id": f"user-{rng.randint(1, 5_000)}",
        "session_id": f"sess-{mark}-{i // 40:02d}",
        "tags": ["chat", "support", rng.choice(["tier-1", "tier-2", "vip"])],
        "release": "2026.03.2",
        "env": "production",
        "client": {"hostname": "web-7", "sdk_version": "0.1.0", "platform": "python-3.12"},
        "metadata": {
            "customer_id": f"cus_{rng.randrange(10**8):08d}",
            "route": "/api/support/reply",
            "ab_bucket": rng.choice(["a", "b"]),
            "temperature": 0.2,
        },
    }


def batch_template() -> bytes:
    return json.dumps(
        {"events": [make_event(i) for i in range(BATCH_SIZE)]}, separators=(",", ":")
    ).encode()


def batch_body(template: bytes, tag: str) -> bytes:
    return template.replace(MARK.encode(), tag.encode())


def batch_tag(prefix: str, n: int) -> str:
    return f"{prefix}b{n:06d}"


def single_body() -> bytes:
    return json.dumps(make_event(7, mark="single"), separators=(",", ":")).encode()


# --- the code under test --------------------------------------------------------------------
# The core may be edited while a run is going (a run takes minutes). --snapshot benchmarks a
# frozen copy of a commit instead of the working tree; without it, the run checks that the
# core files did not change between its start and its end.


def export_snapshot(rev: str) -> dict[str, str]:
    """Export `rev` with git archive to a temp folder; the environment that imports it."""
    repo = HERE.parent.parent
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="watchllm-bench-snapshot-"))
    src = root / "src"
    src.mkdir()
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    # Import names as the package installs them (plugins/ is watchllm_plugins, and so on).
    package_dir = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    py = root / "py"
    py.mkdir()
    for name, folder in package_dir.items():
        (py / name).symlink_to(src / folder, target_is_directory=True)
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(py), os.environ.get("PYTHONPATH")) if p),
        "BENCH_SNAPSHOT_DIR": str(root),
        "BENCH_SNAPSHOT_DESC": f"snapshot of {rev} = commit {sha[:12]} (git archive)",
    }


def enter_snapshot(rev: str) -> None:
    """Export `rev` (export_snapshot) and re-run this script on it."""
    env = {**os.environ, **export_snapshot(rev)}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(HERE), *sys.argv[1:]], env)


def code_identity() -> dict[str, Any]:
    """Where the imported core comes from, its commit, and a fingerprint of its files."""
    import watchllm_ext
    import watchllm_plugins

    folders = [Path(watchllm_ext.__file__).parent, Path(watchllm_plugins.__file__).parent]
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    ident: dict[str, Any] = {"core": str(folders[0]), "fingerprint": digest.hexdigest()[:16]}
    if os.environ.get("BENCH_SNAPSHOT_DESC"):
        ident["version"] = os.environ["BENCH_SNAPSHOT_DESC"]
        return ident
    repo = folders[0].resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "watchllm_ext", "plugins", "clickhouse"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        ident["version"] = "working tree (not a git checkout)"
        return ident
    ident["version"] = (f"working tree at commit {sha[:12]}"
                        + (" + uncommitted changes to the core" if dirty else ""))
    return ident


# --- processes --------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its live child processes (the
    server's worker processes, which validate big bodies and OTLP), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(child[1]) == pid:  # its parent
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def http_get(port: int, path: str, key: str | None = None,
             timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# Settings given with --set NAME=VALUE, for every WatchLLM server of the run.
SERVER_SETTINGS: dict[str, Any] = {}

# Python's collector, tuned for a server with a large long-lived heap (the --gc-diagnostic).
GC_TUNED_THRESHOLDS = (50_000, 20, 100)


class Server:
    """A server process: "watchllm" (the real app), "watchllm-nosink" (the real app with the
    store sink disabled and the in-memory log: the request path alone), "watchllm-gc" (the
    real app with gc.freeze() after start-up and larger collector thresholds), "watchllm-serve"
    (the real app with all the process tuning `watchllm serve` applies: that and the store's
    threads at a lower priority) or "bare" (the HTTP baseline)."""

    def __init__(self, kind: str, workdir: Path, env: dict[str, str] | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        """`env`: the process's environment on top of ours (a snapshot's PYTHONPATH, say);
        `settings`: its WatchLLM settings instead of SERVER_SETTINGS."""
        self.kind = kind
        self.env = env
        self.settings = dict(SERVER_SETTINGS) if settings is None else settings
        self.port = free_port()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log = workdir / f"{kind}-{self.port}.log"
        self.key: str | None = None
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind.startswith("watchllm"):
            from watchllm_ext.keys import KeyStore
            from watchllm_ext.settings import Settings

            settings = Settings(**{**self.settings, "data_dir": self.data_dir,
                                   "create_default_key": False})
            self.key = KeyStore(settings.keys_path).create(PROJECT, scope="admin", name="bench")
        self.proc = spawn(
            [sys.executable, str(HERE), "--role", f"serve-{self.kind}", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--settings-json", json.dumps(self.settings)],
            log=self.log,
            cwd=self.workdir,
            env=self.env,
        )
        ready = "/readyz" if self.kind.startswith("watchllm") else "/healthz"
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} server exited; see {self.log}:\n"
                                   + self.log.read_text()[-3000:])
            with contextlib.suppress(OSError):
                if http_get(self.port, ready, timeout=5)[0] == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} server did not become ready; see {self.log}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)

    def reset_gc_pauses(self) -> None:
        """Count the server's garbage collections from now on (start-up and warm-up not)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)

    def gc_pauses(self) -> dict[str, list[float]] | None:
        """The server's garbage collections once it has stopped: {generation: [count, wall s,
        longest wall s, CPU s, longest CPU s]} since reset_gc_pauses (role_serve writes them
        at exit), None when not written."""
        path = self.workdir / GC_STATS_FILE
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def count(self) -> int:
        status, body = http_get(self.port, "/v1/admin/count?table=events", self.key)
        if status != 200:
            raise RuntimeError(f"/v1/admin/count answered {status}: {body[:300]!r}")
        return int(json.loads(body)["count"])

    def delivered(self) -> int | None:
        """Events the store sink has written (its counter in /metrics), None if not there."""
        status, body = http_get(self.port, "/metrics")
        if status != 200:
            return None
        found = re.findall(rb'^watchllm_sink_delivered_events_total\{sink="store:[^"]*"\} (\S+)$',
                           body, re.M)
        return int(float(found[0])) if found else None

    def wait_count(self, target: int, timeout_s: float) -> tuple[int, float]:
        """Wait until `target` events are in the store; (count, monotonic time seen). Polls
        the store sink's delivered counter (/metrics: no store query, so the polls do not
        queue with the sink's inserts, as a count with FINAL every 50 ms did), then checks
        the count in the store once. Every 10 ms: a poll costs the server ~1 ms of CPU on
        its event loop, idle while the store drains, and a look every 50 ms added 25 ms on
        average (up to 50) to a burst's ~1.4 s, which the bare chDB baseline, timed in its
        own process, does not pay."""
        deadline = time.monotonic() + timeout_s
        while True:
            delivered = self.delivered()
            n = self.count() if delivered is None else delivered
            now = time.monotonic()
            if n >= target or now > deadline:
                if delivered is not None:
                    n = self.count()
                return n, now
            time.sleep(0.01)


# --- roles run in child processes -------------------------------------------------------------


GC_STATS_FILE = "gc-pauses.json"


def record_gc_pauses(out: Path) -> None:
    """Time every garbage collection of this process; written to `out` at exit."""
    import gc

    # Per generation: count, wall s in all, longest wall s, CPU s in all, longest CPU s (the
    # thread's CPU: on a loaded machine the wall time also holds the waits for a core).
    stats = {str(g): [0, 0.0, 0.0, 0.0, 0.0] for g in range(3)}
    started = [0.0, 0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter(), time.thread_time()]
            return
        wall, cpu = time.perf_counter() - started[0], time.thread_time() - started[1]
        entry = stats[str(info["generation"])]
        entry[0] += 1
        entry[1] += wall
        entry[2] = max(entry[2], wall)
        entry[3] += cpu
        entry[4] = max(entry[4], cpu)

    def reset(*_: Any) -> None:
        for entry in stats.values():
            entry[:] = [0, 0.0, 0.0, 0.0, 0.0]

    gc.callbacks.append(callback)
    signal.signal(signal.SIGUSR1, reset)  # Server.reset_gc_pauses: the measured part only
    atexit.register(lambda: out.write_text(json.dumps(stats)))


def role_serve(kind: str, port: int, data_dir: Path, overrides: dict[str, Any]) -> None:

    import uvicorn

    record_gc_pauses(Path.cwd() / GC_STATS_FILE)  # the server runs in its work folder
    if kind.startswith("watchllm"):
        import watchllm_ext
        from watchllm_ext.app import create_app
        from watchllm_ext.settings import Settings

        # The first line of its log: which code it runs (a --versus run shows both sides').
        print(f"serving the code in {Path(watchllm_ext.__file__).parent}", flush=True)
        # What `watchllm serve` builds, at log level warning (no access-log line per request).
        values: dict[str, Any] = {**overrides, "data_dir": data_dir, "create_default_key": False,
                                  "log_level": "warning", "host": "127.0.0.1", "port": port}
        if kind == "watchllm-nosink":
            # The request path alone: no sink, and (if the core has a durable log) the
            # in-memory one, so neither the store nor the disk is in the figure.
            values["disable_plugins"] = [*values.get("disable_plugins", []), "store_sink"]
            if "durability" in Settings.model_fields:
                values["durability"] = "memory"
        settings = Settings(**values)
        app = create_app(settings)
        app.state.watchllm.open_store()
    else:
        app = bare_app()
    if kind in ("watchllm-gc", "watchllm-serve", "watchllm-ch"):
        tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

        # "serve": all that `watchllm serve` applies (collector tuning, GIL switch interval,
        # the store's threads at store_threads_nice); "gc": the first two only. "ch" (the
        # ClickHouse-server store) as `watchllm serve` runs it too: its target compares it
        # with the `serve` row.
        nice = getattr(settings, "store_threads_nice", None)
        if nice is None:  # a --snapshot from before the setting
            tune_for_serving()
        else:
            tune_for_serving(nice if kind in ("watchllm-serve", "watchllm-ch") else 0)
        try:  # and its HTTP protocol (header deadline, one send per answer), as cmd_serve
            uvicorn_options = core_name("watchllm_ext.serving.protocol", "uvicorn_options")
        except ImportError:  # a --snapshot from before serving.py
            pass
        else:
            uvicorn.run(app, **{**uvicorn_options(settings), "workers": 1})
            return
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", workers=1)


def bare_app() -> Any:
    """The HTTP floor: read the same body, parse it with the same JSON parser, answer 202."""
    from pydantic_core import from_json
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def ingest(request: Request) -> Response:
        payload = from_json(await request.body(), allow_inf_nan=False)
        events = payload.get("events", [payload]) if isinstance(payload, dict) else payload
        return JSONResponse({"accepted": len(events)}, status_code=202)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/events/batch", ingest, methods=["POST"]),
        Route("/v1/projects/{project_id}/events", ingest, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


def role_batch_client(args: argparse.Namespace) -> None:
    """Send `--batches` bodies over `--conns` keep-alive connections; print a JSON summary."""
    template = Path(args.template).read_bytes()
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    lock = threading.Lock()
    # The bodies are built before the clock starts, as the bare chDB baseline's are: the
    # load generator's own work (~0.85 us an event to make one) must not take the CPU the
    # server under test shares with it on these cores.
    bodies = [batch_body(template, batch_tag(args.tag, n)) for n in range(args.batches)]
    next_batch = iter(range(args.batches))
    statuses: Counter[int] = Counter()
    accepted = [0]
    retries = [0]
    errors: list[str] = []
    t_first: list[float] = []
    t_last = [0.0]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=300)
        try:
            while not errors:
                with lock:
                    n = next(next_batch, None)
                if n is None:
                    return
                body = bodies[n]
                for attempt in range(200):  # bounded: 503s are retried after Retry-After
                    with lock:
                        if not t_first:
                            t_first.append(time.monotonic())
                    try:
                        conn.request("POST", "/v1/events/batch", body=body, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                    except (OSError, http.client.HTTPException) as exc:
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=300)
                        if attempt >= 3:
                            errors.append(f"batch {n}: {exc!r}")
                            return
                        continue
                    with lock:
                        statuses[resp.status] += 1
                    if resp.status == 503:
                        with lock:
                            retries[0] += 1
                        wait = float(resp.getheader("Retry-After") or 1)
                        time.sleep(min(wait, 1.0))
                        continue
                    if resp.status != 202:
                        errors.append(f"batch {n}: HTTP {resp.status}: {data[:300]!r}")
                        return
                    got = json.loads(data)["accepted"]
                    with lock:
                        accepted[0] += got
                        t_last[0] = time.monotonic()
                    break
                else:
                    errors.append(f"batch {n}: still refused after 200 tries")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({
        "t_first": t_first[0] if t_first else None,
        "t_last": t_last[0],
        "accepted": accepted[0],
        "statuses": {str(k): v for k, v in statuses.items()},
        "retries_503": retries[0],
        "errors": errors[:5],
    }))


BARE_CHDB_INSERT_EVENTS = 50_000  # the embedded store's own best insert size on these cores
# One plain MergeTree table with a column per key of the benchmark's events (free-form
# objects read as their JSON text, as WatchLLM's input tables read them).
BARE_CHDB_TABLE = """
CREATE TABLE IF NOT EXISTS bare_events (
    project_id LowCardinality(String) DEFAULT 'bench', event_id String,
    event_type LowCardinality(String), run_id String, timestamp DateTime64(3, 'UTC'),
    model LowCardinality(Nullable(String)), provider LowCardinality(Nullable(String)),
    tokens_input Nullable(UInt32), tokens_output Nullable(UInt32),
    prompt Nullable(String) CODEC(ZSTD(3)), response Nullable(String) CODEC(ZSTD(3)),
    response_metadata Nullable(String) CODEC(ZSTD(3)), status LowCardinality(Nullable(String)),
    latency_ms Nullable(Float64), user_id Nullable(String), session_id Nullable(String),
    tags Array(String), release Nullable(String), env LowCardinality(String),
    client String, metadata String CODEC(ZSTD(3))
) ENGINE = MergeTree PARTITION BY toYYYYMM(timestamp) ORDER BY (project_id, timestamp, event_id)
"""


def role_bare_chdb(args: argparse.Namespace) -> None:
    """Baseline (iii): the same events into one plain MergeTree table by a bare chDB process,
    50,000-event JSONEachRow inserts (the JSON as the client sent it, no Python per event):
    the most the embedded store takes on this machine. Prints a JSON summary."""
    from chdb import session

    from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

    template = Path(args.template).read_bytes()
    db = session.Session(str(Path(args.data_dir)))
    db.query(BARE_CHDB_TABLE)
    clause = ", ".join(
        f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
        for k, v in JSON_INPUT_SETTINGS.items()
    )
    # The bodies are built before the clock starts: only ClickHouse's work is timed.
    per_insert = max(1, BARE_CHDB_INSERT_EVENTS // BATCH_SIZE)
    bodies = []
    for first in range(0, args.batches, per_insert):
        events = [
            json.loads(batch_body(template, batch_tag(args.tag, n)))["events"]
            for n in range(first, min(first + per_insert, args.batches))
        ]
        bodies.append(b"\n".join(json.dumps(e).encode() for batch in events for e in batch))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for body in bodies:
        with db.send_insert(f"INSERT INTO bare_events SETTINGS {clause}", "JSONEachRow") as ins:
            ins.append(body)
            ins.finish()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stored = int(db.query("SELECT count() FROM bare_events", "CSV").data().strip())
    db.close()
    n = args.batches * BATCH_SIZE
    print(json.dumps({"events": n, "stored": stored, "elapsed_s": elapsed,
                      "events_s": n / elapsed, "inserts": len(bodies),
                      "server_cpu_us_per_event": cpu / n * 1e6}))


def measure_bare_chdb(work: Path, template: Path, batches: int, rnd: int) -> dict[str, Any]:
    data_dir = work / f"bare-chdb-{rnd}"
    data_dir.mkdir(parents=True)
    proc = spawn(
        [sys.executable, str(HERE), "--role", "bare-chdb", "--data-dir", str(data_dir),
         "--template", str(template), "--batches", str(batches), "--tag", f"r{rnd}"],
        stdout=subprocess.PIPE,
        cwd=data_dir,
    )
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        stop(proc, grace_s=5)
    if proc.returncode != 0:
        raise RuntimeError(f"the bare chDB baseline failed (exit {proc.returncode})")
    res = json.loads(out)
    if res["stored"] != res["events"]:
        raise RuntimeError(f"bare chDB stored {res['stored']} of {res['events']} events")
    return res


def role_inproc(args: argparse.Namespace) -> None:
    """Baseline (i): the same payloads through parse + validate + rows + insert, no HTTP.

    Variant "items": from_json + validate_items (the validation entry point that takes parsed
    JSON). Variant "fast": validate_fast + finish_fast on the raw bytes, the path the server
    takes for an all-valid body (when the core has it). Events are inserted as the store
    sink inserts them (store/rows.py input_json, Store.insert_json) in groups of
    `store_insert_max_events` (50,000 by default), as the writer groups them for it."""
    from pydantic_core import from_json

    from watchllm_ext.auth import Principal
    from watchllm_ext.plugins import get_plugin_manager
    from watchllm_ext.settings import Settings
    from watchllm_ext.store import apply_migrations
    from watchllm_ext.store.rows import JSON_INPUT_SETTINGS, input_json
    from watchllm_plugins.chdb_store import ChdbStore

    settings = Settings(data_dir=Path(args.data_dir), create_default_key=False)
    pm = get_plugin_manager(settings)
    store = ChdbStore(settings.store_path)
    try:
        apply_migrations(store)
        principal = Principal(PROJECT, frozenset({"admin"}), "bench")
        template = Path(args.template).read_bytes()
        group = settings.store_insert_max_events

        stages = {"parse": 0.0, "validate": 0.0, "rows": 0.0, "insert": 0.0}
        validation = ingest_validation()

        def run(tag: str, n_batches: int, profiler: cProfile.Profile | None) -> int:
            bodies = [batch_body(template, batch_tag(tag, n)) for n in range(n_batches)]
            pending: list[Any] = []
            total = 0
            if profiler is not None:
                profiler.enable()
            for i, body in enumerate(bodies):
                t0 = time.perf_counter()
                if args.variant == "fast":
                    events = validation.validate_fast(body, "batch")  # parses and validates
                    if events is None:
                        raise RuntimeError("the fast path refused a valid batch")
                    t1 = time.perf_counter()
                    outcome = validation.finish_fast(events, principal, pm)
                else:
                    items = from_json(body, allow_inf_nan=False)["events"]
                    t1 = time.perf_counter()
                    outcome = validation.validate_items(items, principal, pm)
                t2 = time.perf_counter()
                stages["parse"] += t1 - t0
                stages["validate"] += t2 - t1
                if outcome.rejected:
                    raise RuntimeError(f"rejected: {outcome.rejected[0].as_dict()}")
                pending.extend(outcome.accepted)
                if len(pending) >= group or i == len(bodies) - 1:
                    t3 = time.perf_counter()
                    bodies_ = input_json(pending)  # the store sink's JSON for its input tables
                    t4 = time.perf_counter()
                    for table, body_ in bodies_.items():
                        store.insert_json(table, body_, JSON_INPUT_SETTINGS)
                    t5 = time.perf_counter()
                    stages["rows"] += t4 - t3
                    stages["insert"] += t5 - t4
                    total += len(pending)
                    pending = []
            if profiler is not None:
                profiler.disable()
            return total

        run("warm", 2, None)  # price cache, pydantic and chDB first-call costs
        for key in stages:
            stages[key] = 0.0
        profiler = cProfile.Profile() if args.profile_out else None
        t0 = time.perf_counter()
        total = run(args.tag, args.batches, profiler)
        elapsed = time.perf_counter() - t0
        stored = int(store.query("SELECT count() AS n FROM events FINAL")[0]["n"])
        if profiler is not None:
            profiler.dump_stats(args.profile_out)
        if args.variant == "fast":  # one call parses and validates: report it as validate
            stages["validate"] += stages.pop("parse")
        print(json.dumps({"events": total, "elapsed_s": elapsed, "stages": stages,
                          "stored_total": stored, "expected_total": total + 2 * BATCH_SIZE}))
    finally:
        store.close()


# --- measurements (orchestrator) --------------------------------------------------------------


def run_batch_client(port: int, key: str | None, template: Path, batches: int, conns: int,
                     tag: str, timeout_s: float) -> dict[str, Any]:
    proc = spawn(
        [sys.executable, str(HERE), "--role", "batch-client", "--port", str(port),
         "--template", str(template), "--batches", str(batches), "--conns", str(conns),
         "--tag", tag] + (["--key", key] if key else []),
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        stop(proc, grace_s=5)
    if proc.returncode != 0:
        raise RuntimeError(f"the batch client failed (exit {proc.returncode})")
    result = json.loads(out)
    if result["errors"]:
        raise RuntimeError(f"the batch client saw errors: {result['errors']}")
    return result


def timed_burst(server: Server, template: Path, batches: int, conns: int, tag: str,
                stored_before: int, store_pid: int | None = None) -> tuple[dict[str, Any], int]:
    """`batches` batches to `server`, timed from the first request until all of them are in
    its store: the figures, and how many events the store then holds."""
    cpu0 = cpu_seconds(server.pid)
    store_cpu0 = cpu_seconds(store_pid) if store_pid is not None else 0.0
    res = run_batch_client(server.port, server.key, template, batches, conns, tag,
                           timeout_s=1800)
    target = stored_before + res["accepted"]
    stored, t_done = server.wait_count(target, timeout_s=600)
    cpu = cpu_seconds(server.pid) - cpu0
    store_cpu = cpu_seconds(store_pid) - store_cpu0 if store_pid is not None else None
    if stored < target:
        raise RuntimeError(f"only {stored} of {target} events reached the store in time")
    n = res["accepted"]
    elapsed = t_done - res["t_first"]
    return {
        "events": n,
        "elapsed_s": elapsed,
        "events_s": n / elapsed,
        "accept_s": res["t_last"] - res["t_first"],
        "accept_events_s": n / (res["t_last"] - res["t_first"]),
        "drain_s": t_done - res["t_last"],
        "retries_503": res["retries_503"],
        "server_cpu_us_per_event": cpu / n * 1e6,
        # a ClickHouse server's process (the chfixture), in the same window
        **({"store_cpu_us_per_event": store_cpu / n * 1e6} if store_cpu is not None else {}),
    }, stored


def warm_up_batch(server: Server, template: Path, tag: str) -> int:
    """One batch, waited for until stored (price cache, first chDB insert), so that the
    writer starts the timed load empty; returns the store's count."""
    run_batch_client(server.port, server.key, template, 1, 1, tag, 120)
    stored = server.wait_count(BATCH_SIZE, 60)[0]
    if stored < BATCH_SIZE:
        raise RuntimeError(f"{server.kind}: the warm-up batch did not reach the store")
    return stored


def measure_batch_watchllm(work: Path, template: Path, batches: int, conns: int,
                           rnd: int, pyspy_out: Path | None = None,
                           kind: str = "watchllm", store_pid: int | None = None) -> dict[str, Any]:
    with Server(kind, work / f"batch-{kind}-{rnd}") as server:
        stored = warm_up_batch(server, template, f"w{rnd}")
        spy = pyspy_attach(server.pid, pyspy_out, work) if pyspy_out is not None else None
        try:
            return timed_burst(server, template, batches, conns, f"r{rnd}", stored,
                               store_pid)[0]
        finally:
            if spy is not None:
                stop(spy, grace_s=60)


def measure_batch_clickhouse(work: Path, template: Path, batches: int, conns: int,
                             rnd: int) -> dict[str, Any]:
    """WatchLLM end to end with the ClickHouse-server store: tests/chfixture.py (ClickHouse's
    HTTP interface served by chDB in its own process, loopback) started fresh for the round."""
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from chfixture import start_fixture

    folder = work / f"chserver-{rnd}"
    with start_fixture(folder) as fx:
        saved = dict(SERVER_SETTINGS)
        SERVER_SETTINGS["clickhouse_url"] = fx.url
        try:
            return measure_batch_watchllm(work, template, batches, conns, rnd,
                                          kind="watchllm-ch", store_pid=fx.process.pid)
        finally:
            SERVER_SETTINGS.clear()
            SERVER_SETTINGS.update(saved)


def measure_batch_accept(kind: str, work: Path, template: Path, batches: int, conns: int,
                         rnd: int) -> dict[str, Any]:
    """Servers that keep nothing (bare, watchllm-nosink): time from first request to last 202."""
    with Server(kind, work / f"batch-{kind}-{rnd}") as server:
        run_batch_client(server.port, server.key, template, 2, 1, f"w{rnd}", 120)
        cpu0 = cpu_seconds(server.pid)
        res = run_batch_client(server.port, server.key, template, batches, conns, f"r{rnd}",
                               1800)
        cpu = cpu_seconds(server.pid) - cpu0
    n = res["accepted"]
    elapsed = res["t_last"] - res["t_first"]
    return {"events": n, "elapsed_s": elapsed, "events_s": n / elapsed,
            "server_cpu_us_per_event": cpu / n * 1e6}


def pair_order(pair: int, names: list[str]) -> list[str]:
    """The order of a pair's runs: alternating, so that neither side always goes first."""
    return names if pair % 2 == 0 else names[::-1]


def measure_versus(work: Path, template: Path, batches: int, conns: int, pairs: int,
                   sides: dict[str, tuple[dict[str, str] | None, dict[str, Any]]]
                   ) -> dict[str, list[dict[str, Any]]]:
    """Two `watchllm serve` servers side by side, each with its environment (which code it
    imports) and settings; bursts of `batches` batches to one, then the other (the order
    alternating), `pairs` times. A shared machine's speed drifts over minutes, so the two
    bursts of a pair, seconds apart, meet the same machine: compare them pair by pair."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(Server("watchllm-serve", work / f"versus-{name}",
                                                    env=env, settings=settings))
                   for name, (env, settings) in sides.items()}
        stored: dict[str, int] = {}
        for name, server in servers.items():
            print(f"  {name}: {server.log.read_text().splitlines()[0]}", flush=True)
            stored[name] = warm_up_batch(server, template, f"w{name}")
        for pair in range(pairs):
            for name in pair_order(pair, list(servers)):
                time.sleep(1.0)  # the other server's last inserts and merges settle
                figures, stored[name] = timed_burst(servers[name], template, batches, conns,
                                                    f"v{pair}{name}", stored[name])
                runs[name].append(figures)
            a, b = (runs[name][-1] for name in servers)
            print(f"  pair {pair + 1}: " + " | ".join(
                f"{name} stored {r['events_s']:,.0f}/s accepted {r['accept_events_s']:,.0f}/s "
                f"CPU {r['server_cpu_us_per_event']:.1f} us/ev"
                for name, r in zip(servers, (a, b), strict=True))
                + f" | B/A stored x{b['events_s'] / a['events_s']:.2f}", flush=True)
    return runs


def measure_versus_single(work: Path, pairs: int, duration_s: int, conns: int, threads: int,
                          sides: dict[str, tuple[dict[str, str] | None, dict[str, Any]]]
                          ) -> dict[str, list[dict[str, Any]]]:
    """measure_versus for single events: wrk runs of `duration_s` to one server, then the
    other, the order alternating; at the end, every event answered 202 is stored once."""
    body = work / "single.json"
    body.write_bytes(single_body())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    with contextlib.ExitStack() as stack:
        servers, scripts, answered = {}, {}, {}
        for name, (env, settings) in sides.items():
            server = stack.enter_context(Server("watchllm-serve", work / f"single-{name}",
                                                env=env, settings=settings))
            print(f"  {name}: {server.log.read_text().splitlines()[0]}", flush=True)
            servers[name] = server
            scripts[name] = wrk_script(work / f"single-{name}.lua", body, server.key)
            answered[name] = run_wrk(server.port, scripts[name], conns, 2, threads,
                                     "w")["requests"]  # warm-up, not counted
        for pair in range(pairs):
            for name in pair_order(pair, list(servers)):
                res = wrk_round(name, servers[name], scripts[name], conns, duration_s, threads,
                                f"p{pair}")
                answered[name] += res["requests"]
                runs[name].append(res)
            a, b = (runs[name][-1] for name in servers)
            print(f"  pair {pair + 1}: " + " | ".join(
                f"{name} {r['rps']:,.0f} req/s p99 {r['p99_ms']:.1f} ms"
                for name, r in zip(servers, (a, b), strict=True))
                + f" | B/A req/s x{b['rps'] / a['rps']:.2f}", flush=True)
        for name, server in servers.items():
            check_stored_once(name, server, answered[name], conns, pairs + 1)
    return runs


BATCH_VERSUS = (("events_s", "stored events/s"), ("accept_events_s", "accepted events/s"),
                ("server_cpu_us_per_event", "server CPU us/event"))
SINGLE_VERSUS = (("rps", "single events req/s"), ("p99_ms", "single p99 ms"),
                 ("server_cpu_us_per_req", "server CPU us/request"))


def print_versus(runs: dict[str, list[dict[str, Any]]], labels: dict[str, str],
                 metrics: tuple[tuple[str, str], ...] = BATCH_VERSUS) -> None:
    (a_name, a_runs), (b_name, b_runs) = runs.items()
    print(f"\nB/A, pair by pair ({len(a_runs)} pairs; median [lowest, highest]):")
    for key, what in metrics:
        ratios = sorted(b[key] / a[key] for a, b in zip(a_runs, b_runs, strict=True))
        print(f"  {what:22s} x{statistics.median(ratios):.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]"
              f"   (A {statistics.median(r[key] for r in a_runs):,.1f},"
              f" B {statistics.median(r[key] for r in b_runs):,.1f})")
    for name in (a_name, b_name):
        print(f"  {name} = {labels[name]}")


def ingest_validation() -> Any:
    """The module holding validate_items (and, from some commit on, validate_fast and
    finish_fast): `ingest.validate` now, the module `ingest` in snapshots of older commits."""
    try:
        from watchllm_ext.ingest import validate
    except ImportError:
        from watchllm_ext import ingest as validate
    return validate


def has_fast_path() -> bool:
    validation = ingest_validation()
    return hasattr(validation, "validate_fast") and hasattr(validation, "finish_fast")


def measure_inproc(work: Path, template: Path, batches: int, rnd: int, variant: str,
                   profile_out: Path | None = None) -> dict[str, Any]:
    data_dir = work / f"inproc-{variant}-{rnd}" / "data"
    data_dir.mkdir(parents=True)
    proc = spawn(
        [sys.executable, str(HERE), "--role", "inproc", "--data-dir", str(data_dir),
         "--template", str(template), "--batches", str(batches), "--tag", f"r{rnd}",
         "--variant", variant]
        + (["--profile-out", str(profile_out)] if profile_out else []),
        stdout=subprocess.PIPE,
        cwd=data_dir.parent,
    )
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        stop(proc, grace_s=5)
    if proc.returncode != 0:
        raise RuntimeError(f"the in-process baseline failed (exit {proc.returncode})")
    res = json.loads(out)
    if res["stored_total"] != res["expected_total"]:
        raise RuntimeError(f"in-process baseline stored {res['stored_total']} events, "
                           f"expected {res['expected_total']}")
    res["events_s"] = res["events"] / res["elapsed_s"]
    return res


_LAT_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read the wrk latency {text!r}")
    return float(m.group(1)) * _LAT_UNITS[m.group(2)]


def run_wrk(port: int, script: Path, conns: int, duration_s: int, threads: int,
            tag: str) -> dict[str, Any]:
    """One wrk run; `tag` makes its event ids unlike any other run's (wrk_script)."""
    url = f"http://127.0.0.1:{port}/v1/projects/{PROJECT}/events"
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration_s}s", "--latency", "--timeout",
           "10s", "-s", str(script), url, "--", tag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60,
                         check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:(.*)", out)
    reqs = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "requests": int(reqs.group(1)) if reqs else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock.group(1).strip() if sock else "",
    }


def wrk_script(path: Path, body_path: Path, key: str | None) -> Path:
    """A wrk script that sends the single event with a new event id every request ("single-",
    the run's tag from wrk's arguments, a counter): each request is a new event to store, as
    a real client's are (one id sent again and again would be deduplicated by the store sink
    and never inserted)."""
    body = body_path.read_text()
    prefix, sep, suffix = body.partition('"event_id":"single-0007"')
    if not sep:
        raise RuntimeError(f"{body_path}: no event id to vary")
    lines = [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        f"local prefix = {json.dumps(prefix + chr(34) + 'event_id' + chr(34) + ':' + chr(34))}",
        f"local suffix = {json.dumps(chr(34) + suffix)}",
        'local tag = "t"',
        "local n = 0",
        "local threads = 0",
        # wrk runs this script in each of its threads: each gets a number of its own.
        'function setup(thread) threads = threads + 1; thread:set("tid", threads) end',
        'function init(args) tag = (args[1] or tag) .. "-" .. (tid or 0) end',
        "function request()",
        "  n = n + 1",
        '  return wrk.format(nil, nil, nil, prefix .. "single-" .. tag .. "-" .. n .. suffix)',
        "end",
    ]
    if key:
        lines.insert(2, f'wrk.headers["Authorization"] = "Bearer {key}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk_round(name: str, server: Server, script: Path, conns: int, duration_s: int,
              threads: int, tag: str) -> dict[str, Any]:
    """One timed wrk run with the server's CPU a request; every answer must be a 2xx."""
    cpu0 = cpu_seconds(server.pid)
    res = run_wrk(server.port, script, conns, duration_s, threads, tag)
    res["server_cpu_us_per_req"] = (cpu_seconds(server.pid) - cpu0) / max(res["requests"], 1) * 1e6
    if res["non_2xx"] or res["socket_errors"]:
        raise RuntimeError(f"{name}: {res['non_2xx']} non-2xx answers, socket "
                           f"errors: {res['socket_errors'] or 'none'}")
    return res


def check_stored_once(name: str, server: Server, answered: int, conns: int, runs: int) -> None:
    """Every event answered 202 is stored once. wrk counts the answers it read before its
    clock stopped; up to one request a connection a run may have been answered after."""
    stored, _ = server.wait_count(answered, 60)
    if not answered <= stored <= answered + conns * runs:
        raise RuntimeError(f"{name}: {answered} events answered 202, {stored} stored")


def measure_single(work: Path, rounds: int, duration_s: int, conns: int,
                   threads: int, gc_diagnostic: bool) -> dict[str, Any]:
    body = work / "single.json"
    body.write_bytes(single_body())
    # "serve": WatchLLM as `watchllm serve` runs it (its process tuning); the targets are read
    # on it, as in part a.
    kinds = {"bare": "bare", "watchllm": "watchllm", "serve": "watchllm-serve",
             "nosink": "watchllm-nosink"}
    if gc_diagnostic:
        kinds["gc"] = "watchllm-gc"
    names = list(kinds)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        scripts = {}
        for name, kind in kinds.items():
            server = stack.enter_context(Server(kind, work / f"single-{kind}"))
            scripts[name] = (server, wrk_script(work / f"{kind}.lua", body, server.key))
        answered = dict.fromkeys(names, 0)  # 2xx answers, warm-up included
        for name, (server, script) in scripts.items():  # warm-up, not counted
            answered[name] += run_wrk(server.port, script, conns, 2, threads, "w")["requests"]
        for r in range(rounds):
            k = r % len(names)
            order = names[k:] + names[:k]  # rotate, so no system always goes first
            for name in order:
                server, script = scripts[name]
                res = wrk_round(name, server, script, conns, duration_s, threads, f"r{r}")
                answered[name] += res["requests"]
                results[name].append(res)
                print(f"  single round {r + 1} {name:8s}: {res['rps']:9,.0f} req/s  "
                      f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms", flush=True)
        for name in ("watchllm", "serve"):
            check_stored_once(name, scripts[name][0], answered[name], conns, rounds + 1)
    return {name: _median_round(rs, "rps") | {"rounds": rs} for name, rs in results.items()}


def _median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round with the median value of `key` (a real round, not a mix of rounds)."""
    ordered = sorted(rounds, key=lambda r: r[key])
    return dict(ordered[(len(ordered) - 1) // 2])


# --- profiles ---------------------------------------------------------------------------------


def pyspy_attach(pid: int, out: Path, work: Path) -> subprocess.Popen[Any]:
    """py-spy sampling every thread of `pid` until stopped (SIGINT makes it write `out`)."""
    spy = spawn(["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                 "--nolineno", "--output", str(out)], log=work / "py-spy.log")
    time.sleep(1.0)  # let it attach before the load starts
    return spy


def top_pyspy(raw: Path, n: int = 12) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self time, inclusive time) shares of the top frames in py-spy's raw output."""
    idle = ("Condition.wait (threading.py)", "Event.wait (threading.py)")
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames or frames[-1] in idle:  # pool threads waiting for work
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    if not total:
        return [], []
    return ([(f, c / total) for f, c in own.most_common(n)],
            [(f, c / total) for f, c in incl.most_common(n * 3)])


def top_cprofile(path: Path, n: int = 15) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    return out.getvalue()


# --- the report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(cfg: dict[str, Any], batch: dict[str, Any] | None,
                 single: dict[str, Any] | None) -> None:
    print()
    print("=" * 96)
    print(f"WatchLLM ingestion benchmark   {cfg['cpus']} CPUs   python {cfg['python']}   "
          f"{'quick' if cfg['quick'] else 'full'} run")
    print(f"code: {cfg['code']['version']}")
    if cfg["server_settings"]:
        print(f"server settings: {cfg['server_settings']}")
    if cfg.get("code_changed_during_run"):
        print("WARNING: the core files changed during this run, so rounds may have measured "
              "different code; rerun with --snapshot")
    print("=" * 96)
    if batch is not None:
        bare, chdb, wl = batch["bare"], batch["bare_chdb"], batch["watchllm"]
        print(f"\na. Batch ingest: {cfg['batches']} x {BATCH_SIZE:,}-event prompt_call batches "
              f"({cfg['batch_body_kb']:.0f} KB each), {cfg['batch_conns']} client connections, "
              f"median of {cfg['batch_rounds']} rounds")
        print(f"   {'':62s}{'events/s':>10s}{'x chDB':>8s}{'x bare':>8s}{'CPU us/ev':>11s}")
        rows = [
            *([("(i)  in-process from_json+validate_items+rows+insert", batch["inproc"])]
              if "inproc" in batch else []),
            *([("(i') in-process, server's fast path validate_fast+finish_fast",
                batch["inproc_fast"])] if "inproc_fast" in batch else []),
            ("(ii) bare Starlette: read body + parse JSON + 202", bare),
            (f"(iii) bare chDB: {BARE_CHDB_INSERT_EVENTS:,}-event JSONEachRow, one table", chdb),
            ("WatchLLM POST /v1/events/batch, end to end (in chDB)", wl),
            *([("the same as `watchllm serve` runs it (process tuning)", batch["serve"])]
              if "serve" in batch else []),
            *([("the same (`serve`), ClickHouse-server store (chfixture)",
                batch["clickhouse"])] if "clickhouse" in batch else []),
            *([("diagnostic: request path only: no sink, memory log (to 202)", batch["nosink"])]
              if "nosink" in batch else []),
            *([("diagnostic: WatchLLM, gc.freeze() + larger gc thresholds", batch["gc"])]
              if "gc" in batch else []),
        ]
        for label, r in rows:
            cpu = r.get("server_cpu_us_per_event")
            cpu_s = f"{cpu:11.1f}" if cpu is not None else f"{'-':>11s}"
            print(f"   {label:62s}{r['events_s']:10,.0f}"
                  f"{r['events_s'] / chdb['events_s']:8.2f}"
                  f"{r['events_s'] / bare['events_s']:8.2f}{cpu_s}")
        for label, r in (("WatchLLM", wl), ("`watchllm serve`", batch.get("serve")),
                         ("ClickHouse-server store", batch.get("clickhouse"))):
            if r is not None:
                print(f"   {label} accept rate (to last 202): {r['accept_events_s']:,.0f}/s, "
                      f"then {r['drain_s']:.2f} s until all stored; "
                      f"{r['retries_503']} retried 503s")
                if r.get("store_cpu_us_per_event") is not None:  # the server's own CPU
                    print(f"   {label}: the server (chfixture, chDB) "
                          f"{r['store_cpu_us_per_event']:.1f} CPU us/event beside WatchLLM's "
                          f"{r['server_cpu_us_per_event']:.1f} (the embedded store's is in its "
                          "server's)")
        for label, r in (("(i) ", batch.get("inproc")), ("(i')", batch.get("inproc_fast"))):
            if r is None:
                continue
            per = {k: v / r["events"] * 1e6 for k, v in r["stages"].items()}
            print(f"   {label} per event: " + ", ".join(f"{k} {v:.1f} us" for k, v in per.items())
                  + f"  (total {sum(per.values()):.1f} us)")
        # The targets are the product's as users run it: `watchllm serve` when measured.
        wl = batch.get("serve", wl)
        which = "(`watchllm serve`)" if "serve" in batch else "(library defaults)"
        ok = wl["accept_events_s"] >= TARGET_BATCH_EVENTS_S
        print(f"   target accepted >= {TARGET_BATCH_EVENTS_S:,} events/s {which}: "
              f"{wl['accept_events_s']:,.0f}  {verdict(ok)}")
        ok = wl["events_s"] >= TARGET_STORED_EVENTS_S
        print(f"   target stored >= {TARGET_STORED_EVENTS_S:,} events/s in chDB {which}: "
              f"{wl['events_s']:,.0f}  {verdict(ok)}")
        ratio = wl["events_s"] / chdb["events_s"]
        print(f"   target stored >= {TARGET_BARE_CHDB_RATIO}x bare chDB: {ratio:.2f}x  "
              f"{verdict(ratio >= TARGET_BARE_CHDB_RATIO)}")
        if "clickhouse" in batch:
            ratio = batch["clickhouse"]["events_s"] / wl["events_s"]
            print(f"   target ClickHouse-server store >= chDB store: {ratio:.2f}x  "
                  f"{verdict(ratio >= 1.0)}")
    if single is not None:
        b = single["bare"]
        # The targets are the product's as users run it: `watchllm serve` when measured.
        w = single.get("serve", single["watchllm"])
        which = "`watchllm serve`" if "serve" in single else "WatchLLM"
        ratio = w["rps"] / b["rps"]
        print(f"\nb. Single events: POST /v1/projects/{PROJECT}/events, one event a request, "
              f"{cfg['single_conns']} connections (wrk -t{cfg['wrk_threads']}), 1 uvicorn worker, "
              f"{cfg['single_duration_s']} s x {cfg['single_rounds']} rounds, median round")
        print(f"   {'':44s}{'req/s':>10s}{'p50 ms':>9s}{'p99 ms':>9s}{'CPU us/req':>12s}")
        for label, r in (("bare Starlette: read body + parse JSON + 202", b),
                         ("WatchLLM single-event endpoint", single["watchllm"]),
                         *([("the same as `watchllm serve` runs it (tuning)", single["serve"])]
                           if "serve" in single else []),
                         ("diagnostic: request path only (no sink/disk)", single["nosink"]),
                         *([("diagnostic: WatchLLM, gc tuned", single["gc"])]
                           if "gc" in single else [])):
            print(f"   {label:44s}{r['rps']:10,.0f}{r['p50_ms']:9.2f}{r['p99_ms']:9.2f}"
                  f"{r['server_cpu_us_per_req']:12.1f}")
        print(f"   ratio {which} / bare: {ratio:.2f}x requests/s, "
              f"{w['p99_ms'] / b['p99_ms']:.2f}x p99")
        print(f"   target >= {TARGET_SINGLE_RATIO}x the bare request rate: {ratio:.2f}x  "
              f"{verdict(ratio >= TARGET_SINGLE_RATIO)}")
        print(f"   target p99 < {TARGET_SINGLE_P99_MS:.0f} ms at {cfg['single_conns']} "
              f"connections: {w['p99_ms']:.2f} ms  {verdict(w['p99_ms'] < TARGET_SINGLE_P99_MS)}")
    print()


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--part", choices=["all", "batch", "single", "none"], default="all")
    p.add_argument("--profile", action="store_true",
                   help="after the measured rounds, profile the batch path (cProfile on "
                   "baseline (i), py-spy on the server) and print the top frames")
    p.add_argument("--breakdown", action="store_true",
                   help="after the measured rounds (alone: --part none), the server's "
                        "CPU per event by thread and by stage (needs py-spy)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (server logs)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a WatchLLM setting for the servers under test (repeatable; the value "
                   "is read as JSON when it parses, else as a string), e.g. spool_fsync=interval")
    p.add_argument("--gc-diagnostic", action="store_true",
                   help="add a WatchLLM server with gc.freeze() after start-up and gc thresholds "
                   f"{GC_TUNED_THRESHOLDS} to both parts (what the collector costs)")
    p.add_argument("--batches", type=int, metavar="N",
                   help="1,000-event batches per round of part a (default 300, --quick 30)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="rounds of part a (default 3, --quick 1); the median round is reported")
    p.add_argument("--only", action="append", default=[], metavar="SYSTEM",
                   choices=["inproc", "inproc_fast", "bare", "bare_chdb", "nosink", "watchllm",
                            "clickhouse", "gc"],
                   help="in part a, measure only these systems (repeatable); bare, bare_chdb "
                   "and watchllm are always measured, being the baselines and the subject")
    p.add_argument("--versus", metavar="REV",
                   help="`watchllm serve` of this tree (A) against a frozen copy of REV (B), "
                   "side by side, batch bursts (--part batch) and wrk runs of single events "
                   "(--part single) alternating; B/A pair by pair (--rounds pairs, default 6; "
                   "--batches a burst, default 100)")
    p.add_argument("--versus-set", action="append", default=[], metavar="NAME=VALUE",
                   help="like --versus, B being this tree (or REV) with this setting too "
                   "(repeatable)")
    p.add_argument("--snapshot", nargs="?", const="HEAD", metavar="REV",
                   help="benchmark a frozen copy of a commit (default HEAD, via git archive) "
                   "instead of the working tree, which may be edited during the run")
    # Roles of the child processes (not for direct use).
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--template", help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="items", help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.role and args.role.startswith("serve-"):
        role_serve(args.role.removeprefix("serve-"), args.port, Path(args.data_dir),
                   json.loads(args.settings_json or "{}"))
        return 0
    if args.role == "batch-client":
        role_batch_client(args)
        return 0
    if args.role == "inproc":
        role_inproc(args)
        return 0
    if args.role == "bare-chdb":
        role_bare_chdb(args)
        return 0
    if args.role:
        p.error(f"unknown role {args.role}")

    if args.part in ("all", "single") and shutil.which("wrk") is None:
        print(f"error: {WRK_MISSING}", file=sys.stderr)
        return 2
    if (args.profile or args.breakdown) and shutil.which("py-spy") is None:
        print("error: --profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2

    if args.snapshot and not os.environ.get("BENCH_SNAPSHOT_DIR"):
        enter_snapshot(args.snapshot)  # does not return: re-runs this script on the copy
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    versus_settings: dict[str, Any] = {}
    for option, items, into in (("--set", args.set, SERVER_SETTINGS),
                                ("--versus-set", args.versus_set, versus_settings)):
        for item in items:
            name, sep, raw = item.partition("=")
            if not sep:
                p.error(f"{option} {item!r}: expected NAME=VALUE")
            try:
                into[name] = json.loads(raw)
            except ValueError:
                into[name] = raw
        if into:
            from watchllm_ext.settings import Settings

            try:
                Settings(**{**SERVER_SETTINGS, **into})
            except Exception as exc:
                p.error(f"{option}: {exc}")
    if args.versus or versus_settings:
        return run_versus(args, versus_settings)
    ident = code_identity()
    print(f"code under test: {ident['version']}\n  imported from {ident['core']}", flush=True)

    quick = args.quick
    cfg: dict[str, Any] = {
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        # a multiple of 50: whole 50,000-event store inserts
        "batches": args.batches or (30 if quick else 300),
        "batch_conns": 4,
        "batch_rounds": args.rounds or (1 if quick else 3),
        "single_conns": 32,
        "wrk_threads": 1,
        "single_duration_s": 3 if quick else 10,
        "single_rounds": 1 if quick else 3,
        "code": ident,
        "server_settings": dict(SERVER_SETTINGS),
        "gc_diagnostic": args.gc_diagnostic,
    }
    work = Path(tempfile.mkdtemp(prefix="watchllm-bench-"))
    batch = single = None
    try:
        template = work / "batch-template.json"
        template.write_bytes(batch_template())
        cfg["batch_body_kb"] = len(batch_body(template.read_bytes(), batch_tag("r0", 0))) / 1024
        if args.part in ("all", "batch"):
            fast = has_fast_path()
            runs: dict[str, list[dict[str, Any]]] = {
                "inproc": [], "inproc_fast": [], "bare": [], "bare_chdb": [], "nosink": [],
                "watchllm": [], "serve": [], "clickhouse": []}
            if not fast:
                del runs["inproc_fast"]
            if args.only:
                keep = {"bare", "bare_chdb", "watchllm", "serve", *args.only}
                runs = {name: rs for name, rs in runs.items() if name in keep}
            if args.gc_diagnostic:
                runs["gc"] = []
            for rnd in range(cfg["batch_rounds"]):
                steps = [
                    ("inproc", lambda r=rnd: measure_inproc(
                        work, template, cfg["batches"], r, "items")),
                    ("inproc_fast", lambda r=rnd: measure_inproc(
                        work, template, cfg["batches"], r, "fast")),
                    ("bare", lambda r=rnd: measure_batch_accept(
                        "bare", work, template, cfg["batches"], cfg["batch_conns"], r)),
                    ("bare_chdb", lambda r=rnd: measure_bare_chdb(
                        work, template, cfg["batches"], r)),
                    ("clickhouse", lambda r=rnd: measure_batch_clickhouse(
                        work, template, cfg["batches"], cfg["batch_conns"], r)),
                    ("nosink", lambda r=rnd: measure_batch_accept(
                        "watchllm-nosink", work, template, cfg["batches"], cfg["batch_conns"], r)),
                    ("watchllm", lambda r=rnd: measure_batch_watchllm(
                        work, template, cfg["batches"], cfg["batch_conns"], r)),
                    ("gc", lambda r=rnd: measure_batch_watchllm(
                        work, template, cfg["batches"], cfg["batch_conns"], r,
                        kind="watchllm-gc")),
                    ("serve", lambda r=rnd: measure_batch_watchllm(
                        work, template, cfg["batches"], cfg["batch_conns"], r,
                        kind="watchllm-serve")),
                ]
                steps = [step for step in steps if step[0] in runs]
                if rnd % 2:
                    steps.reverse()
                for name, fn in steps:
                    res = fn()
                    runs[name].append(res)
                    extra = (f"  (accepted at {res['accept_events_s']:,.0f}/s, drain "
                             f"{res['drain_s']:.2f} s)" if "drain_s" in res else "")
                    print(f"  batch round {rnd + 1} {name:11s}: {res['events_s']:9,.0f} events/s"
                          f"{extra}", flush=True)
            batch = {name: _median_round(rs, "events_s") | {"rounds": rs}
                     for name, rs in runs.items()}
        if args.part in ("all", "single"):
            single = measure_single(work, cfg["single_rounds"], cfg["single_duration_s"],
                                    cfg["single_conns"], cfg["wrk_threads"], args.gc_diagnostic)
        after = code_identity()["fingerprint"]
        cfg["code_changed_during_run"] = after != ident["fingerprint"]
        if batch is not None or single is not None:
            print_report(cfg, batch, single)
        if args.json:
            args.json.write_text(json.dumps({"config": cfg, "batch": batch, "single": single},
                                            indent=2))
        if args.profile:
            profile(work, template, cfg)
        if args.breakdown:
            found = breakdown(work, template, cfg)
            if args.json:
                data = json.loads(args.json.read_text())
                args.json.write_text(json.dumps(data | {"breakdown": found}, indent=2))
    finally:
        stop_all()
        snapshot = os.environ.get("BENCH_SNAPSHOT_DIR")
        if args.keep:
            print(f"kept {work}" + (f" and {snapshot}" if snapshot else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)
            if snapshot:
                shutil.rmtree(snapshot, ignore_errors=True)
    return 0


def run_versus(args: argparse.Namespace, versus_settings: dict[str, Any]) -> int:
    ident = code_identity()
    a_label = ident["version"] + (f", {SERVER_SETTINGS}" if SERVER_SETTINGS else "")
    b_env = export_snapshot(args.versus) if args.versus else None
    b_label = (b_env["BENCH_SNAPSHOT_DESC"] if b_env else ident["version"]) + (
        f", {SERVER_SETTINGS | versus_settings}" if SERVER_SETTINGS or versus_settings else "")
    work = Path(tempfile.mkdtemp(prefix="watchllm-bench-"))
    try:
        template = work / "batch-template.json"
        template.write_bytes(batch_template())
        print(f"A = {a_label}\nB = {b_label}", flush=True)
        sides = {"A": (None, dict(SERVER_SETTINGS)),
                 "B": (b_env, SERVER_SETTINGS | versus_settings)}
        labels = {"A": a_label, "B": b_label}
        found: dict[str, Any] = {"A": a_label, "B": b_label}
        if args.part in ("all", "batch"):
            found["runs"] = measure_versus(work, template, args.batches or 100, 4,
                                           args.rounds or 6, sides)
            print_versus(found["runs"], labels)
        if args.part in ("all", "single"):
            found["single"] = measure_versus_single(work, args.rounds or 6,
                                                    3 if args.quick else 10, 32, 1, sides)
            print_versus(found["single"], labels, SINGLE_VERSUS)
        if args.json:
            args.json.write_text(json.dumps(found, indent=2))
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if b_env:
                shutil.rmtree(b_env["BENCH_SNAPSHOT_DIR"], ignore_errors=True)
    return 0


def profile(work: Path, template: Path, cfg: dict[str, Any]) -> None:
    print("=" * 96)
    print("Profiles of the batch path (figures from these passes are not benchmark figures)")
    print("=" * 96)
    prof = work / "inproc.prof"
    variant = "fast" if has_fast_path() else "items"
    measure_inproc(work, template, cfg["batches"], 99, variant, profile_out=prof)
    print(f"\ncProfile of baseline (i) ({variant} path), validate + rows + insert, by own time:")
    print(top_cprofile(prof))
    raw = work / "py-spy.txt"
    res = measure_batch_watchllm(work, template, cfg["batches"], cfg["batch_conns"], 98,
                                 pyspy_out=raw)
    print(f"py-spy on the WatchLLM server during batch load ({res['events_s']:,.0f} events/s "
          f"under the profiler):")
    print_pyspy(raw)

    if shutil.which("wrk") is not None:
        raw_single = work / "py-spy-single.txt"
        body = work / "single.json"
        body.write_bytes(single_body())
        with Server("watchllm", work / "single-profile") as wl:
            script = wrk_script(work / "watchllm-profile.lua", body, wl.key)
            run_wrk(wl.port, script, cfg["single_conns"], 2, cfg["wrk_threads"], "w")  # warm-up
            spy = pyspy_attach(wl.pid, raw_single, work)
            res = run_wrk(wl.port, script, cfg["single_conns"], cfg["single_duration_s"],
                          cfg["wrk_threads"], "p")
            stop(spy, grace_s=60)
        print(f"\npy-spy on the WatchLLM server during single-event load ({res['rps']:,.0f} "
              f"req/s, p99 {res['p99_ms']:.1f} ms under the profiler):")
        print_pyspy(raw_single)
        shutil.copy(raw_single, Path(tempfile.gettempdir()) / "watchllm-bench-py-spy-single.txt")
    shutil.copy(raw, Path(tempfile.gettempdir()) / "watchllm-bench-py-spy.txt")
    shutil.copy(prof, Path(tempfile.gettempdir()) / "watchllm-bench-inproc.prof")
    print(f"\nraw profiles copied to {tempfile.gettempdir()}/watchllm-bench-py-spy*.txt and "
          "watchllm-bench-inproc.prof")


# --- where the server's CPU goes (--breakdown) -----------------------------------------------
# py-spy frames (function name, as py-spy prints it) that start a stage, most specific first:
# a sample belongs to the first of these found walking from the running frame to the root.
STAGES: list[tuple[str, str]] = [
    ("spool: fsync (waits on the disk: wall time, little CPU)", "fsync"),
    ("spool: write records", "Spool.write"),
    ("writer: read records back", "Spool.read"),
    ("writer: save cursor", "Spool.save_cursor"),
    ("writer: delivery loop, cache", "Writer._deliver"),
    ("store sink: chDB insert (Python side)", "ChdbStore.insert_json"),
    ("store sink: seen-ids filter, look-up", "SeenIds."),
    ("store sink: look-up, rows", "StoreSink._write"),
    ("request: validate (msgspec)", "validate_"),
    ("request: fill-in, hooks, cost", "finish_fast"),
    ("request: encode for the spool", "_encode_sliced"),
    ("request: submit (writer, cache)", "Writer.submit"),
    ("request: read body", "read_body"),
    ("request: auth, quota hooks", "WatchLLM.authenticate"),
    ("request: auth, quota hooks", "WatchLLM.check_quota"),
    ("request: answer (JSON response)", "JSONResponse"),
    ("request: answer (JSON response)", "Response.__call__"),
    ("request: handler, rest", "batch_events"),
    ("request: handler, rest", "project_events"),
    ("middleware, routing (Starlette)", "Starlette.__call__"),
    ("HTTP (uvicorn, httptools)", "httptools_impl"),
    ("event loop (uvloop: sockets, scheduling)", "Runner.run"),
]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (thread name, CPU seconds)} of every thread of `pid` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_thread_group(pid: int, before: dict[int, tuple[str, float]],
                        after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds between two thread_cpu() snapshots: the event loop (the main thread), the
    Python worker threads (named like the main thread: Python 3.11 does not name them) and
    each group of ClickHouse threads (by name, digits dropped). Threads that ended between
    the snapshots are left out (short-lived ones are rare in a server)."""
    main_name = after.get(pid, before.get(pid, ("?", 0.0)))[0]
    groups: Counter[str] = Counter()
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if tid == pid:
            group = "event loop (main thread)"
        elif name == main_name:
            group = "Python worker threads"
        else:
            group = "ClickHouse: " + re.sub(r"[0-9]+$", "", name)
        groups[group] += used
    return dict(groups)


def stage_shares(raw: Path) -> dict[str, Counter[str]]:
    """py-spy samples (busy only) by thread kind (event loop / worker) and stage."""
    out: dict[str, Counter[str]] = {"event loop": Counter(), "worker": Counter()}
    idle = ("Condition.wait (threading.py)", "Event.wait (threading.py)")
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames or frames[-1] in idle:
            continue
        kind = "worker" if any("Thread._bootstrap" in f for f in frames) else "event loop"
        if kind == "worker" and frames[-1].startswith("WorkerThread.run"):
            stage = "spool: fsync (waits on the disk: wall time, little CPU)"  # a C call
        else:
            stage = "other"
            for frame in reversed(frames):
                found = next((name for name, key in STAGES if key in frame), None)
                if found:
                    stage = found
                    break
        out[kind][stage] += int(count)
    return out


def breakdown(work: Path, template: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The server's CPU per event by thread (/proc) and by stage (py-spy's busy samples of
    each thread kind, scaled to that kind's CPU), under batch load and under single events."""
    result: dict[str, Any] = {}
    print("=" * 96)
    print("Where the WatchLLM server's CPU goes (one pass each, under py-spy at 200 Hz)")
    print("=" * 96)
    from watchllm_ext.settings import Settings

    passes = ["batch"] + (["single"] if shutil.which("wrk") else [])
    if "single" in passes and "gc_freeze_at_start" in Settings.model_fields:
        passes.append("single, gc_freeze_at_start=false")  # the same run without the freeze
    saved = dict(SERVER_SETTINGS)
    for part in passes:
        raw = work / f"breakdown-{part[:6]}.txt"
        SERVER_SETTINGS.clear()
        SERVER_SETTINGS.update(saved | ({"gc_freeze_at_start": False} if "=" in part else {}))
        with Server("watchllm", work / f"breakdown-{len(result)}") as server:
            if part == "batch":
                run_batch_client(server.port, server.key, template, 1, 1, "bw", 120)
                server.wait_count(BATCH_SIZE, 60)
            else:
                body = work / "single.json"
                body.write_bytes(single_body())
                part = part.replace("single", "single events", 1)
                script = wrk_script(work / "breakdown.lua", body, server.key)
                run_wrk(server.port, script, cfg["single_conns"], 2, cfg["wrk_threads"], "w")
            server.reset_gc_pauses()
            spy = pyspy_attach(server.pid, raw, work)
            before, t0 = thread_cpu(server.pid), time.monotonic()
            if part == "batch":
                res = run_batch_client(server.port, server.key, template, cfg["batches"],
                                       cfg["batch_conns"], "bd", 1800)
                n = res["accepted"]
                server.wait_count(BATCH_SIZE + n, 600)
                rate = f"{n / (time.monotonic() - t0):,.0f} events/s stored"
            else:
                res = run_wrk(server.port, script, cfg["single_conns"],
                              cfg["single_duration_s"], cfg["wrk_threads"], "b")
                n = res["requests"]
                rate = f"{res['rps']:,.0f} req/s, p99 {res['p99_ms']:.1f} ms"
            after = thread_cpu(server.pid)
            stop(spy, grace_s=60)
        SERVER_SETTINGS.clear()
        SERVER_SETTINGS.update(saved)
        groups = cpu_by_thread_group(server.pid, before, after)
        shares = stage_shares(raw)
        unit = "event" if part == "batch" else "request"
        total = sum(groups.values()) / n * 1e6
        print(f"\n{part}: {n:,} {unit}s at {rate} (under the profiler); "
              f"server CPU {total:.1f} us/{unit}")
        print(f"  by thread (CPU us/{unit}):")
        for group, cpu in sorted(groups.items(), key=lambda g: -g[1]):
            if cpu / n * 1e6 >= 0.05:
                print(f"    {cpu / n * 1e6:7.1f}  {group}")
        stages: dict[str, float] = {}
        for kind, group in (("event loop", "event loop (main thread)"),
                            ("worker", "Python worker threads")):
            samples = sum(shares[kind].values())
            if not samples:
                continue
            print(f"  {kind} by stage (CPU us/{unit}, its CPU split as its busy samples):")
            for stage, c in shares[kind].most_common():
                us = groups.get(group, 0.0) / n * 1e6 * c / samples
                stages[f"{kind}: {stage}"] = us
                if us >= 0.05:
                    print(f"    {us:7.1f}  {stage}")
        pauses = server.gc_pauses()  # warm-up included
        if pauses:
            print("  garbage collections during the load:")
            for gen, (count, wall, longest, cpu, longest_cpu) in pauses.items():
                print(f"    generation {gen}: {count:6,d}, CPU {cpu * 1000:7.1f} ms in all, "
                      f"longest {longest_cpu * 1000:6.1f} ms (wall {wall * 1000:7.1f} ms, "
                      f"longest {longest * 1000:6.1f} ms)")
        result[part] = {"n": n, "rate": rate, "cpu_us": total,
                        "threads_us": {g: c / n * 1e6 for g, c in groups.items()},
                        "stages_us": stages, "gc_pauses": pauses}
    return result


def print_pyspy(raw: Path) -> None:
    own, incl = top_pyspy(raw)
    print("  own time (the frame that was running, C calls included), share of busy samples:")
    for frame, share in own:
        print(f"    {share:6.1%}  {frame}")
    print("  inclusive time (the frame was on the stack):")
    for frame, share in incl:
        print(f"    {share:6.1%}  {frame}")


if __name__ == "__main__":
    sys.exit(main())
