"""The dashboard's pages: sign-in, overview, requests explorer, event, runs and run tree.

Every figure on a page comes from the analytics routes (analytics/routes.py), called in
process with the parameters their URLs take and the session's key as the bearer token: the
same parsing, the same project rule (a project's key reads its own project, an operator key
names one), the same errors, on every store. The dashboard has no SQL of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

import anyio
import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..analytics import routes as api
from ..analytics.params import PERIODS
from ..auth import Principal
from ..errors import Problem, echo
from ..ingest.body import read_request_body
from ..schema import EVENT_TYPES, Status
from ..settings import Settings
from . import charts
from .session import Sealer, load_secret, new_token, same_token

HERE = Path(__file__).parent
STATIC = HERE / "static"
SESSION_COOKIE = "watchllm_session"
CSRF_COOKIE = "watchllm_csrf"  # the sign-in form's token, before there is a session
MAX_FORM_BYTES = 16_384  # a form's body; a larger one is refused (413), never cut
# The longest `api_key` the sign-in form passes on (keys.py makes keys of 61 characters;
# a plugin's `authenticate` may take others, none this long).
MAX_API_KEY_CHARS = 256
# The most of a name from the URL an answer repeats (an unknown static file's).
MAX_ECHO_CHARS = 64
MAX_ENDED_SESSIONS = 100_000  # signed-out sessions remembered (a few MB at most)
STATUSES: tuple[str, ...] = get_args(Status)
PERIOD_CHOICES = ("1h", "6h", "24h", "7d", "30d")
REFRESH_CHOICES = ("0", "30", "60", "300")
ZONE_CHOICES = (
    "UTC",
    "America/Los_Angeles",
    "America/New_York",
    "America/Sao_Paulo",
    "Europe/London",
    "Europe/Paris",
    "Africa/Johannesburg",
    "Asia/Kolkata",
    "Asia/Shanghai",
    "Asia/Tokyo",
    "Australia/Sydney",
)
EXPLORER_FILTERS = ("status", "model", "event_type", "user_id", "run_id", "tag", "q")
EXPLORER_PAGE = 50
NONE = "-"  # a figure with no value (no calls, no latency)
# Payloads longer than this are shown folded (a click opens them).
FOLD_CHARS = 2_000
# What an event page shows of its payloads: each at most PAYLOAD_SHOWN_CHARS, all of them
# together at most PAGE_SHOWN_CHARS (the whole event as JSON has an allowance of its own); the
# rest is cut, with a word on where the whole is. An event may hold tens of megabytes (48 tool
# calls of a megabyte each), which as HTML would be hundreds of megabytes to build and send.
PAYLOAD_SHOWN_CHARS = 100_000
PAGE_SHOWN_CHARS = 1_000_000
# Analytics answers bigger than this are decoded on a worker thread, off the event loop.
DECODE_OFF_LOOP_BYTES = 64 * 1024

_SECURITY_HEADERS = {
    # Our own script and styles only: nothing from a CDN, nothing inline.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none';"
    " base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Page:
    """What a signed-in page knows about its request."""

    request: Request
    token: str
    principal: Principal
    csrf: str
    base: str  # where the app is served (a host's mount path), "" at the root
    project: str  # the project shown
    tz: str
    sticky: dict[str, str] = field(default_factory=dict)  # parameters every link keeps

    def url(self, path: str, **params: Any) -> str:
        """A dashboard link keeping the project (operator keys) and time zone."""
        merged = {**self.sticky, **{k: str(v) for k, v in params.items() if v not in (None, "")}}
        query = urlencode(merged)
        return f"{self.base}{path}" + (f"?{query}" if query else "")


class Dashboard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sealer: Sealer | None = None
        # token -> (checked at, principal or None): the brief cache of key checks.
        self._checked: dict[str, tuple[float, Principal | None]] = {}
        # Sessions signed out (their CSRF token, one a session -> when they would expire): a
        # copy of the cookie is refused after sign-out, by this process (a restart forgets).
        self._ended: dict[str, float] = {}
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            money=money,
            count=count,
            ms=milliseconds,
            pct=percent,
            pretty=pretty_json,
        )

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/dashboard", self.home, methods=["GET"]),
            Route("/dashboard/", self.overview, methods=["GET"], name="dashboard"),
            Route("/dashboard/signin", self.signin_form, methods=["GET"]),
            Route("/dashboard/signin", self.signin, methods=["POST"]),
            Route("/dashboard/signout", self.signout, methods=["POST"]),
            Route("/dashboard/requests", self.requests, methods=["GET"]),
            Route("/dashboard/event/{event_id}", self.event, methods=["GET"]),
            Route("/dashboard/runs", self.runs, methods=["GET"]),
            Route("/dashboard/run/{run_id}", self.run, methods=["GET"]),
            Route("/dashboard/static/{name}", self.static, methods=["GET"]),
        ]

    # --- sessions -------------------------------------------------------------------------

    @property
    def sealer(self) -> Sealer:
        if self._sealer is None:  # on first use: the data folder exists by then
            self._sealer = Sealer(load_secret(self.settings))
        return self._sealer

    def _secure(self, request: Request) -> bool:
        mode = self.settings.dashboard_secure_cookie
        return mode == "always" or (mode == "auto" and request.url.scheme == "https")

    def _cookie(self, response: Response, request: Request, name: str, value: str) -> None:
        response.set_cookie(
            name,
            value,
            max_age=int(self.settings.dashboard_session_max_age_s),
            path=(_base(request) or "") + "/",
            httponly=True,
            samesite="lax",
            secure=self._secure(request),
        )

    def _check_key(self, request: Request, token: str) -> Principal | None:
        """The key's principal, asked of the `authenticate` hook at most every
        dashboard_key_recheck_s: a revoked key's session ends within that time."""
        now = time.monotonic()
        hit = self._checked.get(token)
        if hit is not None and now - hit[0] < self.settings.dashboard_key_recheck_s:
            return hit[1]
        wl = request.app.state.watchllm
        principal = wl.find_principal(token, request)
        if len(self._checked) > 10_000:  # bounded: many sign-ins on a long-running server
            self._checked.clear()
        self._checked[token] = (now, principal)
        return principal

    def _page(self, request: Request) -> Page | Response:
        """The signed-in page's context, or the redirect to sign-in."""
        base = _base(request)
        payload = self.sealer.unseal(
            request.cookies.get(SESSION_COOKIE), self.settings.dashboard_session_max_age_s
        )
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if payload is None or str(payload.get("c", "")) in self._ended:
            return RedirectResponse(f"{base}/dashboard/signin?{urlencode({'next': here})}", 303)
        token = str(payload.get("k", ""))
        principal = self._check_key(request, token)
        if principal is None or not principal.can("read"):
            why = "ended" if principal is None else "scope"
            response = RedirectResponse(
                f"{base}/dashboard/signin?{urlencode({'next': here, 'why': why})}", 303
            )
            response.delete_cookie(SESSION_COOKIE, path=(base or "") + "/")
            return response
        qp = request.query_params
        sticky: dict[str, str] = {}
        project = principal.project_id
        if principal.can("operator"):
            # An operator key reads any project; the switcher names it in every URL.
            project = qp.get("project_id") or principal.project_id
            sticky["project_id"] = project
        elif "project_id" in qp:
            # Passed on to the API as given: another project's id is its 403, never data.
            project = qp["project_id"]
        tz = qp.get("tz") or "UTC"
        if tz != "UTC":
            sticky["tz"] = tz
        return Page(request, token, principal, str(payload.get("c", "")), base, project, tz, sticky)

    # --- calling the analytics routes -----------------------------------------------------

    async def _api(
        self,
        page: Page,
        endpoint: Callable[[Request], Awaitable[Response]],
        params: Mapping[str, Any],
        path_params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One analytics route's JSON answer, as an API client with this key would get it."""
        query = {k: str(v) for k, v in params.items() if v not in (None, "")}
        if page.principal.can("operator") or "project_id" in page.request.query_params:
            query["project_id"] = page.project
        scope = {
            "type": "http",
            "method": "GET",
            "scheme": page.request.url.scheme,
            "path": "/v1/analytics",
            "root_path": "",
            "query_string": urlencode(query).encode(),
            "headers": [(b"authorization", f"Bearer {page.token}".encode())],
            "app": page.request.app,
            "path_params": dict(path_params or {}),
            "client": page.request.scope.get("client"),
        }
        response = await endpoint(Request(scope))
        body = bytes(response.body)
        if len(body) >= DECODE_OFF_LOOP_BYTES:
            return await anyio.to_thread.run_sync(json.loads, body)
        return json.loads(body)

    async def _api_many(
        self, page: Page, calls: Mapping[str, tuple[Callable[[Request], Awaitable[Response]], Any]]
    ) -> dict[str, dict[str, Any]]:
        """Several analytics answers at once; the first Problem is raised as itself."""
        answers: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            endpoint, params = calls[name]
            answers[name] = await self._api(page, endpoint, params)

        problem: Problem | None = None
        try:
            async with anyio.create_task_group() as group:
                for name in calls:
                    group.start_soon(one, name)
        except* Problem as failed:
            problem = failed.exceptions[0]  # type: ignore[assignment]
        if problem is not None:
            raise problem
        return answers

    # --- rendering ------------------------------------------------------------------------

    def _render(
        self, request: Request, name: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        base = _base(request)
        html = self.env.get_template(name).render(
            base=base, static=f"{base}/dashboard/static", **context
        )
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def _problem(self, page: Page, exc: Problem, title: str) -> Response:
        if exc.status == 401:  # the key went away between our check and the route's
            self._checked.pop(page.token, None)
            return RedirectResponse(f"{page.base}/dashboard/signin?why=ended", 303)
        response = self._render(
            page.request,
            "problem.html",
            status=exc.status,
            page=page,
            title=title,
            problem=exc,
            nav="",
        )
        response.headers.update(exc.headers)  # (a slow body's 408: Connection: close)
        return response

    async def _bad_zone(self, page: Page, title: str) -> Response | None:
        """The page of an unknown `tz`: the API's 400 naming tz, as the overview shows it (its
        charts ask the API with the zone). Pages whose times are made here, not by the API,
        ask the API's check (the zones both Python and the store know; ZoneInfo alone opens
        any file under the zone folder: `right/UTC`, `localtime`)."""
        store = page.request.app.state.watchllm.store
        if page.tz == "UTC" or store is None:  # no store: the page's own API call says so
            return None
        try:
            await api._zone(store, page.request)  # the analytics routes' own check
        except Problem as exc:
            return self._problem(page, exc, title)
        return None

    # --- routes ---------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{_base(request)}/dashboard/", 303)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "palette.css":
            body = charts.palette_css().encode()
        elif name in _STATIC_TYPES:
            body = await anyio.Path(STATIC / name).read_bytes()
        else:
            # The API's 404 (JSON, naming the parameter), repeating at most MAX_ECHO_CHARS of
            # the name, control characters escaped (repr).
            shown = echo(name, MAX_ECHO_CHARS)
            return Problem(
                404,
                "not_found",
                f"name: no static file {shown!r} (there are dashboard.css, dashboard.js,"
                " favicon.svg and palette.css)",
                field="name",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
            ).response()
        kind = _STATIC_TYPES.get(name, "text/css")
        return Response(
            body,
            media_type=kind,
            headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    async def signin_form(self, request: Request) -> Response:
        return self._signin_page(request, message=_WHY.get(request.query_params.get("why", "")))

    def _signin_page(
        self,
        request: Request,
        message: str | None = None,
        status: int = 200,
        field: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        token = new_token()
        response = self._render(
            request,
            "signin.html",
            status=status,
            title="Sign in",
            csrf=token,
            next=_safe_next(request.query_params.get("next"), _base(request)),
            message=message,
            field=field,
        )
        self._cookie(response, request, CSRF_COOKIE, self.sealer.sign(token))
        response.headers.update(headers or {})
        return response

    async def signin(self, request: Request) -> Response:
        try:
            form = await _form(request, self.settings, "sign-in")
        except Problem as exc:  # too large, too slow, not a form: nothing of it is used
            return self._signin_page(
                request, exc.message, exc.status, exc.field or "", headers=exc.headers
            )
        base = _base(request)
        expected = self.sealer.unsign(request.cookies.get(CSRF_COOKIE))
        if not same_token(form.get("csrf_token"), expected):
            return self._signin_page(
                request,
                "csrf_token: the form expired or came from another site; sign in again.",
                403,
                "csrf_token",
            )
        key = (form.get("api_key") or "").strip()
        if not key:
            return self._signin_page(request, "api_key: enter an API key.", 400, "api_key")
        if len(key) > MAX_API_KEY_CHARS:  # never handed to `authenticate` nor cached
            return self._signin_page(
                request,
                f"api_key: {len(key):,} characters is longer than any API key (at most"
                f" {MAX_API_KEY_CHARS}); paste the key alone.",
                400,
                "api_key",
            )
        wl = request.app.state.watchllm
        principal = await anyio.to_thread.run_sync(lambda: wl.find_principal(key, request))
        if principal is None:
            return self._signin_page(
                request,
                f"api_key: {wl.unknown_key_message('this key')}.",
                401,
                "api_key",
            )
        if not principal.can("read"):
            return self._signin_page(
                request,
                "api_key: this key cannot read analytics (its scopes: "
                f"{', '.join(sorted(principal.scopes))}); use a key with read or admin scope.",
                403,
                "api_key",
            )
        self._checked[key] = (time.monotonic(), principal)
        session = self.sealer.seal({"k": key, "c": new_token()})  # Fernet keeps its time
        target = _safe_next(form.get("next"), base) or f"{base}/dashboard/"
        response = RedirectResponse(target, 303)
        self._cookie(response, request, SESSION_COOKIE, session)
        response.delete_cookie(CSRF_COOKIE, path=(base or "") + "/")
        return response

    def _end(self, session: str) -> None:
        """Refuse this session's cookie from now on, until it would have expired anyway.
        Bounded: expired entries go first; past MAX_ENDED_SESSIONS the oldest (a flood of
        sign-outs, each needing a sign-in with a valid key)."""
        now = time.monotonic()
        if len(self._ended) >= MAX_ENDED_SESSIONS:
            self._ended = {c: t for c, t in self._ended.items() if t > now}
            while len(self._ended) >= MAX_ENDED_SESSIONS:
                del self._ended[next(iter(self._ended))]
        self._ended[session] = now + self.settings.dashboard_session_max_age_s

    async def signout(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        try:
            form = await _form(request, self.settings, "sign-out")
        except Problem as exc:  # too large, too slow, not a form: still signed in
            return self._problem(page, exc, "Sign out")
        if not same_token(form.get("csrf_token"), page.csrf):
            return self._render(
                request,
                "problem.html",
                status=403,
                page=page,
                title="Sign out",
                problem=Problem(
                    403,
                    "csrf",
                    "csrf_token: the form expired or came from another site; reload the page.",
                    field="csrf_token",
                ),
                nav="",
            )
        self._checked.pop(page.token, None)
        self._end(page.csrf)
        response = RedirectResponse(f"{page.base}/dashboard/signin?why=out", 303)
        response.delete_cookie(SESSION_COOKIE, path=(page.base or "") + "/")
        return response

    async def overview(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        qp = request.query_params
        period = qp.get("period") or "24h"
        refresh = qp.get("refresh") or "60"
        if refresh not in REFRESH_CHOICES:  # was shown as 60 s without a word
            problem = Problem(
                400,
                "bad_parameter",
                f"refresh: one of {', '.join(REFRESH_CHOICES)} (seconds; 0 is off)",
                field="refresh",
            )
            return self._problem(page, problem, "Overview")
        end = datetime.now(UTC)
        now = _iso(end)
        common = {"period": period, "to": now}
        # The previous period ends where this one starts (an unknown period: the API's 400).
        before = _iso(end - PERIODS[period]) if period in PERIODS else now
        calls = {
            "current": (api.stats, common),
            "previous": (api.stats, {"period": period, "to": before}),
            "series": (api.timeseries, {**common, "tz": page.tz}),
            "by_model": (
                api.timeseries,
                {**common, "tz": page.tz, "group_by": "model", "rank_by": "cost", "groups": 6},
            ),
        }
        try:
            # At once: each waits on the store in a worker thread, and the store can answer
            # them side by side (a ClickHouse server does; chDB on several cores too).
            answers = await self._api_many(page, calls)
            current = answers["current"]
            ever = None
            if current["total_events"] == 0:  # empty range: a new project, or just quiet?
                ever = await self._api(page, api.logs, {"period": "90d", "limit": 1})
        except Problem as exc:
            return self._problem(page, exc, "Overview")
        previous, series, by_model = answers["previous"], answers["series"], answers["by_model"]
        return self._render(
            request,
            "overview.html",
            page=page,
            nav="overview",
            title="Overview",
            period=period,
            periods=PERIOD_CHOICES,
            zones=_zones(page.tz),
            refresh=refresh,
            refreshes=REFRESH_CHOICES,
            cards=_cards(current, previous),
            stats=current,
            charts=_overview_charts(series, by_model, page.tz),
            empty=None if current["total_events"] else ("new" if not ever["events"] else "quiet"),
            example=_example(request, page),
        )

    async def requests(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        if (bad := await self._bad_zone(page, "Requests")) is not None:
            return bad
        qp = request.query_params
        period = qp.get("period") or "24h"
        filters = {name: qp.get(name, "") for name in EXPLORER_FILTERS}
        params: dict[str, Any] = {
            "period": period,
            "limit": EXPLORER_PAGE,
            "cursor": qp.get("cursor"),
            **filters,
        }
        try:
            answer = await self._api(page, api.logs, params)
        except Problem as exc:
            return self._problem(page, exc, "Requests")
        for row in answer["events"]:
            row["local_time"] = local_time(row["timestamp"], page.tz)
        shown = {k: v for k, v in filters.items() if v}
        return self._render(
            request,
            "requests.html",
            page=page,
            nav="requests",
            title="Requests",
            period=period,
            periods=PERIOD_CHOICES,
            filters=filters,
            statuses=STATUSES,
            event_types=EVENT_TYPES,
            events=answer["events"],
            next_url=page.url(
                "/dashboard/requests", period=period, cursor=answer["next_cursor"], **shown
            )
            if answer["next_cursor"]
            else None,
            first_url=page.url("/dashboard/requests", period=period, **shown)
            if qp.get("cursor")
            else None,
            filtered=bool(shown),
            example=_example(request, page),
        )

    async def event(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        if (bad := await self._bad_zone(page, "Event")) is not None:
            return bad
        event_id = request.path_params["event_id"]
        try:
            detail = await self._api(page, api.event, {}, {"event_id": event_id})
        except Problem as exc:
            return self._problem(page, exc, "Event")
        # Built on a worker thread: a big event's page is milliseconds of work or more, which
        # the event loop (every other request, ingestion too) must not wait through.
        return await anyio.to_thread.run_sync(self._event_page, page, event_id, detail)

    def _event_page(self, page: Page, event_id: str, detail: dict[str, Any]) -> Response:
        event = detail["event"]
        shown = Allowance(PAGE_SHOWN_CHARS)
        return self._render(
            page.request,
            "event.html",
            page=page,
            nav="requests",
            title=f"{event.get('event_type', 'event')} {event_id}",
            detail=detail,
            event=event,
            local=local_time(event.get("timestamp"), page.tz),
            prompt=_payload_of(event.get("prompt"), shown),
            response=_payload_of(event.get("response"), shown),
            tools=[
                {
                    **t,
                    "input": _payload_of(t.get("tool_input"), shown),
                    "output": _payload_of(t.get("tool_output"), shown),
                    "error_message": shown.clip(t.get("error_message")),
                }
                for t in detail["tool_calls"]
            ],
            steps=[
                {**s, **{name: shown.clip(s.get(name)) for name in _STEP_TEXTS}}
                for s in detail["agent_steps"]
            ],
            extras=[
                (name, _payload(event.get(name), shown))
                for name in _EXTRA_FIELDS
                if event.get(name) not in (None, "", {}, [])
            ],
            everything=_payload(event, Allowance(PAYLOAD_SHOWN_CHARS)),
        )

    async def runs(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        if (bad := await self._bad_zone(page, "Runs")) is not None:
            return bad
        qp = request.query_params
        period = qp.get("period") or "24h"
        try:
            answer = await self._api(
                page,
                api.runs,
                {"period": period, "limit": EXPLORER_PAGE, "cursor": qp.get("cursor")},
            )
        except Problem as exc:
            return self._problem(page, exc, "Runs")
        for row in answer["runs"]:
            row["local_time"] = local_time(row["start"], page.tz)
        return self._render(
            request,
            "runs.html",
            page=page,
            nav="runs",
            title="Runs",
            period=period,
            periods=PERIOD_CHOICES,
            runs=answer["runs"],
            next_url=page.url("/dashboard/runs", period=period, cursor=answer["next_cursor"])
            if answer["next_cursor"]
            else None,
            first_url=page.url("/dashboard/runs", period=period) if qp.get("cursor") else None,
        )

    async def run(self, request: Request) -> Response:
        page = self._page(request)
        if not isinstance(page, Page):
            return page
        if (bad := await self._bad_zone(page, "Run")) is not None:
            return bad
        run_id = request.path_params["run_id"]
        try:
            detail = await self._api(page, api.run, {}, {"run_id": run_id})
        except Problem as exc:
            return self._problem(page, exc, "Run")
        # Built on a worker thread, as the event page: a run's tree is up to 10,000 nodes, a
        # page of megabytes and seconds of work, which the event loop must not wait through.
        return await anyio.to_thread.run_sync(self._run_page, page, run_id, detail)

    def _run_page(self, page: Page, run_id: str, detail: dict[str, Any]) -> Response:
        return self._render(
            page.request,
            "run.html",
            page=page,
            nav="runs",
            title=f"Run {run_id}",
            run=detail["run"],
            rows=waterfall(detail["tree"]),
            truncated=detail["truncated"],
            local=local_time(detail["run"]["start"], page.tz),
        )


# The static files (palette.css is made from the charts' palettes) and their media types.
_STATIC_TYPES = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}

_WHY = {
    "ended": "Your session ended: the key is no longer valid. Sign in with a current key.",
    "scope": "That key cannot read analytics; sign in with a key of read or admin scope.",
    "out": "You are signed out.",
}


def _base(request: Request) -> str:
    """The path the app is served under: a host's mount, or uvicorn's --root-path."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _safe_next(value: str | None, base: str) -> str | None:
    """A page of this dashboard to return to after sign-in; anything else (another site,
    `//host`, a scheme) is dropped."""
    if not value or len(value) > 2000 or "\\" in value:
        return None
    # A dot segment (`/dashboard/../x`, `%2e%2e` as browsers read it too) would climb out of
    # the dashboard to any page of the origin (a host app's, when mounted).
    path = value.partition("?")[0].partition("#")[0].lower().replace("%2e", ".")
    if any(segment in (".", "..") for segment in path.split("/")):
        return None
    prefix = f"{base}/dashboard"
    if (
        value.startswith(prefix)
        and not value.startswith("//")
        and value[len(prefix) :][:1]
        in (
            "/",
            "?",
            "",
        )
    ):
        return value
    return None


async def _form(request: Request, settings: Settings, name: str) -> dict[str, str]:
    """An urlencoded form body (the dashboard's forms are small; no multipart), read as the
    API reads bodies (ingest.read_request_body): a body over MAX_FORM_BYTES is refused with 413
    naming the form (`name`), by its Content-Length before any of it is read or, without
    one (chunked), as soon as the bytes received pass the limit; never cut and used. Timed
    as ingest bodies are (408) and held within the app's budget for bodies in memory."""
    try:
        body = await read_request_body(request, settings, max_bytes=MAX_FORM_BYTES)
    except Problem as exc:
        if exc.status == 413:
            raise Problem(
                413,
                "payload_too_large",
                f"body: the {name} form is larger than the limit of {MAX_FORM_BYTES:,} bytes"
                " (its fields are far smaller: an API key, a token).",
                field="body",
            ) from None
        raise
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise Problem(
            400, "bad_form", f"body: the {name} form is not URL-encoded UTF-8", field="body"
        ) from None
    return dict(parse_qsl(text, keep_blank_values=True))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _zones(current: str) -> list[str]:
    return list(ZONE_CHOICES) + ([current] if current not in ZONE_CHOICES else [])


# --- figures --------------------------------------------------------------------------------


def money(value: float | None) -> str:
    if value is None:
        return NONE
    if value and abs(value) < 0.01:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def count(value: float | None) -> str:
    if value is None:
        return NONE
    # Thousands from 10,000 on (1,234 reads better whole); one decimal keeps 3 digits.
    for size, unit, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= size:
            return f"{value / unit:.1f}{suffix}"
    if value != int(value):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def milliseconds(value: float | None) -> str:
    if value is None:
        return NONE
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def percent(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:.1f}%"


def pretty_json(value: Any, indent: bool = True) -> str:
    """`value` as JSON text, keys sorted, indented (as json.dumps(indent=2) writes it), in
    msgspec's C: an event's payloads can be megabytes, and Python's encoder held the GIL for
    seconds over them. Indented only up to PRETTY_MAX_BYTES, or not at all (`indent` False):
    a page shows the first PAYLOAD_SHOWN_CHARS of it at most."""
    raw = _encode_sorted(value)
    if indent and len(raw) <= PRETTY_MAX_BYTES:
        raw = msgspec.json.format(raw, indent=2)
    return raw.decode()


_encode_sorted = msgspec.json.Encoder(order="sorted").encode
PRETTY_MAX_BYTES = 4 * PAYLOAD_SHOWN_CHARS


def local_time(iso: str | None, tz: str) -> str:
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    try:
        zone = ZoneInfo(tz)
    except (KeyError, ValueError):
        zone = ZoneInfo("UTC")
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class Card:
    label: str
    value: str
    change: str  # "+12% vs previous period", or "" when there is nothing to compare
    direction: str  # "up", "down", "flat" or ""
    good: bool | None  # is the change good news (None: neither)


def _change(
    now: float | None, before: float | None, more_is_good: bool | None
) -> tuple[str, str, bool | None]:
    if now is None or before is None:
        return "", "", None
    if before == 0:
        return ("new", "up", more_is_good) if now else ("no change", "flat", None)
    delta = (now - before) / before
    if abs(delta) < 0.005:
        return "no change", "flat", None
    up = delta > 0
    return (
        f"{delta:+.0%}",
        "up" if up else "down",
        None if more_is_good is None else up == more_is_good,
    )


def _cards(cur: dict[str, Any], prev: dict[str, Any]) -> list[Card]:
    def card(
        label: str, value: str, now: float | None, before: float | None, good: bool | None
    ) -> Card:
        text, direction, is_good = _change(now, before, good)
        return Card(label, value, text, direction, is_good)

    rate_now, rate_before = cur["error_rate"], prev["error_rate"]
    points = (rate_now - rate_before) * 100
    rate = Card(
        "Error rate",
        percent(rate_now),
        "no change" if abs(points) < 0.05 else f"{points:+.1f} pts",
        "flat" if abs(points) < 0.05 else ("up" if points > 0 else "down"),
        None if abs(points) < 0.05 else points < 0,
    )
    return [
        card(
            "Requests",
            count(cur["total_requests"]),
            cur["total_requests"],
            prev["total_requests"],
            None,
        ),
        card("Cost", money(cur["total_cost"]), cur["total_cost"], prev["total_cost"], False),
        card(
            "Tokens in", count(cur["tokens_input"]), cur["tokens_input"], prev["tokens_input"], None
        ),
        card(
            "Tokens out",
            count(cur["tokens_output"]),
            cur["tokens_output"],
            prev["tokens_output"],
            None,
        ),
        card(
            "Average latency",
            milliseconds(cur["avg_latency_ms"]),
            cur["avg_latency_ms"],
            prev["avg_latency_ms"],
            False,
        ),
        card(
            "p95 latency",
            milliseconds(cur["latency_ms"]["p95"]),
            cur["latency_ms"]["p95"],
            prev["latency_ms"]["p95"],
            False,
        ),
        rate,
    ]


@dataclass
class Chart:
    id: str
    title: str
    svg: Markup
    legend: list[tuple[str, str]]
    columns: list[str]
    rows: list[list[str]]


def _overview_charts(series: dict[str, Any], by_model: dict[str, Any], tz: str) -> list[Chart]:
    points = series["series"].get("all", [])
    times = [datetime.fromisoformat(p["t"].replace("Z", "+00:00")) for p in points]
    labels = [local_time(p["t"], tz) for p in points]

    def chart(
        cid: str,
        title: str,
        lines: list[charts.Series],
        fmt: Callable[[float], str],
        at: list[datetime],
    ) -> Chart:
        return Chart(
            cid,
            title,
            charts.line_chart(title, at, lines, tz, fmt),
            charts.legend(lines),
            ["time", *(s.name for s in lines)],
            [
                [labels[i] if i < len(labels) else "", *(fmt(s.values[i]) for s in lines)]
                for i in range(len(at))
            ],
        )

    out = [
        chart(
            "requests",
            "Requests and errors",
            [
                charts.Series("requests", [p["requests"] for p in points]),
                charts.Series("errors", [p["errors"] for p in points]),
            ],
            count,
            times,
        ),
        chart(
            "tokens",
            "Tokens",
            [
                charts.Series("input", [p["tokens_input"] for p in points]),
                charts.Series("output", [p["tokens_output"] for p in points]),
            ],
            count,
            times,
        ),
        chart(
            "latency",
            "Latency p50 and p95",
            [
                charts.Series("p50", [p["latency_p50_ms"] for p in points]),
                charts.Series("p95", [p["latency_p95_ms"] for p in points]),
            ],
            milliseconds,
            times,
        ),
    ]
    models = [
        charts.Series(name, [p["cost"] for p in pts]) for name, pts in by_model["series"].items()
    ]
    if by_model.get("other"):
        models.append(charts.Series("other models", [p["cost"] for p in by_model["other"]]))
    model_points = next(iter(by_model["series"].values()), points)
    model_times = [datetime.fromisoformat(p["t"].replace("Z", "+00:00")) for p in model_points]
    out.append(chart("cost", "Cost by model", models, money, model_times))
    return out


# --- event and run views --------------------------------------------------------------------


@dataclass
class Payload:
    """A prompt, response or JSON field as the event page shows it."""

    kind: str  # "messages", "text" or "json"
    text: str  # the text or pretty JSON ("" for messages)
    messages: list[dict[str, str]]
    folded: bool  # long: shown closed, a click opens it
    size: int
    cut: int = 0  # characters not shown (Allowance)


class Allowance:
    """The characters of payload a page may still show: each payload takes its share (at
    most PAYLOAD_SHOWN_CHARS), in the order the page shows them."""

    def __init__(self, chars: int) -> None:
        self.left = chars

    def take(self, text: str, most: int = PAYLOAD_SHOWN_CHARS) -> str:
        shown = text[: max(0, min(most, self.left))]
        self.left -= len(shown)
        return shown

    def clip(self, text: Any) -> Any:
        """A short text field (an agent step's action, a tool's error) within the allowance,
        with a word on what is cut."""
        if not isinstance(text, str):
            return text
        shown = self.take(text)
        cut = len(text) - len(shown)
        return f"{shown}... ({cut:,} characters more, not shown)" if cut else shown


_STEP_TEXTS = ("action", "reasoning", "observation")
_EXTRA_FIELDS = (
    "metadata",
    "response_metadata",
    "tool_input",
    "tool_output",
    "expected",
    "actual",
    "error_message",
    "stack_trace",
    "reasoning",
)


def _payload_of(value: Any, shown: Allowance) -> Payload | None:
    """A field that may be absent: None for no value (nothing to show)."""
    return None if value is None else _payload(value, shown)


def _payload(value: Any, shown: Allowance) -> Payload:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and "role" in m for m in value)
    ):
        # The messages share the payload's PAYLOAD_SHOWN_CHARS; those after a cut are left out.
        messages, size, cut, room = [], 0, 0, PAYLOAD_SHOWN_CHARS
        for m in value:
            content = m.get("content")
            text = content if isinstance(content, str) else pretty_json(content, room > 0)
            size += len(text)
            part = shown.take(text, room) if not cut else ""
            room -= len(part)
            cut += len(text) - len(part)
            if part or not cut:
                messages.append({"role": str(m.get("role")), "content": part})
        return Payload("messages", "", messages, size > FOLD_CHARS, size, cut)
    text = value if isinstance(value, str) else pretty_json(value, shown.left > 0)
    part = shown.take(text)
    kind = "text" if isinstance(value, str) else "json"
    return Payload(kind, part, [], len(text) > FOLD_CHARS, len(text), len(text) - len(part))


@dataclass
class Row:
    """One node of a run tree, flattened in tree order, with its place on the waterfall."""

    depth: int
    kind: str
    id: str
    name: str
    status: str
    timestamp: str
    duration_ms: float
    left: float  # percent of the run's time
    width: float
    event: dict[str, Any] | None


def waterfall(tree: list[dict[str, Any]]) -> list[Row]:
    flat: list[tuple[int, dict[str, Any]]] = []
    stack = [(0, node) for node in reversed(tree)]
    while stack:  # iterative: a tree is up to 100 deep and 10,000 nodes
        depth, node = stack.pop()
        flat.append((depth, node))
        stack.extend((depth + 1, child) for child in reversed(node.get("children", [])))

    def when(node: dict[str, Any]) -> datetime | None:
        ts = node.get("timestamp")
        return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None

    def duration(node: dict[str, Any]) -> float:
        if node["kind"] == "span":
            return float((node.get("span") or {}).get("duration_ms") or 0)
        return float((node.get("event") or {}).get("latency_ms") or 0)

    starts = [t for _, n in flat if (t := when(n)) is not None]
    if not starts:
        return []
    begin = min(starts)
    end = max(
        (t + timedelta(milliseconds=duration(n)) for _, n in flat if (t := when(n)) is not None),
        default=begin,
    )
    total_ms = max((end - begin).total_seconds() * 1000, 1.0)
    rows = []
    for depth, node in flat:
        t = when(node) or begin
        offset = (t - begin).total_seconds() * 1000
        ms = duration(node)
        event = node.get("event")
        span = node.get("span") or {}
        if node["kind"] == "event" and event:
            name = (
                event.get("tool_name")
                or event.get("step_name")
                or event.get("model")
                or event.get("error_type")
                or event["event_type"]
            )
            label = f"{event['event_type']}: {name}" if name != event["event_type"] else name
            status = event.get("status") or ""
        else:
            label = f"span: {span.get('name', '')}"
            status = str(span.get("status_code") or "")
        rows.append(
            Row(
                depth=depth,
                kind=node["kind"],
                # An event's page is under its event id; a span's node id is its span id.
                id=(event or {}).get("event_id") or node["id"],
                name=label,
                status=status,
                timestamp=node.get("timestamp") or "",
                duration_ms=ms,
                left=charts.bar(offset, total_ms),
                width=max(0.4, charts.bar(ms, total_ms)),
                event=event,
            )
        )
    return rows


# --- the empty state -----------------------------------------------------------------------


def _example(request: Request, page: Page) -> dict[str, str]:
    """The first-event commands shown on an empty project, filled in for this server and
    this minute (templates/_empty.html lays them out)."""
    url = f"{request.url.scheme}://{request.url.netloc}{page.base}"
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"url": url, "timestamp": stamp, "project": page.project}
