"""From parsed events to validated, transformed ones: the fast path (msgspec structs derived from
the contract, fast_validate.py) for valid bodies, pydantic's per-field answers for anything else,
then the validator and transform hooks."""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import pluggy
from pydantic import BaseModel, ValidationError

from .. import schema
from ..auth import Principal
from ..errors import Problem, echo
from ..plugins import BUILTIN_PREFIX, PluginFailed, answered_wrongly, call_hook
from ..schema import EVENT_ADAPTER, EVENT_LIST_ADAPTER, EVENT_TYPES, ID_FIELD_PATTERN
from . import fast_validate
from .fill_in import receipt_time, uuid7
from .parse import holds_too_long, too_long_as_infinity

log = logging.getLogger("watchllm.ingest")

# Bounds of a rejection answer (docs/API.md): fields listed per rejected event, and rejected
# events listed per answer (`rejected_count` has them all).
MAX_ERRORS_PER_EVENT = 20
MAX_MESSAGE_CHARS = 1_000  # an error's message at most (longer: cut, "...")
MAX_REJECTIONS_LISTED = 1_000

# Labels pydantic puts in an error path for the branch of a union, not a field name.
_BRANCH_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}

# Bodies at least this big are validated and encoded on a worker thread (app.py): a thread hop
# costs about 80 us, while 64 KiB of events take about 3 ms of validation.
OFFLOAD_MIN_BYTES = 64 * 1024
# ... but only valid events: a body the fast validator declines gets pydantic's per-event
# answer, up to ~10x the cost (64 KB of invalid events: 25-48 ms). From this size on, that
# answer is built on a worker thread too (app.py), so the event loop never waits ~3 ms for it.
DETAILED_OFFLOAD_MIN_BYTES = 4 * 1024
# pydantic-core holds the GIL for a whole call, so a worker thread only lets the event loop
# run between calls: big bodies are validated in slices of about this many bytes (~5 ms each)
# or events, never in one call of hundreds of milliseconds.
SLICE_BYTES = 128 * 1024
SLICE_EVENTS = 256
_WS = rb"[ \t\n\r]*"  # JSON's whitespace only (\s would also take \x0b and \x0c)
_BATCH_HEAD = re.compile(rb"\A" + _WS + rb"\{" + _WS + rb'"events"' + _WS + rb":" + _WS + rb"\[")
_BATCH_TAIL = re.compile(rb"\]" + _WS + rb"\}" + _WS + rb"\Z")
_LIST_HEAD = re.compile(rb"\A" + _WS + rb"\[")
_LIST_TAIL = re.compile(rb"\]" + _WS + rb"\Z")
_BETWEEN = re.compile(rb"\}" + _WS + rb"," + _WS + rb"\{")


@dataclass(slots=True)
class Rejection:
    index: int
    errors: list[dict[str, str]]
    event_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "errors": self.errors}
        if self.event_id is not None:
            out["event_id"] = self.event_id
        return out


@dataclass(slots=True)
class Outcome:
    accepted: list[Any] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    # The accepted events' spool encoding when it was made on the way (from pydantic models,
    # or with the fill-in on a worker thread: app._finish_and_encode).
    payload: bytes | None = None
    # Events a transform_events plugin took out of the list (sampling, say): neither accepted
    # nor rejected; usage gives them back (app.refund_quota).
    dropped: int = 0
    project_id: str = ""  # the key's project, for an answer with no accepted event to read

    @property
    def not_accepted(self) -> int:
        """Events usage gives back: refused by validation or dropped by a plugin."""
        return len(self.rejected) + self.dropped


def _is_branch_label(item: int | str) -> bool:
    return isinstance(item, str) and (
        item in _BRANCH_LABELS or "[" in item or item.startswith(("function-", "constrained-"))
    )


def field_path(loc: tuple[int | str, ...]) -> str:
    """('tool_calls', 0, 'tool_name') -> 'tool_calls[0].tool_name'."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in EVENT_TYPES:
            continue  # the discriminator tag pydantic puts first
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if _is_branch_label(item):
            continue
        item = echo(item)  # an unknown key's name is the client's: a long one is cut
        parts.append(f".{item}" if parts else item)
    return "".join(parts) or "(event)"


def _relevant(errors: list[Any]) -> list[Any]:
    """Drop a union branch's "wrong type" error when another branch of the same union got
    further: for a chat-message prompt with a bad role, "prompt should be a string" is noise.
    """

    def split(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], int] | None:
        for k, item in enumerate(loc):
            if k > 0 and _is_branch_label(item):
                return loc[:k], len(loc) - k - 1  # (union point, depth inside the branch)
        return None

    further: set[tuple[int | str, ...]] = set()
    for err in errors:
        found = split(tuple(err["loc"]))
        if found and (found[1] > 0 or not err["type"].endswith("_type")):
            further.add(found[0])
    kept = []
    for err in errors:
        found = split(tuple(err["loc"]))
        at_top_wrong_type = found and found[1] == 0 and err["type"].endswith("_type")
        if at_top_wrong_type and found[0] in further:
            continue
        kept.append(err)
    return kept


def _readable(err: Any) -> str:
    """pydantic's message, with datetimes in its context shown as RFC 3339, not repr(); an
    id's pattern said in words."""
    pattern = err.get("ctx", {}).get("pattern")
    if err["type"] == "string_pattern_mismatch" and pattern == ID_FIELD_PATTERN:
        return _ID_RULE
    return _DATETIME_REPR.sub(_iso_of_repr, err["msg"])


_ID_RULE = "an id is letters, digits and _ . : - (not dots alone)"


_DATETIME_REPR = re.compile(r"datetime\.datetime\((\d+), (\d+), (\d+)[^)]*\)\)?")


def _iso_of_repr(match: re.Match[str]) -> str:
    year, month, day = (int(g) for g in match.groups())
    return f"{year:04d}-{month:02d}-{day:02d}T00:00:00Z"


def _field_names() -> frozenset[str]:
    """Every field name of the contract, at any depth (events, tool calls, messages...)."""
    names: set[str] = set()
    for model in vars(schema).values():
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.update(model.model_fields)
    return frozenset(names)


_FIELD_NAMES = _field_names()
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _meant(key: object) -> str | None:
    """The contract's field a key that is none was likely meant as: runId, RunID, run-id ->
    run_id (an SDK of another language writes camelCase)."""
    if not isinstance(key, str) or len(key) > 64:
        return None
    snake = _CAMEL_HUMP.sub("_", key).replace("-", "_").lower()
    return snake if snake != key and snake in _FIELD_NAMES else None


def describe_errors(exc: ValidationError) -> list[dict[str, str]]:
    seen: dict[str, list[str]] = {}
    for err in _relevant(exc.errors(include_url=False)):
        path = field_path(tuple(err["loc"]))
        message = _readable(err)
        if err["type"] == "union_tag_invalid":
            path = "event_type"
        elif err["type"] == "union_tag_not_found":
            path = "event_type"
            message = f"event_type is required; one of: {', '.join(EVENT_TYPES)}"
            given = err.get("input")
            spelled = (
                [k for k in given if _meant(k) == "event_type"] if isinstance(given, dict) else []
            )
            if spelled:
                message += f" (the event has {echo(spelled[0])!r}: did you mean event_type?)"
        elif err["type"] == "extra_forbidden" and err["loc"]:
            meant = _meant(err["loc"][-1])
            if meant is not None:
                message += f" (did you mean {meant}?)"
        messages = seen.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    # A message may repeat a value (an event_type of a megabyte): each kept to a bound.
    found = [
        {"field": path, "message": echo(" or ".join(msgs), MAX_MESSAGE_CHARS)}
        for path, msgs in seen.items()
    ]
    if len(found) > MAX_ERRORS_PER_EVENT:
        # An event with thousands of unknown keys must not make a huge answer: the first
        # fields, then a count (docs/API.md).
        more = len(found) - MAX_ERRORS_PER_EVENT
        found = found[:MAX_ERRORS_PER_EVENT]
        found.append({"field": "(event)", "message": f"and {more} more fields with errors"})
    return found


def check_projects(items: list[Any], principal: Principal, at: str = "") -> None:
    """A body that names another project than the key's is refused whole (403). `at`: where
    the events are in the body, for the field path (`events` in a batch: events[1].project_id;
    nothing for an array or an event alone: [1].project_id)."""
    for index, item in enumerate(items):
        if isinstance(item, dict):
            project = item.get("project_id")
            # A non-string project_id is a schema error (422), reported by validation.
            if isinstance(project, str) and project != principal.project_id:
                raise _wrong_project(index, project, principal, at)


def _wrong_project(index: int, project: Any, principal: Principal, at: str) -> Problem:
    return Problem(
        403,
        "forbidden",
        f"event {index} names project {project!r} but the key belongs to project "
        f"{principal.project_id!r}",
        field=f"{at}[{index}].project_id",
    )


def events_at(shape: Literal["batch", "events"]) -> str:
    """Where a body of this shape holds its events (check_projects' `at`)."""
    return "events" if shape == "batch" else ""


_BATCH_HINT = {
    "field": "events",
    "message": 'not an event field: a batch {"events": [...]} goes to POST /v1/events/batch;'
    " this route takes one event, or a JSON array of events",
}


def body_items(payload: Any, shape: Literal["batch", "events"]) -> list[Any]:
    """The events of a parsed body of this shape, each still as its JSON: an event or an
    array of them (`events`), `{"events": [...]}` (`batch`). 422 for any other shape."""
    if shape == "events":
        if isinstance(payload, dict):
            return [payload]
        if not isinstance(payload, list):
            raise Problem(
                422,
                "bad_body",
                "the body must be an event object or an array of events",
                field="body",
            )
        if not payload:
            raise Problem(422, "empty_batch", "the array holds no event", field="body")
        return payload
    if not isinstance(payload, dict):
        raise Problem(422, "bad_body", 'the body must be an object {"events": [...]}', field="body")
    unknown = sorted(set(payload) - {"events"})
    if unknown:
        raise Problem(
            422,
            "bad_body",
            f"unknown field {echo(unknown[0])!r}; only 'events' is allowed",
            field=echo(unknown[0]),
        )
    items = payload.get("events")
    if not isinstance(items, list):
        raise Problem(422, "bad_body", "'events' must be an array of events", field="events")
    if not items:
        raise Problem(422, "empty_batch", "'events' holds no event", field="events")
    return items


def batch_sent_as_event(payload: Any, shape: Literal["batch", "events"]) -> bool:
    """A batch's body `{"events": [...]}` sent where one event goes: its rejection says so
    first (say_batch_route), before the missing event_type it also is."""
    return (
        shape == "events"
        and isinstance(payload, dict)
        and "events" in payload
        and "event_type" not in payload
    )


def say_batch_route(problem: Problem) -> None:
    rejected = problem.extra.get("rejected") if problem.code == "validation_failed" else None
    if rejected:
        rejected[0]["errors"] = [_BATCH_HINT, *rejected[0]["errors"]]


def validate_fast(body: bytes, shape: Literal["batch", "events"]) -> list[Any] | None:
    """The all-valid fast path: one msgspec pass over the raw bytes into event structs
    (fast_validate.py). None when anything is off or unusual; the slow path then finds and
    reports it (or accepts what msgspec hands over)."""
    return fast_validate.validate_fast(body, shape)


def validate_sliced(body: bytes, shape: Literal["batch", "events"]) -> list[Any] | None:
    """`validate_fast` for big bodies, in slices of about SLICE_BYTES: the events array is cut
    between two events (at `},{`), each piece validated as a JSON array of its own. A cut that
    falls inside a string or a nested value leaves the piece before it unterminated, so that
    piece fails and the answer is None, as for anything else that is off: the caller then
    takes the whole-body path, which finds and reports it. Same events as `validate_fast`."""
    head, tail = (_BATCH_HEAD, _BATCH_TAIL) if shape == "batch" else (_LIST_HEAD, _LIST_TAIL)
    opened = head.match(body)
    closed = tail.search(body, max(0, len(body) - 4096))
    if opened is None or closed is None or closed.start() < opened.end():
        return validate_fast(body, shape)  # one event object, or an unusual layout
    start, end = opened.end(), closed.start()
    events: list[Any] = []
    view = memoryview(body)  # each piece copied once, in the join (slice and `+` copied thrice)
    while start < end:
        cut = _BETWEEN.search(body, min(start + SLICE_BYTES, end), end)
        stop = cut.start() + 1 if cut else end
        piece = fast_validate.validate_list(b"".join((b"[", view[start:stop], b"]")))
        if piece is None:
            return None
        events.extend(piece)
        start = cut.end() - 1 if cut else end
    return events or None


def finish_fast(
    events: list[Any],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
    at: str = "",
) -> Outcome:
    """Project check, fill-in, plugin validators and transforms for fast-path events. `at`:
    where the events are in the body (check_projects)."""
    project = principal.project_id
    if pm.hook.validate_event.get_hookimpls() or _third_party(
        pm.hook.transform_events.get_hookimpls()
    ):
        for index, event in enumerate(events):
            if event.project_id is not None and event.project_id != project:
                raise _wrong_project(index, event.project_id, principal, at)
        return _finish(list(enumerate(events)), Outcome(), principal, pm, received_at)
    # Only built-ins see them (the usual case): _finish's fill-in in one pass over the structs,
    # with the project check (a 403 leaves the structs to be dropped), every one accepted.
    received = received_at or receipt_time()
    for index, event in enumerate(events):
        if event.project_id is not None and event.project_id != project:
            raise _wrong_project(index, event.project_id, principal, at)
        event.project_id = project
        if event.event_id is None:
            event.event_id = uuid7()
        if event.timestamp is None:
            event.timestamp = received
    call_hook(pm.hook.transform_events, events=events, principal=principal)
    return Outcome(accepted=events)


def validate_items(
    items: list[Any],
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
    too_long: bool = False,
) -> Outcome:
    """The slow path, over parsed JSON: every event validated on its own, so each rejected
    one is reported with its index and fields while the valid ones are accepted.
    `too_long`: the items may hold TooLongInts (parse_events_json)."""
    outcome = Outcome()
    indexed: list[tuple[int, Any]] = []
    # In slices (see SLICE_EVENTS); a slice with a bad event is validated event by event, and
    # so is one that was valid with a TooLongInt in it (where any JSON is taken: see below).
    for first in range(0, len(items), SLICE_EVENTS):
        part = items[first : first + SLICE_EVENTS]
        try:
            events = EVENT_LIST_ADAPTER.validate_python(part)
            if not (too_long and holds_too_long(part)):
                indexed.extend(enumerate(events, first))
                continue
        except ValidationError:
            pass
        for index, item in enumerate(part, first):
            if not isinstance(item, dict):
                outcome.rejected.append(
                    Rejection(index, [{"field": "(event)", "message": "must be a JSON object"}])
                )
                continue
            try:
                event = EVENT_ADAPTER.validate_python(item)
                if too_long and holds_too_long(item):
                    # Taken where any JSON is (metadata, tool_input, ...), where a number must
                    # still be finite: refused there as 1e999 is (422 naming the field).
                    event = EVENT_ADAPTER.validate_python(too_long_as_infinity(item))
                indexed.append((index, event))
            except ValidationError as exc:
                event_id = item.get("event_id")
                outcome.rejected.append(
                    Rejection(
                        index,
                        describe_errors(exc),
                        event_id if isinstance(event_id, str) else None,
                    )
                )
    return _finish(indexed, outcome, principal, pm, received_at)


def _finish(
    indexed: list[tuple[int, Any]],
    outcome: Outcome,
    principal: Principal,
    pm: pluggy.PluginManager,
    received_at: datetime | None = None,
) -> Outcome:
    """The server's part of every accepted event, before any plugin sees it: the key's
    project, and the event_id and timestamp the client left out (schema.SERVER_FILLED), so
    validator and transform hooks, the spool and the store always get complete events."""
    project = principal.project_id
    received = received_at or receipt_time()
    validators = pm.hook.validate_event
    validator_impls = validators.get_hookimpls()
    # Plugins from outside this package see pydantic models, as documented (PLUGINS.md);
    # the structs are converted for them only.
    as_models = _third_party(validator_impls) or _third_party(
        pm.hook.transform_events.get_hookimpls()
    )
    for index, event in indexed:
        if type(event) in _STRUCTS:
            # A struct's attributes are plain slots: setting them costs tens of nanoseconds.
            event.project_id = project
            client_id = event.event_id
            if client_id is None:
                event.event_id = uuid7()
            if event.timestamp is None:
                event.timestamp = received
            if as_models:
                event = fast_validate.to_model(event)
        else:
            data = event.__dict__  # a model: no pydantic __setattr__, which costs a microsecond
            data["project_id"] = project
            client_id = data["event_id"]
            if client_id is None:
                data["event_id"] = uuid7()
            if data["timestamp"] is None:
                data["timestamp"] = received
        if validator_impls:
            problems = _plugin_problems(
                call_hook(validators, event=event, principal=principal), validators
            )
            if problems:
                outcome.rejected.append(
                    Rejection(
                        index,
                        problems,
                        client_id,  # an id the server made for a refused event means nothing
                    )
                )
                continue
        outcome.accepted.append(event)
    if outcome.rejected:
        outcome.rejected.sort(key=lambda r: r.index)
    if outcome.accepted:
        before = len(outcome.accepted)
        call_hook(pm.hook.transform_events, events=outcome.accepted, principal=principal)
        outcome.dropped = max(0, before - len(outcome.accepted))
        outcome.project_id = principal.project_id
        if as_models or any(type(e) not in _STRUCTS for e in outcome.accepted):
            # Back to structs for the spool and the sinks, with the JSON made on the way.
            try:
                outcome.accepted, outcome.payload = fast_validate.from_models(outcome.accepted)
            except Exception as exc:  # a value a plugin set that has no JSON (an object)
                if not as_models:
                    raise
                raise _transform_failed(pm, f"its events have no JSON: {exc}") from exc
        if as_models:
            _check_transformed(outcome.accepted, principal, pm)
    return outcome


def _check_transformed(events: list[Any], principal: Principal, pm: pluggy.PluginManager) -> None:
    """The contract, again, on what a third party's transform_events left: an event it made
    invalid (a negative count, an id with spaces, another project) would otherwise be
    accepted and then refused by the store, taking the other events of its insert to the dead
    letters with it. A 500 naming the plugins and the field: the request, not the client's
    events, is at fault, and nothing of it is spooled. from_models made structs of those
    that pass the strict check; one left a model is checked by pydantic (JSON nested near
    its depth limit is valid there and stays a model)."""
    for index, event in enumerate(events):
        problem = None
        if type(event) not in _STRUCTS:
            try:
                EVENT_ADAPTER.validate_json(
                    EVENT_ADAPTER.dump_json(event, exclude_none=True),
                    context=fast_validate.TRUSTED,
                )
            except ValidationError as exc:
                first = describe_errors(exc)[0]
                problem = f"{first['field']}: {first['message']}"
        if problem is None and event.project_id != principal.project_id:
            problem = f"project_id: {echo(str(event.project_id))!r} is not the key's project"
        if problem is not None:
            event_id = echo(str(event.event_id))
            raise _transform_failed(
                pm, f"it left event {index} (event_id {event_id!r}) invalid: {problem}"
            )


def _transform_failed(pm: pluggy.PluginManager, why: str) -> PluginFailed:
    """The PluginFailed of the third-party transform_events plugins (which of them did it is
    not known once they have all run), logged."""
    hook = pm.hook.transform_events
    third_party = [impl for impl in hook.get_hookimpls() if _third_party([impl])]
    return answered_wrongly(hook, echo(why, MAX_MESSAGE_CHARS), third_party)


_STRUCTS = fast_validate.EVENT_STRUCT_TYPES


def _third_party(impls: list[Any]) -> bool:
    """Whether a plugin from outside this package implements the hook."""
    for impl in impls:
        plugin = impl.plugin
        module = (
            plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        )
        if not module.startswith(BUILTIN_PREFIX):
            return True
    return False


def _plugin_problems(results: list[Any], hook: pluggy.HookCaller) -> list[dict[str, str]]:
    """validate_event's results as the answer's problems: each a string (about the whole
    event), a `{"field": ..., "message": ...}` mapping naming a field, or a list or tuple of
    those (anything else is the plugin's bug, answered 500, not a problem of the event's)."""
    problems: list[dict[str, str]] = []
    for result in results:
        for problem in result if isinstance(result, list | tuple) else (result,):
            if isinstance(problem, str):
                if problem:
                    problems.append({"field": "(event)", "message": problem})
            elif _is_field_problem(problem):
                problems.append({"field": problem["field"], "message": problem["message"]})
            else:
                why = (
                    f"it returned {_described(result)}, not None, a string, a mapping of "
                    '"field" and "message" strings or a list of those'
                )
                raise answered_wrongly(hook, why)
    return problems


def _is_field_problem(problem: object) -> bool:
    return (
        isinstance(problem, Mapping)  # as the hook's annotation and PLUGINS.md say
        and problem.keys() == {"field", "message"}
        and isinstance(problem["field"], str)
        and isinstance(problem["message"], str)
        and bool(problem["field"])
        and bool(problem["message"])
    )


def _described(result: object) -> str:
    if isinstance(result, list | tuple):
        kinds = sorted({type(p).__name__ for p in result})
        return f"a {type(result).__name__} of {', '.join(kinds)}"
    return type(result).__name__
