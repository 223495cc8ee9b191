"""The run tree of an OpenTelemetry trace (/v1/analytics/runs/{trace_id}): every span as sent,
the LLM spans as their events (with the span beside), the others as span nodes, parents
linking through both; one copy of a span sent twice (spans FINAL); bounded by `limit` and
bytes. Spans go in as the store sink writes them (SpanRow JSON through insert_json), events
through the JSON API, so this runs on every store whatever the receiver does.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import Running, prompt_call
from stores import EVERY_STORE

from watchllm_ext.analytics.routes import TREE_MAX_BYTES
from watchllm_ext.otel.rows import SpanRow, encode_rows
from watchllm_ext.store.rows import JSON_INPUT_SETTINGS

pytestmark = EVERY_STORE

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
TRACE = "0af7651916cd43dd8448eb211c80319c"
ROOT, AGENT, LLM, TOOL, DB = (f"{i:016x}" for i in (0xA1, 0xA2, 0xA3, 0xA4, 0xA5))


def span(
    span_id: str,
    parent: str | None,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    trace_id: str = TRACE,
    project: str = "acme",
    ingested: datetime | None = None,
    **fields: Any,
) -> SpanRow:
    values: dict[str, Any] = {
        "kind": "internal",
        "status_code": "unset",
        "service_name": "shop",
        "attributes": {},
    }
    values.update(fields)
    return SpanRow(
        project_id=project,
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        start_time=T0 + timedelta(milliseconds=start_ms),
        end_time=T0 + timedelta(milliseconds=end_ms),
        duration_ms=end_ms - start_ms,
        ingested_at=ingested or datetime.now(UTC),
        **values,
    )


def store_spans(server: Running, rows: list[SpanRow]) -> None:
    """Insert spans as the store sink does: the rows' JSON, read by ClickHouse."""
    store = server.wl.store
    store.insert_json("spans", encode_rows(rows), JSON_INPUT_SETTINGS)


def post_events(server: Running, events: list[dict[str, Any]]) -> None:
    r = server.client.post("/v1/events/batch", json={"events": events}, headers=server.headers())
    assert r.status_code == 202, r.text
    server.flush()


def iso_ms(start_ms: float) -> str:
    t = T0 + timedelta(milliseconds=start_ms)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tree(server: Running, run_id: str = TRACE, **params: Any) -> dict[str, Any]:
    r = server.client.get(
        f"/v1/analytics/runs/{run_id}", params=params or None, headers=server.headers()
    )
    assert r.status_code == 200, r.text
    return r.json()


def shape(nodes: list[dict[str, Any]]) -> list[Any]:
    """(kind, id, children) of each node, nested."""
    return [(n["kind"], n["id"], shape(n["children"])) for n in nodes]


def an_agent_trace() -> tuple[list[SpanRow], list[dict[str, Any]]]:
    """An HTTP request (server span) running an agent (plain internal span) that calls a
    model (LLM span: also a prompt_call event) which calls a tool (also a tool_call event),
    and a database query (plain span) beside the agent."""
    spans = [
        span(
            ROOT,
            None,
            "POST /checkout",
            0,
            900,
            kind="server",
            status_code="ok",
            attributes={"http.request.method": "POST", "http.response.status_code": "200"},
        ),
        span(AGENT, ROOT, "agent run", 10, 800, attributes={"agent.loop": "3"}),
        span(
            LLM,
            AGENT,
            "chat gpt-4o",
            20.5,
            400,
            kind="client",
            event_type="prompt_call",
            attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
        ),
        span(
            TOOL,
            LLM,
            "execute_tool lookup",
            410,
            500,
            event_type="tool_call",
            status_code="error",
            status_message="lookup failed",
        ),
        span(DB, ROOT, "SELECT orders", 850, 880, kind="client", status_code="error"),
    ]
    events = [
        prompt_call(LLM, run_id=TRACE, parent_event_id=AGENT, timestamp=iso_ms(20.5)),
        {
            "event_id": TOOL,
            "event_type": "tool_call",
            "run_id": TRACE,
            "parent_event_id": LLM,
            "timestamp": iso_ms(410),
            "tool_name": "lookup",
            "status": "error",
            "latency_ms": 90,
        },
    ]
    return spans, events


def test_the_tree_is_the_trace_as_sent(server: Running) -> None:
    spans, events = an_agent_trace()
    store_spans(server, spans)
    post_events(server, events)
    got = tree(server)
    assert shape(got["tree"]) == [
        (
            "span",
            ROOT,
            [
                ("span", AGENT, [("event", LLM, [("event", TOOL, [])])]),
                ("span", DB, []),
            ],
        )
    ]
    assert got["span_count"] == 5 and got["truncated"] is False
    root = got["tree"][0]
    assert root["parent_id"] is None and root["event"] is None
    assert root["timestamp"] == "2026-01-02T03:04:05.123456Z"
    assert root["span"] == {
        "span_id": ROOT,
        "parent_span_id": None,
        "name": "POST /checkout",
        "kind": "server",
        "start_time": "2026-01-02T03:04:05.123456Z",
        "end_time": "2026-01-02T03:04:06.023456Z",
        "duration_ms": 900.0,
        "status_code": "ok",
        "status_message": "",
        "service_name": "shop",
        "event_type": None,
        "attributes": {"http.request.method": "POST", "http.response.status_code": "200"},
        "attribute_count": 2,
        "span_event_count": 0,
        "link_count": 0,
        "truncated_fields": [],
    }
    agent = root["children"][0]
    assert agent["parent_id"] == ROOT and agent["span"]["attributes"] == {"agent.loop": "3"}
    # The LLM span is its event, with the span beside it: one node, linked through the agent.
    llm = agent["children"][0]
    assert llm["parent_id"] == AGENT
    assert llm["event"]["model"] == "gpt-4o" and llm["event"]["run_id"] == TRACE
    assert llm["span"]["name"] == "chat gpt-4o" and llm["span"]["event_type"] == "prompt_call"
    assert llm["span"]["start_time"] == "2026-01-02T03:04:05.143956Z"
    tool = llm["children"][0]
    assert tool["event"]["tool_name"] == "lookup"
    assert tool["span"]["status_code"] == "error"
    assert tool["span"]["status_message"] == "lookup failed"
    # The run's figures are its events' (cost, tokens), as for a run sent as JSON.
    assert got["run"]["event_count"] == 2 and got["run"]["tokens_input"] == 100


def test_events_named_by_trace_and_span_id_pair_with_their_spans(server: Running) -> None:
    """Mapping version 3 names a span's event `<trace>-<span>` (otel/ids.py): the tree is the
    same as for the older events named by the span id alone (the test above); nodes keep the
    span ids, each event keeps its own id. An SDK event sent as JSON under the LLM span's
    event hangs under its node; a JSON event whose id is a span id does not take that span."""
    spans, events = an_agent_trace()
    for event in events:
        event["event_id"] = f"{TRACE}-{event['event_id']}"
        event["parent_event_id"] = f"{TRACE}-{event['parent_event_id']}"
    note = prompt_call(
        "sdk-note", run_id=TRACE, parent_event_id=f"{TRACE}-{LLM}", timestamp=iso_ms(405)
    )
    # The id of the DB span (not LLM work): a JSON event that happens to have it.
    stray = prompt_call(DB, run_id=TRACE, timestamp=iso_ms(860))
    store_spans(server, spans)
    post_events(server, [*events, note, stray])
    got = tree(server)
    assert shape(got["tree"]) == [
        (
            "span",
            ROOT,
            [
                (
                    "span",
                    AGENT,
                    [("event", LLM, [("event", "sdk-note", []), ("event", TOOL, [])])],
                ),
                ("span", DB, []),
            ],
        ),
        ("event", DB, []),  # no parent: a root, beside the span whose id it has
    ]
    llm = got["tree"][0]["children"][0]["children"][0]
    assert llm["event"]["event_id"] == f"{TRACE}-{LLM}" and llm["parent_id"] == AGENT
    assert llm["span"]["span_id"] == LLM and llm["span"]["name"] == "chat gpt-4o"
    sdk_note, tool = llm["children"]
    assert sdk_note["span"] is None and sdk_note["parent_id"] == LLM
    assert tool["event"]["event_id"] == f"{TRACE}-{TOOL}" and tool["span"]["span_id"] == TOOL
    db_span, db_event = got["tree"][0]["children"][1], got["tree"][1]
    assert db_span["event"] is None and db_span["span"]["name"] == "SELECT orders"
    assert db_event["span"] is None and db_event["event"]["event_id"] == DB
    assert got["run"]["event_count"] == 4 and got["span_count"] == 5


def test_the_dashboards_run_page_links_each_event_by_its_event_id(server: Running) -> None:
    """The run page's rows come from the tree, whose nodes are named by span id: an event's
    link must still be its own page, /dashboard/event/<trace>-<span>."""
    spans, events = an_agent_trace()
    for event in events:
        event["event_id"] = f"{TRACE}-{event['event_id']}"
        event["parent_event_id"] = f"{TRACE}-{event['parent_event_id']}"
    store_spans(server, spans)
    post_events(server, events)
    with httpx.Client(base_url=server.url, timeout=60) as browser:
        form = browser.get("/dashboard/signin")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text
        r = browser.post(
            "/dashboard/signin", data={"api_key": server.key, "csrf_token": token.group(1)}
        )
        assert r.status_code == 303, r.text
        page = browser.get(f"/dashboard/run/{TRACE}")
        assert page.status_code == 200, page.text
        links = re.findall(r'href="[^"]*/dashboard/event/([^"?]+)"', page.text)
        assert links == [f"{TRACE}-{LLM}", f"{TRACE}-{TOOL}"]
        for event_id in links:
            event_page = browser.get(f"/dashboard/event/{event_id}")
            assert event_page.status_code == 200 and event_id in event_page.text


def test_a_trace_with_no_llm_span_is_a_run(server: Running) -> None:
    store_spans(
        server,
        [
            span(ROOT, None, "GET /health", 0, 50, kind="server"),
            span(AGENT, ROOT, "check db", 5, 40, status_code="error"),
        ],
    )
    got = tree(server)
    assert shape(got["tree"]) == [("span", ROOT, [("span", AGENT, [])])]
    assert got["span_count"] == 2 and got["truncated"] is False
    run = got["run"]
    assert run["run_id"] == TRACE and run["event_count"] == 0 and run["cost"] == 0
    assert run["start"] == "2026-01-02T03:04:05.123456Z"
    assert run["end"] == "2026-01-02T03:04:05.173456Z" and run["duration_ms"] == 50


def test_a_span_sent_twice_is_shown_once_as_last_sent(server: Running) -> None:
    first = datetime(2026, 1, 2, 4, tzinfo=UTC)
    store_spans(server, [span(ROOT, None, "root", 0, 100, ingested=first, attributes={"v": "1"})])
    store_spans(
        server,
        [span(ROOT, None, "root", 0, 100, ingested=first + timedelta(seconds=1), attributes={})],
    )
    store_spans(server, [span(AGENT, ROOT, "child", 1, 2, ingested=first)])
    store_spans(server, [span(AGENT, ROOT, "child", 1, 2, ingested=first)])
    got = tree(server)
    assert shape(got["tree"]) == [("span", ROOT, [("span", AGENT, [])])]
    assert got["span_count"] == 2
    assert got["tree"][0]["span"]["attributes"] == {}


def test_a_span_sent_again_with_another_start_time_counts_once(server: Running) -> None:
    """A client that re-stamps a retry: another key to the table, one span to the run."""
    first = datetime(2026, 1, 2, 4, tzinfo=UTC)
    store_spans(server, [span(ROOT, None, "root", 0, 100, ingested=first)])
    store_spans(server, [span(AGENT, ROOT, "child", 1, 2, ingested=first)])
    later = first + timedelta(seconds=1)
    store_spans(server, [span(AGENT, ROOT, "child again", 5, 9, ingested=later)])
    rows = server.query("SELECT count() AS n FROM spans WHERE span_id = {s:String}", {"s": AGENT})
    assert rows[0]["n"] == 2  # both kept in the table (their keys differ)
    got = tree(server)
    assert shape(got["tree"]) == [("span", ROOT, [("span", AGENT, [])])]
    assert got["span_count"] == 2
    assert got["tree"][0]["children"][0]["span"]["name"] == "child again"  # the newest


def test_spans_of_another_project_or_trace_stay_out(server: Running) -> None:
    other_trace = "f" * 32
    store_spans(
        server,
        [
            span(ROOT, None, "mine", 0, 10),
            span(AGENT, ROOT, "theirs", 1, 2, project="other"),
            span(DB, ROOT, "other trace", 1, 2, trace_id=other_trace),
        ],
    )
    got = tree(server)
    assert shape(got["tree"]) == [("span", ROOT, [])] and got["span_count"] == 1
    other = server.keys.create("other", scope="read")
    r = server.client.get(f"/v1/analytics/runs/{TRACE}", headers=server.headers(other))
    assert r.status_code == 200 and shape(r.json()["tree"]) == [("span", AGENT, [])]
    missing = server.client.get(f"/v1/analytics/runs/{'e' * 32}", headers=server.headers())
    assert missing.status_code == 404 and missing.json()["field"] == "run_id"


def test_a_span_whose_parent_never_came_is_a_root(server: Running) -> None:
    store_spans(server, [span(AGENT, "9" * 16, "orphan", 0, 1), span(DB, AGENT, "kid", 1, 2)])
    got = tree(server)
    assert shape(got["tree"]) == [("span", AGENT, [("span", DB, [])])]
    assert got["tree"][0]["parent_id"] == "9" * 16


def test_a_span_summary_is_cut_and_says_so(server: Running) -> None:
    attributes = {f"key.{i:03d}": f"value {i}" for i in range(100)}
    attributes["key.000"] = "é" * 5000  # cut at 200 characters, not bytes
    long_name = "n" * 300
    store_spans(
        server,
        [span(ROOT, None, long_name, 0, 1, attributes=attributes, status_message="m" * 201)],
    )
    got = tree(server)["tree"][0]["span"]
    assert got["name"] == "n" * 200
    assert got["status_message"] == "m" * 200
    assert got["attribute_count"] == 100
    # The first 32 in the order sent.
    assert list(got["attributes"]) == [f"key.{i:03d}" for i in range(32)]
    assert got["attributes"]["key.000"] == "é" * 200
    assert got["attributes"]["key.031"] == "value 31"
    assert got["truncated_fields"] == ["name", "status_message", "attributes"]


def test_span_events_and_links_are_counted(server: Running) -> None:
    events = json.dumps([{"name": "e", "time_unix_nano": 1, "attributes": {}}] * 3)
    links = json.dumps([{"trace_id": "a" * 32, "span_id": "b" * 16, "attributes": {}}])
    store_spans(server, [span(ROOT, None, "root", 0, 1, span_events=events, links=links)])
    got = tree(server)["tree"][0]["span"]
    assert got["span_event_count"] == 3 and got["link_count"] == 1


def test_limit_keeps_the_first_nodes_in_time_order(server: Running) -> None:
    spans, events = an_agent_trace()
    store_spans(server, spans)
    post_events(server, events)
    got = tree(server, limit=3)
    # ROOT (0 ms), AGENT (10), the LLM span's event (20.5): the first three, nested.
    assert shape(got["tree"]) == [("span", ROOT, [("span", AGENT, [("event", LLM, [])])])]
    assert got["truncated"] is True and got["span_count"] == 5
    assert tree(server, limit=5)["truncated"] is False
    assert tree(server, limit=4)["truncated"] is True


@pytest.mark.parametrize("value", ["0", "-1", "10001", "x", "", "1.5", "٣", "9" * 40])
def test_a_bad_limit_is_a_400_naming_it(server: Running, value: str) -> None:
    store_spans(server, [span(ROOT, None, "root", 0, 1)])
    r = server.client.get(
        f"/v1/analytics/runs/{TRACE}", params={"limit": value}, headers=server.headers()
    )
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "limit"


def test_fat_spans_stop_at_the_byte_budget(server: Running) -> None:
    # 32 attributes of 200-character keys and values: about 13 KB a summary, so some 600 of
    # 1,000 such spans fit in the 8 MB answer.
    attributes = {f"{i:02d}" + "k" * 198: "v" * 200 for i in range(32)}
    rows = [
        span(f"{i + 1:016x}", None, f"fat {i}", i, i + 1, attributes=attributes)
        for i in range(1000)
    ]
    for at in range(0, len(rows), 250):
        store_spans(server, rows[at : at + 250])
    r = server.client.get(f"/v1/analytics/runs/{TRACE}", headers=server.headers())
    assert r.status_code == 200
    assert len(r.content) <= TREE_MAX_BYTES
    got = r.json()
    ids = [n["id"] for n in got["tree"]]
    assert 100 < len(ids) < 1000
    assert ids == [f"{i + 1:016x}" for i in range(len(ids))]  # a prefix, in time order
    assert got["truncated"] is True and got["span_count"] == 1000


def test_an_sdk_trace_through_the_receiver_is_the_tree_it_sent(server: Running) -> None:
    """The whole way: OpenTelemetry's SDK and OTLPSpanExporter -> POST /v1/traces -> the run
    tree, compared with the parent links the SDK recorded."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tree")
    chat = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"}
    with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.request.method", "POST")
        with tracer.start_as_current_span("agent run"):
            with (
                tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat),
                tracer.start_as_current_span("execute_tool lookup", attributes=tool),
            ):
                pass
            with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=chat):
                pass
        with tracer.start_as_current_span("SELECT orders", kind=SpanKind.CLIENT) as db:
            db.set_status(Status(StatusCode.ERROR, "timeout"))
    sent = memory.get_finished_spans()
    exporter = OTLPSpanExporter(
        endpoint=f"{server.url}/v1/traces", headers={"Authorization": f"Bearer {server.key}"}
    )
    assert exporter.export(sent) is SpanExportResult.SUCCESS
    exporter.shutdown()
    server.flush()

    def hexid(span_id: int) -> str:
        return f"{span_id:016x}"

    # Events: the GenAI spans, and a span whose status is error (an `error` event).
    as_event = {
        hexid(s.context.span_id)
        for s in sent
        if "gen_ai.operation.name" in s.attributes or s.status.status_code is StatusCode.ERROR
    }
    children: dict[str | None, list[Any]] = {}
    for s in sorted(sent, key=lambda s: (s.start_time, hexid(s.context.span_id))):
        parent = hexid(s.parent.span_id) if s.parent else None
        children.setdefault(parent, []).append(s)

    def expected(parent: str | None) -> list[Any]:
        out = []
        for s in children.get(parent, []):
            sid = hexid(s.context.span_id)
            out.append(("event" if sid in as_event else "span", sid, expected(sid)))
        return out

    trace_id = f"{root.get_span_context().trace_id:032x}"
    got = tree(server, trace_id)
    assert shape(got["tree"]) == expected(None)
    assert got["span_count"] == len(sent) == 6 and got["truncated"] is False
    assert got["run"]["event_count"] == 4 and got["run"]["error_count"] == 1
    top = got["tree"][0]
    assert top["span"]["name"] == "POST /checkout" and top["span"]["kind"] == "server"
    assert top["span"]["service_name"] == "shop"
    assert top["span"]["attributes"] == {"http.request.method": "POST"}
    db_node = top["children"][-1]
    assert db_node["event"]["event_type"] == "error" and db_node["span"]["status_code"] == "error"
    assert db_node["span"]["status_message"] == "timeout"
    first_call = top["children"][0]["children"][0]
    assert first_call["event"]["model"] == "gpt-4o"
    assert first_call["children"][0]["event"]["tool_name"] == "lookup"
    by_id = {hexid(s.context.span_id): s for s in sent}
    for node in (top, db_node, first_call):
        span = by_id[node["id"]]
        assert node["span"]["duration_ms"] == pytest.approx(
            (span.end_time - span.start_time) / 1e6, abs=0.002
        )


def test_a_chain_of_spans_deeper_than_the_cap_hangs_at_depth_100(server: Running) -> None:
    ids = [f"{i + 1:016x}" for i in range(150)]
    chain = [
        span(sid, ids[i - 1] if i else None, f"level {i}", i, 1000 - i) for i, sid in enumerate(ids)
    ]
    store_spans(server, chain)
    got = tree(server)
    assert got["span_count"] == 150 and got["truncated"] is False
    node, depth = got["tree"][0], 0
    while node["children"] and depth < 99:
        assert len(node["children"]) == 1
        node, depth = node["children"][0], depth + 1
    # Depth 99 holds the node at depth 99 and, under it, every deeper one, in time order,
    # each still naming its own parent.
    assert node["id"] == ids[99]
    deeper = [c["id"] for c in node["children"]]
    assert deeper == ids[100:]
    assert [c["parent_id"] for c in node["children"]] == ids[99:149]
