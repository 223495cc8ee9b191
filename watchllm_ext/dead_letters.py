"""Dead letters: batches a sink refused for good, kept with the reason, and replayable.

Each sink has `<spool>/dead-letter/<sink>.jsonl`, one entry a line: when, which sink, why,
and the events. Replaying moves a sink's file aside and puts its events back into the spool
as records for that sink only (the other sinks already have them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DeadLetter:
    sink: str
    at: str
    reason: str
    events: list[Any]


def read_dead_letters(folder: Path, sink: str | None = None) -> list[DeadLetter]:
    entries = []
    for path in sorted(folder.glob("*.jsonl")):
        entries.extend(e for e in read_dead_letters_file(path) if sink is None or e.sink == sink)
    return entries


def take_dead_letters(folder: Path, sink: str | None = None) -> tuple[list[DeadLetter], list[Path]]:
    """Move the sinks' files aside (so new dead letters start a new file) and return their
    entries with the moved paths; call `done` on the paths once the events are re-spooled."""
    taken: list[DeadLetter] = []
    moved: list[Path] = []
    for path in sorted(folder.glob("*.jsonl")):
        entries = read_dead_letters_file(path)
        if sink is not None and not any(e.sink == sink for e in entries):
            continue
        target = path.with_name(f"{path.stem}.replaying-{time.time_ns()}")
        path.rename(target)
        moved.append(target)
        taken.extend(read_dead_letters_file(target))
    return taken, moved


def read_dead_letters_file(path: Path) -> list[DeadLetter]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            out.append(
                DeadLetter(data["sink"], data["at"], data["reason"], data.get("events") or [])
            )
    return out


def done(moved: list[Path]) -> None:
    for path in moved:
        path.rename(path.with_name(path.name.replace(".replaying-", ".replayed-")))


def targeted_payload(sink: str, events: list[Any]) -> bytes:
    return json.dumps({"sink": sink, "events": events}).encode()


def summary(entries: list[DeadLetter]) -> list[dict[str, Any]]:
    return [
        {"sink": e.sink, "at": e.at, "reason": e.reason, "events": len(e.events)} for e in entries
    ]
