"""The write-ahead spool: accepted events on disk before the client hears 2xx.

Layout, in `<data_dir>/spool/`:

    segments/00000000000000000001.seg   append-only files of records
    cursors/<sink>.json                 each sink's committed position

A record is a 36-byte header and a payload (the JSON of one request's events):

    magic "WLR1" | payload length u32 | crc32 u32 | event count u32 | flags u32
    | sequence of its first event u64 | append time, ms since the epoch u64

The crc covers the header fields after it and the payload. Event sequence numbers run on
across segments and restarts, so a sink's lag in events is the spool's next sequence
minus the sequence at the sink's cursor. Records written together (`write_many`: an OTLP
request's events and spans) go in one write, and each but the last carries the flag
GROUP_CONTINUES: a crash in the middle of that write leaves a group without its last record,
which recovery cuts off like a torn record, so the group is read back whole or not at all.
Positions are (segment id, byte offset). A segment is deleted once every sink's cursor is
past it. Records are written with `os.write` on an unbuffered descriptor, so a process that
is killed right after a write loses nothing (the bytes are in the page cache); `fsync`
policies decide what survives losing the machine:

- `always` (default): a request is answered after an fsync that covers its record. fsyncs are
  shared: requests that arrive while one runs wait for the next, one fsync for all of them
  (group commit), so durability costs little throughput.
- `interval`: answered after the write; fsync every `spool_fsync_interval_s`. A power loss
  can take the last interval's events.
- `never`: the OS writes back when it likes. A power loss can take what it had not written.

At open, every segment is scanned: a record whose checksum fails is cut off if it is the torn
tail of the last segment (a crash mid-write), and so is a group of records whose last one is
missing; elsewhere the scanner resyncs on the next valid record, and the bad bytes go to the
dead-letter folder. Neither stops the start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import anyio
import anyio.lowlevel
import msgspec

from ..store.folders import make_private_folder
from .fsync_process import FsyncFailed, FsyncProcess, HelperGone, supported

log = logging.getLogger("watchllm.spool")

MAGIC = b"WLR1"
HEADER = struct.Struct("<4sIIIIQQ")
_CRC_FROM = 12  # the crc covers the header from byte 12 (count, flags, seq, time) and payload
HEADER_SIZE = HEADER.size
MAX_RECORD_BYTES = 1 << 30
# Record flag: the next record belongs to the same write_many (bits below it are the writer's).
GROUP_CONTINUES = 1 << 31
_READ_STEP = 4 << 20  # bytes read at once when records are read back
FsyncPolicy = Literal["always", "interval", "never"]
_FAILED_SYNC_PAUSE_S = 0.05  # run_group_commit's pause after a failed fsync


class _Round:
    """One fsync of the group commit: what was written before it started (up to `target`) is
    on disk once `done` is set, unless `error` says why not."""

    __slots__ = ("done", "error", "target")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: OSError | None = None
        self.target: Position | None = None

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise OSError(self.error.errno, f"the spool's fsync failed: {self.error}")


class SpoolFull(Exception):
    """No room for this record: the spool is at its size cap, or the disk is full."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Positions and records are made for every request and live until the sinks have them: as
# objects the collector tracks, a second of single events (thousands of records) made the next
# full collection scan a hundred thousand objects (~150 ms with the event loop stopped).
# msgspec structs with gc=False are not tracked (they hold no cycles: ints, bytes, positions).


class Position(msgspec.Struct, frozen=True, order=True, gc=False):
    segment: int
    offset: int

    def as_dict(self) -> dict[str, int]:
        return {"segment": self.segment, "offset": self.offset}


class Record(msgspec.Struct, frozen=True, gc=False):
    start: Position
    end: Position  # position of the next record
    count: int
    seq: int  # sequence number of its first event
    appended_ms: int
    flags: int
    payload: bytes


def encode_record(payload: bytes, count: int, seq: int, appended_ms: int, flags: int = 0) -> bytes:
    return encode_header(payload, count, seq, appended_ms, flags) + payload


_CRC_PART = struct.Struct("<IIQQ")  # the header fields the crc covers (count, flags, seq, time)


def encode_header(payload: bytes, count: int, seq: int, appended_ms: int, flags: int = 0) -> bytes:
    """The 36-byte header of a record (written before its payload, without joining them)."""
    crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(count, flags, seq, appended_ms)))
    return HEADER.pack(MAGIC, len(payload), crc, count, flags, seq, appended_ms)


def decode_header(
    data: bytes | memoryview, offset: int
) -> tuple[bytes, int, int, int, int, int, int]:
    return HEADER.unpack_from(data, offset)


def _crc_ok(data: bytes, offset: int, length: int, crc: int) -> bool:
    start = offset + _CRC_FROM
    header_rest = data[start : offset + HEADER_SIZE]
    payload = data[offset + HEADER_SIZE : offset + HEADER_SIZE + length]
    return zlib.crc32(payload, zlib.crc32(header_rest)) == crc


def _segment_name(segment: int) -> str:
    return f"{segment:020d}.seg"


def scan_segment(data: bytes) -> Iterator[tuple[int, int, int, int, int] | tuple[int, int]]:
    """Yield (offset, end, count, seq, flags) for each good record and (offset, end) for each
    span of bad bytes, resyncing on the next header whose checksum holds."""
    offset = 0
    size = len(data)
    bad_from: int | None = None
    while offset + HEADER_SIZE <= size:
        magic, length, crc, count, flags, seq, _ms = HEADER.unpack_from(data, offset)
        end = offset + HEADER_SIZE + length
        good = magic == MAGIC and length <= MAX_RECORD_BYTES and end <= size
        if good and _crc_ok(data, offset, length, crc):
            if bad_from is not None:
                yield (bad_from, offset)
                bad_from = None
            yield (offset, end, count, seq, flags)
            offset = end
            continue
        if bad_from is None:
            bad_from = offset
        next_magic = data.find(MAGIC, offset + 1)
        offset = next_magic if next_magic != -1 else size
    if bad_from is not None or offset < size:
        yield (bad_from if bad_from is not None else offset, size)


class Spool:
    """Append records, make them durable per the policy, read them back from a position."""

    def __init__(
        self,
        folder: Path,
        *,
        fsync: FsyncPolicy = "always",
        fsync_interval_s: float = 1.0,
        segment_max_bytes: int = 64 * 1024 * 1024,
        max_bytes: int = 1024 * 1024 * 1024,
        fsync_process: bool = False,
    ) -> None:
        self.folder = folder
        self.segments_dir = folder / "segments"
        self.cursors_dir = folder / "cursors"
        self.dead_letter_dir = folder / "dead-letter"
        for d in (self.segments_dir, self.cursors_dir, self.dead_letter_dir):
            make_private_folder(d)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        # run_group_commit's rounds fsync in a helper process (fsync_process.py) when asked
        # and possible; the helper runs from the task's start to close().
        self.fsync_process = fsync_process and supported()
        self._helper: FsyncProcess | None = None
        self.segment_max_bytes = segment_max_bytes
        self.max_bytes = max_bytes
        self.roll_drained_bytes = min(segment_max_bytes, 1 << 20)
        self.disk_full_since_roll = False
        self._roll_failing = False  # release()'s roll failed last time (warned once)
        self.truncated_bytes_total = 0
        self.corrupt_bytes_total = 0
        self.fsyncs_total = 0
        # Why the last fsync failed, until one succeeds (readyz reports it).
        self.sync_error: str | None = None
        self._sizes: dict[int, int] = {}  # segment id -> bytes (closed and active)
        self._total = 0  # sum of _sizes, kept as records are written and segments deleted
        self.next_seq = 0  # sequence number the next event gets
        self._recover()
        self._active = max(self._sizes) if self._sizes else 1
        self._fd = os.open(
            self.segments_dir / _segment_name(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        self._sizes.setdefault(self._active, 0)
        self._total = sum(self._sizes.values())
        self._written = Position(self._active, self._sizes[self._active])
        self._durable = self._written
        self._round: _Round | None = None  # the fsync in flight
        self._next_round = _Round()  # what waits for the next one
        # run_group_commit's wake-up (set: it is running a round), None when it does not run.
        self._committer: anyio.Event | None = None
        self._retired_fds: list[int] = []  # closed by the end of the fsync that uses them
        # Segments closed by a roll and the folder's new entry, not on disk yet: the next
        # fsync (sync_to's worker thread) covers them before it counts anything as durable.
        self._unsynced_fds: list[int] = []
        self._folder_unsynced = False
        # The folder's own descriptor for those fsyncs: no open per sync, and one that still
        # works at close() when the path has gone (a disk unmounted lazily under it, say).
        self._folder_fd = os.open(self.segments_dir, os.O_RDONLY)
        self._released: list[Path] = []  # segment files to unlink (release(unlink=False))
        # Made by the first waiter only: an anyio.Event costs microseconds to make, and a
        # write per request would otherwise make one that nobody waits on.
        self._appended: anyio.Event | None = None
        self._last_sync = time.monotonic()
        fsync_dir(self.segments_dir)

    # --- writing ----------------------------------------------------------------------------

    @property
    def end(self) -> Position:
        return self._written

    @property
    def bytes(self) -> int:
        return self._total

    def write(self, payload: bytes, count: int, flags: int = 0) -> Record:
        """Append one record (not yet fsynced). Raises SpoolFull when there is no room."""
        return self.write_many([(payload, count, flags)])[0]

    def write_many(self, items: Sequence[tuple[bytes, int, int]]) -> list[Record]:
        """Append records, each (payload, event count, flags), in one write, in one segment:
        after a crash they are all read back or none (GROUP_CONTINUES on all but the last).
        Not yet fsynced. Raises SpoolFull, having written nothing, when there is no room."""
        appended_ms = int(time.time() * 1000)
        if any(len(payload) > MAX_RECORD_BYTES for payload, _, _ in items):
            raise ValueError("record too large")
        size = sum(HEADER_SIZE + len(payload) for payload, _, _ in items)
        if self._total + size > self.max_bytes:
            raise SpoolFull(f"the spool holds {self._total} bytes, its cap is {self.max_bytes}")
        if self._sizes[self._active] > 0 and (
            self._sizes[self._active] + size > self.segment_max_bytes
        ):
            self._roll()
        segment, first = self._active, self._sizes[self._active]
        buffers: list[bytes] = []
        records: list[Record] = []
        offset, seq, last = first, self.next_seq, len(items) - 1
        for i, (payload, count, flags) in enumerate(items):
            flags = flags | GROUP_CONTINUES if i < last else flags & ~GROUP_CONTINUES
            buffers += (encode_header(payload, count, seq, appended_ms, flags), payload)
            end = offset + HEADER_SIZE + len(payload)
            records.append(
                Record(
                    Position(segment, offset),
                    Position(segment, end),
                    count,
                    seq,
                    appended_ms,
                    flags,
                    payload,
                )
            )
            offset, seq = end, seq + count
        try:
            # Headers and payloads in one writev: a batch's megabyte is not copied to join them.
            _write_all(self._fd, buffers)
        except OSError as exc:
            self.disk_full_since_roll = True
            # Leave no half record behind: cut the file back to where this write began.
            try:
                os.ftruncate(self._fd, first)
            except OSError:
                log.exception("cannot cut a partial record off segment %d", segment)
            raise SpoolFull(f"cannot write to the spool: {exc.strerror or exc}") from exc
        self._sizes[segment] = offset
        self._total += size
        self._written = Position(segment, offset)
        self.next_seq = seq
        appended, self._appended = self._appended, None
        if appended is not None:
            appended.set()
        return records

    async def append(self, payload: bytes, count: int, flags: int = 0) -> Record:
        """Write a record and return once it is as durable as the policy promises."""
        record = self.write(payload, count, flags)
        await self.wait_durable(record.end)
        return record

    async def wait_durable(self, position: Position) -> None:
        """Return once what was written up to `position` is as durable as the policy promises:
        an fsync covers it (`always`), or at once (`interval`, `never`: the write is all)."""
        if self.fsync == "always":
            await self.sync_to(position)

    def sync_task(self) -> Callable[[], Awaitable[None]] | None:
        """The task the writer runs beside the spool for its policy: the interval's fsyncs
        (`interval`), the group commit's rounds (`always`), none (`never`)."""
        return {"interval": self.run_interval_sync, "always": self.run_group_commit}.get(self.fsync)

    async def run_interval_sync(self) -> None:
        """For the `interval` policy: fsync what was written, every `fsync_interval_s`."""
        while True:
            await anyio.sleep(self.fsync_interval_s)
            if self._durable < self._written:
                await self.sync_to(self._written)

    async def run_group_commit(self) -> None:
        """For the `always` policy: the fsync rounds in one task, the next one started once
        the last one's waiters have had their turn, while anything written is not on disk.
        A request then waits for one round (sync_to). Without it, one that wrote during a
        round waited for that round, woke, and waited again for the round it started, each
        wake-up going through the request's whole stack of coroutines: ~7 us more of the
        event loop a single event, 13% fewer of them a second (bench_request_path.py)."""
        if self.fsync_process and self._helper is None:
            try:
                helper = await anyio.to_thread.run_sync(FsyncProcess.start)
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                log.warning("the fsync helper process did not start (%s): fsyncs run on a"
                            " worker thread", exc)  # fmt: skip
            else:
                if self._helper is None:
                    self._helper = helper
                else:  # another run_group_commit started one meanwhile
                    await anyio.to_thread.run_sync(helper.close)
        try:
            while True:
                if self._durable >= self._written:
                    self._committer = wake = anyio.Event()
                    await wake.wait()
                elif self._round is not None:
                    await self._round.done.wait()  # one a caller ran before this task started
                else:
                    # The round's waiters answer their requests first (a round started at
                    # once held the event loop's thread in its hop to the worker thread).
                    await anyio.lowlevel.checkpoint()
                    if self._round is not None or self._durable >= self._written:
                        continue
                    try:
                        await self._run_round()
                    except OSError:
                        # Its waiters got the error; the next round is tried for those that
                        # came since, after a pause (a failing disk must not spin this loop).
                        log.exception("an fsync of the spool failed")
                        await anyio.sleep(_FAILED_SYNC_PAUSE_S)
        finally:
            self._committer = None
            # Waiting for a round this task will not run: they run it themselves (sync_to).
            waiting, self._next_round = self._next_round, _Round()
            waiting.done.set()

    async def sync_to(self, position: Position) -> None:
        """Wait until an fsync covers `position` (group commit: one fsync serves every
        record written before it started). Raises OSError when that fsync failed."""
        while self._durable < position:
            current = self._round
            if current is not None and position <= current.target:
                await current.wait()  # the round in flight covers it
            elif self._committer is not None:
                self._committer.set()  # run_group_commit's next round covers it
                await self._next_round.wait()
            elif current is not None:
                # Not this write's round (its failure is not this caller's): once it ends,
                # the first caller to wake runs the next one.
                await current.done.wait()
            else:
                await self._run_round()

    async def _run_round(self) -> None:
        """One fsync round, covering what was written before it started."""
        round_, self._next_round = self._next_round, _Round()
        target = round_.target = self._written
        self._round = round_
        fd = self._fd
        closed, self._unsynced_fds = self._unsynced_fds, []
        folder = self._folder_fd if self._folder_unsynced else None
        self._folder_unsynced = False
        try:
            await self._sync(closed, folder, fd)
            self.fsyncs_total += 1
            self._last_sync = time.monotonic()
            self._durable = max(self._durable, target)
            self.sync_error = None
        except OSError as exc:
            round_.error = exc
            self.sync_error = f"the spool's fsync failed: {exc.strerror or exc}"
            raise
        finally:
            if self._durable < target:  # it failed: what it did not cover, the next one will
                self._unsynced_fds[:0] = closed
                self._folder_unsynced = self._folder_unsynced or folder is not None
            self._round = None
            while self._retired_fds:
                os.close(self._retired_fds.pop())
            round_.done.set()

    async def _sync(self, closed: list[int], folder: int | None, fd: int) -> None:
        """_sync_files, in the helper process when it runs, else on a worker thread."""
        helper = self._helper
        if helper is not None:
            try:
                await helper.fsync([*closed, *([folder] if folder is not None else []), fd])
            except FsyncFailed as exc:
                synced = min(exc.index, len(closed))  # closed first: those before it are done
                for done in closed[:synced]:
                    os.close(done)
                del closed[:synced]
                raise
            except HelperGone as exc:
                # Whatever it did of this request is done again on the thread. (An fsync
                # that failed in it just before it died has had its error taken by the
                # kernel: the thread's may then succeed, as any retried fsync may.)
                log.warning("the fsync helper process is gone (%s): fsyncs run on a worker"
                            " thread from now on", exc)  # fmt: skip
                self._helper = None
                await anyio.to_thread.run_sync(helper.close)
            else:
                while closed:
                    os.close(closed.pop())
                return
        await anyio.to_thread.run_sync(self._sync_files, closed, folder, fd)

    async def wait_appended(self) -> None:
        if self._appended is None:
            self._appended = anyio.Event()
        await self._appended.wait()

    @staticmethod
    def _sync_files(closed: list[int], folder: int | None, fd: int) -> None:
        """(On a worker thread.) fsync the segments a roll closed (closing each once it is on
        disk; one that fails stays in `closed`), the folder's new entries, then `fd`."""
        while closed:
            os.fsync(closed[0])
            os.close(closed.pop(0))
        if folder is not None:
            os.fsync(folder)
        os.fsync(fd)

    def _roll(self) -> None:
        """Start the next segment. The closed one's tail and the new file's name reach the disk
        with the next fsync, on sync_to's worker thread, before any record after them counts
        as durable: fsynced here, on the event loop, they stalled every request (a folder's
        fsync waits for the file system's journal: 0.25 ms typically, over 20 ms at times).

        SpoolFull, with nothing changed, when the new file cannot be made (no descriptor
        left, no space for its entry): the current one stays the active segment. Its
        descriptor must stay open until the swap: closed first, its number could be given to
        the next socket or file the process opens, which the next write would then write to."""
        segment = self._active + 1
        try:
            fd = os.open(
                self.segments_dir / _segment_name(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND
            )
        except OSError as exc:
            raise SpoolFull(f"cannot start a new spool segment: {exc.strerror or exc}") from exc
        if self.fsync == "never" or self._durable >= self._written:
            # On disk already (or never to be fsynced: the OS writes it back when it likes):
            # closed now, so that deleting it (a release once sinks pass it) frees its space.
            if self._round is not None:
                self._retired_fds.append(self._fd)  # an fsync in a thread still uses it
            else:
                os.close(self._fd)
        else:
            self._unsynced_fds.append(self._fd)  # a request waits for it: a sync comes soon
        self._folder_unsynced = self.fsync != "never"
        self._active = segment
        self._sizes[segment] = 0
        self._fd = fd
        self._written = Position(segment, 0)
        self.disk_full_since_roll = False

    def close(self) -> None:
        while self._retired_fds:
            os.close(self._retired_fds.pop())
        if self._fd >= 0:
            folder = self._folder_fd if self._folder_unsynced else None
            self._sync_files(self._unsynced_fds, folder, self._fd)
            self._folder_unsynced = False
            os.close(self._fd)
            os.close(self._folder_fd)
            self._fd = -1
            self._durable = self._written
        if self._helper is not None:
            self._helper.close()
            self._helper = None

    # --- reading ----------------------------------------------------------------------------

    def first_position(self) -> tuple[Position, int]:
        """The position and event sequence of the oldest record still in the spool."""
        for segment in sorted(self._sizes):
            if self._sizes[segment] >= HEADER_SIZE:
                with open(self.segments_dir / _segment_name(segment), "rb") as f:
                    seq = HEADER.unpack(f.read(HEADER_SIZE))[5]
                return Position(segment, 0), seq
        return Position(self._active, self._sizes.get(self._active, 0)), self.next_seq

    def read(self, start: Position, max_events: int, max_bytes: int = 64 << 20) -> list[Record]:
        """Records from `start` on, up to `max_events` events or `max_bytes` of payload (and
        at least one record, if there is one)."""
        records: list[Record] = []
        events = 0
        size = 0
        # Called from a worker thread while the loop appends: work on a snapshot of the keys.
        for segment in sorted(s for s in list(self._sizes) if s >= start.segment):
            offset = start.offset if segment == start.segment else 0
            limit = self._sizes.get(segment, 0)
            if offset >= limit:
                continue
            with open(self.segments_dir / _segment_name(segment), "rb") as f:
                # Read in steps of up to _READ_STEP, records cut from the buffer: a read
                # call per record cost more than the rest for thousands of single events.
                f.seek(offset)
                buf = b""
                base = offset  # the file offset of buf[0]; f is at base + len(buf)
                while offset + HEADER_SIZE <= limit:
                    at = offset - base
                    if at + HEADER_SIZE > len(buf):
                        buf = buf[at:] + f.read(min(limit - base - len(buf), _READ_STEP))
                        base, at = offset, 0
                    magic, length, _crc, count, flags, seq, ms = HEADER.unpack_from(buf, at)
                    end = offset + HEADER_SIZE + length
                    if magic != MAGIC or end > limit:
                        raise RuntimeError(f"spool segment {segment} is damaged at {offset}")
                    if end - base > len(buf):  # the payload goes on past the buffer
                        more = max(end - base - len(buf), _READ_STEP)
                        buf = buf[at:] + f.read(min(limit - base - len(buf), more))
                        base, at = offset, 0
                    payload = buf[at + HEADER_SIZE : at + HEADER_SIZE + length]
                    records.append(
                        Record(
                            Position(segment, offset),
                            Position(segment, end),
                            count,
                            seq,
                            ms,
                            flags,
                            payload,
                        )
                    )
                    offset = end
                    events += count
                    size += length
                    if events >= max_events or size >= max_bytes:
                        return records
        return records

    # --- cursors ----------------------------------------------------------------------------

    def load_cursor(self, sink: str) -> tuple[Position, int]:
        """A sink's committed (position, event sequence); the spool's start for a new sink."""
        path = self.cursors_dir / f"{_safe(sink)}.json"
        try:
            data = json.loads(path.read_text())
            position = Position(int(data["segment"]), int(data["offset"]))
            seq = int(data["seq"])
        except FileNotFoundError:
            return self.first_position()
        except (ValueError, KeyError, TypeError) as exc:
            log.error("cursor of sink %s is unreadable (%s); replaying the whole spool", sink, exc)
            return self.first_position()
        first, first_seq = self.first_position()
        if position < first:  # its segments are gone (deleted by hand?): start at the oldest
            return first, first_seq
        return position, seq

    def save_cursor(self, sink: str, position: Position, seq: int) -> None:
        path = self.cursors_dir / f"{_safe(sink)}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({**position.as_dict(), "seq": seq}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def release(self, slowest: Position, unlink: bool = True) -> int:
        """Delete segments every sink has passed. Returns how many were deleted.

        When every sink has caught up, a large active segment (or any, after the disk was
        full) is closed so that it can go too: otherwise a spool that never reaches
        `segment_max_bytes` would never give its space back.

        With `unlink=False` the files are only listed, for `unlink_released` to remove on a
        worker thread: unlinking a 64 MB segment took ~12 ms, on the event loop that stalled
        every request. A crash before that leaves a file the next release deletes.
        """
        passed_below = slowest.segment
        if slowest.segment != self._active and slowest.offset >= self._sizes.get(
            slowest.segment, 0
        ):
            passed_below = slowest.segment + 1  # at the very end of a closed segment
        active_size = self._sizes[self._active]
        drained = slowest >= self._written
        if (
            drained
            and active_size > 0
            and (active_size >= self.roll_drained_bytes or self.disk_full_since_roll)
        ):
            try:
                self._roll()
                passed_below = self._active
                self._roll_failing = False
            except SpoolFull as exc:  # the next release tries again; said once a spell
                if not self._roll_failing:
                    log.warning("%s; the drained segment %d stays for now", exc, self._active)
                self._roll_failing = True
        deleted = 0
        for segment in sorted(self._sizes):
            if segment >= passed_below or segment == self._active:
                break
            self._released.append(self.segments_dir / _segment_name(segment))
            self._total -= self._sizes.pop(segment)
            deleted += 1
        if unlink:
            self.unlink_released()
        return deleted

    def unlink_released(self) -> None:
        """Remove the files of released segments (any thread: list.pop is atomic)."""
        while self._released:
            with contextlib.suppress(FileNotFoundError):
                self._released.pop().unlink()

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        segments = sorted(int(p.stem) for p in self.segments_dir.glob("*.seg") if p.stem.isdigit())
        for index, segment in enumerate(segments):
            path = self.segments_dir / _segment_name(segment)
            data = path.read_bytes()
            last = index == len(segments) - 1
            good: list[tuple[int, ...]] = []
            spans = []
            for item in scan_segment(data):
                (good if len(item) == 5 else spans).append(item)
            # A group whose last record is missing (a crash during write_many) goes with the
            # torn tail: a group is read back whole or not at all.
            complete = len(good)
            while complete and good[complete - 1][4] & GROUP_CONTINUES:
                complete -= 1
            del good[complete:]
            good_end = good[-1][1] if good else 0
            for _offset, _end, count, seq, _flags in good:
                self.next_seq = max(self.next_seq, seq + count)
            corrupt = [s for s in spans if s[0] < good_end]  # the rest is the torn tail
            for bad_start, bad_end in corrupt:
                self._quarantine(segment, data[bad_start:bad_end], bad_start)
                self.corrupt_bytes_total += bad_end - bad_start
                log.error(
                    "spool segment %d: %d corrupt bytes at offset %d moved to dead-letter; "
                    "the records around them are kept",
                    segment,
                    bad_end - bad_start,
                    bad_start,
                )
            if corrupt:
                # Rewrite the segment with the good records only, so offsets stay parseable.
                kept = b"".join(data[item[0] : item[1]] for item in good)
                _atomic_write(path, kept)
                good_end = len(kept)
                data = kept
            if good_end < len(data):  # a torn record, or a group without its end
                cut = len(data) - good_end
                if not last:
                    self._quarantine(segment, data[good_end:], good_end)
                self.truncated_bytes_total += cut
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
                log.warning(
                    "spool segment %d: cut %d bytes of a torn record (or of a group of records"
                    " without its last one) at offset %d (a crash during a write); the records"
                    " before it are kept",
                    segment,
                    cut,
                    good_end,
                )
            self._sizes[segment] = good_end
        # Sequence numbers never go back, even when every record has been delivered and
        # deleted: cursors remember where they were.
        for cursor in self.cursors_dir.glob("*.json"):
            try:
                self.next_seq = max(self.next_seq, int(json.loads(cursor.read_text())["seq"]))
            except (ValueError, KeyError, TypeError, OSError):
                continue

    def _quarantine(self, segment: int, data: bytes, offset: int) -> None:
        path = self.dead_letter_dir / f"corrupt-{segment:020d}-{offset}.bin"
        path.write_bytes(data)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    written = os.writev(fd, buffers)
    if written == sum(len(b) for b in buffers):
        return
    view = memoryview(b"".join(buffers))[written:]  # a short write (a full disk, a signal)
    while view:
        view = view[os.write(fd, view) :]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".rewrite")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
