"""The ingest routes' short way through the app: one frame from the server to the endpoint.

Starlette wraps every request in its layers: the 500 handler (ServerErrorMiddleware), the
bodies' memory budget (admission.BodyBudgetMiddleware), request timing and the flag cache
(observability.RequestMetrics), the exception handlers and the router. Each is an ASGI call
with its own wrapped `send`, and a request's every wait (its fsync) suspends and resumes
through all of them: for a single event they cost more of the event loop than validating it
(bench/bench_request_path.py). IngestLane does their work for the ingest routes itself, with
the same pieces (the same Route objects, Charge, RequestTimes, handlers), in the same order,
and answers byte for byte as they do (tests/test_ingest_routes.py compares the two over HTTP);
every other request goes through Starlette as before.

LaneApp is the Starlette app create_app returns, with the lane in front of its middleware. The
lane steps aside when the app's middleware is no longer what create_app gave it (a host's
`app.add_middleware` on it: that middleware must see every request) or in debug mode; with
Sentry on, create_app sets no lane (its integration instruments Starlette's layers).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from ..errors import answer_for
from ..flags import _REQUEST_CACHE
from ..observability.metrics import RequestTimes, closed_early, repeated_singleton
from .admission import BODY_CHARGE, BodyBudget, Charge

Handler = Callable[[Request, Exception], Awaitable[Response]]


class IngestLane:
    """Serves the ingest routes' requests (POST, a full match) as Starlette's layers would."""

    def __init__(
        self,
        wl: Any,
        routes: Sequence[Route],
        handlers: dict[type[Exception], Handler],
        error_handler: Handler,
        budget: BodyBudget,
    ) -> None:
        self.routes = tuple(routes)
        self.handlers = handlers
        self.error_handler = error_handler
        self.budget = budget
        self.times = RequestTimes(wl)
        self.wl = wl
        # What Starlette's exception middleware puts in the scope (its handlers by class and
        # by status), so that the endpoint and the plugins see the scope they always saw.
        self._in_scope = (handlers, {})

    def match(self, scope: Scope) -> tuple[Route, dict[str, Any]] | None:
        for route in self.routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return route, child_scope
        return None

    async def serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        child_scope: dict[str, Any],
    ) -> None:
        # BodyBudgetMiddleware, RequestMetrics, the router, the exception middleware: in turn.
        charge = scope[BODY_CHARGE] = Charge(self.budget)
        status = 500
        started = time.perf_counter()
        answering = False
        token = _REQUEST_CACHE.set({})  # this request's flag cache (flags/__init__.py)
        try:
            problem = repeated_singleton(self.wl, scope)
            if problem is not None:
                response = answer_for(scope, problem)
            else:
                # Starlette.__call__ put this app in the scope; a host's router goes first.
                scope.setdefault("router", scope["app"].router)
                scope["starlette.exception_handlers"] = self._in_scope
                scope["route"] = route
                scope.update(child_scope)
                response = await self._respond(route.endpoint, scope, receive, send)
            status = response.status_code
            answering = True
            await response(scope, receive, send)
        except ClientDisconnect:
            status = closed_early(scope, status)
        except Exception as exc:
            # ServerErrorMiddleware's part: the 500 answer unless one had begun; the error goes
            # on to the server, which logs it.
            error = await self.error_handler(Request(scope), exc)
            if not answering:
                await error(scope, receive, send)
            raise
        finally:
            _REQUEST_CACHE.reset(token)
            self.times.observe(scope, status, started)
            charge.release()

    async def _respond(
        self,
        endpoint: Callable[[Request], Awaitable[Response]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> Response:
        request = Request(scope, receive, send)
        try:
            return await endpoint(request)
        except Exception as exc:
            # The handler of the nearest class, as Starlette's exception middleware finds it.
            found = (self.handlers[c] for c in type(exc).__mro__ if c in self.handlers)
            handler = next(found, None)
            if handler is None:
                raise  # the 500 (serve)
            response = await handler(request, exc)
            exc.__traceback__ = None  # as Starlette does: a reused exception keeps no traceback
            return response


class LaneApp(Starlette):
    """Starlette, with an IngestLane (`lane`) in front of its middleware."""

    lane: IngestLane | None = None
    _lane_middleware = 0  # len(user_middleware) when the lane was set

    def set_lane(self, lane: IngestLane | None) -> None:
        self.lane = lane
        self._lane_middleware = len(self.user_middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane
        if (
            lane is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and len(self.user_middleware) == self._lane_middleware
            and not self.debug
        ):
            found = lane.match(scope)
            if found is not None:
                scope["app"] = self
                await lane.serve(scope, receive, send, *found)
                return
        await super().__call__(scope, receive, send)
