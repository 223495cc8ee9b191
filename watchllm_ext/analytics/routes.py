"""The analytics routes. Each: declare the query parameters it accepts (`accepts`),
authenticate (read scope), refuse a parameter it does not accept, take the key's project or
the one an operator key names, parse parameters (one time-range vocabulary for every route
with a range, params.time_range), run named queries from queries.py in a worker thread,
shape the answer (models.py)."""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from zoneinfo import ZoneInfo

import anyio
from pydantic import BaseModel
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import Problem
from ..otel.ids import span_part
from ..route_params import Query, accepts
from ..schema import EVENT_TYPES, Status
from ..store import Store
from ..store.rows import FORMAT_JSON_MESSAGES, FORMAT_LEGACY, read_json
from . import params as P
from . import queries as Q
from .models import (
    EventDetail,
    EventSummary,
    LogsPage,
    ModelUsage,
    Percentiles,
    Run,
    RunDetail,
    RunsPage,
    SpanSummary,
    Stats,
    Timeseries,
    TimeseriesPoint,
    TreeNode,
)
from .reads import SERVING
from .rollup import parse_hour

_EVENT_TYPES = EVENT_TYPES
_STATUSES: tuple[str, ...] = get_args(Status)


def _iso(ch_time: str | None) -> str | None:
    """'2026-01-02 03:04:05.678' (UTC) -> '2026-01-02T03:04:05.678Z'."""
    if ch_time is None:
        return None
    return ch_time.replace(" ", "T") + ("Z" if "." in ch_time else ".000Z")


def _stored_prompt(value: Any, value_format: int) -> Any:
    """A prompt as sent: text, or the list of chat messages (value_format says which; rows
    from before migration 0008 are guessed as before: text starting with '[{' is parsed)."""
    if not isinstance(value, str):
        return value
    if value_format == FORMAT_JSON_MESSAGES:
        return json.loads(value)
    if value_format == FORMAT_LEGACY and value.startswith("[{"):
        return read_json(value)
    return value


async def _run(store: Store, sql: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    serving = SERVING.get()
    if serving is None:  # outside an analytics request (the dashboard's zone check)
        return await anyio.to_thread.run_sync(store.query, sql, args)
    reads, project = serving
    return await reads.query(project, store, sql, args)


async def _reply(build: Callable[[], BaseModel]) -> Response:
    """Build the answer and its JSON in a worker thread: shaping a timeseries, a run tree of
    10,000 nodes or an event of several megabytes must not hold the event loop (/healthz and
    every other request wait on it)."""

    def render() -> bytes:
        return build().model_dump_json(by_alias=True).encode()

    body = await anyio.to_thread.run_sync(render)
    return Response(body, media_type="application/json")


# The zones of each store's ClickHouse, read once per store (a server and chDB may differ).
_STORE_ZONES: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


async def _zone(store: Store, request: Request, params: QueryParams | None = None) -> str:
    """`tz` of `params` (by default the request's: the dashboard checks its own pages' zone
    so): UTC without a look-up; another zone must be known to Python and ClickHouse."""
    qp = request.query_params if params is None else params
    if qp.get("tz", "UTC") == "UTC":
        return "UTC"
    known = _STORE_ZONES.get(store)
    if known is None:
        rows = await _run(store, Q.TIME_ZONES, {})
        known = P.python_zones() & frozenset(r["time_zone"] for r in rows)
        _STORE_ZONES[store] = known
    return P.zone(qp, known)


def _context(request: Request, qp: Query) -> tuple[Any, Store, str]:
    """Authenticate, refuse a query parameter the route does not accept, take the project."""
    wl = request.app.state.watchllm
    principal = wl.authenticate(request, "read")
    qp.check()
    project = P.project(qp, principal)
    if wl.store is None:
        raise Problem(
            503, "store_unavailable", "the store is not open", headers={"Retry-After": "5"}
        )
    SERVING.set((wl.reads, project))  # this request's queries: its project's share (reads.py)
    return wl, wl.store, project


def _hours(span: P.Range) -> tuple[datetime, datetime]:
    """The whole UTC hours inside [start, end): (first, end), possibly empty."""
    first = span.start.replace(minute=0, second=0, microsecond=0)
    if first < span.start:
        first += timedelta(hours=1)
    end = span.end.replace(minute=0, second=0, microsecond=0)
    return first, end


def _rollup_window(span: P.Range, use_rollup: bool = True) -> tuple[datetime, datetime]:
    """The hours the rollup may answer for: whole hours inside the range, or none."""
    first, end = _hours(span)
    return (first, end) if use_rollup and first < end else (first, first)


async def _count_clean(store: Store, project: str, window: tuple[datetime, datetime]) -> int:
    if window[0] >= window[1]:
        return 0
    rows = await _run(
        store, Q.CLEAN_HOURS, {"project": project, "first_hour": window[0], "end_hour": window[1]}
    )
    return int(rows[0]["n"])


def _base_args(project: str, span: P.Range, window: tuple[datetime, datetime]) -> dict[str, Any]:
    return {
        "project": project,
        "from": span.start,
        "to": span.end,
        "first_hour": window[0],
        "end_hour": window[1],
    }


def _num(value: Any) -> float:
    """A percentile of no values comes back as null (NaN): 0 in a timeseries point."""
    return float(value) if isinstance(value, int | float) and value == value else 0.0


def _percentiles(values: list[float] | None, has_any: bool) -> Percentiles:
    if not has_any or not values:
        return Percentiles(p50=None, p90=None, p95=None, p99=None)
    return Percentiles(p50=values[0], p90=values[1], p95=values[2], p99=values[3])


# --- stats ---


@accepts(P.PROJECT, P.RANGE)
async def stats(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/stats"""
    _, store, project = _context(request, qp)
    span = P.time_range(qp)
    window = _rollup_window(span)
    args = _base_args(project, span, window)
    clean = await _count_clean(store, project, window)
    sums = await _run(store, Q.STATS_SUMS, args)
    (states,) = await _run(store, Q.STATS_STATES, args)
    return await _reply(lambda: _stats(project, span, sums, states, clean))


def _stats(
    project: str, span: P.Range, sums: list[dict[str, Any]], states: dict[str, Any], clean: int
) -> Stats:
    calls = [r for r in sums if r["event_type"] == "prompt_call"]
    requests = sum(int(r["events"]) for r in calls)
    latency_count = sum(int(r["latency_count"]) for r in calls)
    by_type: dict[str, int] = {}
    for r in sums:
        by_type[r["event_type"]] = by_type.get(r["event_type"], 0) + int(r["events"])
    return Stats(
        project_id=project,
        start=span.start,
        end=span.end,
        total_requests=requests,
        total_events=sum(by_type.values()),
        events_by_type={k: n for k, n in sorted(by_type.items()) if n},
        # Integer nano-USD and microseconds, divided once: as exact as the stored sums.
        total_cost=sum(int(r["cost_nanousd"]) for r in sums) / 1e9,
        tokens_input=sum(int(r["tokens_input"]) for r in sums),
        tokens_output=sum(int(r["tokens_output"]) for r in sums),
        avg_latency_ms=(
            sum(int(r["latency_sum_us"]) for r in calls) / 1000 / latency_count
            if latency_count
            else None
        ),
        latency_ms=_percentiles(states["latency_quantiles"], latency_count > 0),
        error_rate=sum(int(r["events"]) for r in calls if r["failed"]) / requests
        if requests
        else 0.0,
        distinct_runs=int(states["distinct_runs"]),
        distinct_users=int(states["distinct_users"]),
        top_models=_top_models(calls),
        rollup_hours=clean,
    )


def _top_models(calls: list[dict[str, Any]], limit: int = Q.STATS_MODELS) -> list[ModelUsage]:
    """The models with the most calls (ties by name), from STATS_SUMS's prompt-call rows."""
    totals: dict[str, list[int]] = {}
    for r in calls:
        if r["model"]:
            t = totals.setdefault(r["model"], [0, 0, 0, 0])
            t[0] += int(r["events"])
            t[1] += int(r["tokens_input"])
            t[2] += int(r["tokens_output"])
            t[3] += int(r["cost_nanousd"])
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    return [
        ModelUsage(model=m, calls=n, tokens_input=ti, tokens_output=to, cost=nanos / 1e9)
        for m, (n, ti, to, nanos) in ranked
    ]


# --- timeseries ---


def _bucket_starts(span: P.Range, interval: str, tz: str) -> list[int]:
    """Every bucket start (epoch seconds) of the range, as ClickHouse's toStartOfInterval
    computes them in the zone. Minutes and single hours are steps of absolute time (from the
    epoch for minutes, from the local hour for hours): a clock set back gives its repeated
    hour buckets of its own, as ClickHouse does (stepping the wall clock skipped them, and
    their events with them). Longer ones step the wall clock from the local floor."""
    unit, step, delta = P.INTERVALS[interval]
    end = span.end.timestamp()
    if unit == "Minute":
        seconds = step * 60
        first = int(span.start.timestamp()) // seconds * seconds
        return list(range(first, math.ceil(end), seconds))[: P.MAX_BUCKETS + 3]
    zone = ZoneInfo(tz)
    local = span.start.astimezone(zone)
    if unit == "Hour":
        floored = local.replace(
            minute=0, second=0, microsecond=0, hour=local.hour - local.hour % step
        )
    else:
        floored = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "Hour" and step == 1:
        first = int(floored.timestamp())
        return list(range(first, math.ceil(end), 3600))[: P.MAX_BUCKETS + 3]
    starts: list[int] = []
    wall = floored.replace(tzinfo=None)
    while True:
        instant = wall.replace(tzinfo=zone)
        epoch = int(instant.timestamp())
        if epoch >= end:
            break
        if not starts or epoch > starts[-1]:
            starts.append(epoch)
        wall += delta
        if len(starts) > P.MAX_BUCKETS + 2:
            break
    return starts


def _hour_aligned(tz: str, span: P.Range) -> bool:
    """Rollup hours can be re-bucketed in this zone only if its offsets are whole hours."""
    zone = ZoneInfo(tz)
    probes = [span.start + (span.end - span.start) * i / 8 for i in range(9)]
    return all(
        (p.astimezone(zone).utcoffset() or timedelta()).total_seconds() % 3600 == 0 for p in probes
    )


@accepts(P.PROJECT, P.RANGE, ("interval", "tz", "group_by", "groups", "rank_by"))
async def timeseries(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/timeseries"""
    _, store, project = _context(request, qp)
    span = P.time_range(qp)
    interval = P.interval(qp, span)
    group = P.choice(qp, "group_by", tuple(Q.GROUP_COLUMNS))
    wanted_groups = P.whole(qp, "groups", P.DEFAULT_GROUPS, P.MAX_GROUPS)
    rank_by = P.choice(qp, "rank_by", P.RANK_BY) or "events"
    if group is None:
        for name in ("groups", "rank_by"):
            if name in qp:
                raise P.bad(name, "only with group_by")
    tz = await _zone(store, request, qp)
    unit, step, _ = P.INTERVALS[interval]
    starts = await anyio.to_thread.run_sync(_bucket_starts, span, interval, tz)
    use_rollup = unit != "Minute" and _hour_aligned(tz, span)
    window = _rollup_window(span, use_rollup)
    clean = await _count_clean(store, project, window)
    args = {**_base_args(project, span, window), "step": step, "tz": tz}
    # Series shown: the top groups plus "other"; every series has a point per bucket.
    groups = max(1, min(wanted_groups, P.MAX_POINTS // max(len(starts), 1) - 1))
    top: list[str] = []
    groups_total = 1
    if group:
        ranked = await _run(store, Q.TIMESERIES_TOP[(group, rank_by)], {**args, "groups": groups})
        top = [r["grp"] for r in ranked]
        groups_total = int(ranked[0]["groups_total"]) if ranked else 0
        rows = await _run(store, Q.TIMESERIES_GROUPED[(unit, group)], {**args, "top": top})
    else:
        rows = await _run(store, Q.TIMESERIES[(unit, None)], args)

    # ClickHouse's DateTime starts at the epoch: a bucket that starts before it (1970's first
    # day west of Greenwich) comes back as 0. Only the one holding the epoch can hold events.
    at_epoch = max((start for start in starts if start <= 0), default=0)

    def build() -> Timeseries:
        by_key = {(int(r["bucket"]) or at_epoch, r["grp"], bool(r.get("kept", 1))): r for r in rows}
        series = {
            ((name or "(none)") if group else "all"): _points(starts, by_key, name, True)
            for name in (top if group else [""])
        }
        capped = groups_total > len(top) if group else False
        return Timeseries(
            project_id=project,
            start=span.start,
            end=span.end,
            interval=interval,
            tz=tz,
            group_by=group,
            series=series,
            other=_points(starts, by_key, "", False) if capped else None,
            groups=groups if group else None,
            groups_total=groups_total if group else None,
            groups_capped=capped,
            rank_by=rank_by if group else None,
            max_points=P.MAX_POINTS,
            rollup_hours=clean,
        )

    return await _reply(build)


def _points(
    starts: list[int], by_key: dict[tuple[int, str, bool], dict[str, Any]], name: str, kept: bool
) -> list[TimeseriesPoint]:
    """One point per bucket start, zeros where the group had no events."""
    points = []
    for epoch in starts:
        row = by_key.get((epoch, name, kept))
        quantiles = (row or {}).get("latency_quantiles") or []
        has_latency = bool(row) and int(row["requests"]) > 0 and bool(quantiles)
        points.append(
            TimeseriesPoint(
                t=datetime.fromtimestamp(epoch, UTC),
                requests=int(row["requests"]) if row else 0,
                errors=int(row["errors"]) if row else 0,
                events=int(row["all_events"]) if row else 0,
                tokens_input=int(row["tokens_input"]) if row else 0,
                tokens_output=int(row["tokens_output"]) if row else 0,
                cost=float(row["cost"]) if row else 0.0,
                latency_p50_ms=_num(quantiles[0]) if has_latency else 0.0,
                latency_p95_ms=_num(quantiles[2]) if has_latency else 0.0,
            )
        )
    return points


# --- logs ---


_SUMMARY_FIELDS = (
    "event_id",
    "event_type",
    "run_id",
    "parent_event_id",
    "user_id",
    "session_id",
    "model",
    "provider",
    "status",
    "latency_ms",
    "tokens_input",
    "tokens_output",
    "cost_source",
    "tool_name",
    "step_name",
    "error_type",
)
# The fields LOG_COLUMNS may cut, by their *_cut flag.
_CUT_FLAGS = (
    ("error_message", "error_message_cut"),
    ("prompt", "prompt_cut"),
    ("response", "response_cut"),
    ("tags", "tags_cut"),
)

# The byte budgets of a logs page and of a run tree (the whole JSON answer). Rows are
# summaries of bounded size (queries.LOG_COLUMNS), so a page is about 1 KB a row; the
# budgets only bind on fat rows. _ENVELOPE is kept free for the fields around the rows
# (project, cursor, the run's figures), each at most a few hundred bytes.
LOGS_MAX_BYTES = 4_000_000
TREE_MAX_BYTES = 8_000_000
_ENVELOPE = 2_000


def _page_args(page: int, after: tuple[datetime, str] | None, span: P.Range) -> dict[str, Any]:
    """The keyset parameters of LOGS and RUNS: page size and the cursor, if any."""
    return {
        "limit": page,
        "has_cursor": 1 if after else 0,
        "cursor_ts": after[0] if after else span.end,
        "cursor_id": after[1] if after else "",
    }


def _event_row(row: dict[str, Any]) -> EventSummary:
    return EventSummary(
        **{name: row.get(name) for name in _SUMMARY_FIELDS},
        timestamp=_iso(row["ts"]),
        cost_usd=row.get("cost_estimate_usd"),
        error_message=row.get("error_message_head"),
        tags=row.get("tags_head") or [],
        prompt_preview=row.get("prompt_preview") or "",
        response_preview=row.get("response_preview") or "",
        truncated_fields=[name for name, flag in _CUT_FLAGS if row.get(flag)],
    )


def _json_size(item: BaseModel) -> int:
    """Bytes of an item inside a JSON list: its JSON and the comma after it."""
    return len(item.model_dump_json(by_alias=True).encode()) + 1


def _fitting(items: list[Any], budget: int) -> int:
    """How many of the first items fit in budget bytes of JSON (at least one: a summary is
    far smaller than any budget, so a page always moves on)."""
    used = 0
    for i, item in enumerate(items):
        used += _json_size(item)
        if used > budget and i > 0:
            return i
    return len(items)


@accepts(
    P.PROJECT,
    P.RANGE,
    P.PAGE,
    ("status", "event_type", "model", "run_id", "user_id", "tag", "q"),
)
async def logs(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/logs"""
    _, store, project = _context(request, qp)
    span = P.time_range(qp)
    page = P.limit(qp)
    after = P.cursor(qp)
    args = {
        "project": project,
        "from": span.start,
        "to": span.end,
        **_page_args(page, after, span),
        "status": P.choice(qp, "status", _STATUSES) or "",
        "event_type": P.choice(qp, "event_type", _EVENT_TYPES) or "",
        "model": P.text(qp, "model"),
        "run_id": P.text(qp, "run_id"),
        "user_id": P.text(qp, "user_id"),
        "tag": P.text(qp, "tag"),
        "q": P.text(qp, "q", 1000),
    }
    rows = await _run(store, Q.LOGS, args)

    def build() -> LogsPage:
        events = [_event_row(r) for r in rows]
        kept = _fitting(events, LOGS_MAX_BYTES - _ENVELOPE)
        # The cursor is the last row shown: the next page starts strictly after it, so a
        # page cut by the budget skips nothing.
        more = kept < len(rows) or len(rows) == page
        last = rows[kept - 1] if kept else None
        return LogsPage(
            project_id=project,
            events=events[:kept],
            next_cursor=P.encode_cursor(last["ts"], last["event_id"]) if more and last else None,
            max_bytes=LOGS_MAX_BYTES,
            bytes_capped=kept < len(rows),
        )

    return await _reply(build)


# --- one event ---


@accepts(P.PROJECT)
async def event(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/event/{event_id}"""
    _, store, project = _context(request, qp)
    event_id = P.ident(request.path_params["event_id"], "event_id")
    args = {"project": project, "event_id": event_id}
    rows = await _run(store, Q.EVENT, args)
    if not rows:
        raise Problem(
            404, "not_found", f"no event {event_id!r} in project {project!r}", field="event_id"
        )
    row = rows[0]
    tools = await _run(store, Q.EVENT_TOOL_CALLS, args)
    steps = await _run(store, Q.EVENT_AGENT_STEPS, args)
    children = await _run(store, Q.EVENT_CHILDREN, args)

    def build() -> EventDetail:
        # Decoding fields of up to a megabyte each: in the worker thread with the rest.
        value_format = int(row.pop("value_format", FORMAT_LEGACY) or FORMAT_LEGACY)
        # JSON fields read the same whatever the row's format (rows.read_json says why);
        # the prompt needs the format to tell text from chat messages.
        for name in _JSON_FIELDS:
            row[name] = read_json(row.get(name))
        row["prompt"] = _stored_prompt(row.get("prompt"), value_format)
        row["timestamp"] = _iso(row["timestamp"])
        for tool in tools:
            tool["tool_input"] = read_json(tool["tool_input"])
            tool["tool_output"] = read_json(tool["tool_output"])
        return EventDetail(
            event=row,
            tool_calls=tools,
            agent_steps=steps,
            parent_event_id=row.get("parent_event_id"),
            children=[c["event_id"] for c in children],
        )

    return await _reply(build)


_JSON_FIELDS = ("metadata", "response_metadata", "tool_input", "tool_output", "expected", "actual")


# --- runs ---


def _run_row(row: dict[str, Any]) -> Run:
    return Run(
        run_id=row["run_id"],
        start=_iso(row["start"]),
        end=_iso(row["end"]),
        duration_ms=int(row["duration_ms"]),
        cost=float(row["cost"]),
        tokens_input=int(row["tokens_input"]),
        tokens_output=int(row["tokens_output"]),
        event_count=int(row["event_count"]),
        error_count=int(row["error_count"]),
    )


@accepts(P.PROJECT, P.RANGE, P.PAGE)
async def runs(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/runs"""
    _, store, project = _context(request, qp)
    span = P.time_range(qp)
    page = P.limit(qp, default=50, maximum=1000)
    after = P.cursor(qp)
    rows = await _run(
        store,
        Q.RUNS,
        {
            "project": project,
            "from": span.start,
            "to": span.end,
            **_page_args(page, after, span),
        },
    )
    next_cursor = (
        P.encode_cursor(rows[-1]["start"], rows[-1]["run_id"]) if len(rows) == page else None
    )
    return await _reply(
        lambda: RunsPage(
            project_id=project, runs=[_run_row(r) for r in rows], next_cursor=next_cursor
        )
    )


# Deeper nodes hang under their ancestor at this depth (their parent_id still names their
# parent): a chain of 10,000 events nested one in another cannot be serialised as JSON.
MAX_TREE_DEPTH = 100
# The events and spans a run tree holds at most, each; `limit` asks for fewer nodes.
MAX_TREE_NODES = Q.MAX_TREE_NODES


def _tree(nodes: list[TreeNode]) -> list[TreeNode]:
    """Nest nodes under their parent (events by parent_event_id, spans by parent span);
    a node whose parent is not in the run, or whose parents loop back to it, is a root.
    Input and output in time order. Nodes are told apart by position, not id: a JSON event
    may have a span's id, and then a child naming that id hangs under the span."""
    by_id: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.id not in by_id or (node.span is not None and nodes[by_id[node.id]].span is None):
            by_id[node.id] = i
    parent: list[int | None] = []
    for i, node in enumerate(nodes):
        up = by_id.get(node.parent_id) if node.parent_id else None
        parent.append(up if up != i else None)
    depth: dict[int, int] = {}
    for i in range(len(nodes)):
        while True:  # walk up to a known depth or a root; cut a loop where it closes
            path: list[int] = []
            on_path: set[int] = set()
            cur: int | None = i
            while cur is not None and cur not in depth and cur not in on_path:
                path.append(cur)
                on_path.add(cur)
                cur = parent[cur]
            if cur is not None and cur in on_path:
                parent[cur] = None
                continue
            base = depth[cur] if cur is not None else -1
            for n, at in enumerate(reversed(path), start=1):
                depth[at] = base + n
            break
    host: dict[int, int] = {}  # where a node too deep hangs: its ancestor at MAX_TREE_DEPTH - 1
    for i in sorted(range(len(nodes)), key=depth.__getitem__):
        up = parent[i]
        if up is not None and depth[i] >= MAX_TREE_DEPTH:
            host[i] = host.get(up, up)
    roots = []
    for i, node in enumerate(nodes):
        up = parent[i]
        if up is None:
            roots.append(node)
        else:
            nodes[host.get(i, up)].children.append(node)
    return roots


def _span_row(row: dict[str, Any]) -> SpanSummary:
    cut = [name for name in ("name", "status_message", "attributes") if row.get(f"{name}_cut")]
    return SpanSummary(
        span_id=row["span_id"],
        parent_span_id=row.get("parent_span_id") or None,
        name=row["name_head"],
        kind=row["kind"],
        start_time=_iso(row["ts"]) or "",
        end_time=_iso(row["end_ts"]) or "",
        duration_ms=float(row["duration_ms"]),
        status_code=row["status_code"],
        status_message=row["status_message_head"],
        service_name=row["service_name"],
        event_type=row.get("event_type"),
        attributes=dict(zip(row["attribute_keys"], row["attribute_values"], strict=True)),
        attribute_count=int(row["attribute_count"]),
        span_event_count=int(row["span_event_count"]),
        link_count=int(row["link_count"]),
        truncated_fields=cut,
    )


_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def _time_key(iso: str | None) -> str:
    """A node's time, comparable as text: events are stored to the millisecond and spans to
    the microsecond, so the fraction is padded to six digits before comparing."""
    if not iso:
        return ""
    whole, _, fraction = iso.rstrip("Z").partition(".")
    return f"{whole}.{fraction:0<6}"


def _span_figures(row: dict[str, Any], run_id: str) -> Run:
    """The figures of a trace none of whose spans became an event: its time from the spans,
    no events, no cost."""
    return Run(
        run_id=run_id,
        start=_iso(row["start"]),
        end=_iso(row["end"]),
        duration_ms=int(row["duration_ms"]),
        cost=0.0,
        tokens_input=0,
        tokens_output=0,
        event_count=0,
        error_count=0,
    )


def _spanning(figures: Run, span_figures: dict[str, Any]) -> Run:
    """A trace's run lasts from its first span's start to its last span's end: a root span
    (the HTTP request around the LLM calls, say) starts before its first event and ends after
    the last one's."""
    times = [(figures.start, figures.end), (_iso(span_figures["start"]), _iso(span_figures["end"]))]
    starts = [t for t, _ in times if t is not None]
    ends = [t for _, t in times if t is not None]
    if not starts or not ends:
        return figures
    # Both to the microsecond, the spans' precision: not one end in ms and the other in us.
    start = _time_key(min(starts, key=datetime.fromisoformat)) + "Z"
    end = _time_key(max(ends, key=datetime.fromisoformat)) + "Z"
    duration = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return figures.model_copy(
        update={"start": start, "end": end, "duration_ms": int(duration.total_seconds() * 1000)}
    )


def _pair_spans(
    events: list[dict[str, Any]], span_of: dict[str, SpanSummary], run_id: str
) -> dict[str, SpanSummary]:
    """Each event that came as a span of this trace, with its span, taken out of `span_of`.
    An LLM span's event is named `<trace id>-<span id>` (otel/ids.py, mapping version 3);
    one stored before version 3 has the span id alone, and pairs only with a span that
    became an event of its type, after the others: a JSON event whose id happens to equal a
    span id never takes that span."""
    paired: dict[str, SpanSummary] = {}
    for e in events:
        key = span_part(e["event_id"], run_id)
        if key is not None and key in span_of:
            paired[e["event_id"]] = span_of.pop(key)
    for e in events:
        old = span_of.get(e["event_id"])
        if e["event_id"] not in paired and old is not None and old.event_type == e["event_type"]:
            paired[e["event_id"]] = span_of.pop(e["event_id"])
    return paired


def _event_node(e: dict[str, Any], span: SpanSummary | None, run_id: str) -> TreeNode:
    """An event's node. Nodes of a trace are named by span id, so that events and spans link
    alike: an event with its span takes the span's ids; a JSON event's parent that is a span's
    event (`<trace>-<span>`) is that span's node."""
    if span is not None:
        node_id, parent = span.span_id, span.parent_span_id
    else:
        node_id, parent = e["event_id"], e.get("parent_event_id")
        if parent:
            parent = span_part(parent, run_id) or parent
    return TreeNode(
        kind="event",
        id=node_id,
        parent_id=parent,
        timestamp=_iso(e["ts"]),
        event=_event_row({**e, "run_id": run_id}),
        span=span,
    )


@accepts(P.PROJECT, ("limit",))
async def run(request: Request, qp: Query) -> Response:
    """GET /v1/analytics/runs/{run_id}: the run's events and, for a run that came as an
    OpenTelemetry trace, its spans that are not events, nested as sent."""
    _, store, project = _context(request, qp)
    run_id = P.ident(request.path_params["run_id"], "run_id")
    limit = P.limit(qp, default=MAX_TREE_NODES, maximum=MAX_TREE_NODES)
    args = {"project": project, "run_id": run_id}
    rows = await _run(store, Q.RUN, args)
    # Spans are stored under their trace id, 32 lowercase hex digits: another run id (a run
    # sent as JSON events) has none, and is not looked up in `spans`.
    span_figures: dict[str, Any] = {"span_count": 0}
    if _TRACE_ID.fullmatch(run_id):
        (span_figures,) = await _run(store, Q.RUN_SPAN_FIGURES, args)
    span_count = int(span_figures["span_count"])
    if not rows and not span_count:
        raise Problem(404, "not_found", f"no run {run_id!r} in project {project!r}", field="run_id")
    # RUN_EVENTS and RUN_SPANS drop in SQL the rows that cannot fit the budget; build() counts
    # exactly. The first `limit` of each hold the first `limit` nodes: a span that is also an
    # event is one node, so the nodes before any node are at least as many events or spans.
    bounds = {**args, "max_bytes": TREE_MAX_BYTES, "limit": limit}
    events = await _run(store, Q.RUN_EVENTS, bounds) if rows else []
    spans = await _run(store, Q.RUN_SPANS, bounds) if span_count else []

    def build() -> RunDetail:
        span_of = {s["span_id"]: _span_row(s) for s in spans}
        span_of_event = _pair_spans(events, span_of, run_id)
        nodes = [_event_node(e, span_of_event.get(e["event_id"]), run_id) for e in events]
        nodes += [
            TreeNode(
                kind="span",
                id=span.span_id,
                parent_id=span.parent_span_id,
                timestamp=span.start_time,
                span=span,
            )
            for span in span_of.values()
        ]
        nodes.sort(key=lambda n: (_time_key(n.span.start_time if n.span else n.timestamp), n.id))
        nodes = nodes[:limit]
        # Nodes in time order while they fit: each node's JSON alone (children still empty)
        # plus its comma is what it adds to the nested tree.
        kept = _fitting(nodes, TREE_MAX_BYTES - _ENVELOPE)
        shown = nodes[:kept]
        if rows:
            figures = _run_row(rows[0])
            if span_count:
                figures = _spanning(figures, span_figures)
        else:
            figures = _span_figures(span_figures, run_id)
        shown_events = sum(1 for n in shown if n.kind == "event")
        shown_spans = sum(1 for n in shown if n.span is not None)
        return RunDetail(
            project_id=project,
            run=figures,
            tree=_tree(shown),
            span_count=span_count,
            truncated=shown_events < figures.event_count or shown_spans < span_count,
            max_bytes=TREE_MAX_BYTES,
        )

    return await _reply(build)


ROUTES: list[tuple[str, Callable[..., Any]]] = [
    ("/v1/analytics/stats", stats),
    ("/v1/analytics/timeseries", timeseries),
    ("/v1/analytics/logs", logs),
    ("/v1/analytics/event/{event_id}", event),
    ("/v1/analytics/runs", runs),
    ("/v1/analytics/runs/{run_id}", run),
]


def routes() -> list[Route]:
    return [Route(path, endpoint, methods=["GET"]) for path, endpoint in ROUTES]


__all__ = ["ROUTES", "accepts", "parse_hour", "routes"]
