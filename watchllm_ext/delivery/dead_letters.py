"""Dead letters: batches a sink refused for good, kept with the reason, and replayable.

Each sink has `<spool>/dead-letter/<sink>.jsonl`, one entry a line: when, which sink, why,
and the events. Each entry is one `write` of a whole line ending in a newline, flushed and
fsynced, so a crash can only leave the *last* line torn (cut short, without its newline).
Readers skip a torn or unreadable line and count it as `torn_records` instead of failing;
the next append first truncates an unterminated tail away, so a new entry never glues onto
half of an old one. See docs/DURABILITY.md.

Replaying moves a sink's file aside and puts its events back into the spool as records for
that sink only (the other sinks already have them). A replay limited to one project takes
only that project's events; the rest of each entry goes back into the live file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .spool import fsync_dir

log = logging.getLogger("watchllm.dead_letters")

_TAIL_CHUNK = 64 * 1024


@dataclass
class DeadLetter:
    sink: str
    at: str
    reason: str
    events: list[Any]
    raw: str | None = None  # a record that could not be decoded: kept as text, no events
    kind: str = "events"  # or "spans": OpenTelemetry span rows (otel/rows.py) in `events`

    def for_project(self, project_id: str | None) -> DeadLetter:
        """This entry narrowed to one project's events (None: all of them)."""
        if project_id is None:
            return self
        return replace(self, events=[e for e in self.events if _project_of(e) == project_id])

    def without_project(self, project_id: str) -> DeadLetter:
        return replace(self, events=[e for e in self.events if _project_of(e) != project_id])

    def as_record(self) -> dict[str, Any]:
        record = {
            "at": self.at,
            "sink": self.sink,
            "reason": self.reason,
            "events": self.events if self.raw is None else None,
            "raw": self.raw,
        }
        if self.kind != "events":
            record["kind"] = self.kind
        return record


@dataclass
class Found:
    """What a read of the dead-letter files found."""

    entries: list[DeadLetter] = field(default_factory=list)
    torn_records: int = 0  # lines skipped: cut short by a crash, or not readable


@dataclass
class Taken:
    """What `take_dead_letters` moved aside for a replay."""

    entries: list[DeadLetter] = field(default_factory=list)
    origins: list[Path] = field(default_factory=list)  # each entry's live file
    moved: list[Path] = field(default_factory=list)
    torn_records: int = 0
    unknown_sinks: list[str] = field(default_factory=list)  # left in place, not replayed


def _project_of(event: Any) -> str | None:
    return event.get("project_id") if isinstance(event, dict) else None


def _visible(entry: DeadLetter, sink: str | None, project: str | None) -> bool:
    if sink is not None and entry.sink != sink:
        return False
    if project is None:
        return True
    # A raw record has no readable project: only an instance-wide view shows it.
    return entry.raw is None and any(_project_of(e) == project for e in entry.events)


# --- reading ------------------------------------------------------------------------------------


def parse_dead_letters(data: bytes) -> Found:
    """The entries of one file's bytes; torn or unreadable lines are counted, not raised."""
    found = Found()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was cut short
    if tail.strip():
        found.torn_records += 1
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            events = record.get("events")
            raw = record.get("raw")
            entry = DeadLetter(
                str(record["sink"]),
                str(record["at"]),
                str(record["reason"]),
                events if isinstance(events, list) else [],
                raw if isinstance(raw, str) else None,
                "spans" if record.get("kind") == "spans" else "events",
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            found.torn_records += 1
            continue
        found.entries.append(entry)
    return found


def read_dead_letters_file(path: Path) -> Found:
    try:
        return parse_dead_letters(path.read_bytes())
    except FileNotFoundError:  # moved aside by a replay meanwhile
        return Found()


def read_dead_letters(folder: Path, sink: str | None = None, project: str | None = None) -> Found:
    """Every entry of `sink` (None: all sinks), narrowed to `project`'s events (None: all)."""
    found = Found()
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.jsonl")):
        one = read_dead_letters_file(path)
        found.torn_records += one.torn_records
        found.entries.extend(
            e.for_project(project) for e in one.entries if _visible(e, sink, project)
        )
    return found


# --- writing ------------------------------------------------------------------------------------


def append_dead_letter(path: Path, entry: DeadLetter) -> None:
    """Append one entry as one line, durably. A torn tail left by a crash is cut off first."""
    line = json.dumps(entry.as_record()).encode() + b"\n"
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        keep = _complete_length(fd, size)
        if keep < size:
            log.warning(
                "%s ended in a torn record (%d bytes, from a crash); cut it off", path, size - keep
            )
            os.ftruncate(fd, keep)
        os.lseek(fd, keep, os.SEEK_SET)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def _complete_length(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return size
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def dead_letter(
    sink: str, reason: str, events: list[Any] | None, raw: str | None, kind: str = "events"
) -> DeadLetter:
    return DeadLetter(sink, datetime.now(UTC).isoformat(), reason, events or [], raw, kind)


# --- replaying ----------------------------------------------------------------------------------


def take_dead_letters(
    folder: Path,
    sink: str | None = None,
    project: str | None = None,
    sinks: set[str] | None = None,
) -> Taken:
    """Move aside the files holding entries to replay (so new dead letters start a new file)
    and return those entries, narrowed to `project`. Whatever is not taken (other projects'
    events, other sinks' entries, entries of sinks not in `sinks`, raw records when a project
    is named) goes back into the live file. Call `done` on `moved` once the events are
    re-spooled; until then the moved file still holds everything."""
    taken = Taken()
    if not folder.is_dir():
        return taken
    unknown: set[str] = set()
    for path in sorted(folder.glob("*.jsonl")):
        found = read_dead_letters_file(path)
        if not any(_replayable(e, sink, project, sinks) for e in found.entries):
            taken.torn_records += found.torn_records
            unknown.update(e.sink for e in found.entries if _unknown(e, sink, project, sinks))
            continue
        target = path.with_name(f"{path.stem}.replaying-{time.time_ns()}")
        path.rename(target)
        found = read_dead_letters_file(target)  # what it holds now, appends included
        taken.torn_records += found.torn_records
        for entry in found.entries:
            if _replayable(entry, sink, project, sinks):
                taken.entries.append(entry.for_project(project))
                taken.origins.append(path)
                rest = entry.without_project(project) if project is not None else None
                if rest is not None and rest.events:
                    append_dead_letter(path, rest)
            else:
                if _unknown(entry, sink, project, sinks):
                    unknown.add(entry.sink)
                append_dead_letter(path, entry)
        taken.moved.append(target)
    taken.unknown_sinks = sorted(unknown)
    return taken


def _replayable(
    entry: DeadLetter, sink: str | None, project: str | None, sinks: set[str] | None
) -> bool:
    # A raw record holds no events to put back: it stays listed until someone reads it.
    return (
        entry.raw is None
        and _visible(entry, sink, project)
        and (sinks is None or entry.sink in sinks)
    )


def _unknown(
    entry: DeadLetter, sink: str | None, project: str | None, sinks: set[str] | None
) -> bool:
    return _visible(entry, sink, project) and sinks is not None and entry.sink not in sinks


def done(moved: list[Path]) -> None:
    for path in moved:
        path.rename(path.with_name(path.name.replace(".replaying-", ".replayed-")))


def put_back(taken: Taken, start: int) -> None:
    """A replay that stopped at entry `start` (the spool refused it): that entry and the ones
    after it go back into their live files, to be listed and replayed again, and the moved
    files are done (what they held is now in the spool or back in place)."""
    for entry, origin in zip(taken.entries[start:], taken.origins[start:], strict=True):
        append_dead_letter(origin, entry)
    done(taken.moved)


def targeted_payload(sink: str, events: list[Any], kind: str = "events") -> bytes:
    return json.dumps({"sink": sink, "spans" if kind == "spans" else "events": events}).encode()


def summary(entries: list[DeadLetter]) -> list[dict[str, Any]]:
    return [
        {"sink": e.sink, "at": e.at, "reason": e.reason, "events": len(e.events), "kind": e.kind}
        for e in entries
    ]
