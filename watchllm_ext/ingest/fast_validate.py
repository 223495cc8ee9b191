"""A fast validator for the v1 event contract: msgspec structs derived from the pydantic models.

`validate_fast(body, shape)` decodes and checks a raw body in one msgspec pass into event
structs, or returns None when anything is off or unusual; the caller then asks pydantic for
the detailed, per-field answer. It never accepts what pydantic refuses, and never builds
different events: tests/test_fast_validate.py checks both on generated valid and mutated
events. The structs are what the server carries from validation to the spool and out to the
sinks (no pydantic model on the hot path):

- same field names as the models, in the same order; `event.event_type` is a class attribute
  (the union's tag); a field the body leaves out holds the model's default;
- lists are tuples, and the structs are `gc=False`: the writer holds up to 500,000 recent
  events in memory, and containers the collector tracks would make every full collection
  walk all of them (free-form JSON, such as metadata, stays dicts and lists as decoded);
- `encode_events` writes them as pydantic's `dump_json(exclude_none=True)` would (same keys
  and values: None fields left out, defaults written); `decode_stored` reads that form back
  (and the form the pydantic encoder wrote before), with the server-set cost_source allowed;
- `to_model` / `from_models` convert for plugins that implement validate_event or
  transform_events (only then: validate.py).

One source of truth: the structs are built at import from schema.py's models (field names,
order, optionality, defaults, string/list/number constraints), so a new field or bound cannot
be forgotten. A type or constraint this module does not mirror is never skipped: that field is
validated by pydantic itself (a TypeAdapter of the field's own annotation), and what cannot
be handled that way (model validators, aliases, serializers) makes the import fail. What
msgspec cannot express is checked after decoding:
- timestamps (schema.py's RFC 3339 grammar in a before-validator, then pydantic's parsing, a
  required zone, a range): the canonical `2026-01-01T12:00:00.123Z` form (a subset of that
  grammar) is parsed here, any other string by pydantic's validator of the field, which runs
  the before-validator too;
- after-validators (the JSON size and finiteness checks) run on the decoded value, as pydantic
  runs them;
- string patterns: pydantic's `$` is Rust's end of text, Python's `\\Z`;
- a field with a field validator (cost_source: only the server sets it) is never accepted here:
  when the body names it, pydantic decides.
Left to pydantic (None here; rare, and pydantic's answer is the one that counts): number
literals msgspec refuses (NaN, Infinity, 1e999: pydantic refuses them too, free-form JSON
and chat message content included), free-form JSON nested within a few levels of pydantic's
depth limit, and a key given twice whose first value is invalid (or event_type given twice,
differently).
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PydanticUserError,
    Strict,
    TypeAdapter,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema
from pydantic.types import AllowInfNan
from pydantic_core import PydanticUndefined

from ..schema import EVENT_LIST_ADAPTER, MAX_JSON_CHARS, Event, _check_json_size

__all__ = [
    "EVENT_STRUCTS",
    "EVENT_STRUCT_TYPES",
    "decode_event",
    "decode_stored",
    "encode_event_lines",
    "encode_events",
    "from_models",
    "to_model",
    "to_models",
    "validate_fast",
    "validate_list",
    "validator_for",
]

_UNSET = msgspec.UNSET
_NONE_TYPE = type(None)
_SKIP_JSON_SCHEMA = type(SkipJsonSchema())


class _Decline(ValueError):
    """The fast path will not answer this body; pydantic will."""


class _Unsupported(TypeError):
    """An annotation msgspec cannot state exactly: the field goes to pydantic's adapter."""


# --- constraints -----------------------------------------------------------------------------


def _flatten_metadata(metadata: list[Any]) -> list[Any]:
    """StringConstraints and nested FieldInfos unpacked into single constraints."""
    out: list[Any] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            if item.default is not PydanticUndefined or item.default_factory is not None:
                raise _Unsupported(f"a default inside an annotation: {item!r}")
            out.extend(_flatten_metadata(list(item.metadata)))
        elif isinstance(item, at.GroupedMetadata) and not isinstance(item, at.BaseMetadata):
            out.extend(_flatten_metadata(list(item)))
        else:
            out.append(item)
    return out


def _python_pattern(pattern: str) -> str:
    """pydantic matches with Rust's regex, where `$` is the end of the text; in Python `$` also
    matches before a final newline, so "id\\n" would pass. `\\Z` is Rust's `$`."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if "$" in pattern.replace("\\$", ""):
        raise _Unsupported(f"pattern {pattern!r} uses $ inside")
    re.compile(pattern)
    return pattern


def _meta(base: Any, constraints: list[Any]) -> Any:
    """`base` with pydantic's constraints as a msgspec Meta; _Unsupported for anything else."""
    kwargs: dict[str, Any] = {}
    strict = False
    for c in constraints:
        if isinstance(c, Strict):
            strict = c.strict
        elif isinstance(c, at.Ge):
            kwargs["ge"] = c.ge
        elif isinstance(c, at.Gt):
            kwargs["gt"] = c.gt
        elif isinstance(c, at.Le):
            kwargs["le"] = c.le
        elif isinstance(c, at.Lt):
            kwargs["lt"] = c.lt
        elif isinstance(c, at.MinLen):
            kwargs["min_length"] = c.min_length
        elif isinstance(c, at.MaxLen):
            kwargs["max_length"] = c.max_length
        elif isinstance(c, _SKIP_JSON_SCHEMA):
            pass  # documentation only
        elif isinstance(c, AllowInfNan) and not c.allow_inf_nan:
            pass  # msgspec never decodes NaN or an infinity (1e999 refuses the document)
        elif type(c).__name__ == "_PydanticGeneralMetadata":
            for key, value in vars(c).items():
                if key == "pattern" and value is not None:
                    kwargs["pattern"] = _python_pattern(value)
                elif key == "allow_inf_nan" and value is False:
                    pass
                elif key == "strict":
                    strict = bool(value)
                elif value is not None:
                    raise _Unsupported(f"constraint {key}={value!r}")
        else:
            raise _Unsupported(f"constraint {c!r}")
    # pydantic's lax int/float/bool take strings ("1", "1.5", "true"); msgspec never does.
    if base in (int, float, bool) and not strict:
        raise _Unsupported(f"a non-strict {base.__name__}")
    if base is bool and {"ge", "gt", "le", "lt"} & kwargs.keys():
        raise _Unsupported("bounds on a bool")
    if not kwargs:
        return base
    if base is float and any(isinstance(kwargs.get(k), int) for k in ("ge", "gt", "le", "lt")):
        kwargs = {k: float(v) if k in ("ge", "gt", "le", "lt") else v for k, v in kwargs.items()}
    return Annotated[base, msgspec.Meta(**kwargs)]


# --- structs from models -----------------------------------------------------------------------


class _Plan:
    """How one model maps to its struct, and how a decoded struct is finished."""

    __slots__ = ("finish", "fixes", "model", "stored", "stored_fixes", "struct", "tag")

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self.struct: Any = None
        # The struct the server's own stored form is read with (spool, dead letters): the
        # same but for fields only the server may set (cost_source), which it takes.
        self.stored: Any = None
        self.tag: str | None = None
        # (name, fix): a fix takes the decoded value and returns the model's value; it runs
        # on fields holding something other than None or an empty container.
        self.fixes: list[tuple[str, Callable[[Any], Any]]] = []
        self.stored_fixes: list[tuple[str, Callable[[Any], Any]]] = []
        self.finish: Callable[[Any], Any] | None = None


_PLANS: dict[type[BaseModel], _Plan] = {}
_STRUCT_PLANS: dict[type, _Plan] = {}
_EMPTY: tuple[()] = ()


def _empty_tuple() -> tuple[()]:
    return _EMPTY


def _constant(value: Any) -> Callable[[], Any]:
    # A factory rather than a plain default: msgspec's omit_defaults leaves out a value that
    # *is* the default, and pydantic's dump_json(exclude_none=True) writes defaults.
    def make() -> Any:
        return value

    return make


def _default_of(model: type[BaseModel], name: str, info: FieldInfo) -> Any:
    """The struct default of a field: None as is, anything else from a factory (fresh
    containers per event, lists as tuples; see _constant)."""
    if info.default_factory is not None:
        if info.default_factory_takes_validated_data:
            raise _Unsupported(f"{model.__name__}.{name}: a factory taking the data")
        made = info.default_factory()  # type: ignore[call-arg]
        if made == [] and type(made) is list:
            return msgspec.field(default_factory=_empty_tuple)
        if made == {} and type(made) is dict:
            return msgspec.field(default_factory={}.copy)  # a method, so never omitted
        raise _Unsupported(f"{model.__name__}.{name}: a factory of {made!r}")
    if info.default is None:
        return None
    hash(info.default)  # a mutable default would be shared between events
    return msgspec.field(default_factory=_constant(info.default))


def _plan_for(model: type[BaseModel], tag_field: str | None = None) -> _Plan:
    if model in _PLANS:
        return _PLANS[model]
    config = model.model_config
    if config.get("extra") != "forbid":
        raise _Unsupported(f"{model.__name__} does not forbid extra fields")
    if config.get("strict") or config.get("populate_by_name") or config.get("alias_generator"):
        raise _Unsupported(f"{model.__name__}: a model config this module does not mirror")
    decorators = model.__pydantic_decorators__
    if (
        decorators.model_validators
        or decorators.root_validators
        or decorators.validators
        or decorators.field_serializers
        or decorators.model_serializers
        or decorators.computed_fields
    ):
        raise _Unsupported(f"{model.__name__} has validators or serializers on the whole model")
    validated_fields = {f for d in decorators.field_validators.values() for f in d.info.fields}
    if "*" in validated_fields:
        raise _Unsupported(f"{model.__name__} has a field validator on every field")

    plan = _Plan(model)
    _PLANS[model] = plan
    struct_fields: list[tuple[str, Any, Any]] = []
    stored_fields: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        if info.alias not in (None, name) or info.validation_alias not in (None, name):
            raise _Unsupported(f"{model.__name__}.{name} has an alias")
        metadata = _flatten_metadata(list(info.metadata))
        if name == tag_field:
            args = get_args(info.annotation)
            if get_origin(info.annotation) is not Literal or len(args) != 1 or metadata:
                raise _Unsupported(f"{model.__name__}.{name} is not a single literal tag")
            plan.tag = args[0]
            continue
        required = info.is_required()
        default = msgspec.NODEFAULT if required else _default_of(model, name, info)
        if name in validated_fields:
            # What the validator does is not ours to guess: a body naming the field goes to
            # pydantic (for cost_source, which only the server sets, that is a refusal). Any
            # value given, null included, decodes to a Raw, never to the default None.
            if required or default is not None:
                raise _Unsupported(f"{model.__name__}.{name}: a validated field without None")
            struct_fields.append((name, msgspec.Raw, None))
            plan.fixes.append((name, _decline_if_set))
            # The stored form holds what the server set: the field's own type (the
            # validator lets anything through in the `trusted` context).
            plain = [m for m in metadata if not isinstance(m, _SKIP_JSON_SCHEMA)]
            try:
                ms_type, fix = _field_type(info.annotation, plain)
            except _Unsupported:
                ms_type, fix = _optional_adapter_field(info.annotation, plain, config)
            stored_fields.append((name, ms_type, default))
            if fix is not None:
                plan.stored_fixes.append((name, fix))
            continue
        try:
            ms_type, fix = _field_type(info.annotation, metadata)
        except _Unsupported:
            ms_type, fix = _optional_adapter_field(info.annotation, metadata, config)
        struct_fields.append((name, ms_type, default))
        stored_fields.append((name, ms_type, default))
        if fix is not None:
            plan.fixes.append((name, fix))
            plan.stored_fixes.append((name, fix))
    options: dict[str, Any] = {}
    if plan.tag is not None:
        # The tag is no struct field: a class attribute makes `event.event_type` read as
        # on the model.
        options = {"tag_field": tag_field, "tag": plan.tag, "namespace": {tag_field: plan.tag}}
    # gc=False: decoded JSON holds no cycles, so the collector need not track the structs.
    # omit_defaults with None as the only plain default: None fields are left out, as
    # pydantic's exclude_none does.
    plan.struct = msgspec.defstruct(
        f"{model.__name__}Struct",
        struct_fields,
        kw_only=True,
        forbid_unknown_fields=True,
        gc=False,
        omit_defaults=True,
        **options,
    )
    plan.stored = plan.struct
    if stored_fields != struct_fields:
        plan.stored = msgspec.defstruct(
            f"Stored{model.__name__}Struct",
            stored_fields,
            kw_only=True,
            forbid_unknown_fields=True,
            gc=False,
            omit_defaults=True,
            **options,
        )
        _STRUCT_PLANS[plan.stored] = plan
    _STRUCT_PLANS[plan.struct] = plan
    plan.finish = _finisher(plan.fixes) if plan.fixes else None
    return plan


_SKIP_FIX = (dict, tuple, list)  # empty ones pass every check: no fix needed


def _finisher(fixes: list[tuple[str, Callable[[Any], Any]]]) -> Callable[[Any], Any]:
    """What finishes a decoded struct in place: each fix on its field's value. Written out
    as straight-line code (attribute reads, no getattr loop): it runs once per event."""
    for name, _fix in fixes:
        if not name.isidentifier():
            raise _Unsupported(f"field {name!r} is not an identifier")
    lines = ["def finish(struct):"]
    scope: dict[str, Any] = {"_SKIP_FIX": _SKIP_FIX}
    for i, (name, fix) in enumerate(fixes):
        scope[f"fix{i}"] = fix
        lines += [
            f"    value = struct.{name}",
            "    if value is not None and (type(value) not in _SKIP_FIX or value):",
            f"        struct.{name} = fix{i}(value)",
        ]
    lines.append("    return struct")
    exec("\n".join(lines), scope)  # the names are identifiers (checked), the code ours
    return scope["finish"]  # type: ignore[no-any-return]


def _field_type(annotation: Any, metadata: list[Any]) -> tuple[Any, Callable[[Any], Any] | None]:
    """The msgspec type of a field, and the fix its decoded value needs (None: none)."""
    after: list[Callable[[Any], Any]] = []
    rest: list[Any] = []
    for c in metadata:
        if isinstance(c, AfterValidator):
            if len(inspect.signature(c.func).parameters) != 1:
                raise _Unsupported("an after-validator that takes validation info")
            after.append(c.func)
        elif isinstance(c, BeforeValidator):
            raise _Unsupported("a before-validator")
        else:
            rest.append(c)
    ms_type, convert = _type(annotation, rest)
    if _holds_any(ms_type):
        after.insert(0, _check_depth)
    if not after:
        return ms_type, convert
    if convert is not None:
        raise _Unsupported("an after-validator or free-form JSON beside models")
    if len(after) == 1:
        return ms_type, after[0]  # ValueError: pydantic refuses it too

    def fix(value: Any) -> Any:
        for func in after:
            value = func(value)  # ValueError: pydantic refuses it too
        return value

    if after == [_check_depth, _check_json_size]:
        return ms_type, partial(_free_json, fix)
    return ms_type, fix


_ATOM_CHARS = 28  # the longest JSON text of a 64-bit int, a float, true or null
_ATOMS = (float, bool, type(None))
# How deep _free_json works a bound out itself: an OTLP event's metadata holds an object of
# attributes, its response_metadata a list; deeper values get the checks. Far within the depth
# budget, so the depth check cannot fail on a value walked whole.
_BOUND_LEVELS = 4
_UNBOUNDED = float("inf")


def _free_json(checks: Callable[[Any], Any], value: Any) -> Any:
    """schema's JSON checks of a free-form value, skipped where they cannot fail. Finite it
    is: msgspec decodes no NaN, no infinity. Anything near a limit gets the checks themselves.

    A short value (most metadata) is measured by its JSON text as msgspec writes it, in C: a
    text under _SHORT_JSON_CHARS cannot nest containers as deep as the depth budget (each
    level takes two characters), and pydantic's text of it is at most 6 times as long (a
    character written as an escape; a number's text is at most 4.5 times its shortest form,
    1e15 -> 1000000000000000.0), far within MAX_JSON_CHARS. A longer one nested at most
    _BOUND_LEVELS deep has its bound worked out in Python (_json_bound)."""
    if len(_encode_free(value)) < _SHORT_JSON_CHARS:
        return value
    return value if _json_bound(value, _BOUND_LEVELS) <= MAX_JSON_CHARS else checks(value)


_encode_free = msgspec.json.Encoder().encode


def _json_bound(value: Any, levels: int) -> float:
    """At least the length of `value`'s JSON text; infinite when not worked out here: a
    container nested more than `levels` deep, or an integer of any length (msgspec keeps it)."""
    kind = type(value)
    if kind is dict:
        if not levels:
            return _UNBOUNDED
        bound = 2
        for key, item in value.items():
            kind = type(item)
            if kind is str:  # quotes, colon and comma: 6
                bound += 6 * (len(key) + len(item)) + 6
            elif kind in _ATOMS or (kind is int and item.bit_length() <= 64):
                bound += 6 * len(key) + _ATOM_CHARS
            else:
                bound += 6 * len(key) + 4 + _json_bound(item, levels - 1)
        return bound
    if kind is list or kind is tuple:
        if not levels:
            return _UNBOUNDED
        bound = 2
        for item in value:
            bound += 1 + _json_bound(item, levels - 1)
        return bound
    if kind is str:
        return 6 * len(value) + 2
    if kind is int and value.bit_length() > 64:
        return _UNBOUNDED
    return _ATOM_CHARS


def _type(tp: Any, constraints: list[Any]) -> tuple[Any, Callable[[Any], Any] | None]:
    """A msgspec type for `tp` and a converter from its decoded value to pydantic's value."""
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extra = get_args(tp)
        return _type(inner, [*_flatten_metadata(extra), *constraints])
    if origin in (Union, types.UnionType):
        if constraints:
            raise _Unsupported("constraints on a union")
        members = [_type(arg, []) for arg in get_args(tp)]
        ms_union = Union[tuple(m for m, _ in members)]  # noqa: UP007 - built at run time
        converters = [c for _, c in members if c is not None]
        if not converters:
            return ms_union, None
        # The decoded value is a dict for a model, a list for a list of them: with one model
        # type in the union and no other dict or list, its kind says which converter applies.
        kinds = [_kind(m) for m, _ in members]
        if (
            len(converters) > 1
            or "any" in kinds
            or any(kinds.count(k) > 1 for k in ("dict", "list"))
        ):
            raise _Unsupported(f"{tp!r}: models beside other objects or lists")
        convert = converters[0]
        kind = kinds[[c is not None for _, c in members].index(True)]
        wanted = members[[c is not None for _, c in members].index(True)][0]
        if kind == "list":
            wanted = tuple
        elif get_origin(wanted) is Annotated:
            wanted = get_args(wanted)[0]

        def convert_member(value: Any) -> Any:
            return convert(value) if type(value) is wanted else value

        return ms_union, convert_member
    if origin is Literal:
        if constraints or not all(isinstance(a, str) for a in get_args(tp)):
            raise _Unsupported(f"{tp!r}")
        return tp, None
    if origin is list:
        # A tuple: no list for the collector to track (module docstring).
        (item,) = get_args(tp)
        item_type, convert = _type(item, [])
        tuple_type = _meta(tuple[item_type, ...], constraints)  # type: ignore[valid-type]
        if convert is None:
            return tuple_type, None
        convert_item = convert

        def convert_items(value: tuple[Any, ...]) -> tuple[Any, ...]:
            for v in value:
                convert_item(v)  # finishes the struct in place
            return value

        return tuple_type, convert_items
    if origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise _Unsupported(f"{tp!r}")
        value_type, convert = _type(value, [])
        if convert is not None:
            raise _Unsupported("models inside a dict")
        return _meta(dict[str, value_type], constraints), None  # type: ignore[valid-type]
    if tp is Any:
        if constraints:
            raise _Unsupported("constraints on Any")
        return Any, None
    if tp is _NONE_TYPE or tp is None:
        return _NONE_TYPE, None
    if tp in (str, int, float, bool):
        return _meta(tp, constraints), None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if constraints:
            raise _Unsupported("constraints on a model")
        plan = _plan_for(tp)
        return plan.struct, plan.finish
    raise _Unsupported(f"{tp!r}")


def _kind(ms_type: Any) -> str:
    """What a msgspec type decodes to, as far as telling union members apart needs."""
    if get_origin(ms_type) is Annotated:
        ms_type = get_args(ms_type)[0]
    origin = get_origin(ms_type) or ms_type
    if origin is dict or (isinstance(origin, type) and issubclass(origin, msgspec.Struct)):
        return "dict"
    if origin is Any:
        return "any"
    return "list" if origin in (list, tuple) else "scalar"


def _holds_any(ms_type: Any) -> bool:
    """Free-form JSON somewhere in this type (not looking into nested structs)."""
    return ms_type is Any or any(_holds_any(arg) for arg in get_args(ms_type))


def _json_depth_limit() -> int:
    """The deepest nesting pydantic-core's JSON parser accepts (201 in pydantic 2.13),
    measured rather than copied, so a new version cannot make the two disagree."""
    adapter: TypeAdapter[Any] = TypeAdapter(Any)
    low, high = 1, 10_000
    while low < high:
        mid = (low + high + 1) // 2
        try:
            adapter.validate_json("[" * mid + "]" * mid)
            low = mid
        except ValueError:
            high = mid - 1
    return low


_CONTAINERS = (dict, list, tuple)
# A free-form value sits inside at most a batch object, its list, the event, and a list and
# an object per nested model (set below, once the models are known); deeper values are handed
# to pydantic, which judges them by their place in the document. Plenty for real metadata.
_DEPTH_BUDGET = 0


def _too_deep(value: Any, budget: int) -> bool:
    if budget <= 0:
        return True
    for item in value.values() if type(value) is dict else value:
        if type(item) in _CONTAINERS and _too_deep(item, budget - 1):
            return True
    return False


def _check_depth(value: Any) -> Any:
    if type(value) in _CONTAINERS and _too_deep(value, _DEPTH_BUDGET):
        raise _Decline
    return value


def _decline_if_set(value: Any) -> Any:
    raise _Decline  # fixes run only on fields the body names


# --- fields pydantic checks itself -------------------------------------------------------------

# The form clients send: date, T, time, at most 6 fractional digits, Z or a +hh:mm offset.
# A subset of schema.py's grammar that fromisoformat reads as pydantic does; ASCII digits
# only (\d would match other scripts' digits).
_CANONICAL_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)


def _optional_adapter_field(
    annotation: Any, metadata: list[Any], config: ConfigDict
) -> tuple[Any, Callable[[Any], Any]]:
    """`_adapter_field`, and for `X | None` (an optional timestamp) X's own handling with null
    passed through, so the canonical timestamp form keeps its fast parse."""
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    inner = [a for a in args if a is not _NONE_TYPE]
    if metadata or len(args) != 2 or len(inner) != 1:
        return _adapter_field(annotation, metadata, config)
    base, inner_meta = inner[0], []
    if get_origin(base) is Annotated:
        base, *extra = get_args(base)
        inner_meta = _flatten_metadata(extra)
    ms_type, fix = _adapter_field(base, inner_meta, config)
    if ms_type is msgspec.Raw:  # a Raw cannot share a union: pydantic's adapter takes null too
        return _adapter_field(annotation, metadata, config)
    fix_value = fix

    def fix_or_none(value: Any) -> Any:
        return None if value is None else fix_value(value)

    return Union[ms_type, None], fix_or_none  # noqa: UP007 - built at run time


def _adapter_field(
    annotation: Any, metadata: list[Any], config: ConfigDict
) -> tuple[Any, Callable[[Any], Any]]:
    """For a type msgspec cannot state exactly: keep the raw JSON value and validate it with
    pydantic's own validator of the field (exact by construction), under the model's config
    (allow_inf_nan and the like). For an aware datetime checked by a range, the string is kept
    instead and the canonical form parsed here."""
    tp = Annotated[annotation, *metadata] if metadata else annotation
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(tp, config=config)
    except PydanticUserError:  # a model type, which brings its own config
        adapter = TypeAdapter(tp)
    validate_json = adapter.validate_json

    def fix(raw: Any) -> Any:
        # Only a value the body gave is a Raw; a default the struct filled in is the model's.
        return validate_json(bytes(raw)) if type(raw) is msgspec.Raw else raw

    lower: datetime | None = None
    upper: datetime | None = None
    for c in metadata:
        if isinstance(c, at.Ge):
            lower = c.ge
        elif isinstance(c, at.Lt):
            upper = c.lt
        elif isinstance(c, at.BaseMetadata):
            lower = upper = None
            break
    if annotation is not AwareDatetime or lower is None or upper is None:
        return msgspec.Raw, fix
    # Only strings: a number is refused by schema.py's before-validator, and if it ever were
    # not, declining here (msgspec refuses the type) still leaves the answer to pydantic.
    validate_str = adapter.validate_python
    match = _CANONICAL_TIMESTAMP.fullmatch
    fromisoformat = datetime.fromisoformat

    def fix_timestamp(text: str) -> Any:
        if match(text) is not None:
            try:
                value = fromisoformat(text)
            except ValueError:  # 24:00, 23:59:60, day 31 of April...: pydantic decides
                return validate_str(text)
            # A datetime.timezone where pydantic puts its TzInfo: equal values, same JSON.
            if lower <= value < upper:
                return value
            raise _Decline
        return validate_str(text)

    return str, fix_timestamp


# --- the event structs ---------------------------------------------------------------------------


def _event_union() -> tuple[str, list[type[BaseModel]]]:
    union, *metadata = get_args(Event)
    discriminator = [m.discriminator for m in metadata if isinstance(m, FieldInfo)]
    if len(discriminator) != 1 or not isinstance(discriminator[0], str):
        raise _Unsupported("Event is not a union discriminated by a field name")
    return discriminator[0], list(get_args(union))


_TAG_FIELD, _EVENT_MODELS = _event_union()
EVENT_STRUCTS: dict[str, Any] = {}
_STORED_STRUCTS: dict[str, Any] = {}
for _model in _EVENT_MODELS:
    _plan = _plan_for(_model, _TAG_FIELD)
    EVENT_STRUCTS[_plan.tag] = _plan.struct  # type: ignore[index]
    _STORED_STRUCTS[_plan.tag] = _plan.stored  # type: ignore[index]
_DEPTH_BUDGET = _json_depth_limit() - 3 - 2 * len(_PLANS)  # 176 with pydantic 2.13
# A JSON text shorter than this nests containers less deep than _DEPTH_BUDGET + 1, and is
# within MAX_JSON_CHARS however pydantic writes it (_free_json).
_SHORT_JSON_CHARS = min(2 * (_DEPTH_BUDGET + 1), MAX_JSON_CHARS // 6)
_EventStruct = Union[tuple(EVENT_STRUCTS.values())]  # noqa: UP007 - built at run time
_StoredStruct = Union[tuple(_STORED_STRUCTS.values())]  # noqa: UP007 - built at run time
# Every struct type an event can be, for a cheap `type(x) in EVENT_STRUCT_TYPES`.
EVENT_STRUCT_TYPES = frozenset(EVENT_STRUCTS.values()) | frozenset(_STORED_STRUCTS.values())
# type -> finish (None: nothing to finish), for the input and for the stored form.
_FINISH: dict[type, Callable[[Any], Any] | None] = {
    p.struct: p.finish for p in _PLANS.values() if p.tag is not None
}
_FINISH_STORED: dict[type, Callable[[Any], Any] | None] = {
    p.stored: _finisher(p.stored_fixes) if p.stored_fixes else None
    for p in _PLANS.values()
    if p.tag is not None
}


class _Batch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    events: list[_EventStruct]  # type: ignore[valid-type]


_decode_batch = msgspec.json.Decoder(_Batch).decode
_decode_list = msgspec.json.Decoder(list[_EventStruct]).decode  # type: ignore[valid-type]
_decode_one = msgspec.json.Decoder(_EventStruct).decode
_decode_stored_list = msgspec.json.Decoder(list[_StoredStruct]).decode  # type: ignore[valid-type]

# What makes the fast path hand a body over (pydantic's ValidationError is a ValueError).
_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, ValueError, RecursionError, _Decline)


def _finished(structs: list[Any]) -> list[Any]:
    finish = _FINISH
    for struct in structs:
        fix = finish[type(struct)]
        if fix is not None:
            fix(struct)
    return structs


def decode_event(body: bytes) -> Any | None:
    """One event from its JSON, as its struct; None when pydantic should answer."""
    try:
        return _finished([_decode_one(body)])[0]
    except _ERRORS:
        return None


def validator_for(model: type[BaseModel]) -> Callable[[bytes], Any | None]:
    """A fast validator of one JSON object for any strict model (`extra="forbid"`), built as
    the event structs are: the struct, or None when pydantic should answer."""
    plan = _plan_for(model)
    decode = msgspec.json.Decoder(plan.struct).decode
    finish = plan.finish

    def validate(body: bytes) -> Any | None:
        try:
            struct = decode(body)
            return finish(struct) if finish is not None else struct
        except _ERRORS:
            return None

    return validate


def validate_fast(body: bytes, shape: Literal["batch", "events"]) -> list[Any] | None:
    """The events of a valid body as structs, or None (then pydantic finds what is off and
    says where). `shape` as in ingest.validate_fast: "batch" is `{"events": [...]}`, "events"
    a list of events or one event."""
    try:
        if shape == "batch":
            structs = _decode_batch(body).events
        else:
            first = body.lstrip()[:1]
            if first == b"[":
                structs = _decode_list(body)
            elif first == b"{":
                structs = [_decode_one(body)]
            else:
                return None
        return _finished(structs) or None
    except _ERRORS:
        return None


def validate_list(body: bytes) -> list[Any] | None:
    """A JSON array of events as structs, or None (ingest.validate_sliced's pieces)."""
    try:
        return _finished(_decode_list(body))
    except _ERRORS:
        return None


# --- the stored form -------------------------------------------------------------------------


def _encode_hook(value: Any) -> Any:
    if isinstance(value, BaseModel):  # a model from the slow path or a plugin
        return value.model_dump(mode="json", exclude_none=True)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_encode_hook)
# Events (structs, or models: the enc_hook) as a JSON array: the spool's form; and as one
# object a line (JSONEachRow). Both about 0.5 us an event.
encode_events: Callable[[Any], bytes] = _encoder.encode
encode_event_lines: Callable[[Any], bytes] = _encoder.encode_lines


def decode_stored(payload: bytes) -> list[Any]:
    """A JSON array of stored events (what encode_events wrote, or pydantic's dump_json
    before it) as structs: checked as strictly as a request, the server-set cost_source
    allowed. Raises ValueError (a msgspec error or a refused value) when it is not valid;
    the caller then asks pydantic, which says why or reads what this does not."""
    structs = _decode_stored_list(payload)
    finish = _FINISH_STORED
    for struct in structs:
        fix = finish[type(struct)]
        if fix is not None:
            fix(struct)
    return structs


TRUSTED = {"trusted": True}  # the context of events the server made (cost_source)


def read_stored(payload: bytes) -> list[Any]:
    """decode_stored, and where msgspec hands over (free-form JSON nested near pydantic's
    depth limit, which the detailed path accepts), pydantic's models of the same events:
    every record the server wrote reads back. Raises ValidationError for one that is not
    stored events at all."""
    try:
        return decode_stored(payload)
    except (ValueError, RecursionError):  # msgspec's errors are ValueErrors
        return EVENT_LIST_ADAPTER.validate_json(payload, context=TRUSTED)


_new = object.__new__
_set = object.__setattr__


def _model_value(value: Any) -> Any:
    # Typed lists are tuples of values or structs; free-form JSON holds neither (dicts and
    # lists as decoded), so it is taken as it is.
    kind = type(value)
    if kind is tuple:
        return [_model_value(v) for v in value]
    if kind in _STRUCT_PLANS:
        return to_model(value)
    return value


def to_model(struct: Any) -> Any:
    """The pydantic model of a struct (for a plugin's hook): the same values, lists for
    tuples, models for nested structs; fields_set holds the fields that are not None. Built
    as model_construct does, at a fraction of its cost: the values are valid already."""
    plan = _STRUCT_PLANS[type(struct)]
    data: dict[str, Any] = {}
    for name in plan.model.model_fields:
        data[name] = (
            plan.tag if name == _TAG_FIELD and plan.tag else _model_value(getattr(struct, name))
        )
    model = _new(plan.model)
    _set(model, "__dict__", data)
    _set(model, "__pydantic_fields_set__", {k for k, v in data.items() if v is not None})
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def to_models(events: Sequence[Any]) -> list[Any]:
    """`to_model` of each struct; anything else (a model already) as it is."""
    return [to_model(e) if type(e) in _STRUCT_PLANS else e for e in events]


_MODELS_LIST: TypeAdapter[list[Any]] = TypeAdapter(list[Event])


def from_models(events: list[Any]) -> tuple[list[Any], bytes]:
    """Events that may be models (a plugin's, the slow path's) as structs, with their JSON
    (the spool's form, made once for both)."""
    if all(type(e) in EVENT_STRUCT_TYPES for e in events):
        return events, encode_events(events)
    payload = _MODELS_LIST.dump_json(events, exclude_none=True)
    try:
        return decode_stored(payload), payload
    except _ERRORS:
        # Valid for pydantic, handed over by msgspec (free-form JSON nested near pydantic's
        # depth limit, say): these few stay models, which sinks read alike (module docstring).
        return list(events), payload


# --- events the server built itself ----------------------------------------------------------


def _maker(struct: Any) -> Callable[[dict[str, Any]], Any]:
    """What makes `struct` from a dict of its fields as a builder gives them: typed lists as
    tuples, nested models as their structs (from dicts), as decoding makes them. A value of
    another shape than the field's raises TypeError (the caller declines)."""
    plans: list[tuple[str, Any, Any, bool]] = []  # name, direct model, item model, list
    for f in msgspec.structs.fields(struct):
        direct = item = None
        is_list = False
        members = get_args(f.type) if get_origin(f.type) is Union else (f.type,)
        for member in members:
            if get_origin(member) is Annotated:
                member = get_args(member)[0]
            if member in _STRUCT_PLANS:
                direct = _maker(member)
            elif get_origin(member) is tuple:
                is_list = True
                inner = get_args(member)[0]
                item = _maker(inner) if inner in _STRUCT_PLANS else None
        if direct is not None or is_list:
            plans.append((f.name, direct, item, is_list))

    def make(fields: dict[str, Any]) -> Any:
        for name, direct, item, is_list in plans:
            value = fields.get(name)
            kind = type(value)
            if kind is dict and direct is not None:
                fields[name] = direct(dict(value))
            elif kind is list and is_list:
                fields[name] = tuple([item(dict(v)) for v in value] if item else value)
            elif kind is dict or kind is list:
                raise TypeError(f"{name}: not of the field's shape")
        return struct(**fields)

    return make


def _built_plan(plan: _Plan) -> tuple[Callable[[dict[str, Any]], Any], Any]:
    # Every fix but the timestamp's: the builder gives a datetime, not the text it parses.
    fixes = [(name, fix) for name, fix in plan.fixes if name != "timestamp"]
    return _maker(plan.struct), _finisher(fixes) if fixes else None


_BUILT = {
    tag: _built_plan(_PLANS[_STRUCT_PLANS[struct].model]) for tag, struct in EVENT_STRUCTS.items()
}


def from_built(event: dict[str, Any]) -> Any | None:
    """An event the server built itself as a dict (the OpenTelemetry mapping, otel/mapping.py)
    as its struct, without the JSON round trip of validate_list: half its cost.

    The builder guarantees what msgspec would check on decoding: each field's type (a nested
    model as a dict of its fields, a list of them as a list of dicts), string lengths, number
    ranges, ids and the timestamp (an aware datetime in range); typed lists may be lists
    (made tuples here, as decoding makes them). The checks msgspec cannot
    state run here as in validate_list (free-form JSON size and depth, a field only the server
    may set); None when one refuses, or for a field the event type has not: the caller then
    takes validate_list's path, whose answers count. tests/test_otel_mapping.py checks that
    both give equal structs for the mapping's events."""
    plan = _BUILT.get(event.get(_TAG_FIELD))  # type: ignore[arg-type]
    if plan is None:
        return None
    make, finish = plan
    fields = event.copy()
    del fields[_TAG_FIELD]
    try:
        built = make(fields)
        return finish(built) if finish is not None else built
    except (TypeError, *_ERRORS):  # TypeError: a field the struct has not, a wrong shape
        return None
