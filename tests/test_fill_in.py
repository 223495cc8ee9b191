"""The server fills in a missing event_id (a UUIDv7) and timestamp (the receipt time).

Over real HTTP into every store (tests/stores.py), on both routes and every ingest path: the
fast path, the slow path (a body with a bad event), and the big-body path validated off the
event loop in slices. Plus the UUIDv7 layout (RFC 9562), ids of one batch unique and in time
order, plugins seeing complete events, and the spool round-trip keeping the filled values.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import Running, prompt_call
from stores import EVERY_STORE

from watchllm_ext import hookimpl
from watchllm_ext.app import _decode_events, _encode_events, _encode_sliced
from watchllm_ext.auth import Principal
from watchllm_ext.ingest.fill_in import receipt_time, uuid7
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES, finish_fast
from watchllm_ext.plugins import get_plugin_manager
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.settings import Settings

BATCH = "/v1/events/batch"
PROJECT = "/v1/projects/acme/events"
GIVEN_TS = "2026-01-02T03:04:05.678Z"
GIVEN_INSTANT = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def bare(n: int, *, keep_id: bool = False, keep_ts: bool = False, **fields: Any) -> dict[str, Any]:
    """A prompt_call without event_id and/or timestamp."""
    event = prompt_call(f"client-{n}", run_id=f"fill-{n}", **fields)
    if not keep_id:
        del event["event_id"]
    if not keep_ts:
        del event["timestamp"]
    return event


def uuid7_ms(text: str) -> int:
    """The Unix milliseconds of a UUIDv7, after checking its text form, version and variant."""
    value = uuid.UUID(text)
    assert str(value) == text, text  # canonical: lower case, hyphenated
    assert value.version == 7, text
    assert value.variant == uuid.RFC_4122, text  # the 10 variant bits of RFC 9562
    return value.int >> 80


def ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000 + 0.5)


def stored(server: Running) -> dict[str, dict[str, Any]]:
    server.flush()
    # Milliseconds as an integer: the same on every store (stores differ in datetime types).
    rows = server.query(
        "SELECT event_id, run_id, toUnixTimestamp64Milli(timestamp) AS ts_ms FROM events FINAL"
    )
    return {row["run_id"]: row for row in rows}


def post(server: Running, path: str, body: Any) -> tuple[dict[str, Any], int, int]:
    """The answer and the request's bounds in Unix ms (the receipt time lies between)."""
    before = time.time_ns() // 1_000_000
    r = server.client.post(path, json=body, headers=server.headers())
    after = time.time_ns() // 1_000_000
    assert r.status_code in (202, 207), r.text
    return r.json(), before, after


def check_filled(
    rows: dict[str, dict[str, Any]],
    sent: list[dict[str, Any]],
    answer_ids: list[str],
    before: int,
    after: int,
) -> None:
    """Each accepted event (in `sent` order, as the answer lists them) stored with its own
    or a server id and timestamp; server ids UUIDv7 from the request's time, in order."""
    assert len(answer_ids) == len(sent) == len(set(answer_ids))
    server_ids: list[str] = []
    receipt: set[int] = set()
    for event, answered in zip(sent, answer_ids, strict=True):
        row = rows[event["run_id"]]
        assert row["event_id"] == answered  # the answer names what is stored
        if "event_id" in event:
            assert answered == event["event_id"]
        else:
            assert before <= uuid7_ms(answered) <= after, (before, answered, after)
            server_ids.append(answered)
        stamp = int(row["ts_ms"])
        if "timestamp" in event:
            assert stamp == ms(GIVEN_INSTANT)
        else:
            assert before <= stamp <= after, (before, stamp, after)
            receipt.add(stamp)
    assert len(receipt) <= 1, receipt  # one receipt time per request
    # Server ids of one request sort by creation time: in the order of the events.
    assert server_ids == sorted(server_ids)
    assert [uuid.UUID(i).int for i in server_ids] == sorted(uuid.UUID(i).int for i in server_ids)


# --- the UUIDv7 itself --------------------------------------------------------------------------


def test_uuid7_layout_and_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # many share a millisecond: the counter keeps them in order
    for text in ids:
        assert before <= uuid7_ms(text) <= after
    # The random parts vary: not a counter from zero, not a constant tail.
    assert len({i[-8:] for i in ids}) > 4900
    assert len({uuid.UUID(i).int >> 64 & 0xFFF for i in ids[::1000]}) > 1


def test_uuid7_from_many_threads_is_unique_and_ordered_per_thread() -> None:
    per_thread: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        for _ in range(2000):
            out.append(uuid7())

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in per_thread for i in out]
    assert len(set(every)) == len(every)
    for out in per_thread:
        assert out == sorted(out)


def test_receipt_time_is_whole_milliseconds_in_utc() -> None:
    before = time.time_ns() // 1_000_000
    stamp = receipt_time()
    after = time.time_ns() // 1_000_000
    assert stamp.tzinfo is UTC and stamp.microsecond % 1000 == 0
    assert before <= ms(stamp) <= after


# --- through the real server, every store ------------------------------------------------------


@EVERY_STORE
def test_fast_path_on_both_routes(server: Running) -> None:
    one = bare(0)
    answer, before, after = post(server, PROJECT, one)
    assert answer["accepted"] == 1
    sent = [bare(1), bare(2, keep_id=True), bare(3, keep_ts=True), *[bare(n) for n in range(4, 40)]]
    answer2, before2, after2 = post(server, BATCH, {"events": sent})
    rows = stored(server)
    check_filled(rows, [one], answer["event_ids"], before, after)
    check_filled(rows, sent, answer2["event_ids"], before2, after2)
    # A request's filled timestamps are one receipt time; another request has its own id.
    assert not set(answer["event_ids"]) & set(answer2["event_ids"])


@EVERY_STORE
def test_null_is_the_same_as_left_out(server: Running) -> None:
    sent = [{**bare(0), "event_id": None, "timestamp": None}]
    answer, before, after = post(server, PROJECT, sent)
    rows = stored(server)
    check_filled(rows, [bare(0)], answer["event_ids"], before, after)


@EVERY_STORE
def test_slow_path_with_a_bad_event(server: Running) -> None:
    sent = [bare(0), bare(1, keep_ts=True), bare(2, tokens_input=-5), bare(3, keep_id=True)]
    for path in (BATCH, PROJECT):
        body = {"events": sent} if path == BATCH else sent
        answer, before, after = post(server, path, body)
        assert [r["index"] for r in answer["rejected"]] == [2]
        assert "event_id" not in answer["rejected"][0]  # the client gave none
        good = [e for i, e in enumerate(sent) if i != 2]
        rows = stored(server)
        assert sent[2]["run_id"] not in rows
        check_filled(rows, good, answer["event_ids"], before, after)
        # New run ids, and new client ids (a client id sent again is a retry, not stored).
        renamed = ("run_id", "event_id")
        sent = [{k: v + "-2" if k in renamed else v for k, v in e.items()} for e in sent]


@EVERY_STORE
@pytest.mark.parametrize("with_bad_event", [False, True], ids=["all-valid", "one-bad"])
def test_big_body_off_the_event_loop(server: Running, with_bad_event: bool) -> None:
    pad = "x" * 400
    sent = [bare(n, keep_id=n % 7 == 0, keep_ts=n % 5 == 0, prompt=pad) for n in range(400)]
    if with_bad_event:
        sent[123]["tokens_input"] = -1
    body = {"events": sent}
    assert len(json.dumps(body)) > 2 * OFFLOAD_MIN_BYTES  # off the loop, in slices
    answer, before, after = post(server, BATCH, body)
    good = [e for i, e in enumerate(sent) if not (with_bad_event and i == 123)]
    assert answer["accepted"] == len(good)
    check_filled(stored(server), good, answer["event_ids"], before, after)


class SeesEvents:
    """Records what the validator and transform hooks are given."""

    def __init__(self) -> None:
        self.validated: list[tuple[Any, Any]] = []
        self.transformed: list[tuple[Any, Any]] = []

    @hookimpl
    def validate_event(self, event: Any, principal: Principal) -> str | None:
        self.validated.append((event.event_id, event.timestamp))
        return "refused by the plugin" if event.run_id == "fill-refused" else None

    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        self.transformed.extend((e.event_id, e.timestamp) for e in events)


def test_plugins_see_complete_events(server_factory: Any) -> None:
    plugin = SeesEvents()
    server = server_factory(plugin_objects=(plugin,))
    refused = {**bare(2), "run_id": "fill-refused"}
    answer, before, after = post(server, BATCH, {"events": [bare(0), refused, bare(1)]})
    assert len(plugin.validated) == 3
    assert [i for i, _ in plugin.validated[::2]] == answer["event_ids"]
    assert plugin.transformed == plugin.validated[::2]
    # A refused event is reported by index alone: the id made for it was never the client's.
    assert answer["rejected"] == [
        {"index": 1, "errors": [{"field": "(event)", "message": "refused by the plugin"}]}
    ]
    for event_id, stamp in plugin.validated:
        assert before <= uuid7_ms(event_id) <= after
        assert before <= ms(stamp) <= after


# --- the stored contract -----------------------------------------------------------------------


def test_spool_round_trip_keeps_the_filled_values() -> None:
    pm = get_plugin_manager(Settings(create_default_key=False), ())
    principal = Principal(project_id="acme", scopes=frozenset({"ingest"}))
    events = EVENT_LIST_ADAPTER.validate_python([bare(0), bare(1, keep_id=True), bare(2)])
    assert all(e.event_id is None or e.timestamp is None for e in events)
    accepted = finish_fast(events, principal, pm).accepted
    want = [(e.event_id, e.timestamp) for e in accepted]
    assert all(i is not None and t is not None for i, t in want)
    for payload in (_encode_events(accepted), _encode_sliced(accepted).payload):
        back = _decode_events(payload)
        assert [(e.event_id, e.timestamp) for e in back] == want


@pytest.mark.parametrize("left_out", [["event_id"], ["timestamp"], ["event_id", "timestamp"]])
def test_a_stored_event_without_them_is_refused(left_out: list[str]) -> None:
    """The input form may omit them; the stored form (spool, dead letters) may not: such a
    record is refused on read, and the writer dead-letters it as undecodable."""
    event = prompt_call("stored-1")
    for name in left_out:
        del event[name]
    with pytest.raises(ValueError, match=" or ".join(left_out)):
        _decode_events(EVENT_LIST_ADAPTER.dump_json(EVENT_LIST_ADAPTER.validate_python([event])))
