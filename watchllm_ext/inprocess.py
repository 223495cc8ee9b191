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

import math
from datetime import datetime, timedelta
from typing import Any, get_args

import msgspec
from pydantic import AwareDatetime

from . import fast_validate
from .schema import MODELS_BY_TYPE

__all__ = ["MAX_DEPTH", "plain_events"]

# Free-form JSON deeper than this goes to pydantic (far under both validators' depth limits).
MAX_DEPTH = 64
_ZERO = timedelta(0)
_SCALARS = (str, int, bool, type(None))
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


def _plain(value: Any, depth: int) -> bool:
    """Whether `value` is plain JSON data (exact types: a subclass may encode differently)."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False


def _plain_event(event: Any) -> bool:
    if type(event) is not dict:
        return False
    for key, value in event.items():
        if type(key) is not str:
            return False
        if type(value) is datetime and key in DATETIME_FIELDS:
            if value.utcoffset() != _ZERO:  # naive (None) or another offset: pydantic decides
                return False
        elif not _plain(value, 1):
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
