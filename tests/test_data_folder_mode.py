"""The folders WatchLLM makes for its data are readable by their user only (mode 700): they
hold prompts, responses and key hashes, and a umask of 022 would otherwise open them to
every local user. Folders that exist keep the mode they have."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from watchllm_ext.delivery.spool import Spool
from watchllm_ext.keys import KeyStore
from watchllm_ext.locks import FolderLock


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_folder_and_the_folders_above_it_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "watchllm_ext.cli",
            "keys",
            "create",
            "--project",
            "p1",
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert _mode(data) == 0o700 and _mode(tmp_path / "new") == 0o700


def test_a_store_opened_on_a_new_data_folder_makes_it_private(tmp_path: Path) -> None:
    """The embedded store's own mkdir came first on `serve` and `migrate`: the data folder
    it made was 755. Now the core makes the data folder before any store plugin runs."""
    data = tmp_path / "fresh" / "data"
    r = subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", "migrate", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert _mode(tmp_path / "fresh") == 0o700 and _mode(data) == 0o700
    assert _mode(data / "chdb") == 0o700


def test_the_spool_the_lock_and_the_key_file_make_private_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool-here")
    for folder in ("spool-here", "spool-here/segments", "spool-here/cursors"):
        assert _mode(tmp_path / folder) == 0o700, folder
    spool.close()
    lock = FolderLock(tmp_path / "locked" / "folder", "data folder")
    assert _mode(tmp_path / "locked") == 0o700 and _mode(tmp_path / "locked" / "folder") == 0o700
    lock.release()
    KeyStore(tmp_path / "keys" / "keys.sqlite3").create("p1")
    assert _mode(tmp_path / "keys") == 0o700


def test_a_folder_that_exists_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    KeyStore(shared / "keys.sqlite3").create("p1")
    FolderLock(shared, "data folder").release()
    assert _mode(shared) == 0o750
