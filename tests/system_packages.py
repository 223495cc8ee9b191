"""Debian programs the tests drive (redis-server, chromium), installed by the test setup itself.

The house rule is that the one test command works on a fresh machine: a test that needs a
system program calls `debian_program(...)`, which finds it on PATH or installs its package with
apt-get (as root; one install at a time across processes). Where it cannot be installed (no
root, no apt-get), the test is skipped with the reason, never silently passed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

_LOCK = Path("/tmp/watchllm-tests-apt.lock")
_UPDATED = Path("/tmp/watchllm-tests-apt.updated")


def debian_program(program: str, package: str | None = None) -> str:
    """The path of `program`, installing Debian's `package` (default: the program's name)."""
    found = shutil.which(program)
    if found:
        return found
    package = package or program
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{program} is not installed and cannot be installed here (needs root apt-get)")
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = shutil.which(program)  # another test process may have installed it meanwhile
        if found:
            return found
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if not _UPDATED.exists():
            _run(["apt-get", "update"], env, package)
            _UPDATED.touch()
        _run(["apt-get", "install", "-y", "--no-install-recommends", package], env, package)
    found = shutil.which(program)
    if not found:
        pytest.fail(f"apt-get installed {package} but {program} is not on PATH")
    return found


def _run(command: list[str], env: dict[str, str], package: str) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(
            f"installing {package} failed: {' '.join(command)} exited {done.returncode}\n"
            f"{done.stderr[-2000:]}"
        )
