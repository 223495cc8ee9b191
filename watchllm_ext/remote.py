"""The CLI's commands that talk to a running server: its URL checked before anything is
sent, and the one line said when it cannot be reached. Light: httpx only (the base install)."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx


def server_url_problem(url: str) -> str | None:
    """None for an http(s) URL with a host; else what is wrong with it, in a few words."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://, such as http://127.0.0.1:8787"
    if not parts.hostname:
        return "names no host, such as http://127.0.0.1:8787"
    return None


def unreachable(url: str, exc: httpx.HTTPError) -> str:
    """The line for a request that got no answer; a refused or timed-out connection asks
    whether the server runs there."""
    hint = ""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        hint = " (is `watchllm serve` running there? --url or WATCHLLM_BASE_URL names another)"
    return f"cannot reach {url}: {exc}{hint}"


def answer_message(r: httpx.Response) -> str:
    """An error answer's `message` (the API's problem body), or the start of its text."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    return str(body.get("message", body))[:300] if isinstance(body, dict) else str(body)[:200]
