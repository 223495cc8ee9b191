"""Numbered migrations from the `clickhouse/migrations` folder, applied once each.

Applied versions are recorded in `schema_migrations` with a checksum, so a start or a
`watchllm migrate` applies only what is new. Statements are idempotent (IF NOT EXISTS), so a
migration interrupted half-way converges when run again.

On a cluster (a store whose `cluster` is set) each statement runs in its cluster form, made by
cluster.py from the same SQL.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from importlib import resources

from .base import Store, cluster_of
from .cluster import for_cluster

log = logging.getLogger("watchllm.store")

_TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY version
"""
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        # Our migrations keep ';' only at the end of statements, never inside strings.
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.strip().startswith("--")
        )
        return [part.strip() for part in body.split(";") if part.strip()]


def load_migrations() -> list[Migration]:
    folder = resources.files("watchllm_clickhouse") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return found


def in_form_for(statements: list[str], cluster: str | None) -> list[str]:
    """The statements as they run on a single node (cluster None) or on `cluster`."""
    if not cluster:
        return statements
    return [form for statement in statements for form in for_cluster(statement, cluster)]


def tracking_table_statements(cluster: str | None) -> list[str]:
    return in_form_for([_TRACKING_TABLE.strip()], cluster)


# One migration run at a time in a process (the app's and the store sink's may meet after
# a start with the store down); across processes the statements are idempotent.
_APPLYING = threading.Lock()


def apply_migrations(store: Store) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    with _APPLYING:
        return _apply_migrations(store)


def _apply_migrations(store: Store) -> list[str]:
    cluster = cluster_of(store)
    # Only when missing: on a cluster even an IF NOT EXISTS statement waits for every host,
    # and a start must not depend on all of them being up.
    present = store.query(
        "SELECT count() AS n FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'schema_migrations'"
    )
    if not present or not present[0]["n"]:
        for statement in tracking_table_statements(cluster):
            store.execute(statement)
    rows = store.query("SELECT version, checksum FROM schema_migrations")
    applied = {int(r["version"]): r["checksum"] for r in rows}
    done = []
    for migration in load_migrations():
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                log.warning(
                    "migration %04d_%s changed after it was applied; not re-running it",
                    migration.version,
                    migration.name,
                )
            continue
        for statement in in_form_for(migration.statements(), cluster):
            store.execute(statement)
        store.execute(
            # INSERT … SELECT, not VALUES: servers with async_insert on do not substitute
            # parameters inside VALUES.
            "INSERT INTO schema_migrations (version, name, checksum)"
            " SELECT {version:UInt32}, {name:String}, {checksum:String}",
            {"version": migration.version, "name": migration.name, "checksum": migration.checksum},
        )
        done.append(f"{migration.version:04d}_{migration.name}")
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return done
