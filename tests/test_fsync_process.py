"""The group commit's fsync helper process (fsync_process.py, fsync_child.py): real fsyncs in
a real child process, a real failing fsync (a pipe cannot be fsynced: EINVAL), a helper
killed under a running spool, and a server killed under its helper."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from conftest import free_port
from test_durability import ServeProcess

from watchllm_ext.fsync_process import FsyncFailed, FsyncProcess, HelperGone, supported
from watchllm_ext.spool import Spool

pytestmark = pytest.mark.skipif(not supported(), reason="no Unix sockets to pass descriptors")


def helpers_of(pid: int) -> list[int]:
    """The fsync helper processes whose parent is `pid` (Linux: /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == pid and b"fsync_child.py" in cmdline:
            found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """Has `pid` exited (a zombie left for a parent that does not reap counts as exited)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_the_helper_fsyncs_files_and_exits_when_closed(tmp_path: Path) -> None:
    files = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(150)]
    for fd in files:
        os.write(fd, b"data")
    helper = FsyncProcess.start()

    async def main() -> None:
        await helper.fsync(files)  # more than one message holds: sent in three
        await helper.fsync(files[:1])

    try:
        anyio.run(main)
    finally:
        helper.close()
        for fd in files:
            os.close(fd)
    assert helper.process.returncode == 0


def test_the_helper_outlives_the_signals_a_stopping_service_sends(tmp_path: Path) -> None:
    """SIGINT, SIGTERM and SIGHUP (a Ctrl-C to the process group, a service manager stopping
    every process of the service) leave the helper serving: the server, stopping, still
    fsyncs what it accepted; it ends the helper by closing the socket."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    helper = FsyncProcess.start()

    async def main() -> None:
        await helper.fsync([fd])  # started: its signal dispositions are set
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            helper.process.send_signal(sig)
        await anyio.sleep(0.2)
        await helper.fsync([fd])

    try:
        anyio.run(main)
        assert helper.process.poll() is None
    finally:
        helper.close()
        os.close(fd)
    assert helper.process.returncode == 0


def test_a_failed_fsync_names_its_descriptor_and_the_helper_goes_on(tmp_path: Path) -> None:
    fds = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(100)]
    read_end, write_end = os.pipe()  # fsync(pipe) is EINVAL: a real failing fsync
    helper = FsyncProcess.start()

    async def main() -> tuple[int, int]:
        with pytest.raises(FsyncFailed) as failed:
            await helper.fsync([*fds[:70], write_end, *fds[70:]])
        await helper.fsync(fds)  # the next request is answered as usual
        return failed.value.index, failed.value.errno

    try:
        assert anyio.run(main) == (70, errno.EINVAL)
    finally:
        helper.close()
        for fd in (*fds, read_end, write_end):
            os.close(fd)


def test_a_spool_runs_its_rounds_in_the_helper_and_reaps_it_at_close(tmp_path: Path) -> None:
    async def main() -> tuple[FsyncProcess, int]:
        spool = Spool(tmp_path, fsync="always", fsync_process=True, segment_max_bytes=4096)
        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.run_group_commit)
            with anyio.fail_after(10):
                while spool._helper is None:
                    await anyio.sleep(0.005)
            helper = spool._helper
            for i in range(200):  # segments roll: closed ones and the folder go along
                await spool.append(b'["%d"]' % i + b" " * 100, 1)
            tg.cancel_scope.cancel()
        fsyncs = spool.fsyncs_total
        assert spool._durable == spool.end
        spool.close()
        return helper, fsyncs

    helper, fsyncs = anyio.run(main)
    assert 0 < fsyncs <= 200
    assert helper.process.returncode == 0  # closed with the spool


def test_a_killed_helper_leaves_the_fsyncs_to_a_worker_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> bool:
        spool = Spool(tmp_path, fsync="always", fsync_process=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.run_group_commit)
            with anyio.fail_after(10):
                while spool._helper is None:
                    await anyio.sleep(0.005)
            await spool.append(b'["before"]', 1)
            spool._helper.process.kill()
            spool._helper.process.wait()
            with anyio.fail_after(10):
                await spool.append(b'["after"]', 1)
                await spool.append(b'["and-after"]', 1)
            durable = spool._durable == spool.end and spool._helper is None
            tg.cancel_scope.cancel()
        spool.close()
        return durable

    with caplog.at_level(logging.WARNING, "watchllm.spool"):
        assert anyio.run(main)
    assert "the fsync helper process is gone" in caplog.text


def test_the_helper_of_a_killed_server_exits(tmp_path: Path) -> None:
    """SIGKILL leaves no orphan: the helper sees its socket close and exits."""
    serve = ServeProcess(tmp_path / "data", free_port())
    deadline = time.monotonic() + 10
    while not helpers_of(serve.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (helper,) = helpers_of(serve.proc.pid)
    assert serve.kill(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(helper)


def test_helper_gone_is_raised_when_the_helper_has_exited(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    helper = FsyncProcess.start()
    helper.process.kill()
    helper.process.wait()

    async def main() -> None:
        with pytest.raises(HelperGone):
            await helper.fsync([fd])

    try:
        anyio.run(main)
    finally:
        helper.close()
        os.close(fd)
