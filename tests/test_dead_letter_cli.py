"""`watchllm dead-letter replay` without --url: the dead letters of a stopped server go back
into its spool (real spool, real files, the CLI in a subprocess), spans as spans, and a spool
that cannot take them all keeps the rest for the next replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import prompt_call

from watchllm_ext.delivery.dead_letters import DeadLetter, append_dead_letter, read_dead_letters
from watchllm_ext.delivery.spool import Spool
from watchllm_ext.delivery.writer import SPANS, TARGETED

AT = "2026-01-02T03:04:05+00:00"


def _replay(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", "dead-letter", "replay", "--data-dir",
         str(data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **env},
    )  # fmt: skip


def _records(data_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    spool = Spool(data_dir / "spool")
    try:
        start, _ = spool.first_position()
        return [(r.flags, json.loads(r.payload)) for r in spool.read(start, 10_000)]
    finally:
        spool.close()


def test_spans_are_replayed_as_spans(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / "dead-letter"
    folder.mkdir(parents=True)
    rows = [{"span_id": "a1", "trace_id": "t1", "project_id": "acme"}]
    append_dead_letter(folder / "otlp-export.jsonl", DeadLetter("otlp-export", AT, "401", rows,
                                                                 kind="spans"))  # fmt: skip
    append_dead_letter(folder / "picky.jsonl", DeadLetter("picky", AT, "no", [prompt_call("e1")]))

    done = _replay(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "replayed 2 events from 2 dead letters" in done.stdout
    records = sorted(_records(tmp_path), key=lambda r: r[1]["sink"])
    assert records[0] == (TARGETED | SPANS, {"sink": "otlp-export", "spans": rows})
    assert records[1][0] == TARGETED and records[1][1]["sink"] == "picky"
    assert [e["event_id"] for e in records[1][1]["events"]] == ["e1"]
    assert read_dead_letters(folder).entries == []


def test_a_full_spool_keeps_the_rest_for_the_next_replay(tmp_path: Path) -> None:
    folder = tmp_path / "spool" / "dead-letter"
    folder.mkdir(parents=True)
    big = "x" * 2000
    for name in ("first", "second"):
        events = [prompt_call(f"{name}-{i}", prompt=big) for i in range(20)]
        append_dead_letter(folder / "picky.jsonl", DeadLetter("picky", AT, "no", events))

    done = _replay(tmp_path, WATCHLLM_SPOOL_MAX_BYTES=str(64 * 1024))
    assert done.returncode != 0
    assert "the spool is full" in done.stderr and "replayed 20 events first" in done.stderr
    kept = read_dead_letters(folder).entries
    assert [e.events[0]["event_id"] for e in kept] == ["second-0"]
    assert [r[1]["events"][0]["event_id"] for r in _records(tmp_path)] == ["first-0"]


def test_a_sink_with_no_dead_letters_is_refused_naming_those_that_have_some(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "spool" / "dead-letter"
    folder.mkdir(parents=True)
    append_dead_letter(folder / "picky.jsonl", DeadLetter("picky", AT, "no", [prompt_call("e1")]))
    done = subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", "dead-letter", "replay", "--data-dir",
         str(tmp_path), "--sink", "nosuch"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert done.stderr == (
        "error: no dead letters for sink 'nosuch'; sinks with dead letters: picky\n"
    )
    assert len(read_dead_letters(folder).entries) == 1  # nothing moved


def test_a_data_folder_that_is_not_there_is_said_not_listed_empty(tmp_path: Path) -> None:
    """`dead-letter list --data-dir <a typo>` answered "0 events in 0 dead letters" and exit
    0 (replay, likewise, made the folder); the other local commands say there is no store."""
    missing = tmp_path / "nope"
    for action in ("list", "replay"):
        done = subprocess.run(
            [sys.executable, "-m", "watchllm_ext.cli", "dead-letter", action, "--data-dir",
             str(missing)],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
        assert done.returncode == 1, (action, done.stdout)
        assert done.stderr.startswith(f"error: no data folder {missing}"), done.stderr
        assert not missing.exists()
