"""The examples run as documented: the command lines of each docstring are run as they are
written, in a shell, from the repository's root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
from chfixture import start_fixture
from conftest import Running, free_port, prompt_call

from watchllm_ext import Settings, create_app
from watchllm_plugins.clickhouse_store import ClickHouseStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def documented(name: str) -> list[str]:
    """The command lines of an example's docstring as written in the file (its indented
    lines; a line ending in a backslash or inside an open quote goes on)."""
    doc = (EXAMPLES / name).read_text().split('"""')[1]
    commands: list[str] = []
    pending = ""
    for line in doc.splitlines():
        if not pending and not line.startswith("    "):
            continue
        pending += ("\n" if pending else "") + line.strip()
        if not pending.endswith("\\") and pending.count("'") % 2 == 0:
            commands.append(pending)
            pending = ""
    return commands


def shell(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A documented line in bash, `python` being this interpreter."""
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=_env(env),
    )


def _env(more: dict[str, str]) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], **more}


def test_send_events_as_documented(server: Running) -> None:
    serve, send = documented("send_events.py")
    assert serve.startswith("watchllm serve") and send.startswith("python examples/send_events")
    # The key the first serve printed, and the server where WATCHLLM_BASE_URL points.
    done = shell(send, KEY=server.key, WATCHLLM_BASE_URL=server.url)
    assert done.returncode == 0, done.stderr
    assert "HTTP 202: accepted 8 events" in done.stdout
    # The key from the environment instead of --key, the URL from --url.
    done = shell(
        f"python examples/send_events.py --url {server.url}",
        WATCHLLM_API_KEY=server.key,
        WATCHLLM_BASE_URL="http://127.0.0.1:1",
    )
    assert done.returncode == 0, done.stderr
    server.flush()
    types = server.query("SELECT DISTINCT event_type FROM events ORDER BY event_type")
    assert len(types) == 8
    # Dated now: the analytics' default window (the last 24 hours) shows all sixteen.
    stats = server.client.get(
        "/v1/analytics/stats", params={"project_id": "acme"}, headers=server.headers()
    )
    assert stats.json()["total_events"] == 16, stats.text


def test_examples_fail_in_one_line_when_the_server_is_not_there() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    for example in ("send_events.py", "golden_path.py"):
        done = shell(f"python examples/{example} --url {down} --key wllm_x")
        assert done.returncode == 1, (example, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert "cannot reach" in done.stderr and down in done.stderr
    nokey = shell("python examples/send_events.py", WATCHLLM_API_KEY="")
    assert nokey.returncode == 2 and "WATCHLLM_API_KEY" in nokey.stderr


def test_refused_key_is_one_line(server: Running) -> None:
    done = shell(f"python examples/send_events.py --url {server.url} --key wllm_nope_nope")
    assert done.returncode == 1 and "401" in done.stderr and "Traceback" not in done.stderr


def test_golden_path_from_the_environment(server: Running) -> None:
    first = documented("golden_path.py")[0]
    done = shell(first.replace("http://127.0.0.1:8787", server.url), KEY=server.key)
    assert done.returncode == 0, done.stderr
    assert "Success: Event logged, processed, and visible in API." in done.stdout
    done = shell(
        "python examples/golden_path.py", WATCHLLM_BASE_URL=server.url, WATCHLLM_API_KEY=server.key
    )
    assert done.returncode == 0 and "Success" in done.stdout, done.stderr


class App:
    """examples/fastapi_app.py started by its documented line (on a free port)."""

    def __init__(self, command: str, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + command.replace("8000", str(self.port))],
            cwd=ROOT,
            env=_env({"WATCHLLM_DATA_DIR": str(data_dir)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.key = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # what it prints before uvicorn starts
            if line.startswith("KEY="):
                self.key = line.strip().split("=", 1)[1]
            if line.startswith("listening on"):
                break
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.stop()
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.2)

    def run(self, documented_line: str, **env: str) -> subprocess.CompletedProcess[str]:
        return shell(documented_line.replace("8000", str(self.port)), **env)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            self.proc.wait(timeout=60)
        assert self.proc.stdout is not None
        output = self.proc.stdout.read()
        self.proc.stdout.close()
        return output


def test_fastapi_app_as_documented(tmp_path: Path) -> None:
    """The LLM app example: the README's one install makes it runnable; its documented lines
    answer; a user over the daily budget is refused before the LLM is called."""
    install, start, chat, stream, logs = documented("fastapi_app.py")
    assert install == "pip install -e '.[server]'"
    assert "pip install -e '.[server]'" in (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("fastapi") for d in extras["optional-dependencies"]["server"])
    data = tmp_path / "app"
    app = App(start, data)
    alice_ok = 0
    try:
        assert app.key.startswith("wllm_") and (data / "keys.sqlite3").exists()
        done = app.run(chat)
        answer = json.loads(done.stdout)
        assert "WatchLLM saw this call" in answer["answer"] and len(answer["run_id"]) == 32
        alice_ok += 1
        done = app.run(stream)
        assert done.stdout.startswith('data: "WatchLLM "') and done.stdout.count("data: ") > 10
        alice_ok += 1  # the stream's call is hers too
        # alice (X-User-Id) calls until her $0.01 a day is spent: then 429, before the LLM.
        with httpx.Client(base_url=app.url, timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                r = client.post("/chat", json={"message": "hi"}, headers={"X-User-Id": "alice"})
                if r.status_code != 200:
                    break
                alice_ok += 1
                assert time.monotonic() < deadline, "alice was never refused"
                time.sleep(0.2)
            assert r.status_code == 429 and r.json()["field"] == "X-User-Id", r.text
            assert int(r.headers["Retry-After"]) > 0 and "daily budget" in r.json()["message"]
            bob = client.post("/chat", json={"message": "hi"}, headers={"X-User-Id": "bob"})
            assert bob.status_code == 200
            time.sleep(1.5)  # the writer's flush interval: then the logs show the calls
        done = app.run(logs, KEY=app.key)
        assert '"event_type":"prompt_call"' in done.stdout, done.stdout + done.stderr
    finally:
        app.stop()
    # One stored LLM call per answered chat of alice's: the refused ones never reached it.
    store = create_app(Settings(data_dir=data)).state.watchllm.open_store()
    try:
        rows = store.query(
            "SELECT count() AS n FROM events FINAL"
            " WHERE user_id = 'alice' AND event_type = 'prompt_call'"
        )
    finally:
        store.close()
    assert rows == [{"n": alice_ok}]
    # A second start in the same folder keeps the key and prints none.
    again = App(start, data)
    assert again.key == ""
    again.stop()


def test_move_to_server(server: Running, tmp_path: Path) -> None:
    events = [prompt_call(f"m{i}", run_id=f"run-{i % 3}") for i in range(25)]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 202, r.text
    server.flush()
    server.stop()
    with start_fixture(tmp_path / "ch", "watchllm", "secret") as fx:
        url = fx.url + "default"
        done = subprocess.run(
            [
                sys.executable,
                str(EXAMPLES / "move_to_server.py"),
                "--url",
                url,
                "--data-dir",
                str(server.settings.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "the counts match the export" in done.stdout and "moved:" in done.stdout
        assert "secret" not in done.stdout + done.stderr
        store = ClickHouseStore(url)
        try:
            counted = store.query("SELECT count() AS n FROM events FINAL WHERE project_id = 'acme'")
            assert counted == [{"n": 25}]
        finally:
            store.close()


def test_the_server_examples_on_a_busy_port_say_so_before_making_a_key(tmp_path: Path) -> None:
    """A port another server holds: one line naming it, and no key made and printed for a
    server that then could not start (the next run would print none)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for example in ("fastapi_app.py", "otel_in_process.py"):
            data = tmp_path / example
            done = subprocess.run(
                [sys.executable, str(EXAMPLES / example), "--port", str(port), "--data-dir",
                 str(data)],
                capture_output=True, text=True, timeout=120, check=False, env=_env({}),
            )  # fmt: skip
            assert done.returncode == 1, done
            assert done.stderr.splitlines() == [
                f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another"
                " server listens there: stop it, or pick another port with --port"
            ], done.stderr
            assert "KEY=" not in done.stdout and not data.exists(), done.stdout


def test_move_to_server_leaves_no_temporary_folder_when_the_export_fails(
    server: Running, tmp_path: Path
) -> None:
    """The running server holds its data folder, so the export fails (as documented): the
    temporary folder the export was to go to is removed, not left empty behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "move_to_server.py"), "--url",
         "http://default:@127.0.0.1:1/default", "--data-dir", str(server.settings.data_dir)],
        capture_output=True, text=True, timeout=120, check=False, env=_env({"TMPDIR": str(temp)}),
    )  # fmt: skip
    assert done.returncode == 1, done
    assert list(temp.iterdir()) == []
