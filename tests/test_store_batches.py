"""The store sink's inserts are sized for ClickHouse (setting store_insert_max_events): the
writer gives it batches of up to that many events, or what flush_interval_s gathered, while
the other sinks keep flush_max_events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from watchllm_ext.builtins.store_sink import StoreSink, register_sinks
from watchllm_ext.delivery.writer import MemoryLog, Writer
from watchllm_ext.settings import Settings


class Recording:
    def __init__(self, name: str, max_batch_events: int | None = None) -> None:
        self.name = name
        self.max_batch_events = max_batch_events
        self.batches: list[list[Any]] = []

    async def write(self, events: Sequence[Any]) -> None:
        self.batches.append(list(events))


def _writer(sinks: list[Any], **kw: Any) -> Writer:
    return Writer(
        sinks,
        MemoryLog(100_000),
        encode=lambda events: json.dumps(list(events)).encode(),
        decode=json.loads,
        **kw,
    )


def test_the_store_sink_gets_batches_of_its_own_size() -> None:
    async def run() -> None:
        store_like = Recording("store", max_batch_events=50)
        other = Recording("other")
        async with _writer([store_like, other], flush_max_events=10, flush_interval_s=1.0) as w:
            for start in range(0, 120, 5):  # 24 requests of 5 events
                await w.submit(list(range(start, start + 5)))
            await anyio.sleep(0.1)
            # Whole batches of 50 at once; the other sink takes flush_max_events.
            assert [len(b) for b in store_like.batches] == [50, 50]
            assert other.batches and all(len(b) <= 10 for b in other.batches)
            await anyio.sleep(1.5)
            # The rest when flush_interval_s has passed.
            assert [len(b) for b in store_like.batches] == [50, 50, 20]
            assert [e for b in store_like.batches for e in b] == list(range(120))
            assert [e for b in other.batches for e in b] == list(range(120))

    anyio.run(run)


@pytest.mark.parametrize("value", [1_000, 50_000, 1_000_000])
def test_the_setting_sizes_the_registered_sink(tmp_path: Path, value: int) -> None:
    settings = Settings(data_dir=tmp_path, store_insert_max_events=value)
    sink = register_sinks(settings, store=_NoStore())  # type: ignore[arg-type]
    assert isinstance(sink, StoreSink) and sink.max_batch_events == value
    assert Settings(data_dir=tmp_path).store_insert_max_events == 50_000


@pytest.mark.parametrize("value", [0, 1_000_001])
def test_the_setting_is_bounded(tmp_path: Path, value: int) -> None:
    with pytest.raises(ValueError, match="store_insert_max_events"):
        Settings(data_dir=tmp_path, store_insert_max_events=value)


class _NoStore:
    name = "none"
