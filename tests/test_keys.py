"""API keys: hashed at rest, scoped, created and revoked while the server runs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, prompt_call

from watchllm_ext.keys import KeyStore, KeyStoreError, split_key


def _post(server: Running, key: str, project: str = "acme") -> int:
    return server.client.post(
        f"/v1/projects/{project}/events", json=prompt_call(), headers=server.headers(key)
    ).status_code


def _wait_for(server: Running, key: str, status: int, timeout_s: float = 2.0) -> float:
    start = time.monotonic()
    while True:
        if _post(server, key) == status:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"key did not reach status {status} within {timeout_s}s")
        time.sleep(0.05)


def test_only_a_hash_is_stored(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.sqlite3")
    key = keys.create("p1", scope="ingest")
    key_id, secret = split_key(key) or ("", "")
    assert key.startswith("wllm_") and len(secret) >= 40
    raw = (tmp_path / "keys.sqlite3").read_bytes()
    assert secret.encode() not in raw
    with sqlite3.connect(tmp_path / "keys.sqlite3") as conn:
        stored = conn.execute("SELECT secret_hash FROM api_keys").fetchone()[0]
    assert stored != secret and len(stored) == 64
    principal = keys.authenticate(key)
    assert principal is not None and principal.project_id == "p1"
    assert keys.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.authenticate(f"wllm_{key_id}_wrong") is None
    keys.close()


def test_a_key_sent_again_is_known_until_it_is_revoked(tmp_path: Path) -> None:
    # The server remembers whole keys that matched (no SHA-256 a request): only those, and
    # never past a change of the key file.
    keys = KeyStore(tmp_path / "keys.sqlite3", refresh_s=0.0)
    key, other = keys.create("p1", scope="ingest"), keys.create("p1", scope="admin")
    key_id, secret = split_key(key) or ("", "")
    first = keys.authenticate(key)
    assert first is not None and keys.authenticate(key) is first
    assert keys.authenticate(f"wllm_{key_id}_{secret[:-1]}") is None  # its id, not its secret
    assert keys.authenticate(f"wllm_{key_id}_{secret}x") is None
    assert keys.authenticate(other) is not None
    KeyStore(tmp_path / "keys.sqlite3").revoke(key_id)  # another connection, as the CLI
    assert keys.authenticate(key) is None
    assert keys.authenticate(other) is not None  # the others still work
    keys.close()


def test_bad_project_and_scope_are_refused(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.sqlite3")
    with pytest.raises(KeyStoreError, match="scope"):
        keys.create("p1", scope="owner")
    with pytest.raises(KeyStoreError, match="project"):
        keys.create("bad project!", scope="ingest")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_created_and_revoked_by_the_cli_while_the_server_runs(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory(key_refresh_s=1.0)
    created = _cli(tmp_path, "keys", "create", "--project", "acme", "--scope", "ingest")
    assert created.returncode == 0, created.stderr
    new_key = created.stdout.strip().splitlines()[-1]  # the key is the last line
    assert split_key(new_key) is not None
    assert _wait_for(server, new_key, 202) < 2.0

    listed = _cli(tmp_path, "keys", "list")
    key_id = split_key(new_key)[0]  # type: ignore[index]
    assert key_id in listed.stdout and new_key not in listed.stdout

    revoked = _cli(tmp_path, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert _wait_for(server, new_key, 401) < 2.0
    again = _cli(tmp_path, "keys", "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr


def test_scopes(server: Running) -> None:
    read_key = server.keys.create("acme", scope="read")
    ingest_key = server.keys.create("acme", scope="ingest")
    other = server.keys.create("other", scope="admin")
    time.sleep(0.3)
    r = server.client.post(
        "/v1/events/batch", json={"events": [prompt_call()]}, headers=server.headers(read_key)
    )
    assert r.status_code == 403 and "ingest" in r.json()["message"]
    assert _post(server, ingest_key) == 202
    # An ingest key is no admin.
    assert (
        server.client.get("/v1/admin/tables", headers=server.headers(ingest_key)).status_code == 403
    )
    # A key of project "other" cannot write to acme, in the path or in the body.
    assert _post(server, other, project="acme") == 403
    r = server.client.post(
        "/v1/events/batch",
        json={"events": [prompt_call(project_id="acme")]},
        headers=server.headers(other),
    )
    assert r.status_code == 403 and "acme" in r.json()["message"]


# Several processes, each with its own data folder (spool), in front of one ClickHouse server.
@pytest.mark.stores("clickhouse", "server")
def test_processes_with_their_own_data_dir_share_one_key_file(
    server_factory: Any, tmp_path: Path
) -> None:
    shared = tmp_path / "shared" / "keys.sqlite3"
    first = server_factory(data_dir=tmp_path / "one", keys_file=shared)
    second = server_factory(data_dir=tmp_path / "two", keys_file=shared)
    assert first.wl.settings.spool_path != second.wl.settings.spool_path
    key = KeyStore(shared).create("acme", scope="ingest")
    for server in (first, second):
        _wait_for(server, key, 202)
    KeyStore(shared).revoke(key)
    for server in (first, second):
        _wait_for(server, key, 401)


# key_store = clickhouse: the keys live on the server, for every process in front of it.
@pytest.mark.stores("clickhouse", "server")
def test_keys_on_the_server_reach_every_process(
    server_factory: Any, store_backend: Any, tmp_path: Path
) -> None:
    on_server = {"clickhouse_url": store_backend.url(), "key_store": "clickhouse"}
    first = server_factory(data_dir=tmp_path / "one", **on_server)
    second = server_factory(data_dir=tmp_path / "two", **on_server)
    env = {
        **os.environ,
        "WATCHLLM_CLICKHOUSE_URL": on_server["clickhouse_url"],
        "WATCHLLM_KEY_STORE": "clickhouse",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watchllm_ext.cli", "keys", *args,
             "--data-dir", str(tmp_path / "cli")],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip

    created = cli("create", "--project", "acme", "--scope", "ingest", "--name", "shared")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert not (tmp_path / "cli" / "keys.sqlite3").exists()  # not in a local file
    for server in (first, second):
        _wait_for(server, key, 202)
        # Each process authenticates from its own copy, which holds only the hash.
        copy = server.settings.key_copy_path.read_bytes()
        assert (split_key(key) or ("", ""))[1].encode() not in copy
    listed = cli("list", "--project", "acme")
    assert "shared" in listed.stdout and "ingest" in listed.stdout
    revoked = cli("revoke", key)
    assert revoked.returncode == 0, revoked.stderr
    for server in (first, second):
        _wait_for(server, key, 401)
    assert cli("revoke", key).returncode != 0  # already revoked: one clear line
    assert "no active key" in cli("revoke", key).stderr


def test_keys_keep_working_from_the_copy_while_the_server_is_down(tmp_path: Path) -> None:
    from chfixture import start_fixture

    from watchllm_ext.builtins.key_auth import KeyAuth
    from watchllm_ext.keys import ServerKeyStore
    from watchllm_ext.settings import Settings
    from watchllm_ext.store import apply_migrations
    from watchllm_plugins.clickhouse_store import ClickHouseStore

    fixture = start_fixture(tmp_path / "fixture")
    try:
        url = fixture.url + "default?connect_timeout=1&send_receive_timeout=2"
        store = ClickHouseStore(url)
        apply_migrations(store)
        key = ServerKeyStore(store).create("acme", scope="read")
        settings = Settings(data_dir=tmp_path / "data", clickhouse_url=url, key_store="clickhouse")
        auth = KeyAuth(KeyStore(settings.key_copy_path, refresh_s=0.01))
        task = auth.register_background_tasks(settings=settings, store=store)
        assert task is not None
        assert auth.authenticate(key, None) is not None  # synced before the first request
    finally:
        fixture.stop()
    auth._sync(ServerKeyStore(store))  # the server is gone: the copy stays
    time.sleep(0.05)
    principal = auth.authenticate(key, None)
    assert principal is not None and principal.project_id == "acme"
    store.close()


@pytest.mark.stores("clickhouse", "server")
def test_keys_of_a_key_file_copied_to_the_server(
    server_factory: Any, store_backend: Any, tmp_path: Path
) -> None:
    local = KeyStore(tmp_path / "old" / "keys.sqlite3")
    kept = local.create("acme", scope="ingest", name="kept")
    gone = local.create("acme", scope="ingest", name="gone")
    local.revoke(gone)
    env = {**os.environ, "WATCHLLM_CLICKHOUSE_URL": store_backend.url()}
    command = [sys.executable, "-m", "watchllm_ext.cli", "keys", "copy-to-server",
               "--data-dir", str(tmp_path / "old")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "copied 2 of 2 keys" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert "copied 0 of 2 keys" in again.stdout  # known keys are left as they are
    server = server_factory(
        data_dir=tmp_path / "new", clickhouse_url=store_backend.url(), key_store="clickhouse"
    )
    _wait_for(server, kept, 202)
    assert _post(server, gone) == 401


def test_keys_made_before_the_operator_scope_keep_their_meaning(tmp_path: Path) -> None:
    # A key file written before scopes were split: rows as the earlier CLI wrote them.
    path = tmp_path / "keys.sqlite3"
    keys = KeyStore(path, refresh_s=0)
    admin = keys.create("acme", scope="admin")  # the same rows, the same "admin" text
    operator = keys.create("ops", scope="operator")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE api_keys SET scope = 'superuser' WHERE project_id = 'ops'")
    old = keys.authenticate(admin)
    assert old is not None and old.scopes == frozenset({"admin"})
    assert old.can("ingest") and old.can("read") and old.can("admin")
    assert old.administers("acme") and not old.administers("beta")
    assert not old.can("operator") and not old.administers(None)
    # A scope this version does not know (a hand-edited file) grants nothing at all.
    unknown = keys.authenticate(operator)
    assert unknown is not None and not any(
        unknown.can(s) for s in ("ingest", "read", "admin", "operator")
    )
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE api_keys SET scope = 'operator' WHERE project_id = 'ops'")
    made = keys.authenticate(operator)
    assert made is not None and made.administers("acme") and made.administers(None)
    with pytest.raises(KeyStoreError, match="operator"):
        keys.create("acme", scope="root")


def test_a_key_made_beside_a_running_server_works_at_once(tmp_path: Path) -> None:
    """The server re-reads the key file at most once a second for keys it knows; a key it does
    not know yet makes it look now (docs paste `keys create` and use the key right away)."""
    server_side = KeyStore(tmp_path / "keys.sqlite3", refresh_s=3600)
    first = server_side.create("acme", scope="read")
    assert server_side.authenticate(first) is not None  # the cache is loaded and fresh
    made_now = KeyStore(tmp_path / "keys.sqlite3").create("beta", scope="admin")  # the CLI
    principal = server_side.authenticate(made_now)
    assert principal is not None and principal.project_id == "beta"
    # An unknown id still answers None, and a wrong secret of a known id too.
    assert server_side.authenticate("wllm_000000000000_" + "x" * 43) is None
    assert server_side.authenticate(made_now[:-2] + "zz") is None


class _KnowsNoKey:
    """An authenticate plugin of a host's own (it knows no key either)."""

    from watchllm_ext.hookspecs import hookimpl

    @hookimpl
    def authenticate(self, token: str, request: Any) -> None:
        return None


def test_a_key_of_another_data_folder_gets_a_401_that_says_keys_belong_to_one(
    server_factory: Any, tmp_path: Path
) -> None:
    """A key made with another --data-dir (or WATCHLLM_DATA_DIR) is a first run's most common
    401: the answer says where keys live. With a plugin of one's own that authenticates too,
    the hint could be wrong: the plain words."""
    elsewhere = KeyStore(tmp_path / "other-folder" / "keys.sqlite3").create("acme", "admin")
    server = server_factory()
    r = server.client.post(
        "/v1/projects/acme/events", json=prompt_call(), headers=server.headers(elsewhere)
    )
    assert r.status_code == 401
    assert r.json() == {
        "error": "unauthorized",
        "message": "the API key is not valid (unknown or revoked); a key made with `watchllm"
        " keys create` is known to the servers on the data folder it was made in",
        "field": "Authorization",
    }
    server.thread.__exit__()  # one chDB data folder a process: the next server takes it
    hosted = server_factory((_KnowsNoKey(),))
    r = hosted.client.get("/v1/analytics/stats", headers=hosted.headers(elsewhere))
    assert r.status_code == 401
    assert r.json()["message"] == "the API key is not valid (unknown or revoked)"
