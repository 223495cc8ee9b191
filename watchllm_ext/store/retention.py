"""Payload retention: empty the large text columns after `payload_ttl_days` (0 keeps them).

The payload columns are the ones stored with a ZSTD codec (prompts, responses, tool input and
output, reasoning, stack traces, span events), the text that makes up most of the bytes.
Counts, tokens, cost and latency stay, so analytics over old data keep working. ClickHouse
applies a column TTL in its merges (an expired value becomes NULL, or '' where the column is
not Nullable); the ALTER runs only for columns whose TTL differs from the one wanted, so a
start with an unchanged setting costs two small queries per table.
"""

from __future__ import annotations

import logging
import re

from .base import Store, cluster_of
from .cluster import load_layout
from .migrations import in_form_for

log = logging.getLogger("watchllm.store")

# The time each table's TTL counts from.
TIME_COLUMN = {
    "events": "timestamp",
    "tool_calls": "timestamp",
    "agent_steps": "timestamp",
    "spans": "start_time",
}


def payload_columns(store: Store, table: str) -> dict[str, str | None]:
    """Payload column -> its current TTL expression (None if it has none)."""
    physical = load_layout().local(table) if cluster_of(store) else table
    columns = store.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase()"
        " AND table = {t:String} AND compression_codec LIKE '%ZSTD%' ORDER BY position",
        {"t": physical},
    )
    if not columns:  # a store without this table, or one we cannot inspect
        return {}
    (create,) = store.query(
        "SELECT create_table_query AS q FROM system.tables"
        " WHERE database = currentDatabase() AND name = {t:String}",
        {"t": physical},
    )
    found: dict[str, str | None] = {}
    for row in columns:
        # A column's definition runs to the next column (", `") or to the end of the list.
        definition = re.search(rf"`{row['name']}` (.*?)(?:, `|\) ENGINE)", create["q"])
        ttl = re.search(r"\bTTL (.*)$", definition[1]) if definition else None
        found[row["name"]] = ttl[1].strip() if ttl else None
    return found


def apply_payload_ttl(store: Store, days: int) -> list[str]:
    """Set (or, for 0, remove) the payload TTL where it differs; returns the columns changed."""
    changed = []
    for table, time_column in TIME_COLUMN.items():
        wanted = f"toDateTime({time_column}) + toIntervalDay({days})" if days else None
        columns = [c for c, current in payload_columns(store, table).items() if current != wanted]
        if not columns:
            continue
        change = f"TTL {wanted}" if wanted else "REMOVE TTL"
        # One ALTER per table: ClickHouse rewrites the table's parts once, not per column.
        clauses = ", ".join(f"MODIFY COLUMN {column} {change}" for column in columns)
        for sql in in_form_for([f"ALTER TABLE {table} {clauses}"], cluster_of(store)):
            store.execute(sql)
        changed += [f"{table}.{column}" for column in columns]
    if changed:
        log.info(
            "payload TTL %s on %d columns",
            f"set to {days} days" if days else "removed",
            len(changed),
        )
    return changed
