"""Prometheus metrics at `/metrics`, read from the writer's own counters at scrape time.

One registry per app (never the global one), so several apps in one process, or tests, do
not collide. A Datadog or Grafana agent scrapes the same endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response

from .metrics import OpsMetrics

if TYPE_CHECKING:
    from ..app import WatchLLM


class WriterCollector:
    def __init__(self, wl: WatchLLM) -> None:
        self.wl = wl

    def collect(self) -> Iterator[Metric]:
        writer = self.wl.writer
        up = GaugeMetricFamily("watchllm_writer_up", "1 while the writer runs")
        up.add_metric([], 1.0 if writer is not None and writer.running else 0.0)
        yield up
        yield _counter(
            "watchllm_events_accepted",
            "Events accepted (answered 2xx)",
            self.wl.counters["accepted"],
        )
        yield _counter(
            "watchllm_events_rejected",
            "Events rejected as invalid (207/422)",
            self.wl.counters["rejected"],
        )
        # The quota plugin's fallbacks and denials (watchllm_ext/quotas), when it is on.
        quota = self.wl.pm.get_plugin("watchllm_ext.quotas.plugin")
        if hasattr(quota, "metric_families"):
            yield from quota.metric_families()
        # Guardian's evictions at its per-project bound, when it has rules.
        guardian = self.wl.pm.get_plugin("watchllm_ext.guardian.plugin")
        if hasattr(guardian, "metric_families") and guardian.engine.rules:
            yield from guardian.metric_families()
        # The OTLP exporter sink's requests and partial-success rejections, when it is on.
        exporter = self.wl.pm.get_plugin("watchllm_ext.otel.export")
        if hasattr(exporter, "metric_families"):
            yield from exporter.metric_families()
        if writer is None:
            return
        stats = writer.stats()
        yield _counter(
            "watchllm_writer_full",
            "Requests refused with 503 because the spool (or memory log) was full",
            stats["full_total"],
        )
        spool = GaugeMetricFamily("watchllm_spool_bytes", "Bytes in the spool")
        spool.add_metric([], stats["log_bytes"])
        yield spool
        in_memory = GaugeMetricFamily(
            "watchllm_events_in_memory", "Decoded events kept in memory for the sinks"
        )
        in_memory.add_metric([], stats["events_in_memory"])
        yield in_memory
        families: dict[str, Any] = {
            "lag_events": GaugeMetricFamily(
                "watchllm_sink_lag_events",
                "Events in the spool the sink has not written yet",
                labels=["sink"],
            ),
            "lag_seconds": GaugeMetricFamily(
                "watchllm_sink_lag_seconds",
                "Age of the oldest event the sink has not written",
                labels=["sink"],
            ),
            "delivered_events_total": CounterMetricFamily(
                "watchllm_sink_delivered_events", "Events the sink has written", labels=["sink"]
            ),
            "retries_total": CounterMetricFamily(
                "watchllm_sink_retries", "Failed writes that were retried", labels=["sink"]
            ),
            "dead_letter_events_total": CounterMetricFamily(
                "watchllm_sink_dead_letter_events",
                "Events the sink refused for good",
                labels=["sink"],
            ),
        }
        for name, sink in stats["sinks"].items():
            for key, family in families.items():
                family.add_metric([name], sink[key])
        yield from families.values()


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def make_registry(wl: WatchLLM) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WriterCollector(wl))  # type: ignore[arg-type]
    registry.watchllm_ops = OpsMetrics(registry)  # type: ignore[attr-defined]  # latency, denials
    return registry


async def metrics_endpoint(request: Request) -> Response:
    wl = request.app.state.watchllm
    return Response(generate_latest(wl.registry), media_type=CONTENT_TYPE_LATEST)
