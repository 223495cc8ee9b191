"""Analytics benchmarks for WatchLLM at ten million events, with direct-SQL baselines
measured in the same run.

    python bench/bench_analytics.py                    # 10,000,000 events, 2 rounds x 10 calls
    python bench/bench_analytics.py --events 1000000   # another size (its own data folder)
    python bench/bench_analytics.py --quick            # smoke run: 1,000,000 events unless
                                                       # --events is given, 1 round x 5 calls
    python bench/bench_analytics.py --profile          # then time the parts of the queries
                                                       # and read-only what-if rewrites; EXPLAIN

1. Data. A data folder (default: <tmp>/watchllm-bench-analytics-<N>) holds N synthetic events
   of project "bench" spread over the 30 days before a fixed end time, plus N/10 events of
   project "other" over the same days. They are generated inside ClickHouse (INSERT ... SELECT
   FROM numbers(N) through ChdbStore.execute, after apply_migrations): runs of 20 events (an
   agent_step root, prompt_calls, 3 tool_calls, now and then an error), six models, ~5% of
   calls not successful, 1,000 users, token counts, costs, latencies, ~200-character prompts
   and responses; tool_calls and agent_steps get the rows the ingest path would write. Then
   refresh_rollups(store, margin=0) runs until it returns 0, so every whole hour is served from
   hourly_usage_by_project, and the generator waits for background merges to settle. A folder
   that already holds the N events, built by this generator under the current migrations, is
   reused (generation takes ~2 minutes at 10M on 2 cores); --regenerate rebuilds it.
   Routes measured: stats and timeseries over 30 days (6h buckets, and by model), timeseries
   over 24 hours (15m buckets: the raw path), logs page 1 and page 10 (via next_cursor) of the
   last 24 hours and page 1 of 30 days, one event's detail, the runs list, one run's tree.
2. HTTP. A real server process (uvicorn, one worker, on 127.0.0.1, serving
   create_app(Settings(data_dir=<folder>, create_default_key=False)) with the process tuning
   of `watchllm serve`) answers each analytics route; the orchestrator calls it with httpx over
   one keep-alive connection: warm-up calls, then timed calls; median and p95.
3. Baseline. With the server stopped (a chDB folder opens in one process only), a helper
   process opens ChdbStore on the same folder and runs the named queries of
   watchllm_ext/analytics/queries.py in the order the route runs them, with the parameter
   dicts the route builds (CLEAN_HOURS included for stats and timeseries). HTTP / direct is
   what the route adds: HTTP, auth, parameter parsing, the worker-thread hop, shaping, JSON.
   Rounds alternate server, helper, server, helper; samples of all rounds are pooled.
4. Memory: the server's VmRSS and VmHWM (peak) from /proc after each round, and the helper's.
5. Targets (medians through HTTP): stats and timeseries over 30 days <= 150 ms; a logs page
   and one event's detail <= 50 ms; one run's tree <= 100 ms.

The machine is shared and small, so each route is printed beside its own baseline from the
same run. Only 127.0.0.1 is contacted; every process started here is stopped before the end.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from processes import free_port, spawn, stop, stop_all

HERE = Path(__file__).resolve()
PROJECT = "bench"
OTHER_PROJECT = "other"
RUN_LENGTH = 20
DAYS = 30
GENERATOR = 1  # bump when the generated data changes, so old folders are rebuilt
MARKER = "bench-analytics.json"
LATER_PAGE = 10  # "a later page": the logs page reached by following next_cursor 9 times
POOL = 100  # distinct events and runs for the detail and tree calls (more if more calls)

TARGETS_MS = {  # route label -> target for its median through HTTP
    "stats 30d": 150.0,
    "timeseries 30d (6h)": 150.0,
    "timeseries 30d (6h) by model": 150.0,
    "logs page 1": 50.0,
    f"logs page {LATER_PAGE}": 50.0,
    "event detail": 50.0,
    "run tree": 100.0,
}

# --- the data ---------------------------------------------------------------------------------

WORDS = [  # 64 words: a word is 6 bits of a hash
    "summarise", "the", "customer", "ticket", "below", "and", "suggest", "a", "reply", "that",
    "is", "polite", "short", "accurate", "include", "order", "number", "refund", "policy",
    "shipping", "delay", "apology", "next", "steps", "escalate", "if", "mentions", "legal",
    "action", "chargeback", "keep", "answer", "under", "one", "hundred", "words", "thanks", "for",
    "reaching", "out", "we", "are", "sorry", "your", "arrived", "late", "have", "issued",
    "partial", "to", "card", "upgraded", "on", "no", "cost", "here", "anything", "else", "wrong",
    "will", "make", "it", "right", "today",
]
assert len(WORDS) == 64, len(WORDS)

MODELS = [  # name, provider, share of calls in %, USD per million input / output tokens
    ("gpt-4o", "openai", 35, 2.5, 10.0),
    ("gpt-4o-mini", "openai", 30, 0.15, 0.6),
    ("claude-3-5-sonnet", "anthropic", 15, 3.0, 15.0),
    ("claude-3-5-haiku", "anthropic", 10, 0.8, 4.0),
    ("gemini-1.5-pro", "google", 6, 1.25, 5.0),
    ("llama-3.1-70b", "together", 4, 0.88, 0.88),
]


def _sql_list(items: list[Any]) -> str:
    return "[" + ", ".join(f"'{x}'" if isinstance(x, str) else repr(x) for x in items) + "]"


def _text_sql(salt: int, words: int = 40, chars: int = 200) -> str:
    """~`chars` characters of words drawn from WORDS (6 bits of one intHash64 each)."""
    return (
        "substring(arrayStringConcat(arrayMap(j -> W[1 + bitAnd(bitShiftRight(intHash64(h + "
        f"{salt} + intDiv(j, 10)), (j % 10) * 6), 63)], range({words})), ' '), 1, {chars})"
    )


def _model_index_sql() -> str:
    cuts, total = [], 0
    for i, (_, _, share, _, _) in enumerate(MODELS[:-1]):
        total += share
        cuts.append(f"mh < {total}, {i + 1}")
    return f"multiIf({', '.join(cuts)}, {len(MODELS)})"


# One project's events: {n} events, run after run of RUN_LENGTH, evenly over [start, start +
# span_ms); ids are UUID-shaped and a function of (project, number), so a folder is rebuilt
# identically. Position k in a run: 0 agent_step (the root), 4/9/14 tool_call (child of the
# call before it), 19 an error in one run of 4, else prompt_call (child of the root).
EVENTS_INSERT = f"""
INSERT INTO events (project_id, event_id, event_type, run_id, timestamp, parent_event_id,
    user_id, session_id, tags, release, env, client_hostname, client_sdk_version,
    client_platform, metadata, prompt, model, provider, tokens_input, tokens_output,
    cost_estimate_usd, cost_source, response, response_metadata, tool_call_count, status,
    latency_ms, error_message, tool_name, tool_input, tool_output, step_number, step_name,
    reasoning, action, observation, error_type, stack_trace, ingested_at)
WITH
    {_sql_list(WORDS)} AS W,
    {_sql_list([m[0] for m in MODELS])} AS MODEL_NAMES,
    {_sql_list([m[1] for m in MODELS])} AS PROVIDERS,
    {_sql_list([m[3] for m in MODELS])} AS PRICE_IN,
    {_sql_list([m[4] for m in MODELS])} AS PRICE_OUT,
    {{project:String}} AS p,
    intDiv(number, {RUN_LENGTH}) AS r,
    number % {RUN_LENGTH} AS k,
    sipHash64(p, number) AS h,
    sipHash64(p, 'run', r) AS rh,
    intDiv({{n:UInt64}} + {RUN_LENGTH - 1}, {RUN_LENGTH}) AS n_runs,
    multiIf(k = 0, 'agent_step', k IN (4, 9, 14), 'tool_call',
            k = {RUN_LENGTH - 1} AND rh % 4 = 0, 'error', 'prompt_call') AS et,
    et = 'prompt_call' AS is_call,
    intHash64(h + 1) % 100 AS mh,
    {_model_index_sql()} AS mi,
    100 + intHash64(h + 2) % 3900 AS tin,
    10 + intHash64(h + 3) % 1200 AS tout,
    intHash64(h + 4) % 1000 AS sh,
    multiIf(sh < 30, 'error', sh < 45, 'timeout', sh < 50, 'warning', 'success') AS st,
    (intHash64(h + 5) % 10000) / 10000.0 AS u,
    toString(reinterpretAsUUID(sipHash128(p, number))) AS eid,
    toString(reinterpretAsUUID(sipHash128(p, number - k))) AS root_id,
    toString(reinterpretAsUUID(sipHash128(p, number - 1))) AS prev_id,
    {{start:DateTime64(3, 'UTC')}}
        + toIntervalMillisecond(intDiv(r * ({{span_ms:UInt64}} - 60000), n_runs)
                                + k * 2000 + h % 1500) AS ts
SELECT
    p,
    eid,
    et,
    toString(reinterpretAsUUID(sipHash128(p, 'run', r))),
    ts,
    multiIf(k = 0, NULL, et = 'tool_call', prev_id, root_id),
    concat('user-', toString(rh % 1000)),
    concat('sess-', toString(rh % 1000), '-', toString(intDiv(r, 50))),
    ['chat', ['tier-1', 'tier-2', 'vip'][1 + rh % 3]],
    '2026.11.1',
    'production',
    concat('web-', toString(rh % 8)),
    '0.1.0',
    'python-3.12',
    concat('{{"route":"/api/support/reply","customer_id":"cus_', toString(rh % 100000000),
           '","ab_bucket":"', if(rh % 2 = 0, 'a', 'b'), '"}}'),
    if(is_call, {_text_sql(10)}, NULL),
    if(is_call, MODEL_NAMES[mi], NULL),
    if(is_call, PROVIDERS[mi], NULL),
    if(is_call, tin, NULL),
    if(is_call, tout, NULL),
    if(is_call, round((tin * PRICE_IN[mi] + tout * PRICE_OUT[mi]) / 1e6, 8), NULL),
    if(is_call, 'genai-prices', NULL),
    if(is_call, {_text_sql(20)}, NULL),
    if(is_call, '{{"finish_reason":"stop","system_fingerprint":"fp_9f2a1c"}}', NULL),
    0,
    if(et = 'error', NULL, st),
    multiIf(is_call, round(150 + 7850 * u * u * u, 1), et = 'tool_call', round(5 + 495 * u * u, 1),
            et = 'agent_step', round(1000 + 20000 * u, 1), NULL),
    multiIf(et = 'error', 'RateLimitError: 429 Too Many Requests',
            et != 'error' AND st IN ('error', 'timeout'),
            concat('upstream ', st, ' after ', toString(intHash64(h + 6) % 30), ' s'), NULL),
    if(et = 'tool_call', ['search', 'sql_query', 'http_get', 'calculator'][1 + h % 4], NULL),
    if(et = 'tool_call', concat('{{"query":"', {_text_sql(30, 6, 60)}, '"}}'), NULL),
    if(et = 'tool_call', concat('{{"results":', toString(h % 20), '}}'), NULL),
    if(et = 'agent_step', 1, NULL),
    if(et = 'agent_step', 'plan', NULL),
    if(et = 'agent_step', {_text_sql(40, 12, 120)}, NULL),
    if(et = 'agent_step', 'call_tools', NULL),
    if(et = 'agent_step', 'ok', NULL),
    if(et = 'error', 'RateLimitError', NULL),
    if(et = 'error', 'Traceback (most recent call last):\\n  File "app.py", line 42', NULL),
    ts + toIntervalMillisecond(200 + intHash64(h + 7) % 800)
FROM numbers({{n:UInt64}})
"""

TOOL_CALLS_INSERT = """
INSERT INTO tool_calls (project_id, event_id, call_index, source, run_id, timestamp,
    tool_call_id, tool_name, tool_input, tool_output, status, latency_ms, error_message,
    ingested_at)
SELECT project_id, event_id, 0, 'tool_call', run_id, timestamp, NULL, assumeNotNull(tool_name),
       tool_input, tool_output, status, latency_ms, error_message, ingested_at
FROM events WHERE event_type = 'tool_call'
"""

AGENT_STEPS_INSERT = """
INSERT INTO agent_steps (project_id, event_id, run_id, timestamp, step_number, step_name,
    reasoning, action, observation, status, latency_ms, ingested_at)
SELECT project_id, event_id, run_id, timestamp, assumeNotNull(step_number), step_name,
       reasoning, action, observation, status, latency_ms, ingested_at
FROM events WHERE event_type = 'agent_step'
"""


def _counts(store: Any) -> dict[str, int]:
    rows = store.query("SELECT project_id, count() AS n FROM events GROUP BY project_id")
    return {r["project_id"]: int(r["n"]) for r in rows}


def _wait_for_merges(store: Any, timeout_s: float) -> float:
    """Wait until no merge has been running for 3 s (bounded); returns the seconds waited."""
    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < timeout_s:
        busy = int(store.query("SELECT count() AS n FROM system.merges")[0]["n"])
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 3:
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def _parts(store: Any) -> dict[str, Any]:
    rows = store.query(
        "SELECT table, count() AS parts, sum(rows) AS rows, sum(bytes_on_disk) AS bytes,"
        " uniqExact(partition) AS partitions"
        " FROM system.parts WHERE active AND database = currentDatabase()"
        " AND table IN ('events', 'tool_calls', 'agent_steps', 'hourly_usage_by_project')"
        " GROUP BY table ORDER BY table"
    )
    return {
        r["table"]: {k: int(r[k]) for k in ("parts", "rows", "bytes", "partitions")} for r in rows
    }


def role_prepare(args: argparse.Namespace) -> None:
    """Build (or check and reuse) the data folder; print a JSON summary on the last line."""
    from watchllm_ext.analytics.rollup import refresh_rollups
    from watchllm_ext.settings import Settings
    from watchllm_ext.store import apply_migrations, load_migrations
    from watchllm_plugins.chdb_store import ChdbStore

    data_dir = Path(args.data_dir)
    n = args.events
    other = n // 10
    marker = data_dir / MARKER
    meta: dict[str, Any] | None = None
    migrations = {str(m.version): m.checksum for m in load_migrations()}
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("migrations") != migrations and not args.regenerate:
            print(f"{data_dir} was built with other migrations than the current ones: "
                  "rebuilding", flush=True)
        if (meta.get("generator") != GENERATOR or meta.get("events") != n
                or meta.get("migrations") != migrations or args.regenerate):
            meta = None
    settings = Settings(data_dir=data_dir, create_default_key=False)
    if meta is not None:
        store = ChdbStore(settings.store_path)
        try:
            apply_migrations(store)
            counts = _counts(store)
            if counts == {PROJECT: n, OTHER_PROJECT: other}:
                print(f"reusing {data_dir}: it holds {n:,} + {other:,} events "
                      f"(generated {meta['generated_at']})", flush=True)
                t0 = time.perf_counter()
                hours = _refresh_all(store, refresh_rollups)
                meta["reuse_refresh"] = {"hours": hours, "s": time.perf_counter() - t0}
                meta["merge_wait_s"] = _wait_for_merges(store, 300)
                meta["parts"] = _parts(store)
                meta["reused"] = True
                print(json.dumps(meta))
                return
            print(f"{data_dir} holds {counts}, not {n:,} + {other:,} events: rebuilding",
                  flush=True)
        finally:
            store.close()
    if data_dir.exists() and any(data_dir.iterdir()) and not marker.exists():
        raise SystemExit(f"{data_dir} is not empty and is not a data folder of this benchmark; "
                         "refusing to delete it (pass another --data-dir)")
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    # Data up to half past the last whole hour: [end - 30 days, end), both ends mid-hour.
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(minutes=30)
    start = end - timedelta(days=DAYS)
    store = ChdbStore(settings.store_path)
    try:
        apply_migrations(store)
        print(f"generating {n:,} events of project {PROJECT!r} and {other:,} of {OTHER_PROJECT!r} "
              f"over {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC in {data_dir} ...",
              flush=True)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        span_ms = DAYS * 86_400_000
        for project, count in ((PROJECT, n), (OTHER_PROJECT, other)):
            store.execute(EVENTS_INSERT, {"project": project, "n": count, "start": start,
                                          "span_ms": span_ms})
        timings["events_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.execute(TOOL_CALLS_INSERT)
        store.execute(AGENT_STEPS_INSERT)
        timings["tool_calls_agent_steps_s"] = time.perf_counter() - t1
        print(f"  inserted in {timings['events_s']:.1f} s (+ "
              f"{timings['tool_calls_agent_steps_s']:.1f} s for tool_calls and agent_steps); "
              "computing the hourly rollups ...", flush=True)
        t2 = time.perf_counter()
        hours = _refresh_all(store, refresh_rollups)
        timings["rollup_s"] = time.perf_counter() - t2
        print(f"  rollups: {hours} (project, hour) pairs in {timings['rollup_s']:.1f} s; "
              "waiting for background merges ...", flush=True)
        timings["merge_wait_s"] = _wait_for_merges(store, 900)
        counts = _counts(store)
        if counts != {PROJECT: n, OTHER_PROJECT: other}:
            raise SystemExit(f"generated {counts}, expected {n} + {other}")
        meta = {
            "generator": GENERATOR,
            "migrations": migrations,
            "events": n,
            "other_events": other,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "timings": timings,
            "rollup_hours": hours,
            "parts": _parts(store),
            "tool_calls": int(store.query("SELECT count() AS n FROM tool_calls")[0]["n"]),
            "agent_steps": int(store.query("SELECT count() AS n FROM agent_steps")[0]["n"]),
        }
    finally:
        store.close()
    marker.write_text(json.dumps(meta, indent=2))
    meta["reused"] = False
    print(json.dumps(meta))


def _refresh_all(store: Any, refresh_rollups: Any) -> int:
    total = 0
    for _ in range(50):  # bounded: 2 x 721 hours take 1 pass of at most 2,000
        done = refresh_rollups(store, margin=timedelta(0))
        total += done
        if not done:
            return total
    raise RuntimeError("refresh_rollups still finds dirty hours after 50 passes")


# --- processes --------------------------------------------------------------------------------

def run_role(role: str, extra: list[str], timeout_s: float, cwd: Path) -> dict[str, Any]:
    """Run this script in a child process with `--role`; its last stdout line is JSON."""
    proc = spawn([sys.executable, str(HERE), "--role", role, *extra], stdout=subprocess.PIPE,
                 cwd=cwd)
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("{"):
                lines.append(line)
            else:
                print(line, flush=True)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {role} helper took more than {timeout_s:.0f} s")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop(proc, grace_s=30)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {role} helper failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) / 1024
    return out


def role_serve(port: int, data_dir: Path) -> None:
    """What `watchllm serve` runs (its process tuning included), at log level warning."""
    import uvicorn

    from watchllm_ext.app import create_app
    from watchllm_ext.settings import Settings

    settings = Settings(data_dir=data_dir, create_default_key=False, log_level="warning",
                        host="127.0.0.1", port=port)
    app = create_app(settings)
    app.state.watchllm.open_store()
    try:
        from watchllm_ext.serving.tuning import tune_for_serving
    except ImportError:  # a core from before the tuning module: serve's GC settings then
        import gc

        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    else:
        tune_for_serving()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", workers=1)


# --- what is measured -------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def route_specs(end: datetime, picks: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured route: a label, the route kind (which tells the baseline which queries
    the route runs), the HTTP path and query string of its first call, and what changes from
    call to call (see `concrete`)."""
    last_30d = {"from": _iso(end - timedelta(days=DAYS)), "to": _iso(end)}
    last_24h = {"from": _iso(end - timedelta(hours=24)), "to": _iso(end)}
    base = {"project_id": PROJECT}
    specs = [
        ("stats 30d", "stats", "/v1/analytics/stats", {**base, **last_30d}),
        ("timeseries 30d (6h)", "timeseries", "/v1/analytics/timeseries",
         {**base, "period": "30d", "to": _iso(end)}),
        ("timeseries 30d (6h) by model", "timeseries", "/v1/analytics/timeseries",
         {**base, "period": "30d", "to": _iso(end), "group_by": "model"}),
        ("timeseries 24h (15m, raw)", "timeseries", "/v1/analytics/timeseries",
         {**base, "period": "24h", "to": _iso(end)}),
        ("logs page 1", "logs", "/v1/analytics/logs", {**base, **last_24h, "limit": "100"}),
        (f"logs page {LATER_PAGE}", "logs", "/v1/analytics/logs",
         {**base, **last_24h, "limit": "100", "cursor": picks["cursor"]}),
        ("logs page 1, 30-day range (diag)", "logs", "/v1/analytics/logs",
         {**base, **last_30d, "limit": "100"}),
        ("event detail", "event", "/v1/analytics/event/{id}", base),
        ("runs list (50)", "runs", "/v1/analytics/runs", {**base, **last_24h, "limit": "50"}),
        ("run tree", "run", "/v1/analytics/runs/{id}", base),
    ]
    return [{"label": label, "kind": kind, "path": path, "params": params}
            for label, kind, path, params in specs]


def concrete(spec: dict[str, Any], i: int, picks: dict[str, Any]) -> dict[str, Any]:
    """Call number `i` of a route, with its own parameters, as real traffic has them: another
    event or run each time, and time windows that end `i` seconds earlier (a dashboard's "now"
    moves). So no cache keyed on the query text or its conditions (ClickHouse's query
    condition cache remembers the granules a WHERE rejected) makes a repeated call look free.
    The baseline makes the same calls in the same order."""
    out = dict(spec)
    if spec["kind"] in ("event", "run"):
        pool = picks["events" if spec["kind"] == "event" else "runs"]
        out["path"] = spec["path"].replace("{id}", pool[i % len(pool)])
        return out
    params = dict(spec["params"])
    for name in ("from", "to"):
        if name in params:
            moved = datetime.fromisoformat(params[name].replace("Z", "+00:00"))
            params[name] = _iso(moved - timedelta(seconds=i))
    out["params"] = params
    return out


def pick_targets(client: Any, end: datetime, pool: int) -> dict[str, Any]:
    """Not timed: `pool` events and runs for the detail and tree calls, and the cursor of logs
    page LATER_PAGE. Events: every tenth of the first LATER_PAGE logs pages of the last 24
    hours (all event types, newest first); runs: the runs list of the last 24 hours."""
    window = {"project_id": PROJECT, "from": _iso(end - timedelta(hours=24)), "to": _iso(end),
              "limit": "100"}
    page = _get(client, "/v1/analytics/logs", window)
    seen = list(page["events"])
    cursor = later = page["next_cursor"]
    for n in range(2, LATER_PAGE + 1):
        if n == LATER_PAGE:
            later = cursor
        page = _get(client, "/v1/analytics/logs", {**window, "cursor": cursor})
        seen += page["events"]
        cursor = page["next_cursor"]
    step = max(1, len(seen) // pool)
    events = [e["event_id"] for e in seen[::step]][:pool]
    runs = _get(client, "/v1/analytics/runs", {**window, "limit": str(min(pool, 1000))})["runs"]
    return {"cursor": later, "events": events, "runs": [r["run_id"] for r in runs]}


def _get(client: Any, path: str, params: dict[str, str]) -> Any:
    r = client.get(path, params=params)
    if r.status_code != 200:
        raise RuntimeError(f"GET {path} answered {r.status_code}: {r.text[:500]}")
    return r.json()


def measure_http(data_dir: Path, work: Path, end: datetime, picks: dict[str, Any] | None,
                 warmups: int, calls: int, rnd: int, rounds: int) -> dict[str, Any]:
    import httpx

    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    settings = Settings(data_dir=data_dir, create_default_key=False)
    key = KeyStore(settings.keys_path).create(PROJECT, scope="admin", name="bench")
    port = free_port()
    log = work / f"server-{rnd}.log"
    proc = spawn([sys.executable, str(HERE), "--role", "serve", "--port", str(port),
                  "--data-dir", str(data_dir)], log=log, cwd=work)
    out: dict[str, Any] = {"routes": {}}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log}:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not become ready; see {log}")
                time.sleep(0.2)
            out["memory_start"] = memory(proc.pid)
            if picks is None:
                picks = pick_targets(client, end, pool=max(POOL, rounds * (warmups + calls)))
            out["picks"] = picks
            for spec in route_specs(end, picks):
                times = []
                for i in range(warmups + calls):
                    call = concrete(spec, (rnd - 1) * (warmups + calls) + i, picks)
                    t0 = time.perf_counter()
                    r = client.get(call["path"], params=call["params"])
                    elapsed = time.perf_counter() - t0
                    if r.status_code != 200:
                        raise RuntimeError(f"{spec['label']}: HTTP {r.status_code}: {r.text[:500]}")
                    if i == 0:
                        first, body = elapsed, r.json()
                    if i >= warmups:
                        times.append(elapsed)
                out["routes"][spec["label"]] = {"times": times, "first": first,
                                                "bytes": len(r.content), "check": _check(body)}
                print(f"  round {rnd} HTTP   {spec['label']:34s} median "
                      f"{statistics.median(times) * 1e3:8.1f} ms", flush=True)
            out["memory_end"] = memory(proc.pid)
    finally:
        stop(proc, grace_s=60.0)
    return out


def _check(body: dict[str, Any]) -> dict[str, Any]:
    """A few figures of an answer, to compare with the baseline's rows."""
    if "total_events" in body:
        return {"total_events": body["total_events"], "rollup_hours": body["rollup_hours"]}
    if "series" in body:
        points = [p for series in body["series"].values() for p in series]
        return {"events": sum(p["events"] for p in points), "rollup_hours": body["rollup_hours"]}
    if "events" in body and isinstance(body["events"], list):
        return {"rows": len(body["events"])}
    if "runs" in body:
        return {"rows": len(body["runs"])}
    if "tree" in body:
        return {"events": body["run"]["event_count"]}
    if "event" in body:
        return {"children": len(body["children"])}
    return {}


# --- the baseline: the same queries on chDB, no server ------------------------------------------


def _hours(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """As routes._hours: the whole UTC hours inside [start, end)."""
    first = start.replace(minute=0, second=0, microsecond=0)
    if first < start:
        first += timedelta(hours=1)
    return first, end.replace(minute=0, second=0, microsecond=0)


def route_queries(store: Any, spec: dict[str, Any], timed: Any) -> Any:
    """Run the queries the route of `spec` runs, in its order and with the parameter dicts
    it builds (parsed with the same functions of analytics/params.py). `timed(name, sql,
    args)` runs and times one query. Returns the rows of the main query, for the check."""
    from starlette.datastructures import QueryParams

    from watchllm_ext.analytics import params as P
    from watchllm_ext.analytics import queries as Q
    from watchllm_ext.analytics.routes import _hour_aligned as hour_aligned

    qp = QueryParams(spec["params"])
    project = PROJECT
    kind = spec["kind"]

    def rollup_window(span: Any, use_rollup: bool = True) -> tuple[datetime, datetime]:
        first, end = _hours(span.start, span.end)
        return (first, end) if use_rollup and first < end else (first, first)

    def count_clean(window: tuple[datetime, datetime]) -> int:
        if window[0] >= window[1]:
            return 0
        rows = timed("CLEAN_HOURS", Q.CLEAN_HOURS,
                     {"project": project, "first_hour": window[0], "end_hour": window[1]})
        return int(rows[0]["n"])

    def base_args(span: Any, window: tuple[datetime, datetime]) -> dict[str, Any]:
        return {"project": project, "from": span.start, "to": span.end,
                "first_hour": window[0], "end_hour": window[1]}

    if kind == "stats":
        span = P.time_range(qp)
        window = rollup_window(span)
        args = base_args(span, window)
        clean = count_clean(window)
        sums = timed("STATS_SUMS", Q.STATS_SUMS, args)
        timed("STATS_STATES", Q.STATS_STATES, args)
        return {"total_events": sum(int(r["events"]) for r in sums), "rollup_hours": clean}
    if kind == "timeseries":
        span = P.time_range(qp)
        tz = qp.get("tz", "UTC")  # the specs name zones every store knows
        interval = P.interval(qp, span)
        group = P.choice(qp, "group_by", tuple(Q.GROUP_COLUMNS))
        unit, step, _ = P.INTERVALS[interval]
        use_rollup = unit != "Minute" and hour_aligned(tz, span)
        window = rollup_window(span, use_rollup)
        clean = count_clean(window)
        args = {**base_args(span, window), "step": step, "tz": tz}
        if group:  # as the route: the top groups first, then their series and "other"
            ranked = timed(f"TIMESERIES_TOP[{group}]", Q.TIMESERIES_TOP[(group, "events")],
                           {**args, "groups": P.DEFAULT_GROUPS})
            rows = timed(f"TIMESERIES_GROUPED[{unit},{group}]", Q.TIMESERIES_GROUPED[(unit, group)],
                         {**args, "top": [r["grp"] for r in ranked]})
        else:
            rows = timed(f"TIMESERIES[{unit}]", Q.TIMESERIES[(unit, None)], args)
        return {"events": sum(int(r["all_events"]) for r in rows), "rollup_hours": clean}
    if kind in ("logs", "runs"):
        span = P.time_range(qp)
        page = P.limit(qp) if kind == "logs" else P.limit(qp, default=50, maximum=1000)
        after = P.cursor(qp)
        args = {
            "project": project,
            "from": span.start,
            "to": span.end,
            "limit": page,
            "has_cursor": 1 if after else 0,
            "cursor_ts": after[0] if after else span.end,
            "cursor_id": after[1] if after else "",
        }
        if kind == "runs":
            return {"rows": len(timed("RUNS", Q.RUNS, args))}
        args |= {
            "status": "", "event_type": "", "model": "", "run_id": "", "user_id": "", "tag": "",
            "q": "",
        }
        return {"rows": len(timed("LOGS", Q.LOGS, args))}
    if kind == "event":
        args = {"project": project, "event_id": spec["path"].rsplit("/", 1)[1]}
        timed("EVENT", Q.EVENT, args)
        timed("EVENT_TOOL_CALLS", Q.EVENT_TOOL_CALLS, args)
        timed("EVENT_AGENT_STEPS", Q.EVENT_AGENT_STEPS, args)
        return {"children": len(timed("EVENT_CHILDREN", Q.EVENT_CHILDREN, args))}
    if kind == "run":
        args = {"project": project, "run_id": spec["path"].rsplit("/", 1)[1]}
        run = timed("RUN", Q.RUN, args)
        tree = {**args, "max_bytes": 8_000_000, "limit": 10_000}  # the route's bounds
        timed("RUN_EVENTS", Q.RUN_EVENTS, tree)
        timed("RUN_SPANS", Q.RUN_SPANS, tree)
        return {"events": int(run[0]["event_count"])}
    raise ValueError(kind)


def role_direct(args: argparse.Namespace) -> None:
    """The baseline: every route's queries straight on ChdbStore, timed; JSON on stdout."""
    from watchllm_ext.settings import Settings
    from watchllm_plugins.chdb_store import ChdbStore

    plan = json.loads(Path(args.plan).read_text())
    settings = Settings(data_dir=Path(args.data_dir), create_default_key=False)
    store = ChdbStore(settings.store_path)
    out: dict[str, Any] = {"routes": {}, "memory_start": memory(os.getpid())}
    try:
        for spec in plan["specs"]:
            totals: list[float] = []
            per_query: dict[str, list[float]] = {}
            first = 0.0
            check: Any = None
            for i in range(plan["warmups"] + plan["calls"]):
                spent: dict[str, float] = {}

                def timed(name: str, sql: str, qargs: dict[str, Any],
                          spent: dict[str, float] = spent) -> list[dict[str, Any]]:
                    t0 = time.perf_counter()
                    rows = store.query(sql, qargs)
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
                    return rows

                call = concrete(spec, (plan["round"] - 1) * (plan["warmups"] + plan["calls"]) + i,
                                plan["picks"])
                t0 = time.perf_counter()
                result = route_queries(store, call, timed)
                elapsed = time.perf_counter() - t0
                if i == 0:
                    first, check = elapsed, result
                if i >= plan["warmups"]:
                    totals.append(elapsed)
                    for name, s in spent.items():
                        per_query.setdefault(name, []).append(s)
            out["routes"][spec["label"]] = {"times": totals, "first": first, "check": check,
                                            "queries": per_query}
            print(f"  round {plan['round']} direct {spec['label']:34s} median "
                  f"{statistics.median(totals) * 1e3:8.1f} ms", flush=True)
        out["memory_end"] = memory(os.getpid())
        out["parts"] = _parts(store)
        if plan.get("profile"):
            out["profile"] = profile_queries(store, plan)
    finally:
        store.close()
    print(json.dumps(out))


# --- profiling: where the time of the slow queries goes -----------------------------------------


# Profile timings run with the query condition cache off: it remembers which granules failed
# a WHERE and would make a repeated lookup of the same id look free (it does not apply to
# FINAL reads, so the routes' figures above do not get it either).
_NO_CONDITION_CACHE = " SETTINGS use_query_condition_cache = 0"


def _best_ms(store: Any, sql: str, args: dict[str, Any] | None, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        # execute (CSV), not query: aggregate states are not valid JSON text
        store.execute(sql.rstrip() + _NO_CONDITION_CACHE, args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bounded(sql: str, condition: str) -> str:
    """`sql` with `condition` ANDed to its (first) project filter."""
    anchor = "WHERE project_id = {project:String}"
    if anchor not in sql:
        raise ValueError(f"no {anchor!r} in the query")
    return sql.replace(anchor, f"{anchor} AND ({condition})", 1)


def profile_queries(store: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Where the time of the slow routes goes: each query as the route runs it, its parts
    (the rollup side and the raw side of the combined read, FINAL or not, the merge
    functions) and what-if rewrites that read the same data (all read-only: the folder is not
    changed; the what-if per-hour states live in session TEMPORARY tables). Plus EXPLAIN."""
    from watchllm_ext.analytics import queries as Q

    end = datetime.fromisoformat(plan["end"])
    start = end - timedelta(days=DAYS)
    first, last = _hours(start, end)
    combined = {"project": PROJECT, "from": start, "to": end, "first_hour": first,
                "end_hour": last}
    picks = plan["picks"]
    ev = {"project": PROJECT, "event_id": picks["events"][0]}
    run = {"project": PROJECT, "run_id": picks["runs"][0], "max_bytes": 8_000_000, "limit": 10_000}
    day_start = end - timedelta(hours=24)
    p = "project_id = {project:String}"
    rollup_rows = ("FROM hourly_usage_by_project FINAL WHERE " + p + " AND hour >= "
                   "{first_hour:DateTime('UTC')} AND hour < {end_hour:DateTime('UTC')}")
    ts = "DateTime64(3, 'UTC')"
    parts: list[tuple[str, str, dict[str, Any]]] = []

    def add(label: str, sql: str, qargs: dict[str, Any]) -> None:
        parts.append((label, sql, qargs))

    # stats and timeseries: up to a6e5217 the raw side of the combined read picked its rows
    # with `toStartOfHour(timestamp) NOT IN (clean hours)`, which the primary key cannot use
    # for granules that straddle an hour; the what-if (added while a query still has that
    # form) reads the partial hours at the ends by range and the dirty hours with IN.
    clean_sql = getattr(Q, "_CLEAN_SQL", None)
    not_in = f"toStartOfHour(timestamp) NOT IN ({clean_sql})"
    by_ranges = (
        "(timestamp < {first_hour:DateTime('UTC')} OR timestamp >= {end_hour:DateTime('UTC')}"
        " OR toStartOfHour(timestamp) IN (SELECT hour FROM rollup_marks WHERE " + p +
        " AND hour >= {first_hour:DateTime('UTC')} AND hour < {end_hour:DateTime('UTC')}"
        f" AND hour NOT IN ({clean_sql})))"
    )
    ts_args = {**combined, "step": 6, "tz": "UTC"}
    for name, sql, qargs in (
        ("STATS_SUMS", Q.STATS_SUMS, combined),
        ("STATS_STATES", Q.STATS_STATES, combined),
        ("TIMESERIES[Hour,None]", Q.TIMESERIES[("Hour", None)], ts_args),
        ("TIMESERIES[Hour,model]", Q.TIMESERIES[("Hour", "model")], ts_args),
    ):
        add(f"{name} as the route runs it", sql, qargs)
        if clean_sql and not_in in sql:
            add(f"{name}, what-if: raw side by key ranges + dirty hours", sql.replace(
                not_in, by_ranges), qargs)
    add("CLEAN_HOURS", Q.CLEAN_HOURS, {"project": PROJECT, "first_hour": first,
                                       "end_hour": last})
    add("raw side selected by NOT IN (clean hours), as up to a6e5217 (FINAL): count()",
        f"SELECT count() FROM events FINAL WHERE {p} AND timestamp >= {{from:{ts}}} AND "
        f"timestamp < {{to:{ts}}} AND {not_in}" if clean_sql else "SELECT 0", combined)
    add("raw side by key ranges (FINAL): count()",
        f"SELECT count() FROM events FINAL WHERE {p} AND timestamp >= {{from:{ts}}} AND "
        f"timestamp < {{to:{ts}}} AND NOT (timestamp >= {{first_hour:DateTime('UTC')}} AND "
        "timestamp < {end_hour:DateTime('UTC')})", combined)
    add("rollup side: count() of the rows (FINAL)", "SELECT count() " + rollup_rows, combined)
    add("rollup side: sums only", "SELECT sum(events), sum(tokens_input), sum(cost_nanousd) "
        + rollup_rows, combined)
    add("rollup side: quantilesDDMergeIf(latency_quantiles)",
        "SELECT quantilesDDMergeIf(0.01, 0.5, 0.9, 0.95, 0.99)(latency_quantiles, "
        "event_type = 'prompt_call') " + rollup_rows, combined)
    add("rollup side: uniqMerge(runs), uniqMerge(users)",
        "SELECT uniqMerge(runs), uniqMerge(users) " + rollup_rows, combined)
    store.execute("CREATE TEMPORARY TABLE IF NOT EXISTS bench_hour_states ENGINE = Memory AS "
                  "SELECT hour, uniqMergeState(runs) AS runs, uniqMergeState(users) AS users, "
                  "quantilesDDMergeStateIf(0.01, 0.5, 0.9, 0.95, 0.99)(latency_quantiles, "
                  "event_type = 'prompt_call') AS q " + rollup_rows + " GROUP BY hour", combined)
    add("what-if: uniqMerge x2 from per-hour states (one row an hour)",
        "SELECT uniqMerge(runs), uniqMerge(users) FROM bench_hour_states", {})
    add("what-if: quantilesDDMerge from a per-hour call-latency sketch",
        "SELECT quantilesDDMerge(0.01, 0.5, 0.9, 0.95, 0.99)(q) FROM bench_hour_states", {})

    # lookups by id: no key column leads to event_id or run_id, so FINAL reads the project's
    # key columns in full; the what-ifs bound them by time, as a known timestamp would.
    ev_row = store.query(f"SELECT toString(timestamp) AS t, run_id FROM events WHERE {p} AND "
                         "event_id = {event_id:String} LIMIT 1", ev)[0]
    ev_t = datetime.strptime(ev_row["t"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    at_event = {**ev, "t": ev_t, "run_id": ev_row["run_id"]}
    run_row = store.query("SELECT toString(min(timestamp)) AS a, toString(max(timestamp)) AS b"
                          f" FROM events WHERE {p} AND run_id = {{run_id:String}}", run)[0]
    run_window = {**run, **{k: datetime.strptime(run_row[k], "%Y-%m-%d %H:%M:%S.%f")
                            .replace(tzinfo=UTC) for k in ("a", "b")}}
    exact_t = f"timestamp = {{t:{ts}}}"
    for name, sql, cond in (
        ("EVENT", Q.EVENT, exact_t),
        ("EVENT_TOOL_CALLS", Q.EVENT_TOOL_CALLS, exact_t),
        ("EVENT_AGENT_STEPS", Q.EVENT_AGENT_STEPS, exact_t),
        ("EVENT_CHILDREN", Q.EVENT_CHILDREN,
         f"run_id = {{run_id:String}} AND timestamp >= {{t:{ts}}} - toIntervalHour(1) "
         f"AND timestamp < {{t:{ts}}} + toIntervalDay(1)"),
        ("RUN", Q.RUN, f"timestamp >= {{a:{ts}}} AND timestamp <= {{b:{ts}}}"),
        ("RUN_EVENTS", Q.RUN_EVENTS, f"timestamp >= {{a:{ts}}} AND timestamp <= {{b:{ts}}}"),
    ):
        qargs = at_event if name.startswith("EVENT") else run_window
        add(f"{name} as the route runs it", sql, qargs)
        if "FINAL" in sql:
            add(f"{name} without FINAL", sql.replace(" FINAL", ""), qargs)
        with contextlib.suppress(ValueError):
            add(f"{name}, what-if: with the known time", _bounded(sql, cond), qargs)
    runs_args = {"project": PROJECT, "from": day_start, "to": end, "limit": 50,
                 "has_cursor": 0, "cursor_ts": end, "cursor_id": ""}
    add("RUNS as the route runs it", Q.RUNS, runs_args)
    outer = "WHERE project_id = {project:String} AND run_id IN"
    if outer in Q.RUNS:  # a run that started at or after `from` has no event before it
        add("RUNS, what-if: outer read bounded by timestamp >= from", Q.RUNS.replace(
            outer, f"WHERE project_id = {{project:String}} AND timestamp >= {{from:{ts}}} "
            "AND run_id IN"), runs_args)
    add("LOGS page 1 as the route runs it", Q.LOGS, {
        "project": PROJECT, "from": day_start, "to": end, "limit": 100, "has_cursor": 0,
        "cursor_ts": end, "cursor_id": "", "status": "", "event_type": "", "model": "",
        "run_id": "", "user_id": "", "tag": "", "q": ""})

    timings = {}
    for label, sql, qargs in parts:
        try:
            timings[label] = _best_ms(store, sql, qargs)
        except Exception as exc:  # a what-if that no longer fits the core's SQL
            timings[label] = float("nan")
            print(f"  profile: {label}: {str(exc)[:200]}", flush=True)
    explain = {}
    for label, sql, qargs in (("STATS_STATES", Q.STATS_STATES, combined),
                              ("EVENT", Q.EVENT, ev), ("RUN_EVENTS", Q.RUN_EVENTS, run)):
        rows = store.query("EXPLAIN indexes = 1 " + sql.strip(), qargs)
        explain[label] = "\n".join(r["explain"] for r in rows)
    return {"timings_ms": timings, "explain": explain}


def measure_direct(data_dir: Path, work: Path, specs: list[dict[str, Any]], warmups: int,
                   calls: int, rnd: int, end: datetime, picks: dict[str, str],
                   profile: bool) -> dict[str, Any]:
    plan_path = work / f"plan-{rnd}.json"
    plan_path.write_text(json.dumps({"specs": specs, "warmups": warmups, "calls": calls,
                                     "round": rnd, "end": end.isoformat(), "picks": picks,
                                     "profile": profile}))
    return run_role("direct", ["--data-dir", str(data_dir), "--plan", str(plan_path)],
                    timeout_s=3600, cwd=work)


# --- the report -------------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _analytics_files() -> list[Path]:
    """The files on the analytics read path: the routes and queries, the app and its auth,
    the store layer, the chDB store and the migrations."""
    import watchllm_clickhouse
    import watchllm_ext
    import watchllm_plugins

    core = Path(watchllm_ext.__file__).parent
    files = [*sorted((core / "analytics").rglob("*.py")), *sorted((core / "store").rglob("*.py")),
             core / "app.py", core / "auth.py", core / "keys.py",
             Path(watchllm_plugins.__file__).parent / "chdb_store.py"]
    for folder in watchllm_clickhouse.__path__:
        files += sorted((Path(folder) / "migrations").glob("*.sql"))
    return [f for f in files if f.exists()]


def code_fingerprint() -> tuple[str, str]:
    """(a digest of the files on the analytics path, which code is measured)."""
    import watchllm_ext

    digest = hashlib.sha256()
    for path in _analytics_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    core = Path(watchllm_ext.__file__).parent
    desc = str(core)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        repo = core.resolve().parent
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                *(str(f) for f in _analytics_files())],
                               capture_output=True, text=True, check=True).stdout.strip()
        desc = f"working tree at commit {sha}" + (
            " + uncommitted changes on the analytics path" if dirty else "")
    return digest.hexdigest()[:16], desc


def print_report(cfg: dict[str, Any], data: dict[str, Any], http: list[dict[str, Any]],
                 direct: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels = list(http[0]["routes"])
    rows = []
    for label in labels:
        h = [t for r in http for t in r["routes"][label]["times"]]
        d = [t for r in direct for t in r["routes"][label]["times"]]
        queries: dict[str, list[float]] = {}
        for r in direct:
            for name, ts in r["routes"][label]["queries"].items():
                queries.setdefault(name, []).extend(ts)
        rows.append({
            "label": label,
            "http_median_ms": statistics.median(h) * 1e3,
            "http_p95_ms": p95(h) * 1e3,
            "http_first_ms": http[0]["routes"][label]["first"] * 1e3,
            "direct_median_ms": statistics.median(d) * 1e3,
            "direct_p95_ms": p95(d) * 1e3,
            "bytes": http[0]["routes"][label]["bytes"],
            "queries_ms": {k: statistics.median(v) * 1e3 for k, v in queries.items()},
            "target_ms": TARGETS_MS.get(label),
            "http_check": http[0]["routes"][label]["check"],
            "direct_check": direct[0]["routes"][label]["check"],
        })
    n_calls = sum(len(r["routes"][labels[0]]["times"]) for r in http)
    print()
    print("=" * 100)
    print(f"WatchLLM analytics benchmark   {cfg['cpus']} CPUs   python {cfg['python']}   "
          f"chDB {cfg['chdb']}   {'quick' if cfg['quick'] else 'full'} run")
    print(f"code: {cfg['code']}")
    if cfg.get("code_changed_during_run"):
        print("WARNING: files on the analytics path changed during this run; rounds may have "
              "measured different code")
    print("=" * 100)
    parts = data.get("parts", {})
    ev = parts.get("events", {})
    print(f"\ndata: {data['events']:,} events of project {PROJECT!r} + {data['other_events']:,} "
          f"of {OTHER_PROJECT!r}, {data['start'][:16]} .. {data['end'][:16]} UTC; "
          f"{data.get('tool_calls', 0):,} tool_calls, {data.get('agent_steps', 0):,} agent_steps "
          f"rows")
    if ev:
        print(f"      events: {ev['parts']} active parts in {ev['partitions']} partitions, "
              f"{ev['bytes'] / 2**20:,.0f} MiB on disk; hourly_usage_by_project: "
              f"{parts.get('hourly_usage_by_project', {}).get('rows', 0):,} rows")
    tm = data.get("timings", {})
    if data.get("reused"):
        rr = data.get("reuse_refresh", {})
        print(f"      reused the folder (generated {data['generated_at']}: events "
              f"{tm.get('events_s', 0):.1f} s, rollups {data['rollup_hours']} hours in "
              f"{tm.get('rollup_s', 0):.1f} s); refresh now: {rr.get('hours', 0)} hours in "
              f"{rr.get('s', 0):.1f} s")
    else:
        print(f"      generated now: events {tm['events_s']:.1f} s, tool_calls+agent_steps "
              f"{tm['tool_calls_agent_steps_s']:.1f} s, refresh_rollups(margin=0) "
              f"{data['rollup_hours']} (project, hour) pairs in {tm['rollup_s']:.1f} s, "
              f"merges settled after {tm['merge_wait_s']:.1f} s")
    print(f"\nEach route: {cfg['warmups']} warm-up calls then {cfg['calls']} timed calls per "
          f"round, {cfg['rounds']} round(s) alternating server / direct ({n_calls} samples "
          f"each); one keep-alive httpx connection; 1 uvicorn worker.")
    print(f"   {'route':34s}{'HTTP med':>9s}{'p95':>8s}{'1st':>8s}  {'direct med':>10s}"
          f"{'p95':>8s}{'ratio':>7s}{'KB':>7s}  target")
    for r in rows:
        target = ""
        if r["target_ms"] is not None:
            ok = r["http_median_ms"] <= r["target_ms"]
            target = f"<= {r['target_ms']:.0f} ms {'PASS' if ok else 'MISS'}"
        print(f"   {r['label']:34s}{r['http_median_ms']:9.1f}{r['http_p95_ms']:8.1f}"
              f"{r['http_first_ms']:8.0f}  {r['direct_median_ms']:10.1f}{r['direct_p95_ms']:8.1f}"
              f"{r['http_median_ms'] / r['direct_median_ms']:7.2f}{r['bytes'] / 1024:7.1f}  "
              f"{target}")
    print("   (ms; ratio = HTTP median / direct median; 1st = first call after the server "
          "started, round 1)")
    if len(http) > 1:
        print("\nMedians per round (ms), HTTP | direct:")
        for label in labels:
            hs = " / ".join(f"{statistics.median(r['routes'][label]['times']) * 1e3:.0f}"
                            for r in http)
            ds = " / ".join(f"{statistics.median(r['routes'][label]['times']) * 1e3:.0f}"
                            for r in direct)
            print(f"   {label:34s}{hs:>24s} | {ds}")
    print("\nDirect medians of each route's queries (ms):")
    for r in rows:
        print(f"   {r['label']:34s}" + ", ".join(f"{k} {v:.1f}" for k, v in
                                                r["queries_ms"].items()))
    mismatched = [r["label"] for r in rows if r["http_check"] != r["direct_check"]]
    print("\nCheck (HTTP answer vs direct rows): "
          + ("all equal" if not mismatched else f"DIFFER for {mismatched}"))
    for r in rows:
        print(f"   {r['label']:34s}{r['http_check']}")
    print("\nMemory (MiB):")
    for i, h in enumerate(http, 1):
        print(f"   server round {i}: VmRSS {h['memory_start'].get('VmRSS', 0):,.0f} when ready, "
              f"{h['memory_end'].get('VmRSS', 0):,.0f} after the calls; VmHWM (peak) "
              f"{h['memory_end'].get('VmHWM', 0):,.0f}")
    for i, d in enumerate(direct, 1):
        print(f"   direct helper round {i}: VmRSS {d['memory_end'].get('VmRSS', 0):,.0f} after "
              f"the queries; VmHWM {d['memory_end'].get('VmHWM', 0):,.0f}")
    print("\nTargets (HTTP medians):")
    for r in rows:
        if r["target_ms"] is not None:
            ok = r["http_median_ms"] <= r["target_ms"]
            print(f"   {r['label']:34s} <= {r['target_ms']:5.0f} ms: {r['http_median_ms']:8.1f} ms"
                  f"  {'PASS' if ok else 'MISS'}")
    print()
    return rows


def print_profile(profile: dict[str, Any]) -> None:
    print("=" * 100)
    print("Profile: the queries and their parts on chDB, median of 5, query condition cache off"
          " (not benchmark figures)")
    print("=" * 100)
    for label, ms in profile["timings_ms"].items():
        print(f"   {ms:9.1f} ms  {label}")
    for label, text in profile["explain"].items():
        print(f"\nEXPLAIN indexes = 1 of {label}:")
        print("\n".join("   " + line for line in text.splitlines()))
    print()


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, help="events of project 'bench' (default 10,000,000; "
                   "1,000,000 with --quick)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--data-dir", type=Path, help="the data folder (default: "
                   "<tmp>/watchllm-bench-analytics-<events>); reused if it holds the events")
    p.add_argument("--regenerate", action="store_true", help="rebuild the data folder")
    p.add_argument("--rounds", type=int, help="rounds of server + direct (default 2; 1 quick)")
    p.add_argument("--calls", type=int, help="timed calls per route and round (default 10; 5)")
    p.add_argument("--warmups", type=int, default=3, help="warm-up calls per route and round")
    p.add_argument("--profile", action="store_true",
                   help="time the parts of the queries and print EXPLAIN (after the rounds)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    # Roles of the child processes (not for direct use).
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.events is None:
        args.events = 1_000_000 if args.quick else 10_000_000
    if args.events < 10_000:
        p.error("--events: at least 10,000")

    if args.role == "serve":
        role_serve(args.port, Path(args.data_dir))
        return 0
    if args.role == "prepare":
        role_prepare(args)
        return 0
    if args.role == "direct":
        role_direct(args)
        return 0
    if args.role:
        p.error(f"unknown role {args.role}")

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import chdb

    fingerprint, code = code_fingerprint()
    print(f"code under test: {code}", flush=True)
    cfg: dict[str, Any] = {
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "chdb": chdb.__version__,
        "code": code,
        "rounds": args.rounds or (1 if args.quick else 2),
        "calls": args.calls or (5 if args.quick else 10),
        "warmups": args.warmups,
        "events": args.events,
    }
    data_dir = (args.data_dir or Path(tempfile.gettempdir())
                / f"watchllm-bench-analytics-{args.events}").resolve()
    work = Path(tempfile.mkdtemp(prefix="watchllm-bench-analytics-run-"))
    try:
        t0 = time.monotonic()
        data = run_role("prepare", ["--data-dir", str(data_dir), "--events", str(args.events)]
                        + (["--regenerate"] if args.regenerate else []),
                        timeout_s=3 * 3600, cwd=work)
        print(f"data ready in {time.monotonic() - t0:.0f} s", flush=True)
        end = datetime.fromisoformat(data["end"])
        http: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        picks = None
        for rnd in range(1, cfg["rounds"] + 1):
            h = measure_http(data_dir, work, end, picks, cfg["warmups"], cfg["calls"], rnd,
                             cfg["rounds"])
            picks = h["picks"]
            http.append(h)
            specs = route_specs(end, picks)
            last = rnd == cfg["rounds"]
            direct.append(measure_direct(data_dir, work, specs, cfg["warmups"], cfg["calls"],
                                         rnd, end, picks, profile=args.profile and last))
        data["parts"] = direct[-1].get("parts", data.get("parts"))
        cfg["code_changed_during_run"] = code_fingerprint()[0] != fingerprint
        rows = print_report(cfg, data, http, direct)
        if args.profile:
            print_profile(direct[-1]["profile"])
        if args.json:
            args.json.write_text(json.dumps({"config": cfg, "data": data, "routes": rows,
                                             "http": http, "direct": direct}, indent=2,
                                            default=str))
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
