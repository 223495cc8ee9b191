"""A third-party-style WatchLLM plugin: redact e-mail addresses before events are stored.

It uses only the public hook API (`watchllm_ext.hookimpl`), the way any plugin would:
- `transform_events`: replace e-mail addresses in prompts, responses and metadata (with the
  attributes an OpenTelemetry span left in `metadata["otel.attributes"]`) with [email];
- `transform_spans`: the same in the rows of OpenTelemetry spans (their names, attributes,
  status messages, span events and links), which are stored beside the events;
- `validate_event`: refuse events whose `user_id` is an e-mail address (a policy example);
- `register_routes`: `GET /-/redactions` tells a project's key how many addresses were
  redacted in its project's events and spans.

Install it (`pip install ./examples/redact_emails`) and it is found through the `watchllm`
entry point; or load it without installing: WATCHLLM_PLUGINS=watchllm_redact_emails.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchllm_ext import hookimpl

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


class EmailRedactor:
    def __init__(self) -> None:
        self.redacted: Counter[str] = Counter()  # addresses redacted, by project
        # transform_events runs on a worker thread for big bodies (docs/PLUGINS.md, Threads),
        # possibly beside another request's: the counter's += is not atomic.
        self._lock = threading.Lock()

    def _redact(self, text: str | None, project: str) -> str | None:
        if not text or "@" not in text:
            return text
        new, count = EMAIL.subn("[email]", text)
        if count:
            with self._lock:
                self.redacted[project] += count
        return new

    def _redact_json(self, value: Any, project: str) -> Any:
        """Every string in a JSON value (keys too), redacted; the value itself when none is."""
        if isinstance(value, str):
            return self._redact(value, project)
        if isinstance(value, dict):
            return {
                self._redact(k, project): self._redact_json(v, project) for k, v in value.items()
            }
        if isinstance(value, list):
            return [self._redact_json(v, project) for v in value]
        return value

    def _redact_json_text(self, text: str | None, project: str) -> str | None:
        if not text or "@" not in text:
            return text
        return json.dumps(self._redact_json(json.loads(text), project), ensure_ascii=False)

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        project = principal.project_id
        for event in events:
            if event.metadata:
                # A span's event keeps the attributes no rule read in metadata["otel.attributes"].
                event.metadata = self._redact_json(event.metadata, project)
            if event.event_type == "prompt_call":
                if isinstance(event.prompt, str):
                    event.prompt = self._redact(event.prompt, project)
                else:
                    for message in event.prompt or []:
                        if isinstance(message.content, str):
                            message.content = self._redact(message.content, project)
                event.response = self._redact(event.response, project)

    @hookimpl
    def transform_spans(self, spans: list[Any], principal: Any) -> None:
        # The `spans` table keeps every attribute as sent: without this, an address redacted
        # from a span's event would still be stored, and shown, in its span.
        project = principal.project_id
        for span in spans:
            span.name = self._redact(span.name, project)
            span.status_message = self._redact(span.status_message, project)
            span.attributes = {k: self._redact(v, project) for k, v in span.attributes.items()}
            span.resource_attributes = {
                k: self._redact(v, project) for k, v in span.resource_attributes.items()
            }
            # JSON text: decoded, redacted and encoded again (an address right after an escape,
            # `\nbob@example.com`, would take the escape's letter with it in the text).
            span.span_events = self._redact_json_text(span.span_events, project)
            span.links = self._redact_json_text(span.links, project)

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> dict[str, str] | None:
        if event.user_id and EMAIL.fullmatch(event.user_id):
            return {"field": "user_id", "message": "must be an opaque id, not an e-mail address"}
        return None

    @hookimpl
    def register_routes(self, settings: Any) -> list[Route]:
        async def redactions(request: Request) -> JSONResponse:
            # Any valid key of the project, checked as the API checks it (401 or 403, as JSON).
            principal = request.app.state.watchllm.authenticate(request, None)
            with self._lock:
                total = self.redacted[principal.project_id]
            return JSONResponse({"project_id": principal.project_id, "redacted_total": total})

        return [Route("/-/redactions", redactions)]


def make_plugin(settings: Any) -> EmailRedactor:
    """WatchLLM calls this with its Settings and registers the object it returns."""
    return EmailRedactor()
