"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Running

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
