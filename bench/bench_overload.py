"""Overload: far more offered than the server can take, as a load generator offers it.

    python bench/bench_overload.py                       # this code
    python bench/bench_overload.py --before fa60c45      # beside an older commit, same run
    python bench/bench_overload.py --conns 500 --seconds 30 --bombs 120

Each system is a fresh `watchllm serve` (embedded store) in its own process. Two phases:

- **json**: `--conns` connections post 1,000-event batches for `--seconds`, as exporters do:
  a client gives up after `--timeout` s and sends the same body again; after a 429 or 503 it
  waits the Retry-After (at most 3 s). Reported: answers by status, the time to each 2xx, the
  clients' timeouts (work the server may do for nobody), the server's peak memory and the
  slowest /healthz; then, with the server stopped, whether every event answered 2xx is stored
  once (missing, duplicated) and whether anything was stored that no client saw accepted.
- **bombs**: `--bombs` gzip bodies at once, each ~1 MB on the wire and 1 GB inflated (the
  body limits refuse them): their answers, peak memory, slowest /healthz.

The aim is pushback: a prompt 503 with Retry-After instead of requests queued past their
clients' timeouts, and memory bounded whatever is sent (docs/API.md, ingest/admission.py).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_otlp import BEFORE_PACKAGES, before_copy, children  # noqa: E402
from processes import free_port  # noqa: E402

BATCH = 1_000


# --- the client: a minimal keep-alive HTTP/1.1 client on asyncio streams -----------------------


class NoAnswer(Exception):
    pass


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(
        self, path: str, headers: dict[str, str], body: bytes, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            return await asyncio.wait_for(self._post(path, headers, body), timeout)
        except (TimeoutError, OSError, NoAnswer, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            raise NoAnswer("timeout" if isinstance(exc, TimeoutError) else "reset") from None

    async def _post(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port, limit=1 << 20
            )
        assert self.reader is not None
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise NoAnswer("closed")
        status = int(line.split()[1])
        found: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            found[name.strip().lower()] = value.strip()
        answer = await self.reader.readexactly(int(found.get("content-length", "0")))
        if found.get("connection", "").lower() == "close":
            await self.close()
        return status, found, answer


def _batch(prefix: str, rng: random.Random) -> bytes:
    events = [
        {
            "event_id": f"{prefix}-{i}",
            "event_type": "prompt_call",
            "run_id": prefix,
            "model": "gpt-4o",
            "provider": "openai",
            "tokens_input": rng.randint(1, 3000),
            "tokens_output": rng.randint(1, 900),
            "latency_ms": rng.randint(50, 4000),
            "prompt": "summarise the ticket below " * 20,
            "response": "the customer asks for a refund " * 10,
        }
        for i in range(BATCH)
    ]
    return json.dumps({"events": events}).encode()


async def _sender(port: int, key: str, tag: str, c: int, args: Any, out: list[dict]) -> None:
    rng = random.Random(c)
    conn = Conn(port)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline:
        prefix = f"{tag}-{c}-{n}"
        n += 1
        body = _batch(prefix, rng)
        for _ in range(20):  # the same body until it is taken (or the run is long over)
            started = time.monotonic()
            try:
                status, found, answer = await conn.post(
                    "/v1/events/batch", headers, body, args.timeout
                )
            except NoAnswer as exc:
                out.append({"b": prefix, "st": str(exc), "lat": time.monotonic() - started})
                if time.monotonic() > deadline + 30:
                    break
                continue
            record = {"b": prefix, "st": status, "lat": time.monotonic() - started}
            if status >= 400 and status not in (429, 503):
                record["answer"] = answer.decode("utf-8", "replace")[:300]
            out.append(record)
            if status in (429, 503):
                if time.monotonic() > deadline:
                    break
                wait = min(float(found.get("retry-after", "1")), 3.0)
                await asyncio.sleep(wait * (0.5 + rng.random()))
                continue
            break
    await conn.close()


def _client_process(
    port: int, key: str, tag: str, first: int, conns: int, args: Any, path: str
) -> None:
    out: list[dict] = []

    async def run() -> None:
        await asyncio.gather(
            *(_sender(port, key, tag, c, args, out) for c in range(first, first + conns))
        )

    asyncio.run(run())
    Path(path).write_text(json.dumps(out))


# --- the server and what watches it -----------------------------------------------------------


class Server:
    def __init__(self, root: Path | None, folder: Path) -> None:
        self.data = folder / "data"
        self.port = free_port()
        prelude = "import sys\n"
        if root is not None:  # an older commit's code, before the installed package
            prelude += f"sys.path[:0] = [{str(root)!r}, {str(root / BEFORE_PACKAGES)!r}]\n"
        key_script = prelude + (
            "from watchllm_ext.cli import main\n"
            f"sys.exit(main(['keys', 'create', '--project', 'bench', '--scope', 'admin',"
            f" '--data-dir', {str(self.data)!r}]))\n"
        )
        made = subprocess.run(
            [sys.executable, "-c", key_script], capture_output=True, text=True, check=True
        )
        self.key = made.stdout.strip().splitlines()[-1]
        serve = prelude + (
            "from watchllm_ext.cli import main\n"
            f"sys.exit(main(['serve', '--data-dir', {str(self.data)!r}, '--port',"
            f" '{self.port}']))\n"
        )
        self.log = open(folder / "server.log", "w")  # noqa: SIM115 - held while it runs
        env = {
            **os.environ,
            "WATCHLLM_CREATE_DEFAULT_KEY": "false",
            "WATCHLLM_LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", serve],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
        deadline = time.monotonic() + 120
        while _healthz(self.port) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {folder / 'server.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=300)
        self.log.close()


def _healthz(port: int, timeout: float = 5.0) -> float | None:
    started = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return None
    return time.monotonic() - started if ok else None


class Watch:
    """The server's RSS (with its children) every 0.5 s, /healthz every 0.5 s."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.rss_mb = 0.0
        self.health: list[float] = []  # seconds; a failure counts as 5
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.rss_mb = max(self.rss_mb, _rss_mb(self.server.process.pid))
            took = _healthz(self.server.port)
            self.health.append(5.0 if took is None else took)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"rss_max_mb": self.rss_mb, "healthz_max_s": max(self.health, default=0.0)}


def _rss_mb(pid: int) -> float:
    total = 0
    for task in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{task}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# --- the phases ----------------------------------------------------------------------------------


def phase_json(server: Server, folder: Path, args: Any) -> dict[str, Any]:
    watch = Watch(server)
    procs, files = [], []
    per = max(1, args.conns // args.client_processes)
    for p in range(args.client_processes):
        path = folder / f"json-{p}.json"
        files.append(path)
        proc = mp.Process(
            target=_client_process,
            args=(server.port, server.key, "ov", p * per, per, args, str(path)),
        )
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join()
    seen = watch.stop()
    records = [r for path in files for r in json.loads(path.read_text())]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["st"])] = statuses.get(str(r["st"]), 0) + 1
    ok = sorted(r["lat"] for r in records if isinstance(r["st"], int) and 200 <= r["st"] < 300)
    accepted = {r["b"] for r in records if isinstance(r["st"], int) and 200 <= r["st"] < 300}
    server.stop()  # flushes; the store is then read here
    stored = _stored_batches(server.data)
    errors = sorted({r["answer"] for r in records if "answer" in r})
    return {
        **seen,
        "errors": errors[:5],
        "statuses": statuses,
        "ok_p50_s": statistics.median(ok) if ok else None,
        "ok_p99_s": ok[int(len(ok) * 0.99)] if ok else None,
        "timeouts": statuses.get("timeout", 0),
        "accepted_events": len(accepted) * BATCH,
        "missing_events": sum(BATCH - stored.get(b, (0, 0))[0] for b in accepted),
        "duplicated_events": sum(rows - ids for ids, rows in stored.values()),
        "stored_unanswered_events": sum(ids for b, (ids, _) in stored.items() if b not in accepted),
    }


def _stored_batches(data: Path) -> dict[str, tuple[int, int]]:
    """Per batch (run id): distinct event ids and rows after FINAL, from the stopped store."""
    from chdb import session

    db = session.Session(str(data / "chdb"))
    try:
        text = db.query(
            "SELECT run_id, uniqExact(event_id) AS ids, count() AS n FROM events FINAL"
            " GROUP BY run_id",
            "JSONEachRow",
        ).bytes()
    finally:
        db.close()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["run_id"]: (int(r["ids"]), int(r["n"])) for r in rows}


def _bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    zeros = bytes(64 << 20)
    parts = [packer.compress(zeros) for _ in range(16)]  # 1 GB inflated
    return b"".join(parts) + packer.flush()


def phase_bombs(server: Server, args: Any) -> dict[str, Any]:
    body = _bomb()
    watch = Watch(server)
    headers = {
        "Authorization": f"Bearer {server.key}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }

    async def one() -> str:
        conn = Conn(server.port)
        try:
            status, _, _ = await conn.post("/v1/events/batch", headers, body, 60)
            return str(status)
        except NoAnswer as exc:
            return str(exc)
        finally:
            await conn.close()

    async def run() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(args.bombs)))

    answers = asyncio.run(run())
    time.sleep(2)  # memory as it settles
    seen = watch.stop()
    server.stop()
    counted: dict[str, int] = {}
    for answer in answers:
        counted[answer] = counted.get(answer, 0) + 1
    return {**seen, "statuses": counted, "wire_bytes": len(body)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="also measure this commit, in the same run")
    parser.add_argument("--conns", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="a client's wait (s)")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--bombs", type=int, default=120)
    args = parser.parse_args()
    systems: list[tuple[str, Path | None]] = [("this code", None)]
    if args.before:
        systems.append((args.before, before_copy(args.before)))
    work = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    print(f"load average {os.getloadavg()[0]:.1f}; work in {work}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name, root in systems:
        folder = work / name.replace(" ", "-")
        (folder / "json").mkdir(parents=True)
        (folder / "bombs").mkdir(parents=True)
        print(f"{name}: json, {args.conns} connections for {args.seconds:g} s ...", flush=True)
        results[name] = {"json": phase_json(Server(root, folder / "json"), folder, args)}
        print(f"{name}: {args.bombs} gzip bombs ...", flush=True)
        results[name]["bombs"] = phase_bombs(Server(root, folder / "bombs"), args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print(
        "| system | phase | answers | 2xx p50 / p99 s | client timeouts | peak RSS MB |"
        " slowest /healthz s | accepted events: missing / duplicated / stored unanswered |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        j, b = r["json"], r["bombs"]
        p50 = f"{j['ok_p50_s']:.2f} / {j['ok_p99_s']:.2f}" if j["ok_p50_s"] is not None else "-"
        print(
            f"| {name} | json | {j['statuses']} | {p50} | {j['timeouts']} |"
            f" {j['rss_max_mb']:,.0f} | {j['healthz_max_s']:.2f} | {j['accepted_events']:,}:"
            f" {j['missing_events']} / {j['duplicated_events']} /"
            f" {j['stored_unanswered_events']:,} |"
        )
        for error in j["errors"]:
            print(f"<!-- {name}: an error answer: {error} -->")
        print(
            f"| {name} | bombs | {b['statuses']} | - | - | {b['rss_max_mb']:,.0f} |"
            f" {b['healthz_max_s']:.2f} | - |"
        )


if __name__ == "__main__":
    main()
