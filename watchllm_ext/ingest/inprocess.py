"""The fast path of `WatchLLM.ingest` for events built in this process (dicts, not a body).

The HTTP routes validate a body with msgspec into event structs (fast_validate.py) and ask
pydantic only when that declines. In-process callers (the host middleware's summaries and
recorded events, the SDK's in-process transport) hand over Python dicts instead. Encoding
those with msgspec and running the same body validator is equal to pydantic's answer on the
dicts only when the encoding loses nothing. It can lose, so those events are not taken here:

- NaN and infinities: msgspec writes them as null (pydantic refuses them);
- bytes: msgspec writes base64 (pydantic reads bytes as text, or refuses them);
- tuples, sets, dates, Decimals, enums, subclasses of str/int/float/dict/list, any object:
  written as something else (a list, a string, a number) that pydantic would judge apart;
- a datetime anywhere but a timestamp field, or with an offset other than zero (msgspec
  writes sub-minute offsets as Z), or naive;
- keys that are not strings; nesting deeper than MAX_DEPTH; lone surrogates (msgspec
  refuses to encode them).

What remains is plain JSON data (str, int, finite float, bool, None, list, dict with string
keys) plus a UTC datetime in a timestamp field: its JSON text decodes to the same values, so
the body validator's answer is pydantic's (tests/test_mount.py checks both on every case of
tests/test_fast_validate.py and on Python-only values). `plain_events` answers None for
anything else, and the caller takes the pydantic path for the whole batch.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, get_args

import msgspec
from pydantic import AwareDatetime

from ..schema import MODELS_BY_TYPE
from . import fast_validate

__all__ = ["MAX_DEPTH", "plain_events"]

# Free-form JSON deeper than this goes to pydantic (far under both validators' depth limits).
MAX_DEPTH = 64
_ZERO = timedelta(0)
_SCALARS = frozenset({str, int, bool, type(None)})
_encode = msgspec.json.Encoder().encode


def _mentions_datetime(annotation: Any) -> bool:
    if annotation is AwareDatetime or (
        isinstance(annotation, type) and issubclass(annotation, datetime)
    ):
        return True
    return any(_mentions_datetime(arg) for arg in get_args(annotation))


# The top-level fields that take a datetime object (the timestamp): found in the models, so a
# new datetime field is covered without a change here.
DATETIME_FIELDS: frozenset[str] = frozenset(
    name
    for model in MODELS_BY_TYPE.values()
    for name, info in model.model_fields.items()
    if _mentions_datetime(info.annotation)
)


# Exact types throughout (a subclass may encode differently), the scalars checked inline, one
# pass over each container: this is the per-value cost of every in-process event.


def _plain_list(value: list[Any], depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    for item in value:
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is float:
            if item - item != 0.0:  # NaN or an infinity (NaN for both), without a call
                return False
        elif kind is dict:
            if not _plain_dict(item, depth + 1):
                return False
        elif kind is not list or not _plain_list(item, depth + 1):
            return False
    return True


def _plain_dict(value: dict[Any, Any], depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is float:
            if item - item != 0.0:
                return False
        elif kind is dict:
            if not _plain_dict(item, depth + 1):
                return False
        elif kind is not list or not _plain_list(item, depth + 1):
            return False
    return True


def _plain_event(event: Any) -> bool:
    if type(event) is not dict:
        return False
    for key, value in event.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is float:
            if value - value != 0.0:
                return False
        elif kind is dict:
            if not _plain_dict(value, 1):
                return False
        elif kind is list:
            if not _plain_list(value, 1):
                return False
        elif kind is datetime and key in DATETIME_FIELDS:
            # A UTC datetime in a timestamp field (the middleware's, the SDK's): msgspec
            # writes it as RFC 3339 with Z. Naive (utcoffset None) or another offset: pydantic.
            if value.utcoffset() != _ZERO:
                return False
        else:
            return False
    return True


def plain_events(events: list[Any]) -> list[Any] | None:
    """The events as validated structs (the body validator's, as if they came in a request)
    when every one is plain JSON data and valid; None otherwise (then pydantic decides)."""
    for event in events:
        if not _plain_event(event):
            return None
    try:
        body = _encode(events)
    except (TypeError, ValueError, OverflowError, RecursionError):  # UnicodeEncodeError too
        return None
    return fast_validate.validate_fast(body, "events")
