"""Optional OpenTelemetry metrics export: every `otel_metrics_interval_s`, the series of
`/metrics` (the app's own registry) are POSTed to an OTLP/HTTP endpoint
(`otel_metrics_endpoint`, e.g. an OpenTelemetry Collector's `http://collector:4318/v1/metrics`
or a vendor's) in OTLP's JSON encoding, cumulative, so a lost export loses nothing.

No OpenTelemetry package is needed: the registry is read as Prometheus families and written
as OTLP `sum` (counters), `gauge` and `histogram` metrics.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

import anyio
import httpx

from .. import __version__
from ..hookspecs import BackgroundTask, hookimpl
from ..sdk.context import local_apps
from ..settings import Settings
from ..store import Store

log = logging.getLogger("watchllm.otel_metrics")

CUMULATIVE = 2  # AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
TIMEOUT_S = 10.0


def _attributes(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in sorted(labels.items())]


def otlp_metrics(families: Iterable[Any], start_ns: int, now_ns: int) -> list[dict[str, Any]]:
    """Prometheus metric families (prometheus_client's `Metric`) as OTLP JSON metrics."""
    times = {"startTimeUnixNano": str(start_ns), "timeUnixNano": str(now_ns)}
    out: list[dict[str, Any]] = []
    for family in families:
        base = {"name": family.name, "description": family.documentation}
        if family.type == "counter":
            points = [
                {"attributes": _attributes(s.labels), "asDouble": float(s.value), **times}
                for s in family.samples
                if s.name.endswith("_total")
            ]
            out.append(
                base
                | {
                    "sum": {
                        "dataPoints": points,
                        "aggregationTemporality": CUMULATIVE,
                        "isMonotonic": True,
                    }
                }
            )
        elif family.type == "gauge":
            points = [
                {"attributes": _attributes(s.labels), "asDouble": float(s.value), **times}
                for s in family.samples
            ]
            out.append(base | {"gauge": {"dataPoints": points}})
        elif family.type == "histogram":
            out.append(
                base
                | {
                    "histogram": {
                        "dataPoints": _histogram_points(family.samples, times),
                        "aggregationTemporality": CUMULATIVE,
                    }
                }
            )
    return out


def _histogram_points(samples: Iterable[Any], times: dict[str, str]) -> list[dict[str, Any]]:
    """Prometheus buckets are cumulative (le); OTLP's are per bucket, the last one +Inf."""
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        point = series.setdefault(tuple(sorted(labels.items())), {"buckets": [], "labels": labels})
        if s.name.endswith("_bucket"):
            point["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            point["count"] = s.value
        elif s.name.endswith("_sum"):
            point["sum"] = s.value
    points = []
    for point in series.values():
        buckets = sorted(point["buckets"])
        counts, previous = [], 0.0
        for _, cumulative in buckets:
            counts.append(str(int(cumulative - previous)))
            previous = cumulative
        points.append(
            {
                "attributes": _attributes(point["labels"]),
                "count": str(int(point.get("count", previous))),
                "sum": float(point.get("sum", 0.0)),
                "bucketCounts": counts,
                "explicitBounds": [le for le, _ in buckets if le != float("inf")],
                **times,
            }
        )
    return points


def otlp_request(registry: Any, start_ns: int, service: str) -> dict[str, Any]:
    now_ns = time.time_ns()
    return {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": _attributes(
                        {
                            "service.name": service,
                            "service.version": __version__,
                            "host.name": socket.gethostname(),
                        }
                    )
                },
                "scopeMetrics": [
                    {
                        "scope": {"name": "watchllm", "version": __version__},
                        "metrics": otlp_metrics(registry.collect(), start_ns, now_ns),
                    }
                ],
            }
        ]
    }


class OtelMetricsExporter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.start_ns = time.time_ns()

    @hookimpl
    def register_background_tasks(
        self, settings: Settings, store: Store | None
    ) -> BackgroundTask | None:
        return self.run if settings.otel_metrics_endpoint else None

    async def run(self) -> None:
        wl = await self._app()
        url = self.settings.otel_metrics_endpoint
        assert url is not None
        headers = {"Content-Type": "application/json", **self.settings.otel_metrics_headers}
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            while True:
                await anyio.sleep(self.settings.otel_metrics_interval_s)
                body = otlp_request(wl.registry, self.start_ns, "watchllm")
                try:
                    answer = await client.post(url, json=body, headers=headers)
                    if not answer.is_success:
                        log.warning("OTLP metrics export got HTTP %d", answer.status_code)
                except httpx.HTTPError as exc:
                    # Cumulative figures: the next export carries everything this one had.
                    log.warning("OTLP metrics export failed: %s", exc)

    async def _app(self) -> Any:
        with anyio.fail_after(30):
            while True:
                for app in local_apps():
                    pm = getattr(app, "pm", None)
                    if pm is not None and pm.is_registered(self):
                        return app
                await anyio.sleep(0.01)


def make_plugin(settings: Settings) -> OtelMetricsExporter:
    return OtelMetricsExporter(settings)
