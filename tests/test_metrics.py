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
    assert found["watchllm_alerts_firing:type"] == ["gauge"]
    assert found["watchllm_store_query_duration_seconds:type"] == ["histogram"]
    (queries,) = [
        s for s in found["watchllm_store_query_duration_seconds"] if s.name.endswith("_count")
    ]
    assert queries.value >= 2  # the stats queries and the event's
    # The writer's series are still there.
    assert "watchllm_events_accepted" in found


class OtlpReceiver:
    """A local OTLP/HTTP endpoint: keeps the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/json"
                assert self.headers["X-Api-Key"] == "k1"
                receiver.bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def otlp_metric(body: dict[str, Any], name: str) -> dict[str, Any]:
    (resource,) = body["resourceMetrics"]
    (scope,) = resource["scopeMetrics"]
    (metric,) = [m for m in scope["metrics"] if m["name"] == name]
    return metric


def test_otlp_metrics_export(server_factory: Any) -> None:
    import time

    receiver = OtlpReceiver()
    try:
        server = server_factory(
            otel_metrics_endpoint=receiver.url,
            otel_metrics_interval_s=0.2,
            otel_metrics_headers={"X-Api-Key": "k1"},
        )
        r = server.client.post(
            "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call()]}
        )
        assert r.status_code == 202
        deadline = time.monotonic() + 10

        def accepted(body: dict[str, Any]) -> float:
            points = otlp_metric(body, "watchllm_events_accepted")["sum"]["dataPoints"]
            return points[0]["asDouble"]

        while not (receiver.bodies and accepted(receiver.bodies[-1]) == 1.0):
            assert time.monotonic() < deadline, receiver.bodies[-1:]
            time.sleep(0.05)
        body = receiver.bodies[-1]
        resource = body["resourceMetrics"][0]["resource"]["attributes"]
        assert {"key": "service.name", "value": {"stringValue": "watchllm"}} in resource
        counter = otlp_metric(body, "watchllm_events_accepted")["sum"]
        assert counter["isMonotonic"] and counter["aggregationTemporality"] == 2
        histogram = otlp_metric(body, "watchllm_http_request_duration_seconds")["histogram"]
        (point,) = [
            p
            for p in histogram["dataPoints"]
            if {"key": "route", "value": {"stringValue": "/v1/events/batch"}} in p["attributes"]
        ]
        assert point["count"] == "1" and point["sum"] > 0
        assert len(point["bucketCounts"]) == len(point["explicitBounds"]) + 1
        assert sum(int(n) for n in point["bucketCounts"]) == 1
        gauge = otlp_metric(body, "watchllm_writer_up")["gauge"]
        assert gauge["dataPoints"][0]["asDouble"] == 1.0
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
