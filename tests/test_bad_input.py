"""Bad input over real HTTP into real chDB: one table, one row per way a request can be wrong.

Every case asserts the exact status, the error shape ({"error", "message"}, plus "field" or
"rejected[*].errors[*].field" naming what was wrong), that nothing from a rejected event
reached the store, and that the server still takes a valid event (202) afterwards.

Cases that need no special settings share one class-scoped server (built here, since the
conftest fixtures are per test); the others get their own from `server_factory`.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, ServerThread, make_settings, prompt_call

from watchllm_ext.app import create_app
from watchllm_ext.ingest.parse import MAX_JSON_DEPTH
from watchllm_ext.keys import KeyStore, split_key
from watchllm_ext.schema import EVENT_TYPES, MAX_TAGS, MAX_TEXT_CHARS

PROJECT = "/v1/projects/acme/events"
BATCH = "/v1/events/batch"
JSON_CT = {"Content-Type": "application/json"}

# Auth modes of a case (anything else is sent verbatim as the Authorization header).
ADMIN, NO_AUTH, READ_ONLY, REVOKED = "admin", "none", "read", "revoked"

# A field path the client can act on: an event field path ("tool_calls[0].foo",
# "[0].project_id", "events[1].project_id" on the batch route, a key it sent: "tokensInput"),
# a header name ("Content-Type") or "(event)" for the event as a whole.
# pydantic internals such as "prompt.constrained-str" are not.
_SEG = r"[a-z_][A-Za-z0-9_]*(?:\[\d+\])*"
_CLEAN_FIELD = re.compile(
    rf"\(event\)|[A-Z][A-Za-z]*(?:-[A-Z][A-Za-z]*)*|(?:\[\d+\]\.)?{_SEG}(?:\.{_SEG})*"
)


def bad(name: str, **fields: Any) -> dict[str, Any]:
    """A prompt_call that a case spoils; its id starts with 'bad' so the store check finds it."""
    return prompt_call(f"bad-{name}", **fields)


def without(event: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in names}


def tool_call(event_id: str, **fields: Any) -> dict[str, Any]:
    event = {
        "event_id": event_id,
        "event_type": "tool_call",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:05Z",
        "tool_name": "search",
        "tool_input": {"q": "x"},
    }
    event.update(fields)
    return event


def agent_step(event_id: str, **fields: Any) -> dict[str, Any]:
    event = {
        "event_id": event_id,
        "event_type": "agent_step",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:05Z",
        "step_number": 1,
    }
    event.update(fields)
    return event


def hallucination(event_id: str, **fields: Any) -> dict[str, Any]:
    event = {
        "event_id": event_id,
        "event_type": "hallucination_detected",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:05Z",
        "detection_method": "nli",
        "confidence": 0.5,
        "claim": "the moon is cheese",
    }
    event.update(fields)
    return event


def raw(value: Any) -> bytes:
    """JSON text as Python writes it, NaN and Infinity literals included."""
    return json.dumps(value).encode()


def gzip_bomb() -> bytes:
    # 64 MiB of spaces (over the default 50 MiB max_decompressed_bytes) in about 64 KB.
    return gzip.compress(b" " * (64 * 1024 * 1024), compresslevel=9)


def deep_nesting() -> bytes:
    return (
        raw(bad("deep", metadata={"x": 0}))[:-1] + b', "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )


def chunks(data: bytes, size: int = 512) -> Callable[[], Iterator[bytes]]:
    def gen() -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    return gen


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    error: str | None  # the expected "error" code (None for a 207, which is no error)
    field: str | None  # must be one of the reported fields (body "field" or rejected fields)
    body: Any = None  # a JSON value, raw bytes, or a callable returning either
    path: str = PROJECT
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = ADMIN
    settings: dict[str, Any] = field(default_factory=dict)
    says: tuple[str, ...] = ()  # substrings of the message(s) that explain `field`
    rejected: tuple[int, ...] = ()  # indices listed in "rejected"
    accepted: int = 0  # valid events of the body that must be stored
    chunked: bool = False  # send without Content-Length (Transfer-Encoding: chunked)


TOO_BIG = b'{"padding": "' + b"x" * 4096 + b'"}'

# fmt: off
CASES: list[Case] = [
    # --- the body is not JSON, or not an event ---------------------------------------------
    Case("malformed-json-truncated", 400, "malformed_json", "body",
         body=b'{"event_id": "bad-trunc", "event_type": "prompt_call"',
         says=("line 1 column",)),
    Case("malformed-json-trailing-comma", 400, "malformed_json", "body",
         body=b'{"event_id": "bad-comma",}', says=("line 1 column 26",)),
    Case("malformed-json-two-values", 400, "malformed_json", "body",
         body=raw(bad("two")) + raw(bad("two-b")), says=("line 1 column",)),
    Case("malformed-json-invalid-utf8", 400, "malformed_json", "body",
         body=b'{"event_id": "bad-utf8", "prompt": "\xff\xfe"}', says=("line 1 column",)),
    Case("lone-surrogate-escape", 400, "malformed_json", "body",
         body=b'{"event_id": "bad-surrogate", "prompt": "\\ud800"}',
         says=("line 1 column", "a lone surrogate is no character")),
    Case("lone-low-surrogate-escape", 400, "malformed_json", "body",
         body=b'{"event_id": "bad-surrogate", "prompt": "\\udc00!"}',
         says=("line 1 column", "a lone surrogate is no character")),
    Case("nan-literal", 400, "malformed_json", "body",
         body=raw(bad("nan", latency_ms=float("nan"))), says=("line 1 column",)),
    Case("infinity-literal", 400, "malformed_json", "body",
         body=raw(bad("inf", cost_estimate_usd=float("inf"))), says=("line 1 column",)),
    Case("deeply-nested-json", 400, "malformed_json", "body", body=deep_nesting,
         says=("nests arrays and objects more than 200 levels deep", "line 1 column")),
    Case("empty-body", 400, "malformed_json", "body", body=b"", says=("empty",)),
    Case("whitespace-body", 400, "malformed_json", "body", body=b"  \n\t ", says=("empty",)),
    Case("json-number", 422, "bad_body", "body", body=b"42"),
    Case("json-string", 422, "bad_body", "body", body=b'"prompt_call"'),
    Case("json-null", 422, "bad_body", "body", body=b"null"),
    Case("empty-array", 422, "empty_batch", "body", body=[]),
    Case("array-of-non-objects", 422, "validation_failed", "(event)", body=[1, "x"],
         rejected=(0, 1), says=("must be a JSON object",)),
    # --- wrong types ------------------------------------------------------------------------
    Case("tokens-input-string", 422, "validation_failed", "tokens_input",
         body=bad("tokstr", tokens_input="100"), rejected=(0,), says=("valid integer",)),
    Case("latency-bool", 422, "validation_failed", "latency_ms",
         body=bad("latbool", latency_ms=True), rejected=(0,), says=("valid number",)),
    Case("metadata-not-object", 422, "validation_failed", "metadata",
         body=bad("meta", metadata=[1, 2]), rejected=(0,), says=("dictionary",)),
    Case("latency-overflows-double", 422, "validation_failed", "latency_ms",
         body=raw(bad("overflow", latency_ms=1.0)).replace(b"1.0", b"1e999"), rejected=(0,),
         says=("finite",)),
    Case("metadata-number-overflows-double", 422, "validation_failed", "metadata",
         body=raw(bad("metainf", metadata={"x": 1.0})).replace(b'"x": 1.0', b'"x": 1e999'),
         rejected=(0,)),
    # --- missing required fields ------------------------------------------------------------
    # (A missing event_id or timestamp is filled in by the server: tests/test_fill_in.py.)
    Case("missing-run-id", 422, "validation_failed", "run_id",
         body=without(bad("norun"), "run_id"), rejected=(0,), says=("Field required",)),
    Case("missing-event-type", 422, "validation_failed", "event_type",
         body=without(bad("notype"), "event_type"), rejected=(0,), says=EVENT_TYPES),
    Case("tool-call-missing-tool-name", 422, "validation_failed", "tool_name",
         body=without(tool_call("bad-notool"), "tool_name"), rejected=(0,),
         says=("Field required",)),
    Case("agent-step-missing-step-number", 422, "validation_failed", "step_number",
         body=without(agent_step("bad-nostep"), "step_number"), rejected=(0,),
         says=("Field required",)),
    # --- values the contract refuses --------------------------------------------------------
    Case("unknown-event-type", 422, "validation_failed", "event_type",
         body=bad("etype", event_type="prompt_kall"), rejected=(0,),
         says=("prompt_kall", *EVENT_TYPES)),
    Case("unknown-extra-field", 422, "validation_failed", "temperature",
         body=bad("extra", temperature=0.7), rejected=(0,), says=("Extra inputs",)),
    # An SDK of another language writing camelCase: the field it meant is named.
    Case("camel-case-field", 422, "validation_failed", "tokensInput",
         body={**without(bad("camel"), "tokens_input"), "tokensInput": 3}, rejected=(0,),
         says=("Extra inputs are not permitted (did you mean tokens_input?)",)),
    Case("camel-case-event-type", 422, "validation_failed", "event_type",
         body={**without(bad("camel-type"), "event_type"), "eventType": "prompt_call"},
         rejected=(0,), says=("'eventType': did you mean event_type?",)),
    Case("naive-timestamp", 422, "validation_failed", "timestamp",
         body=bad("naive", timestamp="2026-01-02T03:04:05"), rejected=(0,),
         says=("timezone",)),
    Case("timestamp-after-2100", 422, "validation_failed", "timestamp",
         body=bad("late", timestamp="2300-01-01T00:00:00Z"), rejected=(0,), says=("2100-01-01",)),
    Case("timestamp-before-1970", 422, "validation_failed", "timestamp",
         body=bad("early", timestamp="1969-12-31T23:59:59Z"), rejected=(0,), says=("1970-01-01",)),
    # Epoch numbers as strings: seconds or milliseconds would be a guess (pydantic took both).
    Case("timestamp-epoch-seconds-string", 422, "validation_failed", "timestamp",
         body=bad("epochs", timestamp="1700000000"), rejected=(0,),
         says=("RFC 3339", "2026-01-01T12:00:00Z")),
    Case("timestamp-epoch-millis-string", 422, "validation_failed", "timestamp",
         body=bad("epochms", timestamp="1700000000000"), rejected=(0,),
         says=("RFC 3339", "2026-01-01T12:00:00Z")),
    Case("timestamp-offset-without-colon", 422, "validation_failed", "timestamp",
         body=bad("tzcolon", timestamp="2026-01-02T03:04:05+0100"), rejected=(0,),
         says=("+hh:mm",)),
    # Chat message content parts: a number that is not finite was stored as null.
    Case("chat-content-number-overflows-double", 422, "validation_failed", "prompt[0].content",
         body=raw(bad("chatinf", prompt=[{"role": "user", "content": [{"score": 1.0}]}]))
         .replace(b'"score": 1.0', b'"score": -1e999'), rejected=(0,), says=("not finite",)),
    Case("chat-content-nan-literal", 400, "malformed_json", "body",
         body=raw(bad("chatnan", prompt=[{"role": "user", "content": [{"score": math.nan}]}])),
         says=("line 1 column",)),
    Case("negative-tokens", 422, "validation_failed", "tokens_output",
         body=bad("negtok", tokens_output=-1), rejected=(0,), says=("greater than or equal",)),
    Case("tokens-over-uint32", 422, "validation_failed", "tokens_input",
         body=bad("bigtok", tokens_input=2**32), rejected=(0,), says=("less than or equal",)),
    Case("negative-latency", 422, "validation_failed", "latency_ms",
         body=bad("neglat", latency_ms=-1.5), rejected=(0,), says=("greater than or equal",)),
    Case("confidence-over-one", 422, "validation_failed", "confidence",
         body=hallucination("bad-conf", confidence=1.5), rejected=(0,),
         says=("less than or equal to 1",)),
    Case("bad-status-enum", 422, "validation_failed", "status",
         body=bad("status", status="done"), rejected=(0,), says=("'success'",)),
    Case("event-id-bad-characters", 422, "validation_failed", "event_id",
         body=prompt_call("bad id with spaces"), rejected=(0,),
         says=("letters, digits and _ . : -",)),
    Case("event-id-dots-alone", 422, "validation_failed", "event_id",
         body=prompt_call(".."), rejected=(0,), says=("not dots alone",)),
    Case("prompt-over-1m-chars", 422, "validation_failed", "prompt",
         body=lambda: bad("huge", prompt="x" * (MAX_TEXT_CHARS + 1)), rejected=(0,),
         says=(f"at most {MAX_TEXT_CHARS} characters",)),
    Case("too-many-tags", 422, "validation_failed", "tags",
         body=bad("tags", tags=[f"t{i}" for i in range(MAX_TAGS + 1)]), rejected=(0,),
         says=(f"at most {MAX_TAGS} items",)),
    Case("client-supplied-cost-source", 422, "validation_failed", "cost_source",
         body=bad("costsrc", cost_source="client", cost_estimate_usd=0.1), rejected=(0,),
         says=("cost_source",)),
    Case("tool-calls-item-unknown-field", 422, "validation_failed", "tool_calls[0].foo",
         body=bad("nested", tool_calls=[{"tool_name": "search", "foo": 1}]), rejected=(0,),
         says=("Extra inputs",)),
    Case("chat-message-role-not-string", 422, "validation_failed", "prompt[0].role",
         body=bad("role", prompt=[{"role": 5, "content": "hi"}]), rejected=(0,),
         says=("valid string",)),
    # --- partial batches --------------------------------------------------------------------
    Case("array-mixing-valid-and-invalid", 207, None, "[1].tokens_input",
         body=[prompt_call("ok-mix-0"), bad("mix-1", tokens_input=-5), prompt_call("ok-mix-2"),
               without(bad("mix-3"), "run_id")],
         rejected=(1, 3), accepted=2, says=("greater than or equal to 0",)),
    Case("batch-mixing-valid-and-invalid", 207, None, "[0].tool_calls[0].foo", path=BATCH,
         body={"events": [bad("bmix-0", tool_calls=[{"tool_name": "s", "foo": 1}]),
                          prompt_call("ok-bmix-1")]},
         rejected=(0,), accepted=1, says=("Extra inputs",)),
    # --- the batch endpoint's envelope ------------------------------------------------------
    Case("batch-empty-events", 422, "empty_batch", "events", path=BATCH, body={"events": []}),
    Case("batch-body-is-array", 422, "bad_body", "body", path=BATCH, body=[bad("barr")]),
    Case("batch-extra-top-level-field", 422, "bad_body", "dry_run", path=BATCH,
         body={"events": [bad("bextra")], "dry_run": True}, says=("dry_run",)),
    Case("batch-events-not-a-list", 422, "bad_body", "events", path=BATCH,
         body={"events": bad("bnotlist")}, says=("array",)),
    Case("batch-events-missing", 422, "bad_body", "events", path=BATCH, body={}),
    Case("batch-over-max-batch-events", 413, "too_many_events", "events", path=BATCH,
         body={"events": [prompt_call(f"bad-many-{i}") for i in range(6)]},
         settings={"max_batch_events": 5}, says=("6 events", "limit of 5")),
    Case("array-over-max-batch-events", 413, "too_many_events", "events",
         body=[prompt_call(f"bad-amany-{i}") for i in range(6)],
         settings={"max_batch_events": 5}, says=("limit of 5",)),
    # --- size limits and encodings ----------------------------------------------------------
    Case("body-over-max-body-bytes", 413, "payload_too_large", "body", body=TOO_BIG,
         settings={"max_body_bytes": 1024}, says=("1024",)),
    Case("chunked-body-over-max-body-bytes", 413, "payload_too_large", "body",
         body=chunks(TOO_BIG), chunked=True, settings={"max_body_bytes": 1024},
         says=("1024",)),
    Case("gzip-bomb", 413, "payload_too_large", "body", body=gzip_bomb,
         headers={"Content-Encoding": "gzip"}, says=("decompressed",)),
    Case("corrupt-gzip", 400, "bad_encoding", "body", body=b"this is not gzip at all",
         headers={"Content-Encoding": "gzip"}, says=("gzip",)),
    Case("truncated-gzip", 400, "bad_encoding", "body",
         body=gzip.compress(raw(bad("trunc-gz")))[:-12], headers={"Content-Encoding": "gzip"},
         says=("gzip",)),
    Case("gzip-with-trailing-garbage", 400, "bad_encoding", "body",
         body=gzip.compress(raw(prompt_call("bad-gztrail"))) + b"GARBAGE",
         headers={"Content-Encoding": "gzip"}, says=("gzip",)),
    Case("gzip-over-max-members", 400, "bad_encoding", "body",
         body=gzip.compress(b"") * 10_000 + gzip.compress(raw(bad("gzmembers"))),
         headers={"Content-Encoding": "gzip"}, says=("more than 10000 members",)),
    Case("corrupt-deflate", 400, "bad_encoding", "body", body=b"\x00\x01garbage",
         headers={"Content-Encoding": "deflate"}, says=("deflate",)),
    Case("gzip-of-malformed-json", 400, "malformed_json", "body",
         body=gzip.compress(b'{"event_id": "bad-gzjson", '), headers={"Content-Encoding": "gzip"},
         says=("line 1 column",)),
    Case("unsupported-content-encoding", 415, "unsupported_encoding", "Content-Encoding",
         body=zlib.compress(raw(bad("br"))), headers={"Content-Encoding": "br"}, says=("'br'",)),
    Case("content-type-text-plain", 415, "unsupported_media_type", "Content-Type",
         body=raw(bad("textplain")), headers={"Content-Type": "text/plain"},
         says=("text/plain",)),
    Case("content-type-form-urlencoded", 415, "unsupported_media_type", "Content-Type",
         body=b"event_id=bad-form&event_type=prompt_call",
         headers={"Content-Type": "application/x-www-form-urlencoded"},
         says=("application/x-www-form-urlencoded",)),
    # --- query parameters: the ingest routes take none --------------------------------------
    Case("query-parameter-on-events", 400, "bad_parameter", "dry_run",
         path=PROJECT + "?dry_run=1", body=bad("qdry"), says=("takes no query parameters",)),
    Case("query-parameter-on-batch", 400, "bad_parameter", "project_id",
         path=BATCH + "?project_id=globex", body={"events": [bad("qbatch")]},
         says=("takes no query parameters",)),
    Case("query-value-without-name", 400, "bad_parameter", "query", path=PROJECT + "?=x",
         body=bad("qnoname"), says=("takes no query parameters",)),
    # --- projects and keys ------------------------------------------------------------------
    Case("wrong-project-in-path", 403, "forbidden", "project_id",
         path="/v1/projects/globex/events", body=bad("wrongpath"), says=("globex",)),
    Case("body-project-id-other-project", 403, "forbidden", "[0].project_id",
         body=bad("bodyproj", project_id="globex"), says=("globex",)),
    Case("batch-body-project-id-other-project", 403, "forbidden", "events[1].project_id",
         path=BATCH,
         body={"events": [prompt_call("bad-bp-0"), bad("bp-1", project_id="globex")]},
         says=("globex",)),
    Case("no-authorization-header", 401, "unauthorized", "Authorization", auth=NO_AUTH,
         body=bad("noauth"), says=("Bearer",)),
    Case("authorization-basic-scheme", 401, "unauthorized", "Authorization",
         auth="Basic YWNtZTpzZWNyZXQ=", body=bad("basic"), says=("Bearer",)),
    Case("authorization-bearer-without-token", 401, "unauthorized", "Authorization",
         auth="Bearer", body=bad("emptybearer"), says=("Bearer",)),
    Case("unknown-key", 401, "unauthorized", "Authorization",
         auth="Bearer wllm_000000000000_not-a-real-secret", body=bad("unknownkey")),
    Case("key-not-shaped-like-ours", 401, "unauthorized", "Authorization",
         auth="Bearer sk-live-1234", body=bad("shape")),
    Case("revoked-key", 401, "unauthorized", "Authorization", auth=REVOKED,
         body=bad("revoked"), says=("revoked",)),
    Case("read-only-key-ingests", 403, "forbidden", "Authorization", auth=READ_ONLY,
         body=bad("readonly"), says=("ingest",)),
]
# fmt: on


# --- servers ------------------------------------------------------------------------------


@dataclass
class Env:
    server: Running
    read_key: str
    doomed_key: str  # revoked by the revoked-key case


def _env(server: Running) -> Env:
    # Created before the server's first request, so its key cache loads them at once.
    return Env(
        server, server.keys.create("acme", scope="read"), server.keys.create("acme", scope="ingest")
    )


@pytest.fixture(scope="class")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # Class-scoped, not module-scoped: chDB holds one data folder per process, so this server
    # must be gone before the cases with their own server start theirs.
    tmp: Path = tmp_path_factory.mktemp("bad_input")
    settings = make_settings(tmp)
    keys = KeyStore(settings.keys_path)
    key = keys.create("acme", scope="admin")
    app = create_app(settings)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=30) as client:
        yield _env(Running(thread.url, app, settings, keys, key, client, thread))
    keys.close()


# --- helpers --------------------------------------------------------------------------------


def _stored(server: Running) -> int:
    server.flush()
    return int(server.query("SELECT count() AS n FROM events")[0]["n"])


def _bad_rows(server: Running) -> dict[str, int]:
    out = {}
    for table in ("events", "tool_calls", "agent_steps"):
        rows = server.query(f"SELECT count() AS n FROM {table} WHERE event_id LIKE 'bad%'")
        out[table] = int(rows[0]["n"])
    return out


def _authorization(env: Env, auth: str) -> dict[str, str]:
    if auth == NO_AUTH:
        return {}
    if auth == ADMIN:
        return env.server.headers()
    if auth == READ_ONLY:
        return env.server.headers(env.read_key)
    if auth == REVOKED:
        return _revoke(env)
    return {"Authorization": auth}


def _revoke(env: Env) -> dict[str, str]:
    server, key = env.server, env.doomed_key
    parts = split_key(key)
    assert parts is not None
    assert server.keys.revoke(parts[0])
    headers = server.headers(key)
    # The server rereads the key file every key_refresh_s (1 s); poll with a body that is
    # refused either way (400 while the key still works, 401 once the revocation is seen).
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        r = server.client.post(PROJECT, content=b"{", headers={**headers, **JSON_CT})
        if r.status_code == 401:
            break
        assert r.status_code == 400, r.text
        time.sleep(0.1)
    return headers


def _send(env: Env, case: Case) -> httpx.Response:
    body = case.body() if callable(case.body) else case.body
    headers = {**JSON_CT, **case.headers, **_authorization(env, case.auth)}
    if case.chunked or isinstance(body, bytes):
        content: Any = body
    else:
        content = json.dumps(body).encode()
    assert case.chunked or len(content) < 10 * 1024 * 1024, "keep bodies under the wire limit"
    return env.server.client.post(case.path, content=content, headers=headers)


def _fields(body: dict[str, Any]) -> list[str]:
    fields = [body["field"]] if "field" in body else []
    for rejection in body.get("rejected", []):
        fields.extend(e["field"] for e in rejection["errors"])
    return fields


def _messages_for(body: dict[str, Any], name: str | None) -> list[str]:
    """The messages that explain `name` (every message when nothing names it)."""
    top = str(body.get("message", ""))
    found = [top] if name is not None and body.get("field") == name else []
    everything = [top]
    for rejection in body.get("rejected", []):
        for error in rejection["errors"]:
            everything.append(error["message"])
            if name in (error["field"], f"[{rejection['index']}].{error['field']}"):
                found.append(error["message"])
    return found or everything


# --- the tests ------------------------------------------------------------------------------


def test_the_table() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 35


SHARED = [c for c in CASES if not c.settings]
OWN_SERVER = [c for c in CASES if c.settings]


class TestOnSharedServer:
    @pytest.mark.parametrize("case", SHARED, ids=[c.id for c in SHARED])
    def test_bad_input(self, case: Case, shared_env: Env) -> None:
        check(shared_env, case)


@pytest.mark.parametrize("case", OWN_SERVER, ids=[c.id for c in OWN_SERVER])
def test_bad_input_own_server(case: Case, server_factory: Any) -> None:
    check(_env(server_factory(**case.settings)), case)


def check(env: Env, case: Case) -> None:
    server = env.server
    before = _stored(server)
    bad_before = _bad_rows(server)

    r = _send(env, case)

    assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:2000]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()

    if case.status == 207:
        # Partial success: no error as a whole; every rejection carries field + message.
        assert body["accepted"] == case.accepted, body
        assert len(body["event_ids"]) == case.accepted, body
    else:
        assert body["error"] == case.error, body
        assert isinstance(body["message"], str) and body["message"].strip(), body
    for rejection in body.get("rejected", []):
        assert rejection["errors"], rejection
        for error in rejection["errors"]:
            assert error["field"] and error["message"], rejection
    if case.rejected:
        assert [x["index"] for x in body["rejected"]] == list(case.rejected), body
    if body.get("error") == "validation_failed":
        assert body["accepted"] == 0, body

    # The offending field or header is named, as a path a client can act on.
    fields = _fields(body)
    if case.field is not None:
        # In a 207 the expected field is written "[index].path": match it per rejection.
        indexed = [f"[{x['index']}].{e['field']}" for x in body.get("rejected", [])
                   for e in x["errors"]]  # fmt: skip
        assert case.field in fields or case.field in indexed, (
            f"{case.id}: expected field {case.field!r}, got {fields}: {body}"
        )
    unclear = [f for f in fields if not _CLEAN_FIELD.fullmatch(f)]
    assert not unclear, f"{case.id}: field paths a client cannot act on: {unclear}: {body}"

    # The explanation sits with the field it is about, not in another error.
    text = "\n".join(_messages_for(body, case.field))
    for needle in case.says:
        assert needle in text, f"{case.id}: {needle!r} not in the messages for the field: {body}"

    if case.status == 401:
        assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers

    # Nothing from a rejected event is stored; the valid events of a 207 are.
    assert _stored(server) == before + case.accepted
    assert _bad_rows(server) == bad_before  # no row of a 'bad-*' event, in any table

    # And the server still takes a valid event.
    ok = server.client.post(PROJECT, json=prompt_call(f"after-{case.id}"), headers=server.headers())
    assert ok.status_code == 202, ok.text
    assert _stored(server) == before + case.accepted + 1


def test_an_empty_query_string_is_no_parameter(server: Running) -> None:
    """`?` or `?&` alone name no parameter: the ingest routes take the request as without."""
    for n, suffix in enumerate(("?", "?&")):
        answer = server.client.post(
            PROJECT + suffix,
            content=raw(prompt_call(f"emptyquery-{n}")),
            headers={**server.headers(), "Content-Type": "application/json"},
        )
        assert answer.status_code == 202, answer.text


def test_a_rejection_answer_is_bounded_whatever_the_batch_holds(server: Running) -> None:
    """An attacker's 274 KB gzip body of 10,000 events with 400 unknown keys each drew a 239 MB
    422 (one error per key per event). Now: at most MAX_ERRORS_PER_EVENT fields per event and
    MAX_REJECTIONS_LISTED events per answer, with the full count beside them; the valid
    events of the same batch are still accepted and listed."""
    from watchllm_ext.ingest.validate import MAX_ERRORS_PER_EVENT, MAX_REJECTIONS_LISTED

    junk = {f"k{i}": 0 for i in range(400)}
    n_bad = MAX_REJECTIONS_LISTED + 500
    events = [prompt_call(f"bad{i}", **junk) for i in range(n_bad)]
    body = gzip.compress(json.dumps({"events": events}).encode())
    headers = {**server.headers(), "Content-Encoding": "gzip"}
    r = server.client.post("/v1/events/batch", content=body, headers=headers)
    assert r.status_code == 422, r.text[:300]
    assert len(r.content) < 8_000_000, len(r.content)
    answer = r.json()
    assert answer["rejected_count"] == n_bad
    assert len(answer["rejected"]) == MAX_REJECTIONS_LISTED
    assert [x["index"] for x in answer["rejected"]] == list(range(MAX_REJECTIONS_LISTED))
    first = answer["rejected"][0]["errors"]
    assert len(first) == MAX_ERRORS_PER_EVENT + 1
    assert first[-1] == {"field": "(event)", "message": "and 380 more fields with errors"}
    assert all(e["field"].startswith("k") for e in first[:-1])
    # A mixed batch: the good events are accepted, the answer stays bounded and says so.
    mixed = [prompt_call("good-1"), *events[:3], prompt_call("good-2")]
    r = server.client.post("/v1/events/batch", json={"events": mixed}, headers=server.headers())
    assert r.status_code == 207
    assert r.json()["event_ids"] == ["good-1", "good-2"] and "rejected_count" not in r.json()
    assert _stored(server) == 2


def test_a_clients_long_names_and_values_are_repeated_cut(server: Running) -> None:
    """A 10 MB field name beside `events` drew a 20 MB 422 (the name in the message and in
    `field`); an unknown key or an event_type of a megabyte inside an event alike. Names are
    repeated cut at 64 characters, messages at MAX_MESSAGE_CHARS."""
    from watchllm_ext.ingest.validate import MAX_MESSAGE_CHARS

    r = server.client.post(
        "/v1/events/batch",
        content=json.dumps({"events": [], "y" * 1_000_000: 1}),
        headers=server.headers(),
    )
    assert r.status_code == 422 and len(r.content) < 500, r.content[:300]
    assert r.json() == {
        "error": "bad_body",
        "message": f"unknown field {'y' * 64 + '...'!r}; only 'events' is allowed",
        "field": "y" * 64 + "...",
    }
    odd = [prompt_call("long-key", **{"k" * 100_000: 1}), {**prompt_call("long-tag")}]
    odd[1]["event_type"] = "t" * 100_000
    r = server.client.post("/v1/events/batch", json={"events": odd}, headers=server.headers())
    assert r.status_code == 422 and len(r.content) < 4_000, r.content[:300]
    first, second = (x["errors"] for x in r.json()["rejected"])
    assert first == [{"field": "k" * 64 + "...", "message": "Extra inputs are not permitted"}]
    assert second[0]["field"] == "event_type"
    assert len(second[0]["message"]) == MAX_MESSAGE_CHARS + 3  # "..." marks the cut


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_json_nested_to_the_documented_depth_is_read_and_deeper_is_400_too_deep(
    server_factory: Any, depth: int
) -> None:
    """docs/API.md: arrays and objects nest at most 200 deep around a value; one level more
    is 400 saying the nesting is too deep, not that the JSON is invalid. (An empty array or
    object innermost may be a 201st level: the parser counts the value inside too.)"""
    server = server_factory()
    # An array of one event whose value is `depth - 1` arrays around a number: read, and
    # refused as not an event (422); one level more is never read.
    body = b"[" * depth + b"1" + b"]" * depth
    r = server.client.post(
        "/v1/projects/acme/events",
        content=body,
        headers={**server.headers(), "Content-Type": "application/json"},
    )
    if depth == MAX_JSON_DEPTH:
        assert r.status_code == 422, r.text
        assert r.json()["rejected"][0]["errors"][0]["message"] == "must be a JSON object"
    else:
        assert r.status_code == 400, r.text
        answer = r.json()
        assert answer["error"] == "malformed_json" and answer["field"] == "body"
        assert answer["message"].startswith(
            "the JSON nests arrays and objects more than 200 levels deep (at line 1 column"
        )
        assert "invalid" not in answer["message"]
