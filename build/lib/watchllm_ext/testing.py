"""Test helpers for plugin authors, loaded by pytest through the `pytest11` entry point.

Fixtures: `watchllm_settings` (Settings on a temp data folder, fast flushes) and
`memory_sink` (a MemorySink to pass as a plugin: it keeps every batch it is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


class MemorySink:
    """A sink that keeps what it receives; register it with `create_app(plugins=[sink])`."""

    name = "memory"

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    @property
    def events(self) -> list[Any]:
        return [event for batch in self.batches for event in batch]

    async def write(self, events: Sequence[Any]) -> None:
        self.batches.append(list(events))

    # Being its own plugin keeps registration to one line.
    def register_sinks(self, settings: Any, store: Any) -> MemorySink:
        return self


def _mark_hookimpl(cls: type) -> None:
    from .hookspecs import hookimpl

    cls.register_sinks = hookimpl(cls.register_sinks)  # type: ignore[method-assign]


_mark_hookimpl(MemorySink)


@pytest.fixture
def watchllm_settings(tmp_path: Path) -> Any:
    from .settings import Settings

    return Settings(data_dir=tmp_path / "watchllm", flush_interval_s=0.05, create_default_key=False)


@pytest.fixture
def memory_sink() -> MemorySink:
    return MemorySink()
