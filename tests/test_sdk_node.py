"""The Node/TypeScript SDK (contrib/sdk-node): its own test suite, run by Node's test runner
against a real `watchllm serve` on loopback started here.

The Node tests cover delivery (a local HTTP server answering 429/503 with Retry-After, 500,
422, 413 and dropping connections), runs and nesting, the `openai` wrapper against a local
server speaking the OpenAI HTTP API, and, with the server started here, the end to end path:
events read back through the analytics API with their run tree, and the SDK's generated
types compared with the server's /openapi.json.

Needs `node` (20 or later) and `npm`; packages come from the npm registry (`npm ci`, exactly
as package-lock.json says). Skipped, saying why, only where node or npm is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "contrib" / "sdk-node"
WATCHLLM = [sys.executable, "-m", "watchllm_ext.cli"]  # `watchllm`, from this interpreter


def _run(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 600) -> str:
    done = subprocess.run(
        args, cwd=SDK, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        pytest.fail(
            f"`{' '.join(args)}` in contrib/sdk-node exited {done.returncode}\n"
            f"--- stdout ---\n{done.stdout[-20_000:]}\n--- stderr ---\n{done.stderr[-10_000:]}"
        )
    return done.stdout


@pytest.fixture(scope="module")
def npm() -> str:
    node, npm_path = shutil.which("node"), shutil.which("npm")
    if node is None or npm_path is None:
        pytest.skip("node and npm are needed for the Node SDK's tests (Node 20 or later)")
    major = subprocess.run(
        [node, "-p", "process.versions.node.split('.')[0]"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert int(major) >= 20, f"the Node SDK needs Node 20 or later, this is {major}"
    return npm_path


@pytest.fixture(scope="module")
def built(npm: str) -> str:
    """node_modules exactly as the lock file says, and dist/ built by tsc (ESM and CJS)."""
    _run([npm, "ci", "--no-audit", "--no-fund"])
    _run([npm, "run", "build"])
    return npm


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`watchllm serve` in a subprocess on a free loopback port; its URL and an admin key."""
    data = tmp_path / "data"
    create = ["keys", "create", "--data-dir", str(data), "--project", "nodesdk", "--scope", "admin"]
    made = subprocess.run(
        [*WATCHLLM, *create],
        capture_output=True,
        text=True,
        check=True,
    )
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("wllm_"), made.stdout
    port = free_port()
    env = {
        **os.environ,
        "WATCHLLM_FLUSH_INTERVAL_S": "0.05",
        "WATCHLLM_CREATE_DEFAULT_KEY": "false",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*WATCHLLM, "serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (tmp_path / "serve.log").read_text()
                pytest.fail(f"watchllm serve did not start:\n{output}")
            time.sleep(0.1)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_node_sdk(built: str, serve: tuple[str, str]) -> None:
    """`npm test`: the type checks, then every Node test file, the end to end ones included."""
    url, key = serve
    env = {**os.environ, "WATCHLLM_TEST_URL": url, "WATCHLLM_TEST_KEY": key}
    # The SDK reads these; the delivery tests set their own, a stray one must not leak in.
    env.pop("WATCHLLM_API_KEY", None)
    env.pop("WATCHLLM_BASE_URL", None)
    out = _run([built, "test"], env=env)
    # With the server's URL and key given, the end to end tests run: none may skip.
    assert "\n# skipped 0\n" in out and "\n# fail 0\n" in out, out[-5_000:]
    assert "\n# pass 0\n" not in out, out[-5_000:]


def test_sdk_version_matches_the_package() -> None:
    """client.sdk_version says the version npm publishes."""
    import json

    version = json.loads((SDK / "package.json").read_text())["version"]
    assert f'SDK_VERSION = "{version}"' in (SDK / "src" / "version.ts").read_text()


def test_drop_reasons_are_the_python_sdks() -> None:
    """stats().dropped lists the Python SDK's drop reasons, by the same names, in its order."""
    from watchllm_ext.sdk import DROP_REASONS

    source = (SDK / "src" / "transport.ts").read_text()
    listed = source.split("export const DROP_REASONS = [", 1)[1].split("] as const", 1)[0]
    assert tuple(re.findall(r'^\s*"([a-z_]+)",', listed, re.MULTILINE)) == DROP_REASONS
