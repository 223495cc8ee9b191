"""Big request bodies take turns at the CPU (ingest_threads places), not at the disk: a request
gives its place back once its events are written to the spool, before the wait for their
fsync (app._BigBodySlot)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from stores import EVERY_STORE

from tests.conftest import prompt_call
from watchllm_ext.auth import Principal
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES


def big_body(tag: str, n: int = 100) -> bytes:
    events = [prompt_call(f"{tag}-{i}", prompt="x" * 1000) for i in range(n)]
    body = json.dumps({"events": events}).encode()
    assert len(body) >= OFFLOAD_MIN_BYTES
    return body


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.01)


def post_in_thread(
    url: str, headers: dict[str, str], body: bytes, out: list[Any]
) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            out.append(client.post("/v1/events/batch", headers=headers, content=body))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@EVERY_STORE
def test_a_big_request_waiting_for_its_fsync_holds_no_place(server_factory: Any) -> None:
    """With one place (ingest_threads=1) and the first request's fsync held back (a slow disk,
    which a test machine does not have: the spool's sync_to waits for a gate), a second big
    request is validated and written meanwhile; both are answered 202 once the fsync runs,
    and both are stored."""
    server = server_factory(ingest_threads=1)
    writer = server.wl.writer
    spool = writer.log
    gate = threading.Event()
    synced = spool.sync_to

    async def slow_disk_sync_to(position: Any) -> None:
        while not gate.is_set():
            await anyio.sleep(0.005)
        await synced(position)

    spool.sync_to = slow_disk_sync_to
    before = writer.accepted_events_total
    answers: list[Any] = []
    first = post_in_thread(server.url, server.headers(), big_body("first"), answers)
    wait_until(lambda: writer.accepted_events_total == before + 100, 10, "the first is written")
    second = post_in_thread(server.url, server.headers(), big_body("second"), answers)
    try:
        # Held through the fsync, the first's place kept the second waiting until it was done.
        wait_until(lambda: writer.accepted_events_total == before + 200, 10, "the second written")
    except AssertionError:
        gate.set()  # the server can then stop
        raise
    try:
        assert answers == []  # neither is answered before its fsync
    finally:
        gate.set()  # (also when it failed: the server can then stop)
    first.join(30)
    second.join(30)
    assert sorted(r.status_code for r in answers) == [202, 202], [r.text for r in answers]
    server.flush()
    rows = server.query("SELECT count() AS n FROM events WHERE project_id = 'acme'")
    assert rows[0]["n"] == 200


class CountsConcurrentWork:
    """transform_events runs on the worker thread of a big body (docs/PLUGINS.md): how many
    run at once is how many big bodies are in their CPU work at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)  # long enough for the other requests to arrive meanwhile
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("places", [1, 2])
def test_big_bodies_do_their_cpu_work_within_ingest_threads(
    server_factory: Any, places: int
) -> None:
    counter = CountsConcurrentWork()
    server = server_factory(plugin_objects=(counter,), ingest_threads=places)
    answers: list[Any] = []
    threads = [
        post_in_thread(server.url, server.headers(), big_body(f"c{i}"), answers) for i in range(4)
    ]
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in answers] == [202] * 4, [r.text for r in answers]
    assert counter.calls == 4
    assert counter.most == places
