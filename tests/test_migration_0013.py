"""Migration 0013 (compact span parts) on every store: an insert of spans over ClickHouse's 10 MB
default for a wide part writes one compact part, and the spans stored before it are read as
before."""

from __future__ import annotations

import json

from stores import EVERY_STORE, StoreBackend
from test_migration_0012 import migrate_to

from watchllm_ext.store import Store, apply_migrations
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

pytestmark = EVERY_STORE


def span_rows(prefix: str, n: int) -> bytes:
    """`n` spans of ~8 KB each (their attributes), one trace a hundred spans."""
    return json.dumps(
        [
            {
                "project_id": "p",
                "trace_id": f"{prefix}{i // 100:031x}",
                "span_id": f"{i:016x}",
                "name": "chat gpt-4o",
                "kind": "client",
                "start_time": f"2026-01-05T01:{i // 60 % 60:02d}:{i % 60:02d}Z",
                "end_time": f"2026-01-05T01:{i // 60 % 60:02d}:{i % 60:02d}.5Z",
                "duration_ms": 500.0,
                "status_code": "ok",
                "attributes": {"gen_ai.input.messages": "why is the sky blue " * 400},
                "resource_attributes": {"service.name": "bot"},
                "span_events": "[]",
                "links": "[]",
                "ingested_at": "2026-01-05T02:00:00Z",
            }
            for i in range(n)
        ]
    ).encode()


def newest_span_part(store: Store) -> str:
    rows = store.query(
        "SELECT part_type FROM system.parts WHERE database = currentDatabase()"
        " AND table = 'spans' AND active ORDER BY modification_time DESC, name DESC LIMIT 1"
    )
    return rows[0]["part_type"]


def test_an_insert_of_spans_writes_one_compact_part(store_backend: StoreBackend) -> None:
    store = store_backend.open("spans")
    try:
        migrate_to(store, 12)
        store.insert_json("spans", span_rows("a", 1_600), JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]
        assert newest_span_part(store) == "Wide"  # ~13 MB: wide before 0013

        assert apply_migrations(store) == ["0013_compact_span_parts"]
        store.insert_json("spans", span_rows("b", 1_600), JSON_INPUT_SETTINGS)  # type: ignore[attr-defined]
        assert newest_span_part(store) == "Compact"
        # Both parts read alike: every span, and one whole trace from each.
        (row,) = store.query("SELECT count() AS n FROM spans FINAL")
        assert int(row["n"]) == 3_200
        for prefix in "ab":
            trace = f"{prefix}{0:031x}"
            rows = store.query(
                "SELECT count() AS n, min(length(attributes['gen_ai.input.messages'])) AS size"
                " FROM spans FINAL WHERE trace_id = {t:String}",
                {"t": trace},
            )
            assert int(rows[0]["n"]) == 100 and int(rows[0]["size"]) == 8_000
    finally:
        store.close()
