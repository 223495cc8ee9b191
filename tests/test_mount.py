"""WatchLLM mounted under a prefix in a host FastAPI / Starlette app, with the host's lifespan."""

from __future__ import annotations

import copy
import enum
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from conftest import ServerThread, make_settings, prompt_call
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from watchllm_ext import create_app, lifespan
from watchllm_ext.ingest.inprocess import MAX_DEPTH
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


# --- the in-process fast path (ingest/inprocess.py) equals pydantic's answer ---------------------


def _both_ways(events: list[Any]) -> tuple[Any, Any]:
    """(fast, slow): each path's accepted events as the spool would store them (JSON), or its
    refusals; fast is None when the fast path declines (the caller then takes the slow one)."""
    import msgspec

    from watchllm_ext.auth import Principal
    from watchllm_ext.errors import Problem
    from watchllm_ext.ingest import fast_validate
    from watchllm_ext.ingest.inprocess import plain_events
    from watchllm_ext.ingest.validate import check_projects, finish_fast, validate_items
    from watchllm_ext.plugins import get_plugin_manager
    from watchllm_ext.settings import Settings

    principal = Principal("a1", frozenset({"ingest"}))  # the project of the sweep's events
    if "pm" not in _PM:  # the default plugins (the cost estimator among them), made once
        _PM["pm"] = get_plugin_manager(Settings(create_default_key=False))
    pm = _PM["pm"]
    received = _RECEIVED

    def stored(outcome: Any) -> Any:
        if not outcome.accepted:
            return ("refused", [r.index for r in outcome.rejected])
        payload = outcome.payload or fast_validate.encode_events(outcome.accepted)
        rejected = [r.index for r in outcome.rejected]
        given = [e for i, e in enumerate(events) if i not in rejected]
        accepted = msgspec.json.decode(payload)
        for event, original in zip(accepted, given, strict=True):
            if isinstance(original, dict) and original.get("event_id") is None:
                event["event_id"] = "(made by the server: a new UUIDv7 each time)"
        return ("accepted", accepted, rejected)

    try:
        check_projects(events, principal)  # as WatchLLM.ingest does first, on both paths
        slow: Any = stored(validate_items(copy.deepcopy(events), principal, pm, received))
    except Problem as exc:
        slow = ("problem", exc.status, exc.field)
    except ValueError as exc:
        # pydantic takes a lone surrogate in a Python str, then cannot write it as JSON (a
        # bug of the slow path, outside this test): the fast path must decline those.
        slow = ("error", type(exc).__name__)
    structs = plain_events(copy.deepcopy(events))
    if structs is None:
        return None, slow
    try:
        check_projects(events, principal)
        fast: Any = stored(finish_fast(structs, principal, pm, received))
    except Problem as exc:
        fast = ("problem", exc.status, exc.field)
    # The same stored JSON (1 is not 1.0; the key order may differ: the struct writes its
    # event_type tag first, as the HTTP route's fast path does).
    assert _typed(fast) == _typed(slow)
    return fast, slow


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((k, _typed(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


_PM: dict[str, Any] = {}
_RECEIVED = datetime(2026, 3, 14, 15, 9, 26, 535000, tzinfo=UTC)


def test_the_in_process_fast_path_judges_every_contract_case_as_pydantic_does() -> None:
    """Every case of the fast validator's differential sweep (every field of every event
    type, against every constraint), as the Python dicts an in-process caller hands over:
    the fast path accepts only what pydantic accepts, stores the same events, and declines
    (to pydantic) rather than differ. NaN, infinities and lone surrogates are in the sweep:
    json.loads makes them Python floats and strings, which the fast path must not take."""
    from test_fast_validate import all_cases

    outcomes = {"accepted": 0, "refused-by-both": 0, "declined": 0}
    for case in all_cases():
        try:
            event = json.loads(case.body)
        except (ValueError, RecursionError):  # deeper than Python's json reads: no dict to give
            continue
        fast, slow = _both_ways([event])
        if fast is None:
            outcomes["declined" if slow[0] == "accepted" else "refused-by-both"] += 1
        elif fast[0] == "accepted":
            outcomes["accepted"] += 1
        else:
            outcomes["refused-by-both"] += 1  # another project: 403 on both paths
    # The fast path must not decline valid events wholesale: the declined are the few kinds
    # it cannot judge (non-finite numbers, depth near pydantic's limit, huge integers).
    assert outcomes["accepted"] > 1000 and outcomes["refused-by-both"] > 1000, outcomes
    assert outcomes["declined"] < 150, outcomes


class _Color(enum.IntEnum):
    RED = 1


class _Name(str):
    pass


def test_python_values_json_cannot_hold_are_left_to_pydantic() -> None:
    """What msgspec would write as something else (NaN as null, bytes as base64, a tuple as
    a list, a date as text, a 30-second offset as Z) makes the fast path decline the batch;
    pydantic's answer stands, whatever it is."""
    from watchllm_ext.ingest.inprocess import plain_events

    base = {
        "event_type": "agent_step",
        "event_id": "e1",
        "run_id": "r1",
        "timestamp": datetime(2026, 3, 14, 15, 9, 26, 535123, tzinfo=UTC),
        "step_number": 0,
        "latency_ms": 1.5,
        "metadata": {"k": [1, 2.5, "s", None, True]},
    }
    fast, _ = _both_ways([base])
    assert fast is not None and fast[0] == "accepted"  # the plain event takes the fast path
    odd: list[tuple[str, Any]] = [
        ("latency_ms", math.nan),
        ("latency_ms", math.inf),
        ("metadata", {"k": math.nan}),
        ("metadata", {"k": -math.inf}),
        ("metadata", {"k": b"bytes"}),
        ("step_name", b"bytes"),
        ("metadata", {"k": (1, 2)}),
        ("tags", ("a", "b")),
        ("metadata", {"k": {1, 2}}),
        ("metadata", {1: "int key"}),
        ("metadata", {"k": date(2026, 1, 1)}),
        ("metadata", {"k": Decimal("1.5")}),
        ("metadata", {"k": _Color.RED}),
        ("step_number", _Color.RED),
        ("step_name", _Name("a str subclass")),
        ("metadata", {"k": datetime(2026, 1, 1, tzinfo=UTC)}),
        ("step_name", datetime(2026, 1, 1, tzinfo=UTC)),
        ("timestamp", datetime(2026, 3, 14, 15, 9, 26)),  # naive
        ("timestamp", datetime(2026, 3, 14, tzinfo=timezone(timedelta(seconds=30)))),
        ("timestamp", datetime(2026, 3, 14, tzinfo=timezone(timedelta(hours=2)))),
        ("step_name", "\udc80 lone surrogate"),
        ("metadata", _nested(MAX_DEPTH + 1)),
        ("metadata", {"k": object()}),
    ]
    for key, value in odd:
        event = dict(base, **{key: value}) if type(key) is str else base
        assert plain_events([event]) is None, (key, value)
        _both_ways([event])  # the slow path answers (whatever it is), and nothing differs
        _both_ways([base, event])  # one such event sends the whole batch to pydantic
    # Not a dict at all, or a key that is not a string, at the top level.
    assert plain_events([[("event_type", "agent_step")]]) is None
    assert plain_events([{**base, 7: "x"}]) is None
    # Big integers in JSON and ints where floats go: what JSON holds, judged alike.
    for key, value in [
        ("latency_ms", 2),
        ("step_number", 2**32),
        ("metadata", {"k": 2**63}),
        ("metadata", {"k": 2**70}),
        ("metadata", {"k": -(2**70)}),
    ]:
        _both_ways([dict(base, **{key: value})])


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value
