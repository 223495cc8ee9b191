"""Big event bodies validated, finished and encoded in a worker process (otel/pool.py's).

Why: in the server a batch event costs ~13 us of Python's GIL (decoding and checking it ~6,
the spool's encoding, the fill-in and cost, the store sink's reads, freeing it), and the GIL
is one core for everything Python does there: that, not the cores, held the accept rate at
~70k events/s on 2 cores. Here that work runs on another core, and the server gets back
what it needs without one event object: the spool record's bytes, the event ids (the answer
lists them; the store sink's exactly-once check reads them) and the store's input bodies
(store/rows.input_json). The server then only spools the bytes and answers (~1 us an event).

When (app.py): a body of OFFLOAD_MIN_BYTES or more, `ingest_worker_processes` above 0, a
writer running, and every plugin hook that must see the events can run in the worker:
no `validate_event` implementation, and each `transform_events` implementation's plugin
says how (`ingest_worker_twins()`, see `worker_twins`): the cost estimate is built there
with the same prices; quotas that count no payload bytes have nothing to do. Anything else
(a third-party transform, a validator) keeps the whole body in the server, as before.

What the worker answers is only ever an input: nothing is accepted until the server has
spooled it, and a worker that dies or fails leaves the body to the server (pool.py). A body
the fast validator declines (one bad event in a big batch, free-form JSON nested deeper than
it reads) gets pydantic's detailed answer here too (`detailed`): the valid events encoded as
above, each invalid one's rejection. Parsing such a body and validating it event by event
costs up to ~0.5 us a JSON value, seconds for 10 MB of small ones, in calls that hold the
GIL throughout: on a thread of the server they held every other request for that long.
"""

from __future__ import annotations

import functools
import importlib
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
import pluggy

from .. import hookspecs
from ..auth import Principal
from ..errors import Problem
from ..otel.frames import body_first
from ..plugins import PROJECT
from ..store.rows import EVENTS_INPUT, PARTS_INPUT, input_json
from .fast_validate import encode_events
from .parse import parse_events_json
from .validate import (
    Outcome,
    batch_sent_as_event,
    body_items,
    check_projects,
    events_at,
    finish_fast,
    validate_fast,
    validate_items,
)

# A frame that starts with this byte is an events job; an OTLP job is a msgpack array.
JOB_MARK = b"E"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# (factory "module:name", keyword arguments): a plugin built in the worker, whose
# transform_events runs there in place of the server's (msgpack-able arguments only).
Twin = tuple[str, dict[str, Any]]


class EventsJob(msgspec.Struct, array_like=True):
    body: bytes
    shape: Literal["batch", "events"]
    project: str
    received_ms: int
    twins: list[Twin] = []
    max_events: int = 0  # the server's max_batch_events: more are refused there, unvalidated


class EventsAnswer(msgspec.Struct, array_like=True):
    """What a body became, or why not.

    `problem`: refused whole (status, code, message, field), as the server would, after the
    count and quota checks of its `count` events, or before the check `problem_before`
    names (`count`: the body is no JSON, or of the wrong shape; `quota`: another project's);
    `detailed`: the detailed path's answer: `rejected` holds each invalid event's rejection
    (ingest/validate.py Rejection's fields), `dropped` those a transform took out;
    `batch_hint`: a batch sent where one event goes (validate.batch_sent_as_event);
    `crash`: the worker failed in an unexpected way (the server does the work itself)."""

    count: int = 0
    project_id: str = ""
    event_ids: list[str] = []
    payload: bytes = b"[]"  # the spool record: a JSON array of the events
    rows: bytes | None = None  # the events' input rows where they differ from payload
    parts: bytes | None = None  # the input of tool_calls / agent_steps (store/rows.py)
    problem: tuple[int, str, str, str | None] | None = None
    problem_before: Literal["", "count", "quota"] = ""
    detailed: bool = False
    rejected: list[tuple[int, list[dict[str, str]], str | None]] = []
    dropped: int = 0
    batch_hint: bool = False
    crash: str | None = None


_encode_job = msgspec.msgpack.Encoder().encode
_decode_job = msgspec.msgpack.Decoder(EventsJob).decode
_encode_answer = msgspec.msgpack.Encoder().encode
decode_answer = msgspec.msgpack.Decoder(EventsAnswer).decode


def encode_job(
    body: bytes,
    shape: Literal["batch", "events"],
    project: str,
    received: datetime,
    twins: list[Twin],
    max_events: int = 0,
) -> list[bytes]:
    """A job's frame, in parts: the body is not copied (otel/frames.py's body_first)."""
    received_ms = (received - _EPOCH) // timedelta(milliseconds=1)
    job = EventsJob(b"", shape, project, received_ms, twins, max_events)
    return body_first(_encode_job(job), body, JOB_MARK)


def worker_twins(pm: pluggy.PluginManager) -> list[Twin] | None:
    """What the worker must build to run this server's event hooks, in their order; None
    when one cannot run there (a validator, a transform whose plugin does not say how)."""
    if pm.hook.validate_event.get_hookimpls():
        return None
    twins: list[Twin] = []
    for impl in pm.hook.transform_events.get_hookimpls():
        say = getattr(impl.plugin, "ingest_worker_twins", None)
        found = say() if say is not None else None
        if found is None:
            return None
        twins.extend(found)
    return twins


def answer_job(data: bytes) -> bytes:
    """(In the worker.) An events job's frame -> its answer's frame."""
    try:
        answer = work(_decode_job(data[len(JOB_MARK) :]))
    except Exception:  # a bug, not the body's fault: the server redoes it and logs it
        answer = EventsAnswer(crash=traceback.format_exc(limit=20))
    return _encode_answer(answer)


def work(job: EventsJob) -> EventsAnswer:
    """Validate, finish (as finish_fast: project, ids, timestamps, the transforms) and encode
    one body: the server's fast path, minus the spool."""
    # One pass over the whole body: no event loop here to let in between slices.
    events = validate_fast(job.body, job.shape)
    if events is None:
        return _detailed(job)
    principal = Principal(job.project, frozenset({"ingest"}))
    received = _EPOCH + timedelta(milliseconds=job.received_ms)
    try:
        outcome = finish_fast(
            events, principal, _plugins(job.twins), received, events_at(job.shape)
        )
    except Problem as problem:  # another project's event (403)
        return EventsAnswer(count=len(events), problem=_fields(problem))
    # The count of what a transform left: the server checks and answers that many.
    return _encoded(outcome, job.project, EventsAnswer(count=len(outcome.accepted)))


def _detailed(job: EventsJob) -> EventsAnswer:
    """The server's detailed path (app._project_events, _batch_events, _ingest) up to the
    spool: parsed, shaped, checked and validated event by event, the valid ones finished and
    encoded. The server makes the answer (202, 207, 422) from it, as from its own."""
    try:
        payload, too_long = parse_events_json(job.body)
        items = body_items(payload, job.shape)
    except Problem as problem:  # no JSON, or not a body of events
        return EventsAnswer(detailed=True, problem=_fields(problem), problem_before="count")
    answer = EventsAnswer(
        count=len(items), detailed=True, batch_hint=batch_sent_as_event(payload, job.shape)
    )
    if job.max_events and len(items) > job.max_events:
        return answer  # refused by its count in the server (413): nothing to validate
    principal = Principal(job.project, frozenset({"ingest"}))
    try:
        check_projects(items, principal, events_at(job.shape))
    except Problem as problem:  # another project's event (403), before the quota
        answer.problem, answer.problem_before = _fields(problem), "quota"
        return answer
    received = _EPOCH + timedelta(milliseconds=job.received_ms)
    outcome = validate_items(items, principal, _plugins(job.twins), received, too_long)
    answer.rejected = [(r.index, r.errors, r.event_id) for r in outcome.rejected]
    answer.dropped = outcome.dropped
    return _encoded(outcome, job.project, answer) if outcome.accepted else answer


def _encoded(outcome: Outcome, project: str, answer: EventsAnswer) -> EventsAnswer:
    """`answer` with the accepted events' spool record, ids and the store's input bodies."""
    # A third-party twin's transform worked on models: the outcome holds them back as
    # structs, with their JSON made on the way.
    events = outcome.accepted
    payload = outcome.payload if outcome.payload is not None else encode_events(events)
    bodies = input_json(events, lambda some: payload if some is events else encode_events(some))
    rows = bodies[EVENTS_INPUT]
    parts = bodies.get(PARTS_INPUT)
    answer.project_id = project
    answer.event_ids = [event.event_id for event in events]
    answer.payload = payload
    answer.rows = None if rows is payload else bytes(rows)  # type: ignore[arg-type]
    answer.parts = None if parts is None else bytes(parts)  # type: ignore[arg-type]
    return answer


def _fields(problem: Problem) -> tuple[int, str, str, str | None]:
    return problem.status, problem.code, problem.message, problem.field


def _plugins(twins: list[Twin]) -> pluggy.PluginManager:
    """A plugin manager with these twins, registered in the server's order (so their hooks
    run in the same order); built once per set of twins, for the worker's life."""
    return _plugins_of(msgspec.msgpack.encode(twins))


@functools.lru_cache(maxsize=4)  # a set per app in the server: one, or a few
def _plugins_of(encoded: bytes) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    twins: list[Twin] = msgspec.msgpack.decode(encoded, type=list[Twin])
    for at, (factory, kwargs) in enumerate(twins):
        module, _, name = factory.partition(":")
        pm.register(getattr(importlib.import_module(module), name)(**kwargs), name=str(at))
    return pm
