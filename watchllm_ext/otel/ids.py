"""The ids and times a span must have to be stored, shared by the receiver, the in-process
exporter, the mapping, the exporter sink and the run tree.

Event ids. OTLP span ids are unique only within their trace, so the event an LLM span becomes
is named by both: `<trace id hex>-<span id hex>` (32 + 1 + 16 characters, within the
contract's id pattern), and its parent likewise. A span id alone would make an LLM span of one
trace a copy of another trace's span with the same id, or of a JSON event with that id, and
its event would be dropped as a duplicate (mapping version 3; before it, event id = span id).

Times. A span is refused (named in the answer's partial_success) unless its start and end are
set, its start within the JSON events' timestamp range (schema.MIN_TIMESTAMP to
MAX_TIMESTAMP), its end not before its start, and its duration at most an event's latency_ms
maximum: a stored span never has times other than those sent. The end may pass 2100 by as
much as a JSON event's timestamp + latency_ms may (under 30 days), so that every valid event
the exporter sink sends as a span (end = timestamp + latency) comes back.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from ..schema import MAX_LATENCY_MS, MAX_TIMESTAMP, MIN_TIMESTAMP

SPAN_HEX = 16  # digits of a span id
TRACE_HEX = 32  # digits of a trace id
_COMPOSITE = re.compile(r"([0-9a-f]{32})-([0-9a-f]{16})")


def event_id_of(trace_hex: str, span_hex: str) -> str:
    """The event id of the span `span_hex` of trace `trace_hex` (both lowercase hex)."""
    return f"{trace_hex}-{span_hex}"


def span_part(event_id: str, trace_hex: str) -> str | None:
    """The span id an event id names within trace `trace_hex`, or None when the id is not
    `<trace_hex>-<span id>` (an id a JSON event chose, or one of another trace)."""
    match = _COMPOSITE.fullmatch(event_id)
    if match is None or match.group(1) != trace_hex:
        return None
    return match.group(2)


# --- times ---------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Unix nanoseconds of the events' range: [MIN_NS, MAX_NS). 0 is OTLP's "not set" (proto3's
# default), so a set time is at least 1 ns even though the range starts at the epoch.
MIN_NS = int((MIN_TIMESTAMP - _EPOCH).total_seconds()) * 10**9 + 1
MAX_NS = int((MAX_TIMESTAMP - _EPOCH).total_seconds()) * 10**9
MAX_DURATION_NS = int(MAX_LATENCY_MS) * 10**6


def times_ok(start_ns: int, end_ns: int) -> bool:
    """Whether a span's times can be stored as sent (the usual case: two compares)."""
    return MIN_NS <= start_ns < MAX_NS and start_ns <= end_ns <= start_ns + MAX_DURATION_NS


def time_problem(start_ns: int, end_ns: int) -> str | None:
    """What is wrong with a span's times, naming the OTLP field, or None if nothing is."""
    if start_ns < MIN_NS:
        return "startTimeUnixNano is not set (0): a span needs its start time"
    if end_ns < MIN_NS:
        return (
            "endTimeUnixNano is not set (0): a span is sent once it has ended (an unfinished"
            " span stored now would make its finished copy a duplicate)"
        )
    if start_ns >= MAX_NS:
        return f"startTimeUnixNano {start_ns} is not before {_ISO_MAX} (events' range)"
    if end_ns < start_ns:
        return f"endTimeUnixNano is {start_ns - end_ns} ns before startTimeUnixNano"
    if end_ns - start_ns > MAX_DURATION_NS:
        return (
            f"the span lasts {(end_ns - start_ns) / 1e6:.0f} ms (endTimeUnixNano -"
            f" startTimeUnixNano), over the longest latency_ms an event may have"
            f" ({MAX_LATENCY_MS:.0f} ms, 30 days)"
        )
    return None


_ISO_MAX = MAX_TIMESTAMP.isoformat().replace("+00:00", "Z")
