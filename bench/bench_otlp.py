"""OTLP/HTTP ingest: spans/s until queryable, and spans dropped, for WatchLLM beside Arize
Phoenix and a bare baseline, all receiving the same stream in the same run.

    python bench/bench_otlp.py                      # rates 3300/s, 10000/s and flat out
    python bench/bench_otlp.py --quick              # smoke run (a few batches per phase)
    python bench/bench_otlp.py --only bare --only watchllm --profile   # + where a span's CPU goes
    python bench/bench_otlp.py --rate 3300 --spans 40000 --only phoenix
    python bench/bench_otlp.py --only watchllm --rate 0 --before b6db9e0 --rounds 3
                                                    # beside an older commit, same run

The stream: realistic spans of an LLM app (GenAI chat, tool and agent spans with the gen_ai.*
attributes, some deprecated keys, a quarter OpenInference, plain HTTP/DB/internal spans, trees
three to four levels deep) made with the real opentelemetry-sdk and encoded once with the real
exporter's encoder (`encode_spans`), in protobuf batches of 512 spans as BatchSpanProcessor
exports them (bench/otlp_spans.py). A client process POSTs the same bodies to each system over
several keep-alive connections, either paced at a fixed offered rate or flat out, and retries
429/502/503/504 as OTLPSpanExporter does (backoff 1, 2, 4 s... or Retry-After, within the
exporter's 10 s timeout); a batch still refused after that is dropped, as the exporter drops it.

Systems (each its own process on 127.0.0.1, its store in a temp folder):
  bare      a bare Starlette endpoint that parses the bodies with opentelemetry-proto and
            answers 200 (its count is spans parsed): the HTTP + decode floor of this machine;
  watchllm  the real app as `watchllm serve` runs it, chDB store; queryable = the spans
            table's count (`SELECT count() FROM spans FINAL`, /v1/admin/count), and the events
            table for the spans that are LLM work;
  phoenix   `phoenix serve` of arize-phoenix, sqlite in the temp folder; queryable = rows in
            its `spans` table. Phoenix is not a dependency of WatchLLM: it is installed into
            its own virtualenv (~/.cache/watchllm-bench/phoenix-venv) the first time, or give
            --phoenix-python PATH of an environment where `pip install arize-phoenix` was done.

--before REV adds that commit of WatchLLM as one more system (`watchllm@REV`, its code from
`git archive`, served by this script as `watchllm` is), and --rounds N runs every phase N
times, the systems' order reversed every other round: on a shared machine, compare the two
side by side in the same run (the server's CPU per span is the steadier figure).

Spans/s to queryable = spans queryable / (time from the first request to the moment the last
of them was queryable). Dropped = spans sent but not queryable at the end (answered 200 and
lost, or refused after the exporter's retries, or rejected in a partial success); spans
answered 200 that are still becoming queryable when --max-wait-s runs out are counted apart
as late. Every system gets a fresh server (empty store) for each phase.

--profile samples the WatchLLM server with py-spy during its flat-out phase and prints where
a span's CPU goes (decode / mapping / validation / spool / store / HTTP), with the process's
threads' CPU from /proc (chDB's own threads are not Python, so py-spy does not see them).
Only 127.0.0.1 is contacted. Every process started here is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from otlp_spans import BATCH_SPANS, make_bodies, read_bodies, write_bodies
from processes import core_name, free_port, spawn, stop, stop_all

HERE = Path(__file__).resolve()
PROJECT = "bench"

TARGET_SPANS_S = 30_000  # issue 11: spans/s to queryable on this 2-core machine
DEFAULT_RATES = (3_300.0, 10_000.0, 0.0)  # 0 = flat out
SYSTEMS = ("bare", "watchllm", "phoenix")

# OTLPSpanExporter's retry policy (opentelemetry/exporter/otlp/common/http.py, 1.45).
EXPORTER_TIMEOUT_S = 10.0
EXPORTER_MAX_RETRIES = 6
RETRYABLE = frozenset({429, 502, 503, 504})

PHOENIX_VENV = Path.home() / ".cache" / "watchllm-bench" / "phoenix-venv"
PHOENIX_INSTALL = "pip install arize-phoenix"


# --- small helpers ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its live child processes
    (WatchLLM's OTLP worker processes), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, by their parent's id."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def thread_cpu(pid: int) -> Counter[str]:
    """CPU seconds of each thread of `pid`, summed by thread name (comm); the main thread (the
    event loop) apart from Python's other threads, which share its name."""
    out: Counter[str] = Counter()
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                name, _, rest = (task / "stat").read_text().partition(" (")[2].rpartition(") ")
                if task.name == str(pid):
                    name += " (main: event loop)"
                elif name == "python":
                    name += " (worker threads)"
                fields = rest.split()
                # fields[0] is the state; utime and stime are the 12th and 13th after the name.
                out[name] += (int(fields[11]) + int(fields[12])) / tick
    for child in children(pid):
        out["child processes (OTLP workers)"] += cpu_seconds(child)
    return out


def http_get(
    port: int, path: str, key: str | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- the systems --------------------------------------------------------------------------------


class System:
    """One receiver in its own process: start, `count()` of queryable spans, stop."""

    name = ""
    path = "/v1/traces"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.headers: dict[str, str] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def extra_counts(self) -> dict[str, int]:
        return {}

    def ready_path(self) -> str:
        return "/healthz"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the {self.name} server exited; see {self.log}:\n"
                    + self.log.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(OSError):
                if http_get(self.port, self.ready_path(), timeout=5)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} server did not become ready; see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class Bare(System):
    name = "bare"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            [sys.executable, str(HERE), "--role", "serve-bare", "--port", str(self.port)],
            log=self.log,
            cwd=self.workdir,
        )
        self.wait_ready()

    def count(self) -> int:
        return int(json.loads(http_get(self.port, "/count")[1])["spans"])


class WatchLLMServer(System):
    name = "watchllm"

    def __init__(
        self,
        workdir: Path,
        root: Path | None = None,
        name: str = "watchllm",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        super().__init__(workdir)
        self.root = root  # a --before copy of WatchLLM's code; None: the installed one
        self.settings = settings or {}  # a --variant's settings

    def start(self) -> None:
        from watchllm_ext.keys import KeyStore
        from watchllm_ext.settings import Settings

        self.workdir.mkdir(parents=True, exist_ok=True)
        data_dir = self.workdir / "data"
        settings = Settings(data_dir=data_dir, create_default_key=False)
        self.key = KeyStore(settings.keys_path).create(PROJECT, scope="admin", name="bench")
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.proc = spawn(
            [
                sys.executable,
                str(HERE),
                "--role",
                "serve-watchllm",
                "--port",
                str(self.port),
                "--data-dir",
                str(data_dir),
                *(["--root", str(self.root)] if self.root else []),
                *(["--settings", json.dumps(self.settings)] if self.settings else []),
            ],
            log=self.log,
            cwd=self.workdir,
        )
        self.wait_ready()

    def ready_path(self) -> str:
        return "/readyz"

    def _count(self, table: str) -> int:
        status, body = http_get(self.port, f"/v1/admin/count?table={table}", self.key)
        if status != 200:
            raise RuntimeError(f"/v1/admin/count?table={table} answered {status}: {body[:300]!r}")
        return int(json.loads(body)["count"])

    def count(self) -> int:
        return self._count("spans")

    def extra_counts(self) -> dict[str, int]:
        return {"events": self._count("events")}


class Phoenix(System):
    name = "phoenix"

    def __init__(self, workdir: Path, python: Path) -> None:
        super().__init__(workdir)
        self.python = python
        self.db = workdir / "phoenix.db"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env_args = {
            "PHOENIX_WORKING_DIR": str(self.workdir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        # Phoenix reads its settings from the environment; spawn() passes ours on.
        with _env(env_args):
            self.proc = spawn(
                [str(self.python), "-m", "phoenix.server.main", "serve"],
                log=self.log,
                cwd=self.workdir,
            )
        self.wait_ready()

    def count(self) -> int:
        # Read-only, from the side: Phoenix's sqlite is in WAL mode, so this never blocks it.
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM spans").fetchone()[0])
        finally:
            db.close()


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Any:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def phoenix_python(given: str | None) -> Path:
    """A Python with arize-phoenix: --phoenix-python, else a virtualenv of its own made (and
    kept) under ~/.cache, so that Phoenix never lands in WatchLLM's environment."""
    if given:
        python = Path(given)
        check = subprocess.run([str(python), "-c", "import phoenix"], capture_output=True)
        if check.returncode != 0:
            raise SystemExit(
                f"{python} cannot import phoenix; in that environment run: {PHOENIX_INSTALL}"
            )
        return python
    python = PHOENIX_VENV / "bin" / "python"
    if python.exists():
        check = subprocess.run([str(python), "-c", "import phoenix"], capture_output=True)
        if check.returncode == 0:
            return python
    print(
        f"installing arize-phoenix into its own virtualenv {PHOENIX_VENV} (once; a few "
        f"minutes).\n  By hand: python -m venv {PHOENIX_VENV} && "
        f"{PHOENIX_VENV}/bin/{PHOENIX_INSTALL}",
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(PHOENIX_VENV)], check=True)
    subprocess.run(
        [str(PHOENIX_VENV / "bin" / "pip"), "install", "-q", "arize-phoenix"], check=True
    )
    return python


# --- roles run in child processes ---------------------------------------------------------------


def role_serve_bare(port: int) -> None:
    """The floor: read the body, parse it with opentelemetry-proto's generated classes, count
    the spans, answer 200 with an empty ExportTraceServiceResponse (as a receiver does)."""
    import uvicorn
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    parsed = [0]
    answer = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: Request) -> Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.body())
        parsed[0] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        return Response(answer, media_type="application/x-protobuf")

    async def count(request: Request) -> Response:
        return JSONResponse({"spans": parsed[0]})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/v1/traces", traces, methods=["POST"]),
            Route("/count", count, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


def role_serve_watchllm(port: int, data_dir: Path, extra: dict[str, Any]) -> None:
    """What `watchllm serve` runs (cli.cmd_serve), at log level warning."""
    import uvicorn

    from watchllm_ext.app import create_app
    from watchllm_ext.settings import Settings

    uvicorn_options = core_name("watchllm_ext.serving.protocol", "uvicorn_options")
    tune_for_serving = core_name("watchllm_ext.serving.tuning", "tune_for_serving")

    settings = Settings(
        data_dir=data_dir,
        create_default_key=False,
        log_level="warning",
        host="127.0.0.1",
        port=port,
        **extra,
    )
    app = create_app(settings)
    app.state.watchllm.open_store()
    tune_for_serving()
    uvicorn.run(app, **uvicorn_options(settings))


def role_client(args: argparse.Namespace) -> None:
    """POST the bodies over `--conns` keep-alive connections, paced at `--rate` spans/s (0:
    flat out), retrying as OTLPSpanExporter does; print a JSON summary."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    bodies = read_bodies(Path(args.bodies))
    spans_in = json.loads(args.spans_per_body)
    headers = {"Content-Type": "application/x-protobuf", **json.loads(args.headers)}
    lock = threading.Lock()
    next_batch = iter(range(len(bodies)))
    statuses: Counter[int] = Counter()
    out = {"ok_spans": 0, "rejected_spans": 0, "refused_spans": 0, "retries": 0}
    errors: list[str] = []
    latencies: list[float] = []
    t_first: list[float] = []
    t_last = [0.0]
    t0 = time.monotonic() + 0.05
    interval = BATCH_SPANS / args.client_rate if args.client_rate > 0 else 0.0

    def send(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, str | None]:
        conn.request("POST", args.path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Retry-After")

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
        try:
            while True:
                with lock:
                    n = next(next_batch, None)
                if n is None:
                    return
                # The batch's slot in the offered schedule; late slots go at once.
                wait = t0 + n * interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                deadline = time.monotonic() + EXPORTER_TIMEOUT_S
                with lock:
                    if not t_first:
                        t_first.append(time.monotonic())
                status, data = 0, b""
                for retry in range(EXPORTER_MAX_RETRIES):
                    sent = time.monotonic()
                    try:
                        status, data, retry_after = send(conn, bodies[n])
                    except (OSError, http.client.HTTPException) as exc:
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
                        status, data, retry_after = 0, repr(exc).encode(), None
                    with lock:
                        statuses[status] += 1
                        latencies.append(time.monotonic() - sent)
                    if status not in RETRYABLE and status != 0:
                        break
                    backoff = 2**retry * random.uniform(0.8, 1.2)
                    if retry_after is not None:
                        with contextlib.suppress(ValueError):
                            backoff = float(retry_after)
                    if backoff > deadline - time.monotonic():
                        break
                    with lock:
                        out["retries"] += 1
                    time.sleep(backoff)
                with lock:
                    if status == 200:
                        answer = ExportTraceServiceResponse()
                        answer.ParseFromString(data)
                        rejected = answer.partial_success.rejected_spans
                        out["ok_spans"] += spans_in[n] - rejected
                        out["rejected_spans"] += rejected
                        if rejected and len(errors) < 5:
                            message = answer.partial_success.error_message
                            errors.append(f"partial success: {message}")
                    else:
                        out["refused_spans"] += spans_in[n]
                        if len(errors) < 5:
                            errors.append(f"batch {n}: HTTP {status}: {data[:200]!r}")
                    t_last[0] = time.monotonic()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(latencies)
    print(
        json.dumps(
            {
                **out,
                "t_first": t_first[0] if t_first else None,
                "t_last": t_last[0],
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None,
                "errors": errors,
            }
        )
    )


# --- one phase: one system, one offered rate -----------------------------------------------------


def run_phase(
    system: System,
    bodies_path: Path,
    spans_per_body: list[int],
    rate: float,
    conns: int,
    stall_s: float,
    max_wait_s: float,
    expected_extra: dict[str, int],
) -> dict[str, Any]:
    sent = sum(spans_per_body)
    before = system.count()
    extra_before = system.extra_counts()
    cpu0 = cpu_seconds(system.pid)
    client = spawn(
        [
            sys.executable,
            str(HERE),
            "--role",
            "client",
            "--port",
            str(system.port),
            "--path",
            system.path,
            "--bodies",
            str(bodies_path),
            "--client-rate",
            str(rate),
            "--conns",
            str(conns),
            "--spans-per-body",
            json.dumps(spans_per_body),
            "--headers",
            json.dumps(system.headers),
        ],
        stdout=subprocess.PIPE,
    )
    # Poll the store while the client sends: the moment the last span became queryable is
    # the end of the clock, wherever it falls.
    seen = before
    t_seen = time.monotonic()
    samples = 0
    while client.poll() is None:
        time.sleep(0.2)
        n = system.count()
        samples += 1
        if n != seen:
            seen, t_seen = n, time.monotonic()
    out, _ = client.communicate()
    stop(client, grace_s=5)
    if client.returncode != 0:
        raise RuntimeError(f"the client failed (exit {client.returncode}) against {system.name}")
    res = json.loads(out)
    target = before + res["ok_spans"]
    end_by = time.monotonic() + max_wait_s
    # Once the client is done, look often: the end of the clock is the first look that sees
    # every span (at 0.2 s a look, that added 0.1 s on average to a run of 3-4 s).
    while seen < target and time.monotonic() < end_by and time.monotonic() - t_seen < stall_s:
        time.sleep(0.05)
        n = system.count()
        if n != seen:
            seen, t_seen = n, time.monotonic()
    # WatchLLM's events of the LLM spans (another table) are waited for too, so that the next
    # phase starts on a quiet server and counts only its own.
    targets = {k: extra_before.get(k, 0) + v for k, v in expected_extra.items()}
    counts = system.extra_counts()
    t_extra = t_moved = time.monotonic()
    while (
        any(counts.get(k, 0) < v for k, v in targets.items())
        and time.monotonic() < end_by
        and time.monotonic() - t_moved < stall_s
    ):
        time.sleep(0.2)
        now_counts = system.extra_counts()
        if now_counts != counts:
            counts, t_moved = now_counts, time.monotonic()
            t_extra = t_moved
    cpu = cpu_seconds(system.pid) - cpu0
    queryable = seen - before
    # The wait ended at --max-wait-s while spans were still becoming queryable: those answered
    # 200 and not queryable yet are late, not lost (Phoenix drains its queue for minutes).
    unseen = res["ok_spans"] - queryable
    late = unseen if unseen > 0 and time.monotonic() - t_seen < stall_s else 0
    elapsed = max(t_seen - res["t_first"], 1e-9) if res["t_first"] else float("nan")
    extra = {k: v - extra_before.get(k, 0) for k, v in counts.items()}
    return {
        "system": system.name,
        "rate": rate,
        "sent": sent,
        "answered_ok": res["ok_spans"],
        "rejected": res["rejected_spans"],
        "refused": res["refused_spans"],
        "queryable": queryable,
        "dropped": sent - queryable - late,
        "lost_after_200": unseen - late,
        "late": late,
        "max_wait_s": max_wait_s,
        "spans_s": queryable / elapsed,
        "send_s": res["t_last"] - res["t_first"] if res["t_first"] else float("nan"),
        "lag_s": t_seen - res["t_last"],  # from the last answer to the last span queryable
        "retries": res["retries"],
        "statuses": res["statuses"],
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "cpu_us_per_span": cpu / max(queryable, 1) * 1e6,
        "errors": res["errors"],
        "extra": extra,
        "extra_lag_s": max(0.0, t_extra - t_seen),  # the events after the last span
        "expected_extra": expected_extra,
    }


# --- where a span's CPU goes (py-spy) ------------------------------------------------------------

# A sample belongs to the innermost frame's stage among these (so spool work called from the
# receiver is spool, not receiver); a sample in none of them is HTTP if it is in uvicorn or
# starlette, the event loop's own native work if its innermost Python frame is the runner
# (uvloop runs the loop in C: socket reads and writes, callback dispatch), else "other".
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "decode (protobuf, OTLP -> Span)",
        ("otel/decode", "google/protobuf", "ParseFromString", "trace_service_pb2", "decompress"),
    ),
    ("mapping (Span -> row, event)", ("otel/mapping",)),
    ("validation (events)", ("fast_validate", "schema.py", "pydantic", "validate")),
    ("cost", ("cost", "genai_prices")),
    # The spool's bytes: span rows and events encoded (JSON), appended, fsynced.
    ("spool (encode, append, fsync)", ("spool.py", "fsync", "otel/rows", "_encode_events")),
    ("store (writer, sink, chDB)", ("writer.py", "store_sink", "watchllm_ext/store", "chdb")),
    # Not "metrics.py": the request-metrics middleware wraps every request.
    ("metrics (prometheus_client)", ("prometheus_client", "_count_unmapped")),
    (
        "ingest / receiver",
        ("otel/ingest", "otel/receiver", "ingest/", "ingest.py", "auth.py", "quota"),
    ),
]
HTTP = ("uvicorn", "starlette", "h11", "httptools", "anyio")
LOOP = "Runner.run (asyncio/runners.py)"
IDLE = (
    "Condition.wait",
    "Event.wait",
    "select (selectors.py)",
    "_worker (concurrent",
    "wait (threading.py)",
    "_bootstrap_inner",
)


def pyspy_attach(pid: int, out: Path, log: Path, native: bool) -> subprocess.Popen[Any]:
    spy = spawn(
        [
            "py-spy",
            "record",
            *(["--native"] if native else []),
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nolineno",
            "--threads",
            "--output",
            str(out),
        ],
        log=log,
    )
    time.sleep(1.0)  # let it attach before the load starts
    return spy


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    if frames[-1] == LOOP:
        return "event loop, native (uvloop)"
    if any(h in frame for frame in frames for h in HTTP):
        return "HTTP (uvicorn, starlette)"
    return "other"


def pyspy_breakdown(raw: Path) -> tuple[dict[str, float], list[tuple[str, float]], int]:
    """(share of busy samples per category, top innermost frames, busy samples)."""
    cats: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames or any(frames[-1].startswith(i) or i in frames[-1] for i in IDLE):
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        cats[_category(frames)] += c
    if not total:
        return {}, [], 0
    return (
        {k: v / total for k, v in cats.most_common()},
        [(f, c / total) for f, c in own.most_common(15)],
        total,
    )


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--only",
        action="append",
        choices=SYSTEMS,
        help="systems to run (repeatable; default: all three)",
    )
    p.add_argument(
        "--rate",
        action="append",
        type=float,
        help="offered spans/s (repeatable; 0 = flat out; default 3300, 10000, 0)",
    )
    p.add_argument(
        "--spans",
        type=int,
        default=40_960,
        help="spans per phase at a fixed rate (default 40,960 = 80 batches)",
    )
    p.add_argument(
        "--flat-spans",
        type=int,
        default=102_400,
        help="spans in the flat-out phase (default 102,400 = 200 batches)",
    )
    p.add_argument("--conns", type=int, default=4, help="client connections (default 4)")
    p.add_argument(
        "--stall-s",
        type=float,
        default=30.0,
        help="stop waiting for a system when its count has not moved for this long",
    )
    p.add_argument(
        "--max-wait-s",
        type=float,
        default=300.0,
        help="longest wait for queryable after the last answer",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 10 batches per phase")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on the WatchLLM server in its flat-out phase (pip install py-spy)",
    )
    p.add_argument(
        "--native", action="store_true", help="with --profile: native frames too (py-spy --native)"
    )
    p.add_argument("--phoenix-python", help="a Python where arize-phoenix is installed")
    p.add_argument(
        "--before",
        metavar="REV",
        action="append",
        help="also run WatchLLM at this commit (git archive), as system watchllm@REV"
        " (repeatable; with --only bare, only the commits run)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run every phase this many times (default 1)"
    )
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME=VALUE",
        help="also run the working tree with this setting (the value read as JSON when it"
        " parses), as system watchllm[NAME=VALUE] (repeatable), e.g. otel_worker_processes=0",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--json", help="also write the results to this file (outside the work folder)")
    p.add_argument(
        "--keep", action="store_true", help="keep the work folder (stores, logs, py-spy output)"
    )
    # Child-process roles.
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--bodies", help=argparse.SUPPRESS)
    p.add_argument("--spans-per-body", help=argparse.SUPPRESS)
    p.add_argument("--headers", help=argparse.SUPPRESS)
    p.add_argument("--client-rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.root:
        # An older commit's code (--before): found before the installed package.
        sys.path[:0] = [args.root, str(Path(args.root) / BEFORE_PACKAGES)]
    if args.role == "serve-bare":
        role_serve_bare(args.port)
        return
    if args.role == "serve-watchllm":
        role_serve_watchllm(args.port, Path(args.data_dir), json.loads(args.settings or "{}"))
        return
    if args.role == "client":
        role_client(args)
        return

    systems = args.only or list(SYSTEMS)
    roots: dict[str, Path] = {}  # watchllm@REV -> its code
    for rev in args.before or []:
        roots[f"watchllm@{rev}"] = before_copy(rev)
    variants: dict[str, dict[str, Any]] = {}  # watchllm[NAME=VALUE] -> its settings
    for given in args.variant or []:
        name, _, value = given.partition("=")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        variants[f"watchllm[{given}]"] = {name: parsed}
    if roots or variants:
        at = systems.index("watchllm") if "watchllm" in systems else len(systems)
        systems = [*systems[:at], *roots, *variants, *systems[at:]]
    rates = args.rate or list(DEFAULT_RATES)
    if args.quick:
        args.spans = args.flat_spans = 10 * BATCH_SPANS
        args.stall_s = min(args.stall_s, 15.0)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if "watchllm" in systems:
        _check_receiver()
    phoenix_py = phoenix_python(args.phoenix_python) if "phoenix" in systems else None

    work = Path(tempfile.mkdtemp(prefix="watchllm-bench-otlp-"))
    for root in roots.values():
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    if not args.keep:
        # atexit runs last-registered first: stop the servers, then remove their folders.
        atexit.register(lambda: (stop_all(), shutil.rmtree(work, ignore_errors=True)))
    print(
        f"bench_otlp: systems {', '.join(systems)}; rates "
        f"{', '.join(f'{r:,.0f}/s' if r else 'flat out' for r in rates)}; {args.conns} "
        f"connections; work folder {work}",
        flush=True,
    )
    print(f"load average at start: {os.getloadavg()[0]:.1f}; cores: {os.cpu_count()}", flush=True)
    if "watchllm" in systems:
        print(f"WatchLLM: {code_identity()}", flush=True)

    # The streams, made before any server starts: one per phase, the same for every system.
    phases = []
    for i, rate in enumerate(rates):
        n = args.flat_spans if rate == 0 else args.spans
        t = time.perf_counter()
        made = make_bodies(n, seed=args.seed * 1000 + i)
        path = work / f"bodies-{i}.bin"
        write_bodies(path, made.bodies)
        per_body = [min(BATCH_SPANS, made.spans - j * BATCH_SPANS) for j in range(len(made.bodies))]
        size = sum(len(b) for b in made.bodies)
        print(
            f"  stream {i}: {made.spans:,} spans ({made.llm_spans:,} LLM work, "
            f"{made.error_spans} errors) in {len(made.bodies)} bodies, "
            f"{size / made.spans:.0f} B/span; made in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        phases.append((rate, path, per_body, made))

    results: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    # A fresh server per phase: a system still working off one phase's backlog (Phoenix's
    # queue drains for minutes) would otherwise start the next phase full, and count the
    # previous phase's spans as this one's. The order rotates, so no system always goes first.
    runs = [(n, i, phase) for n in range(args.rounds) for i, phase in enumerate(phases)]
    for n, i, (rate, path, per_body, made) in runs:
        order = systems[i % len(systems) :] + systems[: i % len(systems)]
        for name in order if n % 2 == 0 else order[::-1]:
            system: System
            folder = work / f"{name}-{i}-{n}"
            if name == "bare":
                system = Bare(folder)
            elif name == "watchllm":
                system = WatchLLMServer(folder)
            elif name.startswith("watchllm@"):
                system = WatchLLMServer(folder, roots[name], name)
            elif name.startswith("watchllm["):
                system = WatchLLMServer(folder, None, name, variants[name])
            else:
                assert phoenix_py is not None
                system = Phoenix(folder, phoenix_py)
            t = time.monotonic()
            system.start()
            print(f"{name}: ready in {time.monotonic() - t:.1f} s (port {system.port})", flush=True)
            try:
                spy = None
                raw = work / f"py-spy-{name}.txt"
                threads0: Counter[str] = Counter()
                if args.profile and name == "watchllm" and rate == 0 and profile is None:
                    spy = pyspy_attach(system.pid, raw, work / "py-spy.log", args.native)
                    threads0 = thread_cpu(system.pid)
                expected = {"events": made.llm_spans} if name.startswith("watchllm") else {}
                res = run_phase(
                    system,
                    path,
                    per_body,
                    rate,
                    args.conns,
                    args.stall_s,
                    args.max_wait_s,
                    expected,
                )
                if spy is not None:
                    threads = thread_cpu(system.pid)
                    threads.subtract(threads0)
                    stop(spy, grace_s=60)
                    cats, top, samples = pyspy_breakdown(raw)
                    profile = {
                        "categories": cats,
                        "top": top,
                        "samples": samples,
                        "threads": {k: v for k, v in threads.most_common() if v > 0},
                        "cpu_us_per_span": res["cpu_us_per_span"],
                        "spans": res["queryable"],
                    }
                results.append(res)
                print_phase(res)
            finally:
                system.stop()
    print_report(results, profile, systems)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "profile": profile}, indent=2))


def code_identity() -> str:
    """The commit of the WatchLLM under test, and whether its core has uncommitted changes."""
    import watchllm_ext

    repo = Path(watchllm_ext.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "watchllm_ext", "plugins"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{repo} (not a git checkout)"
    return f"commit {sha}" + (" + uncommitted changes to the core" if dirty else "")


def _check_receiver() -> None:
    try:
        from watchllm_ext.otel import receiver  # noqa: F401
    except ImportError:
        raise SystemExit(
            "WatchLLM has no OTLP receiver yet (watchllm_ext/otel/receiver.py); run the other "
            "systems with --only bare --only phoenix"
        ) from None


def _median(results: list[dict[str, Any]], system: str, rate: float) -> dict[str, Any] | None:
    runs = [r for r in results if r["system"] == system and r["rate"] == rate]
    if not runs:
        return None
    return {
        "n": len(runs),
        "spans_s": statistics.median(r["spans_s"] for r in runs),
        "cpu": statistics.median(r["cpu_us_per_span"] for r in runs),
    }


# In a --before copy: the installed distribution's other packages under their import names.
BEFORE_PACKAGES = "_packages"
_PACKAGE_DIRS = {
    "watchllm_plugins": "plugins",
    "watchllm_clickhouse": "clickhouse",
    "watchllm_contrib": "contrib",
}


def before_copy(rev: str) -> Path:
    """WatchLLM's code at `rev` (git archive) in a temp folder, importable from there."""
    root = Path(tempfile.mkdtemp(prefix="bench-otlp-before-"))
    archive = subprocess.run(
        ["git", "archive", rev], cwd=HERE.parents[1], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    packages = root / BEFORE_PACKAGES
    packages.mkdir()
    for name, folder in _PACKAGE_DIRS.items():
        if (root / folder).is_dir():
            (packages / name).symlink_to(root / folder)
    return root


def _rate_name(rate: float) -> str:
    return f"{rate:,.0f}/s" if rate else "flat out"


def _late(r: dict[str, Any]) -> str:
    if not r.get("late"):
        return ""
    return (
        f", and {r['late']:,} answered 200 still not queryable after "
        f"{r['max_wait_s']:.0f} s, count still rising"
    )


def print_phase(r: dict[str, Any]) -> None:
    extra = "".join(
        f"; {k} {v:,} (expected {r['expected_extra'].get(k, '?'):,}, queryable "
        f"{r['extra_lag_s']:.1f} s after the last span)"
        for k, v in r["extra"].items()
    )
    print(
        f"  {r['system']:8s} {_rate_name(r['rate']):>10s}: {r['spans_s']:9,.0f} spans/s to "
        f"queryable; {r['queryable']:,}/{r['sent']:,} queryable, dropped {r['dropped']:,} "
        f"(refused {r['refused']:,}, rejected {r['rejected']:,}, lost after 200 "
        f"{r['lost_after_200']:,}){_late(r)}; lag {r['lag_s']:.1f} s; answers {r['statuses']}, "
        f"retries {r['retries']}; p50 {r['p50_ms'] or 0:.0f} ms p99 {r['p99_ms'] or 0:.0f} ms; "
        f"server CPU {r['cpu_us_per_span']:.0f} µs/span{extra}",
        flush=True,
    )
    for e in r["errors"][:3]:
        print(f"      {e}", flush=True)


def print_report(
    results: list[dict[str, Any]], profile: dict[str, Any] | None, systems: list[str]
) -> None:
    print(
        "\n## bench_otlp results (spans/s to queryable; dropped = sent - queryable; late = "
        "answered 200, not queryable when --max-wait-s ran out, count still rising)\n"
    )
    print(
        "| offered | system | spans/s to queryable | x bare | dropped / sent | "
        "answers | lag s | p99 ms | server CPU µs/span |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rates = list(dict.fromkeys(r["rate"] for r in results))
    for rate in rates:
        bare = _median(results, "bare", rate)  # each round's runs beside the bare median
        runs = [r for name in systems for r in results if r["system"] == name and r["rate"] == rate]
        for r in runs:
            ratio = f"{r['spans_s'] / bare['spans_s']:.2f}" if bare else "-"
            answers = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
            late = f" (+{r['late']:,} late)" if r.get("late") else ""
            print(
                f"| {_rate_name(rate)} | {r['system']} | {r['spans_s']:,.0f} | {ratio} | "
                f"{r['dropped']:,} / {r['sent']:,}{late} | {answers} | {r['lag_s']:.1f} | "
                f"{r['p99_ms'] or 0:.0f} | {r['cpu_us_per_span']:.0f} |"
            )
    # Each WatchLLM beside the first --before commit, else the first --variant (medians over
    # the rounds).
    versions = [name for name in systems if name.startswith("watchllm")]
    base = next((name for name in versions if name.startswith("watchllm@")), None) or next(
        (name for name in versions if name.startswith("watchllm[")), None
    )
    if base is not None:
        print()
    for name in versions if base is not None else []:
        if name == base:
            continue
        for rate in rates:
            new = _median(results, name, rate)
            old = _median(results, base, rate)
            if new and old:
                print(
                    f"{_rate_name(rate)}: {name} / {base} (medians of "
                    f"{new['n']} and {old['n']} runs): spans/s "
                    f"x{new['spans_s'] / old['spans_s']:.2f} ({new['spans_s']:,.0f} vs "
                    f"{old['spans_s']:,.0f}), server CPU per span "
                    f"x{new['cpu'] / old['cpu']:.2f} ({new['cpu']:.0f} vs {old['cpu']:.0f} µs)"
                )
    wl = [r for r in results if r["system"] == "watchllm"]
    if wl:
        flat = [r for r in wl if r["rate"] == 0]
        best = max(r["spans_s"] for r in (flat or wl))
        dropped = sum(r["dropped"] for r in wl)
        print(
            f"\nTargets (issue 11): >= {TARGET_SPANS_S:,} spans/s to queryable: "
            f"{'PASS' if best >= TARGET_SPANS_S else 'MISS'} ({best:,.0f}); 0 spans dropped "
            f"at any offered rate: {'PASS' if dropped == 0 else 'MISS'} ({dropped:,})"
        )
    if profile:
        n = profile["spans"]
        print(
            f"\nWhere a WatchLLM span's CPU goes (flat out, {n:,} spans, "
            f"{profile['cpu_us_per_span']:.0f} µs/span for the whole process):"
        )
        print("  threads (CPU µs per span, from /proc):")
        for name, sec in profile["threads"].items():
            print(f"    {name:32s} {sec / max(n, 1) * 1e6:7.1f}")
        # Python 3.11 leaves its threads' OS name "python": those rows are the Python threads
        # (thread_cpu tells the main one apart); the other names are chDB's own threads.
        py_sec = sum(v for k, v in profile["threads"].items() if k.startswith("python"))
        py_us = py_sec / max(n, 1) * 1e6
        print(
            f"  Python threads, by stage (py-spy, {profile['samples']:,} busy samples; µs = "
            f"share x the Python threads' {py_us:.0f} µs/span):"
        )
        for cat, share in profile["categories"].items():
            print(f"    {cat:40s} {share:6.1%}  ~{share * py_us:5.1f} µs")
        print("  top innermost frames:")
        for frame, share in profile["top"]:
            print(f"    {share:6.1%}  {frame}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
