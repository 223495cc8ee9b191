"""`watchllm export` and `watchllm import`, run as a user runs them (real processes): an
embedded folder filled through a real server is exported to Parquet and imported into a
ClickHouse server (tests/chfixture.py), then the tables, the counts and every analytics
answer are compared with the embedded store's; and the refusals and recoveries: a busy
folder, a non-empty target, an interrupted import resumed, a tampered export, a count that
does not match."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chfixture import Fixture
from conftest import ServerThread, free_port, make_settings
from test_analytics import START, make_events
from test_cli import cli
from test_ingest import ALL_TYPES

from watchllm_ext.analytics import queries as Q
from watchllm_ext.analytics.rollup import refresh_rollups
from watchllm_ext.app import create_app, open_spool
from watchllm_ext.keys import KeyStore
from watchllm_ext.store import Store, apply_migrations, load_migrations
from watchllm_ext.store.transfer import TransferError, import_folder
from watchllm_plugins.chdb_store import ChdbStore
from watchllm_plugins.clickhouse_store import ClickHouseStore

USER = "watchllm"
PASSWORD = "p@ss:w/rd %"  # must be URL-encoded in the URL
TABLES = ("events", "tool_calls", "agent_steps", "spans")
KEYS = {
    "events": "project_id, timestamp, event_id",
    "tool_calls": "project_id, timestamp, event_id, call_index",
    "agent_steps": "project_id, timestamp, event_id",
    "spans": "project_id, start_time, trace_id, span_id",
}
DECEMBER = "2025-12-31T23:59:59.999Z"  # a second partition (month) beside January 2026
ROWS_PER_FILE = 400


# --- the source: an embedded folder filled through a real server, and its export -----------


def spans_table(project: str, trace_id: str, n: int) -> pa.Table:
    start = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    return pa.table(
        {
            "project_id": [project] * n,
            "trace_id": [trace_id] * n,
            "span_id": [f"s{i}" for i in range(n)],
            "parent_span_id": [None] + [f"s{i - 1}" for i in range(1, n)],
            "name": [f"step {i}" for i in range(n)],
            "kind": ["internal"] * n,
            "start_time": [start + timedelta(microseconds=7 * i) for i in range(n)],
            "end_time": [start + timedelta(milliseconds=5, microseconds=i) for i in range(n)],
            "duration_ms": [5.0 - i / 1000 for i in range(n)],
            "status_code": ["OK"] * (n - 1) + ["ERROR"],
            "status_message": [""] * (n - 1) + ["it broke: 'quotes' \"and\" ✓"],
            "service_name": ["svc"] * n,
            "event_type": [None, "prompt_call"] + [None] * (n - 2),
            "attributes": [[("gen_ai.model", "gpt-4o"), ("i", str(i))] for i in range(n)],
            "resource_attributes": [[("host", "h1")]] * n,
            "span_events": ["[]"] * n,
            "links": ["[]"] * n,
            "ingested_at": [datetime.now(UTC)] * n,
        },
        schema=pa.schema(
            [
                ("project_id", pa.string()),
                ("trace_id", pa.string()),
                ("span_id", pa.string()),
                ("parent_span_id", pa.string()),
                ("name", pa.string()),
                ("kind", pa.string()),
                ("start_time", pa.timestamp("us", tz="UTC")),
                ("end_time", pa.timestamp("us", tz="UTC")),
                ("duration_ms", pa.float64()),
                ("status_code", pa.string()),
                ("status_message", pa.string()),
                ("service_name", pa.string()),
                ("event_type", pa.string()),
                ("attributes", pa.map_(pa.string(), pa.string())),
                ("resource_attributes", pa.map_(pa.string(), pa.string())),
                ("span_events", pa.string()),
                ("links", pa.string()),
                ("ingested_at", pa.timestamp("ms", tz="UTC")),
            ]
        ),
    )


def fill(data_dir: Path) -> None:
    """Every event type, in two months, for two projects, with duplicate deliveries of
    events and spans, through a real server (spans have no HTTP route yet: they go through
    the server's own store)."""
    settings = make_settings(data_dir.parent, data_dir=data_dir)
    keys = KeyStore(settings.keys_path)
    acme, other = keys.create("acme", scope="admin"), keys.create("other", scope="admin")
    acme_events = make_events(1200, seed=7) + ALL_TYPES
    other_events = make_events(300, seed=8) + [
        {**e, "event_id": f"dec-{e['event_id']}", "timestamp": DECEMBER} for e in ALL_TYPES
    ]
    app = create_app(settings)
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=30) as client:
        for key, events in ((acme, acme_events), (other, other_events), (acme, acme_events[:150])):
            r = client.post(
                "/v1/events/batch",
                json={"events": events},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 202, r.text
        store = app.state.watchllm.store
        for _ in range(2):  # the second time: duplicates, a later ingested_at
            store.insert("spans", spans_table("acme", "run-1", 6))
            store.insert("spans", spans_table("other", "run-8-1", 3))
        writer = app.state.watchllm.writer
        deadline = time.monotonic() + 30
        while writer.lag_events():
            assert time.monotonic() < deadline, writer.stats()
            time.sleep(0.02)


def final_counts(store: Store) -> dict[str, dict[str, int]]:
    return {
        t: {
            r["project_id"]: int(r["n"])
            for r in store.query(
                f"SELECT project_id, count() AS n FROM {t} FINAL GROUP BY project_id"
            )
        }
        for t in TABLES
    }


def dumps(store: Store) -> dict[str, list[dict[str, Any]]]:
    return {t: store.query(f"SELECT * FROM {t} FINAL ORDER BY {KEYS[t]}") for t in TABLES}


def named_queries() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every named analytics query, for both projects, over both months."""
    lo, hi = START - timedelta(days=1), START + timedelta(days=3)
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for project in ("acme", "other"):
        window = {"project": project, "from": lo, "to": hi, "first_hour": lo, "end_hour": hi}
        for name in ("STATS_SUMS", "STATS_STATES"):
            out[f"{name} {project}"] = (getattr(Q, name), window)
        for key, sql in Q.TIMESERIES.items():
            step = 30 if key[0] == "Minute" else 1
            for tz in ("UTC", "Asia/Kolkata"):
                out[f"timeseries {key} {tz} {project}"] = (sql, {**window, "step": step, "tz": tz})
        logs = {
            "project": project,
            "from": lo,
            "to": hi,
            "limit": 5000,
            "has_cursor": 0,
            "cursor_ts": hi,
            "cursor_id": "",
            **dict.fromkeys(("status", "event_type", "model", "run_id", "user_id", "tag"), ""),
            "q": "",
        }
        out[f"logs {project}"] = (Q.LOGS, logs)
        out[f"logs[dogs] {project}"] = (Q.LOGS, {**logs, "q": "DOGS", "tag": "t-even"})
        runs = {**logs, "limit": 1000}
        out[f"runs {project}"] = (Q.RUNS, runs)
        for event_id in ("p1", "t1", "a1", "x1", "as1", "h1", "c1", "pa1", "dec-p1", "root"):
            args = {"project": project, "event_id": event_id}
            for name in ("EVENT", "EVENT_TOOL_CALLS", "EVENT_AGENT_STEPS", "EVENT_CHILDREN"):
                out[f"{name} {event_id} {project}"] = (getattr(Q, name), args)
        for run_id in ("run-1", "run-7-0", "run-8-1", "run-7-13"):
            args = {"project": project, "run_id": run_id}
            for name in ("RUN", "RUN_EVENTS", "RUN_SPANS"):
                sql = getattr(Q, name)
                # A query bounded in bytes (the API's bound): one far above these runs.
                bound = {"max_bytes": 1 << 40, "limit": 10_000} if "{max_bytes:" in sql else {}
                out[f"{name} {run_id} {project}"] = (sql, {**args, **bound})
    out["traces"] = ("SELECT * FROM traces ORDER BY project_id, run_id", {})
    return out


def answers(store: Store) -> dict[str, Any]:
    """Every answer from the raw events, then again after the hourly rollup has run."""
    got = {f"raw {n}": store.query(sql, p) for n, (sql, p) in named_queries().items()}
    got["refreshed"] = refresh_rollups(store, margin=timedelta(0))
    got.update({f"rolled {n}": store.query(sql, p) for n, (sql, p) in named_queries().items()})
    return got


@dataclass
class Source:
    data_dir: Path
    export: Path
    manifest: dict[str, Any]
    counts: dict[str, dict[str, int]]
    dumps: dict[str, list[dict[str, Any]]]
    hours: dict[str, set[str]]  # per project, the hours that have events
    answers: dict[str, Any]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    data_dir = root / "data"
    fill(data_dir)
    export = root / "export"
    done = cli("export", str(export), "--data-dir", str(data_dir), "--max-rows-per-file", "400")
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and "API keys are not copied" in done.stdout
    manifest = json.loads((export / "manifest.json").read_text())
    store = ChdbStore(data_dir / "chdb")
    try:
        counts = final_counts(store)
        tables = dumps(store)
        hours: dict[str, set[str]] = {}
        for r in store.query(
            "SELECT DISTINCT project_id, toString(toStartOfHour(timestamp)) AS h FROM events"
        ):
            hours.setdefault(r["project_id"], set()).add(r["h"])
        want = answers(store)
    finally:
        store.close()
    return Source(data_dir, export, manifest, counts, tables, hours, want)


# --- the target -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx(chfixture_server: Fixture) -> Fixture:
    assert (chfixture_server.user, chfixture_server.password) == (USER, PASSWORD)
    return chfixture_server


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def url(fx: Fixture) -> str:
    """The URL of a new, empty database on the fixture."""
    name = f"target_{next(_databases)}"
    admin = clickhouse_connect.get_client(**fx.client_kwargs(autogenerate_session_id=False))
    try:
        admin.command(f"CREATE DATABASE {name}")
    finally:
        admin.close()
    return fx.url + name


def open_target(url: str) -> ClickHouseStore:
    return ClickHouseStore(url)


def target_tables(url: str) -> list[str]:
    store = open_target(url)
    try:
        rows = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        return [r["name"] for r in rows]
    finally:
        store.close()


def target_counts(url: str) -> dict[str, dict[str, int]]:
    store = open_target(url)
    try:
        return final_counts(store)
    finally:
        store.close()


def copy_export(source: Source, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(source.export, copy)
    return copy


def edit_manifest(folder: Path, edit: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# --- the round trip -----------------------------------------------------------------------------


def test_the_export_is_complete_and_checked(source: Source) -> None:
    m = source.manifest
    assert m["format"] == "watchllm-export" and m["format_version"] == 1
    assert m["watchllm_version"] and m["source"]["clickhouse_version"]
    applied = [x["version"] for x in m["source"]["migrations"]]
    assert applied == [x.version for x in load_migrations()]
    assert set(m["tables"]) == set(TABLES)
    assert "hourly_usage_by_project" in m["not_exported"] and "rollup_marks" in m["not_exported"]
    assert not (source.export / "hourly_usage_by_project").exists()
    assert source.export.stat().st_mode & 0o777 == 0o700  # it holds every prompt
    # Deduplicated counts (FINAL), per table and project, as the source counts them.
    for table in TABLES:
        assert m["tables"][table]["projects"] == source.counts[table], table
        assert m["tables"][table]["rows"] == sum(source.counts[table].values())
    assert source.counts["events"] == {"acme": 1200 + 8, "other": 300 + 8}
    assert source.counts["spans"] == {"acme": 6, "other": 3}
    assert source.counts["agent_steps"] == {"acme": 1, "other": 1}
    # Files: one or more per table and month, at most ROWS_PER_FILE rows each, checksummed.
    events = [f for f in m["files"] if f["table"] == "events"]
    assert {f["partition"] for f in events} == {"202512", "202601"}
    assert len(events) >= 4 and all(0 < f["rows"] <= ROWS_PER_FILE for f in m["files"])
    for f in m["files"]:
        parquet = pq.ParquetFile(source.export / f["path"])
        assert parquet.metadata.num_rows == f["rows"]
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        assert sum(f["projects"].values()) == f["rows"]


def test_round_trip_same_rows_counts_and_answers(source: Source, url: str) -> None:
    done = cli("import", str(source.export), "--url", url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"all {len(source.manifest['files'])} files match" in out
    assert "the counts match the export for every table and project" in out
    assert "API keys are not copied" in out and PASSWORD not in out
    assert target_counts(url) == source.counts

    store = open_target(url)
    try:
        # Every row, every column, as the embedded store has it.
        assert dumps(store) == source.dumps
        # The rollup is rebuilt on the target: the materialized view marked every hour that
        # got events, nothing is computed yet, and the rollup task's refresh computes them.
        marks = store.query(
            "SELECT project_id, toString(hour) AS h FROM rollup_marks FINAL ORDER BY h"
        )
        marked: dict[str, set[str]] = {}
        for r in marks:
            marked.setdefault(r["project_id"], set()).add(r["h"])
        assert marked == source.hours
        assert store.query("SELECT count() AS n FROM hourly_usage_by_project")[0]["n"] == 0
        got = answers(store)
    finally:
        store.close()
    assert got["refreshed"] == sum(len(h) for h in source.hours.values())
    assert got.keys() == source.answers.keys()
    for name in source.answers:
        assert got[name] == source.answers[name], name
    # Not empty answers.
    assert sum(r["events"] for r in got["rolled STATS_SUMS acme"]) == 1208
    assert len(got["raw RUN_SPANS run-1 acme"]) == 6


# --- export refusals ----------------------------------------------------------------------------


def test_export_refuses_a_busy_folder_and_a_non_empty_out_dir(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory()
    data = str(server.settings.data_dir)
    busy = cli("export", str(tmp_path / "out"), "--data-dir", data)
    assert busy.returncode == 1
    line = one_line_error(busy)
    assert "in use by process" in line and "stop the server" in line
    assert not (tmp_path / "out").exists()
    server.stop()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    full = cli("export", str(tmp_path / "full"), "--data-dir", data)
    assert full.returncode == 1 and "not an empty folder" in one_line_error(full)

    none = cli("export", str(tmp_path / "out"), "--data-dir", str(tmp_path / "nothing"))
    assert none.returncode == 1 and "no embedded store" in one_line_error(none)
    assert not (tmp_path / "nothing").exists()


def test_export_refuses_events_still_in_the_spool(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = ChdbStore(settings.store_path)
    apply_migrations(store)
    store.close()
    spool, lock = open_spool(settings)
    spool.write(json.dumps([{"event_id": "e1"}]).encode(), 1)
    spool.close()
    lock.release()
    done = cli("export", str(tmp_path / "out"), "--data-dir", str(settings.data_dir))
    assert done.returncode == 1
    assert "holds 1 accepted events not yet in the store" in one_line_error(done)


# --- import refusals ----------------------------------------------------------------------------


def test_import_needs_a_url(source: Source) -> None:
    done = cli("import", str(source.export), env={"WATCHLLM_CLICKHOUSE_URL": ""})
    assert done.returncode == 2
    assert "--url" in one_line_error(done) and "WATCHLLM_CLICKHOUSE_URL" in done.stderr


def test_import_names_an_unreachable_server_without_its_password(source: Source) -> None:
    down = f"http://{USER}:secret@127.0.0.1:{free_port()}/db?connect_timeout=2"
    done = cli("import", str(source.export), "--url", down)
    assert done.returncode == 1
    line = one_line_error(done)
    assert "cannot reach ClickHouse at 127.0.0.1:" in line and "secret" not in done.stdout + line


def test_import_folder_checks_the_url_first_without_its_password(tmp_path: Path) -> None:
    # Called as a library (examples/move_to_server.py) too: the URL before the export's files.
    with pytest.raises(TransferError) as raised:
        import_folder(make_settings(tmp_path), tmp_path / "no-export", "watchllm:hunter2@h:1/db")
    assert str(raised.value) == (
        "bad ClickHouse URL 'watchllm:***@h:1/db': it has no http:// or https:// in front"
        " (the form is http(s)://user:password@host:port/database)"
    )


def test_import_takes_the_url_from_the_environment(source: Source, url: str) -> None:
    done = cli("import", str(source.export), env={"WATCHLLM_CLICKHOUSE_URL": url})
    assert done.returncode == 0, done.stderr
    assert target_counts(url) == source.counts


def test_a_tampered_or_missing_file_is_refused_before_inserting(
    source: Source, url: str, tmp_path: Path
) -> None:
    export = copy_export(source, tmp_path)
    victim = next(f["path"] for f in source.manifest["files"] if f["table"] == "tool_calls")
    data = bytearray((export / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export / victim).write_bytes(bytes(data))
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    line = one_line_error(done)
    assert victim in line and "SHA-256" in line
    assert target_tables(url) == []  # refused before connecting: not even the schema

    (export / victim).unlink()
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1 and f"{victim} is missing" in one_line_error(done)
    (export / "manifest.json").unlink()
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1 and "not a finished WatchLLM export" in one_line_error(done)
    assert target_tables(url) == []


def test_a_non_empty_target_is_refused_without_resume(source: Source, url: str) -> None:
    assert cli("import", str(source.export), "--url", url).returncode == 0
    again = cli("import", str(source.export), "--url", url)
    assert again.returncode == 1
    line = one_line_error(again)
    assert "already has rows of the exported projects" in line and "--resume" in line
    assert target_counts(url) == source.counts
    resumed = cli("import", str(source.export), "--url", url, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("already complete on the target, skipped") == len(
        source.manifest["files"]
    )


# --- interrupted imports ------------------------------------------------------------------------


def test_a_partial_import_resumes_to_exact_counts(source: Source, url: str, tmp_path: Path) -> None:
    # A subset of the export: every other events file, none of tool_calls.
    subset = copy_export(source, tmp_path)
    events = [f for f in source.manifest["files"] if f["table"] == "events"]
    dropped = {f["path"] for f in events[1::2]} | {
        f["path"] for f in source.manifest["files"] if f["table"] == "tool_calls"
    }

    def drop(manifest: dict[str, Any]) -> None:
        manifest["files"] = [f for f in manifest["files"] if f["path"] not in dropped]
        for table, info in manifest["tables"].items():
            projects: dict[str, int] = {}
            for f in manifest["files"]:
                if f["table"] == table:
                    for p, n in f["projects"].items():
                        projects[p] = projects.get(p, 0) + n
            info["projects"], info["rows"] = projects, sum(projects.values())

    edit_manifest(subset, drop)
    for path in dropped:
        (subset / path).unlink()
    first = cli("import", str(subset), "--url", url)
    assert first.returncode == 0, first.stderr
    partial = target_counts(url)
    assert partial["events"] != source.counts["events"] and partial["tool_calls"] == {}

    full = cli("import", str(source.export), "--url", url, "--resume")
    assert full.returncode == 0, full.stderr
    assert "the counts match the export" in full.stdout
    assert target_counts(url) == source.counts
    store = open_target(url)
    try:
        assert dumps(store) == source.dumps
    finally:
        store.close()


def test_a_killed_import_resumes_to_exact_counts(source: Source, url: str) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "watchllm_ext.cli",
            "import",
            str(source.export),
            "--url",
            url,
            "--batch-rows",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("[1/"):  # the first file is in; the rest takes many inserts
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    process.stdout.close()
    assert process.stderr is not None
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    # Killed while staging: the rows sent so far are in the staging table, none in the tables.
    assert target_counts(url) == {t: {} for t in TABLES}
    store = open_target(url)
    try:
        staged = store.query("SELECT count() AS n FROM _watchllm_import_events")[0]["n"]
    finally:
        store.close()
    assert 0 < int(staged) < sum(source.counts["events"].values())

    resumed = cli("import", str(source.export), "--url", url, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert target_counts(url) == source.counts
    assert not [t for t in target_tables(url) if t.startswith("_watchllm_import_")]


# --- counts that do not match -------------------------------------------------------------------


def test_rows_of_other_projects_than_claimed_are_refused_before_inserting(
    source: Source, url: str, tmp_path: Path
) -> None:
    # A manifest that says one events row of acme belongs to project "ghost": every file is
    # intact and the manifest adds up; the file's own rows per project tell.
    export = copy_export(source, tmp_path)

    def shift(manifest: dict[str, Any]) -> None:
        f = next(f for f in manifest["files"] if f["projects"].get("acme"))
        f["projects"]["acme"] -= 1
        f["projects"]["ghost"] = 1
        projects = manifest["tables"][f["table"]]["projects"]
        projects["acme"] -= 1
        projects["ghost"] = 1

    edit_manifest(export, shift)
    victim = next(f["path"] for f in source.manifest["files"] if f["projects"].get("acme"))
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    line = one_line_error(done)
    assert victim in line and "ghost: 1" in line and "altered" in line
    assert target_tables(url) == []  # refused before connecting


def reseal(folder: Path, rel: str) -> None:
    """Make the manifest agree with the file's new bytes (a tamperer who knows the format)."""
    data = (folder / rel).read_bytes()

    def seal(manifest: dict[str, Any]) -> None:
        entry = next(f for f in manifest["files"] if f["path"] == rel)
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    edit_manifest(folder, seal)


def duplicate_a_row(folder: Path, manifest: dict[str, Any]) -> str:
    """Overwrite the last row of an events file with a copy of an earlier row of the same
    project: the rows and the rows per project stay, the distinct rows are one fewer."""
    entry = next(f for f in manifest["files"] if f["table"] == "events" and f["rows"] > 1)
    table = pq.read_table(folder / entry["path"])
    projects = table.column("project_id").to_pylist()
    first = projects.index(projects[-1])
    assert first < len(projects) - 1, "no earlier row of the last row's project"
    table = pa.concat_tables([table.slice(0, table.num_rows - 1), table.slice(first, 1)])
    pq.write_table(table, folder / entry["path"], compression="zstd")
    reseal(folder, entry["path"])
    return entry["path"]


def test_a_duplicated_row_is_refused_and_nothing_is_kept_even_with_resume(
    source: Source, url: str, tmp_path: Path
) -> None:
    export = copy_export(source, tmp_path)
    duplicate_a_row(export, source.manifest)
    for extra in ((), ("--resume",)):
        done = cli("import", str(export), "--url", url, *extra)
        assert done.returncode == 1, done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("count mismatch: events "), lines
        assert "the files hold" in lines[0] and "nothing was inserted" in lines[1]
        assert target_counts(url) == {t: {} for t in TABLES}
        assert not [t for t in target_tables(url) if t.startswith("_watchllm_import_")]
    # The real export afterwards, with --resume as a user would after a failure: exact.
    done = cli("import", str(source.export), "--url", url, "--resume")
    assert done.returncode == 0, done.stderr
    assert target_counts(url) == source.counts


def test_resume_with_a_tampered_export_keeps_nothing_of_it(
    source: Source, url: str, tmp_path: Path
) -> None:
    # A first, good import of part of the data; then --resume with a tampered full export.
    assert cli("import", str(source.export), "--url", url).returncode == 0
    before = target_counts(url)
    store = open_target(url)
    try:
        store.execute("TRUNCATE TABLE tool_calls")  # as if the import had stopped before it
    finally:
        store.close()
    export = copy_export(source, tmp_path)
    victim = next(f["path"] for f in source.manifest["files"] if f["table"] == "tool_calls")
    table = pq.read_table(export / victim)
    pq.write_table(table.slice(0, table.num_rows - 1), export / victim, compression="zstd")
    reseal(export, victim)
    done = cli("import", str(export), "--url", url, "--resume")
    assert done.returncode == 1
    assert victim in one_line_error(done) and "holds" in one_line_error(done)
    assert target_counts(url) == {**before, "tool_calls": {}}


def test_symlinks_and_unlisted_files_are_refused(source: Source, url: str, tmp_path: Path) -> None:
    export = copy_export(source, tmp_path)
    victim = source.manifest["files"][0]["path"]
    outside = tmp_path / "outside.parquet"
    shutil.move(export / victim, outside)
    (export / victim).symlink_to(outside)  # the same bytes: the checksum would pass
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    line = one_line_error(done)
    assert victim in line and "symbolic link" in line
    (export / victim).unlink()
    shutil.move(outside, export / victim)

    table = victim.split("/")[0]
    moved = tmp_path / "elsewhere"
    shutil.move(export / table, moved)
    (export / table).symlink_to(moved, target_is_directory=True)
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    assert f"{table} in" in one_line_error(done) and "symbolic link" in one_line_error(done)
    (export / table).unlink()
    shutil.move(moved, export / table)

    for unlisted in ("events/202601-9999.parquet", "notes.txt", "manifest.json.tmp"):
        (export / unlisted).write_bytes(b"x")
        done = cli("import", str(export), "--url", url)
        assert done.returncode == 1
        line = one_line_error(done)
        assert unlisted in line and "not listed in manifest.json" in line
        (export / unlisted).unlink()
    assert target_tables(url) == []
    assert cli("import", str(export), "--url", url).returncode == 0
    assert target_counts(url) == source.counts


def test_a_manifest_claiming_more_rows_than_a_file_holds_is_refused(
    source: Source, url: str, tmp_path: Path
) -> None:
    export = copy_export(source, tmp_path)
    victim = source.manifest["files"][0]["path"]

    def claim_more(manifest: dict[str, Any]) -> None:
        f = manifest["files"][0]
        project = next(iter(f["projects"]))
        f["rows"] += 1
        f["projects"][project] += 1
        manifest["tables"][f["table"]]["rows"] += 1
        manifest["tables"][f["table"]]["projects"][project] += 1

    edit_manifest(export, claim_more)
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    line = one_line_error(done)
    assert victim in line and "holds" in line
    assert target_tables(url) == []


# --- one copy per event id, numbers inside the contract ------------------------------------------


def add_copies(folder: Path, manifest: dict[str, Any], event_id: str, shift: timedelta) -> int:
    """Put, first in each file that holds rows of acme's `event_id` (events, tool_calls,
    agent_steps), a second copy of those rows `shift` later, with another cost and a later
    ingested_at (as an export from before migration 0009 holds, or a tamperer writes); the
    manifest's counts, sizes and checksums follow. Returns the rows added."""
    added = 0
    for entry in manifest["files"]:
        if entry["table"] not in ("events", "tool_calls", "agent_steps"):
            continue
        table = pq.read_table(folder / entry["path"])
        rows = [
            {
                **r,
                "timestamp": r["timestamp"] + shift,
                "ingested_at": r["ingested_at"] + timedelta(days=1),
                **({"cost_estimate_usd": 123.0} if "cost_estimate_usd" in r else {}),
            }
            for r in table.to_pylist()
            if r["project_id"] == "acme" and r["event_id"] == event_id
        ]
        if not rows:
            continue
        copies = pa.Table.from_pylist(rows, schema=table.schema)
        pq.write_table(pa.concat_tables([copies, table]), folder / entry["path"])
        added += len(rows)

        def count(manifest: dict[str, Any], path: str = entry["path"], n: int = len(rows)) -> None:
            f = next(f for f in manifest["files"] if f["path"] == path)
            f["rows"] += n
            f["projects"]["acme"] += n
            manifest["tables"][f["table"]]["rows"] += n
            manifest["tables"][f["table"]]["projects"]["acme"] += n

        edit_manifest(folder, count)
        reseal(folder, entry["path"])
    return added


def acme_rows(source: Source, table: str, event_id: str) -> list[dict[str, Any]]:
    return [
        r for r in source.dumps[table] if r["project_id"] == "acme" and r["event_id"] == event_id
    ]


def first_ms(rows: list[dict[str, Any]]) -> list[int]:
    return sorted(
        int(datetime.fromisoformat(str(r["timestamp"])).replace(tzinfo=UTC).timestamp() * 1000)
        if not isinstance(r["timestamp"], datetime)
        else int(r["timestamp"].timestamp() * 1000)
        for r in rows
    )


def stored_ms(url: str, table: str, event_id: str) -> list[int]:
    store = open_target(url)
    try:
        rows = store.query(
            f"SELECT toUnixTimestamp64Milli(timestamp) AS ms FROM {table} FINAL"
            " WHERE project_id = 'acme' AND event_id = {id:String}",
            {"id": event_id},
        )
    finally:
        store.close()
    return sorted(int(r["ms"]) for r in rows)


def same_answers(source: Source, url: str, event_ids: list[str]) -> None:
    """The analytics on the target answer as the source's: each id counted once."""
    store = open_target(url)
    chdb = ChdbStore(source.data_dir / "chdb")
    try:
        queries = named_queries()
        for name in ("STATS_SUMS acme", "STATS_STATES acme", "logs acme", "runs acme"):
            sql, params = queries[name]
            assert store.query(sql, params) == source.answers[f"raw {name}"], name
        for event_id in event_ids:
            args = {"project": "acme", "event_id": event_id}
            for sql in (Q.EVENT, Q.EVENT_TOOL_CALLS):
                assert store.query(sql, args) == chdb.query(sql, args), event_id
    finally:
        chdb.close()
        store.close()


def test_two_copies_of_an_event_id_import_as_the_earliest_one(
    source: Source, url: str, tmp_path: Path
) -> None:
    priced = next(
        r["event_id"]
        for r in source.dumps["events"]
        if r["project_id"] == "acme" and r["cost_estimate_usd"]
    )
    with_calls = source.dumps["tool_calls"][0]
    assert with_calls["project_id"] == "acme"
    ids = [priced, with_calls["event_id"]]
    export = copy_export(source, tmp_path)
    added = sum(add_copies(export, source.manifest, i, timedelta(hours=1)) for i in ids)
    calls = len(acme_rows(source, "tool_calls", with_calls["event_id"]))
    assert calls and added == 2 + calls
    for extra in ((), ("--resume",)):  # again: the staged copies meet the ones already stored
        done = cli("import", str(export), "--url", url, *extra)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert f"dropping {added} extra copies of event ids" in out
        assert f"  {'events':<12} {2:>12,} rows  (acme 2)" in out
        assert f"  {'tool_calls':<12} {calls:>12,} rows  (acme {calls})" in out
        assert f"dropped {added} extra copies of event ids; the counts match the export less" in (
            out
        )
        assert target_counts(url) == source.counts
        for table in ("events", "tool_calls"):
            for event_id in ids:
                want = first_ms(acme_rows(source, table, event_id))
                assert stored_ms(url, table, event_id) == want, (table, event_id)
        same_answers(source, url, ids)
        assert not [t for t in target_tables(url) if t.startswith("_watchllm_import_")]


def test_resume_keeps_the_copy_already_on_the_target(
    source: Source, url: str, tmp_path: Path
) -> None:
    # The target holds the export; a --resume brings an earlier copy of a stored id: the
    # copy stored first stays (the store's rule), the export's counts stay exact.
    assert cli("import", str(source.export), "--url", url).returncode == 0
    event_id = next(
        r["event_id"]
        for r in source.dumps["events"]
        if r["project_id"] == "acme"
        and r["cost_estimate_usd"]
        and first_ms([r])[0] % 3_600_000 > 1000  # a second earlier stays in its month
    )
    export = copy_export(source, tmp_path)
    assert add_copies(export, source.manifest, event_id, timedelta(seconds=-1)) == 1
    done = cli("import", str(export), "--url", url, "--resume")
    assert done.returncode == 0, done.stderr
    assert "dropped 1 extra copies of event ids" in done.stdout
    assert target_counts(url) == source.counts
    assert stored_ms(url, "events", event_id) == first_ms(acme_rows(source, "events", event_id))
    same_answers(source, url, [event_id])


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("cost_estimate_usd", 1e300, "1e+300"),
        ("latency_ms", float("nan"), "nan"),
        ("cost_estimate_usd", -1.0, "-1.0"),
    ],
)
def test_a_value_outside_the_contract_is_refused_naming_file_and_column(
    source: Source, url: str, tmp_path: Path, column: str, value: float, shown: str
) -> None:
    export = copy_export(source, tmp_path)
    entry = next(f for f in source.manifest["files"] if f["table"] == "events")
    table = pq.read_table(export / entry["path"])
    values = table.column(column).to_pylist()
    values[-1] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, pa.float64()))
    pq.write_table(table, export / entry["path"], compression="zstd")
    reseal(export, entry["path"])
    done = cli("import", str(export), "--url", url)
    assert done.returncode == 1
    line = one_line_error(done)
    assert entry["path"] in line and f"events.{column} holds {shown}" in line, line
    assert table.column("event_id")[-1].as_py() in line and "nothing was imported" in line
    assert target_tables(url) == []  # refused before connecting
