"""Event bodies validated and encoded in worker processes (events_worker.py, otel/pool.py):
the same answers and the same rows as in the server's own process, exactly once, the
detailed answers for bad bodies, plugins that must see the events kept in the server, and
nothing lost when a worker dies.

Real worker processes (`python -m watchllm_ext.otel.worker`), a real server on loopback, real
chDB. Bodies are made big enough (64 KiB and more) to go to a worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Running
from test_bad_input import ADMIN, BATCH, CASES, PROJECT
from test_json_input import generated_events
from test_otel_workers import wait_for_a_worker

import watchllm_ext.app as app_module
from watchllm_ext.delivery.writer import EventBatch, EventsJson, EventsJsonBatch
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.ingest.fill_in import receipt_time
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.ingest.worker import (
    JOB_MARK,
    EventsJob,
    answer_job,
    decode_answer,
    encode_job,
    work,
)
from watchllm_ext.otel import pool
from watchllm_ext.otel.frames import body_first
from watchllm_ext.otel.worker import encode_request
from watchllm_ext.quota import QuotaDecision

TABLES = {
    "events": "SELECT * EXCEPT (ingested_at, received_at) FROM events FINAL",
    "tool_calls": "SELECT * EXCEPT ingested_at FROM tool_calls FINAL",
    "agent_steps": "SELECT * EXCEPT ingested_at FROM agent_steps FINAL",
}


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "START_RETRY_S", 0.2)


def many_events(copies: int = 4, prefix: str = "w") -> list[dict[str, Any]]:
    """Every event type with its extremes (test_json_input), `copies` times under other ids,
    and prompt calls whose cost the server computes (a library price, a custom one)."""
    out: list[dict[str, Any]] = []
    for copy in range(copies):
        for event in generated_events(seed=copy):
            event = dict(event)
            event["event_id"] = f"{prefix}{copy}-{event['event_id']}"
            if "parent_event_id" in event:
                event["parent_event_id"] = f"{prefix}{copy}-{event['parent_event_id']}"
            out.append(event)
        for k, model in enumerate(["gpt-4o", "gemini-1.5-flash", "my-model", "no-such-model"]):
            out.append(
                {
                    "event_id": f"{prefix}{copy}-cost-{k}",
                    "event_type": "prompt_call",
                    "run_id": "r",
                    "timestamp": "2026-05-06T07:08:09.123Z",
                    "model": model,
                    "tokens_input": 100_000 * (k + 1),
                    "tokens_output": 777,
                }
            )
    return out


def batch_body(events: list[dict[str, Any]]) -> bytes:
    body = json.dumps({"events": events}).encode()
    assert len(body) >= OFFLOAD_MIN_BYTES
    return body


def answers_and_rows(
    server_factory: Any,
    folder: Path,
    processes: int,
    posts: list[tuple[str, bytes]],
    plugin_objects: tuple[Any, ...] = (),
    **settings: Any,
) -> tuple[list[tuple[int, Any]], dict[str, list[dict[str, Any]]], str]:
    """Start a server (one at a time: chDB opens one folder per process), post the bodies
    ((path, body)), stop it: the answers, the rows of every table, the metrics."""
    running: Running = server_factory(
        plugin_objects=plugin_objects,
        ingest_worker_processes=processes,
        data_dir=folder,
        model_prices={"my-model": [1.5, 2.5]},
        **settings,
    )
    if processes:
        wait_for_a_worker()
    answers = []
    for path, body in posts:
        got = running.client.post(path, content=body, headers=running.headers())
        answers.append((got.status_code, got.json()))
    running.flush()
    rows = {
        name: running.query(f"{sql} ORDER BY event_id, timestamp") for name, sql in TABLES.items()
    }
    metrics = running.client.get("/metrics").text
    running.stop()
    return answers, rows, metrics


def post_batch(running: Running, events: list[dict[str, Any]], check_size: bool = True) -> Any:
    body = batch_body(events) if check_size else json.dumps({"events": events}).encode()
    return running.client.post("/v1/events/batch", content=body, headers=running.headers())


def bodies_count(metrics: str, where: str) -> float:
    prefix = f'watchllm_ingest_bodies_total{{where="{where}"}} '
    found = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(found[0].removeprefix(prefix)) if found else 0.0


def test_a_worker_stores_a_body_as_the_server_does(server_factory: Any, tmp_path: Path) -> None:
    events = many_events()
    half = len(events) // 2
    small = many_events(copies=1, prefix="small")[:30]
    posts = [
        ("/v1/events/batch", batch_body(events[:half])),
        ("/v1/events/batch", json.dumps({"events": small[:15]}).encode()),
        ("/v1/projects/acme/events", json.dumps(events[half:]).encode()),
        ("/v1/projects/acme/events", json.dumps(small[15:]).encode()),
    ]
    events += small
    # Small bodies (the server's) and big ones (a worker's) in the store sink's batches.
    here = answers_and_rows(server_factory, tmp_path / "here", 0, posts, flush_interval_s=3)
    there = answers_and_rows(server_factory, tmp_path / "there", 1, posts, flush_interval_s=3)
    assert (bodies_count(here[2], "worker"), bodies_count(here[2], "server")) == (0, 2)
    assert (bodies_count(there[2], "worker"), bodies_count(there[2], "server")) == (2, 0)
    assert here[0] == there[0]
    assert [status for status, _ in there[0]] == [202] * 4
    assert sum(answer["accepted"] for _, answer in there[0]) == len(events)
    for table in TABLES:
        assert here[1][table] == there[1][table], table
    by_id = {row["event_id"]: row for row in there[1]["events"]}
    assert len(by_id) == len(events)
    # The cost estimate ran in the worker: the library's price, the custom one, none known.
    costs = {
        model: by_id[f"w0-cost-{k}"]
        for k, model in enumerate(["gpt-4o", "gemini-1.5-flash", "my-model", "no-such-model"])
    }
    assert costs["gpt-4o"]["cost_source"] == costs["gemini-1.5-flash"]["cost_source"] == "computed"
    assert costs["my-model"]["cost_estimate_usd"] == pytest.approx(
        (300_000 * 1.5 + 777 * 2.5) / 1e6
    )
    assert costs["no-such-model"]["cost_source"] == "unknown"
    assert len(there[1]["tool_calls"]) > 0 and len(there[1]["agent_steps"]) > 0


def test_the_worker_fills_in_ids_and_timestamps(server_factory: Any) -> None:
    running: Running = server_factory(ingest_worker_processes=1)
    wait_for_a_worker()
    error = {"event_type": "error", "run_id": "r", "error_type": "E", "error_message": "m" * 300}
    events = [error] * 400
    before = receipt_time()
    got = running.client.post(
        "/v1/events/batch", content=batch_body(events), headers=running.headers()
    )
    after = receipt_time()
    assert got.status_code == 202, got.text
    answer = got.json()
    assert answer["project_id"] == "acme" and answer["accepted"] == 400
    ids = answer["event_ids"]
    assert len(set(ids)) == 400 and all(len(i) == 36 and i[14] == "7" for i in ids)  # UUIDv7
    running.flush()
    rows = running.query("SELECT event_id, timestamp FROM events FINAL WHERE project_id = 'acme'")
    assert sorted(r["event_id"] for r in rows) == sorted(ids)
    stamps = {r["timestamp"] for r in rows}
    assert len(stamps) == 1  # the request's receipt time, for every event
    (stamp,) = stamps
    assert before.isoformat()[:19] <= stamp.replace(" ", "T")[:19] <= after.isoformat()[:19]
    assert bodies_count(running.client.get("/metrics").text, "worker") == 1


def test_copies_are_stored_once(server_factory: Any) -> None:
    """A body sent twice, and ids repeated inside a body: the first copy stored, once (the
    store sink reads the worker's records then)."""
    running: Running = server_factory(ingest_worker_processes=1)
    wait_for_a_worker()
    events = many_events(copies=3)
    repeated = [*events, *[{**e, "run_id": "second-copy"} for e in events[:50]]]
    for body in (batch_body(events), batch_body(events), batch_body(repeated)):
        got = running.client.post("/v1/events/batch", content=body, headers=running.headers())
        assert got.status_code == 202, got.text
        running.flush()
    rows = running.query("SELECT event_id, run_id FROM events WHERE project_id = 'acme'")
    assert len(rows) == len(events)
    assert "second-copy" not in {r["run_id"] for r in rows}
    assert bodies_count(running.client.get("/metrics").text, "worker") == 3


def test_bad_bodies_get_the_servers_detailed_answers(server_factory: Any, tmp_path: Path) -> None:
    events = many_events(copies=3)
    bad = [dict(e) for e in events]
    bad[7]["tokens_input"] = -1 if bad[7]["event_type"] == "prompt_call" else None
    bad[7]["run_id"] = "no spaces allowed"
    other = [dict(e) for e in events]
    other[5]["project_id"] = "someone-else"
    posts = [
        ("/v1/events/batch", batch_body(bad)),
        ("/v1/events/batch", batch_body(other)),
        ("/v1/events/batch", json.dumps({"events": events, "extra": "x" * 10}).encode()),
    ]
    here = answers_and_rows(server_factory, tmp_path / "here", 0, posts)
    there = answers_and_rows(server_factory, tmp_path / "there", 1, posts)
    assert here[0] == there[0]
    statuses = [status for status, _ in there[0]]
    assert statuses == [207, 403, 422]
    assert there[0][0][1]["rejected"][0]["index"] == 7
    assert there[0][1][1]["field"] == "events[5].project_id"
    assert here[1] == there[1]
    # The 403 came from the worker's fast path; the others were declined there and answered
    # in detail, there too.
    assert (bodies_count(there[2], "worker"), bodies_count(there[2], "declined")) == (1, 2)


def test_what_only_pydantic_reads_is_answered_in_detail_by_the_worker(
    server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free-form JSON nested deeper than the fast validator reads: the worker gives the
    detailed answer (parsing such a body took seconds of the GIL on a server thread, the
    event loop held meanwhile), the same as the server's. Its record holds events msgspec
    does not read back: sent again, the store sink finds the copies (pydantic reads them)
    and stores nothing twice, where it failed and retried for ever."""
    deep = json.loads('{"a":' * 190 + "1" + "}" * 190)

    def events(prefix: str) -> list[dict[str, Any]]:
        return [
            {"event_id": f"{prefix}-{i}", "event_type": "error", "run_id": "r",
             "error_type": "E", "error_message": "m", "metadata": deep,
             "timestamp": "2026-05-06T07:08:09.123Z"}
            for i in range(60)
        ]  # fmt: skip

    bad = events("bad")
    bad[30]["run_id"] = "no spaces allowed"
    posts = [("/v1/events/batch", batch_body(body)) for body in (events("deep"),) * 2]
    posts.append(("/v1/events/batch", batch_body(bad)))
    here = answers_and_rows(server_factory, tmp_path / "here", 0, posts)

    def not_here(body: bytes) -> None:
        raise AssertionError("a body the worker took was parsed in the server")

    monkeypatch.setattr(app_module, "parse_events_json", not_here)  # (the worker's is its own)
    there = answers_and_rows(server_factory, tmp_path / "there", 1, posts)
    assert here[0] == there[0]
    assert [status for status, _ in there[0]] == [202, 202, 207]
    assert there[0][2][1]["rejected"] == [
        {
            "index": 30,
            "event_id": "bad-30",
            "errors": [
                {
                    "field": "run_id",
                    "message": there[0][2][1]["rejected"][0]["errors"][0]["message"],
                }
            ],
        }
    ]
    assert here[1] == there[1]
    assert len(there[1]["events"]) == 60 + 59
    assert bodies_count(there[2], "declined") == 3 and bodies_count(there[2], "worker") == 0


def padded_bodies() -> list[tuple[str, str, bytes]]:
    """The bad-input table's cases whose body holds events (test_bad_input.py), each made a
    big body: its events first (the rejections keep their indices), then valid ones."""
    out = []
    for case in CASES:
        body = case.body() if callable(case.body) else case.body
        if case.auth != ADMIN or case.settings or case.headers or case.chunked:
            continue
        if case.path == BATCH and isinstance(body, dict) and isinstance(body.get("events"), list):
            events, wrap = body["events"], lambda es, body=body: {**body, "events": es}
        elif case.path == PROJECT and isinstance(body, dict | list):
            events, wrap = body if isinstance(body, list) else [body], lambda es: es
        else:
            continue  # not JSON holding events: never a worker's (it declines or never sees it)
        padding = many_events(copies=2, prefix=f"pad-{case.id}-")
        out.append((case.id, case.path, json.dumps(wrap([*events, *padding])).encode()))
    assert len(out) >= 25
    return out


def test_the_bad_input_table_in_big_bodies_gets_the_same_answers(
    server_factory: Any, tmp_path: Path
) -> None:
    """Every way an event can be wrong, in a body big enough for the worker: the same answer
    (status, error, rejections with their fields, counts) and the same rows as in-process."""
    bodies = padded_bodies()
    posts = [(path, body) for _, path, body in bodies]
    here = answers_and_rows(server_factory, tmp_path / "here", 0, posts)
    there = answers_and_rows(server_factory, tmp_path / "there", 1, posts)

    def comparable(answer: dict[str, Any]) -> dict[str, Any]:
        # Ids the server made (UUIDv7) differ between two servers; everything else may not.
        return {k: v for k, v in answer.items() if k != "event_ids"}

    for (case, _, _), mine, theirs in zip(bodies, here[0], there[0], strict=True):
        assert (mine[0], comparable(mine[1])) == (theirs[0], comparable(theirs[1])), case
    for table in TABLES:
        assert len(here[1][table]) == len(there[1][table]), table
    # Every body went to the worker: answered in detail there (declined by its fast
    # validator) or on its fast path.
    assert bodies_count(there[2], "worker") + bodies_count(there[2], "declined") == len(posts)
    assert bodies_count(there[2], "declined") >= len(posts) // 2


class QuotaOf:
    """A quota of `limit` events a request, counting what it was asked and given back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.asked: list[int] = []
        self.refunded: list[int] = []

    @hookimpl
    def check_quota(self, principal: Any, n_events: int) -> QuotaDecision:
        self.asked.append(n_events)
        return QuotaDecision(allowed=n_events <= self.limit, limit=self.limit)

    @hookimpl
    def refund_quota(self, principal: Any, n_events: int) -> None:
        self.refunded.append(n_events)


def test_quota_and_refusals_come_in_the_servers_order(server_factory: Any, tmp_path: Path) -> None:
    """The count and the quota are checked before another project's event is refused, as in
    the server; a refused body is given back to the quota."""
    small, big = many_events(copies=3, prefix="s"), many_events(copies=4, prefix="b")
    other = [dict(e) for e in small]
    other[3]["project_id"] = "someone-else"
    too_big = [dict(e) for e in big]
    too_big[3]["project_id"] = "someone-else"
    posts = [("/v1/events/batch", batch_body(events)) for events in (small, other, too_big)]
    found = []
    for processes in (0, 1):
        quota = QuotaOf(limit=len(small))
        folder = tmp_path / str(processes)
        answers, _, metrics = answers_and_rows(server_factory, folder, processes, posts, (quota,))
        found.append((answers, quota.asked, quota.refunded))
        assert bodies_count(metrics, "worker") == 3 * processes
    assert found[0] == found[1]
    assert [status for status, _ in found[1][0]] == [202, 403, 429]
    assert found[1][2] == [len(other)]  # the 403's events given back


class CountingTransform:
    """A third-party transform: it must see every event, in the server."""

    def __init__(self) -> None:
        self.seen = 0

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        self.seen += len(events)
        for event in events:
            event.release = "transformed"


def test_a_plugin_that_must_see_the_events_keeps_the_body_in_the_server(
    server_factory: Any,
) -> None:
    plugin = CountingTransform()
    running: Running = server_factory(plugin_objects=(plugin,), ingest_worker_processes=1)
    pool.POOL.want(1)
    wait_for_a_worker()
    events = many_events(copies=3)
    got = running.client.post(
        "/v1/events/batch", content=batch_body(events), headers=running.headers()
    )
    assert got.status_code == 202, got.text
    assert plugin.seen == len(events)
    running.flush()
    rows = running.query("SELECT DISTINCT release FROM events WHERE project_id = 'acme'")
    assert rows == [{"release": "transformed"}]
    metrics = running.client.get("/metrics").text
    assert (bodies_count(metrics, "worker"), bodies_count(metrics, "server")) == (0, 1)


TWIN_MODULE = """
from typing import Any

from watchllm_ext.hookspecs import hookimpl


class Tagger:
    def __init__(self, release: str) -> None:
        self.release = release

    def ingest_worker_twins(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{__name__}:Tagger", {"release": self.release})]

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        for event in events:
            event.release = self.release
"""


def test_a_plugin_with_a_twin_runs_in_the_worker(
    server_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party transform that says how to build its twin: the body goes to the worker,
    where the twin transforms every event (models, as for any third-party plugin)."""
    (tmp_path / "twin_plugin.py").write_text(TWIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Workers started from now on import from there too (they take the server's environment).
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    pool.POOL.stop()
    twin_plugin = __import__("twin_plugin")
    running: Running = server_factory(
        plugin_objects=(twin_plugin.Tagger("from-the-twin"),), ingest_worker_processes=1
    )
    wait_for_a_worker()
    events = many_events(copies=3)
    got = post_batch(running, events)
    assert got.status_code == 202, got.text
    running.flush()
    rows = running.query("SELECT DISTINCT release FROM events WHERE project_id = 'acme'")
    assert rows == [{"release": "from-the-twin"}]
    metrics = running.client.get("/metrics").text
    assert (bodies_count(metrics, "worker"), bodies_count(metrics, "server")) == (1, 0)
    pool.POOL.stop()  # the next tests' workers without this folder on their path


class Recorder:
    """A sink that reads events (not their JSON): it gets the worker's records decoded."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[Any] = []

    @hookimpl
    def register_sinks(self, settings: Any, store: Any) -> Any:
        return self

    async def write(self, events: Any) -> None:
        self.events.extend(events)


def test_a_sink_that_reads_events_gets_them_decoded(server_factory: Any) -> None:
    recorder = Recorder()
    running: Running = server_factory(plugin_objects=(recorder,), ingest_worker_processes=1)
    wait_for_a_worker()
    events = many_events(copies=3)
    got = running.client.post(
        "/v1/events/batch", content=batch_body(events), headers=running.headers()
    )
    assert got.status_code == 202, got.text
    running.flush()
    assert [e.event_id for e in recorder.events] == [e["event_id"] for e in events]
    assert {e.project_id for e in recorder.events} == {"acme"}
    stored = running.query("SELECT count() AS n FROM events WHERE project_id = 'acme'")
    assert stored == [{"n": len(events)}]
    assert bodies_count(running.client.get("/metrics").text, "worker") == 1


class JsonRecorder(Recorder):
    """A sink that reads events as JSON, as the store sink does (`reads_events_json`)."""

    name = "json-recorder"
    reads_events_json = True

    async def write(self, events: Any) -> None:
        self.events.append(events)


def test_a_sink_that_reads_json_gets_the_workers_bytes(server_factory: Any) -> None:
    """Big bodies (a worker's records) and small ones (the server's) in one batch: the sink
    gets them in order, the worker's as they came, the others as events with their bytes."""
    recorder = JsonRecorder()
    running: Running = server_factory(
        plugin_objects=(recorder,), ingest_worker_processes=1, flush_interval_s=3
    )
    wait_for_a_worker()
    first, second = many_events(copies=2, prefix="a"), many_events(copies=2, prefix="b")
    small = many_events(copies=1, prefix="c")[:20]
    for events in (first, small[:10], small[10:], second):
        assert post_batch(running, events, check_size=False).status_code == 202
    running.flush()
    assert [type(batch) for batch in recorder.events] == [EventsJsonBatch]
    (batch,) = recorder.events
    assert [type(piece) for piece in batch.pieces] == [EventsJson, EventBatch, EventsJson]
    assert len(batch.pieces[1].payloads) == 2  # two records, one piece
    everything = [*first, *small, *second]
    assert [e["event_id"] for e in json.loads(batch.json())] == [e["event_id"] for e in everything]
    assert batch.event_keys() == [("acme", e["event_id"]) for e in everything]
    assert [e.event_id for e in batch.events()] == [e["event_id"] for e in everything]


def test_a_worker_killed_under_load_loses_nothing(server_factory: Any) -> None:
    """Bodies posted while the worker is killed, again and again: every 202 is stored
    once (the bodies it had are done in the server), and nothing else is."""
    running: Running = server_factory(ingest_worker_processes=1)
    wait_for_a_worker()
    stop = threading.Event()

    def kill_workers() -> None:
        while not stop.wait(0.15):
            for worker in list(pool.POOL._live):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGKILL)

    lost = pool.POOL.lost_total
    killer = threading.Thread(target=kill_workers)
    killer.start()
    accepted: list[str] = []
    try:
        # At least 20 bodies, and on until a kill has landed during a call (a fast request
        # path can finish 20 between kills); at most 400.
        n = 0
        while n < 20 or (pool.POOL.lost_total == lost and n < 400):
            body = batch_body(many_events(copies=2, prefix=f"k{n}-"))
            got = running.client.post("/v1/events/batch", content=body, headers=running.headers())
            assert got.status_code == 202, got.text
            accepted.extend(got.json()["event_ids"])
            n += 1
    finally:
        stop.set()
        killer.join()
    assert pool.POOL.lost_total > lost  # workers died under calls
    running.flush()
    rows = running.query("SELECT event_id FROM events WHERE project_id = 'acme'")
    assert sorted(r["event_id"] for r in rows) == sorted(accepted)


@pytest.mark.parametrize("size", [0, 1, 255, 65_535, 65_536, 3_000_000])
def test_a_job_in_parts_is_the_job_msgpack_would_write(size: int) -> None:
    """encode_job leaves the body out of the encoding and writes it between two parts (a 45 MB
    body was copied twice on the event loop): joined, the parts decode to the same job as
    msgspec's own encoding of it, and are that encoding byte for byte from 64 KiB on (the
    bodies sent to a worker); OTLP requests alike."""
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    received = receipt_time()
    parts = encode_job(body, "events", "acme", received, [("m:f", {"a": 1})], 7)
    assert parts[1] is body  # not copied
    joined = b"".join(parts)
    received_ms = (received - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    job = EventsJob(body, "events", "acme", received_ms, [("m:f", {"a": 1})], 7)
    whole = JOB_MARK + msgspec.msgpack.encode(job)
    assert msgspec.msgpack.decode(joined[1:], type=EventsJob) == job
    assert (joined == whole) is (size >= 65_536)
    otlp = encode_request(body, True, "acme", received, 9)
    assert otlp[1] is body
    assert msgspec.msgpack.decode(b"".join(otlp)) == [body, True, "acme", received_ms, 9]
    with pytest.raises(ValueError, match="first item is empty bytes"):
        body_first(msgspec.msgpack.encode([b"x", 1]), body)


def test_a_job_is_answered_in_process_as_by_a_worker() -> None:
    """The worker's function itself: a body, its answer (what the server spools)."""
    events = many_events(copies=1)
    job = b"".join(encode_job(batch_body(events), "batch", "acme", receipt_time(), []))
    answer = decode_answer(answer_job(job))
    assert answer.crash is None and not answer.detailed and answer.problem is None
    assert answer.count == len(events) and answer.event_ids == [e["event_id"] for e in events]
    assert [e["event_id"] for e in json.loads(answer.payload)] == answer.event_ids
    assert answer.parts is not None  # prompt calls with tool calls, agent steps
    # Declined by the fast validator: the detailed answer, also made here.
    detailed = work(EventsJob(b'{"events": [{"event_type": "nope"}]}', "batch", "acme", 0))
    assert detailed.detailed and detailed.count == 1 and not detailed.event_ids
    assert detailed.rejected[0][0] == 0 and detailed.rejected[0][1][0]["field"] == "event_type"
