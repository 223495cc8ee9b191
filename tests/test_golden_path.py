"""`watchllm golden-path`: the whole path from an HTTP client to the analytics API."""

from __future__ import annotations

import subprocess
import sys

from conftest import Running, free_port

from watchllm_ext.golden_path import SUCCESS

CLI = [sys.executable, "-m", "watchllm_ext.cli", "golden-path"]


def test_golden_path_against_a_running_server(server: Running) -> None:
    done = subprocess.run(
        [*CLI, "--url", server.url, "--key", server.key],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == SUCCESS


def test_golden_path_on_its_own_scratch_server() -> None:
    done = subprocess.run(CLI, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert SUCCESS in done.stdout


def test_golden_path_names_the_failing_step(server: Running) -> None:
    down = subprocess.run(
        [*CLI, "--url", f"http://127.0.0.1:{free_port()}", "--key", "k"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 1 and "step 'health'" in down.stderr
    ingest_only = server.keys.create("acme", scope="ingest")
    import time

    time.sleep(1.1)
    no_read = subprocess.run(
        [*CLI, "--url", server.url, "--key", ingest_only],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Refused before anything is sent: a key that cannot read leaves no stray event.
    assert no_read.returncode == 1 and "step 'key'" in no_read.stderr, no_read.stderr
    assert "the key cannot read the analytics API (403" in no_read.stderr
    assert "ingest and read scopes (an admin key)" in no_read.stderr
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == 0
