"""A folder WatchLLM keeps its data in that cannot be used: a file where a folder should be,
no permission, a read-only disk, a full one. Caught where the folder is opened (the store,
the spool, the key file) and said in one line that names the path, the reason and what to
do, rather than as a traceback or as sqlite's "unable to open database file".
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

from .base import StoreError

# What to set, per setting, said to a user of the CLI and to a host app (which has no
# --data-dir, and whose Settings(...) arguments win over the environment).
_CLI_ADVICE = {
    "data_dir": "set WATCHLLM_DATA_DIR or --data-dir to a folder this user can write",
    "spool_dir": "set WATCHLLM_SPOOL_DIR to a folder this user can write",
    "keys_file": "set WATCHLLM_DATA_DIR or --data-dir to a folder this user can write, or"
    " WATCHLLM_KEYS_FILE to a file in one",
}
_HOST_ADVICE = {
    "data_dir": "give the app a data_dir this user can write",
    "spool_dir": "give the app a spool_dir this user can write",
    "keys_file": "give the app a keys_file (or data_dir) in a folder this user can write",
}
_WHAT = {"data_dir": "data folder", "spool_dir": "spool folder", "keys_file": "key file"}

# sqlite errors that are about the file or its folder, not about the statement or a lock.
_SQLITE_FOLDER_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_IOERR")


class DataFolderError(StoreError):
    """A folder (or the key file) of the settings cannot be used. `str()` is the whole
    line: what cannot be used, the path that failed, the reason, what to set."""

    def __init__(self, setting: str, target: Path, path: Path, reason: str, host: bool = False):
        self.setting = setting  # data_dir, spool_dir or keys_file
        self.target = target  # the folder (or file) that setting names
        self.path = path  # what failed: the target, something in it, or a folder above it
        self.reason = reason
        where = f"{target}" if path == target else f"{target}: {path}"
        advice = (_HOST_ADVICE if host else _CLI_ADVICE)[setting]
        super().__init__(f"cannot use the {_WHAT[setting]} {where}: {reason} ({advice})")

    def for_host_app(self) -> DataFolderError:
        """The same, with what a host app (no --data-dir) can do about it."""
        return DataFolderError(self.setting, self.target, self.path, self.reason, host=True)


def make_private_folder(folder: Path) -> None:
    """`folder` and any missing folder above it, made readable by this user only (mode 700):
    they hold prompts, responses and key hashes. Folders that exist keep their mode (a
    deployment may have chosen it)."""
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            path.mkdir(mode=0o700)


def is_folder_error(exc: BaseException) -> bool:
    """An OSError about a file or folder (not a socket's), or sqlite's about its file."""
    if isinstance(exc, OSError):
        return isinstance(exc.filename, str | bytes | os.PathLike)
    if isinstance(exc, sqlite3.Error):
        return str(getattr(exc, "sqlite_errorname", "")).startswith(_SQLITE_FOLDER_ERRORS)
    return False


def folder_error(setting: str, target: Path, exc: BaseException) -> DataFolderError:
    """`exc` (`is_folder_error`), met opening something in `target`, the folder (or file)
    that `setting` names, as the one line to report."""
    path = target
    reason = str(exc)
    if isinstance(exc, OSError):
        path = Path(os.fsdecode(exc.filename)) if is_folder_error(exc) else target
        reason = exc.strerror or reason
    elif setting == "keys_file":
        # sqlite says only "unable to open database file": the folder says why.
        path, reason = _why_not_writable(target.parent) or (target, reason)
    return DataFolderError(setting, _absolute(target), _absolute(path), reason)


def _why_not_writable(folder: Path) -> tuple[Path, str] | None:
    """(the path, the reason) a file cannot be made in `folder`, or None if it can."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return folder, exc.strerror or str(exc)


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def concerns(exc: BaseException, folder: Path) -> bool:
    """`exc` is a folder error (`is_folder_error`) about `folder`, something in it, or a
    folder on the way to it (one made with parents=True), not another file's (a CA file)."""
    if not is_folder_error(exc):
        return False
    if not isinstance(exc, OSError):
        return True
    failed, mine = _absolute(Path(os.fsdecode(exc.filename))), _absolute(folder)
    return failed.is_relative_to(mine) or mine.is_relative_to(failed)


def open_store(pm: Any, settings: Any) -> Any:
    """The store the plugins register for `settings` (None if none does). A data folder it
    cannot use is a DataFolderError, one line, rather than the OSError of a mkdir deep in
    the store plugin. The data folder is made first, private (make_private_folder), so that
    no plugin's mkdir makes it with the default mode."""
    try:
        make_private_folder(Path(settings.data_dir))
        return pm.hook.register_store(settings=settings)
    except OSError as exc:
        if not concerns(exc, settings.data_dir):
            raise
        raise folder_error("data_dir", settings.data_dir, exc) from None
