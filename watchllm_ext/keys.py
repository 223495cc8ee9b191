"""API keys: created and revoked by the CLI, read by the running server.

Keys live in a small SQLite file in the data folder, not in chDB: a chDB folder can be open
in one process only, and `watchllm keys create` must work while `watchllm serve` runs.
Only SHA-256 of the secret is stored; the key is shown once. The server rereads the file
when SQLite says another connection changed it (checked at most every `key_refresh_s`).

With key_store = clickhouse the keys live in the server's `api_keys` table (ServerKeyStore),
shared by every process in front of it; each process mirrors them into its key file.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .auth import SCOPES, Principal
from .store.base import Store
from .store.folders import concerns, folder_error, make_private_folder

KEY_PREFIX = "wllm"  # recognisable, so secret scanners can find leaked keys
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
)
"""


class KeyStoreError(Exception):
    """A key operation failed; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    project_id: str
    scope: str
    name: str
    created_at: str
    revoked_at: str | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """`wllm_<key id>_<secret>` -> (key id, secret); None if it is not shaped like our key."""
    prefix, sep, rest = key.partition("_")
    if prefix != KEY_PREFIX or not sep:
        return None
    key_id, sep, secret = rest.partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


class KeyStore:
    def __init__(self, path: Path, refresh_s: float = 1.0) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, Principal]] = {}
        # Whole keys that matched their hash, with their principal: a key sent again (every
        # request of a client) skips the split and the SHA-256. Only valid keys get in, so it
        # holds at most one entry a key; it is replaced with the cache (a revoked key is out).
        # Looking a whole key up tells no timing secret: str hashes are salted per process.
        self._verified: dict[str, Principal] = {}
        self._cache_version: int | None = None
        self._checked_at = 0.0
        self._reader: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        """The key file, made if new. A file or folder that cannot be used (no permission,
        not a folder, read-only) is a DataFolderError naming it, one line."""
        try:
            make_private_folder(self.path.parent)
            conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                conn.commit()
            except BaseException:
                conn.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            if not concerns(exc, self.path):
                raise
            raise folder_error("keys_file", self.path, exc) from None
        return conn

    # --- administration (CLI) -------------------------------------------------------------

    def create(self, project_id: str, scope: str = "ingest", name: str = "") -> str:
        """Create a key and return it in full; this is the only time it can be seen."""
        key_id, secret, key = _new_key(project_id, scope)
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO api_keys (key_id, project_id, scope, secret_hash, name, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, project_id, scope, _hash(secret), name, _now()),
            )
        return key

    def list(self, project_id: str | None = None) -> list[KeyRecord]:
        with self._connect() as conn:
            sql = "SELECT key_id, project_id, scope, name, created_at, revoked_at FROM api_keys"
            args: tuple[str, ...] = ()
            if project_id:
                sql += " WHERE project_id = ?"
                args = (project_id,)
            rows = conn.execute(sql + " ORDER BY created_at, key_id", args).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke by key id (or by the whole key). False if no active key has that id."""
        parts = split_key(key_id)
        if parts:
            key_id = parts[0]
        with self._connect() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (_now(), key_id),
            )
            return cur.rowcount > 0

    def is_empty(self) -> bool:
        with self._connect() as conn:
            return conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0

    def rows(self) -> list[KeyRow]:
        """Every key with its hash (for copying them to a server)."""
        with self._connect() as conn:
            return conn.execute(f"SELECT {_ROW_COLUMNS} FROM api_keys ORDER BY key_id").fetchall()

    def mirror(self, rows: list[KeyRow]) -> bool:
        """Make the file hold exactly `rows` (the server's keys); False if it did already."""
        wanted = sorted(rows)
        with self._connect() as conn:
            have = sorted(conn.execute(f"SELECT {_ROW_COLUMNS} FROM api_keys").fetchall())
            if have == wanted:
                return False
            conn.execute("DELETE FROM api_keys")
            conn.executemany(
                f"INSERT INTO api_keys ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", wanted
            )
        return True

    # --- lookup (server) -------------------------------------------------------------------

    def authenticate(self, key: str) -> Principal | None:
        self._refresh()
        verified = self._verified  # the one of the cache read below (both replaced at once)
        principal = verified.get(key)
        if principal is not None:
            return principal
        parts = split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        entry = self._cache.get(key_id)
        if entry is None:
            # A key made a moment ago (`watchllm keys create` beside a running server) works
            # at once: an unknown id asks SQLite's data_version now, a few microseconds,
            # and reloads only if the file changed, so random ids cannot make it expensive.
            self._refresh(force=True)
            entry = self._cache.get(key_id)
            if entry is None:
                return None
        stored_hash, principal = entry
        if not hmac.compare_digest(stored_hash, _hash(secret)):
            return None
        verified[key] = principal  # into this cache's map: a newer cache starts empty
        return principal

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.refresh_s:
            return
        with self._lock:
            if not force and now - self._checked_at < self.refresh_s:
                return
            if self._reader is None:
                self._reader = self._connect()
            # data_version changes when another connection commits: cheap to ask each time.
            version = self._reader.execute("PRAGMA data_version").fetchone()[0]
            if version != self._cache_version:
                rows = self._reader.execute(
                    "SELECT key_id, project_id, scope, secret_hash FROM api_keys"
                    " WHERE revoked_at IS NULL"
                ).fetchall()
                self._reader.commit()
                self._cache = {
                    key_id: (h, Principal(project, frozenset({scope}), key_id))
                    for key_id, project, scope, h in rows
                }
                self._verified = {}
                self._cache_version = version
            self._checked_at = now

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_key(project_id: str, scope: str) -> tuple[str, str, str]:
    """Check the project and scope; return a new (key id, secret, full key)."""
    if scope not in SCOPES:
        raise KeyStoreError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    from pydantic import TypeAdapter, ValidationError

    from .schema import ProjectId  # the same rule as in event bodies

    try:
        TypeAdapter(ProjectId).validate_python(project_id)
    except ValidationError:
        raise KeyStoreError(
            f"project must be 1-64 letters, digits, '_', '.' or '-', not {project_id!r}"
        ) from None
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}_{key_id}_{secret}"


# --- keys on the server (key_store = clickhouse) ----------------------------------------------

# key_id, project_id, scope, secret_hash, name, created_at, revoked_at
KeyRow = tuple[str, str, str, str, str, str, str | None]
_ROW_COLUMNS = "key_id, project_id, scope, secret_hash, name, created_at, revoked_at"
_ISO = "'%Y-%m-%dT%H:%i:%S+00:00'"  # the text the key file holds: isoformat, whole seconds
_SERVER_ROWS = f"""
SELECT key_id, project_id, scope, secret_hash, name, formatDateTime(created_at, {_ISO}) AS created,
       if(revoked_at IS NULL, NULL, formatDateTime(assumeNotNull(revoked_at), {_ISO})) AS revoked
FROM api_keys FINAL
"""


class ServerKeyStore:
    """API keys in the `api_keys` table of the store (a ClickHouse server), shared by every
    process in front of it. Each process copies them into its key file (`KeyStore.mirror`)
    and authenticates from that copy, so a request never waits on the server and keys keep
    working while the server is down."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, project_id: str, scope: str = "ingest", name: str = "") -> str:
        key_id, secret, key = _new_key(project_id, scope)
        self.store.execute(
            "INSERT INTO api_keys (key_id, project_id, scope, secret_hash, name, created_at,"
            " revoked_at, updated_at) SELECT {key_id:String}, {project:String}, {scope:String},"
            " {hash:String}, {name:String}, now64(3, 'UTC'), NULL, now64(6, 'UTC')",
            {"key_id": key_id, "project": project_id, "scope": scope, "hash": _hash(secret),
             "name": name},
        )  # fmt: skip
        return key

    def rows(self) -> list[KeyRow]:
        found = self.store.query(_SERVER_ROWS)
        return [
            (r["key_id"], r["project_id"], r["scope"], r["secret_hash"], r["name"],
             r["created"], r["revoked"])
            for r in found
        ]  # fmt: skip

    def list(self, project_id: str | None = None) -> list[KeyRecord]:
        records = [
            KeyRecord(key_id, project, scope, name, created, revoked)
            for key_id, project, scope, _, name, created, revoked in self.rows()
            if project_id is None or project == project_id
        ]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    def revoke(self, key_id: str) -> bool:
        parts = split_key(key_id)
        if parts:
            key_id = parts[0]
        active = [row for row in self.rows() if row[0] == key_id and row[6] is None]
        if not active:
            return False
        # A newer version of the row, with revoked_at set, replaces the active one: newer
        # than the active row even if this node's clock is behind the one that created it.
        self.store.execute(
            "INSERT INTO api_keys SELECT key_id, project_id, scope, secret_hash, name,"
            " created_at, now64(3, 'UTC'),"
            " greatest(updated_at + toIntervalMicrosecond(1), now64(6, 'UTC'))"
            " FROM api_keys FINAL WHERE key_id = {key_id:String} AND revoked_at IS NULL",
            {"key_id": key_id},
        )
        return True

    def is_empty(self) -> bool:
        return self.store.query("SELECT count() AS n FROM api_keys")[0]["n"] == 0

    def add(self, rows: list[KeyRow]) -> list[str]:
        """Copy keys (from a key file) that the server does not know; returns their ids.
        A key the server knows already is left as it is there (revoked or not)."""
        known = {row[0] for row in self.rows()}
        added = []
        for key_id, project, scope, secret_hash, name, created, revoked in rows:
            if key_id in known:
                continue
            self.store.execute(
                "INSERT INTO api_keys (key_id, project_id, scope, secret_hash, name, created_at,"
                " revoked_at, updated_at) SELECT {key_id:String}, {project:String},"
                " {scope:String}, {hash:String}, {name:String},"
                " parseDateTime64BestEffort({created:String}, 3, 'UTC'),"
                " if({revoked:String} = '', NULL,"
                " parseDateTime64BestEffortOrNull({revoked:String}, 3, 'UTC')),"
                " now64(6, 'UTC')",
                {"key_id": key_id, "project": project, "scope": scope, "hash": secret_hash,
                 "name": name, "created": created, "revoked": revoked or ""},
            )  # fmt: skip
            added.append(key_id)
        return added
