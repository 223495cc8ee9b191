"""An advisory lock on a folder that names the process holding it.

Two processes must never share a chDB folder or a spool; the lock file says which process
has it, so the second one can say so instead of failing obscurely.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from .store.folders import make_private_folder

# What a FolderLocked message advises: true for any process that meets the lock. One that
# knows a better way round says that instead (with_advice): a command that has --url, a
# second `serve`, a host app (cli.py, app.py).
STOP_IT = "stop that process first"
# The way round for the commands that can ask a running server (those with --url).
ASK_INSTEAD = "stop that process, or ask it instead with --url http://HOST:PORT --key KEY"


class FolderLocked(Exception):
    """The folder is locked by another process (named in the message)."""


class FolderLock:
    def __init__(self, folder: Path, what: str) -> None:
        make_private_folder(folder)
        self.path = folder / "watchllm.lock"
        handle: IO[str] = open(self.path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderLocked(
                f"the {what} {folder} is in use by {holder}. It can be open in one process"
                f" only: {STOP_IT}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({_cmdline()})")
        handle.flush()
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def with_advice(message: str, advice: str) -> str:
    """A FolderLocked message (or a StoreLockedError made of one) with `advice` in place of
    the default STOP_IT; another message is left as it is."""
    if message.endswith(STOP_IT):
        return message[: -len(STOP_IT)] + advice
    return message


def _cmdline() -> str:
    try:
        raw = Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "unknown command"
