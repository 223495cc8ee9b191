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
