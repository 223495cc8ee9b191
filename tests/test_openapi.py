"""`/openapi.json` describes every public route, and schemathesis fuzzes the running server
from it: no 5xx, and every answer matches its documented schema."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from conftest import Running
from openapi_spec_validator import validate
from schemathesis import checks
from starlette.routing import Route

from watchllm_ext.openapi import build_document

INTERNAL = {"/openapi.json"}


def test_document_is_valid_and_covers_every_public_route(server: Running) -> None:
    doc = server.client.get("/openapi.json").json()
    validate(doc)
    routes = {r.path for r in server.app.routes if isinstance(r, Route)}
    # The dashboard's HTML pages are not part of the JSON API (docs/DASHBOARD.md has them).
    pages = {p for p in routes if p == "/" or p.startswith("/dashboard")}
    assert pages, "the dashboard is on by default"
    assert routes - INTERNAL - pages == set(doc["paths"])
    batch = doc["paths"]["/v1/events/batch"]["post"]
    assert set(batch["responses"]) >= {"202", "207", "400", "401", "413", "415", "422", "503"}
    event = doc["components"]["schemas"]["Event"]
    assert event["discriminator"]["propertyName"] == "event_type"
    assert len(event["oneOf"]) == 8
    assert set(batch["responses"]) >= {"408", "429"}


def test_analytics_parameters_carry_the_bounds_the_server_checks(server: Running) -> None:
    doc = server.client.get("/openapi.json").json()

    def params(path: str) -> dict[str, Any]:
        found = doc["paths"][path]["get"]["parameters"]
        return {p["name"]: p["schema"] for p in found}

    series = params("/v1/analytics/timeseries")
    assert series["groups"] == {"type": "integer", "minimum": 1, "maximum": 50, "default": 10}
    assert series["rank_by"]["enum"] == ["events", "requests", "errors", "cost", "tokens"]
    assert series["tz"]["maxLength"] == 64
    logs = params("/v1/analytics/logs")
    assert logs["cursor"]["maxLength"] == 1024
    assert (logs["model"]["maxLength"], logs["q"]["maxLength"]) == (256, 1000)
    assert params("/v1/analytics/runs")["limit"]["default"] == 50
    # The documented bounds are the served ones: one past each is a 400 naming the parameter.
    for query, field in [
        ("group_by=model&groups=51", "groups"),
        ("group_by=model&rank_by=latency", "rank_by"),
        ("tz=" + "A" * 65, "tz"),
    ]:
        answer = server.client.get(
            f"/v1/analytics/timeseries?project_id=acme&{query}", headers=server.headers()
        )
        assert (answer.status_code, answer.json()["field"]) == (400, field), query


def test_admin_routes_need_an_admin_or_operator_key(server: Running) -> None:
    doc = server.client.get("/openapi.json").json()
    for path in ("/v1/admin/count", "/v1/admin/dead-letters", "/v1/admin/dead-letters/replay"):
        (operation,) = doc["paths"][path].values()
        assert operation["security"] == [{"bearer": ["admin"]}]
        assert "operator" in operation["description"]
        assert {"401", "403"} <= set(operation["responses"])
        assert "project" in {p["name"] for p in operation["parameters"]}


@pytest.fixture
def api_schema(server: Running) -> Any:
    # A key for every request; project_id pinned to the key's project so that cases reach
    # the queries instead of stopping at 403 (other projects are covered by test_analytics).
    schema = schemathesis.openapi.from_dict(build_document(server.app.routes))
    schema.config.update(base_url=server.url, headers=server.headers())
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_fuzz_every_route(case: Any, server: Running) -> None:
    if case.path_parameters and "project_id" in case.path_parameters:
        case.path_parameters["project_id"] = "acme"
    if case.query and "project_id" in case.query:
        case.query["project_id"] = "acme"
    if case.path.startswith("/v1/admin/") and case.query and "project" in case.query:
        case.query["project"] = "acme"  # the key's (an admin key); other projects: 403
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    # Every other check applies (no 5xx, documented status codes and content types, answers
    # matching their schemas, invalid input refused). Not "schema-valid input accepted":
    # the API has rules JSON Schema cannot state (timestamps from 1970 to 2100, integers
    # that are not floats like 4.0, no NaN), and refusing those with a 4xx is right.
    excluded = [checks.positive_data_acceptance]
    if response.status_code == 413:  # a body over the size limit is refused too, as 413
        excluded.append(checks.negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)


# Quotas on (memory), with the Stripe webhook: the quota plugin's routes are in the document.
WITH_QUOTAS: dict[str, Any] = {
    "quota_backend": "memory",
    "quota_plans": {"default": {"events_per_day": 10**9}, "pro": {"events_per_minute": 10**6}},
    "stripe_webhook_secret": "whsec_test_openapi",
    "durability": "memory",
}
QUOTA_PATHS = {"/v1/usage", "/v1/admin/usage", "/v1/billing/stripe"}


def test_quota_routes_are_described_when_quotas_are_on(server_factory: Any) -> None:
    server = server_factory(**WITH_QUOTAS)
    doc = server.client.get("/openapi.json").json()
    validate(doc)
    routes = {r.path for r in server.app.routes if isinstance(r, Route)}
    pages = {p for p in routes if p == "/" or p.startswith("/dashboard")}
    assert QUOTA_PATHS <= routes - INTERNAL - pages == set(doc["paths"])
    paths = doc["paths"]
    assert paths["/v1/usage"]["get"]["security"] == [{"bearer": []}]
    admin = paths["/v1/admin/usage"]
    assert admin["get"]["security"] == [{"bearer": ["admin"]}]
    assert admin["post"]["security"] == [{"bearer": ["operator"]}]
    body = admin["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["plan"]["anyOf"][0]["enum"] == ["default", "pro"]
    stripe = paths["/v1/billing/stripe"]["post"]
    assert stripe["security"] == []
    assert [p["name"] for p in stripe["parameters"]] == ["Stripe-Signature"]
    assert {"200", "400", "503"} <= set(stripe["responses"])
    report = doc["components"]["schemas"]["UsageReport"]
    assert {"plan", "limits", "used", "remaining", "resets_in_s"} <= set(report["required"])


@pytest.fixture
def quota_api_schema(server_factory: Any) -> Any:
    # An operator key: it may change usage (POST /v1/admin/usage) and read any project.
    server = server_factory(**WITH_QUOTAS)
    operator = server.keys.create("ops", scope="operator")
    doc = build_document(server.app.routes)
    doc["paths"] = {path: doc["paths"][path] for path in QUOTA_PATHS}  # the rest: above
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=server.url, headers=server.headers(operator))
    return schema


quota_schema = schemathesis.pytest.from_fixture("quota_api_schema")


@quota_schema.parametrize()
def test_fuzz_the_quota_routes(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500, (response.status_code, response.text[:500])
    excluded = [checks.positive_data_acceptance]
    if response.status_code == 413:  # a webhook body over 1 MiB is refused as 413
        excluded.append(checks.negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)
