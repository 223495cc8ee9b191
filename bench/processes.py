"""Child processes of the benchmarks: started in their own session (a Ctrl-C reaches the
orchestrator, which stops them itself), with no WATCHLLM_* setting of the caller's, and all
stopped at exit (`stop_all`, registered by the scripts)."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

_CHILDREN: list[subprocess.Popen[Any]] = []


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHLLM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(
    args: list[str],
    *,
    log: Path | None = None,
    cwd: Path | None = None,
    stdout: Any = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[Any]:
    """`env`: variables set for this child on top of the caller's (WATCHLLM_* left out)."""
    out = stdout
    if log is not None:
        out = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else None,
        cwd=cwd,
        env={**_child_env(), **(env or {})},
        start_new_session=True,  # a Ctrl-C reaches us; we stop the children ourselves
    )
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], grace_s: float = 40.0) -> None:
    """SIGINT, then SIGKILL after `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_CHILDREN)):
        stop(proc, grace_s=10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where core modules lived before they were grouped by the stage of the flow they serve: the
# benchmarks also run frozen copies of older commits (--before, --versus, --snapshot).
_BEFORE_STAGES = {
    "watchllm_ext.serving.tuning": "watchllm_ext.tuning",
    "watchllm_ext.serving.protocol": "watchllm_ext.serving",
    "watchllm_ext.delivery.spool": "watchllm_ext.spool",
    "watchllm_ext.delivery.writer": "watchllm_ext.writer",
    "watchllm_ext.ingest.fast_validate": "watchllm_ext.fast_validate",
}


def core_name(module: str, name: str) -> Any:
    """`name` from the core's `module`, or from the module's older place in a core from
    before the grouping by stage. ImportError when neither has it."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        if module not in _BEFORE_STAGES:
            raise
        found = importlib.import_module(_BEFORE_STAGES[module])
    try:
        return getattr(found, name)
    except AttributeError:
        raise ImportError(f"{found.__name__} has no {name}") from None
