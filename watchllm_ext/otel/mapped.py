"""Spans mapped by the rules (mapping.py), before their events are validated.

This is the part of a request's work that needs no plugin and no state, so it runs on a worker
thread or in a worker process (worker.py) alike; ingest.py validates the events, runs the hooks
and spools."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .decode import Refusals
from .mapping import Span, map_span
from .rows import SpanRow


@dataclass(slots=True)
class MappedSpans(Refusals):
    """Spans mapped by the rules (mapping.py), before their events are validated: the part of
    a request's work that needs no plugin, so it can run in a worker process (worker.py)."""

    rows: list[SpanRow] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # the LLM spans' events
    event_rows: list[int] = field(default_factory=list)  # the row index of each event
    names: list[str] = field(default_factory=list)  # each event's span, to name a refusal
    unmapped: Counter[str] = field(default_factory=Counter)  # attribute key -> spans
    built: bool = True  # every event built by the mapping's rules (none forwarded)


def map_spans(
    spans: Sequence[Span],
    project: str,
    received: datetime,
    rejected: int = 0,
    problems: Sequence[str] = (),
) -> MappedSpans:
    """Each span's row and event (CPU only, no plugin); a span no rule can read is refused."""
    out = MappedSpans(rejected=rejected, problems=list(problems))
    unmapped: list[str] = []
    for span in spans:
        try:
            mapped = map_span(span, project, received)
            row = mapped.row
        except Exception as exc:  # a rule that cannot read this span must not lose the rest
            out.reject(_name(span), f"cannot be mapped: {type(exc).__name__}: {exc}")
            continue
        if mapped.event is not None:
            out.event_rows.append(len(out.rows))
            out.events.append(mapped.event)
            out.names.append(_name(span))
            unmapped.extend(mapped.unmapped)
            out.built = out.built and not mapped.forwarded
        out.rows.append(row)
    # Counted here, off the event loop (Counter counts in C: a batch repeats a few keys
    # thousands of times); the loop only updates the metric once a key.
    out.unmapped = Counter(unmapped)
    return out


def _name(span: Span) -> str:
    return f"span {span.span_id} ({span.name[:80]!r})"
