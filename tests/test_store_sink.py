"""The store sink under load: the look-ups it sends fit a ClickHouse server's limits, the check
after an insert reads only the ids stored twice, and `watchllm serve` runs the embedded
store's own threads at a lower CPU priority than the request path (store_threads_nice)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, prompt_call
from stores import EVERY_STORE
from test_durability import ServeProcess, wait_delivered

from watchllm_ext.builtins import store_sink
from watchllm_ext.builtins.store_sink import LOOKUP_CHARS, lookup_times
from watchllm_ext.delivery import writer
from watchllm_ext.delivery.writer import EventBatch, EventsJson, EventsJsonBatch
from watchllm_ext.ingest.fast_validate import read_stored
from watchllm_ext.ingest.worker import answer_job, decode_answer, encode_job
from watchllm_ext.keys import KeyStore
from watchllm_ext.store import Store

MS = 1_780_000_000_000  # a stored timestamp, ms since the epoch


@EVERY_STORE
def test_the_check_after_an_insert_reads_only_the_ids_stored_twice(store: Store) -> None:
    rows = [("once", MS), ("twice", MS), ("twice", MS + 5), ("same-twice", MS), ("same-twice", MS)]
    values = ", ".join(f"('acme', '{i}', fromUnixTimestamp64Milli({ms}))" for i, ms in rows)
    store.execute(f"INSERT INTO event_ids (project_id, event_id, timestamp) VALUES {values}")
    keys = [("acme", i) for i in ("once", "twice", "same-twice", "never")]
    assert lookup_times(store, keys) == {
        ("acme", "once"): [MS],
        ("acme", "twice"): [MS, MS + 5],
        ("acme", "same-twice"): [MS],  # the same copy twice is one (FINAL would collapse it)
    }
    assert lookup_times(store, keys, repeated_only=True) == {("acme", "twice"): [MS, MS + 5]}


@EVERY_STORE
def test_a_batch_of_long_ids_is_looked_up_in_chunks_the_server_takes(store: Store) -> None:
    # 5,000 ids of 60 characters: 315,000 characters of ids, more than a ClickHouse server
    # takes in one parameter (http_max_field_value_size, 128 KiB by default; tests/chfixture.py
    # refuses longer values as the server does): the server store sends them as external data
    # (query_with_ids), chDB (and a cluster) in several queries.
    ids = [f"{n:060d}" for n in range(5_000)]
    assert sum(len(i) + 3 for i in ids) > 2 * LOOKUP_CHARS
    stored = ids[::97]
    values = ", ".join(f"('acme', '{i}', fromUnixTimestamp64Milli({MS}))" for i in stored)
    store.execute(f"INSERT INTO event_ids (project_id, event_id, timestamp) VALUES {values}")
    found = lookup_times(store, [("acme", i) for i in ids])
    assert found == {("acme", i): [MS] for i in stored}
    assert LOOKUP_CHARS + 4 <= 128 * 1024  # the ids, their quotes and commas, and the brackets


def nice_by_thread(pid: int) -> list[tuple[int, str, int]]:
    """(thread id, name, nice value) of every thread of `pid`, from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended since the listing
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out.append((int(task.name), name, int(fields[16])))  # field 19 of proc(5): nice
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="per-thread priorities: Linux")
@pytest.mark.parametrize("nice", ["10", "default"])
def test_serve_runs_the_stores_threads_at_a_lower_priority(nice: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = KeyStore(data / "keys.sqlite3").create("acme", scope="admin", name="t")
    env = {} if nice == "default" else {"WATCHLLM_STORE_THREADS_NICE": nice}  # default: 0
    serve = ServeProcess(data, free_port(), **env)
    try:
        events = [prompt_call(f"nice-{i}", project_id="acme") for i in range(50)]
        r = httpx.post(
            f"{serve.url}/v1/events/batch",
            json={"events": events},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        wait_delivered(serve.url, key)
        threads = nice_by_thread(serve.proc.pid)
    finally:
        serve.kill()
    by_tid = {tid: (name, n) for tid, name, n in threads}
    main_name, main_nice = by_tid[serve.proc.pid]
    assert main_nice == 0, "the event loop keeps its priority"
    # Python 3.11 leaves its threads unnamed (named as the process); chDB names its own (and
    # leaves a few unnamed), so the named ones are all the store's.
    named = [(name, n) for name, n in by_tid.values() if name != main_name]
    assert {"ThreadPool", "BgSchPool", "MergeMutate"} <= {name for name, _ in named}, threads
    assert sum(n == 0 for name, n in by_tid.values() if name == main_name) >= 2, threads
    if nice == "10":
        # Every one at 10, but for a thread chDB raised itself (its memory watcher, at -20).
        assert {n for _, n in named if n >= 0} == {10}, threads
    else:
        assert 10 not in {n for _, n in by_tid.values()}, threads
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # this process was not touched


def _worker_record(events: list[dict[str, Any]]) -> EventsJson:
    """A record as a worker process makes it (its answer, done in this process)."""
    body = json.dumps({"events": events}).encode()
    job = b"".join(encode_job(body, "batch", "acme", datetime.now(UTC), []))
    answer = decode_answer(answer_job(job))
    assert answer.crash is None and answer.problem is None
    return EventsJson(
        answer.payload, answer.project_id, answer.event_ids, answer.rows, answer.parts
    )


def test_copies_in_a_workers_batch_are_dropped_without_reading_whole_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record none of whose events is a copy stays its bytes; one whose every event is a
    copy (a resent batch) goes unread; only a record holding both is decoded, and its first
    copies are kept, in order. A resent 10 MB batch was decoded whole, holding the GIL."""
    new = _worker_record([prompt_call(f"new-{i}") for i in range(3)])
    resent = _worker_record([prompt_call(f"old-{i}") for i in range(3)])
    mixed = _worker_record(
        [
            prompt_call("old-1"),
            prompt_call("mix-0"),
            prompt_call("new-2"),
            prompt_call("mix-1"),
            prompt_call("mix-0", run_id="second-copy"),
        ]
    )
    # Records the server made (small bodies), read already: their events are at hand.
    here_payload = _worker_record([prompt_call("old-2"), prompt_call("here-0")]).payload
    made_here = EventBatch(read_stored(here_payload))
    made_here.payloads = [here_payload]
    read: list[bytes] = []

    def reading(payload: bytes) -> list[Any]:
        read.append(payload)
        return read_stored(payload)

    monkeypatch.setattr(writer, "read_stored", reading)  # what the batch's pieces decode with
    stored = {("acme", f"old-{i}") for i in range(3)}
    batch = EventsJsonBatch([new, resent, mixed, made_here])
    kept = store_sink.first_json_copies(batch, stored)
    assert read == [mixed.payload]  # the mixed record only
    assert kept.pieces[0] is new
    ids = ["new-0", "new-1", "new-2", "mix-0", "mix-1", "here-0"]
    assert kept.event_keys() == [("acme", i) for i in ids]
    assert [e["event_id"] for e in json.loads(kept.json())] == ids
    assert "second-copy" not in {e["run_id"] for e in json.loads(kept.json())}  # first copies
    # Nothing stored: the copies within the batch go (a later old-1, new-2, mix-0 and old-2).
    assert store_sink.first_json_copies(batch, set()).event_keys() == [
        *batch.event_keys()[:6],
        ("acme", "mix-0"),
        ("acme", "mix-1"),
        ("acme", "here-0"),
    ]
