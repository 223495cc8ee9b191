"""Plan changes from Stripe (POST /v1/billing/stripe, watchllm_ext/quotas/routes.py), once per
usage backend. Payloads are signed here with a test secret by Stripe's algorithm (HMAC-SHA256
of "<timestamp>.<body>", header "t=...,v1=..."), so the `stripe` package's verification runs
for real, with no network."""

from __future__ import annotations

import hashlib
import hmac
import json
import selectors
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, prompt_call
from redis_server import RedisServer

SECRET = "whsec_test_" + "k" * 24
PRO = "price_pro_monthly"
PLANS = {"free": {"events_per_day": 5}, "pro": {"events_per_day": 1_000}}


def sign(payload: bytes, secret: str = SECRET, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def subscription_event(
    kind: str,
    price: str,
    *,
    project: str | None = "acme",
    status: str = "active",
    created: int = 1_764_500_000,
    event_id: str | None = None,
) -> dict[str, Any]:
    metadata = {"watchllm_project": project} if project else {}
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "type": kind,
        "created": created,
        "livemode": False,
        "data": {
            "object": {
                "id": "sub_123",
                "object": "subscription",
                "status": status,
                "metadata": metadata,
                "items": {
                    "object": "list",
                    "data": [{"id": "si_1", "price": {"id": price, "lookup_key": None}}],
                },
            }
        },
    }


@pytest.fixture(params=["memory", "redis"])
def billing(request: pytest.FixtureRequest, server_factory: Any, tmp_path: Path) -> Iterator[Any]:
    redis_srv = RedisServer(tmp_path / "redis").start() if request.param == "redis" else None

    def start() -> Running:
        settings: dict[str, Any] = {
            "quota_backend": request.param,
            "quota_plans": PLANS,
            "quota_default_plan": "free",
            "stripe_webhook_secret": SECRET,
            "stripe_price_plans": {"price_pro_monthly": "pro"},
            "durability": "memory",
        }
        if redis_srv is not None:
            settings["redis_url"] = redis_srv.url
        return server_factory(**settings)

    yield start
    if redis_srv is not None:
        redis_srv.stop()


def post(server: Running, event: dict[str, Any], **sign_args: Any) -> Any:
    body = json.dumps(event).encode()
    return server.client.post(
        "/v1/billing/stripe",
        content=body,
        headers={"Stripe-Signature": sign(body, **sign_args), "Content-Type": "application/json"},
    )


def plan_of(server: Running) -> str:
    return server.client.get("/v1/usage", headers=server.headers()).json()["plan"]


def send(server: Running, n: int) -> int:
    batch = {"events": [prompt_call(uuid.uuid4().hex) for _ in range(n)]}
    return server.client.post("/v1/events/batch", json=batch, headers=server.headers()).status_code


def test_a_signed_subscription_event_changes_the_plan(billing: Any) -> None:
    server = billing()
    assert plan_of(server) == "free"
    assert send(server, 5) == 202
    assert send(server, 1) == 429  # free: 5 a day
    answer = post(server, subscription_event("customer.subscription.created", "price_pro_monthly"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["plan"] == "pro" and answer.json()["project"] == "acme"
    assert plan_of(server) == "pro"
    assert send(server, 10) == 202  # pro's limits, on the very next request
    # The subscription ends: back to the default plan.
    ended = subscription_event(
        "customer.subscription.deleted",
        "price_pro_monthly",
        status="canceled",
        created=1_764_500_100,
    )
    assert post(server, ended).json()["plan"] == "free"
    assert send(server, 1) == 429


def test_a_bad_signature_is_400_and_changes_nothing(billing: Any) -> None:
    server = billing()
    event = subscription_event("customer.subscription.created", "price_pro_monthly")
    body = json.dumps(event).encode()
    cases = {
        "another secret": sign(body, secret="whsec_someone_else"),
        "another body": sign(body + b" "),
        "too old": sign(body, at=int(time.time()) - 3_600),  # stripe's tolerance is 300 s
        "not a signature": "v1=abc",
    }
    for case, signature in cases.items():
        answer = server.client.post(
            "/v1/billing/stripe", content=body, headers={"Stripe-Signature": signature}
        )
        assert answer.status_code == 400, case
        assert answer.json()["field"] == "Stripe-Signature", case
    missing = server.client.post("/v1/billing/stripe", content=body)
    assert missing.status_code == 400 and missing.json()["field"] == "Stripe-Signature"
    assert plan_of(server) == "free"


def test_replays_and_late_events_change_nothing(billing: Any) -> None:
    server = billing()
    upgrade = subscription_event(
        "customer.subscription.created", "price_pro_monthly", created=1_764_500_000
    )
    assert post(server, upgrade).json()["plan"] == "pro"
    replayed = post(server, upgrade)  # Stripe delivers again (a retry, or an attacker's replay)
    assert replayed.status_code == 200 and replayed.json()["duplicate"] is True
    cancel = subscription_event(
        "customer.subscription.deleted",
        "price_pro_monthly",
        status="canceled",
        created=1_764_500_200,
    )
    assert post(server, cancel).json()["plan"] == "free"
    # The upgrade replayed after the cancellation: still a duplicate, the plan stays.
    assert post(server, upgrade).json()["duplicate"] is True
    assert plan_of(server) == "free"
    # A different event that is older than the one applied (Stripe does not order them).
    late = subscription_event(
        "customer.subscription.updated", "price_pro_monthly", created=1_764_500_100
    )
    answer = post(server, late).json()
    assert answer["plan"] == "free" and "newer event" in answer["ignored"]
    # Events that do not concern plans, or name no project, are acknowledged and ignored.
    other = post(server, {**upgrade, "id": "evt_other", "type": "invoice.paid"}).json()
    assert "ignored" in other
    anonymous = subscription_event(
        "customer.subscription.created", "price_pro_monthly", project=None
    )
    assert "no metadata.watchllm_project" in post(server, anonymous).json()["ignored"]
    unmapped = subscription_event("customer.subscription.created", "price_unknown")
    assert "stripe_price_plans" in post(server, unmapped).json()["ignored"]
    assert plan_of(server) == "free"


def test_the_plan_and_seen_events_outlive_a_restart(billing: Any) -> None:
    server = billing()
    upgrade = subscription_event("customer.subscription.created", "price_pro_monthly")
    assert post(server, upgrade).json()["plan"] == "pro"
    server.stop()
    again = billing()  # the same data folder (memory backend: its plan file) or Redis
    assert plan_of(again) == "pro"
    assert post(again, upgrade).json()["duplicate"] is True


def _with(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `event` with the field at dotted `path` set to `value` (removed: ...)."""
    event = json.loads(json.dumps(event))
    *parents, last = path.split(".")
    here = event
    for name in parents:
        here = here[name]
    if value is ...:
        del here[last]
    else:
        here[last] = value
    return event


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("data", "x", "data"),
        ("data.object", "x", "data.object"),
        ("data.object.metadata", "x", "data.object.metadata"),
        ("data.object.metadata.watchllm_project", 5, "data.object.metadata.watchllm_project"),
        ("data.object.metadata.watchllm_project", "../x", "data.object.metadata.watchllm_project"),
        ("data.object.items", "x", "data.object.items"),
        ("data.object.items.data", {"price": "x"}, "data.object.items.data"),
        ("data.object.items.data", ["x"], "data.object.items.data[0]"),
        ("data.object.items.data", [{"price": "x"}], "data.object.items.data[0].price"),
        ("data.object.status", ["active"], "data.object.status"),
        ("created", "yesterday", "created"),
        ("type", 5, "type"),
        ("id", ..., "id"),
        ("id", "", "id"),
        ("id", 7, "id"),
    ],
)
def test_an_odd_signed_event_is_400_naming_its_field_and_assigns_nothing(
    billing: Any, path: str, value: Any, field: str
) -> None:
    server = billing()
    event = _with(subscription_event("customer.subscription.updated", PRO), path, value)
    for _ in range(2):  # the same answer again: an event with no id is no "duplicate"
        answer = post(server, event)
        assert answer.status_code == 400, answer.text
        assert answer.json()["field"] == field and answer.json()["error"] == "bad_body"
        assert field in answer.json()["message"]
    assert plan_of(server) == "free"


@pytest.mark.parametrize("body", [[1], "x", None, 5])
def test_a_signed_body_that_is_not_an_object_is_400(billing: Any, body: Any) -> None:
    server = billing()
    answer = post(server, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "body"


def test_signed_events_the_webhook_ignores_are_200_with_the_reason(billing: Any) -> None:
    server = billing()
    other = {"id": "evt_other", "type": "invoice.paid", "data": "anything"}
    assert "does not change plans" in post(server, other).json()["ignored"]
    no_project = _with(
        subscription_event("customer.subscription.updated", PRO), "data.object.metadata", None
    )
    assert "metadata.watchllm_project" in post(server, no_project).json()["ignored"]
    no_items = _with(
        subscription_event("customer.subscription.updated", PRO), "data.object.items", ...
    )
    assert "stripe_price_plans" in post(server, no_items).json()["ignored"]
    assert plan_of(server) == "free"


def test_a_signed_body_that_is_not_json_is_400(billing: Any) -> None:
    server = billing()
    body = b"{not json"
    answer = server.client.post(
        "/v1/billing/stripe", content=body, headers={"Stripe-Signature": sign(body)}
    )
    assert answer.status_code == 400 and answer.json()["field"] == "body", answer.text


def test_a_signed_body_nested_too_deep_is_400(billing: Any) -> None:
    server = billing()
    body = b'{"id": "evt_deep", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = server.client.post(
        "/v1/billing/stripe", content=body, headers={"Stripe-Signature": sign(body)}
    )
    assert answer.status_code == 400 and answer.json()["field"] == "body", answer.text
    assert plan_of(server) == "free"


def test_a_body_over_the_limit_is_refused_before_it_is_all_read(billing: Any) -> None:
    # The webhook needs no key to be sent to: its body is refused as it arrives (chunked,
    # no Content-Length), not read whole and measured afterwards.
    server = billing()
    host, port = server.url.removeprefix("http://").split(":")
    piece = b"10000\r\n" + b"x" * 65536 + b"\r\n"  # one chunk of 64 KiB
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/billing/stripe HTTP/1.1\r\nHost: t\r\nStripe-Signature: t=1,v1=00\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        waiting = selectors.DefaultSelector()
        waiting.register(sock, selectors.EVENT_READ)
        answer, sent = b"", 0
        while not answer and sent < 1024:  # up to 64 MiB
            sock.sendall(piece)
            sent += 1
            if waiting.select(timeout=0):  # (epoll: select() fails past fd 1024)
                answer = sock.recv(65536)
        waiting.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent * 65536 < 8 << 20  # answered at about the limit (1 MiB), not at the end


def test_quota_settings_with_quotas_off_are_said_once_at_start(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/QUOTAS.md's Stripe block used to leave WATCHLLM_QUOTA_BACKEND out: the server then
    started with no plan enforced and the webhook route 404, and said nothing."""
    caplog.set_level("WARNING", logger="watchllm.quotas")
    server = server_factory(
        stripe_webhook_secret=SECRET, quota_plans=PLANS, quota_default_plan="free"
    )
    said = [r for r in caplog.records if r.name == "watchllm.quotas"]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    message = said[0].getMessage()
    assert "quota_plans, quota_default_plan, stripe_webhook_secret are ignored" in message
    assert "set quota_backend to 'memory' or 'redis' (env WATCHLLM_QUOTA_BACKEND)" in message
    body = json.dumps(subscription_event("customer.subscription.created", PRO)).encode()
    webhook = server.client.post(
        "/v1/billing/stripe", content=body, headers={"Stripe-Signature": sign(body)}
    )
    assert webhook.status_code == 404  # what the warning is about
    server.stop()
    # Quotas on, or nothing of theirs set: nothing to say.
    caplog.clear()
    server_factory(quota_backend="memory", stripe_webhook_secret=SECRET).stop()
    server_factory().stop()
    assert not [r for r in caplog.records if r.name == "watchllm.quotas"]
