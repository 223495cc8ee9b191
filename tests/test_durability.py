"""The promise: an event answered 2xx is stored exactly once, whatever happens after.

Real `watchllm serve` processes killed with SIGKILL mid-ingest, a store that goes down, the
spool filling up, SIGTERM with a store that cannot take the backlog.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, free_port, prompt_call
from test_big_body_slot import wait_until

from watchllm_ext.delivery.fsync_process import FsyncFailed
from watchllm_ext.delivery.fsync_process import supported as fsync_process_supported
from watchllm_ext.keys import KeyStore
from watchllm_plugins.chdb_store import ChdbStore

TESTS = Path(__file__).resolve().parent


class ServeProcess:
    def __init__(self, data: Path, port: int, **env: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        environ = {
            **os.environ,
            "PYTHONPATH": f"{TESTS}:{os.environ.get('PYTHONPATH', '')}",
            "WATCHLLM_CREATE_DEFAULT_KEY": "false",
            "WATCHLLM_FLUSH_INTERVAL_S": "0.2",
            "WATCHLLM_LOG_LEVEL": "warning",
            **env,
        }
        self.log = open(data.parent / f"serve-{port}-{time.time_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watchllm_ext.cli",
                "serve",
                "--data-dir",
                str(data),
                "--port",
                str(port),
            ],
            env=environ,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise AssertionError("serve did not start")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        self.log.close()
        return code


class Ingest:
    """Client threads posting batches of fresh event ids; keeps the ids answered 2xx."""

    def __init__(self, url: str, key: str, threads: int = 3, batch: int = 40) -> None:
        self.url, self.key, self.batch = url, key, batch
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counter = iter(range(10**9))
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, t: int) -> None:
        with httpx.Client(
            base_url=self.url, timeout=10, headers={"Authorization": f"Bearer {self.key}"}
        ) as client:
            while not self.stop.is_set():
                with self.lock:
                    ids = [f"t{t}-{next(self.counter)}" for _ in range(self.batch)]
                events = [prompt_call(i, project_id="acme") for i in ids]
                try:
                    r = client.post("/v1/events/batch", json={"events": events})
                except httpx.HTTPError:
                    time.sleep(0.05)  # the server is down: these ids were not acknowledged
                    continue
                if r.status_code == 202:
                    with self.lock:
                        self.acked.update(ids)
                else:
                    time.sleep(0.05)

    def join(self) -> set[str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        return self.acked


def stored_counts(data: Path) -> dict[str, int]:
    store = ChdbStore(data / "chdb")
    try:
        rows = store.query("SELECT event_id, count() AS n FROM events FINAL GROUP BY event_id")
    finally:
        store.close()
    return {r["event_id"]: r["n"] for r in rows}


def wait_delivered(url: str, key: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
        sinks = ready["checks"]["writer"]["sinks"]
        if all(s["lag_events"] == 0 for s in sinks.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the sinks did not catch up: {ready}")


WORKER_BODIES = 'watchllm_ingest_bodies_total{where="worker"} '


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "streamed"),
    [(40, False), (300, False), (300, True)],
    ids=["small-bodies", "big-bodies-in-a-worker", "big-bodies-streamed-inserts"],
)
def test_sigkill_at_random_moments_loses_nothing_and_stores_once(
    tmp_path: Path, batch: int, streamed: bool
) -> None:
    """Small bodies are validated in the server; big ones (64 KiB and more) in a worker
    process (ingest/worker.py), which dies with it; with store_insert_streamed, the store's
    inserts are open while events come in (killed with them)."""
    data = tmp_path / "data"
    key = KeyStore(data / "keys.sqlite3").create("acme", scope="admin")
    rng = random.Random(1234)
    acked: set[str] = set()
    to_workers = 0.0
    streams = 0  # store inserts fed in parts (the writer's streamed delivery), as they came
    for _round in range(4):
        port = free_port()
        serve = ServeProcess(data, port, WATCHLLM_STORE_INSERT_STREAMED=str(streamed).lower())
        ingest = Ingest(serve.url, key, batch=batch)
        time.sleep(rng.uniform(0.5, 2.0))  # kill at a random moment under load
        sinks = httpx.get(f"{serve.url}/readyz", timeout=10).json()["checks"]["writer"]["sinks"]
        streams += sum(sink["streamed_batches_total"] for sink in sinks.values())
        metrics = httpx.get(f"{serve.url}/metrics", timeout=10).text.splitlines()
        to_workers += sum(
            float(line.removeprefix(WORKER_BODIES))
            for line in metrics
            if line.startswith(WORKER_BODIES)
        )
        assert serve.kill(signal.SIGKILL) == -signal.SIGKILL
        acked |= ingest.join()
    assert len(acked) > 500
    assert (to_workers > 0) == (batch == 300)  # 300 events: ~84 KB a body
    assert (streams > 0) == streamed
    # A last start replays what the killed processes left in the spool.
    serve = ServeProcess(data, free_port())
    wait_delivered(serve.url, key)
    serve.kill(signal.SIGTERM)
    counts = stored_counts(data)
    missing = acked - counts.keys()
    assert not missing, f"{len(missing)} acknowledged events were lost, e.g. {sorted(missing)[:5]}"
    assert all(n == 1 for n in counts.values())


@pytest.mark.slow
def test_sigterm_keeps_what_the_store_could_not_take(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = KeyStore(data / "keys.sqlite3").create("acme", scope="admin")
    serve = ServeProcess(
        data, free_port(), WATCHLLM_PLUGINS="faults", WATCHLLM_SHUTDOWN_GRACE_S="1"
    )
    (data / "store-down").touch()
    r = httpx.post(
        f"{serve.url}/v1/events/batch",
        headers={"Authorization": f"Bearer {key}"},
        json={"events": [prompt_call(f"k{i}") for i in range(30)]},
    )
    assert r.status_code == 202
    started = time.monotonic()
    serve.kill(signal.SIGTERM)
    assert time.monotonic() - started < 20  # the grace period bounds the shutdown
    (data / "store-down").unlink()
    serve = ServeProcess(data, free_port())
    wait_delivered(serve.url, key)
    serve.kill(signal.SIGTERM)
    assert stored_counts(data) == {f"k{i}": 1 for i in range(30)}


def test_store_outage_answers_202_until_the_cap_then_503_and_catches_up(
    server_factory: Any,
) -> None:
    import faults

    server: Running = server_factory(
        plugin_objects=(faults,),
        spool_max_bytes=256 * 1024,
        sink_retry_max_s=0.2,
    )
    marker = server.settings.data_dir / "store-down"
    marker.touch()
    acked: list[str] = []
    statuses: list[int] = []
    for n in range(200):
        ids = [f"o{n}-{i}" for i in range(20)]
        r = server.client.post(
            "/v1/events/batch",
            headers=server.headers(),
            json={"events": [prompt_call(i) for i in ids]},
        )
        statuses.append(r.status_code)
        if r.status_code == 202:
            acked.extend(ids)
        else:
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert "spool" in r.json()["message"]
            break
    assert statuses[-1] == 503 and set(statuses[:-1]) == {202}
    deadline = time.monotonic() + 10
    while server.wl.writer.stats()["sinks"]["store:chdb"]["retries_total"] == 0:
        assert time.monotonic() < deadline, "the sink never tried the store"
        time.sleep(0.05)
    ready = server.client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["store"]["ok"] is False
    # The writer says why it is not ready: the spool at its cap, in bytes.
    writer = checks["writer"]
    assert writer["ok"] is False, writer
    assert writer["detail"] == (
        f"the spool is full: {writer['log_bytes']} of its cap of {256 * 1024} bytes"
        " (spool_max_bytes); ingestion answers 503 until the sinks catch up"
    )
    assert checks["writer"]["sinks"]["store:chdb"]["retries_total"] > 0
    assert checks["writer"]["sinks"]["store:chdb"]["lag_events"] == len(acked)
    metrics = server.client.get("/metrics").text
    assert f'watchllm_sink_lag_events{{sink="store:chdb"}} {float(len(acked))}' in metrics
    assert "watchllm_writer_full_total 1.0" in metrics

    marker.unlink()  # the store comes back: everything arrives, by itself
    server.flush()
    rows = server.query("SELECT event_id, count() AS n FROM events FINAL GROUP BY event_id")
    assert {r["event_id"] for r in rows} == set(acked)
    assert all(r["n"] == 1 for r in rows)
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("after")]}
    )
    assert r.status_code == 202  # room again
    assert server.client.get("/readyz").status_code == 200


def test_dead_letters_can_be_listed_and_replayed(server_factory: Any, tmp_path: Path) -> None:
    from watchllm_ext.delivery.writer import SinkError
    from watchllm_ext.hookspecs import hookimpl

    class Refuses:
        """A sink that refuses events of model 'bad' for good until told otherwise."""

        name = "picky"

        def __init__(self) -> None:
            self.accept_all = False
            self.got: list[str] = []

        async def write(self, events: Any) -> None:
            if not self.accept_all and any(e.model == "bad" for e in events):
                raise SinkError("model 'bad' is not allowed here", permanent=True)
            self.got.extend(e.event_id for e in events)

        @hookimpl
        def register_sinks(self, settings: Any, store: Any) -> Any:
            return self

    sink = Refuses()
    server = server_factory(plugin_objects=(sink,))
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call("d1", model="bad")]},
    )
    assert r.status_code == 202
    server.flush()
    assert sink.got == []
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert [(d["sink"], d["events"]) for d in listed["dead_letters"]] == [("picky", 1)]
    assert "not allowed" in listed["dead_letters"][0]["reason"]
    # The store sink got it: only the refusing sink has a dead letter.
    assert server.query("SELECT event_id FROM events") == [{"event_id": "d1"}]

    sink.accept_all = True
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "watchllm_ext.cli",
            "dead-letter",
            "replay",
            "--url",
            server.url,
            "--key",
            server.key,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 events from 1 dead letters" in replay.stdout
    server.flush()
    assert sink.got == ["d1"]
    # Targeted at the sink that refused it: the store does not get it twice.
    assert server.query("SELECT count() AS n FROM events") == [{"n": 1}]
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert listed["dead_letters"] == []


def _send_until_refused(
    server: Running, prefix: str, *, batches: int, size: int, prompt_chars: int
) -> tuple[list[str], Any]:
    """Batches of `size` events until one is not 202: the ids answered 202, the last answer."""
    acked: list[str] = []
    for n in range(batches):
        ids = [f"{prefix}{n}-{i}" for i in range(size)]
        r = server.client.post(
            "/v1/events/batch",
            headers=server.headers(),
            json={"events": [prompt_call(i, prompt="x" * prompt_chars) for i in ids]},
        )
        if r.status_code != 202:
            break
        acked.extend(ids)
    return acked, r


def test_full_disk_answers_503_and_recovers_by_itself(server_factory: Any, tmpfs: Any) -> None:
    import faults

    disk = tmpfs("512k")
    server: Running = server_factory(
        plugin_objects=(faults,), spool_dir=disk / "spool", sink_retry_max_s=0.2
    )
    marker = server.settings.data_dir / "store-down"
    marker.touch()
    acked, r = _send_until_refused(server, "f", batches=100, size=20, prompt_chars=500)
    assert r.status_code == 503, r.text
    assert "No space left on device" in r.json()["message"] and r.headers["Retry-After"]
    assert server.client.get("/healthz").status_code == 200  # no crash
    marker.unlink()
    server.flush()
    # Delivered segments are deleted, the disk has room again, ingestion goes on.
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("room-again")]}
    )
    assert r.status_code == 202, r.text
    server.flush()
    stored = {r["event_id"] for r in server.query("SELECT event_id FROM events FINAL")}
    assert stored == {*acked, "room-again"}


@pytest.mark.parametrize("in_process", [True, False], ids=["helper-process", "worker-thread"])
def test_a_failed_fsync_answers_503_and_the_retry_is_stored_once(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch, in_process: bool
) -> None:
    """A disk error on the spool's fsync (here the fsync is replaced: a disk that fails its
    fsyncs cannot be made on this machine; test_fsync_process.py has the helper's own real
    failure) is answered as a write's disk error is: 503 with Retry-After, the error named,
    nothing acknowledged; the server keeps serving, and the client's retry of the same events
    is stored once. With the fsyncs in the helper process (the default) and on a thread."""
    if in_process and not fsync_process_supported():
        pytest.skip("no helper process on this platform")
    server: Running = server_factory(spool_fsync_process=in_process)
    spool = server.wl.writer.log
    failures = [1]
    if in_process:
        wait_until(lambda: spool._helper is not None, 10, "the fsync helper started")
        helper = spool._helper
        real_fsync = helper.fsync

        async def failing_once(fds: Any) -> None:
            if failures[0]:
                failures[0] -= 1
                raise FsyncFailed(len(fds) - 1, 5)
            await real_fsync(fds)

        monkeypatch.setattr(helper, "fsync", failing_once)
    else:
        real_sync = spool._sync_files

        def failing_once_on_thread(closed: list[int], folder: int | None, fd: int) -> None:
            if failures[0]:
                failures[0] -= 1
                raise OSError(5, "Input/output error")
            real_sync(closed, folder, fd)

        monkeypatch.setattr(spool, "_sync_files", failing_once_on_thread)
    body = {"events": [prompt_call("fsync-1"), prompt_call("fsync-2")]}
    r = server.client.post("/v1/events/batch", headers=server.headers(), json=body)
    assert r.status_code == 503, r.text
    assert "cannot make the spool durable" in r.json()["message"]
    assert "Input/output error" in r.json()["message"] and r.headers["Retry-After"]
    assert server.client.get("/healthz").status_code == 200
    r = server.client.post("/v1/events/batch", headers=server.headers(), json=body)
    assert r.status_code == 202, r.text
    server.flush()
    # Without FINAL: the first attempt's record, fsynced later, and the retry's are one row each.
    rows = server.query("SELECT event_id FROM events ORDER BY event_id")
    assert [row["event_id"] for row in rows] == ["fsync-1", "fsync-2"]


def test_corrupt_segment_at_start_keeps_the_good_records(server_factory: Any) -> None:
    import faults

    first: Running = server_factory(plugin_objects=(faults,))
    (first.settings.data_dir / "store-down").touch()
    for i in range(5):  # five records, kept in the spool: the store is down
        r = first.client.post(
            "/v1/projects/acme/events", headers=first.headers(), json=prompt_call(f"c{i}")
        )
        assert r.status_code == 202
    first.stop()
    segment = next((first.settings.spool_path / "segments").iterdir())
    data = bytearray(segment.read_bytes())
    middle = data.find(b'"c2"')
    data[middle + 1] ^= 0xFF  # flip a byte inside the third record
    segment.write_bytes(bytes(data))
    (first.settings.data_dir / "store-down").unlink()

    second: Running = server_factory()
    second.flush()
    stored = sorted(r["event_id"] for r in second.query("SELECT event_id FROM events"))
    assert stored == ["c0", "c1", "c3", "c4"]
    assert list((second.settings.spool_path / "dead-letter").glob("corrupt-*.bin"))


def test_a_failed_fsync_is_503_and_not_ready_until_an_fsync_succeeds(server_factory: Any) -> None:
    """A disk error on the spool's fsync (simulated: the spool's fsync step raises EIO once;
    a failing disk cannot be had on demand here): the request is answered 503 with
    Retry-After, /readyz says not ready and why, and the next request's fsync, which
    succeeds, makes it ready again."""
    server: Running = server_factory()
    spool = server.wl.writer.log
    real_sync = spool._sync
    failures = [1]

    async def failing_once(closed: list[int], folder: int | None, fd: int) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(5, "Input/output error")
        await real_sync(closed, folder, fd)

    spool._sync = failing_once
    try:
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("f1")]}
        )
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        writer = ready.json()["checks"]["writer"]
        assert writer["ok"] is False
        assert writer["log_sync_error"] == "the spool's fsync failed: Input/output error"
        assert writer["detail"] == writer["log_sync_error"]
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("f2")]}
        )
        assert r.status_code == 202, r.text
        assert server.client.get("/readyz").status_code == 200
    finally:
        spool._sync = real_sync


def test_a_full_store_disk_loses_no_accepted_event(
    server_factory: Any, tmpfs: Any, tmp_path: Path
) -> None:
    """The embedded store's disk full, the spool's not: chDB's streaming insert returned as
    if it had written the rows (none were), the writer moved on, and 73% of what was
    answered 202 was gone. Now the insert fails, the writer retries, the events wait in the
    spool, and all of them are stored once the disk has room again."""
    disk = tmpfs("64m")
    server: Running = server_factory(
        data_dir=disk / "data",
        spool_dir=tmp_path / "spool",
        keys_file=tmp_path / "keys.sqlite3",
        sink_retry_max_s=0.2,
    )
    ballast = disk / "ballast"
    with open(ballast, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError:
            pass  # the disk is full
    acked, r = _send_until_refused(server, "full-", batches=10, size=200, prompt_chars=300)
    assert r.status_code == 202, r.text  # the spool has room: every batch is taken
    time.sleep(1.5)  # inserts tried and refused meanwhile
    ballast.unlink()
    server.flush()
    stored = [r["event_id"] for r in server.query("SELECT event_id FROM events FINAL")]
    assert acked and sorted(stored) == sorted(acked)


def test_a_writer_stopped_by_an_error_makes_healthz_503(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of the writer that fails for good ends the app's lifespan: the process then
    answered every event 503 while /healthz said ok, and no supervisor restarted it. Now
    /healthz is 503 with the reason. (The failure is made by replacing the spool's fsync
    task: the errors that did this are handled now.)"""
    import anyio

    from watchllm_ext.delivery.spool import Spool

    async def fails() -> None:
        await anyio.sleep(0.3)
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(Spool, "sync_task", lambda self: fails)
    server: Running = server_factory()
    assert server.client.get("/healthz").status_code == 200
    wait_until(lambda: server.client.get("/healthz").status_code == 503, 10, "healthz 503")
    answer = server.client.get("/healthz").json()
    assert answer["status"] == "failed" and "the disk went away" in answer["detail"], answer
