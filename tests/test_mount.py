"""WatchLLM mounted under a prefix in a host FastAPI / Starlette app, with the host's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import ServerThread, make_settings, prompt_call
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from watchllm_ext import create_app, lifespan
from watchllm_ext.keys import KeyStore


def test_mounted_in_fastapi_with_lifespan(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="admin")
    wl = create_app(settings)
    host_events: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: Any) -> AsyncIterator[None]:
        host_events.append("start")
        yield
        host_events.append("stop")

    host = FastAPI(lifespan=lifespan(wl, host_lifespan=host_lifespan))

    @host.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.mount("/watchllm", wl)
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/hello").json() == {"hello": "world"}
        r = client.post(
            "/watchllm/v1/projects/acme/events",
            json=prompt_call("m1"),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 202, r.text
        assert client.get("/watchllm/readyz").json()["status"] == "ready"
        assert host_events == ["start"]
    # The host's shutdown flushed the writer: the event is in the store after stop.
    assert host_events == ["start", "stop"]
    wl2 = create_app(settings)
    store = wl2.state.watchllm.open_store()
    try:
        assert store.query("SELECT event_id FROM events") == [{"event_id": "m1"}]
    finally:
        store.close()


def test_mounted_in_starlette_without_lifespan_says_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="admin")
    wl = create_app(settings)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host")

    host = Starlette(routes=[Route("/", home), Mount("/obs", app=wl)])
    with ServerThread(host) as server, httpx.Client(base_url=server.url) as client:
        r = client.post(
            "/obs/v1/projects/acme/events",
            json=prompt_call(),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 503
        assert "lifespan" in r.json()["message"] and r.headers["Retry-After"]
        assert client.get("/obs/readyz").status_code == 503
        assert client.get("/").text == "host"


def test_in_process_ingest_goes_through_the_same_checks(tmp_path: Path) -> None:
    """`WatchLLM.ingest` (the SDK's, middleware's and OTel exporter's way in) validates,
    spools and answers like POST /v1/events/batch, with no HTTP hop."""
    import anyio

    from watchllm_ext.auth import Principal
    from watchllm_ext.errors import Problem

    settings = make_settings(tmp_path)
    app = create_app(settings)
    wl = app.state.watchllm
    principal = Principal("acme", frozenset({"ingest"}))

    async def main() -> tuple[dict[str, Any], dict[str, Any], Problem, Problem]:
        async with wl.running():
            ok = await wl.ingest(principal, [prompt_call("p1")])
            bad = dict(prompt_call("p2"), latency_ms=-1)
            mixed = await wl.ingest(principal, [prompt_call("p3"), bad])
            try:
                await wl.ingest(principal, [bad])
            except Problem as exc:
                none_valid = exc
            try:
                await wl.ingest(principal, [dict(prompt_call("p4"), project_id="other")])
            except Problem as exc:
                other = exc
            return ok, mixed, none_valid, other

    ok, mixed, none_valid, other = anyio.run(main)
    assert ok["accepted"] == 1 and ok["event_ids"] == ["p1"] and "rejected" not in ok
    assert mixed["accepted"] == 1 and mixed["rejected"][0]["index"] == 1
    assert "latency_ms" in str(mixed["rejected"][0])
    assert none_valid.status == 422 and none_valid.code == "validation_failed"
    assert other.status == 403 and other.field == "[0].project_id"
    store = create_app(settings).state.watchllm.open_store()
    try:
        ids = {r["event_id"] for r in store.query("SELECT event_id FROM events")}
        assert ids == {"p1", "p3"}
    finally:
        store.close()


def test_a_running_app_takes_events_from_other_threads_by_key(tmp_path: Path) -> None:
    """A running app registers itself (sdk.context.local_apps) and takes events from an SDK
    worker thread with an API key: the key's project, its scope, the batch route's answer."""
    import threading

    import anyio

    from watchllm_ext.errors import Problem
    from watchllm_ext.sdk.context import local_apps

    settings = make_settings(tmp_path)
    store = KeyStore(settings.keys_path)
    key = store.create("acme", scope="ingest")
    reader = store.create("acme", scope="read")
    app = create_app(settings)
    wl = app.state.watchllm
    answers: dict[str, Any] = {}

    def worker() -> None:
        (local,) = local_apps()
        answers["ok"] = local.ingest_from_thread(key, [prompt_call("t1")], 5.0)
        for name, token in (("unknown", "wl_nope"), ("read", reader)):
            try:
                local.ingest_from_thread(token, [prompt_call("t2")], 5.0)
            except Problem as exc:
                answers[name] = exc.status

    async def main() -> None:
        async with wl.running():
            thread = threading.Thread(target=worker)
            thread.start()
            await anyio.to_thread.run_sync(thread.join)
        assert local_apps() == []

    assert local_apps() == []
    anyio.run(main)
    assert answers == {"ok": answers["ok"], "unknown": 401, "read": 403}
    assert answers["ok"]["event_ids"] == ["t1"] and answers["ok"]["project_id"] == "acme"
