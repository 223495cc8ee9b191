"""The ingest routes' answers to what an attacker's probe sent, over real HTTP into a real
server: the key is asked for first on every ingest route (the OTLP receiver too); a batch
names an event's forbidden project_id by its path in the body (events[1].project_id); a JSON
body declared in a charset other than UTF-8 is refused (415); a path project id that is not a
project id is a 400 naming `project_id` and showing a bounded value; and an integer literal
longer than the JSON parser reads (4,301 characters and up) gets the 422 naming its field
that a 4,300-digit one gets, not a 400 for the whole body (small and big bodies, with and
without the worker processes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Running, prompt_call
from test_otel_workers import wait_for_a_worker

from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.otel import pool

PROJECT = "/v1/projects/acme/events"
BATCH = "/v1/events/batch"
TRACES = ("/v1/traces", "/api/public/otel/v1/traces")
EVENT_ROUTES = (PROJECT, BATCH)
OTLP_JSON = json.dumps({"resourceSpans": []}).encode()


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "START_RETRY_S", 0.2)


def post(
    running: Running, path: str, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return running.client.post(path, content=body, headers=headers or {})


def keyed(running: Running, **more: str) -> dict[str, str]:
    return {**running.headers(), "Content-Type": "application/json", **more}


def batch(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


# --- 1. the key first, on every ingest route ----------------------------------------------------


def unkeyed_probes() -> Iterator[tuple[str, dict[str, str], bytes]]:
    """(what, headers, body): requests wrong in something other than their key."""
    one = json.dumps(prompt_call("probe")).encode()
    yield "text/plain", {"Content-Type": "text/plain"}, one
    yield "utf-16", {"Content-Type": "application/json; charset=utf-16"}, one
    yield "xml", {"Content-Type": "application/xml"}, one
    yield "br", {"Content-Type": "application/json", "Content-Encoding": "br"}, one
    yield "bad gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"no"
    yield "malformed", {"Content-Type": "application/json"}, b'{"events": [1,'
    yield "too large", {"Content-Type": "application/json"}, b" " * 5000


def test_every_ingest_route_asks_for_the_key_first(server_factory: Any) -> None:
    running = server_factory(max_body_bytes=4096)
    read_key = running.keys.create("acme", scope="read")
    for path in (*EVENT_ROUTES, *TRACES):
        for what, headers, body in unkeyed_probes():
            r = post(running, path, body, headers)
            assert r.status_code == 401, (path, what, r.status_code, r.text)
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="watchllm"', (path, what)
            assert "Authorization" in r.json().get("field", r.json().get("message")), r.text
            wrong = {**headers, "Authorization": "Bearer wllm_000000000000_not-a-key"}
            assert post(running, path, body, wrong).status_code == 401, (path, what)
            # A key without the ingest scope: 403 about the key, not about the request.
            r = post(running, path, body, {**headers, "Authorization": f"Bearer {read_key}"})
            assert r.status_code == 403, (path, what, r.status_code, r.text)
            assert "'ingest' scope" in r.text, (path, what, r.text)
    # With the key, the request's own problem is the answer, as before.
    for path in TRACES:
        r = post(running, path, OTLP_JSON, keyed(running, **{"Content-Type": "text/plain"}))
        assert r.status_code == 415 and "Content-Type" in r.json()["message"], r.text
        r = post(running, path, b" " * 5000, keyed(running))
        assert r.status_code == 413, r.text


# --- 2. a forbidden project_id in a body: its path in that body ------------------------------


def padded(events: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """`events` after enough good ones that their array is `size` bytes or more."""
    filler: list[dict[str, Any]] = []
    while len(json.dumps(filler + events)) < size:
        filler.append(prompt_call(f"fill-{len(filler)}", prompt="x" * 500))
    return filler + events


@pytest.mark.parametrize("processes", [0, 1], ids=["in-server", "worker"])
def test_a_forbidden_project_id_is_named_by_its_path_in_the_body(
    server_factory: Any, processes: int
) -> None:
    running = server_factory(ingest_worker_processes=processes)
    if processes:
        wait_for_a_worker()
    other = prompt_call("other", project_id="globex")
    invalid = prompt_call("invalid", tokens_input=-1)  # declined by the fast validator
    cases: list[tuple[str, bytes, str]] = [
        (BATCH, batch(prompt_call("ok"), other), "events[1].project_id"),
        (BATCH, batch(invalid, prompt_call("ok"), other), "events[2].project_id"),
        (PROJECT, json.dumps([prompt_call("ok"), other]).encode(), "[1].project_id"),
        (PROJECT, json.dumps([invalid, other]).encode(), "[1].project_id"),
        (PROJECT, json.dumps(other).encode(), "[0].project_id"),
    ]
    for events in ([other], [invalid, other]):
        big = padded(events, OFFLOAD_MIN_BYTES)
        at = len(big) - 1
        cases.append((BATCH, batch(*big), f"events[{at}].project_id"))
        cases.append((PROJECT, json.dumps(big).encode(), f"[{at}].project_id"))
    for path, body, field in cases:
        r = post(running, path, body, keyed(running))
        assert r.status_code == 403, (path, len(body), r.text)
        answer = r.json()
        assert (answer["error"], answer["field"]) == ("forbidden", field), (path, len(body))
        assert "'globex'" in answer["message"]
    if processes:
        metrics = running.client.get("/metrics").text
        assert 'watchllm_ingest_bodies_total{where="worker"}' in metrics  # the worker's 403


# --- 3. JSON in UTF-8 only -----------------------------------------------------------------------

UTF8 = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    'application/json; charset="utf-8"',
    "application/json; Charset=Utf-8",
    "application/json; charset=utf8",  # the common alias
    "application/json; charset=us-ascii",  # ASCII bytes are UTF-8
]
NOT_UTF8 = [
    ("application/json; charset=utf-16", "utf-16"),
    ("application/json; charset=latin-1", "latin-1"),
    ('application/json; charset="UTF-16"', "UTF-16"),
    ("application/json; CHARSET=ISO-8859-1", "ISO-8859-1"),
    ("application/json; v=1; charset=utf-16le", "utf-16le"),
    ("application/json; charset=", ""),
]


def test_json_in_another_charset_than_utf8_is_refused(server: Running) -> None:
    for n, content_type in enumerate(UTF8):
        headers = keyed(server, **{"Content-Type": content_type})
        r = post(server, PROJECT, json.dumps(prompt_call(f"u{n}")).encode(), headers)
        assert r.status_code == 202, (content_type, r.text)
        assert post(server, BATCH, batch(prompt_call(f"v{n}")), headers).status_code == 202
        for path in TRACES:
            assert post(server, path, OTLP_JSON, headers).status_code == 200, content_type
    for content_type, charset in NOT_UTF8:
        headers = keyed(server, **{"Content-Type": content_type})
        for path, body in [
            (PROJECT, json.dumps(prompt_call("refused")).encode()),
            (BATCH, batch(prompt_call("refused"))),
        ]:
            r = post(server, path, body, headers)
            assert r.status_code == 415, (path, content_type, r.text)
            answer = r.json()
            assert (answer["error"], answer["field"]) == ("unsupported_media_type", "Content-Type")
            assert f"charset {charset!r}" in answer["message"], answer
            assert "only UTF-8 JSON is accepted" in answer["message"], answer
        for path in TRACES:
            r = post(server, path, OTLP_JSON, headers)
            assert r.status_code == 415, (path, content_type, r.text)
            assert r.json()["code"] == 3 and "Content-Type" in r.json()["message"]
            assert "only UTF-8 JSON is accepted" in r.json()["message"]
    assert server.wl.writer.accepted_events_total == 2 * len(UTF8)


# --- 4. a path project id that is not one ------------------------------------------------------


def test_a_path_project_id_that_is_not_a_project_id_is_a_400(server: Running) -> None:
    read_key = server.keys.create("acme", scope="read")
    body = json.dumps(prompt_call("path")).encode()
    for value in ["a" * 5000, "a" * 65, "ac$me", "-acme", ".acme", "a b", "été", "acme:1"]:
        path = f"/v1/projects/{value}/events"
        r = post(server, path, body, keyed(server))
        assert r.status_code == 400, (value[:80], r.status_code, r.text[:200])
        answer = r.json()
        assert (answer["error"], answer["field"]) == ("bad_parameter", "project_id"), answer
        shown = value if len(value) <= 64 else value[:64] + "..."
        assert answer["message"] == (
            f"project_id: not a project id (1-64 of A-Z a-z 0-9 _ . -): {shown!r}"
        )
        assert len(r.content) < 300
        # The key first: no key, or one without the ingest scope, whatever the path.
        assert post(server, path, body, {"Content-Type": "application/json"}).status_code == 401
        forbidden = {"Authorization": f"Bearer {read_key}"}
        r = post(server, path, body, forbidden)
        assert r.status_code == 403 and "'ingest' scope" in r.text
    # A project id of another project: 403, as before.
    r = post(server, "/v1/projects/globex/events", body, keyed(server))
    assert r.status_code == 403 and r.json()["field"] == "project_id"
    assert post(server, PROJECT, body, keyed(server)).status_code == 202


# --- 5. integer literals longer than the parser reads -----------------------------------------


def literal(chars: int, negative: bool = False) -> str:
    """An integer literal of `chars` characters, sign included."""
    return "-" + "9" * (chars - 1) if negative else "9" * chars


def with_number(event: dict[str, Any], field: str, number: str) -> str:
    """The event's JSON with `number` (a literal, as it is) as the value at `field`."""
    placeholder = "__NUMBER__"
    if field.startswith("tool_calls[0]."):
        event["tool_calls"] = [{"tool_name": "t", field.split(".", 1)[1]: placeholder}]
    elif field == "metadata":
        event["metadata"] = {"n": placeholder, "kept": "x"}
    else:
        event[field] = placeholder
    return json.dumps(event).replace(f'"{placeholder}"', number)


def bodies(field: str, number: str, size: int) -> Iterator[tuple[str, bytes]]:
    """(path, body) of each route's shape: a batch, an array, an event alone (small only)."""
    good = [json.dumps(e) for e in padded([prompt_call("good")], size)]
    bad = with_number(prompt_call("bad"), field, number)
    events = "[" + ", ".join([*good, bad]) + "]"
    yield BATCH, f'{{"events": {events}}}'.encode()
    yield PROJECT, events.encode()
    if size == 0:
        yield PROJECT, bad.encode()


def answers(running: Running, field: str, number: str, size: int) -> list[tuple[int, Any]]:
    out = []
    for path, body in bodies(field, number, size):
        r = post(running, path, body, keyed(running))
        out.append((r.status_code, r.json()))
    return out


NUMBER_FIELDS = ("tokens_input", "latency_ms", "cost_estimate_usd", "tool_calls[0].latency_ms")


@pytest.mark.parametrize("processes", [0, 1], ids=["in-server", "worker"])
def test_an_integer_literal_too_long_to_parse_is_a_422_naming_its_field(
    server_factory: Any, processes: int
) -> None:
    running = server_factory(ingest_worker_processes=processes)
    if processes:
        wait_for_a_worker()
    for size in (0, OFFLOAD_MIN_BYTES):
        for field in NUMBER_FIELDS:
            for negative in (False, True):
                # 4,300 characters: the longest the parser reads; its answer is the reference.
                want = answers(running, field, literal(4300, negative), size)
                for status, answer in want:
                    assert status in (207, 422), answer
                    assert [e["field"] for e in answer["rejected"][-1]["errors"]] == [field]
                for chars in (4301, 4302, 20_000):
                    got = answers(running, field, literal(chars, negative), size)
                    assert got == want, (size, field, negative, chars)
        # Where any JSON is taken (metadata, tool_input), such a number is refused as 1e999 is.
        for field in ("metadata", "tool_calls[0].tool_input"):
            want = answers(running, field, "1e999", size)
            assert [e["field"] for e in want[0][1]["rejected"][-1]["errors"]] == [field]
            for chars in (4301, 20_000):
                for negative in (False, True):
                    assert answers(running, field, literal(chars, negative), size) == want
        # A float whose integer part is that long: read as its value (infinity), as 1e999 is.
        want = answers(running, "cost_estimate_usd", "1e999", size)
        assert answers(running, "cost_estimate_usd", "1" + "0" * 5000 + ".5", size) == want
    if processes:  # the big bodies went to the worker, which left them to the server
        metrics = running.client.get("/metrics").text
        assert 'watchllm_ingest_bodies_total{where="declined"}' in metrics


def test_long_numbers_leave_the_rest_of_the_body_as_it_was(server: Running) -> None:
    digits = "1" + "0" * 4999
    kept = prompt_call(
        "kept",
        metadata={"s": digits, "q": 'say "' + digits + '"', "n": 12},
        latency_ms="__LATENCY__",
    )
    # Read as its value: 10**4400 * 10**-4400 is 1.
    kept_json = json.dumps(kept).replace('"__LATENCY__"', "1" + "0" * 4400 + "e-4400")
    bad = with_number(prompt_call("bad"), "tokens_input", digits)
    r = post(server, BATCH, f'{{"events": [{kept_json}, {bad}]}}'.encode(), keyed(server))
    assert r.status_code == 207, r.text
    assert r.json()["event_ids"] == ["kept"]
    assert r.json()["rejected"] == [
        {
            "index": 1,
            "event_id": "bad",
            "errors": [
                {
                    "field": "tokens_input",
                    "message": "Input should be less than or equal to 4294967295",
                }
            ],
        }
    ]
    server.flush()
    [row] = server.query("SELECT metadata, latency_ms FROM events WHERE event_id = 'kept'")
    assert json.loads(row["metadata"]) == kept["metadata"]
    assert row["latency_ms"] == 1.0
    # Another error after such a number: the same answer as after a number of the same length
    # that the parser reads (a shorter one and spaces): the error's position is the same.
    tail = ', "tokens_output": 1,}]}'  # a trailing comma
    head = '{"events": [{"event_type": "prompt_call", "run_id": "r", "tokens_input": '
    long = post(server, BATCH, (head + "9" * 5000 + tail).encode(), keyed(server))
    short = post(server, BATCH, (head + "9" * 10 + " " * 4990 + tail).encode(), keyed(server))
    assert long.status_code == 400 and long.json() == short.json()
    column = len(head) + 5000 + len(tail) - 2  # the "}" after the comma
    assert f"at line 1 column {column}" in long.json()["message"], long.json()
    # The body itself such a number: the answer to any number.
    for path in EVENT_ROUTES:
        want = post(server, path, b"12", keyed(server))
        assert want.status_code == 422
        assert post(server, path, ("9" * 5000).encode(), keyed(server)).json() == want.json()
