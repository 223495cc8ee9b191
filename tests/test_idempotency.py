"""Idempotency by (project_id, event_id), whatever the timestamp (docs/EVENTS.md).

The event tables are ordered by (project, time, id), so a copy of an event re-sent with its
timestamp moved is another row that FINAL cannot collapse. Each test sends an event tree
(an agent step, a prompt call with a tool call inside, a tool call event, a lone prompt call)
and copies of it one second later with other content (tokens, latency, names, run, status),
then reads every figure the way users read them: stats, timeseries, logs, runs, event detail,
tool calls and agent steps, and the hourly rollup. The first copy stored must be the only one
counted, on every store.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import Running, prompt_call
from stores import CHDB_ONLY, EVERY_STORE, StoreBackend

from watchllm_ext.analytics.rollup import refresh_rollups
from watchllm_ext.auth import Principal
from watchllm_ext.builtins.store_sink import SeenIds, StoreSink, lookup_times
from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.store import Store
from watchllm_ext.store.base import cluster_of
from watchllm_ext.store.cluster import ClusterFormError, for_cluster
from watchllm_ext.store.migrations import in_form_for, load_migrations
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS, PARTS_INPUT, input_json, tables_for

pytestmark = EVERY_STORE

T0 = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
WINDOW = {"from": "2026-01-02T00:00:00.000Z", "to": "2026-01-02T06:00:00.000Z"}


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def originals(shift: timedelta = timedelta(0)) -> list[dict[str, Any]]:
    def at(minutes: int) -> str:
        return _iso(T0 + timedelta(minutes=minutes) + shift)

    return [
        {
            "event_id": "step",
            "event_type": "agent_step",
            "run_id": "run-a",
            "timestamp": at(1),
            "step_number": 1,
            "step_name": "plan",
            "latency_ms": 10.0,
        },
        prompt_call(
            "call",
            run_id="run-a",
            parent_event_id="step",
            timestamp=at(2),
            tokens_input=100,
            tokens_output=50,
            latency_ms=200.0,
            tool_calls=[{"tool_name": "search", "tool_input": {"q": "x"}}],
        ),
        {
            "event_id": "tool",
            "event_type": "tool_call",
            "run_id": "run-a",
            "parent_event_id": "call",
            "timestamp": at(3),
            "tool_name": "search",
            "latency_ms": 30.0,
        },
        prompt_call(
            "solo",
            run_id="run-b",
            timestamp=at(4),
            tokens_input=7,
            tokens_output=3,
            latency_ms=400.0,
        ),
    ]


def copies(shift: timedelta = timedelta(seconds=1)) -> list[dict[str, Any]]:
    """The same ids, `shift` later, every figure different; "solo" moves to another run."""
    changed: dict[str, dict[str, Any]] = {
        "step": {"step_name": "other", "latency_ms": 9_999.0, "status": "error"},
        "call": {
            "tokens_input": 9_999,
            "tokens_output": 9_999,
            "latency_ms": 9_999.0,
            "model": "other-model",
            "status": "error",
            "tool_calls": [{"tool_name": "other"}, {"tool_name": "another"}],
        },
        "tool": {"tool_name": "other", "latency_ms": 9_999.0},
        "solo": {"run_id": "run-z", "tokens_input": 9_999, "latency_ms": 9_999.0},
    }
    return [{**e, **changed[e["event_id"]]} for e in originals(shift)]


def get(server: Running, path: str, **params: Any) -> Any:
    r = server.client.get(path, params={"project_id": "acme", **params}, headers=server.headers())
    assert r.status_code == 200, r.text
    return r.json()


def post(server: Running, events: list[dict[str, Any]]) -> None:
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 202, r.text
    server.flush()


def models(server: Running, events: list[dict[str, Any]]) -> list[Any]:
    """Events as the spool holds them: validated, project set, transforms (cost) applied."""
    validated = EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in events])
    principal = Principal("acme", frozenset({"ingest"}))
    server.wl.pm.hook.transform_events(events=validated, principal=principal)
    return validated


def insert_rows(store: Store, events: list[Any]) -> None:
    """The rows of `events`, inserted as the store sink inserted them before version 0009."""
    for table, data in tables_for(events).items():
        store.insert(table, data)


def assert_counted_once(server: Running, shift: timedelta = timedelta(0)) -> None:
    """Every figure is that of originals(shift) alone, raw and through the rollup."""
    for rolled_up in (False, True):
        if rolled_up:
            refresh_rollups(server.wl.store, margin=timedelta(0))
            rollup = server.query(
                "SELECT sum(events) AS n, sum(tokens_input) AS t"
                " FROM hourly_usage_by_project FINAL WHERE project_id = 'acme'"
            )
            assert rollup == [{"n": 4, "t": 107}]
        stats = get(server, "/v1/analytics/stats", **WINDOW)
        assert (stats["total_events"], stats["total_requests"]) == (4, 2), stats
        assert (stats["tokens_input"], stats["tokens_output"]) == (107, 53)
        assert stats["avg_latency_ms"] == pytest.approx(300.0)
        # A copy's latency (9,999 ms) would be the top percentiles.
        assert 0 < stats["latency_ms"]["p99"] < 500
        assert stats["error_rate"] == 0
        assert stats["events_by_type"] == {"agent_step": 1, "prompt_call": 2, "tool_call": 1}

        series = get(server, "/v1/analytics/timeseries", interval="1h", **WINDOW)["series"]
        points = series["all"]
        assert sum(p["events"] for p in points) == 4
        assert sum(p["tokens_input"] for p in points) == 107
        assert sum(p["errors"] for p in points) == 0
        assert 0 < max(p["latency_p95_ms"] for p in points) < 500

    logs = get(server, "/v1/analytics/logs", limit=100, **WINDOW)["events"]
    assert sorted(e["event_id"] for e in logs) == ["call", "solo", "step", "tool"]
    by_id = {e["event_id"]: e for e in logs}
    want = {e["event_id"]: e["timestamp"] for e in originals(shift)}
    assert {i: e["timestamp"] for i, e in by_id.items()} == want
    assert by_id["call"]["tokens_input"] == 100 and by_id["solo"]["run_id"] == "run-b"

    runs = get(server, "/v1/analytics/runs", limit=100, **WINDOW)["runs"]
    assert {r["run_id"]: (r["event_count"], r["tokens_input"]) for r in runs} == {
        "run-a": (3, 100),
        "run-b": (1, 7),
    }
    tree = get(server, "/v1/analytics/runs/run-a")["tree"]
    assert [n["id"] for n in tree] == ["step"]
    assert [n["id"] for n in tree[0]["children"]] == ["call"]
    assert [n["id"] for n in tree[0]["children"][0]["children"]] == ["tool"]

    call = get(server, "/v1/analytics/event/call")
    assert call["event"]["tokens_input"] == 100 and call["event"]["model"] == "gpt-4o"
    assert [t["tool_name"] for t in call["tool_calls"]] == ["search"]
    assert call["children"] == ["tool"]
    step = get(server, "/v1/analytics/event/step")
    assert [s["step_name"] for s in step["agent_steps"]] == ["plan"]
    assert step["children"] == ["call"]
    tool = get(server, "/v1/analytics/event/tool")
    assert [t["tool_name"] for t in tool["tool_calls"]] == ["search"]

    # The tables behind them: one row per id (and per tool call), in every lookup table.
    # (event_children gets a row with parent '' for an event without a parent on some stores)
    for table, n, where in (
        ("events", 4, ""),
        ("tool_calls", 2, ""),
        ("agent_steps", 1, ""),
        ("event_ids", 4, ""),
        ("event_children", 2, " AND parent_event_id != ''"),
    ):
        rows = server.query(
            f"SELECT count() AS n, uniqExact(event_id, timestamp) AS copies"
            f" FROM {table} FINAL WHERE project_id = 'acme'{where}"
        )
        assert rows == [{"n": n, "copies": n}], table


def test_a_copy_with_another_timestamp_is_counted_once(server: Running) -> None:
    post(server, originals())
    assert_counted_once(server)  # the rollup holds the originals' hour from here
    post(server, copies(timedelta(seconds=1)))
    assert_counted_once(server)
    post(server, copies(-timedelta(seconds=1)))  # an earlier timestamp: the first still wins
    post(server, copies(timedelta(hours=2)))  # another hour, another partition of the rollup
    assert_counted_once(server)
    post(server, copies(timedelta(0)))  # the same timestamp, other content
    post(server, originals())  # the first copy again
    assert_counted_once(server)


def test_copies_within_one_batch(server: Running) -> None:
    post(server, [e for pair in zip(originals(), copies(), strict=True) for e in pair])
    assert_counted_once(server)


def test_a_copy_after_a_restart(server_factory: Any) -> None:
    first = server_factory()
    post(first, originals())
    first.stop()
    second = server_factory()
    post(second, copies())
    assert_counted_once(second)


def test_a_replay_after_a_crash_still_lands_exactly_once(server: Running) -> None:
    sink = StoreSink(server.wl.store)
    batch = models(server, originals())
    # A crash before the events insert (the sink writes events last): the tool calls and
    # agent steps landed, nothing else.
    bodies = input_json(batch)
    server.wl.store.insert_json(PARTS_INPUT, bodies[PARTS_INPUT], JSON_INPUT_SETTINGS)
    assert server.query("SELECT count() AS n FROM event_ids") == [{"n": 0}]
    assert server.query("SELECT count() AS n FROM tool_calls") == [{"n": 2}]
    sink._write(batch)  # the replay of the whole batch
    sink._write(batch)  # and once more, as after a second crash before the cursor commit
    sink._write(models(server, copies()))
    assert_counted_once(server)


class RacingStore:
    """A real store on which another writer's insert of `rival` events lands between this
    writer's look-up and its first insert: two processes sending copies of the same ids at the
    same moment. The rival writes as its own sink would, having found nothing stored either."""

    name = "racing"

    def __init__(self, store: Store, rival_store: Store, rival: list[Any]) -> None:
        self.store = store
        self.cluster = cluster_of(store)
        self._rival_store = rival_store
        self._rival: list[Any] | None = rival

    def execute(self, sql: str, params: Any = None) -> None:
        self.store.execute(sql, params)

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return self.store.query(sql, params)

    def _rival_first(self) -> None:
        if self._rival is not None:
            rival, self._rival = self._rival, None
            insert_rows(self._rival_store, rival)

    def insert(self, table: str, data: Any) -> None:
        self._rival_first()
        self.store.insert(table, data)

    def insert_json(self, table: str, body: bytes, settings: Any) -> None:
        self._rival_first()
        self.store.insert_json(table, body, settings)  # type: ignore[attr-defined]

    def version(self) -> str:
        return self.store.version()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("rival_shift", [timedelta(seconds=1), -timedelta(seconds=1)])
def test_two_writers_racing_keep_the_earlier_copy(
    server: Running, store_backend: StoreBackend, rival_shift: timedelta
) -> None:
    # chDB's folder admits one process: there the rival writes through the same store.
    rival_store = store_backend.open() if store_backend.is_clickhouse else server.wl.store
    try:
        racing = RacingStore(server.wl.store, rival_store, models(server, copies(rival_shift)))
        StoreSink(racing)._write(models(server, originals()))  # type: ignore[arg-type]
    finally:
        if rival_store is not server.wl.store:
            rival_store.close()
    if rival_shift > timedelta(0):
        assert_counted_once(server)
        return
    # The rival's copies are earlier: they stay, and only they are counted.
    stats = get(server, "/v1/analytics/stats", **WINDOW)
    assert (stats["total_events"], stats["tokens_input"]) == (4, 2 * 9_999)
    runs = get(server, "/v1/analytics/runs", limit=100, **WINDOW)["runs"]
    assert {r["run_id"]: r["event_count"] for r in runs} == {"run-a": 3, "run-z": 1}
    call = get(server, "/v1/analytics/event/call")
    assert [t["tool_name"] for t in call["tool_calls"]] == ["other", "another"]
    refresh_rollups(server.wl.store, margin=timedelta(0))
    assert get(server, "/v1/analytics/stats", **WINDOW)["tokens_input"] == 2 * 9_999


def test_copies_stored_before_the_change_are_cleaned_by_0009(server: Running) -> None:
    store = server.wl.store
    insert_rows(store, models(server, copies()))  # stored as before: both copies counted
    insert_rows(store, models(server, originals()))
    refresh_rollups(store, margin=timedelta(0))
    stats = get(server, "/v1/analytics/stats", **WINDOW)
    assert stats["total_events"] == 8  # the defect, reproduced
    # 0009 reads event_times, which a store before it had (0012 dropped it): as it was then.
    (lookups,) = [m for m in load_migrations() if m.version == 5]
    event_times = [s for s in lookups.statements() if "TABLE IF NOT EXISTS event_times" in s]
    backfill = "INSERT INTO event_times SELECT project_id, event_id, timestamp FROM event_ids"
    for statement in in_form_for([*event_times, backfill], cluster_of(store)):
        store.execute(statement)
    (migration,) = [m for m in load_migrations() if m.version == 9]
    for statement in in_form_for(migration.statements(), cluster_of(store)):
        store.execute(statement)
    # Then, as 0010 and 0012 did: event_ids from the cleaned event_times, which goes.
    (ids_backfill,) = [
        s for m in load_migrations() if m.version == 10 for s in m.statements() if "INSERT" in s
    ]
    for statement in in_form_for(
        ["TRUNCATE TABLE event_ids", ids_backfill, "DROP TABLE IF EXISTS event_times"],
        cluster_of(store),
    ):
        store.execute(statement)
    assert_counted_once(server)  # the earliest timestamps stay: the originals'


def test_delete_has_a_cluster_form() -> None:
    assert for_cluster("DELETE FROM events WHERE event_id = 'x'", "c") == [
        "DELETE FROM events_local ON CLUSTER 'c' WHERE event_id = 'x'"
    ]
    with pytest.raises(ClusterFormError, match="nosuch"):
        for_cluster("DELETE FROM nosuch WHERE 1", "c")


# chDB's folder admits one process: no two writers can race there.
@pytest.mark.stores("clickhouse", "server")
def test_two_processes_sending_the_same_ids_at_once(
    server: Running, store_backend: StoreBackend
) -> None:
    """Two store sinks on their own connections (two `serve` processes on one server) write
    copies of the same ids with different timestamps at the same time, batch after batch."""
    rounds, per_batch = 6, 40
    batches = {
        name: [
            models(
                server,
                [
                    prompt_call(
                        f"race-{r}-{i}",
                        timestamp=_iso(T0 + timedelta(minutes=r, seconds=i % 7 + offset)),
                        tokens_input=1 + offset,
                    )
                    for i in range(per_batch)
                ],
            )
            for r in range(rounds)
        ]
        for name, offset in (("a", 0), ("b", 1))
    }
    stores = {name: store_backend.open() for name in batches}
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            sink = StoreSink(stores[name])
            for batch in batches[name]:
                sink._write(batch)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(name,)) for name in batches]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for store in stores.values():
            store.close()
    assert not errors, errors
    rows = server.query(
        "SELECT event_id, count() AS n, min(tokens_input) AS t FROM events FINAL"
        " WHERE project_id = 'acme' AND startsWith(event_id, 'race-') GROUP BY event_id"
    )
    assert len(rows) == rounds * per_batch
    assert all(row["n"] == 1 for row in rows), [r for r in rows if r["n"] != 1]
    # Whichever copy a race left, the lookup table agrees with the events.
    (times,) = server.query(
        "SELECT count() AS n FROM event_ids FINAL"
        " WHERE project_id = 'acme' AND startsWith(event_id, 'race-')"
    )
    assert times["n"] == rounds * per_batch


def test_ids_outside_the_schema_alphabet_are_escaped(server: Running) -> None:
    # The sink's fast Array literal is for schema ids only; anything else goes item by item.
    store = server.wl.store
    insert_rows(store, models(server, originals()))
    odd = ["it's", "back\\slash", "tab\there", "call"]
    assert lookup_times(store, [("acme", i) for i in odd]) == {
        ("acme", "call"): [int((T0 + timedelta(minutes=2)).timestamp() * 1000)]
    }


def test_the_seen_ids_filter_never_forgets_an_id() -> None:
    # The embedded store's sink looks up only the ids its Bloom filter has seen: a false
    # negative would let a copy in, a high false-positive rate would cost look-ups.
    seen = SeenIds(capacity=1)  # the smallest it makes: MIN_CAPACITY
    assert seen.capacity == SeenIds.MIN_CAPACITY
    stored = [("acme", f"id-{i}") for i in range(SeenIds.MIN_CAPACITY)]
    for key in stored[:1_000]:
        seen.add(key)
    seen.add_all(stored[1_000:])
    assert all(key in seen for key in stored[::997])
    assert seen.maybe_stored(stored) == set(stored)
    assert not seen.full
    # Full: the false-positive rate is at its highest, ~1%.
    others = [("acme", f"other-{i}") for i in range(20_000)] + [("beta", "id-1")]
    false_positives = sum(key in seen for key in others)
    assert false_positives < 0.03 * len(others), false_positives
    seen.add(("acme", "one more"))
    assert seen.full  # the sink then rebuilds it, twice as large, from the store


def test_the_seen_ids_filter_hashes_a_large_batch_in_slices_alike() -> None:
    # A batch's keys are hashed in slices (the GIL is let go between them): every key of a
    # batch added at once is found one by one, and a batch's positions are its keys' own.
    keys = [("acme", f"id-{i}") for i in range(10_007)]  # several slices, the last a short one
    seen = SeenIds(capacity=1 << 16)
    positions = seen.positions(keys)
    assert positions.shape == (len(keys), 3)
    for i in (0, 2_047, 2_048, 5_000, 10_006):
        assert (positions[i] == seen.positions([keys[i]])[0]).all()
    seen.add_all(keys)
    assert all(key in seen for key in keys)
    assert seen.maybe_stored(keys) == set(keys)
    assert seen.positions([]).shape == (0, 3)


def _prompt_calls(first: int, n: int, minute: int) -> list[Any]:
    at = _iso(T0 + timedelta(minutes=minute))
    raw = [prompt_call(f"id-{i}", timestamp=at) for i in range(first, first + n)]
    return EVENT_LIST_ADAPTER.validate_python([{**e, "project_id": "acme"} for e in raw])


def _first_copies(store: Store) -> dict[str, str]:
    rows = store.query(
        "SELECT event_id, toString(timestamp) AS ts FROM events FINAL"
        " WHERE project_id = 'acme' ORDER BY event_id"
    )
    times = {r["event_id"]: r["ts"][11:16] for r in rows}
    assert len(rows) == len(times)
    return times


def _built(sink: StoreSink) -> None:
    """Wait for the sink's filter builder, if one runs."""
    if sink._building is not None:
        sink._building.join(60)


@CHDB_ONLY  # the filter is for a store no other process writes to: the embedded one
def test_a_full_seen_ids_filter_is_rebuilt_from_the_store(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filter that fills up is read back from the store, for twice the ids stored: copies of
    # ids stored before the rebuild and after it are both kept out.
    monkeypatch.setattr(SeenIds, "MIN_CAPACITY", 64)
    sink = StoreSink(store)
    sink._write(_prompt_calls(0, 50, 0))  # starts the first build
    _built(sink)
    sink._write(_prompt_calls(50, 100, 0))  # takes it; 150 ids: full after this insert
    first = sink._seen
    assert first is not None and first.full
    assert first.maybe_stored([("acme", f"id-{i}") for i in range(150)]) == {
        ("acme", f"id-{i}") for i in range(150)
    }
    sink._write(_prompt_calls(0, 170, 1))  # copies of the 150 (the full filter has them), 20 new
    _built(sink)
    sink._write(_prompt_calls(140, 40, 2))  # copies from before and after the rebuild, 10 new
    rebuilt = sink._seen
    assert rebuilt is not first and rebuilt is not None and not rebuilt.full
    assert rebuilt.capacity >= 2 * 150
    times = _first_copies(store)
    assert len(times) == 180
    assert {times[f"id-{i}"] for i in range(150)} == {"03:00"}  # the first copies
    assert {times[f"id-{i}"] for i in range(150, 170)} == {"03:01"}
    assert {times[f"id-{i}"] for i in range(170, 180)} == {"03:02"}


@CHDB_ONLY
def test_writes_do_not_wait_for_the_filter_and_it_misses_nothing_inserted_meanwhile(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a restart the filter is read from the store on a thread of its own (~1 us an id
    # stored): writes go on meanwhile, looking every id up in the store, and the ids they
    # insert are added to the filter it makes, whichever of its pages they came after.
    StoreSink(store)._write(_prompt_calls(0, 100, 0))  # stored by a sink of an earlier run
    gate = threading.Event()
    real = SeenIds.of_store.__func__  # type: ignore[attr-defined]

    def held_back(cls: type[SeenIds], store: Store) -> SeenIds:
        assert gate.wait(60)  # a test's gate: the build takes as long as the test says
        return real(cls, store)

    monkeypatch.setattr(SeenIds, "of_store", classmethod(held_back))
    sink = StoreSink(store)
    sink._write(_prompt_calls(50, 100, 1))  # 50 copies, 50 new: no filter yet
    assert sink._seen is None and sink._building is not None and sink._building.is_alive()
    sink._write(_prompt_calls(140, 20, 2))  # copies of ids inserted meanwhile, 10 new
    gate.set()
    _built(sink)
    sink._write(_prompt_calls(0, 170, 3))  # copies of all 160, 10 new: through the filter
    seen = sink._seen
    assert seen is not None
    stored = [("acme", f"id-{i}") for i in range(170)]
    assert seen.maybe_stored(stored) == set(stored)
    times = _first_copies(store)
    assert len(times) == 170
    assert {times[f"id-{i}"] for i in range(100)} == {"03:00"}
    assert {times[f"id-{i}"] for i in range(100, 150)} == {"03:01"}
    assert {times[f"id-{i}"] for i in range(150, 160)} == {"03:02"}
    assert {times[f"id-{i}"] for i in range(160, 170)} == {"03:03"}
