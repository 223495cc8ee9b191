"""Sentry for WatchLLM's own errors: `init_sentry(settings)` when `sentry_dsn` is set.

What is captured: unhandled exceptions of the app (Starlette integration, and the 500
handler's log), errors logged by the writer, background tasks and the rollup (logging
integration, ERROR and up), and a sink's failure (the first of a streak of retries, with its
exception). What is never sent: request bodies, headers with keys, local variables, and text
that may come from an event (quoted strings, validation inputs) in messages, exception values
and breadcrumbs: `scrub_event`, the `before_send` hook, removes them.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from .. import __version__
from ..settings import Settings, SettingsError

log = logging.getLogger("watchllm.sentry")

REDACTED = "[redacted]"
# Our API keys (keys.py: wllm_<id>_<secret>), bearer tokens, and anything quoted: event text
# reaches messages through repr() and f-strings, always between quotes.
_PATTERNS = (
    (re.compile(r"wllm_[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"(?i)bearer\s+\S+"), REDACTED),
    (re.compile(r"input_value=.*?(?=, input_type=|$)", re.M), "input_value=" + REDACTED),
    (re.compile(r"'(?:[^'\\]|\\.)*'"), REDACTED),
    (re.compile(r'"(?:[^"\\]|\\.)*"'), REDACTED),
)
# Fields of an event (and of request data) whose values are never sent.
SENSITIVE_KEYS = frozenset(
    {
        "prompt",
        "response",
        "messages",
        "tool_input",
        "tool_output",
        "reasoning",
        "observation",
        "action",
        "claim",
        "evidence",
        "expected",
        "actual",
        "stack_trace",
        "metadata",
        "response_metadata",
        "authorization",
        "cookie",
        "x-api-key",
        "api_key",
        "token",
        "secret",
        "password",
        "data",
        "body",
    }
)
MAX_TEXT = 500


def scrub_text(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text[:MAX_TEXT]


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 12:
        return REDACTED
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in SENSITIVE_KEYS else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry's before_send: keep the shape (types, stack frames, routes), drop the content."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        request.pop("query_string", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                k: REDACTED if k.lower() in SENSITIVE_KEYS else v for k, v in headers.items()
            }
    for exc in (event.get("exception") or {}).get("values") or []:
        if isinstance(exc.get("value"), str):
            exc["value"] = scrub_text(exc["value"])
        for frame in (exc.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    logentry = event.get("logentry")
    if isinstance(logentry, dict):
        if isinstance(logentry.get("message"), str):
            logentry["message"] = scrub_text(logentry["message"])
        logentry.pop("params", None)
        if isinstance(logentry.get("formatted"), str):
            logentry["formatted"] = scrub_text(logentry["formatted"])
    if isinstance(event.get("message"), str):
        event["message"] = scrub_text(event["message"])
    crumbs = event.get("breadcrumbs")
    values = crumbs.get("values") if isinstance(crumbs, dict) else crumbs
    for crumb in values or []:
        if isinstance(crumb.get("message"), str):
            crumb["message"] = scrub_text(crumb["message"])
        if "data" in crumb:
            crumb["data"] = _scrub(crumb["data"])
    for key in ("extra", "contexts"):
        if isinstance(event.get(key), dict):
            event[key] = _scrub(event[key])
    return event


class SinkFailureCapture(logging.Handler):
    """The writer logs a sink's first failure of a streak as a warning, inside the `except`
    that caught it: capture that exception (once per streak; the retries are not errors)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if record.funcName != "_write_with_retry" or record.levelno != logging.WARNING:
            return
        exc = sys.exc_info()[1]
        if exc is None:
            return
        import sentry_sdk

        sentry_sdk.capture_exception(exc)


_SINK_CAPTURE = SinkFailureCapture()


def ensure_sentry(settings: Settings) -> bool:
    """What `create_app` does: start Sentry from the settings, unless a client is running
    already (a host app that set Sentry up itself, or a test with its transport): that one
    is kept, and gets the sink-failure capture. Returns whether Sentry is on."""
    if not settings.sentry_dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        return init_sentry(settings)  # says what to install

    client = sentry_sdk.get_client()
    if client.is_active() and client.dsn:
        _capture_sink_failures()
        return True
    return init_sentry(settings)


def _capture_sink_failures() -> None:
    writer_log = logging.getLogger("watchllm.writer")
    if _SINK_CAPTURE not in writer_log.handlers:
        writer_log.addHandler(_SINK_CAPTURE)


def init_sentry(settings: Settings, **options: Any) -> bool:
    """Start the Sentry SDK from the settings (no-op without `sentry_dsn`); `options` go to
    `sentry_sdk.init` (a test passes `transport`). Returns whether Sentry is on."""
    if not settings.sentry_dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        raise SettingsError(
            "sentry_dsn (env WATCHLLM_SENTRY_DSN) needs the Sentry SDK: pip install -e '.[ops]'"
        ) from None
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.starlette import StarletteIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release or f"watchllm@{__version__}",
        sample_rate=settings.sentry_sample_rate,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        include_local_variables=False,
        max_request_body_size="never",
        before_send=scrub_event,
        before_send_transaction=scrub_event,
        # Ours only: auto-enabling tries to import every framework Sentry knows (seconds).
        auto_enabling_integrations=False,
        integrations=[
            StarletteIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        **options,
    )
    _capture_sink_failures()
    log.info("Sentry is on (environment %s)", settings.sentry_environment)
    return True
