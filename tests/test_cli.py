"""The `watchllm` command, run as a user runs it: a real process, real output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, prompt_call

WATCHLLM = [sys.executable, "-m", "watchllm_ext.cli"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATCHLLM, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


class Serve:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*WATCHLLM, "serve", "--data-dir", str(data_dir), "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("serve exited: " + "".join(self.output))
            self.output.append(line)
            if "Application startup complete" in line:
                return
        raise AssertionError("serve did not start: " + "".join(self.output))

    @property
    def key(self) -> str:
        found = re.search(r"Key: (\S+)", "".join(self.output))
        assert found, self.output
        return found.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert self.proc.stdout is not None
        self.output.append(self.proc.stdout.read())
        self.proc.stdout.close()
        return code


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(tmp_path / "data")
    yield serve
    if serve.proc.poll() is None:
        serve.stop()


def test_serve_first_start_prints_a_key_and_the_read_commands_work(
    served: Serve, tmp_path: Path
) -> None:
    data = str(tmp_path / "data")
    text = "".join(served.output)
    assert "created project 'default'" in text and served.url in text
    key = served.key
    # Only the hash is on disk.
    assert key.split("_", 2)[2].encode() not in (tmp_path / "data" / "keys.sqlite3").read_bytes()

    with httpx.Client(base_url=served.url) as client:
        r = client.post(
            "/v1/events/batch",
            headers={"Authorization": f"Bearer {key}"},
            json={"events": [prompt_call(f"c{i}", project_id="default") for i in range(7)]},
        )
        assert r.status_code == 202, r.text

    # The curl line it printed, pasted into a shell as it is: the event is dated now, so the
    # analytics' default window (the last 24 hours) shows it.
    pasted = text.split("Try it:\n", 1)[1].split("Then load", 1)[0]
    sent = subprocess.run(["bash", "-c", pasted], capture_output=True, text=True, check=False)
    assert sent.returncode == 0 and '"accepted":1' in sent.stdout, sent.stdout + sent.stderr
    # Not the README's event id: the README's curl pasted next is an event of its own.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    readme_id = re.search(r'"event_id":"([^"]+)"', readme)
    assert readme_id is not None and f'"event_id":"{readme_id[1]}"' not in pasted
    assert f"watchllm demo --url {served.url} --key {key}" in text

    remote = ["--url", served.url, "--key", key]
    # --wait: asks again until the writer's flush has stored them all (1 + 7).
    counted = cli("count-rows", *remote, "--wait", "8", "--timeout", "20")
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.strip().splitlines()[-1] == "8"
    # --run: one run's rows, whatever else the table holds (the seven share run-1).
    run = cli("count-rows", *remote, "--run", "run-1", "--wait", "7", "--timeout", "20")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["rows in events (project default, run run-1):", "7"]
    assert cli("count-rows", *remote, "--run", "nope").stdout.splitlines()[-1] == "0"
    long_run = httpx.get(
        f"{served.url}/v1/admin/count",
        params={"run": "r" * 257},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert long_run.status_code == 400 and long_run.json()["field"] == "run"
    stats = httpx.get(
        f"{served.url}/v1/analytics/stats",
        params={"project_id": "default"},
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    # The pasted event only: the seven above are dated 2026-01-02, outside the last 24 hours.
    assert stats["total_events"] == 1, stats
    short = cli("count-rows", *remote, "--wait", "9", "--timeout", "0.3")
    assert short.returncode == 1 and short.stdout.strip().splitlines()[-1] == "8"
    assert "not 9" in short.stderr and "flush_interval_s" in short.stderr
    # The first key is an admin of project default: another project is refused (docs/API.md).
    other = cli("count-rows", *remote, "--project", "nope")
    assert other.returncode == 1 and "'nope'" in other.stderr and "operator" in other.stderr
    # Quotas are off on this server: the usage commands say so, as their local form does.
    usage = cli("usage", "show", "--project", "default", *remote)
    assert usage.returncode == 1 and "quotas off (quota_backend = off)" in usage.stderr
    lost = httpx.get(f"{served.url}/v1/nope", headers={"Authorization": f"Bearer {key}"})
    assert lost.status_code == 404 and "no route GET /v1/nope" in lost.json()["message"]
    tables = cli("check-tables", *remote).stdout.split()
    assert {"events", "tool_calls", "agent_steps", "spans", "traces"} <= set(tables)
    verified = cli("verify-clickhouse", *remote)
    assert re.fullmatch(r"Successfully connected to ClickHouse! Version: [\d.]+\n", verified.stdout)

    # The folder is busy: a clear line naming the process, not a traceback.
    busy = cli("count-rows", "--data-dir", data)
    assert busy.returncode == 1
    assert f"in use by process {served.proc.pid}" in busy.stderr and "--url" in busy.stderr
    assert "Traceback" not in busy.stderr
    second = cli("serve", "--data-dir", data, "--port", str(free_port()))
    assert second.returncode == 1 and "in use by process" in second.stderr
    # A second server needs a folder of its own: --url is the way for the other commands.
    assert "another --data-dir" in second.stderr and "--url" not in second.stderr
    # The port is taken: one line before anything is made, so no key is printed that would
    # point at the other server.
    taken = cli("serve", "--data-dir", str(tmp_path / "other"), "--port", str(served.port))
    assert taken.returncode == 1, taken.stdout + taken.stderr
    assert f"cannot listen on 127.0.0.1:{served.port}" in taken.stderr
    assert "another server listens there" in taken.stderr and "--port" in taken.stderr
    assert "Key:" not in taken.stdout and not (tmp_path / "other").exists()

    # SIGTERM flushes; the data is there for the local commands afterwards.
    # (uvicorn re-raises the signal after a graceful shutdown, as process managers expect.)
    assert served.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in "".join(served.output)
    local = cli("count-rows", "--data-dir", data, "--project", "default")
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip().splitlines()[-1] == "8"
    local_run = cli("count-rows", "--data-dir", data, "--table", "events", "--run", "run-1")
    assert local_run.returncode == 0 and local_run.stdout.splitlines()[-1] == "7"
    # Nothing writes to a folder that no server holds: waiting there is a usage error.
    waiting = cli("count-rows", "--data-dir", data, "--wait", "9")
    assert waiting.returncode == 2 and "--wait needs --url" in waiting.stderr
    assert (
        "Successfully connected to ClickHouse! Version:"
        in cli("verify-clickhouse", "--data-dir", data).stdout
    )


def test_migrate_applies_once(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    first = cli("migrate", "--data-dir", data)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    second = cli("migrate", "--data-dir", data)
    assert second.stdout.strip() == "schema is up to date"


def test_bad_setting_fails_at_start_naming_it(tmp_path: Path) -> None:
    bad = cli("serve", "--data-dir", str(tmp_path), env={"WATCHLLM_FLUSH_INTERVAL_S": "soon"})
    assert bad.returncode == 2
    assert "WATCHLLM_FLUSH_INTERVAL_S" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("serve", "--data-dir", str(tmp_path), env={"WATCHLLM_MAX_BATCH_EVENTS": "0"})
    assert bad.returncode == 2 and "max_batch_events" in bad.stderr


def test_version() -> None:
    from watchllm_ext import __version__

    shown = cli("--version")
    assert shown.returncode == 0 and shown.stdout == f"watchllm {__version__}\n"


def test_keys_commands(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    made = cli("keys", "create", "--project", "p1", "--scope", "read", "--data-dir", data)
    assert made.returncode == 0
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("wllm_")
    # It says which key file it wrote, and that a new one is known to no server yet.
    keys_file = (tmp_path / "d" / "keys.sqlite3").resolve()
    assert made.stdout.startswith(f"Created a read key for project p1 in {keys_file}.")
    assert f"note: {keys_file} is a new key file" in made.stderr and "--data-dir" in made.stderr
    admin = cli("keys", "create", "--project", "p1", "--scope", "admin", "--data-dir", data)
    assert admin.stdout.startswith("Created an admin key for project p1 in "), admin.stdout
    assert admin.stderr == ""  # the file existed
    ingest = cli("keys", "create", "--project", "p1", "--data-dir", data)
    assert ingest.stdout.startswith("Created an ingest key"), ingest.stdout
    listed = cli("keys", "list", "--data-dir", data).stdout
    assert "p1" in listed and "read" in listed and key not in listed
    bad = cli("keys", "create", "--project", "p 1", "--data-dir", data)
    assert bad.returncode == 1 and "project" in bad.stderr


def test_a_read_in_a_folder_without_a_store_makes_none(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-data-dir"
    for command in ("verify-clickhouse", "check-tables", "count-rows"):
        answer = cli(command, "--data-dir", str(empty))
        assert answer.returncode == 1, answer
        assert f"no embedded store in {empty}" in answer.stderr
        assert "watchllm serve" in answer.stderr and "Traceback" not in answer.stderr
    assert not empty.exists()


def test_remote_errors_are_one_line(tmp_path: Path) -> None:
    port = free_port()
    for command in (["count-rows"], ["golden-path"], ["demo", "--events", "10"]):
        down = cli(*command, "--url", f"http://127.0.0.1:{port}", "--key", "k")
        assert down.returncode == 1 and "Traceback" not in down.stderr, down
        (line,) = down.stderr.splitlines()
        assert f"cannot reach http://127.0.0.1:{port}" in line, line
        assert line.endswith(
            "(is `watchllm serve` running there? --url or WATCHLLM_BASE_URL names another)"
        ), line
    # A URL without its scheme (httpx's own words were about a "protocol"): argparse's usage
    # error, naming what to write.
    for command in (["count-rows"], ["golden-path"], ["demo"], ["dead-letter", "list"]):
        bare = cli(*command, "--url", f"127.0.0.1:{port}", "--key", "k")
        assert bare.returncode == 2, bare
        assert f"--url: '127.0.0.1:{port}': must start with http:// or https://" in bare.stderr
    from_env = cli("demo", "--key", "k", env={"WATCHLLM_BASE_URL": "localhost:8787"})
    assert from_env.returncode == 2
    assert "WATCHLLM_BASE_URL 'localhost:8787': must start with http://" in from_env.stderr
    nokey = cli("check-tables", "--url", "http://127.0.0.1:1")
    assert nokey.returncode == 1 and "--key" in nokey.stderr


def test_a_clickhouse_server_that_is_down_is_one_line(tmp_path: Path) -> None:
    # clickhouse-connect's own "Unexpected Http Driver Exception" warning does not repeat it,
    # for every command that talks to the server (docs/DEPLOY.md: errors are one line).
    port = free_port()
    url = f"http://default:@127.0.0.1:{port}/watchllm"
    keys_there = {"WATCHLLM_KEY_STORE": "clickhouse"}
    for command, more_env in (
        (["verify-clickhouse"], {}),
        (["check-tables"], {}),
        (["count-rows"], {}),
        (["migrate"], {}),
        (["keys", "copy-to-server"], {}),
        (["keys", "create", "--project", "p"], keys_there),
        (["keys", "list"], keys_there),
        (["keys", "revoke", "k1"], keys_there),
    ):
        down = cli(
            *command,
            "--data-dir",
            str(tmp_path / "data"),
            env={"WATCHLLM_CLICKHOUSE_URL": url, **more_env},
        )
        assert down.returncode == 1, down
        assert down.stderr.splitlines() == [
            f"error: cannot reach ClickHouse at 127.0.0.1:{port}: connection refused"
        ], (command, down.stderr)


PASSWORD = "hu" + "nter2"  # its two halves are looked for apart: neither may be shown
# ClickHouse URLs a user may get wrong, none of which may print its password.
BAD_URLS = {
    # The scheme forgotten: it reads as the scheme `watchllm`, with no // before the password.
    "no scheme": f"watchllm:{PASSWORD}@127.0.0.1:1/watchllm",
    "another scheme": f"clickhouse://watchllm:{PASSWORD}@127.0.0.1:1/watchllm",
    "password as an option": f"http://watchllm@127.0.0.1:1/watchllm?password={PASSWORD}",
    # An unescaped / ends the host part early: the port is then read from the password.
    "a / in the password": "http://watchllm:hu/nter2@127.0.0.1:1/watchllm",
    "an @ in the password": "http://watchllm:hu@nter2@127.0.0.1:1/watchllm?compress=snappy",
}


def assert_one_line_without_the_password(done: subprocess.CompletedProcess[str]) -> str:
    shown = done.stdout + done.stderr
    assert "hu" + "nter" not in shown and "nter2" not in shown and "hu/" not in shown, shown
    assert "Traceback" not in shown and len(done.stderr.splitlines()) == 1, shown
    assert done.returncode == 2, shown  # a bad setting, as argparse's own errors
    return done.stderr


@pytest.mark.parametrize("url", BAD_URLS.values(), ids=BAD_URLS.keys())
def test_a_bad_clickhouse_url_is_refused_without_its_password(tmp_path: Path, url: str) -> None:
    done = cli("migrate", "--data-dir", str(tmp_path), env={"WATCHLLM_CLICKHOUSE_URL": url})
    line = assert_one_line_without_the_password(done)
    assert line.startswith("error: invalid setting clickhouse_url (env WATCHLLM_CLICKHOUSE_URL):")
    assert "watchllm:***@" in line or "password=***" in line, line


def test_every_command_names_where_a_bad_clickhouse_url_came_from(tmp_path: Path) -> None:
    url = BAD_URLS["no scheme"]
    env = {"WATCHLLM_CLICKHOUSE_URL": url}
    data = ["--data-dir", str(tmp_path / "data")]
    for command, more_env in (
        (["serve", *data, "--port", str(free_port())], {}),
        (["verify-clickhouse", *data], {}),
        (["count-rows", *data], {}),
        (["keys", "create", "--project", "p", *data], {"WATCHLLM_KEY_STORE": "clickhouse"}),
        (["keys", "copy-to-server", *data], {}),
        (["import", str(tmp_path / "export")], {}),
    ):
        line = assert_one_line_without_the_password(cli(*command, env={**env, **more_env}))
        assert "(env WATCHLLM_CLICKHOUSE_URL): it has no http:// or https:// in front" in line
    toml = tmp_path / "watchllm.toml"
    toml.write_text(f'clickhouse_url = "{url}"\n')
    line = assert_one_line_without_the_password(
        cli("migrate", *data, env={"WATCHLLM_CONFIG": str(toml)})
    )
    assert f"(file {toml}, key clickhouse_url)" in line
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_import_checks_its_url_before_the_export(tmp_path: Path) -> None:
    # The export is read (every file's checksum: minutes for a big one) only after the URL
    # passed; the error names --url, not the variable that was not used.
    for url in BAD_URLS.values():
        line = assert_one_line_without_the_password(
            cli("import", str(tmp_path / "not-an-export"), "--url", url)
        )
        assert line.startswith("error: invalid setting clickhouse_url (option --url):"), line


# Two `watchllm serve` processes, each with its own data folder, in front of one ClickHouse
# server with the keys on it (docs/DEPLOY.md): the first start creates the first key there,
# the second finds it, and both accept it.
@pytest.mark.stores("clickhouse", "server")
def test_two_serve_processes_on_one_server_share_keys_and_data(
    store_backend: Any, tmp_path: Path
) -> None:
    env = {"WATCHLLM_CLICKHOUSE_URL": store_backend.url(), "WATCHLLM_KEY_STORE": "clickhouse"}
    first = Serve(tmp_path / "one", env)
    second = Serve(tmp_path / "two", env)
    try:
        key = first.key
        assert "created project" not in "".join(second.output)  # the server has a key now
        for i, serve in enumerate((first, second)):
            r = httpx.post(
                f"{serve.url}/v1/events/batch",
                headers={"Authorization": f"Bearer {key}"},
                json={"events": [prompt_call(f"s{i}-{n}", project_id="default") for n in range(5)]},
                timeout=30,
            )
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + 20
        while True:
            counted = cli("count-rows", "--url", second.url, "--key", key)
            if counted.stdout.strip().splitlines()[-1:] == ["10"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counted.stdout.strip().splitlines()[-1] == "10", counted.stdout + counted.stderr
    finally:
        for serve in (first, second):
            if serve.proc.poll() is None:
                serve.stop()
