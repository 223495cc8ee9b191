"""OpenTelemetry: spans in (OTLP) and out, mapped onto the v1 event contract (mapping.py).

`WatchLLMSpanExporter` (exporter.py) is imported on first use: the receiver does not need the
SDK's export machinery loaded."""

from __future__ import annotations

from typing import Any

__all__ = ["WatchLLMSpanExporter"]


def __getattr__(name: str) -> Any:
    if name == "WatchLLMSpanExporter":
        from .exporter import WatchLLMSpanExporter

        return WatchLLMSpanExporter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
