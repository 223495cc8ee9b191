"""/metrics: the operational series (request latency per route, rejections by reason, quota
denials, alerts, store query latency), read back through prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from conftest import prompt_call
from prometheus_client.parser import text_string_to_metric_families

from watchllm_ext import hookimpl
from watchllm_ext.auth import Principal
from watchllm_ext.quota import QuotaDecision


class DenyBigBatches:
    @hookimpl
    def check_quota(self, principal: Principal, n_events: int) -> QuotaDecision | None:
        return QuotaDecision(False, reason="too many at once") if n_events > 5 else None


def samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, []).extend(family.samples)
        found[family.name + ":type"] = [family.type]
    return found


def test_metrics_parse_and_show_each_new_series(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(DenyBigBatches(),))
    client, headers = server.client, server.headers()
    assert (
        client.post(
            "/v1/events/batch", headers=headers, json={"events": [prompt_call()]}
        ).status_code
        == 202
    )
    assert client.post("/v1/events/batch", json={"events": [prompt_call()]}).status_code == 401
    assert client.post("/v1/events/batch", headers=headers, json={"nope": 1}).status_code == 422
    big = {"events": [prompt_call(f"b{i}") for i in range(6)]}
    assert client.post("/v1/events/batch", headers=headers, json=big).status_code == 429
    server.flush()
    assert client.get("/v1/analytics/stats", headers=headers).status_code == 200
    assert client.get("/v1/analytics/event/e1", headers=headers).status_code == 200
    assert client.get("/no/such/path").status_code == 404

    found = samples(client.get("/metrics").text)

    assert found["watchllm_http_request_duration_seconds:type"] == ["histogram"]
    counts = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in found["watchllm_http_request_duration_seconds"]
        if s.name.endswith("_count")
    }
    assert counts[("/v1/events/batch", "POST", "202")] == 1
    assert counts[("/v1/events/batch", "POST", "401")] == 1
    assert counts[("/v1/analytics/stats", "GET", "200")] == 1
    # The route template, never the path with its ids (one series per event otherwise).
    assert counts[("/v1/analytics/event/{event_id}", "GET", "200")] == 1
    assert counts[("unmatched", "GET", "404")] == 1

    rejections = {
        s.labels["reason"]: s.value
        for s in found["watchllm_rejections"]
        if s.name == "watchllm_rejections_total"
    }
    assert rejections["unauthorized"] == 1
    assert rejections["quota_exceeded"] == 1
    assert rejections["bad_body"] == 1

    denials = {
        s.labels["check"]: s.value
        for s in found["watchllm_quota_denials"]
        if s.name == "watchllm_quota_denials_total"
    }
    assert denials == {"ingest": 1.0}

    assert found["watchllm_alerts:type"] == ["counter"]  # no alert yet: the family, no sample
    assert found["watchllm_store_query_duration_seconds:type"] == ["histogram"]
    (queries,) = [
        s for s in found["watchllm_store_query_duration_seconds"] if s.name.endswith("_count")
    ]
    assert queries.value >= 2  # the stats queries and the event's
    # The writer's series are still there.
    assert "watchllm_events_accepted" in found
