"""A third-party-style WatchLLM plugin: redact e-mail addresses before events are stored.

It uses only the public hook API (`watchllm_ext.hookimpl`), the way any plugin would:
- `transform_events`: replace e-mail addresses in prompts and responses with [email];
- `validate_event`: refuse events whose `user_id` is an e-mail address (a policy example);
- `register_routes`: `GET /-/redactions` tells how many addresses were redacted.

Install it (`pip install ./examples/redact_emails`) and it is found through the `watchllm`
entry point; or load it without installing: WATCHLLM_PLUGINS=watchllm_redact_emails.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchllm_ext import hookimpl

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


class EmailRedactor:
    def __init__(self) -> None:
        self.redacted_total = 0
        # transform_events runs on a worker thread for big bodies (docs/PLUGINS.md, Threads),
        # possibly beside another request's: the counter's += is not atomic.
        self._lock = threading.Lock()

    def _redact(self, text: str | None) -> str | None:
        if not text or "@" not in text:
            return text
        new, count = EMAIL.subn("[email]", text)
        if count:
            with self._lock:
                self.redacted_total += count
        return new

    @hookimpl
    def transform_events(self, events: list[Any], principal: Any) -> None:
        for event in events:
            if event.event_type == "prompt_call":
                if isinstance(event.prompt, str):
                    event.prompt = self._redact(event.prompt)
                else:
                    for message in event.prompt or []:
                        if isinstance(message.content, str):
                            message.content = self._redact(message.content)
                event.response = self._redact(event.response)

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> str | None:
        if event.user_id and EMAIL.fullmatch(event.user_id):
            return "user_id must be an opaque id, not an e-mail address"
        return None

    @hookimpl
    def register_routes(self, settings: Any) -> list[Route]:
        async def redactions(request: Request) -> JSONResponse:
            return JSONResponse({"redacted_total": self.redacted_total})

        return [Route("/-/redactions", redactions)]


def make_plugin(settings: Any) -> EmailRedactor:
    """WatchLLM calls this with its Settings and registers the object it returns."""
    return EmailRedactor()
