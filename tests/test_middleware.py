"""WatchLLMMiddleware in real hosts: FastAPI and plain Starlette, served by uvicorn on loopback,
recording into a real store (chDB in the test's folder; the budget test on every store)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from conftest import ServerThread, free_port, make_settings, prompt_call
from fastapi import BackgroundTasks, Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Mount, Route
from stores import EVERY_STORE, StoreBackend

from watchllm_ext import create_app, lifespan
from watchllm_ext.auth import Principal
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.keys import KeyStore
from watchllm_ext.middleware import (
    Recorder,
    WatchLLMMiddleware,
    current_recorder,
    get_recorder,
    watchllm_route,
)
from watchllm_ext.quota import QuotaDecision
from watchllm_ext.sdk.context import current_run
from watchllm_ext.settings import Settings
from watchllm_plugins.clickhouse_store import ClickHouseStore


def stored(settings: Settings, sql: str = "") -> list[dict[str, Any]]:
    """The summary events (agent_step, tagged http) and the events recorded under them, read
    from the store after the host stopped (its shutdown flushed the outbox and the writer)."""
    store = create_app(settings).state.watchllm.open_store()
    try:
        return store.query(
            sql
            or "SELECT event_id, event_type, run_id, parent_event_id, user_id, step_name, status,"
            " latency_ms, metadata, observation, model, tokens_input FROM events FINAL"
            " ORDER BY timestamp, event_type"
        )
    finally:
        store.close()


def deliver_spool(settings: Settings) -> None:
    """Start WatchLLM on the folder and wait until its writer delivered the spool."""
    wl = create_app(settings).state.watchllm

    async def main() -> None:
        async with wl.running():
            with anyio.fail_after(30):
                while wl.writer.lag_events():
                    await anyio.sleep(0.05)

    anyio.run(main)


def summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row["event_type"] == "agent_step":
            out.append({**row, "metadata": json.loads(row["metadata"])})
    return out


class Calls:
    """What the host's handlers did, to show which ran."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.host_lifespan: list[str] = []


def host_lifespan_of(calls: Calls) -> Any:
    @asynccontextmanager
    async def host_lifespan(app: Any) -> AsyncIterator[None]:
        calls.host_lifespan.append("start")
        yield
        calls.host_lifespan.append("stop")

    return host_lifespan


def fastapi_host(wl_app: Any, calls: Calls, own_lifespan: bool, mount_at: str, **kw: Any) -> Any:
    host = FastAPI(lifespan=host_lifespan_of(calls) if own_lifespan else None)

    @host.get("/items/{item_id}")
    async def item(item_id: int, rec: Annotated[Recorder, Depends(get_recorder)]) -> dict[str, Any]:
        calls.handled.append(f"item {item_id}")
        rec.prompt_call("gpt-4o", tokens_input=10, tokens_output=5, cost_estimate_usd=0.004)
        return {"item": item_id, "run_id": rec.run_id}

    @host.get("/free")
    @watchllm_route(enforce=False)
    def free() -> dict[str, str]:
        calls.handled.append("free")
        return {"free": "yes"}

    host.mount(mount_at or "/", wl_app)  # at the root: after the host's own routes
    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, **kw)
    return host


def starlette_host(wl_app: Any, calls: Calls, own_lifespan: bool, mount_at: str, **kw: Any) -> Any:
    async def item(request: Request) -> JSONResponse:
        item_id = int(request.path_params["item_id"])
        calls.handled.append(f"item {item_id}")
        rec: Recorder = request.state.watchllm
        rec.prompt_call("gpt-4o", tokens_input=10, tokens_output=5, cost_estimate_usd=0.004)
        return JSONResponse({"item": item_id, "run_id": rec.run_id})

    @watchllm_route(enforce=False)
    async def free(request: Request) -> JSONResponse:
        calls.handled.append("free")
        return JSONResponse({"free": "yes"})

    return Starlette(
        routes=[
            Route("/items/{item_id:int}", item),
            Route("/free", free),
            Mount(mount_at or "/", app=wl_app),
        ],
        lifespan=host_lifespan_of(calls) if own_lifespan else None,
        middleware=[Middleware(WatchLLMMiddleware, watchllm=wl_app, **kw)],
    )


@pytest.mark.parametrize("mount_at", ["/watchllm", ""], ids=["prefix", "root"])
@pytest.mark.parametrize("own_lifespan", [True, False], ids=["host-lifespan", "no-lifespan"])
@pytest.mark.parametrize("kind", ["fastapi", "starlette"])
def test_hosts_start_watchllm_observe_requests_and_flush_at_stop(
    tmp_path: Path, kind: str, own_lifespan: bool, mount_at: str
) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl_app = create_app(settings)
    calls = Calls()
    make = fastapi_host if kind == "fastapi" else starlette_host
    host = make(wl_app, calls, own_lifespan, mount_at, project_id="acme")
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        r = client.get("/items/7", headers={"X-User-Id": "alice"})
        assert r.status_code == 200, r.text
        # The run id the handler saw is the one the response names.
        assert r.json()["run_id"] == r.headers["X-WatchLLM-Run-Id"]
        assert client.get("/nowhere").status_code == 404
        # The mounted WatchLLM runs (its writer was started by the middleware) and its own
        # requests are not observed.
        ingest = client.post(
            f"{mount_at}/v1/projects/acme/events",
            json=prompt_call("direct"),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert ingest.status_code == 202, ingest.text
        assert calls.host_lifespan == (["start"] if own_lifespan else [])
    assert calls.host_lifespan == (["start", "stop"] if own_lifespan else [])
    rows = stored(settings)
    steps = summaries(rows)
    # At the root, WatchLLM's mount takes every path the host has no route for: not observed.
    unrouted = ["GET (no route)"] if mount_at else []
    assert [s["step_name"] for s in steps] == ["GET /items/{item_id}", *unrouted]
    first = steps[0]
    assert first["run_id"] == r.headers["X-WatchLLM-Run-Id"] and first["user_id"] == "alice"
    assert first["status"] == "success" and first["latency_ms"] > 0
    assert first["metadata"]["http.response.status_code"] == 200
    assert first["metadata"]["http.route"] == "/items/{item_id}"
    assert first["metadata"]["llm.calls"] == 1 and first["metadata"]["llm.tokens_input"] == 10
    assert all(s["metadata"]["http.response.status_code"] == 404 for s in steps[1:])
    # The LLM call nests under its request's summary, in the same run, for the same user.
    (call,) = [
        row for row in rows if row["event_type"] == "prompt_call" and row["event_id"] != "direct"
    ]
    assert call["run_id"] == first["run_id"] and call["parent_event_id"] == first["event_id"]
    assert call["user_id"] == "alice"
    assert {row["event_id"] for row in rows} >= {"direct"}


def test_a_host_mounted_under_a_prefix_starts_watchllm_on_its_first_request(
    tmp_path: Path,
) -> None:
    """Starlette runs no lifespan of a mounted app: the middleware starts WatchLLM itself,
    and the outer app's `hosting.lifespan` flushes what it recorded before stopping."""
    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    calls = Calls()
    inner = fastapi_host(wl_app, calls, True, "/watchllm", project_id="acme")
    outer = Starlette(routes=[Mount("/api", app=inner)])
    with ServerThread(outer) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/items/1").status_code == 200
        assert client.get("/api/watchllm/readyz").json()["status"] == "ready"
    assert calls.host_lifespan == []  # the inner host's lifespan never ran
    # Stopped with the event loop, no lifespan to flush at: what was recorded is in
    # WatchLLM's spool, and the next start delivers it.
    deliver_spool(settings)
    assert [s["step_name"] for s in summaries(stored(settings))] == ["GET /items/{item_id}"]

    settings2 = make_settings(tmp_path / "two")
    wl_app2 = create_app(settings2)
    inner2 = fastapi_host(wl_app2, Calls(), False, "/watchllm", project_id="acme")
    outer2 = Starlette(routes=[Mount("/api", app=inner2)], lifespan=lifespan(wl_app2))
    with ServerThread(outer2) as server, httpx.Client(base_url=server.url) as client:
        assert wl_app2.state.watchllm.writer is not None  # started by the outer lifespan
        for i in range(3):
            assert client.get(f"/api/items/{i}").status_code == 200
    assert len(summaries(stored(settings2))) == 3


def test_a_stream_passes_through_chunk_by_chunk(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    host = FastAPI()

    @host.get("/chat/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            yield "data: first\n\n"
            await asyncio.sleep(1.0)
            yield "data: second\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app)
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        sent = time.perf_counter()
        with client.stream("GET", "/chat/stream") as r:
            parts = r.iter_text()
            first = next(parts)
            first_after = time.perf_counter() - sent
            rest = "".join(parts)
        total = time.perf_counter() - sent
    assert first == "data: first\n\n" and rest == "data: second\n\n"
    assert first_after < 0.5 < 1.0 <= total, (first_after, total)
    (step,) = summaries(stored(settings))
    # The latency runs to the last chunk, not to the first.
    assert step["step_name"] == "GET /chat/stream" and step["latency_ms"] >= 1000


def test_the_run_context_reaches_handlers_threads_and_background_tasks(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    host = FastAPI()
    seen: dict[str, Any] = {}

    def later(label: str) -> None:  # a background task, after the response is sent
        run = current_run()
        seen[label] = run.run_id if run else None
        rec = current_recorder()
        assert rec is not None
        rec.prompt_call("claude-sonnet-4", provider="anthropic", tokens_input=3)

    @host.get("/async")
    async def in_loop(background: BackgroundTasks) -> dict[str, Any]:
        background.add_task(later, "background")
        run = current_run()
        assert run is not None
        return {"run_id": run.run_id, "parent": run.parent_event_id}

    @host.get("/sync")
    def in_thread() -> dict[str, Any]:  # FastAPI runs it in a worker thread
        run = current_run()
        assert run is not None
        return {"run_id": run.run_id, "user": run.user_id}

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, user_header="X-Account")
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        a = client.get("/async", headers={"X-WatchLLM-Run-Id": "run-abc"})
        b = client.get("/sync", headers={"X-Account": "u-9"})
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        c = client.get("/async", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
        bad = client.get("/sync", headers={"X-WatchLLM-Run-Id": "no spaces allowed"})
        deadline = time.monotonic() + 5
        while len(seen) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert a.json()["run_id"] == "run-abc" == a.headers["X-WatchLLM-Run-Id"]
    assert seen["background"] in ("run-abc", trace)
    assert b.json()["user"] == "u-9" and len(b.json()["run_id"]) == 32
    assert c.json()["run_id"] == trace  # W3C trace id -> run id
    assert bad.json()["run_id"] != "no spaces allowed"  # not an id the contract takes: new
    rows = stored(settings)
    steps = {s["run_id"]: s for s in summaries(rows)}
    # The caller's span, named as the OTLP receiver names an LLM span's event.
    assert steps[trace]["parent_event_id"] == f"{trace}-00f067aa0ba902b7"
    assert steps["run-abc"]["event_id"] == a.json()["parent"]
    calls = [row for row in rows if row["event_type"] == "prompt_call"]
    assert {(row["run_id"], row["parent_event_id"]) for row in calls} == {
        ("run-abc", steps["run-abc"]["event_id"]),
        (trace, steps[trace]["event_id"]),
    }
    # The background task's call is counted in its request's summary.
    assert steps["run-abc"]["metadata"]["llm.calls"] == 1


def test_an_exception_is_recorded_and_reaches_the_hosts_error_handling(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    host = FastAPI()

    @host.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"host": "handled", "error": str(exc)}, status_code=500)

    @host.exception_handler(KeyError)
    async def on_key_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"host": "missing"}, status_code=404)

    @host.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the model client broke")

    @host.get("/missing")
    async def missing() -> None:
        raise KeyError("x")

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app)
    with ServerThread(host) as server:
        # (Starlette re-raises a 500's exception to the server, which closes the connection.)
        r = httpx.get(server.url + "/boom")
        assert r.status_code == 500 and r.json() == {
            "host": "handled",
            "error": "the model client broke",
        }
        assert httpx.get(server.url + "/missing").json() == {"host": "missing"}
    steps = {s["step_name"]: s for s in summaries(stored(settings))}
    failed = steps["GET /boom"]
    assert failed["status"] == "error"
    assert failed["observation"] == "RuntimeError: the model client broke"
    assert failed["metadata"]["http.response.status_code"] == 500
    assert failed["metadata"]["error.type"] == "RuntimeError"
    assert steps["GET /missing"]["metadata"]["http.response.status_code"] == 404


class DenyRoute:
    """A test plugin: denies one route template for host requests (n_events = 0)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.asked: list[tuple[str, str | None, str | None]] = []

    @hookimpl
    def check_quota(
        self, principal: Principal, n_events: int, user_id: str | None, route: str | None
    ) -> QuotaDecision | None:
        if n_events:
            return None
        self.asked.append((principal.project_id, user_id, route))
        if route == self.template:
            return QuotaDecision(False, retry_after_s=30, reason="this route is closed")
        return None


@EVERY_STORE
def test_a_user_over_their_daily_budget_is_denied_before_the_handler_runs(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    settings = make_settings(tmp_path, **store_backend.settings())
    deny = DenyRoute("/closed")
    wl_app = create_app(settings, plugins=[deny])
    calls = Calls()
    host = fastapi_host(
        wl_app, calls, False, "/watchllm",
        project_id="acme", user_daily_budget_usd=0.01, budget_cache_s=0.05,
    )  # fmt: skip

    @host.get("/closed")
    async def closed() -> str:
        calls.handled.append("closed")
        return "open?"

    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        wl = wl_app.state.watchllm
        alice = {"X-User-Id": "alice"}
        # Spend before today does not count: an old call of alice's, stored.
        old = dict(prompt_call("old", user_id="alice", cost_estimate_usd=5.0))
        asyncio.run_coroutine_threadsafe(
            wl.ingest(Principal("acme", frozenset({"ingest"})), [old]), wl._loop
        ).result(10)
        for i in range(3):  # 3 x $0.004 recorded by the handler: $0.012 > $0.01
            assert client.get(f"/items/{i}", headers=alice).status_code == 200
        spend_sql = (
            "SELECT sum(cost_estimate_usd) AS usd FROM events FINAL"
            " WHERE user_id = 'alice' AND event_type = 'prompt_call' AND event_id != 'old'"
        )
        deadline = time.monotonic() + 20
        while (wl.store.query(spend_sql)[0]["usd"] or 0) < 0.011:
            assert time.monotonic() < deadline, "the recorded calls did not reach the store"
            time.sleep(0.05)
        # The spend read is refreshed in the background once stale (the request that finds
        # it stale still goes by the old one): ask until the refusal comes.
        deadline = time.monotonic() + 10
        while True:
            handled = list(calls.handled)
            r = client.get("/items/99", headers=alice)
            if r.status_code != 200:
                break
            assert time.monotonic() < deadline, "alice was never refused"
            time.sleep(0.05)
        assert r.status_code == 429, r.text
        assert calls.handled == handled  # the handler never ran
        body = r.json()
        assert body["error"] == "quota_exceeded" and body["field"] == "X-User-Id"
        assert "daily budget" in body["message"] and "$0.01" in body["message"]
        retry = int(r.headers["Retry-After"])
        assert 0 < retry <= 86_400 and r.headers["X-RateLimit-Reset"] == str(retry)
        assert r.headers["X-RateLimit-Limit"] == "1" and r.headers["X-RateLimit-Remaining"] == "0"
        assert r.headers["RateLimit-Policy"] == '"user-daily-usd";q=1;w=86400'
        assert r.headers["X-WatchLLM-Run-Id"]
        # Other users, and routes that are not enforced, are unaffected.
        assert client.get("/items/5", headers={"X-User-Id": "bob"}).status_code == 200
        assert client.get("/free", headers=alice).status_code == 200
        assert calls.handled == [*handled, "item 5", "free"]
        # Route-level denial by another plugin: the template is what it is asked about.
        closed_r = client.get("/closed", headers={"X-User-Id": "bob"})
        assert closed_r.status_code == 429 and closed_r.headers["Retry-After"] == "30"
        assert closed_r.json()["message"] == "this route is closed"
        assert "closed" not in calls.handled
        assert ("acme", "bob", "/items/{item_id}") in deny.asked
    denied = [s for s in summaries(stored(settings)) if s["status"] == "warning"]
    assert {(s["step_name"], s["user_id"]) for s in denied} == {
        ("GET /items/{item_id}", "alice"),
        ("GET /closed", "bob"),
    }
    assert all(s["metadata"]["http.response.status_code"] == 429 for s in denied)


def test_budget_reads_are_cached_and_shared(tmp_path: Path) -> None:
    """Concurrent requests of several users while the cache is cold make one store read (all
    of the project's users at once), and a fresh cache makes none."""
    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    host = FastAPI()
    middleware: list[WatchLLMMiddleware] = []

    @host.get("/x")
    async def x(request: Request) -> str:
        return "x"

    class Keep(WatchLLMMiddleware):
        def __init__(self, app: Any, **kw: Any) -> None:
            super().__init__(app, **kw)
            middleware.append(self)

    host.add_middleware(Keep, watchllm=wl_app, user_daily_budget_usd=1.0, budget_cache_s=60)
    with ServerThread(host) as server:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                answers = await asyncio.gather(
                    *(client.get("/x", headers={"X-User-Id": f"u{i % 5}"}) for i in range(20))
                )
                return [a.status_code for a in answers]

        assert asyncio.run(burst()) == [200] * 20
        assert asyncio.run(burst()) == [200] * 20
    (mw,) = middleware
    assert mw.budget is not None and mw.budget.queries == 1


def test_uvicorn_workers_with_the_embedded_store_fail_at_start_in_one_line(
    tmp_path: Path,
) -> None:
    module = tmp_path / "hostapp.py"
    module.write_text(
        textwrap.dedent(
            f"""
            from fastapi import FastAPI
            from watchllm_ext import Settings, create_app
            from watchllm_ext.middleware import WatchLLMMiddleware

            watchllm = create_app(Settings(data_dir={str(tmp_path / "data")!r}))
            app = FastAPI()
            app.mount("/watchllm", watchllm)
            app.add_middleware(WatchLLMMiddleware, watchllm=watchllm)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "hostapp:app", "--workers", "2",
         "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    # Every worker refuses; uvicorn's supervisor then stops (it exits 0 doing so).
    assert "failed to start, stopping the parent process" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "embedded store" in line]
    assert lines and "--workers" in lines[0] and "WATCHLLM_CLICKHOUSE_URL" in lines[0], done.stderr


@pytest.mark.stores("clickhouse")
def test_uvicorn_workers_with_a_clickhouse_server_each_take_a_spool(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    """With the ClickHouse server store, every worker runs its own WatchLLM on a spool of
    its own (<spool>/worker-<n>), and every request of every worker is stored."""
    module = tmp_path / "hostapp.py"
    module.write_text(
        textwrap.dedent(
            f"""
            import os
            from fastapi import FastAPI
            from watchllm_ext import Settings, create_app
            from watchllm_ext.middleware import WatchLLMMiddleware

            watchllm = create_app(Settings(data_dir={str(tmp_path / "data")!r}))
            app = FastAPI()

            @app.get("/pid")
            def pid() -> int:
                return os.getpid()

            app.add_middleware(WatchLLMMiddleware, watchllm=watchllm, project_id="acme")
            """
        )
    )
    url = store_backend.settings()["clickhouse_url"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "hostapp:app", "--workers", "2", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "WATCHLLM_CLICKHOUSE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        sent = 0
        while len(pids) < 2 or sent < 40:  # new connections, until both workers answered
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/pid", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.text
            pids.add(r.json())
            sent += 1
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert "Traceback" not in output, output
    spools = sorted(p.name for p in (tmp_path / "data" / "spool").glob("worker-?"))
    assert spools == ["worker-0", "worker-1"], spools
    store = ClickHouseStore(url)
    try:
        rows = store.query(
            "SELECT count() AS n FROM events FINAL WHERE project_id = 'acme'"
            " AND event_type = 'agent_step'"
        )
    finally:
        store.close()
    assert rows == [{"n": sent}]


def test_an_sdk_call_inside_a_handler_lands_in_the_requests_run(tmp_path: Path) -> None:
    """The SDK reads the run context the middleware set: a call it logs inside a handler (and
    delivers in process, no HTTP hop) nests under that request's summary event."""
    from watchllm_ext.sdk import WatchLLM

    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl_app = create_app(settings)
    sdk = WatchLLM(api_key=key, transport="local", flush_interval_s=0.05)
    host = FastAPI()

    @host.post("/ask")
    def ask() -> dict[str, str]:  # a sync handler: in a worker thread, the context follows
        sdk.log_prompt_call(model="gpt-4o", tokens_input=7, tokens_output=3)
        run = current_run()
        assert run is not None
        return {"run_id": run.run_id}

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, project_id="acme")
    try:
        with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
            runs = [client.post("/ask").json()["run_id"] for _ in range(3)]
            assert sdk.flush(10)
    finally:
        sdk.close(5)
    rows = stored(settings)
    parents = {s["run_id"]: s["event_id"] for s in summaries(rows)}
    calls = [r for r in rows if r["event_type"] == "prompt_call"]
    assert sorted(r["run_id"] for r in calls) == sorted(runs)
    assert all(r["parent_event_id"] == parents[r["run_id"]] for r in calls)


def test_the_summary_counts_the_calls_made_inside_the_request(tmp_path: Path) -> None:
    """The SDK's calls in a handler's run are counted in the request's summary with the
    recorder's (calls, tokens, cost: reported, and priced as the server prices the others),
    through the run context's tally: in an async handler, in an @observe step inside it, in a
    thread the handler starts with its context. A `client.run()` inside is a run of its own:
    not counted. Other requests' counts stay their own."""
    import contextvars
    import threading

    from watchllm_ext.sdk import WatchLLM, observe

    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl_app = create_app(settings)
    sdk = WatchLLM(api_key=key, transport="local", flush_interval_s=0.05)
    host = FastAPI()

    @observe(name="plan", client=sdk)
    async def plan() -> str:
        sdk.log_prompt_call(model="gpt-4o", tokens_input=100, tokens_output=50)  # priced
        return "ok"

    @host.post("/ask/{n}")
    async def ask(n: int, rec: Annotated[Recorder, Depends(get_recorder)]) -> dict[str, str]:
        for _ in range(n):
            sdk.log_prompt_call(model="gpt-4o", tokens_input=7, tokens_output=3,
                                cost_estimate_usd=0.25)  # fmt: skip
        await plan()
        rec.prompt_call("gpt-4o-mini", tokens_input=2, tokens_output=1, cost_estimate_usd=0.5)
        ctx = contextvars.copy_context()
        thread = threading.Thread(
            target=ctx.run,
            args=(lambda: sdk.log_prompt_call(model="no-such-model", tokens_input=1),),
        )
        thread.start()
        thread.join()
        sdk.log_tool_call("search")  # an event, not a call
        with sdk.run(name="elsewhere"):  # another run: not this request's
            sdk.log_prompt_call(model="gpt-4o", tokens_input=1000, cost_estimate_usd=9.0)
        return {"run_id": rec.run_id}

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, project_id="acme")
    try:
        with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
            runs = {n: client.post(f"/ask/{n}").json()["run_id"] for n in (1, 3)}
            assert sdk.flush(10)
    finally:
        sdk.close(5)
    rows = stored(
        settings,
        "SELECT run_id, event_type, metadata, tokens_input, tokens_output, cost_estimate_usd"
        " FROM events FINAL",
    )
    for n, run_id in runs.items():
        # The request's summary (the @observe step is an agent_step of the run too).
        (summary,) = [
            r for r in summaries(rows) if r["run_id"] == run_id and "http.route" in r["metadata"]
        ]
        meta = summary["metadata"]
        calls = [r for r in rows if r["run_id"] == run_id and r["event_type"] == "prompt_call"]
        assert len(calls) == n + 3  # n, plan's, the recorder's, the thread's
        assert meta["llm.calls"] == n + 3
        assert meta["llm.tokens_input"] == sum(r["tokens_input"] or 0 for r in calls)
        assert meta["llm.tokens_output"] == sum(r["tokens_output"] or 0 for r in calls)
        assert meta["llm.cost_usd_reported"] == pytest.approx(0.25 * n + 0.5)
        # The rest priced from the model as the server priced the stored calls; the unknown
        # model is counted as such.
        stored_cost = sum(r["cost_estimate_usd"] or 0 for r in calls)
        assert meta["llm.cost_usd"] == pytest.approx(stored_cost, rel=1e-9)
        assert meta["llm.cost_usd"] > meta["llm.cost_usd_reported"]
        assert meta["llm.calls_unpriced"] == 1


def test_nothing_recorded_is_lost_at_shutdown(tmp_path: Path) -> None:
    """Summaries are handed to WatchLLM after the answer, in batches; the host's shutdown
    waits for its requests (uvicorn finishes them), then the middleware drains its outbox
    into WatchLLM, whose writer flushes to the store. A burst, and a request still running
    when the shutdown starts, are all stored."""
    import threading

    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    host = FastAPI()
    slow_started = threading.Event()

    @host.get("/fast/{i}")
    async def fast(i: int, rec: Annotated[Recorder, Depends(get_recorder)]) -> dict[str, int]:
        rec.tool_call("lookup", latency_ms=1.0)
        return {"i": i}

    @host.get("/slow")
    async def slow() -> dict[str, str]:
        slow_started.set()
        await asyncio.sleep(1.0)
        return {"slow": "done"}

    host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, project_id="acme")
    answers: list[int] = []
    with ServerThread(host) as server:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                got = await asyncio.gather(*(client.get(f"/fast/{i}") for i in range(100)))
                return [a.status_code for a in got]

        assert asyncio.run(burst()) == [200] * 100
        late = threading.Thread(
            target=lambda: answers.append(httpx.get(f"{server.url}/slow", timeout=30).status_code)
        )
        late.start()
        assert slow_started.wait(10)
        # Leaving the block stops the server now, the slow request still running.
    late.join(30)
    assert answers == [200]
    rows = stored(settings)
    steps = summaries(rows)
    assert sorted(s["step_name"] for s in steps) == ["GET /fast/{i}"] * 100 + ["GET /slow"]
    assert sum(r["event_type"] == "tool_call" for r in rows) == 100


@pytest.mark.parametrize("host_kind", ["middleware", "lifespan"])
def test_sdk_events_logged_just_before_shutdown_are_stored(tmp_path: Path, host_kind: str) -> None:
    """An SDK client on the in-process transport holds what it logs until its next send
    (`flush_interval_s`). The app, stopping (started by the middleware, or by
    `lifespan(..., host_lifespan=...)`), has the client deliver that while it still takes
    events, then its writer flushes: the calls of the last requests before a shutdown are all
    in the store, not dropped at exit with "no WatchLLM app runs in this process now"."""
    from watchllm_ext.sdk import WatchLLM

    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl_app = create_app(settings)
    # A long interval: nothing is sent before the shutdown unless the app asks for it.
    sdk = WatchLLM(api_key=key, transport="local", flush_interval_s=60, handle_sigterm=False)

    async def answer(request: Request) -> JSONResponse:
        sdk.log_prompt_call(model="gpt-4o", tokens_input=900, tokens_output=300)
        return JSONResponse({"ok": True})

    calls = Calls()
    host: Any
    if host_kind == "middleware":
        host = FastAPI(lifespan=host_lifespan_of(calls))
        host.add_api_route("/answer", answer, methods=["POST"])
        host.add_middleware(WatchLLMMiddleware, watchllm=wl_app, project_id="acme")
    else:
        host = Starlette(
            routes=[Route("/answer", answer, methods=["POST"]), Mount("/watchllm", app=wl_app)],
            lifespan=lifespan(wl_app, host_lifespan=host_lifespan_of(calls)),
        )
    try:
        with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
            for _ in range(4):
                assert client.post("/answer").status_code == 200
            assert sdk.stats()["sent"] == 0  # all four wait in the client as the stop begins
        assert calls.host_lifespan == ["start", "stop"]
        assert sdk.stats()["sent"] == 4
    finally:
        sdk.close(0.1)
    rows = stored(
        settings,
        "SELECT count() AS n FROM events FINAL WHERE event_type = 'prompt_call'"
        " AND model = 'gpt-4o' AND project_id = 'acme'",
    )
    assert rows == [{"n": 4}]


def test_recorded_events_wait_while_watchllm_cannot_take_them(tmp_path: Path) -> None:
    """A batch WatchLLM answers 503 for (its writer full, or not running yet) stays in the
    outbox, in order, and goes in with the next flush: not dropped."""
    from watchllm_ext.middleware.recorder import Outbox

    settings = make_settings(tmp_path)
    wl = create_app(settings).state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))
    outbox = Outbox(interval_s=0.05)
    for i in range(3):
        outbox.put(prompt_call(f"w{i}"))

    async def main() -> None:
        assert await outbox.flush(wl, principal) is False  # not running: 503
        assert len(outbox) == 3 and outbox.stats["dropped"] == 0
        async with wl.running():
            assert await outbox.flush(wl, principal) is True
        assert len(outbox) == 0

    anyio.run(main)
    assert outbox.stats == {"ingested": 3, "rejected": 0, "dropped": 0, "late": 0}
    assert sorted(r["event_id"] for r in stored(settings)) == ["w0", "w1", "w2"]


def test_a_batch_watchllm_fails_on_is_counted_as_dropped_and_the_rest_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose ingest raises something other than a refusal (a `transform_events`
    plugin that raises; a deferred event that cannot be built) is counted in `dropped` and
    logged with the reason, not thrown away uncounted; it is not retried (it would fail the
    same way), and the batches after it are handed over."""
    from watchllm_ext.middleware.recorder import Outbox

    class Fails:
        @hookimpl
        def transform_events(self, events: list[Any], principal: Principal) -> None:
            if any(event.event_id.startswith("bad") for event in events):
                raise RuntimeError("transform boom")

    class Unbuildable:
        def event(self) -> dict[str, Any]:
            raise ValueError("cannot build this summary")

    settings = make_settings(tmp_path)
    wl = create_app(settings, plugins=[Fails()]).state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))
    outbox = Outbox(interval_s=0.05, batch_events=2)
    for event_id in ("ok0", "ok1", "bad2", "ok3", "ok4"):
        outbox.put(prompt_call(event_id))
    outbox.put(Unbuildable(), summary=True)

    async def main() -> None:
        async with wl.running():
            assert await outbox.flush(wl, principal) is True

    with caplog.at_level("ERROR", logger="watchllm.middleware"):
        anyio.run(main)
    assert len(outbox) == 0
    # [ok0, ok1] ingested, [bad2, ok3] failed, [ok4] ingested, [the summary] failed.
    assert outbox.stats == {"ingested": 3, "rejected": 0, "dropped": 3, "late": 0}
    assert "transform boom" in caplog.text and "cannot build this summary" in caplog.text
    assert sorted(r["event_id"] for r in stored(settings)) == ["ok0", "ok1", "ok4"]


def test_a_flush_hands_over_small_batches_and_lets_requests_run_between(tmp_path: Path) -> None:
    """However many events an interval gathered, a flush ingests `batch_events` at a time and
    the event loop runs other tasks between two batches (also where an ingest call never waits,
    as with durability = memory: no spool fsync to await): a host request waits for one small
    batch at most."""
    from watchllm_ext.middleware.recorder import Outbox

    ticks = 0
    seen: list[tuple[int, int]] = []  # (events in the batch, ticks when it was validated)

    class Batches:
        @hookimpl
        def transform_events(self, events: list[Any], principal: Principal) -> None:
            seen.append((len(events), ticks))

    settings = make_settings(tmp_path, durability="memory")
    wl = create_app(settings, plugins=[Batches()]).state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))
    outbox = Outbox(interval_s=1.0, batch_events=16)
    for i in range(70):
        outbox.put(prompt_call(f"b{i}"))

    async def main() -> None:
        async def ticker() -> None:  # stands for the host's requests
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0)

        async with wl.running(), anyio.create_task_group() as tasks:
            tasks.start_soon(ticker)
            await anyio.sleep(0)
            assert await outbox.flush(wl, principal) is True
            tasks.cancel_scope.cancel()

    anyio.run(main)
    assert [n for n, _ in seen] == [16, 16, 16, 16, 6]
    ticks_at = [at for _, at in seen]
    assert all(later > earlier for earlier, later in pairwise(ticks_at)), seen
    assert outbox.stats == {"ingested": 70, "rejected": 0, "dropped": 0, "late": 0}
    assert len(stored(settings)) == 70


def test_summaries_wait_in_the_outbox_out_of_the_garbage_collectors_scans(
    tmp_path: Path,
) -> None:
    """A summary waits for its flush as plain values the garbage collector does not track
    (the event's dicts would be scanned by every collection until the flush, and promoted to
    older generations): the host's requests leave the collector nothing to do. Built into
    the same event when handed over."""
    import gc

    from watchllm_ext.middleware.asgi import find_owner

    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    calls = Calls()
    host = fastapi_host(wl_app, calls, False, "/watchllm", flush_interval_s=60.0)
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        for i in range(5):
            assert client.get(f"/items/{i}", headers={"X-User-Id": "ann"}).status_code == 200
        for _ in range(20):
            assert client.get("/free").status_code == 200
        owner = find_owner(wl_app.state.watchllm)
        assert owner is not None
        waiting = [e for e in owner.outbox.waiting() if not isinstance(e, dict)]
        assert len(waiting) == 25  # one summary a request, none flushed yet (60 s)
        assert not any(gc.is_tracked(e) for e in waiting)
        del waiting
    steps = summaries(stored(settings))
    assert (
        sorted(s["step_name"] for s in steps) == ["GET /free"] * 20 + ["GET /items/{item_id}"] * 5
    )
    item = next(s for s in steps if s["step_name"] == "GET /items/{item_id}")
    assert item["user_id"] == "ann" and item["status"] == "success"
    assert item["metadata"]["llm.calls"] == 1 and item["metadata"]["llm.cost_usd"] == 0.004


def test_summaries_ride_with_recorded_events_or_wait_for_their_interval(tmp_path: Path) -> None:
    """A store insert has a large fixed cost, so the summaries of requests that recorded
    nothing do not make the writer insert every flush: they wait until a flush hands over
    recorded events (and join it), or until `summary_interval_s` has passed."""
    from watchllm_ext.middleware.asgi import find_owner

    settings = make_settings(tmp_path)
    wl_app = create_app(settings)
    wl = wl_app.state.watchllm
    calls = Calls()
    host = fastapi_host(
        wl_app, calls, False, "/watchllm", flush_interval_s=0.05, summary_interval_s=60.0
    )
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        owner = find_owner(wl)
        assert owner is not None
        outbox = owner.outbox
        for _ in range(3):
            assert client.get("/free").status_code == 200
        time.sleep(0.5)  # ten flushes: none of them for these summaries alone
        assert len(outbox) == 3 and outbox.stats["ingested"] == 0
        # A request that records a prompt call: its event, its summary and the three that
        # waited go with the next flush.
        assert client.get("/items/7").status_code == 200
        deadline = time.monotonic() + 10
        # The outbox empties when a flush takes the events; "ingested" counts them once
        # that flush's ingest has returned, a moment later.
        while (len(outbox) or outbox.stats["ingested"] < 5) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(outbox) == 0 and outbox.stats["ingested"] == 5
        # Past their interval, summaries go without anything else.
        outbox.summary_interval_s = 0.3
        assert client.get("/free").status_code == 200
        deadline = time.monotonic() + 10
        # The outbox empties when a flush takes the events; "ingested" counts them once
        # that flush's ingest has returned, a moment later.
        while (len(outbox) or outbox.stats["ingested"] < 6) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(outbox) == 0 and outbox.stats["ingested"] == 6
    steps = summaries(stored(settings))
    assert sorted(s["step_name"] for s in steps) == ["GET /free"] * 4 + ["GET /items/{item_id}"]


def test_summaries_go_at_once_when_many_wait() -> None:
    from watchllm_ext.middleware.recorder import Outbox

    outbox = Outbox(summary_interval_s=60.0, max_summaries=3)
    outbox.put({"event_id": "a"}, summary=True)
    outbox.put({"event_id": "b"}, summary=True)
    assert not outbox.summaries_due() and outbox.recorded == 0
    outbox.put({"event_id": "c"}, summary=True)
    assert outbox.summaries_due()
    other = Outbox(summary_interval_s=60.0)
    other.put({"event_id": "s"}, summary=True)
    assert not other.summaries_due()
    other.put({"event_id": "r"})  # a recorded event: the summary joins its flush
    assert other.summaries_due() and other.recorded == 1
    assert [e["event_id"] for e in other.waiting()] == ["r", "s"]  # type: ignore[index]


@EVERY_STORE
def test_budget_reads_the_settled_day_rarely_and_the_recent_part_each_time(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    """The day's spend is read whole (split at a cut `recent_s` back) once per
    `settled_read_s`; between those, only the calls from the cut on are read again. A call
    stored late with a timestamp before the cut counts from the next whole-day read."""
    from datetime import UTC, datetime, timedelta

    from watchllm_ext.middleware.budget import UserDailyBudget

    settings = make_settings(tmp_path, **store_backend.settings())
    wl = create_app(settings).state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))
    # "Now" for the reads and the calls' times: at least 2 h into the UTC day, so that every
    # call below is today whenever the test runs (a time ahead of the clock is fine here).
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    now = max(datetime.now(UTC), day + timedelta(hours=2))

    def call(event_id: str, user: str, usd: float, ago_s: float) -> dict[str, Any]:
        at = (now - timedelta(seconds=ago_s)).isoformat()
        return prompt_call(event_id, user_id=user, cost_estimate_usd=usd, timestamp=at)

    async def main() -> None:
        async with wl.running():
            budget = UserDailyBudget(wl, 1.0, cache_s=0, recent_s=300, settled_read_s=3600)

            async def stored(events: list[dict[str, Any]]) -> None:
                await wl.ingest(principal, events)
                with anyio.fail_after(30):
                    while wl.writer.lag_events():
                        await anyio.sleep(0.02)

            await stored([
                call("a-old", "ann", 0.25, 3000), call("a-new", "ann", 0.125, 60),
                call("b-new", "bob", 0.0625, 1),
            ])  # fmt: skip
            spends = await budget.spend_today("acme", now)
            assert spends == {"ann": 0.375, "bob": 0.0625} and budget.queries == 1
            # Spend after the cut is read at once; a call stored late before the cut waits.
            await stored([call("a-now", "ann", 0.5, 0), call("c-late", "cy", 0.25, 7000)])
            spends = await budget.spend_today("acme", now)
            assert spends == {"ann": 0.875, "bob": 0.0625} and budget.queries == 2
            budget.settled_read_s = 0  # the next read is a whole-day one
            spends = await budget.spend_today("acme", now)
            assert spends == {"ann": 0.875, "bob": 0.0625, "cy": 0.25}

    anyio.run(main)


def test_a_utf8_user_header_is_stored_as_the_sdk_stores_the_same_user(tmp_path: Path) -> None:
    """X-User-Id is read as UTF-8 (the bytes clients send for "é"), so the host's requests and
    the SDK's JSON events of one user share one user id; bytes that are not UTF-8 fall back
    to latin-1, one character a byte."""
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl_app = create_app(settings)
    host = starlette_host(wl_app, Calls(), False, "/watchllm", project_id="acme")
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        for user in ("é".encode(), "Zoë 🚀".encode(), b"caf\xe9"):
            r = client.get("/items/1", headers=[(b"X-User-Id", user)])
            assert r.status_code == 200, r.text
        ingest = client.post(
            "/watchllm/v1/events/batch",
            json={"events": [prompt_call("sdk-e", user_id="é")]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert ingest.status_code == 202, ingest.text
    rows = stored(settings)
    # (sorted: requests in one millisecond have one timestamp, and the rows' order among them
    # is the store's)
    assert sorted(s["user_id"] for s in summaries(rows)) == sorted(["é", "Zoë 🚀", "café"])
    (sdk_event,) = [row for row in rows if row["event_id"] == "sdk-e"]
    assert sdk_event["user_id"] == "é"


def test_a_budget_read_older_than_twice_its_cache_time_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under steady traffic a stale read decides while it is renewed in the background; after
    a quiet spell (older than twice cache_s) the request waits for a new read instead, so a
    user who went over the budget before the spell is refused by the first request after it.
    The budget's monotonic clock is the test's: how long the store takes on a busy host does
    not age the read (it did, past cache_s, in a full run on a loaded machine)."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from watchllm_ext.middleware import budget as budget_module
    from watchllm_ext.middleware.budget import UserDailyBudget
    from watchllm_ext.quota import QuotaDecision

    clock = SimpleNamespace(now=1_000.0)
    monkeypatch.setattr(
        budget_module, "time", SimpleNamespace(time=time.time, monotonic=lambda: clock.now)
    )

    settings = make_settings(tmp_path)
    wl = create_app(settings).state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))

    async def main() -> None:
        async with wl.running():
            budget = UserDailyBudget(wl, 0.01, cache_s=0.2)
            first = budget.check_quota(principal, 0, "carol")  # the day's first read: waits
            assert first is not None and not isinstance(first, QuotaDecision)
            assert (await first).allowed
            now = datetime.now(UTC).isoformat()
            carol = prompt_call("c1", user_id="carol", cost_estimate_usd=0.02, timestamp=now)
            await wl.ingest(principal, [carol])
            with anyio.fail_after(30):
                while wl.writer.lag_events():
                    await anyio.sleep(0.02)
            # Within cache_s: the read from before the call decides.
            assert budget.check_quota(principal, 0, "carol") is None
            clock.now += 0.5  # a quiet spell: the read is 2.5 x cache_s old
            decision = budget.check_quota(principal, 0, "carol")
            assert decision is not None and not isinstance(decision, QuotaDecision)
            decision = await decision  # it waited for a new read
            assert not decision.allowed and budget.queries == 2

    anyio.run(main)
