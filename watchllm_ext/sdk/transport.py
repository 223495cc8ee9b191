"""How a batch reaches WatchLLM: over HTTP, or straight into an app running in this process.

Both answer an `Answer` (the status and body the batch route would give) or raise
`NetworkError` when no answer came (refused, reset, timed out): the worker decides what to
retry from that alone, so both transports are retried and reported the same way.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from .. import __version__
from .context import local_app_ever_ran, local_apps

# Bodies smaller than this go uncompressed: gzip would cost more time than it saves bytes.
GZIP_MIN_BYTES = 1024
USER_AGENT = f"watchllm-python/{__version__}"


class NetworkError(Exception):
    """No answer from the server (connection refused or closed, timed out)."""


@dataclass
class Answer:
    status: int
    body: Any
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def message(self) -> str:
        if isinstance(self.body, dict):
            return str(self.body.get("message") or self.body.get("error") or self.body)
        return str(self.body)[:500]


class Transport(Protocol):
    name: str

    def send(self, events: list[bytes]) -> Answer: ...

    def close(self) -> None: ...


def check_base_url(url: Any, name: str = "base_url") -> str:
    """`url` if it is an http:// or https:// URL with a host, else a ValueError naming `name`.

    Checked when a client is made: a URL that can never work (`127.0.0.1:8821`, no scheme)
    must not look like a server that is down, retried for minutes and then dropped."""
    problem = None
    if not isinstance(url, str):
        problem = f"not {type(url).__name__} {url!r}"
    else:
        try:
            parts = urlsplit(url)
            scheme, host, _port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError as exc:  # a port that is not a number, a bad IPv6 address
            problem = f"not {url!r} ({exc})"
        else:
            if scheme not in ("http", "https"):
                problem = f"not {url!r}"
                if "://" not in url:
                    problem += f" (no scheme; did you mean 'http://{url}'?)"
            elif not host:
                problem = f"not {url!r} (no host)"
    if problem:
        raise ValueError(
            f"{name}: must be an http:// or https:// URL with a host, such as"
            f" http://127.0.0.1:8787, {problem}"
        )
    return url


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpTransport:
    name = "http"

    def __init__(self, base_url: str, api_key: str, timeout_s: float, use_gzip: bool) -> None:
        self.base_url = base_url.rstrip("/")
        self._gzip = use_gzip
        self._http = httpx.Client(
            base_url=self.base_url,
            # connect fails fast (the server is not there); the read waits for the answer.
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            headers={
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            },
        )

    def send(self, events: list[bytes]) -> Answer:
        body = b'{"events":[' + b",".join(events) + b"]}"
        headers = {}
        if self._gzip and len(body) >= GZIP_MIN_BYTES:
            body = gzip.compress(body, compresslevel=1)  # level 1: most of the gain, fast
            headers["Content-Encoding"] = "gzip"
        try:
            response = self._http.post("/v1/events/batch", content=body, headers=headers)
        except httpx.TransportError as exc:  # connect, read, write, pool, protocol errors
            raise NetworkError(f"{type(exc).__name__}: {exc}") from None
        try:
            data: Any = response.json()
        except ValueError:
            data = response.text
        return Answer(
            response.status_code,
            data,
            parse_retry_after(response.headers.get("Retry-After")),
            dict(response.headers),
        )

    def close(self) -> None:
        self._http.close()


def no_app_message(chosen: bool) -> str:
    """Why the in-process transport cannot deliver, and what to do: a client made with a key
    and no base_url lands here, so its user learns how to reach a server instead."""
    if local_app_ever_ran():
        return "no WatchLLM app runs in this process now (the one that ran has stopped)"
    server = 'base_url="http://127.0.0.1:8787" (where `watchllm serve` listens)'
    mount = "mount WatchLLM in this process (watchllm_ext.lifespan)"
    if chosen:
        how = f"with transport='local': {mount}, or leave transport out and pass {server}"
    else:
        how = f"without base_url: pass {server} or set WATCHLLM_BASE_URL, or {mount}"
    return f"no WatchLLM app runs in this process yet, and the client was made {how}"


class LocalTransport:
    """Into a WatchLLM app running in this process (watchllm_ext.sdk.context.local_apps()):
    the same validation, quota, hooks and spool as the batch route, no HTTP hop."""

    name = "local"

    def __init__(self, api_key: str, timeout_s: float, chosen: bool = False) -> None:
        self._key = api_key
        self._timeout_s = timeout_s
        self._chosen = chosen  # transport="local" was asked for, not implied by no base_url

    def send(self, events: list[bytes]) -> Answer:
        apps = local_apps()
        if not apps:
            # 503, retried: the host app may not have started yet (a client made at import).
            return Answer(503, {"message": no_app_message(self._chosen)}, None)
        dicts = [json.loads(e) for e in events]
        try:
            body = apps[0].ingest_from_thread(self._key, dicts, self._timeout_s)
        except TimeoutError:
            raise NetworkError("the in-process app did not answer in time") from None
        except Exception as exc:
            # errors.Problem (not imported: it needs starlette) carries the route's answer.
            status = getattr(exc, "status", None)
            if not isinstance(status, int) or not hasattr(exc, "body"):
                raise NetworkError(f"the in-process app failed: {exc!r}") from None
            headers = dict(getattr(exc, "headers", {}) or {})
            return Answer(status, exc.body(), parse_retry_after(headers.get("Retry-After")))
        return Answer(207 if body.get("rejected") else 202, body)

    def close(self) -> None:
        pass
