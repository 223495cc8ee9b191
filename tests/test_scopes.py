"""Scopes on the admin routes and dead letters (docs/API.md, "Keys and scopes"): an admin key
administers its own project only, an operator key every project. Real server on loopback,
real chDB, real dead-letter files; and the dead-letter format that survives a torn tail."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Running, ServerThread, make_settings, prompt_call

from watchllm_ext.app import STORE_TABLES, create_app
from watchllm_ext.delivery.dead_letters import DeadLetter, append_dead_letter, parse_dead_letters
from watchllm_ext.delivery.writer import SinkError
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.keys import KeyStore

OWN, OTHER = "acme", "beta"
STORE_SINK = "store:chdb"  # the embedded store's sink, and its dead-letter file
STORE_FILE = "store_chdb.jsonl"


def _letter(sink: str, *projects: str, reason: str = "refused") -> DeadLetter:
    events = [prompt_call(f"{p}-{i}", project_id=p) for i, p in enumerate(projects)]
    return DeadLetter(sink, "2026-01-02T03:04:05+00:00", reason, events)


# --- the matrix: scope x route x own/other project ------------------------------------------------


class Matrix:
    def __init__(self, url: str, keys: dict[str, str], dead: Path) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.keys = keys
        self.dead = dead


@pytest.fixture(scope="class")  # chDB: one folder per process at a time
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("scopes")
    settings = make_settings(tmp)
    store = KeyStore(settings.keys_path, refresh_s=0.2)
    keys = {scope: store.create(OWN, scope=scope) for scope in ("ingest", "read", "admin")}
    keys["operator"] = store.create(OWN, scope="operator")
    revoked = store.create(OWN, scope="operator")
    store.revoke(revoked)
    keys["revoked"] = revoked
    keys["malformed"] = "wllm_nothing"
    app = create_app(settings)
    with ServerThread(app) as thread:
        dead = settings.spool_path / "dead-letter"
        m = Matrix(thread.url, keys, dead)
        yield m
        m.client.close()


# route name -> (method, path)
ROUTES = {
    "store": ("GET", "/v1/admin/store"),
    "tables": ("GET", "/v1/admin/tables"),
    "plugins": ("GET", "/-/plugins"),
    "count": ("GET", "/v1/admin/count"),
    "dead-letters": ("GET", "/v1/admin/dead-letters"),
    "replay": ("POST", "/v1/admin/dead-letters/replay"),
}
PER_PROJECT = {"count", "dead-letters", "replay"}
# which project the request names: own, another, or none (every project / the key's default)
TARGETS = ("own", "other", "none")


def _expected(scope: str, route: str, target: str) -> int:
    if scope in ("missing", "revoked", "malformed"):
        return 401
    if scope in ("ingest", "read"):
        return 403
    if scope == "operator":
        return 200
    # admin: its own project only; naming no project means its own project.
    return 403 if target == "other" else 200


CASES = [
    (scope, route, target)
    for scope in ("missing", "malformed", "revoked", "ingest", "read", "admin", "operator")
    for route in ROUTES
    for target in (TARGETS if route in PER_PROJECT else ("own",))
]


class TestMatrix:
    """One server for the whole matrix (a class: chDB opens one folder per process)."""

    @pytest.mark.parametrize(("scope", "route", "target"), CASES)
    def test_scope_matrix(self, matrix: Matrix, scope: str, route: str, target: str) -> None:
        # A dead letter of each project for the store sink, so list/replay have both to show.
        append_dead_letter(matrix.dead / STORE_FILE, _letter(STORE_SINK, OWN))
        append_dead_letter(matrix.dead / STORE_FILE, _letter(STORE_SINK, OTHER))
        method, path = ROUTES[route]
        params = {"own": {"project": OWN}, "other": {"project": OTHER}, "none": {}}[target]
        if route not in PER_PROJECT:
            params = {}  # it takes no `project` (nor any other parameter): 400 naming it
        headers = {} if scope == "missing" else {"Authorization": f"Bearer {matrix.keys[scope]}"}
        r = matrix.client.request(method, path, params=params, headers=headers)
        want = _expected(scope, route, target)
        assert r.status_code == want, r.text
        body = r.json()
        if want == 401:
            assert body["field"] == "Authorization"
        elif want == 403 and scope in ("ingest", "read"):
            assert body["field"] == "Authorization" and "'admin' scope" in body["message"]
        elif want == 403:
            assert body["field"] == "project" and "'operator' scope" in body["message"]
            assert repr(OWN) in body["message"]
            if target == "other":
                assert repr(OTHER) in body["message"]
        elif route in PER_PROJECT:
            # The answer names the project it is about; None: every project (operator only).
            named = {"own": OWN, "other": OTHER, "none": OWN if scope == "admin" else None}
            assert body["project"] == named[target]
            if route == "dead-letters":
                assert body["dead_letters"] and body["torn_records"] == 0
            elif route == "replay":
                assert body["unknown_sinks"] == [] and body["replayed_events"] >= 1

    def test_a_project_admin_never_touches_another_projects_dead_letters(
        self, matrix: Matrix
    ) -> None:
        path = matrix.dead / STORE_FILE
        operator = {"Authorization": f"Bearer {matrix.keys['operator']}"}
        admin = {"Authorization": f"Bearer {matrix.keys['admin']}"}
        matrix.client.post("/v1/admin/dead-letters/replay", headers=operator)  # start empty
        append_dead_letter(path, _letter(STORE_SINK, OWN, OTHER, OWN))  # one batch, two projects
        append_dead_letter(path, _letter(STORE_SINK, OTHER, reason="beta's secret reason"))

        listed = matrix.client.get("/v1/admin/dead-letters", headers=admin).json()
        assert [d["events"] for d in listed["dead_letters"]] == [2]
        assert "secret" not in json.dumps(listed)

        replay = matrix.client.post("/v1/admin/dead-letters/replay", headers=admin).json()
        assert replay["replayed_events"] == 2 and replay["project"] == OWN
        # What is left is beta's, whole: its part of the mixed batch and its own batch.
        left = matrix.client.get("/v1/admin/dead-letters", headers=operator).json()
        assert sorted((d["events"], d["reason"]) for d in left["dead_letters"]) == [
            (1, "beta's secret reason"),
            (1, "refused"),
        ]
        assert (
            matrix.client.get("/v1/admin/dead-letters", headers=admin).json()["dead_letters"] == []
        )
        remaining = parse_dead_letters(path.read_bytes())
        assert {e["project_id"] for entry in remaining.entries for e in entry.events} == {OTHER}

    @pytest.mark.parametrize(
        ("scope", "command", "project", "ok"),
        [
            ("admin", "count-rows", OWN, True),
            ("admin", "count-rows", OTHER, False),
            ("operator", "count-rows", OTHER, True),
            ("admin", "dead-letter list", OTHER, False),
            ("operator", "dead-letter list", OTHER, True),
            ("admin", "dead-letter replay", OTHER, False),
            ("read", "check-tables", None, False),
        ],
    )
    def test_the_cli_url_mode_follows_the_scopes(
        self, matrix: Matrix, scope: str, command: str, project: str | None, ok: bool
    ) -> None:
        args = [*command.split(), "--url", str(matrix.client.base_url), "--key"]
        args += [matrix.keys[scope], *(["--project", project] if project else [])]
        done = subprocess.run(
            [sys.executable, "-m", "watchllm_ext.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if ok:
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode == 1 and "answered 403" in done.stderr
            assert (f"'{OTHER}'" if project else "'admin' scope") in done.stderr


def test_admin_count_is_its_projects_only(server_factory: Any) -> None:
    server: Running = server_factory()
    other = server.keys.create(OTHER, scope="admin")
    operator = server.keys.create(OTHER, scope="operator")
    for key, project in ((server.key, OWN), (other, OTHER)):
        r = server.client.post(
            f"/v1/projects/{project}/events", json=prompt_call(), headers=server.headers(key)
        )
        assert r.status_code == 202, r.text
    server.flush()

    def count(key: str, **params: str) -> httpx.Response:
        return server.client.get("/v1/admin/count", params=params, headers=server.headers(key))

    assert count(server.key, project=OWN).json()["count"] == 1
    r = count(server.key, project=OTHER)
    assert r.status_code == 403 and "'beta'" in r.json()["message"]
    assert count(operator, project=OWN).json()["count"] == 1
    assert count(operator).json() == {"table": "events", "project": None, "run": None, "count": 2}
    # A project id no key can have: 400 naming it (as the analytics routes' project_id).
    for key in (server.key, operator):
        r = count(key, project="../x")
        assert (r.status_code, r.json()["field"]) == (400, "project"), r.text
    # The tables it counts are the event tables, as docs/API.md lists them; another table
    # of the store is refused naming the ones it counts.
    api_doc = (Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()
    (line,) = [x for x in api_doc.splitlines() if x.startswith("- `GET /v1/admin/count")]
    for table in STORE_TABLES:
        assert count(operator, table=table).status_code == 200, table
        assert f"`{table}`" in line, table
    tables = server.client.get("/v1/admin/tables", headers=server.headers(operator)).json()
    other_table = sorted(set(tables["tables"]) - set(STORE_TABLES))[0]
    refused = count(operator, table=other_table)
    assert (refused.status_code, refused.json()["field"]) == (400, "table")
    assert all(table in refused.json()["message"] for table in STORE_TABLES)


def test_keys_create_makes_operator_keys_only_by_name(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watchllm_ext.cli", *args, "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cli("keys", "create", "--project", OWN, "--scope", "admin")
    assert made.returncode == 0, made.stderr
    made = cli("keys", "create", "--project", OWN, "--scope", "operator")
    assert made.returncode == 0, made.stderr
    listed = cli("keys", "list").stdout
    assert sorted(line.split()[2] for line in listed.splitlines()[1:]) == ["admin", "operator"]
    wrong = cli("keys", "create", "--project", OWN, "--scope", "root")
    assert wrong.returncode != 0 and "operator" in wrong.stderr


# --- dead letters with a torn tail, and replays to sinks that do not exist -----------------------


class Picky:
    """A sink that refuses model 'bad' for good until told otherwise."""

    name = "picky"

    def __init__(self) -> None:
        self.accept_all = False
        self.got: list[str] = []

    async def write(self, events: Any) -> None:
        if not self.accept_all and any(e.model == "bad" for e in events):
            raise SinkError("model 'bad' is not allowed here", permanent=True)
        self.got.extend(e.event_id for e in events)

    @hookimpl
    def register_sinks(self, settings: Any, store: Any) -> Any:
        return self


def _dead_letter(server: Running, event_id: str) -> None:
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call(event_id, model="bad")]},
    )
    assert r.status_code == 202, r.text
    server.flush()


def test_a_torn_tail_is_skipped_reported_and_cut_off_by_the_next_append(
    server_factory: Any,
) -> None:
    sink = Picky()
    server: Running = server_factory(plugin_objects=(sink,))
    _dead_letter(server, "d1")
    path = server.settings.spool_path / "dead-letter" / "picky.jsonl"
    whole = path.read_bytes()
    # A crash in the middle of the second append: half a record, no newline.
    path.write_bytes(whole + whole[: len(whole) // 2])

    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers())
    assert listed.status_code == 200, listed.text
    assert listed.json()["torn_records"] == 1
    assert [d["events"] for d in listed.json()["dead_letters"]] == [1]

    _dead_letter(server, "d2")  # the writer appends: the torn half goes first
    assert parse_dead_letters(path.read_bytes()).torn_records == 0
    assert path.read_bytes().startswith(whole) and path.read_bytes().endswith(b"\n")
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert (listed["torn_records"], len(listed["dead_letters"])) == (0, 2)

    path.write_bytes(path.read_bytes() + b'{"at": "2026')  # torn again, then replayed
    sink.accept_all = True
    replay = server.client.post("/v1/admin/dead-letters/replay", headers=server.headers())
    assert replay.status_code == 200, replay.text
    assert replay.json()["replayed_events"] == 2 and replay.json()["torn_records"] == 1
    server.flush()
    assert sorted(sink.got) == ["d1", "d2"]


def test_replay_to_a_sink_that_does_not_exist_is_refused_and_keeps_everything(
    server_factory: Any,
) -> None:
    sink = Picky()
    server: Running = server_factory(plugin_objects=(sink,))
    _dead_letter(server, "d1")
    folder = server.settings.spool_path / "dead-letter"
    # A sink that was configured once and is not any more.
    append_dead_letter(folder / "gone.jsonl", _letter("gone", OWN))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    r = server.client.post(
        "/v1/admin/dead-letters/replay", params={"sink": "nope"}, headers=server.headers()
    )
    assert r.status_code == 400
    assert r.json()["field"] == "sink" and "'nope'" in r.json()["message"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    sink.accept_all = True
    r = server.client.post("/v1/admin/dead-letters/replay", headers=server.headers())
    assert r.status_code == 200, r.text
    assert r.json()["replayed_events"] == 1 and r.json()["unknown_sinks"] == ["gone"]
    assert (folder / "gone.jsonl").read_bytes() == before["gone.jsonl"]
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert [d["sink"] for d in listed["dead_letters"]] == ["gone"]


def test_parse_skips_torn_and_unreadable_lines() -> None:
    good = json.dumps(_letter("s", OWN).as_record()).encode()
    found = parse_dead_letters(good + b"\n" + b"{not json\n" + good + b"\n" + good[:10])
    assert (len(found.entries), found.torn_records) == (2, 2)
    assert parse_dead_letters(b"").torn_records == 0


def test_a_replay_the_spool_cannot_take_keeps_the_rest_for_the_next_one(
    server_factory: Any,
) -> None:
    sink = Picky()
    # A spool of 64 KiB in segments of 4 KiB: full after the first big entry, empty again
    # once the sinks have it (a segment is deleted when every sink is past it).
    server: Running = server_factory(
        plugin_objects=(sink,), spool_max_bytes=64 * 1024, spool_segment_bytes=4096
    )
    folder = server.settings.spool_path / "dead-letter"
    folder.mkdir(parents=True, exist_ok=True)
    big = "x" * 2000
    letters = [
        DeadLetter(
            "picky",
            "2026-01-02T03:04:05+00:00",
            "refused",
            [prompt_call(f"{name}-{i}", project_id=OWN, prompt=big) for i in range(20)],
        )
        for name in ("first", "second")
    ]
    for letter in letters:
        append_dead_letter(folder / "picky.jsonl", letter)
    sink.accept_all = True

    r = server.client.post("/v1/admin/dead-letters/replay", headers=server.headers())
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit()
    assert r.json()["error"] == "overloaded"
    assert "20 events were replayed first, 1 dead letter is kept" in r.json()["message"]
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert [(d["sink"], d["events"]) for d in listed["dead_letters"]] == [("picky", 20)]
    server.flush()
    assert sorted(sink.got) == sorted(f"first-{i}" for i in range(20))
    # flush() returns once the cursors have moved; the segments they passed are deleted just
    # after (a slow host's second replay came first, and found the spool still full).
    log = server.wl.writer.log
    deadline = time.monotonic() + 10
    while log.bytes > 16 * 1024:
        assert time.monotonic() < deadline, f"the spool still holds {log.bytes} bytes"
        time.sleep(0.05)

    r = server.client.post("/v1/admin/dead-letters/replay", headers=server.headers())
    assert r.status_code == 200, r.text
    assert r.json()["replayed_events"] == 20
    server.flush()
    assert sorted(sink.got) == sorted(f"{n}-{i}" for n in ("first", "second") for i in range(20))
    listed = server.client.get("/v1/admin/dead-letters", headers=server.headers()).json()
    assert listed["dead_letters"] == []
