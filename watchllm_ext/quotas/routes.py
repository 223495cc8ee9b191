"""The quota plugin's routes.

- `GET /v1/usage`: the calling key's project: plan, limits, usage, what remains (any scope).
- `GET /v1/admin/usage?project=P` (an admin key of P, or an operator key) and
  `POST /v1/admin/usage?project=P` (an operator key: a project's own admin must not reset
  what it is billed on): read, set or reset usage and assign a plan while the server runs;
  what `watchllm usage --url` uses (the memory backend's usage lives only in the server).
- `POST /v1/billing/stripe` (when stripe_webhook_secret is set): Stripe subscription events,
  signature checked with the `stripe` package, mapped to plans; a replayed event changes
  nothing, an older event than the one applied is ignored.

Each route carries its OpenAPI description (`described`): `/openapi.json` lists them when the
plugin serves them (quotas on; the webhook with its secret).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..auth import Principal, Scope
from ..errors import ECHO_CHARS, Problem, echo, not_a_project_id
from ..ingest.body import check_content_type, read_request_body
from ..openapi import PROJECT_ID_SCHEMA, ErrorBody, _json, _query, _ref, described
from ..route_params import Query, accepts
from ..schema import PROJECT_ID_RE
from .engine import QuotaUnavailable
from .plans import WINDOWS, Plan, periods

if TYPE_CHECKING:
    from ..settings import Settings
    from .plugin import QuotaPlugin

log = logging.getLogger("watchllm.quotas")

MAX_WEBHOOK_BYTES = 1024 * 1024  # Stripe's events are a few KB
# Subscription statuses under which the subscribed plan applies; any other (canceled,
# unpaid, incomplete_expired, paused, past_due after retries) ends it.
ACTIVE_STATUSES = {"active", "trialing"}
SUBSCRIPTION_EVENTS = {
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
}
PROJECT_METADATA = "watchllm_project"
# Project ids as keys take them (schema.ProjectId).
SETTABLE = (*WINDOWS,)
MAX_SET = 10**18  # a count set by hand stays a 64-bit integer in Redis (INCRBY works on it)


# --- the answers, as /openapi.json describes them ---------------------------------------------


class UsageCounts(BaseModel):
    minute: int = Field(description="events in the minute bucket now (it drains continuously)")
    day: int = Field(description="events of this UTC day")
    month: int = Field(description="events of this UTC month")
    payload_bytes: int = Field(description="payload bytes of this UTC month")


class UsageLeft(BaseModel):
    """Events (bytes) that fit now, for the windows the plan limits only."""

    minute: int | None = None
    day: int | None = None
    month: int | None = None
    payload_bytes: int | None = None


class UsageResets(BaseModel):
    minute: float = Field(description="seconds until the minute bucket is empty")
    day: int = Field(description="seconds until 00:00 UTC")
    month: int = Field(description="seconds until the 1st, 00:00 UTC")


class UsageReport(BaseModel):
    """A project's plan, limits, usage and what is left (`GET /v1/usage`, `watchllm usage`)."""

    project_id: str
    plan: str
    backend: Literal["memory", "redis"]
    limits: Plan
    used: UsageCounts
    remaining: UsageLeft
    resets_in_s: UsageResets
    spent_usd_this_month: float | None = Field(
        None, description="cost of the month's stored events (absent without a store)"
    )


class StripeAnswer(BaseModel):
    """What the webhook did with a verified event (always 200: Stripe retries anything else)."""

    received: str = Field(description="the event id")
    project: str | None = None
    plan: str | None = Field(None, description="the project's plan now")
    ignored: str | None = Field(None, description="why the event changed nothing")
    duplicate: bool | None = Field(None, description="true: a replay of an event already applied")


def quota_routes(plugin: QuotaPlugin) -> list[BaseRoute]:
    @accepts(())
    async def usage(request: Request, qp: Query) -> Response:
        principal = _any_key(request)
        qp.check()  # none: `project` (say) would otherwise be ignored, the key's shown
        return JSONResponse(await _report(plugin, principal.project_id))

    @accepts(("project",))
    async def admin_usage(request: Request, qp: Query) -> Response:
        if request.method == "POST":
            # Usage and plans are what a project is billed on: its own admin key may read
            # them, only the instance's operator may change them.
            project = _admin_project(request, qp, "operator")
            await apply_change(plugin, project, await _json_object(request, plugin.settings))
        else:
            project = _admin_project(request, qp, "admin")
        return JSONResponse(await _report(plugin, project))

    async def stripe_webhook(request: Request) -> Response:
        return JSONResponse(await handle_stripe(plugin, request))

    docs = _operations(plugin)
    routes: list[BaseRoute] = [
        Route("/v1/usage", described(usage, docs["usage"], [UsageReport]), methods=["GET"]),
        Route(
            "/v1/admin/usage",
            described(admin_usage, docs["admin"], [UsageReport]),
            methods=["GET", "POST"],
        ),
    ]
    if plugin.settings.stripe_webhook_secret is not None:
        webhook = described(stripe_webhook, docs["stripe"], [StripeAnswer])
        routes.append(Route("/v1/billing/stripe", webhook, methods=["POST"]))
    return routes


def _problem(description: str) -> dict[str, Any]:
    return _json(_ref(ErrorBody), description)


_UNREADABLE = _problem("the usage backend (Redis) is down; retry after Retry-After")


def _operations(plugin: QuotaPlugin) -> dict[str, dict[str, Any]]:
    """The OpenAPI operations of the routes, for these settings (the plans' names)."""
    report = _json(_ref(UsageReport), "the project's plan, limits, usage and what is left")
    unknown_key = _problem("missing or unknown API key")
    project = _query(
        "project",
        "the project (default: the key's own). An `admin` key may name its own only (another"
        " is 403 naming `project`); an `operator` key, any. One that is not a project id is"
        " 400 naming it",
        PROJECT_ID_SCHEMA,
    )
    bad_project = _problem("`project` is not a project id; `field` names it")
    counts = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            window: {"type": "integer", "minimum": 0, "maximum": MAX_SET} for window in SETTABLE
        },
        "description": "counts to set: the minute bucket's level, the day's, the month's"
        " events, the month's payload bytes",
    }
    change = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "reset": {"type": "boolean", "description": "true: every count back to 0 first"},
            "set": counts,
            "plan": {
                "anyOf": [{"enum": sorted(plugin.plans)}, {"type": "null"}],
                "description": "assign a plan of quota_plans; null: back to the settings' plan",
            },
        },
    }
    return {
        "usage": {
            "get": {
                "summary": "The calling key's project: plan, limits, usage, what is left",
                "description": "Any key of the project may ask (an ingest-only key too).",
                "security": [{"bearer": []}],
                "responses": {
                    "200": report,
                    "400": _problem("a query parameter: this route takes none"),
                    "401": unknown_key,
                    "503": _UNREADABLE,
                },
            }
        },
        "admin": {
            "get": {
                "summary": "A project's usage (what `watchllm usage show --url` asks)",
                "description": "Needs an `admin` key (its own project) or an `operator` key"
                " (every project); any other key is 403.",
                "security": [{"bearer": ["admin"]}],
                "parameters": [project],
                "responses": {
                    "200": report,
                    "400": bad_project,
                    "401": unknown_key,
                    "403": _problem("not an admin key of the project, nor an operator key"),
                    "503": _UNREADABLE,
                },
            },
            "post": {
                "summary": "Reset, set usage or assign a plan while the server runs",
                "description": "Applied in the order reset, set, plan. Needs an `operator`"
                " key: a project's own admin must not change what it is billed on.",
                "security": [{"bearer": ["operator"]}],
                "parameters": [project],
                "requestBody": {  # none is {}: no change, the usage as GET answers it
                    "required": False,
                    "content": {"application/json": {"schema": change}},
                },
                "responses": {
                    "200": _json(_ref(UsageReport), "the project's usage after the change"),
                    "400": bad_project,
                    "401": unknown_key,
                    "403": _problem("not an operator key"),
                    "415": _problem("a body in another type than JSON"),
                    "422": _problem("a field that is unknown or out of bounds; `field` names it"),
                    "503": _UNREADABLE,
                },
            },
        },
        "stripe": {
            "post": {
                "summary": "Stripe subscription events: plan changes",
                "description": "Signed by Stripe (the endpoint's signing secret,"
                " stripe_webhook_secret) instead of an API key. customer.subscription.* events"
                " whose subscription has metadata.watchllm_project set that project's plan"
                " (stripe_price_plans); a replay or an older event changes nothing.",
                "security": [],
                "parameters": [
                    {
                        "name": "Stripe-Signature",
                        "in": "header",
                        "required": True,
                        "description": "t=<unix time>,v1=<HMAC-SHA256 of '<t>.<body>'>",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "description": "a Stripe Event object, as Stripe sent it",
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref(StripeAnswer), "applied, or acknowledged and ignored"),
                    "400": _problem(
                        "the signature is missing, does not match or is over 5 minutes old"
                        " (`field`: Stripe-Signature), or the body is not a Stripe event"
                        " (`field`: the field of the wrong shape, e.g. id or"
                        " data.object.metadata.watchllm_project)"
                    ),
                    "413": _problem("a body over 1 MiB"),
                    "503": _problem("the plan cannot be saved now; Stripe delivers it again"),
                },
            }
        },
    }


def _wl(request: Request) -> Any:
    return request.app.state.watchllm


def _any_key(request: Request) -> Principal:
    """Any valid key reads its own project's usage (an ingest-only key too: a sender
    should see what it has left)."""
    return _wl(request).authenticate(request, None)


def _admin_project(request: Request, qp: Query, scope: Scope) -> str:
    principal = _wl(request).authenticate(request, scope)
    # A misspelled `project` would otherwise read or change the key's own project.
    qp.check()
    project = qp.get("project") or principal.project_id
    if not PROJECT_ID_RE.fullmatch(project):
        # Before any usage state is read or made for it: only a key's project can have usage.
        raise not_a_project_id(project)
    if not principal.administers(project):
        raise Problem(
            403,
            "forbidden",
            f"the key administers project {principal.project_id!r}, not {project!r}"
            " (other projects need the 'operator' scope)",
            field="project",
        )
    return project


async def _report(plugin: QuotaPlugin, project: str) -> dict[str, Any]:
    try:
        return await plugin.report(project)
    except QuotaUnavailable as exc:
        raise Problem(
            503,
            "quota_unavailable",
            f"usage cannot be read now: {exc}",
            headers={"Retry-After": "1"},
        ) from None


async def _bounded_body(request: Request, settings: Settings) -> bytes:
    """The body, refused (413) as soon as it passes MAX_WEBHOOK_BYTES and timed as ingest
    bodies are: read whole first, a client (the webhook needs no key to send) could make the
    server hold any amount before its size was checked."""
    try:
        # Within the bodies' budget and timed, as ingest's.
        return await read_request_body(request, settings, max_bytes=MAX_WEBHOOK_BYTES)
    except Problem as exc:
        if exc.status == 413:
            raise Problem(413, "too_large", "the body is at most 1 MiB", field="body") from None
        raise


async def _json_object(request: Request, settings: Settings) -> dict[str, Any]:
    check_content_type(request.headers.get("content-type"))  # JSON, or none said
    body = await _bounded_body(request, settings)
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):  # (nested deeper than Python's stack: not an answer)
        raise Problem(422, "bad_body", "the body must be a JSON object", field="body") from None
    if not isinstance(data, dict):
        raise Problem(422, "bad_body", "the body must be a JSON object", field="body")
    return data


async def apply_change(plugin: QuotaPlugin, project: str, data: dict[str, Any]) -> None:
    """Apply {"reset": true, "set": {"day": N, ...}, "plan": "pro" | null}, in that order."""
    unknown = sorted(set(data) - {"reset", "set", "plan"})
    if unknown:
        raise Problem(
            422,
            "bad_body",
            f"unknown field {echo(unknown[0])!r}; use 'reset', 'set' or 'plan'",
            field=echo(unknown[0]),
        )
    if not isinstance(data.get("reset", False), bool):
        raise Problem(422, "bad_body", "'reset' must be true or false", field="reset")
    values = data.get("set", {})
    if not isinstance(values, dict):
        raise Problem(422, "bad_body", "'set' must be an object of window: count", field="set")
    for window, value in values.items():
        if window not in SETTABLE:
            raise Problem(
                422,
                "bad_body",
                f"unknown window {echo(window)!r}; one of {', '.join(SETTABLE)}",
                field=f"set.{echo(window)}",
            )
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SET:
            raise Problem(
                422,
                "bad_body",
                f"set.{window} must be a whole number from 0 to {MAX_SET:,}",
                field=f"set.{window}",
            )
    plan = data.get("plan")
    if plan is not None and (not isinstance(plan, str) or plan not in plugin.plans):
        raise Problem(
            422,
            "unknown_plan",
            f"no plan named {echo(repr(plan), ECHO_CHARS + 2)} (quota_plans has:"
            f" {', '.join(sorted(plugin.plans))})",
            field="plan",
        )
    p = periods()
    try:
        if data.get("reset"):
            await plugin.backend.reset(project, p)
        if values:
            await plugin.backend.set(project, p, values)
        if "plan" in data:
            await plugin.assign_plan(project, data["plan"])
    except QuotaUnavailable as exc:
        raise Problem(
            503,
            "quota_unavailable",
            f"usage cannot be changed now: {exc}",
            headers={"Retry-After": "1"},
        ) from None


# --- Stripe -----------------------------------------------------------------------------------


async def handle_stripe(plugin: QuotaPlugin, request: Request) -> dict[str, Any]:
    import stripe

    secret = plugin.settings.stripe_webhook_secret
    assert secret is not None  # the route exists only with a secret
    payload = await _bounded_body(request, plugin.settings)
    signature = request.headers.get("stripe-signature")
    if not signature:
        raise Problem(
            400, "bad_signature", "the Stripe-Signature header is missing", field="Stripe-Signature"
        )
    try:
        # The signature only (construct_event would also build a stripe.Event, and fails
        # with an AttributeError on a body that is JSON but not an object).
        stripe.WebhookSignature.verify_header(
            payload, signature, secret.get_secret_value(), stripe.Webhook.DEFAULT_TOLERANCE
        )
    except stripe.SignatureVerificationError as exc:
        raise Problem(
            400,
            "bad_signature",
            f"the Stripe signature does not match this endpoint's secret: {exc.user_message}",
            field="Stripe-Signature",
        ) from None
    except ValueError as exc:
        raise Problem(
            400, "bad_body", f"the body is not a Stripe event: {exc}", field="body"
        ) from None
    # Verified: read it as plain JSON (the same bytes the signature covers).
    try:
        event = json.loads(payload)
    except RecursionError:
        raise Problem(400, "bad_body", "the body nests too deep", field="body") from None
    except ValueError as exc:
        raise Problem(400, "bad_body", f"the body is not JSON: {exc}", field="body") from None
    return await apply_stripe_event(plugin, event)


def _bad_event(field: str, message: str) -> Problem:
    return Problem(400, "bad_body", f"{field}: {message}", field=field)


def _object(value: Any, field: str) -> dict[str, Any]:
    """`value` when it is a JSON object; a missing (null) one is empty; else 400 naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_event(field, f"must be an object, not {type(value).__name__}")
    return value


async def apply_stripe_event(plugin: QuotaPlugin, event: Any) -> dict[str, Any]:
    """Map a verified subscription event to a plan. The answer is 2xx for an event we
    understood or chose to ignore (Stripe would retry anything else for days), 400 naming
    the field for a shape no Stripe event has (signed, so sent by whoever holds the secret):
    never a plan from a field of the wrong type."""
    if not isinstance(event, dict):
        raise _bad_event("body", "a Stripe event is a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id:
        # The id is what makes a replay a replay: without one, every such event would look
        # like the first one's duplicate.
        raise _bad_event("id", "a Stripe event has a non-empty string id (evt_...)")
    kind = event.get("type")
    if not isinstance(kind, str):
        raise _bad_event("type", "must be a string, e.g. customer.subscription.updated")
    if kind not in SUBSCRIPTION_EVENTS:
        return {"received": event_id, "ignored": f"event type {kind!r} does not change plans"}
    created = event.get("created", 0)
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise _bad_event("created", "must be a Unix time in seconds")
    subscription = _object(_object(event.get("data"), "data").get("object"), "data.object")
    metadata = _object(subscription.get("metadata"), "data.object.metadata")
    project = metadata.get(PROJECT_METADATA)
    if project is None or project == "":
        log.warning("Stripe %s %s names no project: no plan changed", kind, event_id)
        return {
            "received": event_id,
            "ignored": f"the subscription has no metadata.{PROJECT_METADATA} naming the project",
        }
    if not isinstance(project, str) or not PROJECT_ID_RE.fullmatch(project):
        raise _bad_event(
            f"data.object.metadata.{PROJECT_METADATA}",
            f"not a project id (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit):"
            f" {str(project)[:64]!r}",
        )
    plan = _subscribed_plan(plugin, kind, subscription)
    if plan == "":
        return {
            "received": event_id,
            "ignored": "no item of the subscription has a price listed in stripe_price_plans",
        }
    try:
        if not await plugin.first_delivery(event_id):
            return {"received": event_id, "duplicate": True, "project": project}
        applied = await plugin.assign_plan(project, plan, float(created))
    except QuotaUnavailable as exc:
        # Stripe retries a failed delivery: a 503 here is how the change is not lost.
        raise Problem(
            503,
            "quota_unavailable",
            f"the plan cannot be saved now: {exc}",
            headers={"Retry-After": "5"},
        ) from None
    name, _ = plugin.plan_for(project)
    answer: dict[str, Any] = {"received": event_id, "project": project, "plan": name}
    if not applied:
        answer["ignored"] = "a newer event already set this project's plan"
    return answer


def _subscribed_plan(plugin: QuotaPlugin, kind: str, subscription: dict[str, Any]) -> str | None:
    """The plan the subscription gives: a name, None (back to the settings' plan), or ''
    (no price of it is mapped: change nothing)."""
    settings = plugin.settings
    status = subscription.get("status")
    if status is not None and not isinstance(status, str):
        raise _bad_event("data.object.status", "must be a string, e.g. active")
    if kind == "customer.subscription.deleted" or status not in ACTIVE_STATUSES:
        return settings.stripe_ended_plan
    items = _object(subscription.get("items"), "data.object.items").get("data") or []
    if not isinstance(items, list):
        raise _bad_event("data.object.items.data", "must be a list of subscription items")
    for i, item in enumerate(items):
        where = f"data.object.items.data[{i}]"
        item = _object(item, where)
        price = item.get("price") or item.get("plan")
        price = _object(price, f"{where}.{'price' if 'price' in item else 'plan'}")
        for ref in (price.get("id"), price.get("lookup_key")):
            if isinstance(ref, str) and ref in settings.stripe_price_plans:
                return settings.stripe_price_plans[ref]
    return ""
