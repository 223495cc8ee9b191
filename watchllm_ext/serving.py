"""What `watchllm serve` gives uvicorn: its options, and an HTTP protocol that drops a client
whose request headers do not arrive in time.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but waits for ever for the
headers of a request (a slowloris client dribbling one header line every few seconds holds
its connection as long as it likes). Bodies are timed by the app itself (ingest.read_body),
so that a host app mounting WatchLLM gets that part too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .settings import Settings


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol (httptools when installed, else h11) with a deadline on the
    headers of each request: from the connection's start, and from the first bytes of each
    later request on a kept-alive connection. Past it, the connection is closed."""
    base: type[Any]
    try:  # uvicorn's choice when httptools is installed (the module imports it)
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        # Both of uvicorn's protocols set `self.cycle` to a new object once a request's
        # headers are complete: the deadline is met when `cycle` changed since it was set.
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_at_timer: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and self._header_timer is None:
                self._arm()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_at_timer:
                self._disarm()  # headers complete

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._cycle_at_timer = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._cycle_at_timer and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run / uvicorn.Config, from the settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "http": header_timeout_protocol(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }
