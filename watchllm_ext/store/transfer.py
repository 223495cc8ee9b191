"""Moving data from the embedded chDB folder to a ClickHouse server: `watchllm export` and
`watchllm import` (see docs/MOVING.md).

An export is a folder of Parquet files (zstd) and a `manifest.json`:

    manifest.json
    events/202601-0001.parquet      one or more files per table and partition (month)
    tool_calls/202601-0001.parquet
    ...

Each file holds the deduplicated rows (`FINAL`) of one partition of one table, at most
`max_rows_per_file` rows. The manifest records the format version, the WatchLLM and source
ClickHouse versions, the source's applied migrations, each table's columns, and row counts
per table, per project and per file with each file's size and SHA-256. The export's written
counts are checked against the source's `FINAL` counts before the manifest is written, so a
folder with a manifest is a complete export.

The rollup tables (`hourly_usage_by_project`, `rollup_marks`) are not exported: on the
target the materialized view marks every hour that gets events as they are inserted, and the
rollup task of `watchllm serve` recomputes marked hours from the events. API keys (the key
file) and the spool are not copied either.

An import verifies the manifest and every file's checksum before it connects, applies the
migrations on the target, refuses a target that already has rows of an exported project
(unless `resume`), inserts each file through the store's columnar insert in bounded
batches, and then checks that the target's `FINAL` count of every table and project equals
the manifest's. It refuses values outside the contract's numeric ranges (before it
connects), and keeps one copy per (project_id, event_id) as the store does: extra copies
(an export from before migration 0009, or a tampered one) are dropped in staging, counted,
reported, and taken off the counts the target must match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import __version__
from ..schema import (
    MAX_COST_USD,
    MAX_LATENCY_MS,
    MAX_METRIC_ABS,
    MAX_SPEND_USD,
    MAX_STEP_NUMBER,
    MAX_TOKENS,
)
from . import Store, StoreError, StoreLockedError, apply_migrations, load_migrations
from .folders import make_private_folder

if TYPE_CHECKING:
    import pyarrow as pa

    from ..settings import Settings

FORMAT = "watchllm-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# The source tables, in the order they are written and read back.
TABLES = ("events", "tool_calls", "agent_steps", "spans")
# Tables the target rebuilds itself (or keeps its own copy of), so never exported.
NOT_EXPORTED = {
    "hourly_usage_by_project": "rebuilt on the target by the hourly rollup",
    "hourly_totals_by_project": "rebuilt on the target by the hourly rollup",
    "rollup_marks": "rebuilt on the target by its materialized view as events are inserted",
    "schema_migrations": "the target records its own migrations",
    "api_keys": "API keys are not copied (watchllm keys copy-to-server does that)",
    # a store not yet migrated to 0012, which drops it (event_ids holds the same rows)
    "event_times": "replaced by event_ids (migration 0012)",
    "event_children": "rebuilt on the target by its materialized view as events are inserted",
    "event_ids": "rebuilt on the target by its materialized view as events are inserted",
}
NOT_COPIED_NOTE = (
    "API keys are not copied: they are in the key file, not in ClickHouse (a WatchLLM that"
    " keeps the same data folder or keys_file keeps them; otherwise `watchllm keys create`)"
)

DEFAULT_MAX_ROWS_PER_FILE = 1_000_000
_MAX_FILE_BYTES = 1 << 30  # Arrow (uncompressed) bytes per file, beside the row limit
_BATCH_BYTES = 64 << 20  # aim of one read or insert batch, uncompressed
_MIN_BATCH_ROWS = 1_000
_MAX_BATCH_ROWS = 131_072
_INSERT_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)  # waits before retrying a failed insert
_FILE_PATH = re.compile(r"^([a-z_]+)/([A-Za-z0-9_-]+)-(\d{4,})\.parquet$")
_STAGING_PREFIX = "_watchllm_import_"  # + table: where an import checks rows first
_STORE_SINK = "store:chdb"  # the spool cursor of the embedded store's sink
_LATER_COPIES = _STAGING_PREFIX + "later_copies"  # (project, id, timestamp) an import drops
# The tables holding one copy per (project_id, event_id) (store_sink.py, migration 0009).
_BY_EVENT_ID = ("events", "tool_calls", "agent_steps")
# The contract's numeric ranges (schema.py) per table and column, inclusive: an imported row
# outside them is refused, so the server holds only values the ingest API could have accepted.
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "events": {
        "tokens_input": (0, MAX_TOKENS),
        "tokens_output": (0, MAX_TOKENS),
        "cost_estimate_usd": (0, MAX_COST_USD),
        "latency_ms": (0, MAX_LATENCY_MS),
        "step_number": (0, MAX_STEP_NUMBER),
        "confidence": (0, 1),
        "threshold_usd": (0, MAX_SPEND_USD),
        "actual_usd": (0, MAX_SPEND_USD),
        "metric_threshold": (-MAX_METRIC_ABS, MAX_METRIC_ABS),
        "metric_actual": (-MAX_METRIC_ABS, MAX_METRIC_ABS),
    },
    "tool_calls": {"latency_ms": (0, MAX_LATENCY_MS)},
    "agent_steps": {"latency_ms": (0, MAX_LATENCY_MS), "step_number": (0, MAX_STEP_NUMBER)},
}

Progress = Callable[[str], None]


class TransferError(Exception):
    """An export or import that cannot go on; the message is one line for the user."""


class CountMismatch(TransferError):
    """The target's counts differ from the export's; `lines` has one line per mismatch."""

    def __init__(self, lines: list[str], outcome: str = "") -> None:
        super().__init__(
            f"{len(lines)} count mismatch{'es' if len(lines) != 1 else ''} between the target"
            f" and the export (listed above){outcome}"
        )
        self.lines = lines


def _print(line: str) -> None:
    print(line, flush=True)


# --- export -----------------------------------------------------------------------------------


@dataclass
class _FileWriter:
    """One Parquet file being written, with its counts."""

    path: Path
    writer: Any
    rows: int = 0
    arrow_bytes: int = 0
    projects: Counter[str] = field(default_factory=Counter)


def export_folder(
    settings: Settings,
    out_dir: Path,
    *,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
    progress: Progress = _print,
) -> dict[str, Any]:
    """Export the embedded store of `settings.data_dir` into the new folder `out_dir`;
    returns the manifest. TransferError for every refusal and failure."""
    _check_out_dir(out_dir)
    store_path = settings.store_path
    if not store_path.is_dir():
        raise TransferError(
            f"there is no embedded store in {settings.data_dir} (no folder {store_path.name}/):"
            " nothing to export (use --data-dir to name the data folder)"
        )
    store = _open_embedded(settings)
    try:
        pending = _pending_in_spool(settings)
        if pending:
            raise TransferError(
                f"the spool in {settings.spool_path} holds {pending} accepted events not yet in"
                " the store (the server stopped before delivering them): start `watchllm serve`"
                " once so it delivers them, stop it, then export again"
            )
        manifest = export_store(
            store,
            out_dir,
            max_rows_per_file=max_rows_per_file,
            source_dir=settings.data_dir,
            progress=progress,
        )
    except StoreError as exc:
        raise TransferError(f"reading the embedded store failed: {exc}") from None
    finally:
        store.close()
    dead = _dead_letter_events(settings)
    if dead:
        progress(
            f"note: {dead} events the store refused are in dead letters, so not exported"
            " (see `watchllm dead-letter list`)"
        )
    return manifest


def export_store(
    store: Store,
    out_dir: Path,
    *,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
    source_dir: Path | None = None,
    progress: Progress = _print,
) -> dict[str, Any]:
    """Export an open embedded store into the new folder `out_dir`; returns the manifest."""
    if max_rows_per_file < 1:
        raise TransferError("the number of rows per file must be at least 1")
    _check_out_dir(out_dir)
    started = time.monotonic()
    migrations = _source_migrations(store)
    present = {
        r["name"]: r["engine"]
        for r in store.query(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
        )
    }
    skipped = sorted(
        name
        for name, engine in present.items()
        if engine.endswith("MergeTree") and name not in TABLES and name not in NOT_EXPORTED
    )
    for name in skipped:
        progress(f"warning: table {name} is not a WatchLLM table this version knows; not exported")
    make_private_folder(out_dir)  # every prompt of the store goes in it
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "watchllm_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "store": store.name,
            "data_dir": str(source_dir.resolve()) if source_dir is not None else None,
            "clickhouse_version": store.version(),
            "migrations": migrations,
        },
        "not_exported": {**NOT_EXPORTED, **dict.fromkeys(skipped, "unknown to this version")},
        "not_copied": [NOT_COPIED_NOTE],
        "tables": {},
        "files": [],
    }
    try:
        for table in TABLES:
            if table not in present:
                manifest["tables"][table] = {"columns": [], "rows": 0, "projects": {}}
                continue
            written = _export_table(store, table, out_dir, max_rows_per_file, progress)
            manifest["tables"][table] = written["table"]
            manifest["files"].extend(written["files"])
        _write_json_atomically(out_dir / MANIFEST, manifest)
    except (TransferError, StoreError, OSError) as exc:
        raise TransferError(
            f"the export failed: {exc}; {out_dir} is incomplete (it has no {MANIFEST}):"
            " delete it and export again"
        ) from None
    elapsed = time.monotonic() - started
    total_rows = sum(info["rows"] for info in manifest["tables"].values())
    total_bytes = sum(f["bytes"] for f in manifest["files"])
    rate = _rate(total_rows, elapsed)
    progress(
        f"exported {_counted(total_rows, 'row')} in {_counted(len(manifest['files']), 'file')}"
        f" ({total_bytes / 1e6:,.1f} MB) to {out_dir} in {elapsed:.1f} s"
        + (f" ({rate})" if rate else "")
        + "; the files' counts equal the store's (FINAL) for every table and project:"
    )
    for table in TABLES:
        progress(_table_line(table, manifest["tables"][table]))
    progress("not exported: hourly_usage_by_project and rollup_marks (the target rebuilds them)")
    progress(f"note: {NOT_COPIED_NOTE}")
    return manifest


def _export_table(
    store: Store, table: str, out_dir: Path, max_rows_per_file: int, progress: Progress
) -> dict[str, Any]:
    """Write one table, partition by partition; check what was written against FINAL counts."""
    import pyarrow.compute as pc

    columns = store.query(
        "SELECT name, type FROM system.columns"
        " WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
        {"t": table},
    )
    expected: dict[str, Counter[str]] = {}
    for row in store.query(
        f"SELECT _partition_id AS part, project_id, count() AS n FROM {table} FINAL"
        " GROUP BY part, project_id ORDER BY part, project_id"
    ):
        expected.setdefault(row["part"], Counter())[row["project_id"]] = int(row["n"])
    batch_rows = _batch_rows(_average_row_bytes(store, table))
    folder = out_dir / table
    files: list[dict[str, Any]] = []
    for part, want in expected.items():
        started = time.monotonic()
        got: Counter[str] = Counter()
        current: _FileWriter | None = None
        sequence = 0
        for batch in _stream_partition(store, table, part, batch_rows):
            offset = 0
            while offset < batch.num_rows:
                if current is None:
                    sequence += 1
                    folder.mkdir(exist_ok=True)
                    current = _open_parquet(folder / f"{part}-{sequence:04d}.parquet", batch.schema)
                take = min(batch.num_rows - offset, max_rows_per_file - current.rows)
                piece = batch.slice(offset, take)
                current.writer.write_batch(piece)
                current.rows += take
                current.arrow_bytes += piece.nbytes
                counts = pc.value_counts(piece.column("project_id")).to_pylist()
                current.projects.update({c["values"]: c["counts"] for c in counts})
                offset += take
                if current.rows >= max_rows_per_file or current.arrow_bytes >= _MAX_FILE_BYTES:
                    files.append(_close_parquet(current, table, part, out_dir))
                    got.update(current.projects)
                    current = None
        if current is not None:
            files.append(_close_parquet(current, table, part, out_dir))
            got.update(current.projects)
        if got != want:
            raise TransferError(
                f"{table} partition {part}: {dict(got)} rows per project were written but the"
                f" store counts {dict(want)}"
            )
        part_files = [f for f in files if f["partition"] == part]
        progress(
            f"{table} {part}: {sum(want.values()):,} rows in {len(part_files)} file(s)"
            f" ({time.monotonic() - started:.1f} s)"
        )
    projects: Counter[str] = Counter()
    for counts in expected.values():
        projects.update(counts)
    return {
        "table": {
            "columns": [{"name": c["name"], "type": c["type"]} for c in columns],
            "rows": sum(projects.values()),
            "projects": dict(sorted(projects.items())),
        },
        "files": files,
    }


def _stream_partition(
    store: Store, table: str, part: str, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The deduplicated rows of one partition as Arrow record batches, streamed from chDB
    (its `stream_arrow`), so memory stays at about one batch whatever the partition's size."""
    stream_arrow = getattr(store, "stream_arrow", None)
    if stream_arrow is None:
        raise TransferError(f"the {store.name} store cannot be exported (only the chDB one can)")
    sql = (
        f"SELECT * FROM {table} FINAL WHERE _partition_id = {{part:String}}"
        " SETTINGS output_format_arrow_string_as_string = 1,"
        " output_format_arrow_low_cardinality_as_dictionary = 0"
    )
    try:
        for batch in stream_arrow(sql, {"part": part}, batch_rows):
            if batch.num_rows:
                yield batch
    except StoreError as exc:
        raise TransferError(f"reading {table} partition {part} failed: {exc}") from exc


def _open_parquet(path: Path, schema: pa.Schema) -> _FileWriter:
    import pyarrow.parquet as pq

    return _FileWriter(path, pq.ParquetWriter(str(path), schema, compression="zstd"))


def _close_parquet(current: _FileWriter, table: str, part: str, out_dir: Path) -> dict[str, Any]:
    current.writer.close()
    with open(current.path, "rb+") as f:
        os.fsync(f.fileno())
    return {
        "path": current.path.relative_to(out_dir).as_posix(),
        "table": table,
        "partition": part,
        "rows": current.rows,
        "projects": dict(sorted(current.projects.items())),
        "bytes": current.path.stat().st_size,
        "sha256": _sha256(current.path),
    }


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TransferError(
            f"{out_dir} is not an empty folder: export writes into a new or empty folder only"
        )


def _open_embedded(settings: Settings) -> Store:
    """The embedded chDB store of the data folder, even where a ClickHouse URL is set."""
    from ..plugins import PluginError, get_plugin_manager
    from .folders import open_store

    local = settings.model_copy(update={"clickhouse_url": None})
    try:
        store = open_store(get_plugin_manager(local), local)  # an unusable folder: one line
    except StoreLockedError:
        holder = _lock_holder(settings.store_path)
        raise TransferError(
            f"the data folder {settings.data_dir} is in use by {holder}: stop the server"
            " (watchllm serve) first, then export again (export needs the folder to itself)"
        ) from None
    except (StoreError, PluginError) as exc:
        raise TransferError(str(exc)) from None
    if store is None or store.name != "chdb":
        if store is not None:
            store.close()
        raise TransferError("export reads the embedded chDB store, which is not installed here")
    return store


def _lock_holder(folder: Path) -> str:
    try:
        return (folder / "watchllm.lock").read_text().strip() or "another process"
    except OSError:
        return "another process"


def _pending_in_spool(settings: Settings) -> int:
    """Events accepted into the spool that the embedded store's sink has not delivered."""
    if settings.durability != "spool" or not (settings.spool_path / "segments").is_dir():
        return 0
    from ..app import open_spool

    try:
        spool, lock = open_spool(settings)
    except StoreLockedError:
        raise TransferError(
            f"the spool {settings.spool_path} is in use by {_lock_holder(settings.spool_path)}:"
            " stop it first, then export again"
        ) from None
    try:
        _, delivered = spool.load_cursor(_STORE_SINK)
        return max(0, spool.next_seq - delivered)
    finally:
        spool.close()
        lock.release()


def _dead_letter_events(settings: Settings) -> int:
    from ..delivery.dead_letters import read_dead_letters

    folder = settings.spool_path / "dead-letter"
    if not folder.is_dir():
        return 0
    return sum(len(e.events) for e in read_dead_letters(folder, _STORE_SINK).entries)


def _source_migrations(store: Store) -> list[dict[str, Any]]:
    try:
        rows = store.query("SELECT version, name FROM schema_migrations ORDER BY version")
    except StoreError:
        raise TransferError(
            "the data folder has no WatchLLM schema (no schema_migrations table): nothing to export"
        ) from None
    return [{"version": int(r["version"]), "name": r["name"]} for r in rows]


def _average_row_bytes(store: Store, table: str) -> float:
    rows = store.query(
        "SELECT sum(rows) AS r, sum(data_uncompressed_bytes) AS b FROM system.parts"
        " WHERE active AND database = currentDatabase() AND table = {t:String}",
        {"t": table},
    )
    r, b = int(rows[0]["r"] or 0), int(rows[0]["b"] or 0)
    return b / r if r else 1024.0


def _batch_rows(average_row_bytes: float) -> int:
    rows = int(_BATCH_BYTES // max(average_row_bytes, 1.0))
    return max(_MIN_BATCH_ROWS, min(_MAX_BATCH_ROWS, rows))


# --- verify -------------------------------------------------------------------------------------


def read_manifest(in_dir: Path) -> dict[str, Any]:
    """The manifest of an export folder, its structure checked (TransferError if not)."""
    path = in_dir / MANIFEST
    if not in_dir.is_dir():
        raise TransferError(f"{in_dir} is not a folder")
    if path.is_symlink():
        raise TransferError(
            f"{MANIFEST} in {in_dir} is a symbolic link: an import reads only the export's"
            " own files; copy the file into the folder instead"
        )
    if not path.is_file():
        raise TransferError(
            f"{path} not found: {in_dir} is not a finished WatchLLM export"
            " (an export writes its manifest last)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TransferError(f"{path} is not readable JSON: {exc}") from None

    def bad(why: str) -> TransferError:
        return TransferError(f"{path} is not a valid WatchLLM export manifest: {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"its format is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TransferError(
            f"{path} has export format version {version!r}; this WatchLLM ({__version__}) reads"
            f" up to {FORMAT_VERSION}: upgrade WatchLLM on this machine"
        )
    tables = manifest.get("tables")
    files = manifest.get("files")
    if not isinstance(tables, dict) or not isinstance(files, list):
        raise bad("no 'tables' object or no 'files' list")
    for table, info in tables.items():
        if table not in TABLES:
            raise bad(f"unknown table {table!r}")
        if not (
            isinstance(info, dict)
            and _is_count(info.get("rows"))
            and _is_counts(info.get("projects"))
            and isinstance(info.get("columns"), list)
            and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in info["columns"])
        ):
            raise bad(f"table {table!r} has no rows, projects or columns")
    seen: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise bad("a file entry is not an object")
        rel = entry.get("path")
        found = _FILE_PATH.match(rel) if isinstance(rel, str) else None
        if found is None or found[1] != entry.get("table") or found[1] not in tables:
            raise bad(f"bad file path {rel!r}")
        if rel in seen:
            raise bad(f"file {rel} is listed twice")
        seen.add(rel)
        if not (
            found[2] == entry.get("partition")
            and _is_count(entry.get("rows"))
            and _is_count(entry.get("bytes"))
            and _is_counts(entry.get("projects"))
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        ):
            raise bad(f"the entry of {rel} lacks its partition, rows, bytes, projects or sha256")
        if sum(entry["projects"].values()) != entry["rows"]:
            raise bad(f"the per-project rows of {rel} do not add up to its rows")
    for table, info in tables.items():
        summed: Counter[str] = Counter()
        for entry in files:
            if entry["table"] == table:
                summed.update(entry["projects"])
        if dict(summed) != {p: n for p, n in info["projects"].items() if n}:
            raise bad(f"the files of {table} do not add up to its per-project rows")
        if sum(summed.values()) != info["rows"]:
            raise bad(f"the files of {table} do not add up to its rows")
    source = manifest.get("source")
    migrations = source.get("migrations") if isinstance(source, dict) else None
    if not isinstance(migrations, list) or not all(isinstance(m, dict) for m in migrations):
        raise bad("no list of the source's migrations")
    known = {m.version for m in load_migrations()}
    unknown = [m.get("version") for m in migrations if m.get("version") not in known]
    if unknown:
        raise TransferError(
            f"this export comes from a newer WatchLLM (migrations {unknown} are unknown to"
            f" {__version__}): upgrade WatchLLM on this machine, then import again"
        )
    return manifest


def verify_files(in_dir: Path, manifest: dict[str, Any], progress: Progress = _print) -> None:
    """The folder holds exactly the files listed, none a symlink, each with its size,
    checksum, columns, row count and rows per project (counted from the data itself)."""
    import pyarrow.compute as pc

    files = manifest["files"]
    started = time.monotonic()
    total = sum(f["bytes"] for f in files)
    progress(f"verifying {len(files)} files ({total / 1e6:,.1f} MB) against {MANIFEST}")
    check_folder(in_dir, manifest)
    for entry in files:
        path = in_dir / entry["path"]
        if not path.is_file():
            raise TransferError(f"export file {entry['path']} is missing from {in_dir}")
        if path.stat().st_size != entry["bytes"]:
            raise TransferError(
                f"export file {entry['path']} has {path.stat().st_size} bytes, not the"
                f" {entry['bytes']} of {MANIFEST}: it was altered or truncated"
            )
        if _sha256(path) != entry["sha256"]:
            raise TransferError(
                f"export file {entry['path']} does not match its SHA-256 in {MANIFEST}:"
                " it was altered"
            )
        with _open_export_file(in_dir, entry["path"]) as f:
            try:
                parquet = _parquet_file(f)
                meta, names = parquet.metadata, parquet.schema_arrow.names
            except Exception as exc:
                raise TransferError(
                    f"export file {entry['path']} is not readable Parquet: {exc}"
                ) from None
            if meta.num_rows != entry["rows"]:
                raise TransferError(
                    f"export file {entry['path']} holds {meta.num_rows} rows, not the"
                    f" {entry['rows']} of {MANIFEST}"
                )
            declared = [c["name"] for c in manifest["tables"][entry["table"]]["columns"]]
            if names != declared:
                raise TransferError(
                    f"the columns of export file {entry['path']} are not those {MANIFEST} lists"
                    f" for {entry['table']}"
                )
            # The rows per project of the data, not only of the manifest: a file whose rows
            # belong to other projects than it claims is refused before anything is inserted.
            found: Counter[str] = Counter()
            for batch in parquet.iter_batches(batch_size=_MAX_BATCH_ROWS, columns=["project_id"]):
                counts = pc.value_counts(batch.column(0)).to_pylist()
                found.update({c["values"]: c["counts"] for c in counts})
            _check_ranges(parquet, entry, names)
        claimed = {p: n for p, n in entry["projects"].items() if n}
        if dict(found) != claimed:
            raise TransferError(
                f"export file {entry['path']} holds rows per project {_shown(found)}, not the"
                f" {_shown(claimed)} of {MANIFEST}: it was altered"
            )
    progress(f"all {len(files)} files match ({time.monotonic() - started:.1f} s)")


def _check_ranges(parquet: Any, entry: Mapping[str, Any], names: list[str]) -> None:
    """Refuse a file with a value outside the contract's numeric ranges (NaN and infinities
    too), naming the file, table, column, value and event: such a row is either tampered or
    stored before the ranges existed, and the server should not get it (docs/MOVING.md)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ranges = {c: r for c, r in _RANGES.get(entry["table"], {}).items() if c in names}
    if not ranges:
        return
    ids = ["event_id"] if "event_id" in names else []
    for batch in parquet.iter_batches(batch_size=_MAX_BATCH_ROWS, columns=[*ranges, *ids]):
        for column, (lo, hi) in ranges.items():
            values = batch.column(column)
            if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
                raise TransferError(
                    f"export file {entry['path']}: {entry['table']}.{column} has type"
                    f" {values.type}, not a number: it was altered"
                )
            outside = pc.or_(pc.less(values, lo), pc.greater(values, hi))
            if pa.types.is_floating(values.type):
                outside = pc.or_(outside, pc.invert(pc.is_finite(values)))
            outside = pc.fill_null(outside, False)
            if not pc.any(outside).as_py():
                continue
            row = pc.index(outside, True).as_py()
            event = f" (event_id {batch.column('event_id')[row].as_py()})" if ids else ""
            raise TransferError(
                f"export file {entry['path']}: {entry['table']}.{column} holds"
                f" {values[row].as_py()!r}{event}, outside the range {lo:g}..{hi:g} that the"
                f" event contract allows; nothing was imported (see docs/MOVING.md,"
                ' "Values outside the contract")'
            )


def check_folder(in_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse symlinks (an import reads inside the export folder only) and any file the
    manifest does not list (an export writes nothing else)."""
    listed = {MANIFEST} | {f["path"] for f in manifest["files"]}
    for root, dirs, names in os.walk(in_dir, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(in_dir).as_posix()
            if path.is_symlink():
                raise TransferError(
                    f"{rel} in {in_dir} is a symbolic link: an import reads only the export's"
                    " own files; copy the file into the folder instead"
                )
            if name in names and rel not in listed:
                raise TransferError(
                    f"{rel} in {in_dir} is not listed in {MANIFEST}: an export folder holds"
                    " only the files its manifest lists; remove it, or export again"
                )


@contextmanager
def _open_export_file(in_dir: Path, rel: str) -> Iterator[Any]:
    """An export file opened without following a symlink (one put there after the check)."""
    try:
        fd = os.open(in_dir / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise TransferError(f"export file {rel} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        yield f


def _parquet_file(f: Any) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(f)


def _shown(counts: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{p}: {n:,}" for p, n in sorted(counts.items())) + "}"


# --- import -------------------------------------------------------------------------------------


def import_folder(
    settings: Settings,
    in_dir: Path,
    url: str,
    *,
    resume: bool = False,
    batch_rows: int | None = None,
    progress: Progress = _print,
) -> dict[str, Any]:
    """Verify the export in `in_dir`, then import it into the ClickHouse server at `url`."""
    from ..settings import clickhouse_url_problem, masked_clickhouse_url

    # Before the files are verified (minutes for a big export), and never with its password.
    problem = clickhouse_url_problem(url)
    if problem:
        raise TransferError(f"bad ClickHouse URL {masked_clickhouse_url(url)!r}: {problem}")
    manifest = read_manifest(in_dir)
    verify_files(in_dir, manifest, progress)
    store = _open_server(settings, url)
    try:
        return import_into(
            store,
            in_dir,
            manifest,
            resume=resume,
            batch_rows=batch_rows,
            target=redact_url(url),
            progress=progress,
        )
    except StoreError as exc:
        raise TransferError(
            f"{exc} (if rows were inserted already, run the same import with --resume once"
            " the server answers again)"
        ) from None
    finally:
        store.close()


def import_into(
    store: Store,
    in_dir: Path,
    manifest: dict[str, Any],
    *,
    resume: bool = False,
    batch_rows: int | None = None,
    target: str = "the target",
    progress: Progress = _print,
) -> dict[str, Any]:
    """Import a verified export into an open store; returns per-table rows and timings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if batch_rows is not None and batch_rows < 1:
        raise TransferError("the number of rows per insert must be at least 1")
    started = time.monotonic()
    tables: dict[str, dict[str, Any]] = manifest["tables"]
    projects = sorted({p for info in tables.values() for p in info["projects"]})
    try:
        applied = apply_migrations(store)
    except StoreError as exc:
        raise TransferError(f"applying the migrations on {target} failed: {exc}") from None
    progress(
        f"migrations on {target}: "
        + (f"applied {', '.join(applied)}" if applied else "the schema is up to date")
    )
    _check_columns(store, tables)
    existing = _existing_rows(store, projects)
    if existing and not resume:
        shown = "; ".join(
            f"{table}: " + ", ".join(f"{p} {n:,}" for p, n in sorted(counts.items()))
            for table, counts in existing.items()
        )
        raise TransferError(
            f"{target} already has rows of the exported projects ({shown}); nothing was"
            " inserted. If an import of this same export was interrupted, run it again with"
            " --resume; otherwise import into an empty database"
        )
    complete = _complete_partitions(store, manifest, projects) if resume and existing else set()
    files = manifest["files"]
    total = sum(f["rows"] for f in files)
    done_rows = 0
    inserted: Counter[str] = Counter()
    dropped: dict[str, Counter[str]] = {}
    # Every file goes into a staging table first; the tables get rows only once every staged
    # table holds exactly the export's rows per partition and project, as FINAL counts them
    # (duplicates collapsed). A failed check drops the staging tables: nothing is kept.
    sending = [f for f in files if (f["table"], f["partition"]) not in complete]
    staging = {t: _STAGING_PREFIX + t for t in TABLES if any(f["table"] == t for f in sending)}
    try:
        for table, stage in staging.items():
            _create_staging(store, table, stage)
        for index, entry in enumerate(files, 1):
            table = entry["table"]
            if (table, entry["partition"]) in complete:
                done_rows += entry["rows"]
                progress(
                    f"[{index}/{len(files)}] {entry['path']}: already complete on the target,"
                    " skipped"
                )
                continue
            file_started = time.monotonic()
            with _open_export_file(in_dir, entry["path"]) as f:
                parquet = pq.ParquetFile(f)
                per_insert = batch_rows or _batch_rows(_parquet_row_bytes(parquet))
                for batch in parquet.iter_batches(batch_size=per_insert):
                    _insert(store, staging[table], pa.Table.from_batches([batch]), target, progress)
                    inserted[table] += batch.num_rows
            done_rows += entry["rows"]
            progress(
                f"[{index}/{len(files)}] {entry['path']}: {entry['rows']:,} rows"
                f" in {time.monotonic() - file_started:.1f} s"
                f" ({done_rows:,}/{total:,} rows, {100 * done_rows / max(total, 1):.0f}%)"
            )
        if staging:
            progress("checking the staged rows (FINAL counts per table, month and project)")
            mismatches = _check_staged(store, staging, sending)
            if mismatches:
                raise CountMismatch(
                    mismatches, "; nothing was inserted into the tables (the staged rows are gone)"
                )
            dropped = _find_later_copies(store, staging)
            if dropped:
                copies = sum(n for counts in dropped.values() for n in counts.values())
                progress(
                    f"dropping {copies:,} extra copies of event ids (the store keeps one copy"
                    " per project and event_id: the one already on the target, else the"
                    " earliest):"
                )
                for table, counts in dropped.items():
                    progress(_table_line(table, {"rows": sum(counts.values()), "projects": counts}))
            _move_staged(store, staging, sending, tables, target, progress, bool(dropped))
    finally:
        extra = [_LATER_COPIES] if staging else []
        _drop_staging(store, [*staging.values(), *extra])
    # What the target must count: the export's rows less the extra copies dropped.
    expected = _less(tables, dropped)
    progress(f"checking the counts on {target} (FINAL, per table and project)")
    mismatches = compare_counts(store, expected, projects)
    if mismatches:
        raise CountMismatch(mismatches)
    elapsed = time.monotonic() - started
    rows = sum(inserted.values())
    skipped = sum(1 for f in files if (f["table"], f["partition"]) in complete)
    copies = sum(n for counts in dropped.values() for n in counts.values())
    notes = [_rate(rows, elapsed)]
    if skipped:
        were = "was" if skipped == 1 else "were"
        notes.append(f"{skipped} of {_counted(len(files), 'file')} {were} already complete")
    shown = "; ".join(note for note in notes if note)
    progress(
        f"imported {_counted(rows, 'row')} into {target} in {elapsed:.1f} s"
        + (f" ({shown})" if shown else "")
        + (
            f"; dropped {copies:,} extra copies of event ids; the counts match the export"
            " less those copies for every table and project:"
            if copies
            else "; the counts match the export for every table and project:"
        )
    )
    for table in TABLES:
        progress(_table_line(table, expected.get(table, {"rows": 0, "projects": {}})))
    progress(
        "the hourly rollup is rebuilt on the target: every hour is marked as its events are"
        " inserted, and `watchllm serve` on the server recomputes marked hours"
    )
    progress(f"note: {NOT_COPIED_NOTE}")
    return {
        "inserted": dict(inserted),
        "dropped": {t: dict(c) for t, c in dropped.items()},
        "elapsed_s": elapsed,
        "skipped": sorted(complete),
    }


def _less(
    tables: Mapping[str, Mapping[str, Any]], dropped: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, Any]]:
    """The manifest's tables with the dropped rows taken off their per-project counts."""
    out: dict[str, dict[str, Any]] = {}
    for table, info in tables.items():
        less = dropped.get(table, {})
        counts = {p: n - less.get(p, 0) for p, n in info["projects"].items()}
        out[table] = {**info, "rows": sum(counts.values()), "projects": counts}
    return out


def compare_counts(
    store: Store, tables: Mapping[str, Mapping[str, Any]], projects: list[str]
) -> list[str]:
    """One line per (table, project) whose FINAL count on `store` differs from `tables`."""
    lines = []
    for table in TABLES:
        want = dict(tables.get(table, {}).get("projects", {}))
        got = _final_counts(store, table, projects)
        for project in sorted(set(want) | set(got)):
            if want.get(project, 0) != got.get(project, 0):
                lines.append(
                    f"count mismatch: {table}, project {project}: the target has"
                    f" {got.get(project, 0):,} rows, the export {want.get(project, 0):,}"
                )
    return lines


def _final_counts(store: Store, table: str, projects: list[str]) -> dict[str, int]:
    if not projects:
        return {}
    rows = store.query(
        f"SELECT project_id, count() AS n FROM {table} FINAL"
        " WHERE project_id IN {projects:Array(String)} GROUP BY project_id",
        {"projects": projects},
    )
    return {r["project_id"]: int(r["n"]) for r in rows}


def _existing_rows(store: Store, projects: list[str]) -> dict[str, dict[str, int]]:
    found = {}
    for table in TABLES:
        if not projects:
            break
        rows = store.query(
            f"SELECT project_id, count() AS n FROM {table}"
            " WHERE project_id IN {projects:Array(String)} GROUP BY project_id",
            {"projects": projects},
        )
        counts = {r["project_id"]: int(r["n"]) for r in rows if int(r["n"])}
        if counts:
            found[table] = counts
    return found


def _complete_partitions(
    store: Store, manifest: dict[str, Any], projects: list[str]
) -> set[tuple[str, str]]:
    """(table, partition) pairs whose FINAL counts per project on the target already equal
    the export's: an interrupted import finished them, so --resume need not send them again."""
    want: dict[tuple[str, str], Counter[str]] = {}
    for entry in manifest["files"]:
        want.setdefault((entry["table"], entry["partition"]), Counter()).update(entry["projects"])
    complete = set()
    for table in TABLES:
        got: dict[str, Counter[str]] = {}
        try:
            rows = store.query(
                f"SELECT _partition_id AS part, project_id, count() AS n FROM {table} FINAL"
                " WHERE project_id IN {projects:Array(String)} GROUP BY part, project_id",
                {"projects": projects},
            )
        except StoreError:  # no _partition_id here (a Distributed table?): send everything
            return set()
        for row in rows:
            got.setdefault(row["part"], Counter())[row["project_id"]] = int(row["n"])
        for (t, part), counts in want.items():
            if t == table and got.get(part) == counts:
                complete.add((t, part))
    return complete


def _table_keys(store: Store, table: str) -> tuple[str, str]:
    """(partition key, sorting key) of `table`, or of its `_local` table on a cluster."""
    rows = store.query(
        "SELECT name, partition_key, sorting_key FROM system.tables"
        " WHERE database = currentDatabase() AND name IN ({t:String}, {local:String})"
        " AND sorting_key != ''",
        {"t": table, "local": f"{table}_local"},
    )
    if not rows:
        raise TransferError(f"the target has no table {table} with a sorting key")
    row = min(rows, key=lambda r: r["name"] != table)
    return row["partition_key"], row["sorting_key"]


def _create_staging(store: Store, table: str, stage: str) -> None:
    """An empty table shaped like `table`, with its partitions and sorting key, on the node
    the URL reaches (a plain MergeTree: no replication, no materialized view reads it)."""
    partition, sorting = _table_keys(store, table)
    store.execute(f"DROP TABLE IF EXISTS {stage}")  # left by an import that was killed
    store.execute(
        f"CREATE TABLE {stage} AS {table} ENGINE = MergeTree"
        f" PARTITION BY {partition} ORDER BY ({sorting})"
    )


def _check_staged(
    store: Store, staging: Mapping[str, str], sending: list[dict[str, Any]]
) -> list[str]:
    """One line per (table, month, project) whose staged FINAL count (distinct sorting keys,
    which is what FINAL keeps) differs from the export files'."""
    lines = []
    for table, stage in staging.items():
        want: Counter[tuple[str, str]] = Counter()
        for entry in sending:
            if entry["table"] == table:
                for project, n in entry["projects"].items():
                    want[(entry["partition"], project)] += n
        _, sorting = _table_keys(store, table)
        got = {
            (r["part"], r["project_id"]): int(r["n"])
            for r in store.query(
                f"SELECT _partition_id AS part, project_id, uniqExact({sorting}) AS n"
                f" FROM {stage} GROUP BY part, project_id"
            )
        }
        for part, project in sorted(set(want) | set(got)):
            if want.get((part, project), 0) != got.get((part, project), 0):
                lines.append(
                    f"count mismatch: {table} {part}, project {project}: the files hold"
                    f" {got.get((part, project), 0):,} distinct rows, the export"
                    f" {want.get((part, project), 0):,}"
                )
    return lines


def _find_later_copies(store: Store, staging: Mapping[str, str]) -> dict[str, Counter[str]]:
    """Fill `_LATER_COPIES` with the staged (project_id, event_id, timestamp) that are not
    the copy of their id the store keeps, and return the staged rows that are, per table and
    project (distinct sorting keys, as FINAL counts). The store keeps one copy per id
    (store_sink.py): a copy already in the target's events wins (it was stored first);
    otherwise the earliest timestamp among the staged copies, as migration 0009 keeps. An
    export from before 0009, or a tampered one, can hold several."""
    stages = [staging[t] for t in _BY_EVENT_ID if t in staging]
    if not stages:
        return {}
    staged = " UNION ALL ".join(
        f"SELECT project_id, event_id, timestamp FROM {stage}" for stage in stages
    )
    store.execute(f"DROP TABLE IF EXISTS {_LATER_COPIES}")
    # argMin over (source, timestamp): a stored copy (0) before any staged one (1), then
    # the earliest timestamp.
    store.execute(
        f"CREATE TABLE {_LATER_COPIES} ENGINE = MergeTree ORDER BY (project_id, event_id)"
        f" AS SELECT DISTINCT project_id, event_id, timestamp FROM ({staged})"
        " WHERE (project_id, event_id, timestamp) NOT IN ("
        "  SELECT project_id, event_id, argMin(timestamp, (src, timestamp)) FROM ("
        f"   SELECT project_id, event_id, timestamp, 1 AS src FROM ({staged})"
        "    UNION ALL"
        "    SELECT project_id, event_id, timestamp, 0 AS src FROM events"
        f"    WHERE (project_id, event_id) IN (SELECT project_id, event_id FROM ({staged}))"
        "  ) GROUP BY project_id, event_id"
        ")"
    )
    dropped: dict[str, Counter[str]] = {}
    for table in _BY_EVENT_ID:
        if table not in staging:
            continue
        _, sorting = _table_keys(store, table)
        rows = store.query(
            f"SELECT project_id, uniqExact({sorting}) AS n FROM {staging[table]}"
            " WHERE (project_id, event_id, timestamp) IN"
            f" (SELECT project_id, event_id, timestamp FROM {_LATER_COPIES})"
            " GROUP BY project_id"
        )
        counts = Counter({r["project_id"]: int(r["n"]) for r in rows if int(r["n"])})
        if counts:
            dropped[table] = counts
    return dropped


def _move_staged(
    store: Store,
    staging: Mapping[str, str],
    sending: list[dict[str, Any]],
    tables: Mapping[str, Mapping[str, Any]],
    target: str,
    progress: Progress,
    drop_later_copies: bool = False,
) -> None:
    """Copy the checked staged rows into the tables, a month at a time, on the server, less
    the later copies of an id (`_find_later_copies`). An interruption here leaves checked
    rows only; --resume sends the unfinished months again."""
    for table, stage in staging.items():
        columns = ", ".join(f"`{c['name']}`" for c in tables[table]["columns"])
        skip = (
            " AND (project_id, event_id, timestamp) NOT IN"
            f" (SELECT project_id, event_id, timestamp FROM {_LATER_COPIES})"
            if drop_later_copies and table in _BY_EVENT_ID
            else ""
        )
        for part in sorted({f["partition"] for f in sending if f["table"] == table}):
            started = time.monotonic()
            try:
                store.execute(
                    f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage}"
                    " WHERE _partition_id = {part:String}" + skip,
                    {"part": part},
                )
            except StoreError as exc:
                raise TransferError(
                    f"moving the checked rows of {table} {part} into the table on {target}"
                    f" failed: {exc}; run the same import again with --resume to continue"
                ) from None
            progress(f"{table} {part}: checked rows in ({time.monotonic() - started:.1f} s)")


def _drop_staging(store: Store, stages: Iterable[str]) -> None:
    for stage in stages:
        with suppress(StoreError):  # the server is gone: the next import drops it first
            store.execute(f"DROP TABLE IF EXISTS {stage}")


def _check_columns(store: Store, tables: Mapping[str, Mapping[str, Any]]) -> None:
    """Every exported column exists in the target's table (nothing is invented or dropped)."""
    for table, info in tables.items():
        if not info["rows"]:
            continue
        rows = store.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase()"
            " AND table = {t:String}",
            {"t": table},
        )
        target = {r["name"] for r in rows}
        missing = [c["name"] for c in info["columns"] if c["name"] not in target]
        if missing:
            raise TransferError(
                f"the target's table {table} has no column {', '.join(missing)} of the export:"
                " the export comes from a newer schema; upgrade WatchLLM, then import again"
            )


def _insert(store: Store, table: str, data: pa.Table, target: str, progress: Progress) -> None:
    """Insert one batch; a failure that may pass (server down, timeout) is retried, which is
    safe: the tables are keyed on the row's id and every count reads FINAL."""
    for attempt, wait in enumerate((*_INSERT_RETRIES, None)):
        try:
            store.insert(table, data)
            return
        except StoreError as exc:
            if exc.permanent:
                raise TransferError(
                    f"{target} refused {data.num_rows} rows for {table}: {exc}"
                ) from None
            if wait is None:
                raise TransferError(
                    f"inserting {data.num_rows} rows into {table} on {target} failed: {exc};"
                    " run the same import again with --resume to continue"
                ) from None
            progress(f"insert into {table} failed ({exc}); retry {attempt + 1} in {wait:g} s")
            time.sleep(wait)


def _parquet_row_bytes(parquet: Any) -> float:
    meta = parquet.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return size / meta.num_rows if meta.num_rows else 1024.0


def _open_server(settings: Settings, url: str) -> Store:
    """The ClickHouse-server store at `url`, through the store plugins."""
    from ..plugins import PluginError, get_plugin_manager

    remote = settings.model_copy(update={"clickhouse_url": url})
    try:
        store = get_plugin_manager(remote).hook.register_store(settings=remote)
    except (StoreError, PluginError) as exc:
        raise TransferError(str(exc)) from None
    if store is None or store.name != "clickhouse":
        if store is not None:
            store.close()
        raise TransferError(
            "import needs the ClickHouse-server store plugin (clickhouse_store), which is not"
            " loaded (is it in disable_plugins?)"
        )
    try:
        store.version()  # the plugin connects lazily to a server that is down: fail now
    except StoreError as exc:
        store.close()
        raise TransferError(str(exc)) from None
    return store


# --- helpers --------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """A ClickHouse URL without its password and options, for messages."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the ClickHouse server"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path or '/'}"


# A rate over less time than this is noise (3 rows in 0.1 s is not 30 rows/s): not shown.
MIN_RATE_S = 1.0


def _rate(rows: int, elapsed: float) -> str:
    """`12,345 rows/s` over MIN_RATE_S or more; "" over less."""
    return f"{rows / elapsed:,.0f} rows/s" if elapsed >= MIN_RATE_S else ""


def _counted(n: int, word: str) -> str:
    """`1 row`, `1,000 rows`, `0 files`."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _table_line(table: str, info: Mapping[str, Any]) -> str:
    """`  events       1,234 rows  (acme 1,000, other 234)` for the summaries."""
    projects: Mapping[str, int] = info["projects"]
    shown = ", ".join(f"{p} {n:,}" for p, n in sorted(projects.items())[:8])
    more = f", and {len(projects) - 8} more projects" if len(projects) > 8 else ""
    return f"  {table:<12} {info['rows']:>12,} rows" + (f"  ({shown}{more})" if shown else "")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_count(v) for k, v in value.items()
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
