"""The dashboard's limits on what a client sends, over real HTTP against the server `watchllm
serve` runs (uvicorn with serving.uvicorn_options) on loopback: form bodies over
MAX_FORM_BYTES are refused with 413 naming the form (by Content-Length, or counted as they
arrive when chunked), never cut and used; an `api_key` longer than any key is refused naming
api_key; an unknown static file is the API's JSON 404, with nosniff and the name bounded.

Apart from tests/test_dashboard.py (no seeded data, no browser); a server of its own, which
chDB allows after that module's shared server has stopped (one data folder per process).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import uvicorn
from conftest import free_port, make_settings

from watchllm_ext.app import create_app
from watchllm_ext.dashboard import views
from watchllm_ext.dashboard.views import (
    MAX_API_KEY_CHARS,
    MAX_ECHO_CHARS,
    MAX_FORM_BYTES,
    PAGE_SHOWN_CHARS,
    PAYLOAD_SHOWN_CHARS,
)
from watchllm_ext.keys import KeyStore
from watchllm_ext.serving.protocol import uvicorn_options

KIB = 1024
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
CUT = re.compile(r"([\d,]+) more characters not shown here")


@dataclass
class Served:
    url: str
    port: int
    reader: str  # acme, read scope
    admin: str  # acme, admin scope (sends events)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("dashboard-limits"),
        port=free_port(),
        log_level="warning",
        access_log="off",
    )
    keys = KeyStore(settings.keys_path)
    reader = keys.create("acme", scope="read")
    admin = keys.create("acme", scope="admin")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{settings.port}", settings.port, reader, admin)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _signin_form(client: httpx.Client) -> str:
    """The CSRF token of a fresh sign-in form (its cookie is in the client)."""
    found = CSRF.search(client.get("/dashboard/signin").text)
    assert found
    return found.group(1)


def _cookie_header(client: httpx.Client) -> bytes:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items()).encode()


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer's status, headers (lower-case names) and body (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before an answer: {data!r}"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, "closed in the middle of the answer"
        body += piece
    return int(lines[0].split()[1]), headers, body[:length]


def _head(path: str, cookie: bytes, framing: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\n".encode()
        + b"Content-Type: application/x-www-form-urlencoded\r\nCookie: "
        + cookie
        + b"\r\n"
        + framing
        + b"\r\n\r\n"
    )


def _post_streamed(
    served: Served, path: str, cookie: bytes, first: bytes, piece: bytes, limit: int
) -> tuple[int, dict[str, str], bytes, int]:
    """POST `first` then `piece` again and again, chunked (no Content-Length), until the
    server answers or `limit` bytes are sent: the answer and the bytes sent before it."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(_head(path, cookie, b"Transfer-Encoding: chunked"))
        waiting = selectors.DefaultSelector()
        waiting.register(sock, selectors.EVENT_READ)
        sent = 0
        try:
            for body in (first, *([piece] * (limit // len(piece)))):
                sock.sendall(f"{len(body):x}\r\n".encode() + body + b"\r\n")
                sent += len(body)
                if waiting.select(timeout=0.01):  # (epoll: select() fails past fd 1024)
                    break
        finally:
            waiting.close()
        status, headers, answer = _answer(sock)
        return status, headers, answer, sent


# --- sign-in ---------------------------------------------------------------------------------


def test_a_long_api_key_before_the_token_is_a_413_naming_the_form_not_a_csrf_error(
    served: Served,
) -> None:
    # The probe's form: 100,000 characters of api_key, the valid token after them. Cut at the
    # limit, the token was lost and the answer said the form had expired.
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        body = urlencode({"api_key": "k" * 100_000, "csrf_token": token})
        r = c.post(
            "/dashboard/signin",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("text/html")  # the dashboard's own page
        assert r.headers["x-content-type-options"] == "nosniff"
        assert 'data-field="body"' in r.text
        assert f"body: the sign-in form is larger than the limit of {MAX_FORM_BYTES:,} bytes" in (
            r.text
        )
        assert "csrf_token: the form expired" not in r.text
        assert "watchllm_session" not in c.cookies
        # The page is a fresh form: signing in from it works.
        fresh = CSRF.search(r.text)
        assert fresh
        r = c.post(
            "/dashboard/signin", data={"api_key": served.reader, "csrf_token": fresh.group(1)}
        )
        assert r.status_code == 303, r.text


def test_a_sign_in_body_over_the_limit_by_content_length_is_refused_before_it_is_read(
    served: Served,
) -> None:
    # The probe's 50 MB form with the token (and a valid key) first: it signed in. Now the
    # declared length alone refuses it; the client need not send the rest.
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        start = urlencode({"csrf_token": token, "api_key": served.reader}).encode() + b"&pad="
        declared = 50 * 1024 * KIB
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
            head = _head(
                "/dashboard/signin", _cookie_header(c), f"Content-Length: {declared}".encode()
            )
            sock.sendall(head + start + b"x" * (64 * KIB))  # about 0.1% of it
            status, headers, answer = _answer(sock)
    assert status == 413, answer[:500]
    text = answer.decode()
    assert 'data-field="body"' in text and "sign-in form is larger than the limit" in text
    assert "watchllm_session=" not in headers.get("set-cookie", "")


def test_a_chunked_sign_in_body_is_refused_once_it_passes_the_limit(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        start = urlencode({"csrf_token": token, "api_key": served.reader}).encode() + b"&pad="
        status, headers, answer, sent = _post_streamed(
            served, "/dashboard/signin", _cookie_header(c), start, b"x" * (4 * KIB), 64 * 1024 * KIB
        )
    assert status == 413, answer[:500]
    assert "sign-in form is larger than the limit" in answer.decode()
    assert "watchllm_session=" not in headers.get("set-cookie", "")
    # Answered at about the limit, not at the end of the 64 MiB (socket buffers aside).
    assert sent < 8 * 1024 * KIB, sent


def test_a_form_at_the_limit_is_read_whole(served: Served) -> None:
    # Padding up to the limit exactly, the token last: the form is read, not refused.
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        end = urlencode({"api_key": served.reader, "csrf_token": token})
        pad = "pad=" + "x" * (MAX_FORM_BYTES - len(end) - len("pad=&"))
        body = f"{pad}&{end}"
        assert len(body) == MAX_FORM_BYTES
        r = c.post(
            "/dashboard/signin",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 303, r.text


def test_an_api_key_longer_than_any_key_is_refused_naming_api_key(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        r = c.post("/dashboard/signin", data={"api_key": "k" * 1000, "csrf_token": token})
        assert r.status_code == 400, r.text
        assert "api_key: 1,000 characters is longer than any API key" in r.text
        assert f"at most {MAX_API_KEY_CHARS}" in r.text
        assert 'data-field="api_key"' in r.text and 'aria-invalid="true"' in r.text
        assert "watchllm_session" not in c.cookies
        # At the bound, a key is asked of the key store as any other: not valid, 401.
        token = _signin_form(c)
        r = c.post(
            "/dashboard/signin", data={"api_key": "k" * MAX_API_KEY_CHARS, "csrf_token": token}
        )
        assert r.status_code == 401, r.text
        assert "api_key: this key is not valid" in r.text


def test_a_form_that_is_not_utf8_is_a_400_naming_the_body(served: Served) -> None:
    # It was read as an empty form, and answered as a missing CSRF token.
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        r = c.post(
            "/dashboard/signin",
            content=b"api_key=\xff\xfe&" + urlencode({"csrf_token": token}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400, r.text
        assert "body: the sign-in form is not URL-encoded UTF-8" in r.text
        assert 'data-field="body"' in r.text and "csrf_token" not in r.text.split("<form")[0]


# --- sign-out ----------------------------------------------------------------------------------


@contextmanager
def _signed_in(served: Served) -> Iterator[tuple[httpx.Client, str]]:
    """A client signed in through the form, and the session's sign-out token."""
    with httpx.Client(base_url=served.url, timeout=60) as c:
        token = _signin_form(c)
        r = c.post("/dashboard/signin", data={"api_key": served.reader, "csrf_token": token})
        assert r.status_code == 303, r.text
        page = c.get("/dashboard/runs")
        found = CSRF.search(page.text)
        assert page.status_code == 200 and found, page.text
        yield c, found.group(1)


def test_a_sign_out_body_over_the_limit_is_refused_and_the_session_stays(served: Served) -> None:
    with _signed_in(served) as (c, token):
        # Token first, then more than the limit: it signed out after the cut.
        body = urlencode({"csrf_token": token, "pad": "x" * (2 * MAX_FORM_BYTES)})
        r = c.post(
            "/dashboard/signout",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 413, r.text
        assert "body: the sign-out form is larger than the limit" in r.text
        assert "<code>body</code>" in r.text  # the problem page names the field
        assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/dashboard/runs").status_code == 200  # still signed in
        # Chunked, no Content-Length: the same, counted as it arrives.
        status, _, answer, sent = _post_streamed(
            served,
            "/dashboard/signout",
            _cookie_header(c),
            urlencode({"csrf_token": token}).encode() + b"&pad=",
            b"x" * (4 * KIB),
            64 * 1024 * KIB,
        )
        assert status == 413, answer[:500]
        assert "sign-out form is larger than the limit" in answer.decode()
        assert sent < 8 * 1024 * KIB, sent
        assert c.get("/dashboard/runs").status_code == 200
        # A form of the right size signs out.
        r = c.post("/dashboard/signout", data={"csrf_token": token})
        assert r.status_code == 303 and "why=out" in r.headers["location"]


# --- static files ------------------------------------------------------------------------------


def test_an_unknown_static_file_is_the_apis_json_404_with_nosniff(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.get("/dashboard/static/dashboard.js%00")
        assert r.status_code == 404, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-content-type-options"] == "nosniff"
        body = r.json()
        assert body["error"] == "not_found" and body["field"] == "name"
        assert "'dashboard.js\\x00'" in body["message"]  # escaped, never the raw byte
        assert "\x00" not in r.text
        # The shape of the API's other 404s.
        other = c.get("/v1/no-such-route")
        assert other.status_code == 404 and other.json()["error"] == "not_found"
        assert set(other.json()) <= set(body)

        # A long name with control characters: at most MAX_ECHO_CHARS of it, escaped.
        name = "\x1b[31m" + "a" * 5000
        r = c.get("/dashboard/static/" + quote(name))
        assert r.status_code == 404 and r.headers["x-content-type-options"] == "nosniff"
        message = r.json()["message"]
        assert "\x1b" not in message and "\\x1b[31m" in message
        assert "a" * MAX_ECHO_CHARS not in message and "..." in message
        assert len(message) < MAX_ECHO_CHARS * 4 + 200

        # The real files are still served, each as its type.
        for known, kind in (
            ("dashboard.css", "text/css"),
            ("dashboard.js", "text/javascript"),
            ("palette.css", "text/css"),
            ("favicon.svg", "image/svg+xml"),
        ):
            ok = c.get(f"/dashboard/static/{known}")
            assert ok.status_code == 200 and ok.headers["x-content-type-options"] == "nosniff"
            assert ok.headers["content-type"].startswith(kind), known


def test_pages_name_their_icon_so_browsers_do_not_ask_for_favicon_ico(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        page = c.get("/dashboard/signin")
    assert '<link rel="icon" href="/dashboard/static/favicon.svg"' in page.text


# --- what a page shows of a big event ---------------------------------------------------------


def test_a_huge_events_page_shows_a_bounded_share_and_says_what_it_cuts(served: Served) -> None:
    """Twelve tool calls of a megabyte each and a megabyte of prompt (gzip makes that a few
    KB on the wire): the page shows at most PAYLOAD_SHOWN_CHARS of each payload and
    PAGE_SHOWN_CHARS of all (plus the whole-event JSON's own PAYLOAD_SHOWN_CHARS), says how
    much it leaves out, and the server answers other requests as usual afterwards. Before,
    the page was every payload, escaped, twice: hundreds of megabytes built on the event loop."""
    mb = "<" * 1_000_000  # escaped as &lt;: four times the bytes in HTML
    event = {
        "event_type": "prompt_call",
        "event_id": "huge-page-1",
        "run_id": "huge-run",
        "model": "gpt-4o",
        "prompt": mb,
        "tool_calls": [
            {"tool_name": f"tool-{i}", "tool_input": mb, "status": "success"} for i in range(12)
        ],
    }
    ingest_key = served.admin
    body = gzip.compress(json.dumps({"events": [event]}).encode())
    r = httpx.post(
        f"{served.url}/v1/events/batch",
        content=body,
        headers={
            "Authorization": f"Bearer {ingest_key}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
        timeout=60,
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    auth = {"Authorization": f"Bearer {served.reader}"}
    while (
        httpx.get(f"{served.url}/v1/analytics/event/huge-page-1", headers=auth).status_code != 200
    ):
        assert time.monotonic() < deadline, "the event did not reach the store"
        time.sleep(0.1)
    with _signed_in(served) as (client, _):
        page = client.get("/dashboard/event/huge-page-1")
        assert page.status_code == 200
        shown = PAGE_SHOWN_CHARS + PAYLOAD_SHOWN_CHARS
        # Every shown "<" is four bytes of HTML; the rest of the page is small.
        assert len(page.content) < 4 * shown + 200_000, len(page.content)
        cuts = [int(n.replace(",", "")) for n in CUT.findall(page.text)]
        # The prompt and the tool inputs: 13 payloads of 1,000,000 characters.
        assert PAGE_SHOWN_CHARS < 13 * PAYLOAD_SHOWN_CHARS  # so both limits are met here
        assert sum(cuts[:-1]) == 13_000_000 - PAGE_SHOWN_CHARS, str(cuts)
        assert cuts[0] == 1_000_000 - PAYLOAD_SHOWN_CHARS
        assert "GET /v1/analytics/event/{event_id}" in page.text
        assert client.get("/healthz").status_code == 200


def test_sign_in_never_returns_to_a_page_outside_the_dashboard_by_dot_segments(
    served: Served,
) -> None:
    for next_page in (
        "/dashboard/../../evil",
        "/dashboard/%2e%2e/evil",
        "/dashboard/%2E%2E/%2e%2E/evil?x=1",
        "/dashboard/./../evil",
        "/dashboard/..",
    ):
        with httpx.Client(base_url=served.url, timeout=60) as c:
            form = c.get("/dashboard/signin", params={"next": next_page})
            token = CSRF.search(form.text)
            assert token
            data = {"api_key": served.reader, "csrf_token": token.group(1), "next": next_page}
            r = c.post("/dashboard/signin", data=data)
            assert r.status_code == 303, next_page
            assert "evil" not in r.headers["location"] and ".." not in r.headers["location"]
    # A page of the dashboard is still returned to.
    with httpx.Client(base_url=served.url, timeout=60) as c:
        form = c.get("/dashboard/signin", params={"next": "/dashboard/runs?period=7d"})
        token = CSRF.search(form.text)
        assert token
        data = {
            "api_key": served.reader,
            "csrf_token": token.group(1),
            "next": "/dashboard/runs?period=7d",
        }
        r = c.post("/dashboard/signin", data=data)
        assert r.headers["location"] == "/dashboard/runs?period=7d"


def test_chat_messages_share_their_payloads_allowance(served: Served) -> None:
    """Three messages of 60,000 characters: the prompt shows PAYLOAD_SHOWN_CHARS of them in
    all (the first whole, the second cut, the third left out), not that much of each."""
    event = {
        "event_type": "prompt_call",
        "event_id": "chat-page-1",
        "run_id": "chat-run",
        "model": "gpt-4o",
        "prompt": [{"role": "user", "content": "m" * 60_000} for _ in range(3)],
    }
    auth = {"Authorization": f"Bearer {served.admin}"}
    r = httpx.post(f"{served.url}/v1/events/batch", json={"events": [event]}, headers=auth)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while (
        httpx.get(f"{served.url}/v1/analytics/event/chat-page-1", headers=auth).status_code != 200
    ):
        assert time.monotonic() < deadline, "the event did not reach the store"
        time.sleep(0.1)
    with _signed_in(served) as (client, _):
        page = client.get("/dashboard/event/chat-page-1").text
    prompt = page[page.index('id="prompt"') : page.index('id="all-title"')]
    shown = [len(text) for text in re.findall(r"<pre>(m*)</pre>", prompt)]
    assert shown == [60_000, PAYLOAD_SHOWN_CHARS - 60_000]
    cuts = [int(n.replace(",", "")) for n in CUT.findall(prompt)]
    assert cuts == [180_000 - PAYLOAD_SHOWN_CHARS]


# --- pages whose work grows with the data: off the event loop ---------------------------------


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_the_run_and_event_pages_are_built_off_the_event_loop(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's waterfall and page (up to 10,000 nodes: megabytes of HTML, seconds of work)
    and an event's page are built on a worker thread, not on the event loop that answers
    /healthz and every other request."""
    built: list[tuple[str, bool]] = []
    build_rows, render = views.waterfall, views.Dashboard._render

    def recorded_waterfall(tree: list[dict[str, Any]]) -> list[views.Row]:
        built.append(("waterfall", _on_event_loop()))
        return build_rows(tree)

    def recorded_render(self: views.Dashboard, request: Any, name: str, **kw: Any) -> Any:
        built.append((name, _on_event_loop()))
        return render(self, request, name, **kw)

    monkeypatch.setattr(views, "waterfall", recorded_waterfall)
    monkeypatch.setattr(views.Dashboard, "_render", recorded_render)
    events = [
        {"event_type": "prompt_call", "event_id": f"loop-{i}", "run_id": "loop-run", "model": "m"}
        for i in range(3)
    ]
    auth = {"Authorization": f"Bearer {served.admin}"}
    r = httpx.post(f"{served.url}/v1/events/batch", json={"events": events}, headers=auth)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while httpx.get(f"{served.url}/v1/analytics/runs/loop-run", headers=auth).json().get(
        "run", {}
    ).get("event_count") != len(events):
        assert time.monotonic() < deadline, "the events did not reach the store"
        time.sleep(0.1)
    with _signed_in(served) as (client, _):
        built.clear()
        assert client.get("/dashboard/run/loop-run").status_code == 200
        assert client.get("/dashboard/event/loop-1").status_code == 200
    assert built == [("waterfall", False), ("run.html", False), ("event.html", False)]
