"""Plan quotas (watchllm_ext/quotas, docs/QUOTAS.md) on a real server, once per usage backend:
`memory` (one process) and `redis` (a real redis-server on a free loopback port).

Limits are exact to the event under 50 concurrent clients; a batch that does not fit is
refused whole with how many would fit; `usage set` above the limit makes the next request 429
with every rate-limit header; the minute bucket allows no double burst; payload bytes and
USD budgets are enforced; Redis down or paused fails open (per-process fallback) or closed,
never 5xx, counted in /metrics, and counts exactly again once it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Running, prompt_call
from redis_server import RedisServer
from stores import EVERY_STORE

from watchllm_ext.auth import Principal
from watchllm_ext.errors import Problem
from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.quotas.engine import MemoryUsage, Outcome, QuotaUnavailable, decide
from watchllm_ext.quotas.plans import Plan, periods
from watchllm_ext.quotas.redis_backend import RedisUsage, keys
from watchllm_ext.quotas.resp import (
    INCOMPLETE,
    LOST,
    ConnectionLost,
    Replies,
    ReplyError,
    RespClient,
    encode,
)

BACKENDS = ("memory", "redis")
CLIENTS = 50


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def away_from_period_end(margin_s: float = 45.0) -> None:
    """Day and month counters start again at UTC midnight: a test of exact counts must not
    straddle it (the suite may well run at 23:59)."""
    p = periods()
    if p.day_reset_s < margin_s:
        time.sleep(p.day_reset_s + 1.0)


@pytest.fixture
def quota_server(
    request: pytest.FixtureRequest, server_factory: Any, tmp_path: Path
) -> Iterator[Any]:
    """Start a server with quotas on the backend of the test's `backend` parameter."""
    backend = request.param
    redis_srv = RedisServer(tmp_path / "redis").start() if backend == "redis" else None

    def start(plans: dict[str, Any], **overrides: Any) -> Running:
        settings: dict[str, Any] = {
            "quota_backend": backend,
            "quota_plans": plans,
            "durability": "memory",
        }
        if redis_srv is not None:
            settings["redis_url"] = redis_srv.url
            # Here the 50 client threads share the server's GIL: its Redis calls wait for the
            # GIL, not for Redis (tests/test_quota_fleet.py runs servers apart, on defaults).
            settings["quota_redis_timeout_ms"] = 3_000.0
        settings.update(overrides)
        server = server_factory(**settings)
        server.redis = redis_srv  # type: ignore[attr-defined]
        return server

    start.backend = backend  # type: ignore[attr-defined]
    yield start
    if redis_srv is not None:
        redis_srv.stop()


def with_backends(fn: Any) -> Any:
    return pytest.mark.parametrize("quota_server", BACKENDS, indirect=True)(fn)


def events(n: int, **fields: Any) -> dict[str, Any]:
    return {"events": [prompt_call(uuid.uuid4().hex, **fields) for _ in range(n)]}


def fill(url: str | list[str], key: str, clients: int = CLIENTS) -> tuple[int, list[int]]:
    """`clients` concurrent senders, each sending batches (of 1 to 7 events) until no event
    fits; on a 429 a sender retries with the number that would fit. Returns the events
    accepted and every status seen. With several URLs, sender i sends to URL i mod n."""
    urls = [url] if isinstance(url, str) else url
    statuses: list[int] = []
    lock = threading.Lock()

    def sender(i: int) -> int:
        accepted = 0
        batch = 1 + i % 7
        base = urls[i % len(urls)]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(10_000):
                answer = c.post("/v1/events/batch", json=events(batch), timeout=30)
                with lock:
                    statuses.append(answer.status_code)
                if answer.status_code == 202:
                    accepted += batch
                    continue
                assert answer.status_code == 429, answer.text
                fit = answer.json()["would_fit"]
                if fit == 0:
                    return accepted
                batch = min(batch, fit)
        raise AssertionError("a sender never ran out of quota")

    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(sender, range(clients)))
    return total, statuses


@with_backends
def test_limits_are_exact_under_50_concurrent_clients(quota_server: Any) -> None:
    away_from_period_end()
    server = quota_server({"default": {"events_per_day": 700, "events_per_month": 5_000}})
    accepted, statuses = fill(server.url, server.key)
    assert accepted == 700
    assert statuses.count(429) >= CLIENTS  # every sender ended on a refusal
    usage = server.client.get("/v1/usage", headers=server.headers()).json()
    # Refused batches were refused whole: the counters hold exactly what was accepted.
    assert usage["used"]["day"] == 700
    assert usage["used"]["month"] == 700
    assert usage["remaining"] == {"day": 0, "month": 4_300}


@with_backends
def test_usage_reports_the_room_the_check_then_gives(quota_server: Any) -> None:
    """The minute's leaky bucket drains continuously: its level is a fraction. /v1/usage
    rounds it as the check does, so the room it reports is what the next batch is given."""
    server = quota_server({"default": {"events_per_minute": 10}})
    h = server.headers()
    assert server.client.post("/v1/events/batch", json=events(8), headers=h).status_code == 202
    time.sleep(0.5)  # the bucket drains below 8 (10 a minute: 1 every 6 s)
    usage = server.client.get("/v1/usage", headers=h).json()
    room = usage["remaining"]["minute"]
    assert usage["used"]["minute"] + room == 10
    over = server.client.post("/v1/events/batch", json=events(room + 1), headers=h)
    assert over.status_code == 429 and over.json()["would_fit"] == room, over.text
    fits = server.client.post("/v1/events/batch", json=events(room), headers=h)
    assert fits.status_code == 202, fits.text


@with_backends
def test_a_batch_that_does_not_fit_is_refused_whole_with_how_many_fit(quota_server: Any) -> None:
    away_from_period_end()
    server = quota_server({"default": {"events_per_day": 10}})
    assert server.client.post("/v1/events/batch", json=events(7), headers=server.headers())
    refused = server.client.post("/v1/events/batch", json=events(5), headers=server.headers())
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "quota_exceeded"
    assert body["would_fit"] == 3 and body["window"] == "day" and body["limit"] == 10
    assert body["field"] == "events"
    assert "3 would fit now" in body["message"]
    # The three that fit go through; then nothing does.
    assert (
        server.client.post("/v1/events/batch", json=events(3), headers=server.headers()).status_code
        == 202
    )
    last = server.client.post("/v1/events/batch", json=events(1), headers=server.headers())
    assert last.status_code == 429 and last.json()["would_fit"] == 0
    # The one-event route counts too.
    one = server.client.post(
        "/v1/projects/acme/events", json=prompt_call("solo"), headers=server.headers()
    )
    assert one.status_code == 429


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHLLM_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _cli_env(server: Running) -> dict[str, str]:
    s = server.settings
    env = {
        "WATCHLLM_DATA_DIR": str(s.data_dir),
        "WATCHLLM_QUOTA_BACKEND": s.quota_backend,
        "WATCHLLM_QUOTA_PLANS": json.dumps(
            {k: v.model_dump(exclude_none=True) for k, v in s.quota_plans.items()}
        ),
    }
    if s.redis_url:
        env["WATCHLLM_REDIS_URL"] = s.redis_url
    return env


def usage_cli(server: Running, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`watchllm usage ...` as a user runs it beside the running server: straight to Redis,
    or through the server's admin route for the memory backend."""
    if server.settings.quota_backend == "memory":
        if not hasattr(server, "operator_key"):
            server.operator_key = server.keys.create("ops", scope="operator")  # type: ignore[attr-defined]
            time.sleep(0.3)  # the test server rereads its key file every 0.2 s
        args = (*args, "--url", server.url, "--key", server.operator_key)  # type: ignore[attr-defined]
    return _cli(["usage", *args], _cli_env(server), tmp_path)


@with_backends
def test_usage_set_above_the_limit_then_the_next_request_is_429_with_headers(
    quota_server: Any, tmp_path: Path
) -> None:
    away_from_period_end()
    plans = {"default": {"events_per_minute": 600, "events_per_day": 1_000}}
    server = quota_server(plans)
    h = server.headers()
    assert server.client.post("/v1/events/batch", json=events(2), headers=h).status_code == 202
    done = usage_cli(server, tmp_path, "set", "--project", "acme", "--day", "1200")
    assert done.returncode == 0, done.stderr
    assert "day" in done.stdout and "1,200" in done.stdout
    refused = server.client.post("/v1/events/batch", json=events(1), headers=h)
    assert refused.status_code == 429
    headers = refused.headers
    midnight = periods().day_reset_s
    assert abs(int(headers["Retry-After"]) - midnight) <= 2
    assert headers["X-RateLimit-Limit"] == "1000"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert abs(int(headers["X-RateLimit-Reset"]) - midnight) <= 2
    assert headers["RateLimit-Policy"] == '"minute";q=600;w=60, "day";q=1000;w=86400'
    name, remaining, reset = headers["RateLimit"].split(";")
    assert name == '"day"' and remaining == "r=0"
    assert abs(int(reset.removeprefix("t=")) - midnight) <= 2
    shown = usage_cli(server, tmp_path, "show", "--project", "acme")
    assert shown.returncode == 0, shown.stderr
    assert "plan default" in shown.stdout
    reset_done = usage_cli(server, tmp_path, "reset", "--project", "acme")
    assert reset_done.returncode == 0, reset_done.stderr
    assert server.client.post("/v1/events/batch", json=events(1), headers=h).status_code == 202
    # A plan that does not exist is refused, naming it.
    bad = usage_cli(server, tmp_path, "set", "--project", "acme", "--plan", "gold")
    assert bad.returncode != 0 and "gold" in bad.stderr


@with_backends
def test_the_minute_bucket_refills_smoothly_with_no_double_burst(quota_server: Any) -> None:
    server = quota_server({"default": {"events_per_minute": 60}})
    h = server.headers()
    assert server.client.post("/v1/events/batch", json=events(60), headers=h).status_code == 202
    refused = server.client.post("/v1/events/batch", json=events(1), headers=h)
    assert refused.status_code == 429 and refused.json()["window"] == "minute"
    assert refused.headers["Retry-After"] == "1"  # one event comes back each second
    assert 58 <= int(refused.headers["X-RateLimit-Reset"]) <= 60  # the bucket is empty by then
    time.sleep(2.5)
    # 2.5 s later two (or, on a slow machine, three) events fit: not a new minute's 60.
    again = server.client.post("/v1/events/batch", json=events(5), headers=h)
    assert again.status_code == 429 and again.json()["would_fit"] in (2, 3)
    assert server.client.post("/v1/events/batch", json=events(2), headers=h).status_code == 202
    # A batch larger than the whole minute's allowance never fits: the answer says so.
    huge = server.client.post("/v1/events/batch", json=events(61), headers=h)
    assert huge.status_code == 429 and "smaller batches" in huge.json()["message"]


@with_backends
def test_payload_bytes_per_month(quota_server: Any) -> None:
    away_from_period_end()
    server = quota_server({"default": {"payload_bytes_per_month": 1_000}})
    h = server.headers()
    big = events(1, prompt="x" * 600, response=None)
    assert server.client.post("/v1/events/batch", json=big, headers=h).status_code == 202
    assert server.client.post("/v1/events/batch", json=big, headers=h).status_code == 202
    # The batch that crossed the line was taken, the next one is not.
    refused = server.client.post("/v1/events/batch", json=big, headers=h)
    assert refused.status_code == 429 and refused.json()["window"] == "payload_bytes"
    usage = server.client.get("/v1/usage", headers=h).json()
    # Every value of each event counts (tests/test_quota_bytes.py has every type): the 600 of
    # the prompt, the event id (32), its time as text (32), the project (4), the event type
    # (11), run id, model, provider, tokens, latency, env and status (5+6+6+3+2+5+10+7).
    assert usage["used"]["payload_bytes"] == 2 * (600 + 32 + 32 + 4 + 11 + 44)


@with_backends
def test_usage_route_answers_any_key_of_the_project(quota_server: Any) -> None:
    away_from_period_end()
    server = quota_server(
        {"free": {"events_per_day": 50}, "pro": {"events_per_day": 5_000}},
        quota_default_plan="free",
        quota_project_plans={"acme": "pro"},
    )
    ingest_key = server.keys.create("acme", scope="ingest")
    other_key = server.keys.create("beta", scope="ingest")
    time.sleep(0.5)  # the key file is reread every 0.2 s in tests
    assert (
        server.client.post(
            "/v1/events/batch", json=events(3), headers=server.headers(ingest_key)
        ).status_code
        == 202
    )
    mine = server.client.get("/v1/usage", headers=server.headers(ingest_key)).json()
    assert mine["plan"] == "pro" and mine["used"]["day"] == 3
    assert mine["remaining"]["day"] == 4_997
    theirs = server.client.get("/v1/usage", headers=server.headers(other_key)).json()
    assert theirs["project_id"] == "beta" and theirs["plan"] == "free"
    assert theirs["used"]["day"] == 0
    anonymous = server.client.get("/v1/usage")
    assert anonymous.status_code == 401 and anonymous.json()["field"] == "Authorization"
    # It takes no parameter: `project=beta` was ignored, and acme's usage shown for it.
    asked = server.client.get(
        "/v1/usage", params={"project": "beta"}, headers=server.headers(ingest_key)
    )
    assert (asked.status_code, asked.json()["field"]) == (400, "project"), asked.text
    # The admin route: an admin key of acme may not touch beta.
    denied = server.client.get(
        "/v1/admin/usage", params={"project": "beta"}, headers=server.headers()
    )
    assert denied.status_code == 403 and denied.json()["field"] == "project"
    # Reading is for the project's admin; changing what it is billed on is the operator's.
    mine = server.client.get("/v1/admin/usage", headers=server.headers())
    assert mine.status_code == 200 and mine.json()["used"]["day"] == 3
    self_reset = server.client.post(
        "/v1/admin/usage", json={"reset": True}, headers=server.headers()
    )
    assert self_reset.status_code == 403 and self_reset.json()["field"] == "Authorization"
    operator = server.keys.create("ops", scope="operator")
    time.sleep(0.3)
    bad = server.client.post(
        "/v1/admin/usage",
        params={"project": "acme"},
        json={"set": {"week": 3}},
        headers=server.headers(operator),
    )
    assert bad.status_code == 422 and bad.json()["field"] == "set.week"
    # A project id no key can have is refused before any usage is read or made for it.
    for method in ("GET", "POST"):
        odd = server.client.request(
            method,
            "/v1/admin/usage",
            params={"project": "../x"},
            json={"reset": True} if method == "POST" else None,
            headers=server.headers(operator),
        )
        assert (odd.status_code, odd.json()["field"]) == (400, "project"), odd.text
        assert "not a project id" in odd.json()["message"]
    # What /openapi.json says the body may hold is what the route takes (nothing else).
    for body, field in [
        ({"reset": "yes"}, "reset"),
        ({"set": []}, "set"),
        ({"set": {"day": 10**18 + 1}}, "set.day"),
        ({"set": {"day": 1.0}}, "set.day"),
        ({"plan": ["pro"]}, "plan"),
        ({"plan": "gold"}, "plan"),
    ]:
        refused = server.client.post(
            "/v1/admin/usage",
            params={"project": "acme"},
            json=body,
            headers=server.headers(operator),
        )
        assert (refused.status_code, refused.json()["field"]) == (422, field), body
    # A body in another type than JSON is 415, as at the ingest routes (it was applied).
    typed = server.client.post(
        "/v1/admin/usage",
        params={"project": "acme"},
        content=b'{"reset": false}',
        headers={**server.headers(operator), "Content-Type": "text/plain"},
    )
    assert (typed.status_code, typed.json()["field"]) == (415, "Content-Type"), typed.text
    # A client's own names are repeated cut at 64 characters: a megabyte sent is not echoed.
    for body, field in [
        ({"plan": "p" * 1_000_000}, "plan"),
        ({"y" * 1_000_000: 1}, "y" * 64 + "..."),
        ({"set": {"w" * 1_000_000: 1}}, "set." + "w" * 64 + "..."),
    ]:
        refused = server.client.post(
            "/v1/admin/usage",
            params={"project": "acme"},
            json=body,
            headers=server.headers(operator),
        )
        assert (refused.status_code, refused.json()["field"]) == (422, field)
        assert len(refused.content) < 1_000, refused.content[:300]
    done = server.client.post(
        "/v1/admin/usage",
        params={"project": "acme"},
        json={"reset": True, "plan": "free"},
        headers=server.headers(operator),
    )
    assert done.status_code == 200
    assert done.json()["plan"] == "free" and done.json()["used"]["day"] == 0


@pytest.mark.parametrize("quota_server", ["redis"], indirect=True)
@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_down_or_paused_fails_per_setting_never_5xx(
    quota_server: Any, mode: str, tmp_path: Path
) -> None:
    away_from_period_end()
    server = quota_server(
        {"default": {"events_per_day": 300}},
        quota_failure_mode=mode,
        quota_fallback_events_per_minute=5,
        quota_redis_timeout_ms=200.0,  # well under the 1.5 s pause, well over a loaded machine
    )
    redis_srv: RedisServer = server.redis
    h = server.headers()
    assert server.client.post("/v1/events/batch", json=events(1), headers=h).status_code == 202

    # Slow: Redis paused for 1.5 s answers nothing within the timeout.
    paused = redis.Redis.from_url(redis_srv.url)
    paused.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    started = time.monotonic()
    answer = server.client.post("/v1/events/batch", json=events(1), headers=h)
    assert time.monotonic() - started < 1.0  # a timeout of milliseconds, not the pause
    assert answer.status_code == (202 if mode == "open" else 429)
    paused.close()
    time.sleep(1.6)
    # The check given up at the timeout stayed in flight and Redis ran it once the pause
    # ended: its late reply took back what this process had counted for it, so the event is
    # counted once (open: it was let through) or not at all (closed: it was refused, and the
    # count Redis made is taken back there; the usage route sends that correction first).
    quotas = server.app.state.watchllm.pm.get_plugin("watchllm_ext.quotas.plugin")
    assert quotas.late_replies == 1
    after_pause = server.client.get("/v1/usage", headers=h).json()
    assert after_pause["used"]["day"] == (2 if mode == "open" else 1)

    # Down: killed mid-run.
    redis_srv.kill()
    statuses = [
        server.client.post("/v1/events/batch", json=events(1), headers=h).status_code
        for _ in range(8)
    ]
    if mode == "open":
        # The fallback limit of 5 a minute in this process (the paused request took one).
        assert statuses == [202] * 4 + [429] * 4
        refused = server.client.post("/v1/events/batch", json=events(1), headers=h)
        assert refused.json()["plan"] == "fallback"
    else:
        assert statuses == [429] * 8
        refused = server.client.post("/v1/events/batch", json=events(1), headers=h)
        assert refused.json()["window"] == "unavailable"
        assert refused.headers["Retry-After"] == "1"
    metrics = server.client.get("/metrics").text
    fallback_metric = f'watchllm_quota_fallbacks_total{{mode="{mode}"}}'
    fallbacks = _metric(metrics, fallback_metric)
    assert fallbacks >= 10
    # While Redis is down, usage cannot be read: said plainly, with a retry time.
    unread = server.client.get("/v1/usage", headers=h)
    assert unread.status_code == 503 and unread.headers["Retry-After"] == "1"

    # Back (a fresh, empty Redis on the same port), under steady traffic: within REDIS_RETRY_S
    # (0.5 s) a request reaches Redis again and is counted there (the fallback has no room
    # left, open or closed: a 202 is Redis's answer).
    redis_srv.start()
    back_at = time.monotonic()
    while True:
        sent = server.client.post("/v1/events/batch", json=events(1), headers=h)
        assert sent.status_code in (202, 429)
        if sent.status_code == 202:
            break
        assert time.monotonic() - back_at < 3.0, "no request reached Redis once it was back"
        time.sleep(0.05)
    usage = server.client.get("/v1/usage", headers=h).json()
    if mode == "open":
        # What the fallback took while Redis was down (4 events) was added to the day's count
        # of the new Redis once it was back (the paused request was counted by the old one).
        assert usage["used"]["day"] == 4 + 1
    else:
        assert usage["used"]["day"] == 1
    # A few concurrent clients: 50 threads here would hold the server's GIL past its 200 ms
    # (the 50-client case after a Redis crash is tests/test_quota_fleet.py's, servers apart).
    # A round in which an answer still came late (a loaded machine) is run once more.
    for attempt in (1, 2):
        done = usage_cli(server, tmp_path, "reset", "--project", "acme")
        assert done.returncode == 0, done.stderr
        before = _metric(server.client.get("/metrics").text, fallback_metric)
        accepted, seen = fill(server.url, server.key, clients=3)
        assert set(seen) <= {202, 429}
        if _metric(server.client.get("/metrics").text, fallback_metric) == before:
            assert accepted == 300
            break
        assert attempt == 1, "Redis answered late in two rounds running"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


@EVERY_STORE
@pytest.mark.parametrize("quota_server", ["memory"], indirect=True)
def test_usd_budgets_count_the_cost_of_stored_events(quota_server: Any) -> None:
    server = quota_server(
        {"default": {"usd_per_month": 0.05, "user_usd_per_day": 0.02}},
        quota_budget_refresh_s=0.2,
    )
    h = server.headers()
    spend = [
        prompt_call(uuid.uuid4().hex, user_id="u1", cost_estimate_usd=0.015),
        prompt_call(uuid.uuid4().hex, user_id="u1", cost_estimate_usd=0.015),
        prompt_call(uuid.uuid4().hex, user_id="u2", cost_estimate_usd=0.01),
    ]
    for event in spend:
        event.pop("timestamp")  # now: this month, this day
    assert (
        server.client.post("/v1/events/batch", json={"events": spend}, headers=h).status_code == 202
    )
    server.flush()
    principal = Principal("acme", frozenset({"admin"}))

    def check(user: str | None) -> Problem | None:
        future = asyncio.run_coroutine_threadsafe(
            server.wl.check_quota(principal, 0, user, "/chat"), server.wl._loop
        )
        try:
            future.result(10)
        except Problem as exc:
            return exc
        return None

    over = check("u1")  # spent 0.03 today, over the 0.02 a user may spend a day
    assert over is not None and over.status == 429
    assert over.field == "user_id" and "u1" in over.message
    assert check("u2") is None  # 0.01
    # The project has spent 0.04 of 0.05; one more cent and it is over its month.
    more = [prompt_call(uuid.uuid4().hex, user_id="u3", cost_estimate_usd=0.02)]
    more[0].pop("timestamp")
    assert (
        server.client.post("/v1/events/batch", json={"events": more}, headers=h).status_code == 202
    )
    server.flush()
    deadline = time.monotonic() + 10
    while (denied := check("u2")) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the cached spend is read again in the background
    assert denied is not None and denied.field == "project"
    assert "monthly budget" in denied.message
    # Ingestion itself is never refused for spend: recording what was spent must go on.
    assert server.client.post("/v1/events/batch", json=events(1), headers=h).status_code == 202
    usage = server.client.get("/v1/usage", headers=h).json()
    assert usage["spent_usd_this_month"] == pytest.approx(0.06)


CASES = [
    # (limits, used, n)
    ((10, 0, 0, 0), (0.0, 0, 0, 0), 10),
    ((10, 0, 0, 0), (9.5, 0, 0, 0), 1),
    ((10, 0, 0, 0), (3.0000000001, 0, 0, 0), 7),
    ((0, 100, 1000, 0), (0.0, 95, 10, 0), 6),
    ((0, 100, 1000, 0), (0.0, 10, 995, 0), 5),
    ((60, 100, 1000, 500), (59.0, 10, 10, 500), 1),
    ((60, 0, 0, 0), (30.0, 0, 0, 0), 61),
    ((0, 0, 0, 0), (0.0, 0, 0, 0), 3),
]


@pytest.mark.parametrize(("limits", "used", "n"), CASES)
def test_the_lua_script_decides_as_the_memory_backend(
    redis_server: RedisServer, limits: tuple[int, int, int, int], used: Any, n: int
) -> None:
    """The two backends apply one rule: the same state and batch give the same answer."""
    expected = decide(n, limits, used)
    plan = Plan(
        events_per_minute=limits[0] or None,
        events_per_day=limits[1] or None,
        events_per_month=limits[2] or None,
        payload_bytes_per_month=limits[3] or None,
    )

    async def run() -> Any:
        backend = RedisUsage(redis_server.url, 1.0)
        p = periods()
        await backend.set(
            "p1", p, {"minute": used[0], "day": used[1], "month": used[2], "payload_bytes": used[3]}
        )
        outcome, _ = await backend.check("p1", n, "x", plan, p)
        memory = MemoryUsage()
        await memory.set(
            "p1", p, {"minute": used[0], "day": used[1], "month": used[2], "payload_bytes": used[3]}
        )
        mem_outcome, _ = await memory.check("p1", n, "x", plan, p)
        await backend.close()
        return outcome, mem_outcome

    outcome, mem_outcome = asyncio.run(run())
    allowed, fit, _, remaining, retry_ms, reset_ms = expected
    for got in (outcome, mem_outcome):
        assert got.allowed == allowed and got.fit == fit
        assert got.remaining == remaining
        # Redis's clock moves between set and check: a few ms of drain at most.
        assert abs(got.retry_ms - retry_ms) <= 50 and abs(got.minute_reset_ms - reset_ms) <= 50


class RefusesThree:
    """Another quota plugin, asked before the built-in one (registered after it)."""

    @hookimpl
    def check_quota(self, principal: Principal, n_events: int) -> Any:
        from watchllm_ext.quota import QuotaDecision

        return QuotaDecision(False, reason="three is refused here") if n_events == 3 else None


@pytest.mark.parametrize("quota_server", ["memory"], indirect=True)
def test_a_batch_another_plugin_refuses_is_not_counted(quota_server: Any) -> None:
    away_from_period_end()
    server = quota_server({"default": {"events_per_day": 10}}, plugin_objects=(RefusesThree(),))
    h = server.headers()
    refused = server.client.post("/v1/events/batch", json=events(3), headers=h)
    assert refused.status_code == 429 and refused.json()["message"] == "three is refused here"
    assert server.client.post("/v1/events/batch", json=events(2), headers=h).status_code == 202
    assert server.client.get("/v1/usage", headers=h).json()["used"]["day"] == 2


def test_redis_counters_expire_after_their_period(redis_server: RedisServer) -> None:
    """Counters clean up after themselves: each gets an expiry past its period's end."""
    plan = Plan(events_per_minute=100, events_per_day=1_000, events_per_month=10_000)

    async def run() -> None:
        backend = RedisUsage(redis_server.url, 1.0)
        p = periods()
        for _ in range(3):
            outcome, _ = await backend.check("p2", 2, "x", plan, p)
            assert outcome.allowed
        await backend.set("p2", p, {"payload_bytes": 10})
        client = backend._redis()
        minute, day, month, payload = keys("p2", p)
        assert await client.get(day) == b"6" and await client.get(month) == b"6"
        assert 0 < await client.ttl(day) <= p.day_ttl_s
        assert 0 < await client.ttl(month) <= p.month_ttl_s
        assert 0 < await client.ttl(payload) <= p.month_ttl_s
        assert 0 < await client.pttl(minute) <= 61_000
        await backend.close()

    asyncio.run(run())


# --- the check's own Redis connection (watchllm_ext/quotas/resp.py) ---------------------------


def test_resp_replies_are_read_whole_however_they_arrive() -> None:
    """Replies split anywhere (TCP gives no message boundaries) are read only once complete."""
    reply = b"*4\r\n:1\r\n$5\r\nab\r\nc\r\n$-1\r\n*2\r\n+OK\r\n-NOSCRIPT no script\r\n"
    for cut in range(len(reply)):
        replies = Replies()
        replies.feed(reply[:cut])
        assert replies.next() is INCOMPLETE, cut
        replies.feed(reply[cut:] + b":7\r\n")
        value = replies.next()
        assert value[:3] == [1, b"ab\r\nc", None], cut
        assert value[3][0] == b"OK" and isinstance(value[3][1], ReplyError)
        assert str(value[3][1]) == "NOSCRIPT no script"
        assert replies.next() == 7 and replies.next() is INCOMPLETE
    assert (
        encode(["EVALSHA", "ab", 2, 1.5])
        == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n1.5\r\n"
    )
    # TLS stays with redis-py (its SSL options); plain TCP and unix sockets use this client.
    assert RespClient.supports("redis://:pw@h:6380/2") and RespClient.supports("unix:///r.sock")
    assert not RespClient.supports("rediss://h:6380/0")
    assert not RespClient.supports("redis://h:6380/0?socket_keepalive=true")  # redis-py's


def test_concurrent_checks_share_one_pipelined_connection(redis_server: RedisServer) -> None:
    """500 checks at once from one process: one connection, each reply to its own check (the
    remaining counts are all different), the count exact."""
    plan = Plan(events_per_day=10_000)

    async def run() -> list[int]:
        backend = RedisUsage(redis_server.url, 5.0)
        p = periods()
        outcomes = await asyncio.gather(
            *(backend.check("p3", 1 + i % 3, "x", plan, p) for i in range(500))
        )
        await backend.close()
        return [o.remaining[1] for o, _ in outcomes]

    with redis.Redis.from_url(redis_server.url) as client:
        connections = client.info("stats")["total_connections_received"]
        remaining = asyncio.run(run())
        assert client.info("stats")["total_connections_received"] == connections + 1
        used = sum(1 + i % 3 for i in range(500))
        assert client.get(keys("p3", periods())[1]) == str(used).encode()
    assert len(set(remaining)) == 500
    assert min(remaining) == 10_000 - used


def test_a_flushed_script_is_sent_whole_and_a_restarted_redis_reconnected(
    redis_server: RedisServer,
) -> None:
    plan = Plan(events_per_day=100)

    async def run() -> None:
        backend = RedisUsage(redis_server.url, 5.0)
        p = periods()
        assert (await backend.check("p4", 1, "x", plan, p))[0].remaining[1] == 99
        with redis.Redis.from_url(redis_server.url) as client:
            client.script_flush()
        assert (await backend.check("p4", 1, "x", plan, p))[0].remaining[1] == 98
        # A connection closing (its connection_lost not delivered yet) takes no command; the
        # next check opens another.
        closing = backend._fast.ready()  # type: ignore[union-attr]
        assert closing is not None
        closing.close()
        with pytest.raises(ConnectionLost):
            closing.send(b"*1\r\n$4\r\nPING\r\n")
        assert (await backend.check("p4", 1, "x", plan, p))[0].remaining[1] == 97
        redis_server.kill()
        with pytest.raises(QuotaUnavailable) as down:
            await backend.check("p4", 1, "x", plan, p)
        assert not down.value.slow  # refused or reset: not there, rather than slow
        redis_server.start()  # fresh and empty: no script loaded, no count
        assert (await backend.check("p4", 1, "x", plan, p))[0].remaining[1] == 99
        await backend.close()

    asyncio.run(run())


def test_password_database_and_unix_socket_urls(tmp_path: Path) -> None:
    socket_path = tmp_path / "r.sock"
    server = RedisServer(
        tmp_path / "redis", "--requirepass", "s3cret", "--unixsocket", str(socket_path)
    ).start()
    plan = Plan(events_per_day=100)
    try:

        async def run(url: str, n: int) -> Outcome:
            backend = RedisUsage(url, 5.0)
            try:
                return (await backend.check("p5", n, "x", plan, periods()))[0]
            finally:
                await backend.close()

        tcp = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        assert asyncio.run(run(tcp, 2)).remaining[1] == 98
        assert asyncio.run(run(f"unix://:s3cret@{socket_path}?db=3", 3)).remaining[1] == 95
        with redis.Redis.from_url(tcp) as client:
            assert client.get(keys("p5", periods())[1]) == b"5"  # both in database 3
        with pytest.raises(QuotaUnavailable, match=r"WRONGPASS|invalid"):
            asyncio.run(run(f"redis://:wrong@127.0.0.1:{server.port}/3", 1))
    finally:
        server.stop()


def test_a_stuck_connection_is_dropped_and_its_checks_reported_lost(
    redis_server: RedisServer,
) -> None:
    """A check given up at its timeout stays in flight; one with no answer for
    max(1 s, 10 x timeout) means a stuck connection: it is closed and the checks on it are
    reported LOST (Redis may or may not have run them)."""
    plan = Plan(events_per_day=100)
    late: list[Any] = []

    async def run() -> None:
        backend = RedisUsage(redis_server.url, 0.05)
        p = periods()
        await backend.check("p6", 1, "x", plan, p)
        with redis.Redis.from_url(redis_server.url) as client:
            client.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        with pytest.raises(QuotaUnavailable) as slow:
            await backend.check("p6", 1, "x", plan, p)
        assert slow.value.slow and slow.value.request is not None
        slow.value.request.on_late = late.append
        await asyncio.sleep(1.2)
        with pytest.raises(QuotaUnavailable):
            await backend.check("p6", 1, "x", plan, p)  # a new connection: Redis still paused
        assert late == [LOST]
        await asyncio.sleep(1.5)
        assert (await backend.check("p6", 1, "x", plan, p))[0].allowed
        await backend.close()

    asyncio.run(run())


class RefusesSevenTokens:
    """A plugin validator: refuses events with tokens_input == 7 (a 207 from the plugin)."""

    @hookimpl
    def validate_event(self, event: Any, principal: Principal) -> str | None:
        return "seven is refused here" if event.tokens_input == 7 else None


@with_backends
def test_usage_counts_only_the_events_accepted(quota_server: Any) -> None:
    """Refused events are given back (the refund_quota hook): a 422 adds nothing, a 207 adds
    what it accepted, on every JSON route, small body or big, schema or plugin refusal."""
    away_from_period_end()
    server = quota_server(
        {"default": {"events_per_day": 100, "events_per_month": 1_000}},
        plugin_objects=(RefusesSevenTokens(),),
    )
    h = server.headers()

    def used() -> tuple[int, int]:
        body = server.client.get("/v1/usage", headers=h).json()["used"]
        return body["day"], body["month"]

    def post(path: str, payload: Any) -> httpx.Response:
        return server.client.post(path, json=payload, headers=h)

    invalid = {"event_type": "bogus"}
    assert post("/v1/events/batch", {"events": [invalid] * 10}).status_code == 422
    assert used() == (0, 0)
    mixed = post("/v1/events/batch", {"events": [prompt_call(uuid.uuid4().hex)] + [invalid] * 9})
    assert mixed.status_code == 207 and mixed.json()["accepted"] == 1
    assert used() == (1, 1)
    # A plugin validator's refusal (the valid-JSON path) is given back as well.
    refused_one = events(2)["events"] + [prompt_call(uuid.uuid4().hex, tokens_input=7)]
    plugin = post("/v1/events/batch", {"events": refused_one})
    assert plugin.status_code == 207 and plugin.json()["accepted"] == 2
    assert used() == (3, 3)
    # The one-event route, and an array on it.
    assert post("/v1/projects/acme/events", invalid).status_code == 422
    one_bad = post("/v1/projects/acme/events", [invalid, prompt_call(uuid.uuid4().hex)])
    assert one_bad.status_code == 207
    assert used() == (4, 4)
    # Bodies of 64 KiB or more (validated on a worker thread): invalid JSON events, then
    # valid ones a plugin refuses part of.
    big = "x" * 2_000
    slow = [prompt_call(uuid.uuid4().hex, prompt=big) for _ in range(40)] + [invalid]
    assert post("/v1/events/batch", {"events": slow}).json()["accepted"] == 40
    fast = [prompt_call(uuid.uuid4().hex, prompt=big, tokens_input=7) for _ in range(35)]
    fast += [prompt_call(uuid.uuid4().hex, prompt=big) for _ in range(5)]
    assert post("/v1/events/batch", {"events": fast}).json()["accepted"] == 5
    assert used() == (49, 49)
    # Another project's event refuses the batch whole (403): nothing taken.
    other = post("/v1/events/batch", {"events": [prompt_call(uuid.uuid4().hex, project_id="beta")]})
    assert other.status_code == 403
    assert used() == (49, 49)
    # In-process ingestion (the SDK's and the middleware's way in): the same.
    with pytest.raises(Problem) as refused:
        server.wl.ingest_from_thread(server.key, [invalid] * 3, 30)
    assert refused.value.status == 422
    taken = server.wl.ingest_from_thread(server.key, [invalid, prompt_call(uuid.uuid4().hex)], 30)
    assert taken["accepted"] == 1
    assert used() == (50, 50)
    # The check before validation still refuses what would not fit, valid or not: 429 with
    # its headers, nothing counted.
    over = post("/v1/events/batch", {"events": [invalid] * 51})
    assert over.status_code == 429 and over.json()["would_fit"] == 50
    assert over.headers["X-RateLimit-Remaining"] == "50" and "Retry-After" in over.headers
    assert used() == (50, 50)


def _otlp_json(n: int) -> dict[str, Any]:
    """OTLP JSON: one trace of `n` plain (non-LLM) spans, their times set and valid."""
    trace = uuid.uuid4().hex
    start = time.time_ns() - 10**9
    spans = [
        {
            "traceId": trace,
            "spanId": f"{i + 1:016x}",
            "name": f"step {i}",
            "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(start + 1_000_000),
        }
        for i in range(n)
    ]
    return {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}


@pytest.mark.parametrize("quota_server", ["memory"], indirect=True)
def test_spans_refused_whole_are_given_back(quota_server: Any) -> None:
    """OTLP spans refused after the quota check (here 503: the log is full) take nothing:
    exporters retry 503, and every retry used to be counted again."""
    away_from_period_end()
    server = quota_server({"default": {"events_per_day": 100}}, buffer_max_events=4)
    h = server.headers()

    def used_today() -> int:
        return int(server.client.get("/v1/usage", headers=h).json()["used"]["day"])

    for _ in range(3):  # an exporter's retries
        refused = server.client.post("/v1/traces", json=_otlp_json(10), headers=h)
        assert refused.status_code == 503
    assert used_today() == 0
    taken = server.client.post("/v1/traces", json=_otlp_json(3), headers=h)
    assert taken.status_code == 200 and "rejectedSpans" not in taken.json().get(
        "partialSuccess", {}
    )
    assert used_today() == 3
