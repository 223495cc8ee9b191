"""A body's JSON: parsed with pydantic-core's parser, and integer literals longer than it reads
kept to be refused by field (validate.py) rather than as a malformed body."""

from __future__ import annotations

import math
import re
import secrets
from typing import Any

from pydantic_core import from_json

from ..errors import Problem

# The deepest nesting of arrays and objects pydantic-core's parser takes, whatever is inside
# the innermost (tests/test_bad_input.py sends this depth and one more).
MAX_JSON_DEPTH = 200


def parse_json(body: bytes) -> Any:
    """The body's JSON value (see parse_events_json)."""
    return parse_events_json(body)[0]


def parse_events_json(body: bytes) -> tuple[Any, bool]:
    """The body's JSON value, and whether it held an integer literal longer than the parser
    reads (4,300 characters): each is a TooLongInt in the value (validate_items with
    `too_long` refuses it where it is). 400 for a body that is not JSON."""
    if not body.strip():
        raise Problem(400, "malformed_json", "the body is empty; send a JSON value", field="body")
    try:
        return from_json(body, allow_inf_nan=False), False
    except ValueError as exc:
        if str(exc).startswith(_OUT_OF_RANGE):
            return _parse_long_numbers(body, exc), True
        raise _not_json(exc) from None


def _not_json(exc: ValueError) -> Problem:
    # pydantic-core's message carries the position: "... at line 1 column 17".
    text = str(exc)
    if text.startswith("recursion limit exceeded"):
        # Valid JSON, only deeper than the parser goes: say so, not "invalid" (docs/API.md).
        where = text.removeprefix("recursion limit exceeded").strip()
        return Problem(
            400,
            "malformed_json",
            f"the JSON nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
            f" ({where}); send it less deeply nested",
            field="body",
        )
    if "surrogate" in text or "end of hex escape" in text:
        # pydantic-core's words for "\ud800" alone: say what is wrong with it.
        text += (
            " (a \\ud800-\\udfff escape must be a high surrogate followed by a low one:"
            " a lone surrogate is no character)"
        )
    return Problem(400, "malformed_json", f"invalid JSON: {text}", field="body")


# --- numbers longer than the parser reads ----------------------------------------------------
#
# pydantic-core's parser reads an integer literal of at most 4,300 characters (Python's
# int_max_str_digits), and fails the whole body with "number out of range" past that, also for
# a number whose integer part is that long (1000...0.5). Such a number is valid JSON, only out
# of the range of every number field: it gets the answer a 4,300-digit one gets, a 422 naming
# its field (docs/EVENTS.md), not a 400 for the whole body. The body is parsed again with each
# such literal replaced by one of the same length (a placeholder padded with spaces, so the
# position of any other error is the same): an integer by a marker turned into a TooLongInt,
# a float by its value (what the parser would have read: infinity, mostly).

_OUT_OF_RANGE = "number out of range"
# A string (skipped whole: possessive, so a long one costs one pass), or a number literal
# whose integer part has 4,300 digits or more, not inside another token.
_LONG_NUMBER = re.compile(
    rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
    rb"|(?<![0-9A-Za-z_.+\-])-?[0-9]{4300,}(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9A-Za-z_.+\-])",
    re.DOTALL,
)


class TooLongInt(int):
    """An integer literal longer than the parser reads, as +-10**4300: over the range of every
    integer field, and not a number a float field takes, as the literal itself would be."""


_TOO_LONG = TooLongInt(10**4300)
_TOO_LONG_NEGATIVE = TooLongInt(-(10**4300))


def _parse_long_numbers(body: bytes, exc: ValueError) -> Any:
    marker = f"0.{secrets.randbits(52) | 1:016d}".encode()  # a float no client can foresee
    value_of = {float(marker): _TOO_LONG, -float(marker): _TOO_LONG_NEGATIVE}
    pieces: list[bytes] = []
    done = replaced = 0
    for found in _LONG_NUMBER.finditer(body):
        token = found.group()
        if token[:1] == b'"':
            continue
        try:
            from_json(token)
            continue  # read as it is (4,300 digits exactly)
        except ValueError as error:
            if not str(error).startswith(_OUT_OF_RANGE):
                continue
        if token.lstrip(b"-").isdigit():
            literal = b"-" + marker if token[:1] == b"-" else marker
            replaced += 1
        else:
            number = float(token)  # no length limit for floats: correctly rounded
            if math.isfinite(number):
                literal = repr(number).encode()
            else:
                literal = b"-1e999" if number < 0 else b"1e999"  # how the parser reads 1e999
        pieces += (body[done : found.start()], literal, b" " * (len(token) - len(literal)))
        done = found.end()
    if not pieces:
        raise _not_json(exc) from None
    pieces.append(body[done:])
    try:
        holder = [from_json(b"".join(pieces), allow_inf_nan=False)]
    except ValueError as again:
        raise _not_json(again) from None  # the body's first other error, at its position
    if replaced and _restore(holder, value_of) != replaced:
        raise _not_json(exc) from None  # a marker not found where it was put: as before
    return holder[0]


def _restore(value: Any, value_of: dict[float, TooLongInt]) -> int:
    """Put the TooLongInts in place of their markers (in place); how many."""
    count = 0
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return 0
    for key, item in items:
        if type(item) is float:
            found = value_of.get(item)
            if found is not None:
                value[key] = found
                count += 1
        elif isinstance(item, dict | list):
            count += _restore(item, value_of)
    return count


def holds_too_long(value: Any) -> bool:
    if isinstance(value, TooLongInt):
        return True
    if isinstance(value, dict):
        return any(holds_too_long(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_too_long(v) for v in value)
    return False


def too_long_as_infinity(value: Any) -> Any:
    """A copy of `value` with each TooLongInt as the infinity of its sign."""
    if isinstance(value, TooLongInt):
        return math.inf if value > 0 else -math.inf
    if isinstance(value, dict):
        return {k: too_long_as_infinity(v) for k, v in value.items()}
    if isinstance(value, list):
        return [too_long_as_infinity(v) for v in value]
    return value
