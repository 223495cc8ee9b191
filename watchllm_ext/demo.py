"""`watchllm demo`: load a realistic sample into a running server over HTTP, so that a new user
sees the analytics API full of data in one command.

The sample: agent runs over the last few days (7 by default, a third of them in the last
24 hours, the analytics' default window), each with agent steps, prompt calls on several
models and providers, the tools those calls asked for (as `tool_call` events under the call
that asked), some failed and timed-out calls with their `error` events, slow calls, and the
alerts a monitor would raise (assertions, hallucinations, latency, cost). Every event is
validated against the v1 contract before it is sent.

Deterministic: the same seed and the same minute give the same events (ids included), so a
retried demo is stored once; another minute gives new ids, timed relative to the new now.
Needs only the base install (pydantic and httpx).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from .remote import answer_message, unreachable
from .schema import EVENT_LIST_ADAPTER

DEFAULT_URL = "http://127.0.0.1:8787"
BATCH_EVENTS = 500  # well under max_batch_events (10,000) and max_body_bytes
SLOW_MS = 8_000.0  # a call slower than this counts as "slow" in the summary

# (model, provider, typical latency ms, weight): names the genai-prices tables know, so the
# server computes each call's cost.
MODELS: list[tuple[str, str, float, int]] = [
    ("gpt-4o", "openai", 1400.0, 30),
    ("gpt-4o-mini", "openai", 700.0, 30),
    ("claude-3-5-sonnet-latest", "anthropic", 1800.0, 20),
    ("claude-3-5-haiku-latest", "anthropic", 900.0, 10),
    ("gemini-1.5-flash", "google", 600.0, 10),
    ("mistral-large-latest", "mistral", 1200.0, 8),
]

# Agents, the question users ask them, and the tools they call (name, input, output).
AGENTS: dict[str, dict[str, Any]] = {
    "support-agent": {
        "questions": [
            "Where is my order #{n}?",
            "How do I reset my password?",
            "Can I get a refund for order #{n}?",
        ],
        "tools": [
            ("lookup_order", {"order_id": "{n}"}, {"status": "shipped", "eta_days": 2}),
            ("search_kb", {"query": "password reset"}, {"articles": ["kb-12", "kb-40"]}),
            ("create_ticket", {"priority": "normal"}, {"ticket_id": "T-{n}"}),
        ],
    },
    "research-agent": {
        "questions": [
            "Summarise the latest papers on retrieval-augmented generation",
            "Compare the pricing of three vector databases",
            "What changed in Python 3.13?",
        ],
        "tools": [
            ("web_search", {"q": "retrieval augmented generation 2026"}, {"hits": 10}),
            ("fetch_url", {"url": "https://example.com/post/{n}"}, {"bytes": 48213}),
            ("summarise", {"max_words": 200}, {"words": 187}),
        ],
    },
    "sql-agent": {
        "questions": [
            "Revenue by region last quarter",
            "Which customers churned in October?",
            "Top 10 products by margin",
        ],
        "tools": [
            ("list_tables", {}, {"tables": ["orders", "customers", "products"]}),
            (
                "run_sql",
                {"sql": "SELECT region, sum(amount) FROM orders GROUP BY region"},
                {"rows": 6},
            ),
            ("plot", {"kind": "bar"}, {"png_bytes": 20480}),
        ],
    },
}

ERROR_KINDS = [
    ("RateLimitError", "429 Too Many Requests: rate limit reached for requests"),
    ("APITimeoutError", "Request timed out after 30 s"),
    ("ContextWindowExceeded", "This model's maximum context length is 128000 tokens"),
]


class DemoError(Exception):
    """A failure to report as one line."""


@dataclass
class Sample:
    events: list[dict[str, Any]]
    runs: int
    since: datetime
    tool_run: str  # a run whose tree has tool calls, to point the user at
    days: float
    by_type: Counter[str] = field(default_factory=Counter)


def _ts(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build(
    n_events: int = 1000, *, seed: int = 0, days: float = 7.0, now: datetime | None = None
) -> Sample:
    """`n_events` valid v1 events (exactly), runs spread over the last `days` days."""
    if n_events < 1:
        raise DemoError("--events must be at least 1")
    if not 0 < days <= 365:
        raise DemoError("--days must be above 0 and at most 365")
    # Whole minutes: the same seed in the same minute is the same sample (a retry dedupes).
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    rng = random.Random(seed)
    token = hashlib.sha256(f"{seed}:{now.isoformat()}".encode()).hexdigest()[:8]
    span_s = days * 86400.0
    events: list[dict[str, Any]] = []
    runs = 0
    tool_run = ""
    while len(events) < n_events:
        runs += 1
        run_id = f"demo-{token}-run{runs:05d}"
        if _one_run(rng, run_id, token, now, span_s, events) and not tool_run:
            tool_run = run_id
    events = events[:n_events]  # parents come before their children: no orphan is made
    EVENT_LIST_ADAPTER.validate_python(events)  # a sample the server would refuse is a bug
    return Sample(
        events=events,
        runs=len({e["run_id"] for e in events}),
        since=now - timedelta(days=days),
        tool_run=tool_run or events[0]["run_id"],
        days=days,
        by_type=Counter(e["event_type"] for e in events),
    )


def _one_run(
    rng: random.Random,
    run_id: str,
    token: str,
    now: datetime,
    span_s: float,
    events: list[dict[str, Any]],
) -> bool:
    """Append one agent run's events; True when it has tool calls."""
    models = list(MODELS)
    weights = [m[3] for m in MODELS]
    has_tools = False
    # A third of the runs in the last 24 hours, the analytics' default window.
    back = (
        rng.uniform(120, min(span_s, 86400.0)) if rng.random() < 0.34 else rng.uniform(120, span_s)
    )
    clock = now - timedelta(seconds=back)
    agent = rng.choice(list(AGENTS))
    spec = AGENTS[agent]
    base = {
        "run_id": run_id,
        "user_id": f"user-{rng.randint(1, 25):02d}",
        "session_id": f"sess-{token}-{rng.randint(1, 60):03d}",
        "tags": ["demo", agent],
        "release": rng.choice(["v1.4.0", "v1.4.1", "v1.5.0"]),
        "env": "production" if rng.random() < 0.85 else "staging",
    }
    counter = 0

    def event(kind: str, at: datetime, **fields: Any) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        e = {
            "event_id": f"{run_id}-{counter:03d}",
            "event_type": kind,
            "timestamp": _ts(min(at, now)),
            **base,
            **fields,
        }
        events.append(e)
        return e

    n = rng.randint(1000, 9999)
    question = rng.choice(spec["questions"]).format(n=n)
    model, provider, typical_ms, _ = rng.choices(models, weights)[0]
    steps = rng.randint(1, 3)
    failed = False
    for step in range(1, steps + 1):
        last = step == steps
        plan = event(
            "agent_step",
            clock,
            step_number=step,
            step_name="answer" if last else rng.choice(["plan", "act", "reflect"]),
            reasoning=f"{agent} step {step} for: {question}",
            action="reply" if last else "call tools",
            observation="ready" if last else "need data",
            latency_ms=round(rng.uniform(5, 60), 1),
        )
        clock += timedelta(milliseconds=rng.uniform(20, 200))
        tools = [] if last else rng.sample(spec["tools"], rng.randint(1, 2))
        slow = rng.random() < 0.06
        latency = (
            rng.uniform(SLOW_MS, 30_000.0) if slow else rng.lognormvariate(0, 0.4) * typical_ms
        )
        roll = rng.random()
        status = "error" if roll < 0.05 else "timeout" if roll < 0.07 else "success"
        tokens_in = rng.randint(200, 4000) + 300 * step
        call: dict[str, Any] = {
            "parent_event_id": plan["event_id"],
            "model": model,
            "provider": provider,
            "prompt": [
                {"role": "system", "content": f"You are {agent}."},
                {"role": "user", "content": question},
            ],
            "tokens_input": tokens_in,
            "tokens_output": rng.randint(20, 800) if status == "success" else 0,
            "latency_ms": round(min(latency, 30_000.0), 1),
            "status": status,
            "response_metadata": {"finish_reason": "tool_calls" if tools else "stop"},
        }
        if status == "success":
            call["response"] = (
                f"Calling {', '.join(t[0] for t in tools)}." if tools else f"Answer: {question}"
            )
            call["tool_calls"] = [
                {
                    "id": f"call_{i}",
                    "tool_name": name,
                    "tool_input": _fill(args, n),
                }
                for i, (name, args, _) in enumerate(tools)
            ]
        else:
            kind, message = ERROR_KINDS[0 if status == "error" else 1]
            call["error_message"] = message
        prompt = event("prompt_call", clock, **call)
        clock += timedelta(milliseconds=call["latency_ms"])
        if slow:
            event(
                "performance_alert",
                clock,
                parent_event_id=prompt["event_id"],
                metric="latency_ms",
                threshold=SLOW_MS,
                actual=call["latency_ms"],
                window="1m",
            )
        if status != "success":
            event(
                "error",
                clock,
                parent_event_id=prompt["event_id"],
                error_type=kind,
                error_message=message,
                stack_trace=f"Traceback (most recent call last):\n  ...\n{kind}: {message}",
            )
            failed = True
            break
        for i, (name, args, output) in enumerate(tools):
            tool_ok = rng.random() > 0.05
            tool_ms = round(rng.uniform(30, 1500), 1)
            event(
                "tool_call",
                clock,
                parent_event_id=prompt["event_id"],
                tool_name=name,
                tool_input=_fill(args, n),
                tool_output=_fill(output, n) if tool_ok else None,
                status="success" if tool_ok else "error",
                error_message=None if tool_ok else f"{name} failed: connection reset",
                latency_ms=tool_ms,
                metadata={"call_id": f"call_{i}"},
            )
            clock += timedelta(milliseconds=tool_ms)
            has_tools = True
        if last:
            if rng.random() < 0.05:
                event(
                    "hallucination_detected",
                    clock,
                    parent_event_id=prompt["event_id"],
                    detection_method=rng.choice(["nli", "self-check", "citation-check"]),
                    confidence=round(rng.uniform(0.6, 0.98), 2),
                    claim=f"{question} was answered from a source that does not say so",
                    evidence="the retrieved documents do not mention it",
                    severity=rng.choice(["medium", "high"]),
                )
            if rng.random() < 0.04:
                event(
                    "assertion_failed",
                    clock,
                    parent_event_id=prompt["event_id"],
                    assertion_name="answer_mentions_source",
                    expected="a citation",
                    actual="none",
                    severity="low",
                )
    if not failed and rng.random() < 0.01:
        event(
            "cost_threshold_exceeded",
            clock,
            threshold_usd=25.0,
            actual_usd=round(rng.uniform(25.5, 40.0), 2),
            window="1d",
        )
    return has_tools


def _fill(value: Any, n: int) -> Any:
    """The tool's sample input or output, with this run's number in its strings."""
    if isinstance(value, str):
        return value.format(n=n)
    if isinstance(value, dict):
        return {k: _fill(v, n) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, n) for v in value]
    return value


def send(
    url: str, key: str, sample: Sample, *, wait_s: float = 30.0, say: Callable[[str], None] = print
) -> str:
    """Send the sample in batches and wait (up to wait_s) until the analytics API counts it.
    Returns the key's project."""
    base = url.rstrip("/")
    project = ""
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        for start in range(0, len(sample.events), BATCH_EVENTS):
            batch = sample.events[start : start + BATCH_EVENTS]
            try:
                r = client.post("/v1/events/batch", json={"events": batch})
            except httpx.HTTPError as exc:
                raise DemoError(unreachable(base, exc)) from None
            if r.status_code != 202:
                raise DemoError(f"{base} answered {r.status_code}: {answer_message(r)}")
            project = r.json()["project_id"]
        say(
            f"Loaded {counted(len(sample.events), 'demo event')}"
            f" ({counted(sample.runs, 'run')} over the last {counted(sample.days, 'day')})"
            f" into project {project} at {base}"
        )
        _wait_visible(client, project, sample, wait_s, say)
    return project


def _wait_visible(
    client: httpx.Client, project: str, sample: Sample, wait_s: float, say: Callable[[str], None]
) -> None:
    # The writer moves accepted events to the store every flush_interval_s (1 s by default),
    # in the order they were accepted: once the last one sent is there, all of them are, and
    # the URLs printed next show the data at once. (A count would not tell: the project may
    # hold other events, and a sample sent again is stored once.)
    last = sample.events[-1]["event_id"]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = client.get(f"/v1/analytics/event/{last}", params={"project_id": project})
            if r.status_code == 200:
                stats = client.get(
                    "/v1/analytics/stats", params={"project_id": project, "from": _ts(sample.since)}
                )
        except httpx.HTTPError as exc:
            raise DemoError(unreachable(str(client.base_url), exc)) from None
        if r.status_code in (401, 403):
            say("(this key cannot read the analytics API: use a read or admin key to look)")
            return
        if r.status_code == 200:
            total = stats.json().get("total_events") if stats.status_code == 200 else None
            also = (
                f" (project {project} holds {counted(total, 'event')} since the sample's first)"
                if isinstance(total, int)
                else ""
            )
            say(f"All {counted(len(sample.events), 'demo event')} are in the store now{also}.")
            return
        if time.monotonic() > deadline:
            say(
                f"Not all visible after {wait_s:.0f} s (the writer flushes every"
                " flush_interval_s); the analytics API shows them once it has."
            )
            return
        time.sleep(0.2)


def summary(sample: Sample) -> list[str]:
    """What was loaded, in a few lines."""
    calls = [e for e in sample.events if e["event_type"] == "prompt_call"]
    models = sorted({e["model"] for e in calls})
    providers = sorted({e["provider"] for e in calls})
    failed = sum(1 for e in calls if e["status"] != "success")
    slow = sum(1 for e in calls if e["latency_ms"] >= SLOW_MS)
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(sample.by_type.items()))
    return [
        f"  by type: {by_type}",
        f"  {counted(len(models), 'model')} from {counted(len(providers), 'provider')}"
        + (f": {', '.join(models)}" if models else ""),
        f"  {counted(failed, 'failed or timed-out call')}, {counted(slow, 'slow call')}"
        f" (over {SLOW_MS / 1000:.0f} s)",
    ]


def counted(n: float, word: str) -> str:
    """`1 model`, `2 models`, `0 models`; `1 day`, `0.5 days`."""
    number = f"{n:g}" if isinstance(n, float) else str(n)
    return f"{number} {word}" if n == 1 else f"{number} {word}s"


def look_at(url: str, project: str, sample: Sample) -> list[str]:
    """curl lines for the analytics routes that show the sample ($KEY: the user's key)."""
    base = url.rstrip("/")
    since = _ts(sample.since)
    q = f"project_id={project}"
    return [
        "Look at it (KEY: your read or admin key):",
        f'  curl -H "Authorization: Bearer $KEY" "{base}/v1/analytics/stats?{q}&from={since}"',
        f'  curl -H "Authorization: Bearer $KEY" "{base}/v1/analytics/timeseries?{q}'
        f'&from={since}&interval=1d&group_by=model"',
        f'  curl -H "Authorization: Bearer $KEY" "{base}/v1/analytics/logs?{q}'
        f'&from={since}&status=error&limit=5"',
        f'  curl -H "Authorization: Bearer $KEY" "{base}/v1/analytics/runs?{q}&from={since}"',
        f'  curl -H "Authorization: Bearer $KEY" "{base}/v1/analytics/runs/{sample.tool_run}'
        f'?{q}"   # a run tree with tool calls',
    ]
