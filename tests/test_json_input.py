"""The JSON insert path (migration 0010, store/rows.py input_json) stores row for row what the
Arrow path (tables_for) stores, on every store.

The same events go in both ways, under two project ids of one store, and every column of
every table that holds rows of an event is compared (ingested_at and rollup marks' times
aside, which are the time of the insert). Free-form JSON columns are compared by what they
read back as (rows.read_json): the spool's encoder (msgspec) writes 1e+20 as 1e20, pydantic
as 1e+20, and both mean the same; any difference of meaning, a JSON string read as an
object say, fails (so are prompts of chat messages). Everything else, the value_format of
each row included, is compared as stored.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from stores import EVERY_STORE, StoreBackend

from watchllm_ext.delivery.writer import EventBatch
from watchllm_ext.ingest.fast_validate import decode_stored, encode_events
from watchllm_ext.schema import EVENT_LIST_ADAPTER, MODELS_BY_TYPE
from watchllm_ext.store import Store, apply_migrations
from watchllm_ext.store import rows as rows_module
from watchllm_ext.store.rows import (
    JSON_INPUT_SETTINGS,
    SpoolPieces,
    input_json,
    read_json,
    tables_for,
)

pytestmark = EVERY_STORE

T0 = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
# Strings that parse as JSON (stored as JSON strings), strings that do not, and the rest.
TRICKY_STRINGS = [
    '{"a": 1}',
    "123",
    "true",
    "null",
    '"quoted"',
    " [1, 2] ",
    "NaN",
    "-Infinity",
    "[not json",
    "plain text",
    "",
    "é ü 中文 🎉 \u2028 \u0085 tab\there\nnewline \\ back",
    "\u0000nul",
    "x" * 3000,
]
JSON_VALUES: list[Any] = [
    None,
    {"q": "x", "n": [1, 2.5, None, True], "deep": {"a": {"b": [{}]}}},
    [1, "two", {"three": 3}],
    0,
    -7,
    2**63,
    1e20,
    5e-324,
    1.7976931348623157e308,
    0.1,
    True,
    False,
    {},
    [],
    {"é": "ü", "emoji": "🎉", "ctl": "\u0001\u001f", "ls": "\u2028"},
    *TRICKY_STRINGS,
]
TEXT_PROMPTS = [
    "hello",
    "[INST] hi [/INST]",
    "[",
    "[]",
    " [1]",
    "",
    "é🎉\u2028",
    '[{"role":"user"}]',
]


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def generated_events(seed: int = 10) -> list[dict[str, Any]]:
    """Every event type, every optional field set and left out, values at their extremes."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    times = [
        "1970-01-01T00:00:00Z",
        "2099-12-31T23:59:59.999Z",
        "2026-05-06T07:08:09.123456Z",
        "2026-05-06T12:38:09.5+05:30",
        "2026-05-06T07:08:09.999999Z",
    ]

    def base(i: int, event_type: str, full: bool) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": f"e-{i:04d}",
            "event_type": event_type,
            "run_id": f"run-{i % 7}" if i % 11 else "run.A:b-_9",
            "timestamp": times[i % len(times)]
            if i % 3 == 0
            else _iso(T0 + timedelta(milliseconds=i)),
        }
        if full:
            event.update(
                parent_event_id=f"e-{i - 1:04d}",
                user_id="user 'x' \"y\" é",
                session_id="s" * 256,
                tags=["t", "é🎉", "x" * 128],
                release="2026.1",
                env=rng.choice(["production", "staging", "development"]),
                client=rng.choice(
                    [
                        {"hostname": "h\u2028é", "sdk_version": "1.0", "platform": "py"},
                        {"hostname": "only-host"},
                        {},
                    ]
                ),
                metadata=rng.choice(
                    [{"a": None, "b": 1e20, "c": [1, {"d": "é"}], "big": 2**63}, {}, {"k": ""}]
                ),
            )
        return event

    i = 0
    for full in (False, True):
        for prompt in [None, *TEXT_PROMPTS, "chat", "chat-bare", "chat-content"]:
            i += 1
            event = base(i, "prompt_call", full)
            if prompt == "chat":
                event["prompt"] = [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "é🎉 \u2028", "name": "bob"},
                    {"role": "tool", "content": None, "tool_call_id": "call_1"},
                ]
            elif prompt == "chat-bare":
                event["prompt"] = [{"role": "user"}]
            elif prompt == "chat-content":
                event["prompt"] = [
                    {"role": "user", "content": [{"type": "text", "text": "[x]"}, {"n": 1e20}]}
                ]
            elif prompt is not None:
                event["prompt"] = prompt
            if full:
                event.update(
                    model="gpt-4o",
                    provider="openai",
                    tokens_input=rng.choice([0, 4_294_967_295, 123]),
                    tokens_output=rng.choice([0, 4_294_967_295, 45]),
                    cost_estimate_usd=rng.choice([0.0, 1_000_000.0, 5e-324, 0.1]),
                    response="réponse \u0000 ok",
                    response_metadata=rng.choice([{}, {"finish": "stop", "n": [1.5, None]}]),
                    status=rng.choice(["success", "error", "timeout", "warning"]),
                    latency_ms=rng.choice([0.0, 2_592_000_000.0, 1.25]),
                    error_message="boom 'é'",
                    tool_calls=[
                        {
                            "tool_name": f"tool-{k}",
                            "id": f"call-{k}" if k % 2 else None,
                            "tool_input": JSON_VALUES[(i + k) % len(JSON_VALUES)],
                            "tool_output": JSON_VALUES[(3 * i + k) % len(JSON_VALUES)],
                            "status": "error" if k % 3 == 0 else None,
                            "latency_ms": 2_592_000_000.0 if k == 1 else None,
                            "error_message": "x" if k == 2 else None,
                        }
                        for k in range(i % 4)
                    ],
                )
            out.append(event)
    for k, value in enumerate(JSON_VALUES):
        i += 1
        event = base(i, "tool_call", k % 2 == 0)
        event.update(tool_name="search é", tool_input=value)
        event["tool_output"] = JSON_VALUES[(k * 5 + 1) % len(JSON_VALUES)]
        if k % 3 == 0:
            event.update(status="error", latency_ms=1.5, error_message="bad")
        out.append(event)
        i += 1
        event = base(i, "assertion_failed", k % 2 == 1)
        event.update(assertion_name="same", expected=value, severity="critical")
        event["actual"] = JSON_VALUES[(k * 7 + 2) % len(JSON_VALUES)]
        out.append(event)
    for full in (False, True):
        i += 1
        event = base(i, "agent_step", full)
        event["step_number"] = 4_294_967_295 if full else 0
        if full:
            event.update(
                step_name="plan",
                reasoning="r" * 5000,
                action="act é",
                observation="\u2028",
                status="timeout",
                latency_ms=0.0,
            )
        out.append(event)
        i += 1
        event = base(i, "error", full)
        event["error_type"] = "ValueError"
        event["error_message"] = "m\u2028é" if full else ""
        if full:
            event["stack_trace"] = "Traceback\n  é"
        out.append(event)
        i += 1
        event = base(i, "hallucination_detected", full)
        event.update(detection_method="judge", confidence=1.0 if full else 0.0, claim="c")
        if full:
            event.update(evidence="ev", severity="info")
        out.append(event)
        i += 1
        event = base(i, "cost_threshold_exceeded", full)
        event.update(threshold_usd=0.0, actual_usd=1e6 if full else 0.1, window="1h")
        out.append(event)
        i += 1
        event = base(i, "performance_alert", full)
        event.update(metric="p99", threshold=1e15 if full else 0.1, actual=5e-324, window="5m")
        out.append(event)
    assert {e["event_type"] for e in out} == set(MODELS_BY_TYPE)
    return [{k: v for k, v in e.items() if v is not None or k != "tool_calls"} for e in out]


def models_of(raw: list[dict[str, Any]], project: str) -> list[Any]:
    return EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": project} for e in raw])


# Per table: its key (rows sort by it) and its free-form JSON columns.
TABLES = {
    "events": (
        "event_id",
        ("metadata", "response_metadata", "tool_input", "tool_output", "expected", "actual"),
    ),
    "tool_calls": ("event_id, call_index", ("tool_input", "tool_output")),
    "agent_steps": ("event_id", ()),
    "event_ids": ("event_id, timestamp", ()),
    "event_children": ("event_id, timestamp", ()),
    "rollup_marks": ("hour", ()),
}


def rows_of(store: Store, project: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for table, (order, free_form) in TABLES.items():
        rows = store.query(
            f"SELECT * FROM {table} WHERE project_id = {{p:String}} ORDER BY {order}",
            {"p": project},
        )
        for row in rows:
            row.pop("project_id")
            row.pop("ingested_at", None)
            row.pop("marked_at", None)
            for column in free_form:
                row[column] = ("json", read_json(row[column]))
            if row.get("value_format") == 2:  # chat messages as JSON
                row["prompt"] = ("json", read_json(row["prompt"]))
        out[table] = rows
    return out


def insert_both_ways(store: Store, raw: list[dict[str, Any]], structs: bool) -> None:
    for table, data in tables_for(models_of(raw, "arrow")).items():
        store.insert(table, data)
    events = models_of(raw, "json")
    if structs:  # the server's structs, as the writer hands them to the sink
        events = decode_stored(EVENT_LIST_ADAPTER.dump_json(events, exclude_none=True))
    bodies = input_json(events)
    assert list(bodies) == ["event_parts_input", "events_input"]
    for table, body in bodies.items():
        store.insert_json(table, body, JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("structs", [False, True], ids=["models", "structs"])
def test_json_path_stores_what_the_arrow_path_stores(store: Store, structs: bool) -> None:
    raw = generated_events()
    insert_both_ways(store, raw, structs)
    arrow, got = rows_of(store, "arrow"), rows_of(store, "json")
    for table in TABLES:
        assert len(got[table]) == len(arrow[table]), table
        for a, b in zip(arrow[table], got[table], strict=True):
            assert b == a, (table, a.get("event_id"))
    # The generated events reach every branch of the views.
    assert len(arrow["tool_calls"]) > 20 and len(arrow["agent_steps"]) == 2
    formats = {r["value_format"] for r in arrow["events"]}
    assert formats == {1, 2}


def test_rows_hold_exactly_the_tricky_text(store: Store) -> None:
    # Beyond meaning: the stored text itself, for strings that ClickHouse unescapes.
    raw = [
        {
            "event_id": f"t-{k}",
            "event_type": "tool_call",
            "run_id": "r",
            "timestamp": "2026-05-06T07:08:09.123Z",
            "tool_name": "t",
            "tool_input": text,
            "tool_output": {"text": text},
        }
        for k, text in enumerate(TRICKY_STRINGS)
    ]
    insert_both_ways(store, raw, structs=True)
    for project in ("arrow", "json"):
        rows = store.query(
            "SELECT event_id, tool_input, tool_output FROM events"
            " WHERE project_id = {p:String} ORDER BY toUInt32(substring(event_id, 3))",
            {"p": project},
        )
        assert [read_json(r["tool_input"]) for r in rows] == TRICKY_STRINGS
        assert [json.loads(r["tool_output"]) for r in rows] == [{"text": t} for t in TRICKY_STRINGS]


def test_the_writers_batch_goes_as_its_spool_records_bytes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = [e for e in generated_events() if not e.get("tool_calls") and "prompt" not in e]
    raw = [e for e in raw if e["event_type"] not in ("tool_call", "agent_step", "assertion_failed")]
    structs = decode_stored(EVENT_LIST_ADAPTER.dump_json(models_of(raw, "json")))
    records = [encode_events(structs[:3]), b"[]", encode_events(structs[3:])]
    batch = EventBatch(structs)  # as the writer hands it to the sink
    batch.payloads = records
    calls: list[Any] = []

    def encode(events: Any) -> bytes:
        calls.append(events)
        return encode_events(events)

    bodies = input_json(batch, encode)
    assert list(bodies) == ["events_input"] and calls == []  # nothing encoded
    body = bodies["events_input"]
    # Each piece is made as the store takes it (and let go of before the next), anew each time
    # the body is read: a store that reads it twice gets it all twice.
    assert isinstance(body, SpoolPieces)
    pieces = list(body)
    assert list(body) == pieces
    # Small records are joined into one piece (a store pays a call per piece)...
    assert len(pieces) == 1 and isinstance(pieces[0], bytes)
    assert json.loads(b"".join(pieces)) == json.loads(encode_events(structs))
    # ...large ones go as views of the records themselves, no copies.
    monkeypatch.setattr(rows_module, "OWN_PIECE_BYTES", 1)
    large = list(input_json(batch, encode)["events_input"])
    views = [p for p in large if isinstance(p, memoryview)]
    assert [v.obj for v in views] == [records[0], records[2]]
    assert b"".join(large) == b"".join(pieces)
    store.insert_json("events_input", pieces, JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]
    rows = store.query("SELECT count() AS n FROM events WHERE project_id = 'json'")
    assert rows == [{"n": len(structs)}]
    # Any other list (the sink's selection after dropping stored copies) is encoded.
    assert input_json(structs[:2], encode) == {"events_input": encode_events(structs[:2])}
    assert calls == [structs[:2]]


def test_a_store_from_before_0010_upgrades_and_keeps_one_copy(store_backend: StoreBackend) -> None:
    """A store whose events went in before migration 0010 (the Arrow path, no event_ids)
    gets event_ids filled by the migration, and the store sink, now on the JSON path, keeps
    copies of those events out, whatever their timestamp."""
    from watchllm_ext.builtins.store_sink import StoreSink
    from watchllm_ext.store import load_migrations
    from watchllm_ext.store.migrations import tracking_table_statements

    old = store_backend.open("upgrade")
    try:
        # The schema as it was before 0010: every earlier migration, recorded as applied.
        for statement in tracking_table_statements(None):
            old.execute(statement)
        for migration in load_migrations():
            if migration.version >= 10:
                continue
            for statement in migration.statements():
                old.execute(statement)
            old.execute(
                "INSERT INTO schema_migrations (version, name, checksum)"
                " SELECT {v:UInt32}, {n:String}, {c:String}",
                {"v": migration.version, "n": migration.name, "c": migration.checksum},
            )
        raw = [e for e in generated_events() if e["event_type"] in ("prompt_call", "tool_call")]
        earlier = raw[:20]
        for table, data in tables_for(models_of(earlier, "acme")).items():
            old.insert(table, data)
        tables = {r["name"] for r in old.query("SELECT name FROM system.tables")}
        assert "event_ids" not in tables and "events_input" not in tables
        assert apply_migrations(old)[0] == "0010_json_input"  # and any later ones
        (row,) = old.query("SELECT count() AS n FROM event_ids WHERE project_id = 'acme'")
        assert row["n"] == len(earlier)
        # Copies of the stored events, a minute later, and new events, through the sink.
        copies = [{**e, "timestamp": "2026-07-01T00:00:00Z"} for e in earlier]
        sink = StoreSink(old)
        sink._write(models_of(copies + raw[20:], "acme"))
        rows = old.query(
            "SELECT event_id, toString(timestamp) AS ts FROM events FINAL"
            " WHERE project_id = 'acme' ORDER BY event_id"
        )
        assert len(rows) == len(raw)
        assert all(r["ts"] != "2026-07-01 00:00:00.000" for r in rows)
    finally:
        old.close()


def test_an_insert_keeps_its_rows_as_sent_and_reads_collapse_copies(store: Store) -> None:
    """optimize_on_insert = 0 (JSON_INPUT_SETTINGS): an insert is not merged on its way in
    (that pass was half of chDB's CPU for 50,000 events), so two rows of one key in one
    insert are both written; FINAL, as every counting read, still counts one. (The sink
    never sends one key twice in an insert.)"""
    raw = [e for e in generated_events() if e["event_type"] == "prompt_call"][:3]
    events = models_of(raw + raw[:1], "dup")  # the first event twice, same key
    body = input_json(events)["events_input"]
    store.insert_json("events_input", body, JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]
    count = "SELECT count() AS n FROM events{final} WHERE project_id = 'dup'"
    assert store.query(count.format(final="")) == [{"n": 4}]
    assert store.query(count.format(final=" FINAL")) == [{"n": 3}]
    # With the merge on insert (ClickHouse's default) the copy is gone at once: the setting
    # is what changes it.
    store.insert_json(  # type: ignore[attr-defined]
        "events_input", body, {**JSON_INPUT_SETTINGS, "optimize_on_insert": 1}
    )
    assert store.query(count.format(final="")) == [{"n": 7}]


def test_pieces_of_any_mix_of_records_make_the_batchs_json() -> None:
    """Whatever the sizes of the records (empty, small ones joined, large ones on their own,
    in any order), the pieces are the events' JSON array, byte for byte."""
    raw = [e for e in generated_events() if not e.get("tool_calls") and "prompt" not in e]
    structs = decode_stored(EVENT_LIST_ADAPTER.dump_json(models_of(raw, "json")))
    rng = random.Random(5)
    for _ in range(200):
        records: list[bytes] = []
        events: list[Any] = []
        while len(records) < rng.randint(1, 12):
            n = rng.choice([0, 0, 1, 2, len(structs)])
            chosen = rng.sample(structs, min(n, len(structs)))
            records.append(encode_events(chosen))
            events += chosen
        batch = EventBatch(events)
        batch.payloads = records
        own = rng.choice([1, 200, 5_000, 1 << 30])
        piece = rng.choice([1, 300, 10_000, 1 << 20])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rows_module, "OWN_PIECE_BYTES", own)
            patch.setattr(rows_module, "PIECE_BYTES", piece)
            made = rows_module.spool_pieces(batch)
            assert made is not None
            pieces = list(made)  # made as they are read: with the sizes patched here
        assert all(len(p) for p in pieces)
        assert b"".join(pieces) == encode_events(events)
