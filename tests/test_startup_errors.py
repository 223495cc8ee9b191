"""A data folder that cannot be used, or that another process holds: one line that names the
folder, the reason and what to do, from every command that opens it and from a host app
under uvicorn (docs/EMBEDDING.md), never a traceback; the advice fits the command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_cli import cli


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed as the CLI fails (exit 1), with one line on stderr."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# Every command that opens the data folder (export needs a store to be there: it says so
# otherwise, in a line of its own).
FOLDER_COMMANDS = [
    ["serve"],
    ["migrate"],
    ["keys", "create", "--project", "p"],
    ["keys", "list"],
    ["keys", "revoke", "abc"],
    ["dead-letter", "replay"],
]


@pytest.mark.parametrize("command", FOLDER_COMMANDS, ids=" ".join)
def test_a_data_folder_under_a_file_is_one_line(command: list[str], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    data = afile / "data"
    if command == ["serve"]:
        command = ["serve", "--port", str(free_port())]
    what = "key file" if command[0] == "keys" else "data folder"
    for how in ({"env": {"WATCHLLM_DATA_DIR": str(data)}}, {"args": ["--data-dir", str(data)]}):
        line = one_error_line(cli(*command, *how.get("args", []), env=how.get("env")))
        assert line.startswith(f"error: cannot use the {what} "), line
        assert str(data) in line and "Not a directory" in line, line
        assert "WATCHLLM_DATA_DIR" in line and "--data-dir" in line, line


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """`chattr +i` folders (nothing can be made or changed in them, even by root, where
    chmod would not stop a write); made mutable again at teardown."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr on this machine")
    made: list[Path] = []
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is refused here (file system or capability)")
    made.append(probe)
    yield made
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _freeze(made: list[Path], folder: Path) -> None:
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    made.append(folder)


def test_an_immutable_data_folder_is_one_line(immutable: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _freeze(immutable, empty)
    serve = ["serve", "--port", str(free_port())]
    for command in (serve, ["migrate"], ["keys", "create", "--project", "p"]):
        line = one_error_line(cli(*command, "--data-dir", str(empty)))
        assert str(empty) in line and "Operation not permitted" in line, line
        assert "--data-dir" in line, line

    # A folder that served before (chdb/ and spool/ in it), made read-only since: the store
    # opens, the key file does not. sqlite says only "unable to open database file".
    used = tmp_path / "used"
    (used / "chdb").mkdir(parents=True)
    (used / "spool").mkdir()
    _freeze(immutable, used)
    for command in (serve, ["keys", "create", "--project", "p"]):
        line = one_error_line(cli(*command, "--data-dir", str(used)))
        assert f"cannot use the key file {used / 'keys.sqlite3'}: {used}:" in line, line
        assert "Operation not permitted" in line and "unable to open" not in line, line
    # The store's own lock file cannot be made either.
    (tmp_path / "locked" / "chdb").mkdir(parents=True)
    _freeze(immutable, tmp_path / "locked" / "chdb")
    line = one_error_line(cli("migrate", "--data-dir", str(tmp_path / "locked")))
    assert f"{tmp_path / 'locked' / 'chdb' / 'watchllm.lock'}: Operation not permitted" in line


# --- a host app (WatchLLMMiddleware, docs/EMBEDDING.md) -----------------------------------------

HOST_APP = """
import os

from fastapi import FastAPI

from watchllm_ext import Settings, create_app
from watchllm_ext.middleware import WatchLLMMiddleware

watchllm = create_app(Settings(data_dir=os.environ["HOST_DATA"]))
app = FastAPI()
app.mount("/watchllm", watchllm)
app.add_middleware(WatchLLMMiddleware, watchllm=watchllm, project_id="default")
"""


def run_host_app(tmp_path: Path, data: Path) -> str:
    """uvicorn serving the host app on `data`; it must fail to start. What it logged."""
    (tmp_path / "hostapp.py").write_text(textwrap.dedent(HOST_APP))
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "hostapp:app", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HOST_DATA": str(data)},
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Application startup failed" in done.stderr and "Traceback" not in done.stderr
    return done.stderr


def test_a_host_app_on_an_unusable_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    data = tmp_path / "afile" / "data"
    logged = run_host_app(tmp_path, data)
    line = next(x for x in logged.splitlines() if "WatchLLM" in x)
    # The data folder itself is made first (private, before the store plugin's own folder).
    assert f"cannot use the data folder {data}: Not a directory" in line, line
    # A host app has no --data-dir; its Settings(data_dir=...) is what to change.
    assert "data_dir" in line and "--data-dir" not in line, line
    assert "NotADirectoryError(" not in logged and "DataFolderError" not in logged


# --- a folder another process holds: the advice fits the command ------------------------------


class Holder:
    """Another process holding a folder's lock, as `watchllm serve` holds its folders."""

    def __init__(self, folder: Path, what: str) -> None:
        code = (  # one line: the lock file names the holder by its command line
            "import sys, time; from pathlib import Path; from watchllm_ext.locks import"
            " FolderLock; lock = FolderLock(Path(sys.argv[1]), sys.argv[2]);"
            " print('held', flush=True); time.sleep(600)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(folder), what], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, Holder]]:
    """A data folder whose store (chdb/) another process holds."""
    data = tmp_path / "data"
    holder = Holder(data / "chdb", "data folder")
    yield data, holder
    holder.stop()


def test_a_held_folder_is_advised_per_command(held: tuple[Path, Holder], tmp_path: Path) -> None:
    data, holder = held
    busy = f"the data folder {data / 'chdb'} is in use by process {holder.pid}"

    # Commands with --url can ask the server that holds it.
    for command in (["count-rows"], ["check-tables"], ["verify-clickhouse"]):
        # (a store is there: the read commands do not make one)
        line = one_error_line(cli(*command, "--data-dir", str(data)))
        assert busy in line and "ask it instead with --url" in line, line

    # migrate has no --url: it must not suggest one (`migrate --url` is refused by argparse).
    line = one_error_line(cli("migrate", "--data-dir", str(data)))
    assert busy in line and "--url" not in line and "stop that process first" in line, line
    assert "applies the migrations itself" in line, line
    refused = cli("migrate", "--url", "http://127.0.0.1:1", "--key", "wllm_secret")
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr

    # A second server needs a folder of its own.
    line = one_error_line(cli("serve", "--data-dir", str(data), "--port", str(free_port())))
    assert busy in line and "another --data-dir" in line and "--url" not in line, line

    # A host app: held by process N, use another data folder or stop it; no --url.
    logged = run_host_app(tmp_path, data)
    line = next(x for x in logged.splitlines() if "WatchLLM" in x)
    assert busy in line and "give this app a data folder of its own" in line, line
    assert "--url" not in line and "--data-dir" not in line, line


def test_a_held_spool_is_advised_per_command(tmp_path: Path) -> None:
    """dead-letter replay writes into the spool (it has --url); list only reads the files."""
    data = tmp_path / "data"
    holder = Holder(data / "spool", "spool")
    try:
        line = one_error_line(cli("dead-letter", "replay", "--data-dir", str(data)))
        assert f"the spool {data / 'spool'} is in use by process {holder.pid}" in line, line
        assert "ask it instead with --url" in line, line
        listed = cli("dead-letter", "list", "--data-dir", str(data))
        assert listed.returncode == 0 and "0 events in 0 dead letters" in listed.stdout
        # With the spool held, serve says so itself, before its lifespan (no traceback).
        line = one_error_line(cli("serve", "--data-dir", str(data), "--port", str(free_port())))
        assert f"in use by process {holder.pid}" in line and "another --data-dir" in line
    finally:
        holder.stop()
