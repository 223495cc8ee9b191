"""Turning what a caller logged into contract events: validation, masking, content removal.

Runs on the SDK's worker thread (or at the call site with `strict=True`): the caller's thread
only builds a dict. Uses the shared pydantic models of watchllm_ext.schema, so the SDK refuses
exactly what the server would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json

from ..schema import MODELS_BY_TYPE

Mask = Callable[[dict[str, Any]], dict[str, Any] | None]

# The fields that hold what users and models said or did; dropped when content capture is off
# (metadata only: ids, model, tokens, timings, status, error types and messages stay).
CONTENT_FIELDS = (
    "prompt",
    "response",
    "tool_input",
    "tool_output",
    "reasoning",
    "action",
    "observation",
    "evidence",
    "expected",
    "actual",
    "stack_trace",
)
# Required text fields that hold content: emptied rather than removed, so the event stays valid.
CONTENT_REQUIRED = ("claim",)

# How much of a captured Python value (function arguments, return values) is kept.
MAX_CAPTURE_CHARS = 64_000


class InvalidEvent(ValueError):
    """An event the contract refuses; `reason` is the short form counted in `stats()`."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def strip_content(event: dict[str, Any]) -> dict[str, Any]:
    """The event without its content fields (a new dict; the caller's stays as it was)."""
    out = {k: v for k, v in event.items() if k not in CONTENT_FIELDS}
    for name in CONTENT_REQUIRED:
        if name in out:
            out[name] = ""
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            {k: v for k, v in c.items() if k not in ("tool_input", "tool_output")}
            if isinstance(c, dict)
            else c
            for c in calls
        ]
    return out


def validate(event: dict[str, Any]) -> Any:
    """The event as its contract model; `InvalidEvent` naming the fields at fault."""
    model = MODELS_BY_TYPE.get(event.get("event_type"))  # type: ignore[arg-type]
    if model is None:
        raise InvalidEvent(
            f"event_type: {event.get('event_type')!r} is not one of {sorted(MODELS_BY_TYPE)}"
        )
    try:
        return model.model_validate(event)
    except ValidationError as exc:
        raise InvalidEvent(describe(exc, event.get("event_type"))) from None


def describe(exc: ValidationError, event_type: Any) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(event)"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{event_type} event: " + "; ".join(parts) + tail


def prepare(event: dict[str, Any], mask: Mask | None, capture_content: bool) -> bytes | None:
    """Mask, strip and validate one event: its JSON bytes, or None when the mask dropped it.
    Raises `InvalidEvent` (reason `invalid` or `mask_error`)."""
    if mask is not None:
        try:
            masked = mask(dict(event))
        except Exception as exc:  # a mask that fails must never let the unmasked event out
            raise InvalidEvent(f"the mask callback raised {exc!r}", "mask_error") from None
        if masked is None:
            return None
        if not isinstance(masked, dict):
            raise InvalidEvent(
                f"the mask returned {type(masked).__name__}, not a dict", "mask_error"
            )
        event = masked
    if not capture_content:
        event = strip_content(event)
    validate(event)
    # The event as the caller built it (the server validates the same input the same way);
    # pydantic-core's encoder writes datetimes as RFC 3339 and is 5x faster than a model dump.
    return to_json(event, fallback=str)


def capture(value: Any) -> Any:
    """A JSON-safe copy of a Python value (objects by repr), cut to MAX_CAPTURE_CHARS."""
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):  # circular references, keys that are not strings
        text = json.dumps(repr(value), ensure_ascii=False)
    if len(text) > MAX_CAPTURE_CHARS:
        return text[:MAX_CAPTURE_CHARS] + "...(cut)"
    return json.loads(text)


def capture_text(value: Any) -> str:
    """A captured value as text (for the agent_step text fields)."""
    if isinstance(value, str):
        return value[:MAX_CAPTURE_CHARS]
    data = capture(value)
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
