"""Answers of the analytics routes, as pydantic models: they shape the JSON and give the
OpenAPI document its schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class Percentiles(_Answer):
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None


class ModelUsage(_Answer):
    model: str
    calls: int
    tokens_input: int
    tokens_output: int
    cost: float


class Stats(_Answer):
    project_id: str
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    total_requests: int = Field(description="prompt calls")
    total_events: int
    events_by_type: dict[str, int]
    total_cost: float = Field(description="USD")
    tokens_input: int
    tokens_output: int
    avg_latency_ms: float | None = Field(description="mean latency of prompt calls")
    latency_ms: Percentiles = Field(
        description="latency percentiles of prompt calls (DDSketch, 1% relative accuracy)"
    )
    error_rate: float = Field(description="share of prompt calls whose status is not success")
    distinct_runs: int = Field(description="approximate above 65,536 (uniq)")
    distinct_users: int = Field(description="approximate above 65,536 (uniq)")
    top_models: list[ModelUsage]
    rollup_hours: int = Field(description="whole hours answered from hourly_usage_by_project")


class TimeseriesPoint(_Answer):
    t: datetime
    requests: int
    errors: int
    events: int
    tokens_input: int
    tokens_output: int
    cost: float
    latency_p50_ms: float
    latency_p95_ms: float


class Timeseries(_Answer):
    project_id: str
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    interval: str
    tz: str
    group_by: str | None
    series: dict[str, list[TimeseriesPoint]] = Field(
        description="one series per group shown ('(none)' for events without that field), at"
        " most `groups` of them, the top ones by `rank_by`; one series 'all' without group_by"
    )
    other: list[TimeseriesPoint] | None = Field(
        default=None,
        description="every group not in `series`, summed (null when all groups are shown)",
    )
    groups: int | None = Field(
        default=None,
        description="how many groups may be shown: the `groups` asked for (default 10, at"
        " most 50), fewer where buckets x (groups + 1) would pass `max_points`",
    )
    groups_total: int | None = Field(
        default=None, description="how many distinct groups the range has"
    )
    groups_capped: bool = Field(
        default=False, description="true when groups_total > the groups shown: see `other`"
    )
    rank_by: str | None = Field(
        default=None, description="the measure over the range that ranks the groups"
    )
    max_points: int = Field(description="the bound on points (buckets x series) of one answer")
    rollup_hours: int


class EventSummary(_Answer):
    event_id: str
    event_type: str
    timestamp: str | None
    run_id: str
    parent_event_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    model: str | None = None
    provider: str | None = None
    status: str | None = None
    latency_ms: float | None = None
    tokens_input: int | None = None
    tokens_output: int | None = None
    cost_usd: float | None = None
    cost_source: str | None = None
    error_message: str | None = None
    error_type: str | None = None
    tool_name: str | None = None
    step_name: str | None = None
    tags: list[str] = Field(default_factory=list)
    prompt_preview: str = ""
    response_preview: str = ""
    truncated_fields: list[str] = Field(
        default_factory=list,
        description="the fields shown shortened here: `error_message` (its first 200"
        " characters kept), `prompt` and `response` (the previews hold their first 200"
        " characters), `tags` (the first 16 kept); /v1/analytics/event/{event_id} has them whole",
    )


class LogsPage(_Answer):
    project_id: str
    events: list[EventSummary]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null at the end")
    max_bytes: int = Field(
        description="the bound on this answer's size in bytes: a page stops before `limit`"
        " rows when the next would pass it (`next_cursor` then continues after the last row)"
    )
    bytes_capped: bool = Field(
        default=False, description="true when the page stopped short of `limit` at `max_bytes`"
    )


class EventDetail(_Answer):
    event: dict[str, Any] = Field(description="every stored column of the event")
    tool_calls: list[dict[str, Any]]
    agent_steps: list[dict[str, Any]]
    parent_event_id: str | None
    children: list[str]


class Run(_Answer):
    run_id: str
    start: str | None
    end: str | None
    duration_ms: int
    cost: float
    tokens_input: int
    tokens_output: int
    event_count: int
    error_count: int


class RunsPage(_Answer):
    project_id: str
    runs: list[Run]
    next_cursor: str | None


class SpanSummary(_Answer):
    """An OpenTelemetry span as a run tree shows it (the whole span is in the `spans` table)."""

    span_id: str
    parent_span_id: str | None = None
    name: str
    kind: str = Field(description="unspecified, internal, server, client, producer, consumer")
    start_time: str
    end_time: str
    duration_ms: float
    status_code: str = Field(description="unset, ok, error")
    status_message: str = ""
    service_name: str = ""
    event_type: str | None = Field(
        default=None, description="the event this span also became (LLM work), if any"
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="the first 32 attributes in the order sent, keys and values cut at 200"
        " characters (values that are not strings are their JSON text)",
    )
    attribute_count: int = Field(description="how many attributes the span has in all")
    span_event_count: int = 0
    link_count: int = 0
    truncated_fields: list[str] = Field(
        default_factory=list,
        description="the fields shown shortened: `name`, `status_message` (first 200"
        " characters), `attributes` (some left out or cut)",
    )


class TreeNode(_Answer):
    kind: Literal["event", "span"] = Field(
        description="`event`: a stored event (with `span` too when it came as an OpenTelemetry"
        " span); `span`: a span that is not LLM work, kept only as a span"
    )
    id: str = Field(
        description="the span id for a node with a span (an OpenTelemetry span, also when it"
        " became an event: its event id is event.event_id); the event id for an event sent"
        " as JSON"
    )
    parent_id: str | None = Field(
        description="the parent node's id: a parent span id, or a JSON event's"
        " parent_event_id (the span id when that names a span's event, `<trace>-<span>`)"
    )
    timestamp: str | None
    event: EventSummary | None = None
    span: SpanSummary | None = None
    children: list[TreeNode] = Field(default_factory=list)


class RunDetail(_Answer):
    project_id: str
    run: Run
    tree: list[TreeNode]
    span_count: int = Field(
        default=0,
        description="the OpenTelemetry spans stored for this run (its trace); 0 for a run"
        " sent as events",
    )
    truncated: bool = Field(
        default=False,
        description="true when the run has more events or spans than the tree holds (the"
        " first `limit` (at most 10,000) of each, in time order, as many as fit in"
        " `max_bytes`); `run` and `span_count` still count them all",
    )
    max_bytes: int = Field(description="the bound on this answer's size in bytes")
