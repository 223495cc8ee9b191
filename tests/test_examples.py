"""The examples run as documented: the command lines of each docstring are run as they are
written, in a shell, from the repository's root."""

from __future__ import annotations

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


def test_fastapi_host_self_test() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "fastapi_host.py"), "--self-test"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ingest: 202" in done.stdout and "'event_id': 'host-1'" in done.stdout


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


class Host:
    """examples/fastapi_host.py started by its documented line."""

    def __init__(self, command: str, port: int, data_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + command],
            cwd=ROOT,
            env=_env({"WATCHLLM_PORT": str(port), "WATCHLLM_DATA_DIR": str(data_dir)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.key = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # what it prints before uvicorn starts
            if line.startswith("KEY="):
                self.key = line.strip().split("=", 1)[1]
            if "mounted at" in line:
                break
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.stop()
            assert time.monotonic() < deadline, "the host did not start"
            time.sleep(0.2)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            self.proc.wait(timeout=60)
        assert self.proc.stdout is not None
        output = self.proc.stdout.read()
        self.proc.stdout.close()
        return output


def test_fastapi_host_as_documented(tmp_path: Path) -> None:
    install, start, send = documented("fastapi_host.py")
    assert install.startswith("pip install -e '.[examples]'")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("fastapi") for d in extras["optional-dependencies"]["examples"])
    port = free_port()
    host = Host(start, port, tmp_path / "host")
    try:
        # One folder: the key it printed is in the app's own key file.
        assert (tmp_path / "host" / "keys.sqlite3").exists()
        key = host.key
        assert key.startswith("wllm_")
        with httpx.Client(base_url=host.url + "/watchllm", timeout=10) as client:
            sent = shell(send, WATCHLLM_PORT=str(port), KEY=key)
            assert '"accepted":1' in sent.stdout, sent.stdout + sent.stderr
            deadline = time.monotonic() + 10
            while True:  # within flush_interval_s (1 s) of the 202
                stats = client.get(
                    "/v1/analytics/stats",
                    params={"project_id": "default"},
                    headers={"Authorization": f"Bearer {key}"},
                ).json()
                if stats["total_events"] == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert stats["total_events"] == 1, stats
    finally:
        output = host.stop()
    assert "host: starting" in output and "host: stopping" in output
    # A second start in the same folder keeps the key and prints none.
    again = Host(start, free_port(), tmp_path / "host")
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
