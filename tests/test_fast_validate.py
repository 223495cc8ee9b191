"""The fast validator (ingest/fast_validate.py) against the contract (schema.py, pydantic).

A differential test: valid events of every type are generated from the models' own annotations
and constraints (not from the fast validator's reading of them), then mutated at every field,
nested ones included, against every constraint found there: wrong types, bounds at and beyond
each limit, lengths, patterns, timestamps, non-finite numbers in free-form JSON, unknown and
missing fields, cost_source, duplicate keys, unicode escapes, lone surrogates. For each body
the fast validator must accept exactly what pydantic accepts, and build identical events.

The only answers allowed to differ are refusals to answer (None, then pydantic decides) for
two documented kinds of body: a number literal too large for a double, and a key given twice.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from watchllm_ext import schema
from watchllm_ext.ingest import fast_validate
from watchllm_ext.ingest.validate import describe_errors
from watchllm_ext.schema import EVENT_ADAPTER, EVENT_LIST_ADAPTER, MODELS_BY_TYPE, Event

# Fixed, bounded: the same examples on every run, well under a minute in all.
FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=400,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# --- the contract, read from the models ----------------------------------------------------------


@dataclass
class Alt:
    """One branch of a field's type with its constraints."""

    kind: str  # none, str, int, float, bool, literal, list, json, model, datetime
    min_len: int | None = None
    max_len: int | None = None
    pattern: str | None = None
    lower: Any = None  # ge
    upper: Any = None  # le (numbers) or lt (datetimes)
    values: tuple[Any, ...] = ()
    items: list[Alt] = field(default_factory=list)
    model: type[BaseModel] | None = None


def alts(tp: Any, meta: list[Any] | None = None) -> list[Alt]:
    meta = list(meta or [])
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extra = get_args(tp)
        return alts(inner, [*extra, *meta])
    if origin in (Union, type(int | None)):
        return [a for arg in get_args(tp) for a in alts(arg)]
    flat: list[Any] = []
    for m in meta:
        if isinstance(m, FieldInfo):
            flat.extend(m.metadata)
        elif isinstance(m, at.GroupedMetadata) and not isinstance(m, at.BaseMetadata):
            flat.extend(m)
        else:
            flat.append(m)
    alt = Alt("json")
    for m in flat:
        if isinstance(m, at.MinLen):
            alt.min_len = m.min_length
        elif isinstance(m, at.MaxLen):
            alt.max_len = m.max_length
        elif isinstance(m, at.Ge):
            alt.lower = m.ge
        elif isinstance(m, at.Le | at.Lt):
            alt.upper = m.le if isinstance(m, at.Le) else m.lt
        elif getattr(m, "pattern", None):
            alt.pattern = m.pattern
    if tp is type(None):
        alt.kind = "none"
    elif origin is Literal:
        alt.kind, alt.values = "literal", get_args(tp)
    elif tp in (str, int, float, bool):
        alt.kind = tp.__name__
    elif tp is AwareDatetime:
        alt.kind = "datetime"
    elif origin is list:
        item = get_args(tp)[0]
        if item is Any or get_origin(item) is dict:
            alt.values = ("list",)  # free-form JSON: a list of objects
        else:
            alt.kind, alt.items = "list", alts(item)
    elif origin is dict:
        alt.values = ("dict",)
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        alt.kind, alt.model = "model", tp
    return [alt]


def fields_of(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo, list[Alt]]]:
    for name, info in model.model_fields.items():
        if name == "event_type":
            continue
        yield name, info, alts(info.annotation, list(info.metadata))


def server_only(model: type[BaseModel]) -> set[str]:
    """Fields with a field validator: cost_source, which only the server may set."""
    decorators = model.__pydantic_decorators__.field_validators.values()
    return {f for d in decorators for f in d.info.fields}


# --- generating valid values ---------------------------------------------------------------------

TZS = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5, minutes=-30))]
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def python_pattern(pattern: str) -> str:
    return pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern


def timestamp_text(value: datetime, form: int) -> str:
    # Forms 0-5: what clients send (the fast path's own); 6-11: the rest of RFC 3339 that the
    # contract accepts (a space or lower case t and z), which the fast path hands to pydantic.
    text = value.isoformat(timespec=["seconds", "milliseconds", "microseconds"][form % 3])
    text = text.replace("+00:00", "Z") if form % 2 else text
    if form >= 6:
        text = text.replace("T", " ") if form % 4 < 2 else text.replace("T", "t").replace("Z", "z")
    return text


def valid(alt: Alt) -> st.SearchStrategy[Any]:
    if alt.kind == "none":
        return st.none()
    if alt.kind == "literal":
        return st.sampled_from(alt.values)
    if alt.kind == "str":
        if alt.pattern:
            strategy = st.from_regex(python_pattern(alt.pattern), fullmatch=True)
            return strategy.filter(lambda s: (alt.min_len or 0) <= len(s) <= (alt.max_len or 9**9))
        return st.text(min_size=alt.min_len or 0, max_size=min(alt.max_len or 16, 16))
    if alt.kind == "int":
        return st.integers(min_value=alt.lower, max_value=alt.upper)
    if alt.kind == "float":
        low, high = alt.lower, alt.upper
        return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False) | (
            st.integers(min_value=math.ceil(low), max_value=math.floor(high))  # JSON 3 for 3.0
        )
    if alt.kind == "datetime":
        return st.builds(
            timestamp_text,
            st.datetimes(
                min_value=alt.lower.replace(tzinfo=None) + timedelta(days=1),
                max_value=alt.upper.replace(tzinfo=None) - timedelta(days=1),
                timezones=st.sampled_from(TZS),
            ),
            st.integers(0, 11),
        )
    if alt.kind == "list":
        item = st.one_of([valid(a) for a in alt.items])
        return st.lists(item, min_size=alt.min_len or 0, max_size=min(alt.max_len or 3, 3))
    if alt.kind == "model":
        assert alt.model is not None
        return model_values(alt.model)
    objects = st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)
    if alt.values == ("dict",):
        return objects
    if alt.values == ("list",):
        return st.lists(objects, max_size=3)
    return JSON_VALUES


def field_values(field_alts: list[Alt]) -> st.SearchStrategy[Any]:
    return st.one_of([valid(a) for a in field_alts])


def model_values(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    required, optional = {}, {}
    skip = server_only(model)
    for name, info, field_alts in fields_of(model):
        if name in skip:
            continue
        (required if info.is_required() else optional)[name] = field_values(field_alts)
    return st.fixed_dictionaries(required, optional=optional)


def event_values(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    return model_values(MODELS_BY_TYPE[event_type]).map(lambda d: {**d, "event_type": event_type})


ANY_EVENT = st.one_of([event_values(t) for t in schema.EVENT_TYPES])  # built once


# --- mutations -----------------------------------------------------------------------------------


class Raw:
    """A JSON literal that json.dumps cannot write (1e999, NaN, a lone surrogate)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any) -> bytes:
    raws: list[str] = []

    def default(obj: Any) -> Any:
        raise TypeError(obj)

    def swap(obj: Any) -> Any:
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(obj, dict):
            return {k: swap(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [swap(v) for v in obj]
        return obj

    text = json.dumps(swap(value), default=default)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text.encode()


WRONG_TYPES: list[Any] = [None, True, False, 0, 1, -1, 1.5, -0.0, "x", "", [], {}, [1], {"a": 1}]
BIG_NUMBERS: list[Any] = [2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -1e308]
NOT_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"]
TIMESTAMPS: list[Any] = [
    "2026-01-01T12:00:00Z",
    "2026-01-01T12:00:00.5Z",
    "2026-01-01T12:00:00.123456+01:00",
    "2026-01-01T12:00:00.1234567Z",
    "2026-01-01T12:00:00-00:00",
    "2026-01-01T12:00:00+23:59",
    "2026-01-01T12:00:00+24:00",
    "2026-01-01T12:00:00+0100",
    "2026-01-01T12:00:00+01",
    "2026-01-01t12:00:00z",
    "2026-01-01 12:00:00Z",
    "2026-01-01T12:00Z",
    "2026-01-01T12:00:00,5Z",
    "2026-01-01T12:00:00",  # naive
    "2026-01-01",
    "2026-02-30T00:00:00Z",
    "2026-04-31T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T23:59:60Z",
    "20260101T120000Z",
    "1700000000",
    "1700000000.5",
    1700000000,
    1.7e9,
    0,
    "",
    "1969-12-31T23:59:59.999999Z",
    "1970-01-01T00:00:00Z",
    "1970-01-01T00:30:00+01:00",
    "2099-12-31T23:59:59.999999Z",
    "2100-01-01T00:00:00Z",
    "2099-12-31T23:30:00-01:00",
    "\u0032026-01-01T12:00:00Z",
    " 2026-01-01T12:00:00Z",
    "2026-01-01T12:00:00Z\n",
    # schema.py's grammar around its edges (test_timestamp_grammar lists the verdicts)
    "1700000000000",
    "-1700000000",
    "2026-01-01T12:00:00.123456789Z",
    "2026-01-01T12:00:00.1234567891Z",
    "2026-01-01T12:00:00.Z",
    "2026-01-01T12:00:00z",
    "2026-01-01t12:00:00.5+01:00",
    "2026-01-01 12:00:00.123-05:30",
    "2026-01-01T12:00:00 Z",
    "2026-01-01T12:00:00+01:00:00",
    "\u0662\u0660\u0662\u0666-01-01T12:00:00Z",
    "2026-01-01T12:00:00\uff3a",
]
STRING_OUTLIERS: list[Any] = [
    "\n",
    "a\n",
    "a\nb",
    " a",
    "a b",
    "a/b",
    "é",
    "😀",
    "a\u0000",
    Raw('"\\ud800"'),
    Raw('"a\\udc00"'),
    Raw('"\\ud83d\\ude00"'),
    Raw('"\\u0041\\u00e9"'),
    Raw('"\\/"'),
]


def values_against(alt: Alt, sample: Any) -> list[Any]:
    """Values at, just inside and just beyond each of the alternative's constraints."""
    out: list[Any] = []
    if alt.kind == "str":
        low, high = alt.min_len or 0, alt.max_len
        out += ["a" * low, "é" * max(low, 1)]
        if low:
            out.append("a" * (low - 1))
        if high is not None:
            fill = "a" if not alt.pattern or re.fullmatch(python_pattern(alt.pattern), "a") else "A"
            out += [fill * high, fill * (high + 1), "😀" * high, "😀" * (high + 1)]
        if alt.pattern and isinstance(sample, str):
            out += [sample + "\n", "\n" + sample, sample + " ", sample + "é", sample + "$"]
            out += [sample + c for c in "-_.:/@#"]
    elif alt.kind == "int":
        low, high = alt.lower, alt.upper
        out += [low, low - 1, high, high + 1, float(low), low + 0.5, str(low), True]
    elif alt.kind == "float":
        low, high = alt.lower, alt.upper
        out += [low, high, -low if low else -1.0, math.nextafter(high, math.inf)]
        out += [math.nextafter(low, -math.inf), int(high), int(high) + 1, high * 10]
        out += [str(high), Raw(repr(float(high))), Raw(f"{high:.17e}"), Raw(str(int(high)))]
    elif alt.kind == "literal":
        out += list(alt.values) + [v.upper() for v in alt.values] + ["", "bogus"]
    elif alt.kind == "datetime":
        out += TIMESTAMPS
    elif alt.kind == "list":
        high = alt.max_len
        item = sample[0] if isinstance(sample, list) and sample else None
        if high is not None and item is not None:
            out += [[item] * high, [item] * (high + 1)]
        out += [[None], [1], [[]]]
    elif alt.kind == "json":
        out += [Raw(n) for n in NOT_FINITE]
        out += [{"a": Raw(n)} for n in NOT_FINITE] + [[Raw("1e999")], {"a": [{"b": Raw("NaN")}]}]
        out += [[{"a": Raw(n)}] for n in NOT_FINITE]  # a list of objects (chat content)
        out += [{"deep": [[[[{"x": 1.5}]]]]}, {"": None}, "x" * schema.MAX_JSON_CHARS]
        out += ["x" * (schema.MAX_JSON_CHARS + 1), {"k": "x" * schema.MAX_JSON_CHARS}]
        out += [{"k": "x" * (schema.MAX_JSON_CHARS - 8)}, {"k": "x" * (schema.MAX_JSON_CHARS - 7)}]
        # The limit is in UTF-8 bytes: an "é" is two (1,000,000 bytes, then 1,000,002).
        half = (schema.MAX_JSON_CHARS - 8) // 2
        out += [{"k": "\u00e9" * half}, {"k": "\u00e9" * (half + 1)}]
        # Nesting around pydantic's JSON depth limit (201 levels for the whole document).
        out += [nested(n) for n in (100, 170, 175, 176, 177, 197, 198, 199, 200, 201, 300)]
        out += [{"k": nested(198)}, Raw("[" * 5000 + "]" * 5000)]
    return out


@dataclass
class Case:
    body: bytes
    what: str
    may_decline: bool = False  # a kind pydantic may accept and the fast path hands over


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def may_decline(value: Any) -> bool:
    """NaN, Infinity and out-of-double-range literals: msgspec refuses the document, pydantic
    only where a validator looks (number fields, free-form JSON and chat message content all
    refuse them). Free-form JSON nested more than 170 levels deep: pydantic's limit is on the
    whole document."""
    if depth_of(value) > 170:
        return True
    if isinstance(value, Raw):
        return value.text in NOT_FINITE
    if isinstance(value, dict):
        return any(may_decline(v) for v in value.values())
    if isinstance(value, list):
        return any(may_decline(v) for v in value)
    return False


def set_path(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(event)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return out


DELETE = object()


def mutations(
    model: type[BaseModel], value: dict[str, Any], path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Any, str]]:
    """(path, new value, description) for every field of `model` found in `value`."""
    yield (*path, "unknown_field"), 1, "unknown field"
    skip = server_only(model)
    for name, _info, field_alts in fields_of(model):
        at_path = (*path, name)
        sample = value.get(name)
        yield at_path, DELETE, "left out"
        if name in skip:
            for v in ["client", "computed", "unknown", None, "bogus"]:
                yield at_path, v, "set by the server only"
            continue
        for v in WRONG_TYPES + BIG_NUMBERS + STRING_OUTLIERS:
            yield at_path, v, "another type"
        for alt in field_alts:
            for v in values_against(alt, sample):
                yield at_path, v, f"{alt.kind} constraint"
            if alt.kind == "model" and isinstance(sample, dict):
                yield from mutations(alt.model, sample, at_path)  # type: ignore[arg-type]
            if alt.kind == "list" and isinstance(sample, list):
                for i, item in enumerate(sample[:2]):
                    for item_alt in alt.items:
                        if item_alt.kind == "model" and isinstance(item, dict):
                            sub = (*at_path, i)
                            yield from mutations(item_alt.model, item, sub)  # type: ignore[arg-type]


# --- comparing -----------------------------------------------------------------------------------


def reference(body: bytes) -> Any | None:
    try:
        return EVENT_ADAPTER.validate_json(body)
    except ValidationError:
        return None


def assert_same(got: Any, want: Any, where: str = "event") -> None:
    """Same types and values all the way down (1 is not 1.0, -0.0 is not 0.0), same fields
    in the same order; datetimes as the same instant with the same offset. A struct stands
    for its model (the tag as a class attribute), a tuple of the struct for a model's list."""
    if isinstance(want, BaseModel) and isinstance(got, msgspec.Struct):
        assert fast_validate._STRUCT_PLANS[type(got)].model is type(want), where
        names = [n for n in want.__dict__ if n not in got.__struct_fields__]
        assert names in ([], ["event_type"]), (where, names)
        assert [n for n in want.__dict__ if n in got.__struct_fields__] == list(
            got.__struct_fields__
        ), where
        for key, value in want.__dict__.items():
            assert_same(getattr(got, key), value, f"{where}.{key}")
    elif isinstance(want, BaseModel):
        assert type(got) is type(want), where
        assert got.model_fields_set == want.model_fields_set, where
        assert list(got.__dict__) == list(want.__dict__), where
        assert got.__pydantic_extra__ == want.__pydantic_extra__, where
        assert got.__pydantic_private__ == want.__pydantic_private__, where
        for key, value in want.__dict__.items():
            assert_same(got.__dict__[key], value, f"{where}.{key}")
    elif isinstance(want, datetime):
        assert isinstance(got, datetime) and got == want, where
        assert got.utcoffset() == want.utcoffset(), where
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want), where
        for key, value in want.items():
            assert_same(got[key], value, f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert type(got) is list or (type(got) is tuple and typed_list(want)), where
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert type(got) is float, where
        assert got == want and math.copysign(1, got) == math.copysign(1, want), where
    else:
        assert type(got) is type(want) and got == want, where


def check(case: Case) -> str:
    """Both validators on one event body; returns what happened."""
    want = reference(case.body)
    got = fast_validate.decode_event(case.body)
    if want is None:
        assert got is None, f"fast path accepted what pydantic refuses ({case.what}): {case.body!r}"
        return "refused"
    if got is None:
        assert case.may_decline, f"fast path refused a valid event ({case.what}): {case.body!r}"
        return "declined"
    assert_same(got, want)
    # What the spool stores (fast_validate.encode_events): pydantic's keys and values.
    want_json = EVENT_LIST_ADAPTER.dump_json([want], exclude_none=True)
    assert_same_json(fast_validate.encode_events([got]), want_json)
    # The model a plugin gets, and the struct the spool gives back.
    model = fast_validate.to_model(got)
    assert model.model_dump() == want.model_dump()
    if want.event_id is not None and want.timestamp is not None:
        (back,) = fast_validate.decode_stored(fast_validate.encode_events([got]))
        assert_same(back, want)
    return "accepted"


def typed_list(value: list[Any]) -> bool:
    """Whether a model's list is one of the contract's typed lists (a tuple in a struct),
    not free-form JSON (lists there stay lists): by its items, strings or models."""
    return all(isinstance(v, str | BaseModel | dict) for v in value)


def assert_same_json(got: bytes, want: bytes) -> None:
    """Same keys and values, each of the same JSON type; timestamps the same instant."""

    def norm(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if key == "timestamp" and isinstance(value, str):
            return ("ts", datetime.fromisoformat(value.replace("z", "Z")))
        return (type(value).__name__, value)

    assert norm(json.loads(got)) == norm(json.loads(want))


def base_event(event_type: str) -> dict[str, Any]:
    """A full event of the type, every nested model present, so every path can be mutated."""
    return FULL[event_type]


def _full_example(event_type: str) -> dict[str, Any]:
    model = MODELS_BY_TYPE[event_type]
    out: dict[str, Any] = {"event_type": event_type}
    skip = server_only(model)

    def fill(m: type[BaseModel]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, _info, field_alts in fields_of(m):
            if name in skip and m is model:
                continue
            values[name] = example(field_alts)
        return values

    def example(field_alts: list[Alt]) -> Any:
        # Prefer the richest branch: models and lists of models, then anything not None.
        order = ["list", "model", "datetime", "str", "int", "float", "literal", "json", "none"]
        alt = sorted(field_alts, key=lambda a: order.index(a.kind))[0]
        if alt.kind == "list":
            inner = [a for a in alt.items if a.kind == "model"] or alt.items
            return [example([inner[0]]), example([inner[0]])]
        if alt.kind == "model":
            return fill(alt.model)  # type: ignore[arg-type]
        if alt.kind == "datetime":
            return "2026-03-14T15:09:26.535Z"
        if alt.kind == "str":
            if alt.pattern:
                return "a1"[: alt.max_len or 2]
            return "x" * max(alt.min_len or 0, 1)
        if alt.kind == "int":
            return alt.lower + 1
        if alt.kind == "float":
            return (alt.lower + alt.upper) / 4 if alt.upper else 0.5
        if alt.kind == "literal":
            return alt.values[-1]
        if alt.kind == "json":
            return {"k": [1, 2.5, "s", None, True]}
        return None

    out.update(fill(model))
    return out


# Every optional field set (server-only ones aside), from the models' annotations.
FULL = {t: _full_example(t) for t in schema.EVENT_TYPES}


def all_cases() -> Iterator[Case]:
    for event_type in schema.EVENT_TYPES:
        model = MODELS_BY_TYPE[event_type]
        event = base_event(event_type)
        yield Case(dumps(event), f"{event_type}: the full example")
        for path, value, what in mutations(model, event):
            mutated = set_path(event, path, value)
            yield Case(dumps(mutated), f"{event_type} {path}: {what}", may_decline(value))
        for tag in [None, 1, "", "bogus", event_type.upper(), DELETE]:
            yield Case(dumps(set_path(event, ("event_type",), tag)), f"event_type {tag!r}")


# --- the tests -----------------------------------------------------------------------------------


def test_the_full_examples_are_valid() -> None:
    """The sweep below starts from valid events, or it would prove little."""
    for event_type in schema.EVENT_TYPES:
        event = EVENT_ADAPTER.validate_json(dumps(base_event(event_type)))
        assert event.event_type == event_type


def test_every_constraint_of_every_field_against_pydantic() -> None:
    outcomes: dict[str, int] = {"accepted": 0, "refused": 0, "declined": 0}
    for case in all_cases():
        outcomes[check(case)] += 1
    # Both answers are exercised, and handing over stays the rare exception.
    assert outcomes["accepted"] > 1000 and outcomes["refused"] > 1000, outcomes
    assert outcomes["declined"] < 150, outcomes


def test_the_sweep_reaches_every_bound_in_the_schema() -> None:
    """Each numeric range and size limit of schema.py is met by at least one field's
    constraint, so the sweep above tests it at and beyond its value."""
    lengths: set[int] = set()
    bounds: set[float] = set()

    def walk(field_alts: list[Alt]) -> None:
        for alt in field_alts:
            lengths.update(x for x in (alt.min_len, alt.max_len) if x is not None)
            if alt.kind in ("int", "float"):
                bounds.update(x for x in (alt.lower, alt.upper) if x is not None)
            walk(alt.items)
            if alt.model is not None:
                for _n, _i, sub in fields_of(alt.model):
                    walk(sub)

    for model in MODELS_BY_TYPE.values():
        for _n, _i, field_alts in fields_of(model):
            walk(field_alts)
    for name in [
        "MAX_ID_CHARS",
        "MAX_NAME_CHARS",
        "MAX_TEXT_CHARS",
        "MAX_SHORT_TEXT_CHARS",
        "MAX_TAGS",
        "MAX_TAG_CHARS",
        "MAX_TOOL_CALLS",
        "MAX_MESSAGES",
    ]:
        assert getattr(schema, name) in lengths, name
    for name in dir(schema):
        if name.startswith("MAX_") and name not in ("MAX_TIMESTAMP", "MAX_JSON_CHARS"):
            value = getattr(schema, name)
            assert value in lengths or value in bounds or -value in bounds, name


@FUZZ
@given(ANY_EVENT)
def test_generated_valid_events_are_accepted_alike(event: dict[str, Any]) -> None:
    assert check(Case(dumps(event), "generated")) in ("accepted", "refused")


# Per type, from its full example: a path the generated event lacks is skipped below.
MUTATIONS = {t: list(mutations(MODELS_BY_TYPE[t], FULL[t])) for t in schema.EVENT_TYPES}


@st.composite
def mutated_events(draw: st.DrawFn) -> Case:
    event = draw(ANY_EVENT)
    options = MUTATIONS[event["event_type"]]
    for _ in range(draw(st.integers(1, 2))):
        path, value, what = draw(st.sampled_from(options))
        try:
            event = set_path(event, path, value)
        except (KeyError, IndexError, TypeError, AttributeError):  # the path is not there
            continue
        if may_decline(value):
            return Case(dumps(event), what, True)
    return Case(dumps(event), "mutated")


@settings(FUZZ, max_examples=800)
@given(mutated_events())
def test_generated_mutated_events_are_judged_alike(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("event_type", schema.EVENT_TYPES)
def test_server_filled_fields_left_out_or_null_are_judged_alike(event_type: str) -> None:
    """event_id and timestamp may be left out (or null) in a request; the server fills them
    later (tests/test_fill_in.py). Both validators accept such an event, as None."""
    event = base_event(event_type)
    for names in [("event_id",), ("timestamp",), schema.SERVER_FILLED]:
        for value in (DELETE, None):
            body = event
            for name in names:
                body = set_path(body, (name,), value)
            assert check(Case(dumps(body), f"{names} {value!r}")) == "accepted"
            built = fast_validate.decode_event(dumps(body))
            assert all(getattr(built, name) is None for name in names)


@settings(FUZZ, max_examples=100)
@given(ANY_EVENT.filter(lambda e: not set(schema.SERVER_FILLED) & e.keys()))
def test_the_fuzz_draws_events_without_the_server_filled_fields(event: dict[str, Any]) -> None:
    """The generated events above (optional fields drawn or not) include ones without
    event_id and timestamp (hypothesis fails as unsatisfiable if none is ever drawn), and
    both validators judge them alike: the fuzz covers what the server fills in."""
    assert check(Case(dumps(event), "without event_id and timestamp")) in ("accepted", "refused")


# --- duplicate keys, whole bodies ----------------------------------------------------------------


def with_duplicate(event: dict[str, Any], key: str, first: Any) -> bytes:
    """The event's JSON with `key` given twice: `first`, then the event's own value."""
    head = dumps({key: first})[:-1]  # {"key": first
    return head + b", " + dumps(event)[1:]


@pytest.mark.parametrize("event_type", schema.EVENT_TYPES)
def test_duplicate_keys_keep_the_last_value_or_hand_over(event_type: str) -> None:
    event = base_event(event_type)
    for key, value in event.items():
        for first in [value, None, "x", 12, [1], {"a": 1}]:
            body = with_duplicate(event, key, first)
            want, got = reference(body), fast_validate.decode_event(body)
            if got is not None:
                assert want is not None
                assert_same(got, want)
            elif want is not None:
                # Handed over: allowed only when the first value would be refused on its own,
                # which msgspec checks before it sees the second.
                alone = reference(dumps({**event, key: first}))
                assert alone is None or key == "event_type", (key, first)
        # A valid value given twice is accepted, the last one kept.
        body = with_duplicate(event, key, value)
        assert fast_validate.decode_event(body) is not None, key


def batch(events: list[Any], **extra: Any) -> bytes:
    return dumps({"events": events, **extra})


class _BatchBody(BaseModel):
    """The batch body as the server's pydantic path reads it (ingest._BatchBody)."""

    model_config = ConfigDict(extra="forbid")
    events: list[Event]


BATCH = TypeAdapter(_BatchBody)


def reference_body(body: bytes, shape: str) -> list[Any] | None:
    try:
        if shape == "batch":
            events = BATCH.validate_json(body).events
        elif body.lstrip()[:1] == b"[":
            events = EVENT_LIST_ADAPTER.validate_json(body)
        elif body.lstrip()[:1] == b"{":
            events = [EVENT_ADAPTER.validate_json(body)]
        else:
            return None
    except ValueError:
        return None
    return events or None


def every_type() -> list[dict[str, Any]]:
    return [base_event(t) for t in schema.EVENT_TYPES]


BODIES: list[tuple[str, bytes]] = [
    ("batch", batch(every_type())),
    ("batch", b"  \n" + batch(every_type()) + b"\n"),
    ("batch", batch([])),
    ("batch", batch(every_type(), extra=1)),
    ("batch", dumps({"event": every_type()})),
    ("batch", dumps({})),
    ("batch", dumps(every_type())),
    ("batch", batch([*every_type(), {"event_type": "error"}])),
    ("batch", batch([*every_type(), 1])),
    ("batch", batch(every_type())[:-5]),
    ("batch", batch(every_type()) + b"x"),
    ("batch", b""),
    ("batch", b"null"),
    ("batch", dumps({"events": None})),
    ("batch", dumps({"events": every_type()[0]})),
    ("events", dumps(every_type())),
    ("events", dumps(every_type()[3])),
    ("events", b" \t" + dumps(every_type()[3])),
    ("events", dumps([])),
    ("events", dumps([every_type()[0], "x"])),
    ("events", b'"x"'),
    ("events", b"7"),
    ("events", dumps({"events": every_type()})),
    ("events", dumps(every_type())[:-1]),
    # Escaped key names and tag values are the same keys and values.
    ("batch", batch(every_type()).replace(b'"events"', b'"\\u0065vents"')),
    ("batch", batch(every_type()).replace(b'"run_id"', b'"run\\u005fid"')),
    ("batch", batch(every_type()).replace(b'"error"', b'"\\u0065rror"')),
    ("batch", b"\xef\xbb\xbf" + batch(every_type())),  # a byte order mark
    ("batch", b'{"events": [], "events": ' + dumps(every_type()) + b"}"),
    ("batch", b'{"events": ' + dumps(every_type()) + b', "events": []}'),
]


@pytest.mark.parametrize(("shape", "body"), BODIES, ids=range(len(BODIES)))
def test_whole_bodies_in_every_shape(shape: Literal["batch", "events"], body: bytes) -> None:
    want = reference_body(body, shape)
    got = fast_validate.validate_fast(body, shape)
    if want is None:
        assert got is None
        return
    assert got is not None and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
    want_json = EVENT_LIST_ADAPTER.dump_json(want, exclude_none=True)
    assert_same_json(fast_validate.encode_events(got), want_json)


def test_mutable_defaults_are_not_shared() -> None:
    """Each event gets its own metadata dict, as pydantic's factories give (tags are a tuple,
    which cannot be changed in place)."""
    one = {"event_id": "e", "run_id": "r", "timestamp": "2026-01-01T00:00:00Z"}
    body = dumps([{**one, "event_type": "error", "error_type": "E", "error_message": "m"}] * 2)
    first, second = fast_validate.validate_fast(body, "events") or []
    first.metadata["k"] = 1
    assert second.tags == () and second.metadata == {}
    assert first.metadata is not second.metadata


def test_events_can_be_changed_as_the_pipeline_does() -> None:
    """ingest._finish sets project_id, the cost transform cost_source; both are kept, in the
    spool's form and in the model a plugin gets."""
    (event,) = fast_validate.validate_fast(dumps(base_event("prompt_call")), "events") or []
    event.project_id = "p"
    event.cost_source = "computed"
    assert fast_validate.to_model(event).model_dump()["project_id"] == "p"
    stored = json.loads(fast_validate.encode_events([event]))[0]
    assert stored["project_id"] == "p" and stored["cost_source"] == "computed"


def test_the_structs_are_not_tracked_by_the_collector() -> None:
    """What the writer holds in memory: no struct, no tags or tool-call tuple for the garbage
    collector to walk (once a young collection has passed over the fresh tuples)."""
    body = dumps([base_event(t) for t in schema.EVENT_TYPES])
    events = fast_validate.validate_fast(body, "events") or []
    gc.collect(0)
    assert len(events) == len(schema.EVENT_TYPES)
    for event in events:
        assert not gc.is_tracked(event), event.event_type
        assert not gc.is_tracked(event.tags), event.event_type
    prompt = events[0]
    assert prompt.event_type == "prompt_call" and prompt.tool_calls
    assert not gc.is_tracked(prompt.tool_calls) and not gc.is_tracked(prompt.tool_calls[0])


# --- the timestamp grammar (docs/EVENTS.md) and chat message content ----------------------------

# (text, the instant it stands for in UTC, or None: refused), for both validators.
TIMESTAMP_VERDICTS: list[tuple[str, str | None]] = [
    ("2026-01-01T12:00:00Z", "2026-01-01T12:00:00"),
    ("2026-01-01T12:00:00.5+01:00", "2026-01-01T11:00:00.5"),
    ("2026-01-01T12:00:00-00:00", "2026-01-01T12:00:00"),
    ("2026-01-01t12:00:00z", "2026-01-01T12:00:00"),  # RFC 3339 allows lower case
    ("2026-01-01 12:00:00.123-05:30", "2026-01-01T17:30:00.123"),  # and, per its note, a space
    ("2026-01-01T12:00:00.123456789Z", "2026-01-01T12:00:00.123456"),  # nanoseconds: truncated
    ("1700000000", None),  # epoch seconds, as a string
    ("1700000000000", None),  # epoch milliseconds, as a string
    ("1700000000.5", None),
    ("-1700000000", None),
    ("2026-01-01T12:00:00", None),  # no zone
    ("2026-01-01T12:00Z", None),  # no seconds
    ("2026-01-01T12:00:00+0100", None),  # offset without its colon
    ("2026-01-01T12:00:00+01", None),
    ("2026-01-01T12:00:00,5Z", None),  # comma before the fraction
    ("2026-01-01T12:00:00.Z", None),
    ("2026-01-01T12:00:00.1234567891Z", None),  # more than 9 fraction digits
    ("2026-01-01T12:00:00 Z", None),
    ("20260101T120000Z", None),
    ("\u0662\u0660\u0662\u0666-01-01T12:00:00Z", None),  # digits of another script
    ("2026-01-01T12:00:00Z\n", None),
    ("2026-02-30T00:00:00Z", None),  # the grammar fits; pydantic-core checks the date
    ("2100-01-01T00:00:00Z", None),  # and the range
]


@pytest.mark.parametrize(("text", "instant"), TIMESTAMP_VERDICTS)
def test_timestamp_grammar(text: str, instant: str | None) -> None:
    body = dumps({**base_event("error"), "timestamp": text})
    want = reference(body)
    got = fast_validate.decode_event(body)
    if instant is None:
        assert want is None and got is None, text
        with pytest.raises(ValidationError) as caught:
            EVENT_ADAPTER.validate_json(body)
        assert [e["loc"][-1] for e in caught.value.errors()] == ["timestamp"]
        return
    assert want is not None and got is not None, text
    assert_same(got, want)
    assert want.timestamp == datetime.fromisoformat(instant).replace(tzinfo=UTC)


@pytest.mark.parametrize("text", ["1700000000", "1700000000000", "2026-01-01T12:00"])
def test_a_refused_timestamp_names_the_field_and_the_form(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        EVENT_ADAPTER.validate_json(dumps({**base_event("error"), "timestamp": text}))
    (error,) = caught.value.errors()
    assert error["loc"][-1] == "timestamp"
    assert "timestamp must be RFC 3339" in error["msg"] and "2026-01-01T12:00:00Z" in error["msg"]


@pytest.mark.parametrize("literal", NOT_FINITE)
def test_chat_content_parts_must_be_finite(literal: str) -> None:
    """pydantic took NaN and 1e999 inside a message's content parts, and the spool then wrote
    null: now refused, by both validators, at the message's content."""
    parts = [{"type": "text", "text": "hi"}, {"type": "score", "value": Raw(literal)}]
    event = {**base_event("prompt_call"), "prompt": [{"role": "user", "content": parts}]}
    body = dumps(event)
    assert fast_validate.decode_event(body) is None
    with pytest.raises(ValidationError) as caught:
        EVENT_ADAPTER.validate_json(body)
    assert [e["msg"] for e in caught.value.errors() if e["type"] == "value_error"] == [
        "Value error, holds a number that is not finite (NaN or out of range)"
    ]
    assert [field["field"] for field in describe_errors(caught.value)] == ["prompt[0].content"]


def test_chat_content_is_bounded_as_json() -> None:
    """A list of parts is held to the free-form JSON size limit, as text is to its own."""
    big = [{"text": "x" * (schema.MAX_JSON_CHARS // 2)} for _ in range(3)]
    event = {**base_event("prompt_call"), "prompt": [{"role": "user", "content": big}]}
    body = dumps(event)
    assert reference(body) is None and fast_validate.decode_event(body) is None
    fine = {**event, "prompt": [{"role": "user", "content": big[:1]}]}
    assert check(Case(dumps(fine), "content at half the limit")) == "accepted"


@pytest.mark.parametrize(
    ("value", "verdict"),
    [
        ({"k": "\x01" * (schema.MAX_JSON_CHARS // 6 - 3)}, "accepted"),  # 6 bytes a char
        ({"k": "\x01" * (schema.MAX_JSON_CHARS // 6 + 1)}, "refused"),
        ({"k": "x" * (schema.MAX_JSON_CHARS - 8)}, "accepted"),  # over the cheap bound
        ({"k": "x" * (schema.MAX_JSON_CHARS - 7)}, "refused"),
        ({"n": 10**300, "k": "x"}, "accepted"),  # an integer of any length
        ({"n": 2**64, "m": -(2**63), "k": "x"}, "accepted"),
        ({"k": ["x" * (schema.MAX_JSON_CHARS - 10)]}, "accepted"),  # nested
        ({"k": ["x" * (schema.MAX_JSON_CHARS - 9)]}, "refused"),
        # Nested a few levels (OTLP's attributes): bounded as a flat object is.
        ({"a": {"b": "\x01" * (schema.MAX_JSON_CHARS // 6 - 20)}}, "accepted"),
        ({"a": {"b": "\x01" * (schema.MAX_JSON_CHARS // 6 - 2)}}, "accepted"),
        ({"a": {"b": "\x01" * (schema.MAX_JSON_CHARS // 6 + 1)}}, "refused"),
        ({"a": [{"b": "x" * (schema.MAX_JSON_CHARS - 16)}]}, "accepted"),
        ({"a": [{"b": "x" * (schema.MAX_JSON_CHARS - 15)}]}, "refused"),
        ({"a": [["\x01" * (schema.MAX_JSON_CHARS // 12)] * 2]}, "refused"),
        ({"a": [1.5, None, True, -(2**63), "x"], "b": {"c": [2**64]}}, "accepted"),
        ({"a": {"b": {"c": {"d": {"e": "x" * (schema.MAX_JSON_CHARS - 32)}}}}}, "accepted"),
        ({"a": {"b": {"c": {"d": {"e": "x" * (schema.MAX_JSON_CHARS - 31)}}}}}, "refused"),
        ({"otel.kind": "client", "otel.attributes": {"k": 1, "l": [1, 2], "m": {}}}, "accepted"),
    ],
    ids=range(18),
)
def test_metadata_near_the_size_limit(value: dict[str, Any], verdict: str) -> None:
    """The fast path skips the JSON size check only where it cannot fail (an object nested a
    few levels whose text is surely short): at the limit, both validators measure, and agree."""
    body = dumps({**base_event("error"), "metadata": value})
    assert check(Case(body, "metadata near the limit")) == verdict


# --- what msgspec cannot state goes to pydantic, field by field ----------------------------------


class _Toy(BaseModel):
    """Types and constraints the event contract does not use today (lax numbers, multiple_of,
    naive datetimes, a model config that refuses NaN): a new field like these is validated by
    pydantic itself, not skipped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n: int = 0
    ratio: float | None = None
    half: Annotated[float, Field(multiple_of=0.5, strict=True)] | None = None
    when: datetime | None = None
    codes: list[Annotated[str, Field(max_length=3)]] = Field(default_factory=list)


TOY_BODIES = [
    b"{}",
    b'{"n": "5"}',
    b'{"n": 5.0}',
    b'{"n": 5.5}',
    b'{"n": true}',
    b'{"ratio": "1.5"}',
    b'{"ratio": NaN}',
    b'{"ratio": "inf"}',
    b'{"half": 1.5}',
    b'{"half": 1.2}',
    b'{"half": 2}',
    b'{"half": "2"}',
    b'{"when": "2026-01-01"}',
    b'{"when": "2026-01-01T00:00:00+01:00"}',
    b'{"when": 0}',
    b'{"when": "soon"}',
    b'{"codes": ["abc"]}',
    b'{"codes": ["abcd"]}',
    b'{"other": 1}',
]


@pytest.mark.parametrize("body", TOY_BODIES)
def test_fields_msgspec_cannot_state_are_checked_by_pydantic(body: bytes) -> None:
    try:
        want = _Toy.model_validate_json(body)
    except ValidationError:
        want = None
    got = fast_validate.validator_for(_Toy)(body)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert_same(got, want)
