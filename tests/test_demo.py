"""`watchllm demo`: a realistic sample, valid, deterministic, and visible in the analytics API
of a real server right after the command returns."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import Running, free_port
from stores import EVERY_STORE
from test_cli import WATCHLLM, cli
from test_cli_light import CLIENT_ONLY  # the base install: no server package imports

from watchllm_ext.demo import build
from watchllm_ext.schema import EVENT_LIST_ADAPTER

NOW = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)


def test_sample_is_valid_varied_and_deterministic() -> None:
    sample = build(700, seed=7, now=NOW)
    events = sample.events
    assert len(events) == 700
    EVENT_LIST_ADAPTER.validate_python(events)
    assert build(700, seed=7, now=NOW).events == events  # same seed, same minute
    assert build(700, seed=8, now=NOW).events != events
    later = build(700, seed=7, now=NOW + timedelta(minutes=1)).events
    assert not {e["event_id"] for e in later} & {e["event_id"] for e in events}
    assert len({e["event_id"] for e in events}) == 700

    times = [datetime.fromisoformat(e["timestamp"]) for e in events]
    assert min(times) >= NOW - timedelta(days=7) and max(times) <= NOW
    assert max(times) - min(times) > timedelta(days=5)  # spread over the week
    assert sum(t > NOW - timedelta(days=1) for t in times) > 100  # the default 24 h window
    calls = [e for e in events if e["event_type"] == "prompt_call"]
    assert len({e["model"] for e in calls}) >= 4 and len({e["provider"] for e in calls}) >= 3
    assert any(e["status"] != "success" for e in calls)
    assert any(e["latency_ms"] >= 8000 for e in calls)
    assert {e["event_type"] for e in events} >= {
        "prompt_call",
        "tool_call",
        "agent_step",
        "error",
        "performance_alert",
    }
    # Every parent named is an earlier event of the same run (no orphan after the cut).
    seen: dict[str, str] = {}
    for e in events:
        if e.get("parent_event_id"):
            assert seen[e["parent_event_id"]] == e["run_id"]
        seen[e["event_id"]] = e["run_id"]
    by_id = {e["event_id"]: e for e in events}
    tools = [e for e in events if e["event_type"] == "tool_call"]
    assert tools and all(by_id[t["parent_event_id"]]["event_type"] == "prompt_call" for t in tools)


def _demo(server: Running, seed: int) -> subprocess.CompletedProcess[str]:
    """`watchllm demo --events 600` into the server's project, as a user runs it."""
    done = cli(
        "demo",
        "--events",
        "600",
        "--seed",
        str(seed),
        env={"WATCHLLM_BASE_URL": server.url, "WATCHLLM_API_KEY": server.key},
    )
    assert done.returncode == 0, done.stderr
    return done


@EVERY_STORE
def test_demo_fills_the_analytics_api(server: Running) -> None:
    done = _demo(server, seed=3)
    out = done.stdout
    assert re.search(
        r"Loaded 600 demo events \(\d+ runs over the last 7 days\) into project acme", out
    )
    assert "All 600 demo events are in the store now (project acme holds 600 events" in out
    # Right after the command: no waiting here, the command waited for the writer's flush.
    since = re.search(r"from=(\S+?)\"", out)
    assert since, out
    q = {"project_id": "acme", "from": since.group(1)}

    def get(path: str, ranged: bool = True, **params: Any) -> Any:
        base = q if ranged else {"project_id": q["project_id"]}  # a run has no time range
        r = server.client.get(path, params={**base, **params}, headers=server.headers())
        assert r.status_code == 200, r.text
        return r.json()

    stats = get("/v1/analytics/stats")
    assert stats["total_events"] == 600
    assert len(stats["events_by_type"]) >= 6
    assert len(stats["top_models"]) >= 4
    assert 0 < stats["error_rate"] < 0.5 and stats["total_cost"] > 0
    assert stats["latency_ms"]["p99"] >= 8000  # the slow calls

    errors = get("/v1/analytics/logs", status="error", limit="50")["events"]
    assert errors and all(e["status"] == "error" for e in errors)
    runs = get("/v1/analytics/runs", limit="1000")["runs"]
    assert len(runs) > 50 and any(r["error_count"] for r in runs)

    # A second sample into the project that holds the first: the command waits for its own
    # events (the project's count passed 600 at once), and says what the project holds.
    again = _demo(server, seed=4)
    assert "project acme holds 1200 events since the sample's first" in again.stdout, again.stdout
    assert get("/v1/analytics/stats")["total_events"] == 1200

    run_id = re.search(r"/v1/analytics/runs/(\S+?)\?", out)
    assert run_id, out
    tree = get(f"/v1/analytics/runs/{run_id.group(1)}", ranged=False)["tree"]

    def walk(nodes: list[dict[str, Any]], parent: str | None) -> list[tuple[str | None, str]]:
        found = []
        for node in nodes:
            if node["event"]:
                found.append((parent, node["event"]["event_type"]))
                found += walk(node["children"], node["event"]["event_type"])
        return found

    pairs = walk(tree, None)
    assert ("prompt_call", "tool_call") in pairs and ("agent_step", "prompt_call") in pairs


def test_demo_errors_are_one_line(tmp_path: Any) -> None:
    down = cli("demo", "--url", f"http://127.0.0.1:{free_port()}", "--key", "k", "--events", "5")
    assert down.returncode == 1 and "cannot reach" in down.stderr
    assert "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1
    nokey = cli("demo", "--events", "5", env={"WATCHLLM_API_KEY": ""})
    assert nokey.returncode == 2 and "WATCHLLM_API_KEY" in nokey.stderr


def test_demo_with_a_refused_key_names_the_answer(server: Running) -> None:
    bad = cli("demo", "--url", server.url, "--key", "wllm_nope_nope", "--events", "5")
    assert bad.returncode == 1 and "401" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("events", ["0", "many"])
def test_demo_events_must_be_a_count(events: str) -> None:
    bad = cli("demo", "--events", events, "--key", "k")
    assert bad.returncode == 2 and "--events" in bad.stderr


def test_demo_needs_only_the_client_install(server: Running) -> None:
    args = ["--url", server.url, "--key", server.key]
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, "demo", *args, "--events", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Loaded 50 demo events" in done.stdout
    # ...while a server command says which extra it needs, in one line.
    data_dir = server.settings.data_dir
    other = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, "count-rows", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert other.returncode == 1 and "pip install -e '.[server]'" in other.stderr


def test_demo_into_a_pipe_that_closes_early(server: Running) -> None:
    command = " ".join([*WATCHLLM, "demo", "--url", server.url, "--key", server.key])
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command} --events 20 | head -c 10"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout == "Loaded 20 "
    assert done.returncode == 141 and done.stderr == "", done.stderr
