"""Payload retention (watchllm_ext/store/retention.py): `payload_ttl_days` empties the large
text columns of old rows in ClickHouse's merges and keeps every count, token and cost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import Running, prompt_call
from stores import EVERY_STORE, StoreBackend

from watchllm_ext.schema import EVENT_LIST_ADAPTER
from watchllm_ext.store import apply_migrations
from watchllm_ext.store.retention import apply_payload_ttl, payload_columns
from watchllm_ext.store.rows import tables_for

PAYLOAD = {
    "events": {
        "metadata", "prompt", "response", "response_metadata", "tool_input", "tool_output",
        "reasoning", "action", "observation", "stack_trace",
    },
    "tool_calls": {"tool_input", "tool_output"},
    "agent_steps": {"reasoning", "action", "observation"},
    "spans": {"span_events"},
}  # fmt: skip


def _ts(days_ago: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


pytestmark = EVERY_STORE


def test_ttl_empties_old_payloads_and_keeps_the_figures(store_backend: StoreBackend) -> None:
    store = store_backend.open()
    try:
        apply_migrations(store)
        assert {t: set(payload_columns(store, t)) for t in PAYLOAD} == PAYLOAD
        assert all(v is None for v in payload_columns(store, "events").values())
        events = EVENT_LIST_ADAPTER.validate_python(
            [
                prompt_call("old", timestamp=_ts(40), prompt="old secret", tokens_input=7),
                prompt_call("new", timestamp=_ts(1), prompt="new text", tokens_input=9),
            ]
        )
        for table, data in tables_for(events).items():
            store.insert(table, data)

        changed = apply_payload_ttl(store, 30)
        assert set(changed) == {f"{t}.{c}" for t, cols in PAYLOAD.items() for c in cols}
        assert set(payload_columns(store, "spans").values()) == {
            "toDateTime(start_time) + toIntervalDay(30)"
        }
        assert apply_payload_ttl(store, 30) == []  # unchanged setting: nothing to alter
        store.execute("OPTIMIZE TABLE events FINAL")
        rows = store.query(
            "SELECT event_id, prompt, response, tokens_input FROM events FINAL ORDER BY event_id"
        )
        assert [(r["event_id"], r["prompt"], r["tokens_input"]) for r in rows] == [
            ("new", "new text", 9),
            ("old", None, 7),
        ]

        assert len(apply_payload_ttl(store, 0)) == len(changed)  # 0 removes the TTL again
        assert all(v is None for v in payload_columns(store, "events").values())
        assert apply_payload_ttl(store, 0) == []
    finally:
        store.close()


def test_server_applies_the_setting(server_factory: Any) -> None:
    server: Running = server_factory(payload_ttl_days=90)
    columns = payload_columns(server.wl.store, "events")
    assert set(columns.values()) == {"toDateTime(timestamp) + toIntervalDay(90)"}
