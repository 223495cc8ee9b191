"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chfixture import start_fixture
from conftest import Running, prompt_call

from watchllm_plugins.clickhouse_store import ClickHouseStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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


def test_send_events(server: Running) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "send_events.py"),
            "--url",
            server.url,
            "--key",
            server.key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP 202: accepted 8 events" in done.stdout
    server.flush()
    types = server.query("SELECT DISTINCT event_type FROM events ORDER BY event_type")
    assert len(types) == 8


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
