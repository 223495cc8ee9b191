"""Spans in: mapped, validated and spooled like events, for the receiver and the in-process
exporter alike.

Each span becomes a `spans` row (otel/rows.py) and, when it is LLM work, a v1 event
(mapping.py). The events take the JSON path's steps after parsing: the fast validator (the
pydantic contract's answers when something is off), the server's fill-in, the
`validate_event` and `transform_events` hooks (cost); then the rows go through the
`transform_spans` hook (redaction, payload counting), only when a plugin implements it; then
one spool write for the events and one for the rows, synced once, before the answer. A span
whose event is refused is refused whole (its row is not stored either), and named in the
answer, so nothing is half stored.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
import pluggy
from anyio.lowlevel import RunVar

from ..app import encoded_for_spool
from ..auth import Principal
from ..errors import Problem
from ..ingest.admission import wait_for_place
from ..ingest.fast_validate import from_built, validate_list
from ..ingest.fill_in import receipt_time
from ..ingest.validate import Outcome, finish_fast, validate_items
from ..observability.metrics import ops_metrics
from ..plugins import CHOSEN_ANSWERS, answered_wrongly, call_hook
from .mapped import MappedSpans, map_spans
from .mapping import Span
from .rows import RowsJson, SpanRow, encoded
from .worker import MappedBody

log = logging.getLogger("watchllm.otel")

if TYPE_CHECKING:
    from ..app import WatchLLM

# Spans mapped inline below this count; more go to a worker thread (the event loop keeps
# answering while a 512-span batch is mapped).
OFFLOAD_SPANS = 64

T = TypeVar("T")


@dataclass(slots=True)
class Prepared:
    """What one request's spans became: the events and rows to spool, what was refused."""

    events: list[Any] = field(default_factory=list)
    rows: Sequence[SpanRow] = field(default_factory=list)
    rejected: int = 0
    problems: list[str] = field(default_factory=list)
    unmapped: Counter[str] = field(default_factory=Counter)  # namespace -> attributes no rule read


# The receiver's CPU work on worker threads (decoding a body, mapping and validating its
# spans) runs one request at a time per event loop. Under the GIL several such threads at
# once finish no sooner: they take turns every switch interval (0.5 ms in `watchllm serve`),
# each turn a thread switch with cold caches, beside the store's thread that needs the GIL
# too. Measured with bench_otlp --before, 7 rounds: ~8% less server CPU per span, ~6-11% more
# spans/s, a request's p99 ~10% higher (it waits its turn in the loop, not on the GIL).
_CPU_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("watchllm_otel_cpu_limiter")


def cpu_limiter() -> anyio.CapacityLimiter:
    """The event loop's one-at-a-time limiter for the receiver's worker-thread work."""
    try:
        return _CPU_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(1)
        _CPU_LIMITER.set(limiter)
        return limiter


async def on_cpu_place(wl: WatchLLM, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread, in the event loop's one place for this work
    (cpu_limiter), waited for at most `ingest_queue_timeout_s`: then 503 with Retry-After
    (admission.py), so that under overload requests are pushed back instead of queueing."""
    limiter = cpu_limiter()
    await wait_for_place(limiter.acquire, wl.settings.ingest_queue_timeout_s)
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    finally:
        limiter.release()


def check_span_count(wl: WatchLLM, n: int) -> None:
    limit = wl.settings.max_batch_events
    if n > limit:
        raise Problem(
            413,
            "too_many_spans",
            f"{n} spans in one request is over the limit of {limit} (max_batch_events)",
            field="resourceSpans",
        )


def prepare(
    spans: Sequence[Span],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
    rejected: int = 0,
    problems: Sequence[str] = (),
    encode: bool = False,
) -> Prepared:
    """Map and validate (CPU only; safe on a worker thread, as the JSON path's validation).
    `encode`: also make the spool's JSON of the rows and events here, off the event loop."""
    received = received_at or receipt_time()
    mapped = map_spans(spans, principal.project_id, received, rejected, problems)
    events: list[Any] = []
    rows: list[SpanRow] = mapped.rows
    if mapped.events:
        outcome = _validate(mapped.events, principal, pm, received, mapped.built)
        refused = _refuse(outcome, mapped)
        if refused:
            rows = [row for at, row in enumerate(rows) if at not in refused]
        events = outcome.accepted
        if encode and events:
            events = encoded_for_spool(events)
    transform_spans(rows, principal, pm)
    return Prepared(
        events=events,
        rows=encoded(rows) if encode else rows,
        rejected=mapped.rejected,
        problems=mapped.problems,
        unmapped=mapped.unmapped,
    )


def transform_spans(rows: list[SpanRow], principal: Principal, pm: pluggy.PluginManager) -> None:
    """The `transform_spans` hook on a request's rows, in place. Skipped when no plugin
    implements it: the built-in path pays nothing (and a worker's rows stay its JSON)."""
    hook = pm.hook.transform_spans
    if rows and hook.get_hookimpls():
        n = len(rows)
        call_hook(hook, spans=rows, principal=principal)
        if len(rows) != n:
            # The spans' events are spooled beside their rows: a row taken out would leave
            # its events without a span, one added has none. Refused, not stored half.
            why = f"it changed the list of span rows ({n} -> {len(rows)}); change rows in place"
            raise answered_wrongly(hook, why)


def _refuse(outcome: Outcome, mapped: MappedSpans) -> set[int]:
    """Name each refused event's span in `mapped`; the row indexes of those spans (a span
    whose event is refused is refused whole: nothing half stored)."""
    refused: set[int] = set()
    for rejection in outcome.rejected:
        first = rejection.errors[0] if rejection.errors else {}
        why = f"its {mapped.events[rejection.index]['event_type']} event is invalid"
        if first:
            why += f": {first.get('field', '(event)')}: {first.get('message', '')}"
        mapped.reject(mapped.names[rejection.index], why)
        refused.add(mapped.event_rows[rejection.index])
    return refused


def _validate(
    events: list[dict[str, Any]],
    principal: Principal,
    pm: pluggy.PluginManager,
    received: datetime,
    built: bool = False,
) -> Outcome:
    # Events the rules built are made into structs directly (fast_validate.from_built: the
    # checks msgspec's decoding would make hold by construction, the others run), a third of
    # the JSON round trip's cost; if one is declined, or for forwarded events (the sender's
    # fields), the mapping's JSON goes through the same fast validator as a request body, and
    # anything it declines gets pydantic's answers.
    if built:
        structs = [from_built(event) for event in events]
        if None not in structs:
            return finish_fast(structs, principal, pm, received)
    return validate_json(msgspec.json.encode(events), principal, pm, received)


def validate_json(
    events_json: bytes, principal: Principal, pm: pluggy.PluginManager, received: datetime
) -> Outcome:
    """Mapped events as JSON (a JSON array, as a request body holds them): the fast validator,
    and pydantic's answers for whatever it declines."""
    structs = validate_list(events_json)
    if structs is not None:
        return finish_fast(structs, principal, pm, received)
    return validate_items(msgspec.json.decode(events_json), principal, pm, received)


async def accept(wl: WatchLLM, prepared: Prepared, principal: Principal) -> dict[str, Any]:
    """Spool what was prepared (503 when the spool is full); the answer's figures."""
    metrics = ops_metrics(wl)
    if prepared.rows or prepared.events:
        await wl.submit(prepared.events, prepared.rows)
        wl.counters["accepted"] += len(prepared.events)
        metrics.otel_spans.labels("accepted").inc(len(prepared.rows))
    if prepared.rejected:
        metrics.otel_spans.labels("rejected").inc(prepared.rejected)
    _count_unmapped(metrics, prepared.unmapped)
    return {
        "project_id": principal.project_id if prepared.rows else "",
        "accepted_spans": len(prepared.rows),
        "rejected_spans": prepared.rejected,
        "events": len(prepared.events),
        "errors": prepared.problems,
    }


def _count_unmapped(metrics: Any, namespaces: Counter[str]) -> None:
    # One series update a namespace a request; the namespaces are a fixed list (mapped.py).
    for namespace, n in namespaces.items():
        metrics.otel_unmapped.labels(namespace).inc(n)


async def ingest_spans(
    wl: WatchLLM,
    principal: Principal,
    spans: Sequence[Span],
    *,
    rejected: int = 0,
    problems: Sequence[str] = (),
    off_loop: bool = False,
) -> dict[str, Any]:
    """Spans from inside the process or from the receiver: count limit, quota (one unit a
    span), mapping, validation, hooks and spool. Returns `accepted_spans`, `rejected_spans`,
    `events` (how many became events) and `errors` (the first problems); raises Problem for
    413/429/503. `off_loop`: mapped on a worker thread however few the spans (a body the
    receiver decoded there: a few spans can hold thousands of span events)."""
    work = partial(_prepare_and_accept, wl, principal, spans, rejected, problems, off_loop)
    return await _charged(wl, principal, len(spans), rejected, work)


async def ingest_mapped(
    wl: WatchLLM, principal: Principal, mapped: MappedBody, received: datetime
) -> dict[str, Any]:
    """ingest_spans for a body a worker process decoded and mapped (worker.py): the same
    limits, quota, validation, hooks, spool and answer."""
    # The span count limit is the in-process one: decoded spans and those the decoder refused.
    # (Unlike in-process, the body was mapped before the limit and the quota were checked:
    # the worker's CPU, not the server's, is what a refused body cost.)
    work = partial(_finish_and_accept, wl, principal, mapped, received)
    return await _charged(wl, principal, mapped.spans, mapped.decode_rejected, work)


async def _charged(
    wl: WatchLLM,
    principal: Principal,
    spans: int,
    rejected: int,
    work: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Count limit and quota (one unit a decoded span) around `work`; usage keeps only the
    spans it accepted."""
    check_span_count(wl, spans + rejected)
    if spans:
        await wl.check_quota(principal, spans)
    try:
        answer = await work()
    except CHOSEN_ANSWERS:
        await wl.refund_quota(principal, spans)  # refused whole (413, 503): nothing taken
        raise
    # Usage counts accepted spans only: those the mapping or validation refused go back.
    await wl.refund_quota(principal, spans - answer["accepted_spans"])
    return answer


async def _prepare_and_accept(
    wl: WatchLLM,
    principal: Principal,
    spans: Sequence[Span],
    rejected: int,
    problems: Sequence[str],
    off_loop: bool,
) -> dict[str, Any]:
    received = receipt_time()
    if off_loop or len(spans) >= OFFLOAD_SPANS:
        # A spool needs the rows' JSON: made on the worker thread, not on the event loop.
        prepared = await on_cpu_place(
            wl, prepare, spans, principal, wl.pm, received, rejected, problems, _needs_payload(wl)
        )
    else:
        prepared = prepare(spans, principal, wl.pm, received, rejected, problems)
    return await accept(wl, prepared, principal)


async def _finish_and_accept(
    wl: WatchLLM, principal: Principal, mapped: MappedBody, received: datetime
) -> dict[str, Any]:
    prepared = await on_cpu_place(
        wl, finish_mapped, mapped, principal, wl.pm, received, _needs_payload(wl)
    )
    return await accept(wl, prepared, principal)


def _needs_payload(wl: WatchLLM) -> bool:
    writer = wl.writer
    return writer is not None and writer.needs_payload


def finish_mapped(
    body: MappedBody,
    principal: Principal,
    pm: pluggy.PluginManager,
    received: datetime,
    encode: bool = False,
) -> Prepared:
    """prepare()'s validation and hooks for a worker's answer. The rows stay the worker's
    JSON (otel.rows.RowsJson) unless a span's event is refused, which takes its row out, or a
    `transform_spans` plugin must see them: the worker runs no plugin (worker.py), so they are
    decoded here for it, and encoded again."""
    rows: Sequence[SpanRow] = RowsJson([body.rows], body.n_rows)
    events: list[Any] = []
    rejected, problems = body.rejected, body.problems
    decoded: list[SpanRow] | None = None  # the rows, once they are no longer the worker's JSON
    if body.event_rows:
        outcome = validate_json(body.events, principal, pm, received)
        if outcome.rejected:
            mapped = MappedSpans(
                events=msgspec.json.decode(body.events),
                event_rows=body.event_rows,
                names=body.names,
                rejected=rejected,
                problems=problems,
            )
            refused = _refuse(outcome, mapped)
            decoded = [row for at, row in enumerate(rows) if at not in refused]
            rejected, problems = mapped.rejected, mapped.problems
        events = outcome.accepted
        if encode and events:
            events = encoded_for_spool(events)
    if pm.hook.transform_spans.get_hookimpls():
        if decoded is None:
            decoded = list(rows)
        transform_spans(decoded, principal, pm)
    if decoded is not None:
        rows = encoded(decoded) if encode else decoded
    return Prepared(
        events=events,
        rows=rows,
        rejected=rejected,
        problems=problems,
        unmapped=Counter(body.unmapped),
    )
