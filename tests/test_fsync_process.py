"""The group commit's fsync helper (delivery/fsync_process.py, fsync_child.py): real fsyncs in
a real child process, a real failing fsync (a pipe cannot be fsynced: EINVAL), a helper
killed under a running spool, and a server killed under its helper."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from pathlib import Path

import anyio
import pytest
from conftest import free_port
from test_big_body_slot import wait_until
from test_durability import ServeProcess

from watchllm_ext.delivery.fsync_child import LOST, REPLY
from watchllm_ext.delivery.fsync_process import FsyncFailed, FsyncProcess, HelperGone, supported
from watchllm_ext.delivery.spool import Spool

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


def test_a_spool_runs_its_rounds_in_the_helper_and_reaps_it_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_thread: list[int] = []

    def no_thread(closed: list[int], folder: int | None, fd: int) -> None:
        on_thread.append(fd)
        Spool._sync_files(closed, folder, fd)

    async def main() -> tuple[FsyncProcess, int, int]:
        spool = Spool(tmp_path, fsync="always", fsync_process=True, segment_max_bytes=4096)
        monkeypatch.setattr(spool, "_sync_files", no_thread)
        asked = [0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.run_group_commit)
            with anyio.fail_after(10):
                while spool._helper is None:
                    await anyio.sleep(0.005)
            helper = spool._helper
            real_fsync = helper.fsync

            async def counted(fds: list[int]) -> None:
                asked[0] += 1
                await real_fsync(fds)

            monkeypatch.setattr(helper, "fsync", counted)
            for i in range(200):  # segments roll: closed ones and the folder go along
                await spool.append(b'["%d"]' % i + b" " * 100, 1)
            tg.cancel_scope.cancel()
        assert spool._helper is helper and spool._durable == spool.end
        assert on_thread == []  # (close() syncs the last bytes itself, on its caller's thread)
        spool.close()
        return helper, asked[0], spool.fsyncs_total

    helper, asked, fsyncs = anyio.run(main)
    assert 0 < fsyncs <= 200 and asked == fsyncs  # every round in the helper
    assert helper.process.returncode == 0  # closed with the spool


def test_a_failed_fsync_of_a_closed_segment_keeps_it_and_those_after_it(tmp_path: Path) -> None:
    """Spool._sync with the helper: the closed segments before the one that failed are on disk
    and closed; it and those after it stay for the next round. (A pipe stands for the failing
    segment: fsync(pipe) is a real EINVAL.)"""
    first = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT)
    read_end, failing = os.pipe()
    last = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)

    async def main() -> list[int]:
        spool = Spool(tmp_path / "spool", fsync="always")
        spool._helper = FsyncProcess.start()
        closed = [first, failing, last]
        with pytest.raises(FsyncFailed) as failed:  # the helper's error, not the thread's
            await spool._sync(closed, None, spool._fd)
        assert failed.value.errno == errno.EINVAL and failed.value.index == 1
        spool.close()
        return closed

    try:
        assert anyio.run(main) == [failing, last]
        with pytest.raises(OSError):
            os.fstat(first)  # closed: it was synced
    finally:
        for fd in (read_end, failing, last):
            os.close(fd)


def test_descriptors_that_did_not_all_arrive_are_not_counted_as_synced(tmp_path: Path) -> None:
    """A message whose count says more descriptors than came (as when the kernel drops what the
    helper cannot take) is answered LOST, which FsyncProcess.fsync raises as HelperGone: the
    spool then does the fsyncs itself."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    helper = FsyncProcess.start()

    async def main() -> None:
        socket.send_fds(helper._sock, [bytes([2])], [fd])  # says 2, carries 1
        index, _errno = REPLY.unpack(await helper._reply())
        assert index == LOST  # FsyncProcess.fsync raises HelperGone for it
        await helper.fsync([fd])  # and it goes on with the next message

    try:
        anyio.run(main)
    finally:
        helper.close()
        os.close(fd)


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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the helper in /proc")
def test_the_helper_of_a_killed_server_exits(tmp_path: Path) -> None:
    """SIGKILL leaves no orphan: the helper sees its socket close and exits."""
    serve = ServeProcess(tmp_path / "data", free_port())
    wait_until(lambda: bool(helpers_of(serve.proc.pid)), 10, "the helper started")
    (helper,) = helpers_of(serve.proc.pid)
    assert serve.kill(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: gone(helper), 10, "the helper exited with its server")


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
