"""The analytics API's store queries stay within their own threads, a share per project and a
time limit (watchllm_ext/analytics/reads.py): one project's flood of slow reads cannot hold
up ingestion, the writer, /readyz or the other projects."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import make_settings, prompt_call

from watchllm_ext import create_app
from watchllm_ext.analytics.reads import StoreReads
from watchllm_ext.errors import Problem


def test_a_project_gets_its_share_and_a_place_in_time_on_threads_of_their_own() -> None:
    reads = StoreReads(threads=1, per_project=2, queue_timeout_s=0.3, query_timeout_s=30)
    release = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "slow"

    async def main() -> None:
        answers: dict[str, Any] = {}

        async def ask(name: str, project: str) -> None:
            try:
                answers[name] = await reads.run(project, slow)
            except Problem as exc:
                answers[name] = (exc.status, exc.code, exc.headers.get("Retry-After"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "a", "p")
            await anyio.to_thread.run_sync(started.wait)  # a runs on the one analytics thread
            tg.start_soon(ask, "b", "p")  # waits for the thread
            await anyio.sleep(0.05)
            default = anyio.to_thread.current_default_thread_limiter()
            assert default.borrowed_tokens == 0  # not one of the default threads is taken
            await ask("c", "p")  # p has two running or waiting: its share
            assert answers["c"] == (429, "too_many_queries", "2")
            await ask("d", "q")  # another project: no thread free within the queue timeout
            assert answers["d"] == (503, "store_busy", "2")
            release.set()
        assert answers["a"] == "slow" and answers["b"] == (503, "store_busy", "2")
        # Shares are given back: p may ask again.
        assert await reads.run("p", lambda: "again") == "again"
        assert reads._waiting == {}

    anyio.run(main)


def test_the_threads_go_to_the_waiting_projects_in_turn() -> None:
    """One project's queued queries do not hold another's behind all of them."""
    reads = StoreReads(threads=1, per_project=8, queue_timeout_s=10, query_timeout_s=30)
    order: list[str] = []
    gate = threading.Event()

    def query(name: str) -> None:
        gate.wait(10)
        order.append(name)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for name in ("p1", "p2", "p3"):
                tg.start_soon(reads.run, "p", query, name)
                await anyio.sleep(0.02)  # in this order
            tg.start_soon(reads.run, "q", query, "q1")
            await anyio.sleep(0.05)
            gate.set()
        # p1 had the thread; p waited first, so its turn comes first, then q's, then p's
        # again: q1 waits behind one of p's queued queries, not all of them.
        assert order == ["p1", "p2", "q1", "p3"]

    anyio.run(main)


def test_a_query_past_the_time_limit_is_stopped_and_answered_503(tmp_path: Path) -> None:
    wl = create_app(make_settings(tmp_path)).state.watchllm
    store = wl.open_store()
    reads = StoreReads(threads=1, per_project=2, queue_timeout_s=5, query_timeout_s=0.5)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(Problem) as caught:
            await reads.query("p", store, "SELECT count() AS n FROM numbers(100000000000)", {})
        assert time.monotonic() - started < 10
        assert caught.value.status == 503 and caught.value.code == "query_timeout"
        assert "analytics_query_timeout_s (0.5 s)" in caught.value.message
        assert await reads.query("p", store, "SELECT 1 AS n", {}) == [{"n": 1}]

    try:
        anyio.run(main)
    finally:
        store.close()


def test_slow_reads_of_one_project_hold_up_neither_ingestion_nor_readyz(
    server_factory: Any,
) -> None:
    server = server_factory(
        analytics_threads=1, analytics_queries_per_project=2, analytics_queue_timeout_s=1.0
    )
    store = server.app.state.watchllm.store
    stats = "/v1/analytics/stats?period=1h"
    # The store sink's first write checks the schema (a read): done before the reads are held.
    r = server.client.post(
        "/v1/projects/acme/events", json=prompt_call("first"), headers=server.headers()
    )
    assert r.status_code == 202, r.text
    server.flush()
    # A read that runs long: the read handle is held, as by a text search of minutes.
    pool = ThreadPoolExecutor(4)
    store._lock_reads.acquire()
    try:
        first = pool.submit(server.client.get, stats, headers=server.headers())
        time.sleep(0.3)  # it has the analytics thread (blocked on the read)
        second = pool.submit(server.client.get, stats, headers=server.headers())
        time.sleep(0.3)
        third = server.client.get(stats, headers=server.headers())
        assert third.status_code == 429, third.text
        assert third.json()["error"] == "too_many_queries"
        assert third.headers["Retry-After"] == "2"
        answer = second.result(10)
        assert answer.status_code == 503 and answer.json()["error"] == "store_busy"
        # Meanwhile: a big body (worker threads and processes) and a single event are
        # accepted at once, and /readyz answers from the other chDB handle.
        big = {"events": [prompt_call(f"b{i}", prompt="p" * 300) for i in range(300)]}
        body = json.dumps(big).encode()
        assert len(body) > 64 * 1024
        began = time.monotonic()
        r = server.client.post(
            "/v1/events/batch",
            content=body,
            headers={**server.headers(), "Content-Type": "application/json"},
        )
        assert r.status_code == 202, r.text
        r = server.client.post(
            "/v1/projects/acme/events", json=prompt_call("one"), headers=server.headers()
        )
        assert r.status_code == 202, r.text
        ready = server.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert time.monotonic() - began < 5
        assert not first.done()
    finally:
        store._lock_reads.release()
        pool.shutdown(wait=True)
    assert first.result(30).status_code == 200
    server.flush()
    assert server.query("SELECT count() AS n FROM events FINAL")[0]["n"] == 302
    assert server.client.get(stats, headers=server.headers()).status_code == 200
