"""The dashboard on servers of their own (each test starts one): cookies behind TLS, the
session sealing, a host app's mount, and every page on each store.

Apart from tests/test_dashboard.py because chDB opens one data folder per process: these
run after that module's shared server has stopped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from conftest import ServerThread, make_settings
from stores import EVERY_STORE
from test_dashboard import Site, _session

from watchllm_ext.app import create_app
from watchllm_ext.dashboard.session import Sealer
from watchllm_ext.demo import build, send
from watchllm_ext.keys import KeyStore


def test_secure_cookie_behind_tls_and_sealer_refuses_tampering(tmp_path: Path) -> None:
    sealer = Sealer(b"s" * 32)
    sealed = sealer.seal({"k": "key"})
    assert sealer.unseal(sealed, 60) == {"k": "key"}
    assert Sealer(b"t" * 32).unseal(sealed, 60) is None  # another secret
    assert sealer.unseal(sealed, -1) is None  # too old
    assert sealer.unseal(sealed[:-2], 60) is None
    assert sealer.unsign(sealer.sign("abc")) == "abc" and sealer.unsign("abc.0") is None
    settings = make_settings(tmp_path, dashboard_secure_cookie="always")
    keys = KeyStore(settings.keys_path)
    key = keys.create("acme", scope="read")
    with (
        ServerThread(create_app(settings)) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        form = c.get("/dashboard/signin")
        assert "secure" in form.headers["set-cookie"].lower()
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        # httpx keeps Secure cookies off plain http, as a browser does: send it by hand.
        csrf_cookie = form.headers["set-cookie"].split(";")[0]
        r = c.post(
            "/dashboard/signin",
            data={"api_key": key, "csrf_token": token},
            headers={"Cookie": csrf_cookie},
        )
        assert r.status_code == 303
        assert "secure" in r.headers["set-cookie"].lower()


def test_served_under_a_host_apps_mount(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from watchllm_ext import lifespan

    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="admin")
    wl = create_app(settings)
    host = Starlette(routes=[Mount("/obs", app=wl)], lifespan=lifespan(wl))
    with ServerThread(host) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.get("/obs/")
        assert r.status_code == 303 and r.headers["location"] == "/obs/dashboard/"
        r = c.get("/obs/dashboard/")
        assert r.headers["location"].startswith("/obs/dashboard/signin")
        form = c.get("/obs/dashboard/signin")
        assert 'action="/obs/dashboard/signin"' in form.text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        r = c.post("/obs/dashboard/signin", data={"api_key": key, "csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == "/obs/dashboard/"
        page = c.get("/obs/dashboard/")
        assert page.status_code == 200
        assert 'href="/obs/dashboard/requests"' in page.text
        assert "/obs/dashboard/static/dashboard.css" in page.text
        assert c.get("/obs/dashboard/static/dashboard.css").status_code == 200
        # The empty state's command names the mounted URL.
        assert f"{server.url}/obs/v1/events/batch" in page.text


@EVERY_STORE
def test_every_page_reads_each_store(server_factory: Any) -> None:
    """The pages read through the analytics routes only: the same figures on each store."""
    server = server_factory()
    sample = build(300, seed=3)
    send(server.url, server.key, sample, say=lambda _: None)
    server.flush()
    site = Site(server.url, server.keys, server.key, "", "", "", "", "", sample.tool_run, None)
    with _session(site, server.key) as c:
        stats = site.api("/v1/analytics/stats", period="7d")
        page = c.get("/dashboard/?period=7d")
        assert page.status_code == 200
        assert f'data-card="Requests">{stats["total_requests"]:,}<' in page.text
        logs = site.api("/v1/analytics/logs", period="7d", limit=50)
        explorer = c.get("/dashboard/requests?period=7d").text
        assert re.findall(r'data-event="([^"]+)"', explorer) == [
            e["event_id"] for e in logs["events"]
        ]
        run = c.get(f"/dashboard/run/{sample.tool_run}")
        assert run.status_code == 200 and run.text.count('aria-level="2"') >= 1
        event_id = logs["events"][0]["event_id"]
        assert c.get(f"/dashboard/event/{event_id}").status_code == 200


def test_disabled_dashboard_leaves_the_root_alone(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, disable_plugins=["dashboard"])
    with (
        ServerThread(create_app(settings)) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        assert c.get("/").status_code == 404
        assert c.get("/dashboard/signin").status_code == 404
        assert c.get("/healthz").status_code == 200
