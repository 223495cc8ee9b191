"""The commands given --url only speak HTTP: they work with the base install (pydantic and
httpx, no 'server' extra), as `watchllm demo` does. Run here in a process where the server's
packages cannot be imported, against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Running

# The base install: none of the 'server' extra's packages can be imported.
CLIENT_ONLY = """
import sys
BLOCKED = (
    "pydantic_settings", "starlette", "uvicorn", "chdb", "pyarrow", "pluggy", "anyio",
    "msgspec", "numpy", "clickhouse_connect", "fastapi", "redis", "prometheus_client",
    "opentelemetry", "genai_prices",
)

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
from watchllm_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


def light(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_url_commands_need_only_the_client_install(server: Running) -> None:
    remote = ["--url", server.url, "--key", server.key]
    counted = light("count-rows", *remote)
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.splitlines() == ["rows in events (project acme):", "0"]
    golden = light("golden-path", *remote)
    assert golden.returncode == 0, golden.stderr
    assert "Success: Event logged, processed, and visible in API." in golden.stdout
    # The event golden-path sent is counted (flushed within flush_interval_s, 0.05 s here).
    waited = light("count-rows", *remote, "--wait", "1", "--timeout", "20")
    assert waited.returncode == 0 and waited.stdout.splitlines()[-1] == "1", waited.stderr
    tables = light("check-tables", *remote)
    assert tables.returncode == 0 and "events" in tables.stdout.split(), tables.stderr
    version = light("verify-clickhouse", *remote)
    assert version.returncode == 0 and "Version:" in version.stdout, version.stderr
    dead = light("dead-letter", "list", *remote)
    assert dead.returncode == 0 and "0 events in 0 dead letters" in dead.stdout, dead.stderr
    # The server checks the table: its answer is the one line.
    bad = light("count-rows", *remote, "--table", "nope")
    assert bad.returncode == 1 and "'nope' is not counted here" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_folder_commands_still_say_which_extra_they_need(tmp_path: Path) -> None:
    for command in (
        ["count-rows", "--data-dir", str(tmp_path)],
        ["golden-path"],  # starts a scratch server
        ["serve", "--data-dir", str(tmp_path)],
    ):
        done = light(*command)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "the server needs the 'server' extra" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_importing_the_server_with_the_base_install_names_the_extra() -> None:
    """`from watchllm_ext import create_app` (or the middleware) in a base install: the error
    says which extra to install, not only which module is missing."""
    blocked = CLIENT_ONLY.split("from watchllm_ext.cli")[0].replace(
        "raise ImportError", "raise ModuleNotFoundError"
    )
    for statement, what in (
        ("from watchllm_ext import create_app", "watchllm_ext.create_app"),
        ("from watchllm_ext import Settings", "watchllm_ext.Settings"),
        ("from watchllm_ext.middleware import WatchLLMMiddleware", "watchllm_ext.middleware"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", blocked + statement],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ModuleNotFoundError: {what} needs the 'server' extra"), last
        assert last.endswith("pip install -e '.[server]' in WatchLLM's folder"), last
    sdk = subprocess.run(
        [sys.executable, "-c", blocked + "from watchllm_ext.sdk import WatchLLM"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sdk.returncode == 0, sdk.stderr
