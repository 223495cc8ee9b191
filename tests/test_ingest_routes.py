"""The ingest routes' shortcut past Starlette's layers (ingest_lane.IngestLane) answers exactly
as Starlette's middleware, router and exception handlers do: the same requests, sent over real
HTTP to one server with the shortcut and one without it, get the same status, headers and
bytes, plugins see the same scope, and /metrics counts the same series."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerThread, make_settings, prompt_call
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount

from watchllm_ext import create_app, hookimpl, lifespan
from watchllm_ext.app import _Accepted, _encode_events, encoded_for_spool
from watchllm_ext.auth import Principal
from watchllm_ext.ingest import fast_validate
from watchllm_ext.ingest.body import IngestHeaders
from watchllm_ext.ingest.lane import LaneApp
from watchllm_ext.keys import KeyStore
from watchllm_ext.quota import QuotaDecision


class Probe:
    """A plugin that records the scope the authenticate hook sees and misbehaves on cue:
    run_id "boom" fails in a transform (a 500), "teapot" raises an HTTPException there,
    "greedy" is refused by the quota hook (a 429 with rate-limit headers)."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    @hookimpl(tryfirst=True)
    def authenticate(self, token: str, request: Request | None) -> Principal | None:
        if request is not None:
            scope = request.scope
            self.scopes.append(
                {
                    "keys": sorted(k for k in scope if k != "state"),
                    "path_params": scope.get("path_params"),
                    "route": getattr(scope.get("route"), "path", None),
                    "endpoint": getattr(scope.get("endpoint"), "__name__", None),
                    "router_is_the_apps": scope.get("router") is scope["app"].router,
                }
            )
        return None  # the key file decides

    @hookimpl
    def check_quota(self, principal: Principal, n_events: int) -> QuotaDecision | None:
        if n_events == 3:
            return QuotaDecision(
                False, retry_after_s=7, limit=2, remaining=0, reason="three is too many"
            )
        return None

    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        for event in events:
            if event.run_id == "boom":
                raise RuntimeError("a plugin failed")
            if event.run_id == "teapot":
                raise HTTPException(418, "a plugin's own HTTP error")


Headers = dict[str, str] | list[tuple[str, str]]


def requests(keys: dict[str, str]) -> Iterator[tuple[str, str, Headers, bytes]]:
    """(method, path, headers, body) of every kind of answer the ingest routes give."""
    auth = {"Authorization": f"Bearer {keys['admin']}", "Content-Type": "application/json"}

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    one = body(prompt_call("s1"))
    yield "POST", "/v1/projects/acme/events", auth, one  # 202
    yield "POST", "/v1/projects/acme/events", auth, body([prompt_call("s2"), prompt_call("s3")])
    yield "POST", "/v1/events/batch", auth, body({"events": [prompt_call("b1")]})
    bad = prompt_call("b3", tokens_input=-1)
    yield "POST", "/v1/events/batch", auth, body({"events": [prompt_call("b2"), bad]})  # 207
    yield "POST", "/v1/events/batch", auth, body({"events": [bad]})  # 422
    yield "POST", "/v1/events/batch", auth, body({"events": []})
    yield "POST", "/v1/events/batch", auth, body({"events": [prompt_call()], "extra": 1})
    yield "POST", "/v1/events/batch", auth, b'{"events": [1,'  # malformed JSON
    yield "POST", "/v1/events/batch", auth, b""
    yield "POST", "/v1/projects/acme/events", auth, b"42"
    yield "POST", "/v1/events/batch", {"Content-Type": "application/json"}, one  # 401
    yield "POST", "/v1/events/batch", {**auth, "Authorization": "Bearer wllm_nope"}, one
    yield "POST", "/v1/events/batch", {**auth, "Authorization": f"Bearer {keys['read']}"}, one
    yield "POST", "/v1/projects/other/events", auth, one  # 403: another project in the path
    yield "POST", "/v1/projects/acme/events", auth, body(prompt_call("x", project_id="other"))
    yield "POST", "/v1/events/batch", {**auth, "Content-Type": "text/plain"}, one  # 415
    twice = [*auth.items(), ("Authorization", auth["Authorization"])]
    yield "POST", "/v1/projects/acme/events", twice, one  # 400: two Authorization headers
    yield "POST", "/v1/events/batch", {**auth, "Content-Encoding": "br"}, one
    yield "POST", "/v1/events/batch", {**auth, "Content-Encoding": "gzip"}, b"not gzip"
    zipped = gzip.compress(body({"events": [prompt_call("z1")]}))
    yield "POST", "/v1/events/batch", {**auth, "Content-Encoding": "gzip"}, zipped
    yield "POST", "/v1/events/batch", auth, b" " * 5000  # 413 over max_body_bytes
    yield (
        "POST",
        "/v1/events/batch",
        {**auth, "Content-Encoding": "gzip"},
        gzip.compress(b" " * 9000),
    )
    three = [prompt_call(f"q{i}") for i in range(3)]
    yield "POST", "/v1/events/batch", auth, body({"events": three})  # 429 from the plugin
    yield "POST", "/v1/events/batch", auth, body({"events": [prompt_call("t", run_id="teapot")]})
    # 400: a path project id that is not one (shown cut at 64 characters)
    yield "POST", f"/v1/projects/{'a' * 5000}/events", auth, one
    yield "POST", "/v1/projects/ac$me/events", auth, one
    yield "POST", "/v1/projects/ac$me/events", {"Content-Type": "application/json"}, one  # 401
    other = prompt_call("o", project_id="other")
    yield "POST", "/v1/events/batch", auth, body({"events": [prompt_call("o1"), other]})  # 403
    utf16 = {**auth, "Content-Type": "application/json; charset=utf-16"}
    yield "POST", "/v1/events/batch", utf16, one  # 415
    # An integer literal longer than the parser reads: 422 naming the field (gzip: over 4 KiB)
    long = body({"events": [prompt_call("l", tokens_input=0)]})
    long = long.replace(b'"tokens_input": 0', b'"tokens_input": ' + b"9" * 5000)
    yield "POST", "/v1/events/batch", {**auth, "Content-Encoding": "gzip"}, gzip.compress(long)
    # Not the ingest routes' own: the router answers these, with or without the shortcut.
    yield "GET", "/v1/events/batch", auth, b""  # 405
    yield "PUT", "/v1/projects/acme/events", auth, one
    yield "POST", "/v1/events/batch/", auth, one  # 404: no redirect to the other spelling
    yield "POST", "/v1/projects//events", auth, one
    yield "POST", "/v1/projects/a/b/events", auth, one
    # uvicorn drops the connection after a 500: asked to close it, the client opens a new one.
    boom = body({"events": [prompt_call("e", run_id="boom")]})
    yield "POST", "/v1/events/batch", {**auth, "Connection": "close"}, boom


def answer(
    client: httpx.Client, method: str, path: str, headers: Headers, body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    r = client.request(method, path, headers=headers, content=body)
    # The servers differ in their port only: a redirect's location names it.
    origin = f"{client.base_url.scheme}://{client.base_url.netloc.decode()}"
    kept = [(k, v.replace(origin, "ORIGIN")) for k, v in r.headers.multi_items() if k != "date"]
    return r.status_code, kept, r.content


def duration_counts(client: httpx.Client) -> dict[tuple[str, ...], float]:
    text = client.get("/metrics").text
    return {
        tuple(s.labels.values()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("watchllm_http_request_duration_seconds_count", "watchllm_rejections_total")
    }


@pytest.mark.parametrize("mounted", [False, True], ids=["alone", "mounted"])
def test_the_shortcut_answers_byte_for_byte_as_starlette(tmp_path: Path, mounted: bool) -> None:
    with ExitStack() as stack:
        servers = []
        for shortcut in (True, False):
            folder = tmp_path / ("with" if shortcut else "without")
            settings = make_settings(folder, max_body_bytes=4096, max_decompressed_bytes=8192)
            keys = KeyStore(settings.keys_path)
            made = {
                "admin": keys.create("acme", scope="admin"),
                "read": keys.create("acme", scope="read"),
            }
            probe = Probe()
            # No store (its plugin comes by entry point): chDB opens one folder per process, and
            # the answers compared here are given before any store sees the events.
            app = create_app(settings, plugins=(probe,), entry_points=False)
            assert isinstance(app, LaneApp) and app.lane is not None  # Sentry is off
            if not shortcut:
                app.set_lane(None)
            served: Any = app
            if mounted:
                served = Starlette(lifespan=lifespan(app), routes=[Mount("/obs", app)])
            thread = stack.enter_context(ServerThread(served))
            client = stack.enter_context(
                httpx.Client(base_url=thread.url + ("/obs" if mounted else ""), timeout=30)
            )
            servers.append((client, made, probe))

        (fast, fast_keys, fast_probe), (slow, slow_keys, slow_probe) = servers
        seen = []
        for (method, path, f_headers, body), (_, _, s_headers, _) in zip(
            requests(fast_keys), requests(slow_keys), strict=True
        ):
            got = answer(fast, method, path, f_headers, body)
            want = answer(slow, method, path, s_headers, body)
            assert got == want, (method, path, body[:80])
            seen.append(got[0])
        # Every kind of answer was exercised (the request list is what it says it is).
        assert {202, 207, 400, 401, 403, 404, 405, 413, 415, 418, 422, 429, 500} <= set(seen)
        assert fast_probe.scopes == slow_probe.scopes
        assert any(s["endpoint"] == "project_events" for s in fast_probe.scopes)
        assert all(s["router_is_the_apps"] != mounted for s in fast_probe.scopes)
        assert duration_counts(fast) == duration_counts(slow)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [(b"host", b"x"), (b"authorization", b"Bearer k"), (b"content-type", b"application/json")],
        [(b"content-type", b"application/json"), (b"content-type", b"text/plain")],
        [(b"content-length", b"12"), (b"content-encoding", b"gzip"), (b"content-length", b"9")],
        [(b"authorization", b"Bearer \xe9t\xe9"), (b"content-encoding", b"")],
        [(b"x-authorization", b"no"), (b"content-types", b"no"), (b"authorization", b"yes")],
    ],
)
def test_ingest_headers_are_what_request_headers_get_gives(raw: list[tuple[bytes, bytes]]) -> None:
    request = Request({"type": "http", "headers": raw})
    found = IngestHeaders.of(request)
    for name in ("authorization", "content-type", "content-length", "content-encoding"):
        assert getattr(found, name.replace("-", "_")) == request.headers.get(name)


def test_a_client_that_leaves_mid_body_leaves_nothing_behind(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="admin")
    app = create_app(settings, entry_points=False)
    body = json.dumps(prompt_call("half")).encode()
    with ServerThread(app) as thread:
        with socket.create_connection(("127.0.0.1", thread.port)) as sock:
            head = (
                f"POST /v1/projects/acme/events HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:40])
            time.sleep(0.2)  # the server is waiting for the rest
        time.sleep(0.2)  # and sees the connection go
        with httpx.Client(base_url=thread.url) as client:
            r = client.post(
                "/v1/projects/acme/events",
                content=json.dumps(prompt_call("whole")).encode(),
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 202, r.text
        assert app.state.watchllm.writer.accepted_events_total == 1


def test_events_encoded_ahead_give_the_spool_the_bytes_it_would_make() -> None:
    events = [
        fast_validate.decode_event(json.dumps(prompt_call(f"p{i}")).encode()) for i in range(5)
    ]
    ahead = encoded_for_spool(events)
    assert list(ahead) == events
    assert _encode_events(ahead) == _encode_events(events) == fast_validate.encode_events(events)


@pytest.mark.parametrize("body", [b"{}", b'{"project_id":"acme","accepted":1,"event_ids":["e1"]}'])
def test_a_202_sends_what_starlettes_json_response_sends(body: bytes) -> None:
    # The 202 sets its headers itself (app._Accepted): they are the ones Starlette works out.
    ours, theirs = _Accepted(body), Response(body, status_code=202, media_type="application/json")
    assert (ours.status_code, ours.raw_headers, ours.body, ours.background) == (
        theirs.status_code,
        theirs.raw_headers,
        theirs.body,
        theirs.background,
    )


def test_middleware_a_host_adds_to_the_app_sees_the_ingest_routes_too(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="admin")
    app = create_app(settings, entry_points=False)
    seen: list[str] = []

    class Recorder:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await self.app(scope, receive, send)

    app.add_middleware(Recorder)  # the lane steps aside: this must see every request
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url) as client:
        r = client.post(
            "/v1/projects/acme/events",
            json=prompt_call("seen"),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 202, r.text
    assert "/v1/projects/acme/events" in seen


# docs/API.md's answer table: each 422 row, by its `error` code.
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def _doc_422_rows() -> dict[str, str]:
    rows = [line for line in API_DOC.read_text().splitlines() if line.startswith("| 422 |")]
    return {line.split('"error": "')[1].split('"')[0]: line for line in rows}


@pytest.mark.parametrize(
    ("path", "body", "code", "field"),
    [
        ("/v1/events/batch", "[]", "bad_body", "body"),
        ("/v1/events/batch", '{"events": [], "x": 1}', "bad_body", "x"),
        ("/v1/events/batch", '{"events": {}}', "bad_body", "events"),
        ("/v1/events/batch", '{"events": []}', "empty_batch", "events"),
        ("/v1/events/batch", '{"events": [1]}', "validation_failed", None),
        ("/v1/projects/acme/events", "[]", "empty_batch", "body"),
        ("/v1/projects/acme/events", '"s"', "bad_body", "body"),
        ("/v1/projects/acme/events", '{"events": []}', "validation_failed", None),
    ],
)
def test_the_422s_are_the_ones_api_md_lists(
    server: Any, path: str, body: str, code: str, field: str | None
) -> None:
    """Each 422 the ingest routes answer is in API.md's table under its own code (the table
    once named validation_failed for an empty array and a wrong shape)."""
    headers = {**server.headers(), "Content-Type": "application/json"}
    r = server.client.post(path, content=body, headers=headers)
    assert (r.status_code, r.json()["error"], r.json().get("field")) == (422, code, field), r.text
    assert code in _doc_422_rows(), f"docs/API.md has no 422 row for {code!r}"


def test_a_batch_sent_where_one_event_goes_says_where_batches_go(server: Any) -> None:
    """Its rejection named only the missing event_type; the field it holds, `events`, and the
    route batches go to are said first. An event of the batch route is refused as ever."""
    body = {"events": [prompt_call("b1", project_id=None)]}
    r = server.client.post("/v1/projects/acme/events", json=body, headers=server.headers())
    assert (r.status_code, r.json()["error"]) == (422, "validation_failed"), r.text
    first, second = r.json()["rejected"][0]["errors"]
    assert first == {
        "field": "events",
        "message": 'not an event field: a batch {"events": [...]} goes to POST'
        " /v1/events/batch; this route takes one event, or a JSON array of events",
    }
    assert second["field"] == "event_type"
    nested = {"events": [{"events": []}]}
    r = server.client.post("/v1/events/batch", json=nested, headers=server.headers())
    assert r.status_code == 422
    assert r.json()["rejected"][0]["errors"][0]["field"] == "event_type"
