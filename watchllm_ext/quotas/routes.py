"""The quota plugin's routes.

- `GET /v1/usage`: the calling key's project: plan, limits, usage, what remains (any scope).
- `GET /v1/admin/usage?project=P` (an admin key of P, or an operator key) and
  `POST /v1/admin/usage?project=P` (an operator key: a project's own admin must not reset
  what it is billed on): read, set or reset usage and assign a plan while the server runs;
  what `watchllm usage --url` uses (the memory backend's usage lives only in the server).
- `POST /v1/billing/stripe` (when stripe_webhook_secret is set): Stripe subscription events,
  signature checked with the `stripe` package, mapped to plans; a replayed event changes
  nothing, an older event than the one applied is ignored.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..auth import Principal, Scope
from ..errors import Problem
from .engine import QuotaUnavailable
from .plans import WINDOWS, periods

if TYPE_CHECKING:
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
SETTABLE = (*WINDOWS,)


def quota_routes(plugin: QuotaPlugin) -> list[BaseRoute]:
    async def usage(request: Request) -> Response:
        principal = _any_key(request)
        return JSONResponse(await _report(plugin, principal.project_id))

    async def admin_usage(request: Request) -> Response:
        if request.method == "POST":
            # Usage and plans are what a project is billed on: its own admin key may read
            # them, only the instance's operator may change them.
            project = _admin_project(request, "operator")
            await apply_change(plugin, project, await _json_object(request))
        else:
            project = _admin_project(request, "admin")
        return JSONResponse(await _report(plugin, project))

    async def stripe_webhook(request: Request) -> Response:
        return JSONResponse(await handle_stripe(plugin, request))

    routes: list[BaseRoute] = [
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/v1/admin/usage", admin_usage, methods=["GET", "POST"]),
    ]
    if plugin.settings.stripe_webhook_secret is not None:
        routes.append(Route("/v1/billing/stripe", stripe_webhook, methods=["POST"]))
    return routes


def _wl(request: Request) -> Any:
    return request.app.state.watchllm


def _any_key(request: Request) -> Principal:
    """Any valid key reads its own project's usage (an ingest-only key too: a sender
    should see what it has left)."""
    return _wl(request).authenticate(request, None)


def _admin_project(request: Request, scope: Scope) -> str:
    principal = _wl(request).authenticate(request, scope)
    project = request.query_params.get("project") or principal.project_id
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


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        data = json.loads(body or b"{}")
    except ValueError:
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
            f"unknown field {unknown[0]!r}; use 'reset', 'set' or 'plan'",
            field=unknown[0],
        )
    values = data.get("set") or {}
    if not isinstance(values, dict):
        raise Problem(422, "bad_body", "'set' must be an object of window: count", field="set")
    for window, value in values.items():
        if window not in SETTABLE:
            raise Problem(
                422,
                "bad_body",
                f"unknown window {window!r}; one of {', '.join(SETTABLE)}",
                field=f"set.{window}",
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Problem(
                422,
                "bad_body",
                f"set.{window} must be a whole number, 0 or more",
                field=f"set.{window}",
            )
    if "plan" in data and data["plan"] is not None and data["plan"] not in plugin.plans:
        raise Problem(
            422,
            "unknown_plan",
            f"no plan named {data['plan']!r} (quota_plans has: {', '.join(sorted(plugin.plans))})",
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
    payload = await request.body()
    if len(payload) > MAX_WEBHOOK_BYTES:
        raise Problem(413, "too_large", "a Stripe event is at most 1 MiB", field="body")
    signature = request.headers.get("stripe-signature")
    if not signature:
        raise Problem(
            400, "bad_signature", "the Stripe-Signature header is missing", field="Stripe-Signature"
        )
    try:
        stripe.Webhook.construct_event(payload, signature, secret.get_secret_value())
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
    event = json.loads(payload)
    return await apply_stripe_event(plugin, event)


async def apply_stripe_event(plugin: QuotaPlugin, event: dict[str, Any]) -> dict[str, Any]:
    """Map a verified subscription event to a plan. The answer is always 2xx for an event we
    understood or chose to ignore (Stripe would retry anything else for days)."""
    event_id = str(event.get("id") or "")
    kind = str(event.get("type") or "")
    if kind not in SUBSCRIPTION_EVENTS:
        return {"received": event_id, "ignored": f"event type {kind!r} does not change plans"}
    subscription = (event.get("data") or {}).get("object") or {}
    project = (subscription.get("metadata") or {}).get(PROJECT_METADATA)
    if not project:
        log.warning("Stripe %s %s names no project: no plan changed", kind, event_id)
        return {
            "received": event_id,
            "ignored": f"the subscription has no metadata.{PROJECT_METADATA} naming the project",
        }
    plan = _subscribed_plan(plugin, kind, subscription)
    if plan == "":
        return {
            "received": event_id,
            "ignored": "no item of the subscription has a price listed in stripe_price_plans",
        }
    try:
        if not await plugin.first_delivery(event_id):
            return {"received": event_id, "duplicate": True, "project": project}
        applied = await plugin.assign_plan(project, plan, float(event.get("created") or 0))
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
    if kind == "customer.subscription.deleted" or subscription.get("status") not in ACTIVE_STATUSES:
        return settings.stripe_ended_plan
    items = ((subscription.get("items") or {}).get("data")) or []
    for item in items:
        price = item.get("price") or item.get("plan") or {}
        for ref in (price.get("id"), price.get("lookup_key")):
            if ref and ref in settings.stripe_price_plans:
                return settings.stripe_price_plans[ref]
    return ""
