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

# `/metrics` counts the attributes no rule read (watchllm_otel_unmapped_attributes) by the
# namespace of their key, from this fixed list of public conventions' (OpenTelemetry's
# GenAI and general ones, OpenInference, OpenLLMetry, Langfuse, Logfire, the Vercel AI SDK,
# MLflow), never by the key itself: /metrics needs no key and is the server's, not a
# project's, so a key there showed every project's attribute names to anyone, carried any
# text a tenant put in a key, and let one fill the 1,000 label values so that the others'
# keys counted as "(other)". A project's own keys are in its events' metadata, behind its key.
UNMAPPED_NAMESPACES = frozenset(
    {
        # OpenTelemetry's GenAI conventions, and general ones an LLM span often carries
        *("gen_ai", "server", "http", "url", "error", "exception", "code", "db", "rpc"),
        *("messaging", "network", "thread", "user", "enduser", "session", "service"),
        *("deployment", "telemetry", "host", "process", "cloud", "k8s", "container", "otel"),
        # OpenInference
        *("openinference", "llm", "input", "output", "embedding", "retrieval", "reranker"),
        *("tool", "tool_call", "document", "message", "metadata", "tag", "agent", "graph"),
        *("prompt", "image", "audio"),
        # instrumentation libraries' own
        *("traceloop", "langfuse", "logfire", "ai", "mlflow", "langsmith", "openllmetry"),
    }
)
OTHER_NAMESPACE = "(other)"


@dataclass(slots=True)
class MappedSpans(Refusals):
    """Spans mapped by the rules (mapping.py), before their events are validated: the part of
    a request's work that needs no plugin, so it can run in a worker process (worker.py)."""

    rows: list[SpanRow] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # the LLM spans' events
    event_rows: list[int] = field(default_factory=list)  # the row index of each event
    names: list[str] = field(default_factory=list)  # each event's span, to name a refusal
    # unmapped_label(attribute key) -> attributes no rule read, on the LLM spans
    unmapped: Counter[str] = field(default_factory=Counter)
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
    # thousands of times), then by namespace; the loop only updates the metric once a label.
    for key, n in Counter(unmapped).items():
        out.unmapped[unmapped_label(key)] += n
    return out


def unmapped_label(key: str) -> str:
    """The label an unread attribute is counted under in /metrics: its key's namespace (the
    part before the first dot) when a public convention's, else "(other)"."""
    namespace = key.partition(".")[0]
    return namespace if namespace in UNMAPPED_NAMESPACES else OTHER_NAMESPACE


def _name(span: Span) -> str:
    return f"span {span.span_id} ({span.name[:80]!r})"
