"""The events the server carries (fast_validate's msgspec structs) from the request to the
spool and out to the sinks: the spool of the version before (pydantic's encoding) replayed
after an upgrade; nothing the collector tracks in the writer's memory; plugin hooks and sinks
that get pydantic models, and sinks that read the structs and the batch's JSON."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import Running, make_settings, prompt_call
from pydantic import BaseModel
from test_otel_workers import wait_for_a_worker

from watchllm_ext import hookimpl
from watchllm_ext.app import open_spool
from watchllm_ext.delivery.dead_letters import append_dead_letter, dead_letter
from watchllm_ext.delivery.writer import EventBatch, EventsJson, batch_json, batch_json_lines
from watchllm_ext.ingest.fast_validate import EVENT_STRUCT_TYPES, to_model
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.testing import MemorySink


def _events(n: int, mark: str) -> list[dict[str, Any]]:
    """Events of several types, with what the structs turn into tuples and nested structs."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            out.append(
                prompt_call(
                    f"{mark}-{i}",
                    tags=["a", "b"],
                    metadata={"customer": f"c{i}", "score": 0.5},
                    prompt=[{"role": "user", "content": "hi"}],
                    tool_calls=[{"tool_name": "search", "tool_input": {"q": "x"}}],
                )
            )
        elif i % 3 == 1:
            out.append(prompt_call(f"{mark}-{i}", model="gemini-1.5-flash", provider="google"))
        else:
            out.append(
                {
                    "event_id": f"{mark}-{i}",
                    "event_type": "agent_step",
                    "run_id": "run-1",
                    "timestamp": "2026-01-02T03:04:05.5+02:00",
                    "step_number": i,
                    "tags": ["step"],
                }
            )
    return out


class StructSink:
    """A sink that reads the structs (reads_structs) and keeps each batch's JSON; `hold`
    keeps it from finishing a write, so the writer keeps the events in memory."""

    name = "structs"
    reads_structs = True

    def __init__(self) -> None:
        self.batches: list[Sequence[Any]] = []
        self.json: list[bytes] = []
        self.hold = threading.Event()
        self.hold.set()

    async def write(self, events: Sequence[Any]) -> None:
        while not self.hold.is_set():
            await anyio.sleep(0.01)
        self.batches.append(events)
        self.json.append(batch_json(events))

    @property
    def events(self) -> list[Any]:
        return [e for batch in self.batches for e in batch]

    @hookimpl
    def register_sinks(self, settings: Any, store: Any) -> StructSink:
        return self


def _post(server: Running, events: list[dict[str, Any]]) -> dict[str, Any]:
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 202, r.text
    return r.json()


def _same_json(got: Any, want: Any) -> None:
    """Same keys and values, of the same JSON types; timestamps the same instant."""
    from datetime import datetime

    def norm(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if key == "timestamp":
            return datetime.fromisoformat(value)
        return (type(value).__name__, value)

    assert norm(got) == norm(want)


def test_a_spool_left_by_the_previous_version_is_replayed(
    tmp_path: Path, server_factory: Any
) -> None:
    """Records written by the encoder before the structs (pydantic's dump_json of the models,
    cost_source included) are read back and stored after an upgrade, value for value."""
    raw = _events(30, "old")
    models = EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in raw])
    for model in models:
        if model.event_type == "prompt_call":
            model.cost_source = "computed"
            model.cost_estimate_usd = 0.25
    old_payload = EVENT_LIST_ADAPTER.dump_json(models, exclude_none=True)
    settings = make_settings(tmp_path)
    spool, lock = open_spool(settings)
    try:
        spool.write(old_payload, len(models))
    finally:
        spool.close()
        lock.release()

    sink = StructSink()
    server = server_factory((sink,))
    server.flush()
    assert [type(e) in EVENT_STRUCT_TYPES for e in sink.events] == [True] * len(models)
    for got, want in zip(sink.events, models, strict=True):
        assert to_model(got).model_dump() == want.model_dump()
    _same_json(json.loads(b"".join(sink.json)), json.loads(old_payload))
    # And in the store, with its cost.
    rows = server.query(
        "SELECT event_id, cost_source, cost_estimate_usd FROM events FINAL"
        " WHERE project_id = 'acme' AND event_type = 'prompt_call' ORDER BY event_id"
    )
    assert len(rows) == 20
    assert {(r["cost_source"], r["cost_estimate_usd"]) for r in rows} == {("computed", 0.25)}


def test_dead_letters_of_the_previous_version_are_replayed(
    tmp_path: Path, server_factory: Any
) -> None:
    """A dead-letter file written before the structs (events as pydantic dumped them) is
    read, listed and replayed to its sink, which gets the same events as structs."""
    raw = _events(6, "dl")
    models = EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in raw])
    old_events = json.loads(EVENT_LIST_ADAPTER.dump_json(models, exclude_none=True))
    settings = make_settings(tmp_path)
    folder = settings.spool_path / "dead-letter"
    folder.mkdir(parents=True, exist_ok=True)
    append_dead_letter(folder / "structs.jsonl", dead_letter("structs", "old", old_events, None))

    sink = StructSink()
    server = server_factory((sink,))
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert [(d["sink"], d["events"]) for d in listed["dead_letters"]] == [("structs", 6)]
    r = server.client.post("/v1/admin/dead-letters/replay", headers=server.headers())
    assert r.status_code == 200 and r.json()["replayed_events"] == 6, r.text
    server.flush()
    assert all(type(e) in EVENT_STRUCT_TYPES for e in sink.events)
    for got, want in zip(sink.events, models, strict=True):
        assert to_model(got).model_dump() == want.model_dump()


@pytest.mark.parametrize("processes", [0, 1])
def test_the_writer_holds_nothing_the_collector_tracks(server_factory: Any, processes: int) -> None:
    """10,000 accepted events held in the writer's memory (the sink is held back) add almost
    no objects for a full garbage collection to walk: structs with gc=False, tuples and
    flat dicts the collector does not track; or, for bodies a worker process validated
    (ingest_worker_processes), their JSON and ids (ingest/worker.py)."""
    sink = StructSink()
    server = server_factory((sink,), flush_interval_s=0.01, ingest_worker_processes=processes)
    if processes:
        wait_for_a_worker()
    _post(server, _events(30, "warm"))  # imports and first-use caches
    server.flush()
    sink.hold.clear()
    _post(server, _events(30, "block"))  # the sink now waits inside write
    gc.collect()
    before = len(gc.get_objects())
    n = 10_000
    for batch in range(n // 500):
        _post(server, _events(500, f"b{batch}"))
    writer = server.wl.writer
    assert writer.stats()["events_in_memory"] >= n
    gc.collect(0)
    cached = list(writer._cache.values())
    held = [e for events in cached if type(events) is not EventsJson for e in events]
    as_json = sum(len(events) for events in cached if type(events) is EventsJson)
    assert len(held) + as_json >= n
    assert as_json >= n if processes else as_json == 0
    assert not any(gc.is_tracked(e) for e in held)
    assert not any(gc.is_tracked(e.tags) for e in held)
    grown = len(gc.get_objects()) - before
    assert grown < n * 0.05, f"{grown} tracked objects more for {n} events"
    sink.hold.set()
    server.flush()
    assert len(sink.events) == n + 60


def test_sinks_get_models_unless_they_read_structs(server_factory: Any) -> None:
    """A sink written for models (no reads_structs) still gets pydantic models; one that
    reads structs gets them as they are, with the cost filled in, and the batch's JSON is
    what pydantic's dump gives, from the spool's bytes or encoded for any other list."""
    models_sink, structs = MemorySink(), StructSink()
    server = server_factory((models_sink, structs))
    raw = _events(12, "s")
    _post(server, raw)
    server.flush()
    assert all(isinstance(e, BaseModel) for e in models_sink.events)
    assert all(type(e) in EVENT_STRUCT_TYPES for e in structs.events)
    assert [e.event_id for e in structs.events] == [e["event_id"] for e in raw]
    prompt = structs.events[0]
    assert prompt.event_type == "prompt_call" and prompt.cost_source == "computed"
    assert prompt.tags == ("a", "b") and prompt.tool_calls[0].tool_name == "search"
    assert prompt.timestamp.tzinfo is not None and prompt.project_id == "acme"
    for got, want in zip(structs.events, models_sink.events, strict=True):
        assert to_model(got).model_dump() == want.model_dump()
    want_json = json.loads(EVENT_LIST_ADAPTER.dump_json(models_sink.events, exclude_none=True))
    (batch,) = structs.batches
    assert type(batch) is EventBatch and batch.payloads  # the spool's own bytes
    _same_json(json.loads(structs.json[0]), want_json)
    _same_json(json.loads(batch_json(list(batch))), want_json)  # encoded
    lines = batch_json_lines(batch).splitlines()
    _same_json([json.loads(line) for line in lines], want_json)


class _Redactor:
    """A third-party plugin with both event hooks."""

    def __init__(self) -> None:
        self.seen: list[type] = []

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> str | None:
        self.seen.append(type(event))
        return "no secrets" if event.event_id.endswith("-secret") else None

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        for event in events:
            self.seen.append(type(event))
            event.tags = [*event.tags, "redacted"]
            if event.event_type == "prompt_call":
                event.model = "gpt-4o"  # normalised, before the built-in cost sees it


@pytest.mark.parametrize("big", [False, True], ids=["inline", "worker-thread"])
def test_plugin_hooks_get_models_and_their_changes_are_kept(server_factory: Any, big: bool) -> None:
    plugin, structs = _Redactor(), StructSink()
    server = server_factory((plugin, structs))
    raw = _events(300 if big else 6, "p")
    raw.append(prompt_call("p-secret", model="gpt-4o"))
    raw[1]["model"] = "some-alias"
    r = server.client.post("/v1/events/batch", json={"events": raw}, headers=server.headers())
    assert r.status_code == 207, r.text
    assert [x["event_id"] for x in r.json()["rejected"]] == ["p-secret"]
    server.flush()
    assert plugin.seen and all(issubclass(t, BaseModel) for t in plugin.seen)
    assert len(structs.events) == len(raw) - 1
    # Back to structs for the sinks, with every change of the plugin and the cost after it.
    assert all(type(e) in EVENT_STRUCT_TYPES for e in structs.events)
    assert all(e.tags[-1] == "redacted" and type(e.tags) is tuple for e in structs.events)
    assert structs.events[1].model == "gpt-4o" and structs.events[1].cost_source == "computed"


def test_without_plugin_hooks_no_model_is_built(server_factory: Any, monkeypatch: Any) -> None:
    """The built-in cost works on the structs: a valid body never becomes models."""
    built: list[str] = []
    original = to_model

    def counting(struct: Any) -> Any:
        built.append(struct.event_id)
        return original(struct)

    monkeypatch.setattr("watchllm_ext.ingest.fast_validate.to_model", counting)
    structs = StructSink()
    server = server_factory((structs,))
    _post(server, _events(9, "n"))
    server.flush()
    assert len(structs.events) == 9 and built == []
    assert structs.events[1].cost_source == "computed"


def test_struct_json_is_pydantics() -> None:
    """encode_events of the structs and pydantic's dump_json(exclude_none=True) of the same
    events: same keys and values (None left out, defaults written, lists as arrays)."""
    from watchllm_ext.ingest.fast_validate import encode_events, validate_fast

    raw = _events(9, "j")
    structs = validate_fast(json.dumps(raw).encode(), "events")
    assert structs is not None
    models = EVENT_LIST_ADAPTER.validate_python(raw)
    _same_json(
        json.loads(encode_events(structs)),
        json.loads(EVENT_LIST_ADAPTER.dump_json(models, exclude_none=True)),
    )
    assert msgspec.json.decode(encode_events(structs))[2]["tags"] == ["step"]


def test_a_started_app_takes_its_start_up_objects_out_of_the_collector(
    server_factory: Any,
) -> None:
    """gc_freeze_at_start (default): once started, also when mounted, the objects alive then
    are frozen, so a full collection no longer walks them (tens of milliseconds of stopped
    event loop each, docs/PERFORMANCE.md); off, the collector is left as the host set it."""
    gc.unfreeze()
    try:
        off = server_factory(gc_freeze_at_start=False, durability="memory")
        _post(off, _events(3, "off"))
        assert gc.get_freeze_count() == 0
        off.stop()
        server = server_factory(durability="memory")
        assert gc.get_freeze_count() > 10_000  # modules, pydantic's schemas, the app
        _post(server, _events(3, "on"))
        young = len(gc.get_objects())
        assert young < gc.get_freeze_count()  # what a full collection still walks
    finally:
        gc.unfreeze()  # later tests start from the collector as it was
