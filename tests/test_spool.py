"""The write-ahead spool on its own: records, group commit, recovery, cursors, limits."""

from __future__ import annotations

import contextlib
import gc
import os
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from watchllm_ext.delivery import spool as spool_module
from watchllm_ext.delivery.spool import (
    _READ_STEP,
    GROUP_CONTINUES,
    HEADER_SIZE,
    Position,
    Spool,
    SpoolFull,
)


def payloads(n: int) -> list[bytes]:
    return [f'[{{"n": {i}}}]'.encode() for i in range(n)]


def gate_fsyncs(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The spool's fsyncs wait for the returned gate (a slow disk, until the test sets it)."""
    gate = threading.Event()
    real_sync = Spool._sync_files

    def gated_sync(closed: list[int], folder: int | None, fd: int) -> None:
        gate.wait(5)
        real_sync(closed, folder, fd)

    monkeypatch.setattr(spool, "_sync_files", gated_sync)
    return gate


def test_append_read_and_sequence_numbers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [spool.write(p, 1) for p in payloads(5)]
    assert [r.seq for r in records] == [0, 1, 2, 3, 4]
    read = spool.read(Position(1, 0), max_events=3)
    assert [r.payload for r in read] == payloads(3)
    rest = spool.read(read[-1].end, max_events=100)
    assert [r.payload for r in rest] == payloads(5)[3:]
    assert spool.read(records[-1].end, 100) == []
    spool.close()
    # Reopened: same records, sequence continues.
    again = Spool(tmp_path)
    assert [r.payload for r in again.read(Position(1, 0), 100)] == payloads(5)
    assert again.write(b"[]", 2).seq == 5
    assert again.next_seq == 7
    again.close()


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    async def main() -> Spool:
        spool = Spool(tmp_path, fsync="always")
        async with anyio.create_task_group() as tg:
            for p in payloads(200):
                tg.start_soon(spool.append, p, 1)
        return spool

    spool = anyio.run(main)
    assert spool.fsyncs_total < 50  # 200 appends, far fewer fsyncs
    assert spool._durable == spool.end
    spool.close()


@pytest.mark.parametrize("committer", [False, True], ids=["callers", "run_group_commit"])
def test_group_commit_covers_each_write_once_on_disk(
    committer: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each caller of sync_to returns only once an fsync that began after its write has
    ended, whoever runs the rounds (the callers themselves, or run_group_commit)."""
    synced_upto: list[Position] = []  # what each finished fsync covered (its start's end)
    real_sync = Spool._sync_files

    async def main() -> tuple[Spool, list[bool]]:
        spool = Spool(tmp_path, fsync="always")

        def slow_sync(closed: list[int], folder: int | None, fd: int) -> None:
            start = spool._written  # read before the fsync: what it surely covers
            threading.Event().wait(0.005)  # a slow disk: writes pile up during each round
            real_sync(closed, folder, fd)
            synced_upto.append(start)

        monkeypatch.setattr(spool, "_sync_files", slow_sync)
        covered: list[bool] = []

        async def request(payload: bytes) -> None:
            record = spool.write(payload, 1)
            await spool.sync_to(record.end)
            covered.append(any(end >= record.end for end in synced_upto))

        async with anyio.create_task_group() as tg:
            if committer:
                tg.start_soon(spool.run_group_commit)
            for i, p in enumerate(payloads(120)):
                tg.start_soon(request, p)
                if i % 10 == 9:
                    await anyio.sleep(0.002)
            while len(covered) < 120:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return spool, covered

    spool, covered = anyio.run(main)
    assert covered == [True] * 120
    assert spool.fsyncs_total < 60  # shared: far fewer fsyncs than writes
    spool.close()


def test_run_group_commit_serves_a_write_with_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write made while a round is in flight waits for the next round, which
    run_group_commit runs as soon as the one in flight ends: the caller waits once and
    runs no round itself (woken by the first round to run the second, as callers without
    that task do, it went through its stack of coroutines twice)."""
    real_round = Spool._run_round
    real_wait = spool_module._Round.wait
    runners: list[str] = []
    waits = 0

    async def named_round(spool: Spool) -> None:
        runners.append(anyio.get_current_task().name.rsplit(".", 1)[-1])
        await real_round(spool)

    async def counted_wait(round_: Any) -> None:
        nonlocal waits
        waits += 1
        await real_wait(round_)

    async def main() -> int:
        spool = Spool(tmp_path, fsync="always")
        gate = gate_fsyncs(spool, monkeypatch)
        monkeypatch.setattr(Spool, "_run_round", named_round)
        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.run_group_commit)
            await anyio.sleep(0.01)  # it waits for work
            first = spool.write(b'["a"]', 1)
            tg.start_soon(spool.sync_to, first.end)
            while spool._round is None:  # the first round is in flight
                await anyio.sleep(0.001)
            second = spool.write(b'["b"]', 1)
            monkeypatch.setattr(spool_module._Round, "wait", counted_wait)
            gate.set()
            await spool.sync_to(second.end)
            fsyncs = spool.fsyncs_total
            tg.cancel_scope.cancel()
        spool.close()
        return fsyncs

    assert anyio.run(main) == 2
    assert runners == ["run_group_commit", "run_group_commit"]
    assert waits == 1


def test_a_failed_fsync_fails_its_waiters_and_the_next_round_is_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_group_commit: every caller waiting for a round whose fsync failed gets OSError
    (their events are not durable: the request fails, nothing is acknowledged); a write after
    it gets a new round, which succeeds once the disk does."""
    real_sync = Spool._sync_files
    failures = [1]

    async def main() -> tuple[list[str], bool, str | None]:
        spool = Spool(tmp_path, fsync="always")

        def failing_once(closed: list[int], folder: int | None, fd: int) -> None:
            threading.Event().wait(0.01)
            if failures[0]:
                failures[0] -= 1
                raise OSError(5, "Input/output error")
            real_sync(closed, folder, fd)

        monkeypatch.setattr(spool, "_sync_files", failing_once)
        outcomes: list[str] = []

        async def request(payload: bytes) -> None:
            record = spool.write(payload, 1)
            try:
                await spool.sync_to(record.end)
            except OSError as exc:
                outcomes.append(f"error {exc.errno}")
            else:
                outcomes.append("ok")

        async with anyio.create_task_group() as tg:
            tg.start_soon(spool.run_group_commit)
            await anyio.sleep(0.01)
            for p in payloads(5):
                tg.start_soon(request, p)
            while len(outcomes) < 5:
                await anyio.sleep(0.005)
            failed = spool.sync_error  # readyz says not ready meanwhile
            later = spool.write(b'["later"]', 1)
            await spool.sync_to(later.end)
            durable = spool._durable >= later.end
            tg.cancel_scope.cancel()
        cleared = spool.sync_error is None
        spool.close()
        return outcomes, durable and cleared, failed

    outcomes, durable, failed = anyio.run(main)
    assert outcomes == ["error 5"] * 5
    assert failed == "the spool's fsync failed: Input/output error"
    assert durable


def test_without_the_task_a_failed_fsync_fails_only_the_writes_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers running the rounds themselves: a write made while a failing fsync ran was not
    in it, so its caller does not get that error; it runs the next round, which succeeds."""
    real_sync = Spool._sync_files
    failures = [1]

    async def main() -> list[str]:
        spool = Spool(tmp_path, fsync="always")

        def failing_once(closed: list[int], folder: int | None, fd: int) -> None:
            threading.Event().wait(0.02)
            if failures[0]:
                failures[0] -= 1
                raise OSError(5, "Input/output error")
            real_sync(closed, folder, fd)

        monkeypatch.setattr(spool, "_sync_files", failing_once)
        outcomes: dict[str, str] = {}

        async def request(name: str) -> None:
            record = spool.write(f'["{name}"]'.encode(), 1)
            try:
                await spool.sync_to(record.end)
            except OSError:
                outcomes[name] = "error"
            else:
                outcomes[name] = "ok"

        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "in-the-failed-round")
            while spool._round is None:
                await anyio.sleep(0.001)
            tg.start_soon(request, "after-it")
        spool.close()
        return [outcomes["in-the-failed-round"], outcomes["after-it"]]

    assert anyio.run(main) == ["error", "ok"]


def test_callers_run_the_rounds_once_run_group_commit_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller waiting for run_group_commit's next round when that task ends (the writer
    stopping) is not left waiting: it runs the round itself."""

    async def main() -> bool:
        spool = Spool(tmp_path, fsync="always")
        gate = gate_fsyncs(spool, monkeypatch)
        done: list[Position] = []

        async def request(payload: bytes) -> None:
            record = spool.write(payload, 1)
            await spool.sync_to(record.end)
            done.append(record.end)

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as committer:
                tg.start_soon(request, b'["a"]')
                async with anyio.create_task_group() as inner:
                    inner.start_soon(spool.run_group_commit)
                    while spool._round is None:  # the round for "a" is in flight
                        await anyio.sleep(0.001)
                    tg.start_soon(request, b'["b"]')  # waits for the next round
                    await anyio.sleep(0.01)
                    committer.cancel()
                    gate.set()  # the round in flight ends; the task stops after it
            assert spool._committer is None
            with anyio.fail_after(5):
                while len(done) < 2:
                    await anyio.sleep(0.005)
        durable = spool._durable >= max(done)
        spool.close()
        return durable

    assert anyio.run(main)


def test_policies_never_and_interval_do_not_wait(tmp_path: Path) -> None:
    async def main(policy: str) -> int:
        spool = Spool(tmp_path / policy, fsync=policy, fsync_interval_s=0.05)  # type: ignore[arg-type]
        for p in payloads(20):
            await spool.append(p, 1)
        fsyncs = spool.fsyncs_total
        if policy == "interval":
            with anyio.move_on_after(0.3):
                await spool.run_interval_sync()
            assert spool._durable == spool.end
        spool.close()
        return fsyncs

    assert anyio.run(main, "never") == 0
    assert anyio.run(main, "interval") == 0


def test_segments_roll_and_are_released(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_max_bytes=HEADER_SIZE * 3)
    records = [spool.write(p, 1) for p in payloads(6)]
    segments = sorted(p.name for p in (tmp_path / "segments").iterdir())
    assert len(segments) >= 3
    assert spool.release(records[3].start) >= 1
    assert len(list((tmp_path / "segments").iterdir())) < len(segments)
    first, seq = spool.first_position()
    assert first <= records[3].start and seq <= 3
    assert [r.payload for r in spool.read(records[3].start, 100)] == payloads(6)[3:]
    spool.close()


@pytest.mark.parametrize("policy", ["always", "interval"])
def test_a_roll_leaves_its_fsyncs_to_the_sync_thread(
    policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments roll with no fsync on the event loop's thread (a folder's fsync took over
    20 ms at times): the closed segment and the folder's new entry are fsynced by the next
    sync, on its worker thread, before a record after the roll counts as durable."""
    real_fsync = os.fsync
    calls: list[tuple[bool, str]] = []  # (on the loop's thread, "dir" | "file")

    def watched_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append((threading.current_thread() is threading.main_thread(), kind))
        real_fsync(fd)

    async def main() -> None:
        spool = Spool(tmp_path, fsync=policy, segment_max_bytes=HEADER_SIZE * 3)  # type: ignore[arg-type]
        monkeypatch.setattr(os, "fsync", watched_fsync)
        closed_fd = spool._fd
        records = [spool.write(p, 1) for p in payloads(4)]  # the third rolls
        assert records[-1].start.segment == records[0].start.segment + 1
        assert calls == []  # nothing fsynced yet, on any thread
        assert spool._durable < records[0].end  # nor counted as durable
        await spool.sync_to(records[-1].end)
        assert spool._durable >= records[-1].end
        assert sorted(calls) == [(False, "dir"), (False, "file"), (False, "file")]
        with pytest.raises(OSError):
            os.fstat(closed_fd)  # closed once on disk
        spool.close()

    anyio.run(main)


def open_files() -> list[str]:
    """What this process's descriptors point at (Linux), "(deleted)" after a removed file."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_a_segment_released_when_sinks_catch_up_gives_its_space_back(tmp_path: Path) -> None:
    """Once every sink has passed everything (a full disk, then the store back), the active
    segment is closed and deleted: no descriptor may keep the deleted file's space taken
    until the next request comes (with a full disk, none would be taken)."""

    async def main() -> None:
        spool = Spool(tmp_path, fsync="always")
        spool.roll_drained_bytes = 1
        for p in payloads(3):
            await spool.append(p, 1)
        assert spool.release(spool.end) == 1  # rolled, and the old segment deleted
        assert not [path for path in open_files() if str(tmp_path) in path and "(deleted)" in path]
        await spool.append(b"[1]", 1)
        assert [r.payload for r in spool.read(spool.first_position()[0], 10)] == [b"[1]"]
        spool.close()

    anyio.run(main)


def test_close_after_a_roll_needs_no_path(tmp_path: Path) -> None:
    """The folder's entry of a rolled segment is fsynced through a descriptor the spool holds:
    close() works when the path has gone meanwhile (a disk unmounted lazily under a stopping
    server)."""
    spool = Spool(tmp_path / "spool", fsync="interval", segment_max_bytes=HEADER_SIZE * 3)
    for p in payloads(4):  # the third rolls; nothing fsynced yet (interval)
        spool.write(p, 1)
    assert spool._folder_unsynced
    (tmp_path / "spool").rename(tmp_path / "moved")
    spool.close()
    assert not [path for path in open_files() if str(tmp_path) in path]


def test_torn_tail_is_cut_and_start_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    for p in payloads(3):
        spool.write(p, 1)
    spool.close()
    segment = next((tmp_path / "segments").iterdir())
    good_size = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(b"WLR1\x10\x00\x00\x00partial")  # a crash in the middle of a write
    reopened = Spool(tmp_path)
    assert segment.stat().st_size == good_size
    assert reopened.truncated_bytes_total > 0
    assert [r.payload for r in reopened.read(Position(1, 0), 100)] == payloads(3)
    assert "torn record" in caplog.text
    assert reopened.write(b"[4]", 1).seq == 3
    reopened.close()


def test_flipped_bytes_lose_only_the_damaged_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [spool.write(p, 1) for p in payloads(5)]
    spool.close()
    segment = next((tmp_path / "segments").iterdir())
    data = bytearray(segment.read_bytes())
    data[records[2].start.offset + HEADER_SIZE + 2] ^= 0xFF  # inside record 2's payload
    segment.write_bytes(bytes(data))
    reopened = Spool(tmp_path)
    kept = [r.payload for r in reopened.read(Position(1, 0), 100)]
    assert kept == [p for i, p in enumerate(payloads(5)) if i != 2]
    assert reopened.corrupt_bytes_total > 0
    assert list((tmp_path / "dead-letter").glob("corrupt-*.bin"))
    reopened.close()


def test_cursors_persist_and_never_go_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [spool.write(p, 2) for p in payloads(3)]
    assert spool.load_cursor("store") == (Position(1, 0), 0)
    spool.save_cursor("store", records[1].end, 4)
    spool.close()
    again = Spool(tmp_path)
    assert again.load_cursor("store") == (records[1].end, 4)
    (tmp_path / "cursors" / "store.json").write_text("{broken")
    assert again.load_cursor("store") == (Position(1, 0), 0)  # replays everything
    again.close()


def test_size_cap_refuses_with_spool_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=HEADER_SIZE * 4)
    spool.write(b"[1]", 1)
    with pytest.raises(SpoolFull, match="cap"):
        for p in payloads(10):
            spool.write(p, 1)
    spool.close()


def test_disk_full_leaves_no_partial_record_and_recovers(tmpfs: Any) -> None:
    tiny_disk = tmpfs("256k")
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 150_000)  # something else is using most of the disk
    spool = Spool(tiny_disk / "spool")
    blob = b'["' + b"x" * 20_000 + b'"]'
    written = 0
    with pytest.raises(SpoolFull, match="No space left"):
        for _ in range(100):
            spool.write(blob, 1)
            written += 1
    assert 0 < written < 10
    segment = next((tiny_disk / "spool" / "segments").iterdir())
    assert segment.stat().st_size == written * (HEADER_SIZE + len(blob))  # no half record
    filler.unlink()  # room comes back: writing works again, with nothing to restart
    spool.write(blob, 1)
    assert len(spool.read(Position(1, 0), 1000)) == written + 1
    spool.close()


def test_read_back_across_read_steps(tmp_path: Path) -> None:
    """Records are cut from reads of up to _READ_STEP bytes: payloads larger than a step,
    smaller ones on both sides of a step's edge, each read back whole, from any record."""
    sizes = [10, _READ_STEP - HEADER_SIZE - 7, 3, _READ_STEP + 12345, 1, 700, 2 * _READ_STEP, 5]
    sizes += [900] * 40
    written = [os.urandom(n) for n in sizes]
    spool = Spool(tmp_path, segment_max_bytes=1 << 30, max_bytes=1 << 31)
    records = [spool.write(p, 1) for p in written]
    got = spool.read(Position(1, 0), max_events=10_000)
    assert [r.payload for r in got] == written
    assert [(r.start, r.end, r.seq) for r in got] == [(r.start, r.end, r.seq) for r in records]
    for i in (1, 3, 6, 30):  # from the middle, and a bounded count
        part = spool.read(records[i].start, max_events=3)
        assert [r.payload for r in part] == written[i : i + 3]
    assert [r.payload for r in spool.read(Position(1, 0), 100, max_bytes=1)] == written[:1]
    spool.close()


def test_size_is_kept_through_writes_rolls_and_releases(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_max_bytes=4096)
    records = [spool.write(b"x" * 1000, 1) for _ in range(20)]

    def on_disk() -> int:
        return sum(f.stat().st_size for f in (tmp_path / "segments").glob("*.seg"))

    assert spool.bytes == on_disk() == 20 * (1000 + HEADER_SIZE)
    assert spool.release(records[10].start) > 0
    assert spool.bytes == on_disk() < 20 * (1000 + HEADER_SIZE)
    spool.close()
    assert Spool(tmp_path).bytes == on_disk()


def test_positions_and_records_are_not_tracked_by_the_collector(tmp_path: Path) -> None:
    """Thousands of records a second live until the sinks have them: none may add an object
    for a full garbage collection to walk."""
    spool = Spool(tmp_path)
    record = spool.write(b"[1]", 1)
    (read,) = spool.read(Position(1, 0), 10)
    for obj in (record, record.start, record.end, read, read.start, spool.end):
        assert not gc.is_tracked(obj), obj
    spool.close()


def test_a_group_is_read_back_whole_or_not_at_all_wherever_a_crash_cuts_it(
    tmp_path: Path,
) -> None:
    """write_many puts an OTLP request's events and spans in one write. A crash can leave any
    prefix of that write on disk (a kill -9 between pages, a power loss before the fsync):
    cut the segment at every byte offset inside the group, reopen, and read. The records
    before the group are always there; of the group, both records or neither; and the
    sequence numbers go on from what was kept."""
    spool = Spool(tmp_path / "whole")
    before = [spool.write(p, 1) for p in payloads(2)]
    group = spool.write_many([(b'[{"event": 1}, {"event": 2}]', 2, 0), (b'[{"span": 1}]', 1, 2)])
    spool.close()
    assert group[0].end == group[1].start and group[0].seq + 2 == group[1].seq
    assert group[0].flags & GROUP_CONTINUES and not group[1].flags & GROUP_CONTINUES
    assert group[1].flags == 2  # the writer's flag kept
    segment = next((tmp_path / "whole" / "segments").iterdir())
    whole = segment.read_bytes()
    start, end = group[0].start.offset, group[1].end.offset
    assert len(whole) == end
    outcomes: dict[str, int] = {}
    for cut in range(start, end + 1):
        folder = tmp_path / f"cut-{cut}"
        (folder / "segments").mkdir(parents=True)
        (folder / "segments" / segment.name).write_bytes(whole[:cut])
        reopened = Spool(folder)
        read = reopened.read(Position(1, 0), 100)
        kept = [r.payload for r in read]
        assert kept[:2] == payloads(2), cut
        if cut == end:
            assert [(r.start, r.end, r.seq, r.flags) for r in read[2:]] == [
                (g.start, g.end, g.seq, g.flags) for g in group
            ]
            outcomes["both"] = outcomes.get("both", 0) + 1
        else:
            assert len(kept) == 2, f"cut at {cut}: {len(kept) - 2} of the group's 2 records"
            assert segment.stat().st_size == len(whole), "the original is untouched"
            assert (folder / "segments" / segment.name).stat().st_size == start
            outcomes["none"] = outcomes.get("none", 0) + 1
        # Sequence numbers go on from the records kept, so no sink waits for a lost one.
        expected_seq = before[-1].seq + 1 + (3 if cut == end else 0)
        assert reopened.next_seq == expected_seq, cut
        assert reopened.write(b"[0]", 1).seq == expected_seq
        reopened.close()
    assert outcomes == {"both": 1, "none": end - start}


def test_a_group_goes_in_one_segment_and_refused_whole(tmp_path: Path) -> None:
    record = HEADER_SIZE + 3  # each record below
    spool = Spool(tmp_path, segment_max_bytes=2 * record, max_bytes=HEADER_SIZE * 12)
    spool.write(b"[1]", 1)
    group = spool.write_many([(b"[2]", 1, 0), (b"[3]", 1, 0)])
    assert group[0].start.segment == group[1].start.segment
    # The segment had room for one more record, not two: the group began a new one.
    assert group[0].start == Position(2, 0)
    written = spool.end
    with pytest.raises(SpoolFull, match="cap"):
        spool.write_many([(b"x" * (HEADER_SIZE * 5), 1, 0), (b"y" * (HEADER_SIZE * 5), 1, 0)])
    assert spool.end == written and spool.next_seq == 3  # nothing of it written
    spool.close()


def test_released_segments_can_be_unlinked_later(tmp_path: Path) -> None:
    """release(unlink=False) gives the space back in the books at once and leaves the files for
    unlink_released (the writer runs it on a worker thread: a 64 MB unlink took ~12 ms); a
    file left by a crash in between goes at the next release after the restart."""
    spool = Spool(tmp_path, segment_max_bytes=4096)
    records = [spool.write(b"x" * 1000, 1) for _ in range(20)]
    files = sorted((tmp_path / "segments").glob("*.seg"))
    released = spool.release(records[10].start, unlink=False)
    assert released > 0
    assert sorted((tmp_path / "segments").glob("*.seg")) == files  # nothing unlinked yet
    assert spool.bytes < 20 * (1000 + HEADER_SIZE)
    spool.close()  # a crash before unlink_released
    spool = Spool(tmp_path, segment_max_bytes=4096)
    assert spool.release(records[10].start, unlink=False) == released
    spool.unlink_released()
    left = sorted((tmp_path / "segments").glob("*.seg"))
    assert len(left) == len(files) - released
    assert spool.bytes == sum(p.stat().st_size for p in left)
    assert [r.payload for r in spool.read(records[10].start, 100)] == [b"x" * 1000] * 10
    spool.close()


_NO_DESCRIPTORS = r"""
import json, os, resource, socket, sys
from pathlib import Path
from watchllm_ext.delivery.spool import HEADER_SIZE, Position, Spool, SpoolFull

folder = Path(sys.argv[1])
payloads = [json.dumps([i]).encode() for i in range(6)]
spool = Spool(folder, segment_max_bytes=HEADER_SIZE * 3)
for p in payloads[:2]:
    spool.write(p, 1)
active = os.fstat(spool._fd).st_ino
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
out = {}
sent = 2
try:
    for p in payloads[2:4]:  # the first needs a new segment: no descriptor for it
        spool.write(p, 1)
        sent += 1
except SpoolFull as exc:
    out["refused"] = str(exc)
os.close(held.pop())
sock = socket.socket()  # takes the lowest free number, as a client's connection would
out["still_the_segment"] = os.fstat(spool._fd).st_ino == active
sock.close()
for fd in held:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
for p in payloads[sent:]:  # the refused one again, and the rest
    spool.write(p, 1)
out["read"] = [r.payload.decode() for r in spool.read(Position(1, 0), 100)]
spool.close()
print(json.dumps(out))
"""


def test_no_descriptor_for_a_new_segment_refuses_the_write_and_keeps_the_active_one(
    tmp_path: Path,
) -> None:
    """Out of file descriptors when a segment rolls (a connection flood): the write is
    refused as SpoolFull (503), the active segment's descriptor is kept, not closed for a
    client socket to take its number and receive the next records, and the next write after
    descriptors free up rolls and goes on. In a child process: it lowers its own limit."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _NO_DESCRIPTORS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Too many open files" in out["refused"]
    assert out["still_the_segment"]
    assert out["read"] == [json.dumps([i]) for i in range(6)]
