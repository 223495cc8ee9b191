"""The SDK end to end through a real `watchllm serve`-style server (uvicorn on loopback, chDB):
every log method, runs and nesting, @observe on each kind of function, context across threads
and tasks, and the tree the analytics API shows."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from typing import Any

import pytest
from conftest import Running
from stores import EVERY_STORE

from watchllm_ext.sdk import AsyncWatchLLM, WatchLLM, current_run, observe


def sdk(server: Running, **options: Any) -> WatchLLM:
    options.setdefault("flush_interval_s", 0.05)
    return WatchLLM(api_key=server.key, base_url=server.url, **options)


def tree(server: Running, run_id: str) -> list[dict[str, Any]]:
    answer = server.client.get(f"/v1/analytics/runs/{run_id}", headers=server.headers())
    assert answer.status_code == 200, answer.text
    return answer.json()["tree"]


def names(server: Running, run_id: str) -> dict[str, str]:
    """Each event of the run by id: its step, tool or error name, as the run tree's event
    summaries give them."""
    named: dict[str, str] = {}

    def walk(nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            event = node["event"]
            named[node["id"]] = event["step_name"] or event["tool_name"] or event["error_type"]
            walk(node["children"])

    walk(tree(server, run_id))
    return named


def shape(nodes: list[dict[str, Any]], named: dict[str, str]) -> list[Any]:
    """A tree as (event_type, name, [children]) tuples, siblings sorted: the tree orders them
    by time, stored in milliseconds, so two siblings of one millisecond come in any order."""
    return sorted(
        (
            (node["event"]["event_type"], named[node["id"]], shape(node["children"], named))
            for node in nodes
        ),
        key=repr,
    )


@EVERY_STORE
def test_every_method_arrives(server: Running) -> None:
    client = sdk(server, env="staging", release="1.2.3")
    with client.run(name="all-types", user_id="u-1", tags=["sdk"]) as run:
        ids = [
            client.log_prompt_call(
                model="gpt-4o",
                provider="openai",
                prompt=[{"role": "user", "content": "hi"}],
                response="hello",
                tokens_input=10,
                tokens_output=20,
                latency_ms=12.5,
            ),
            client.log_tool_call("search", tool_input={"q": "x"}, tool_output=[1, 2]),
            client.log_agent_step(1, step_name="plan", reasoning="because"),
            client.log_error(ValueError("boom")),
            client.log_assertion_failed("is_json", expected="{}", actual="nope"),
            client.log_hallucination_detected("judge", 0.9, "the sky is green"),
            client.log_cost_threshold_exceeded(10.0, 12.5, "1d"),
            client.log_performance_alert("latency_p95_ms", 1000.0, 1500.0, "5m"),
        ]
    assert client.flush(10)
    stats = client.stats()
    assert stats["sent"] == 9 and stats["dropped_total"] == 0, stats  # 8 + the run's root
    server.flush()
    rows = server.query(
        "SELECT event_type, parent_event_id, user_id, env, release, tags FROM events"
        " WHERE run_id = {r:String} ORDER BY event_type",
        {"r": run.run_id},
    )
    assert len(rows) == 9
    assert {r["event_type"] for r in rows} == {
        "prompt_call",
        "tool_call",
        "agent_step",
        "error",
        "assertion_failed",
        "hallucination_detected",
        "cost_threshold_exceeded",
        "performance_alert",
    }
    assert all(r["user_id"] == "u-1" and r["env"] == "staging" for r in rows)
    assert all(r["release"] == "1.2.3" and "sdk" in r["tags"] for r in rows)
    nodes = tree(server, run.run_id)
    assert len(nodes) == 1 and names(server, run.run_id)[nodes[0]["id"]] == "all-types"
    assert sorted(c["id"] for c in nodes[0]["children"]) == sorted(ids)
    # The priced cost came from the server's tables (the SDK sent tokens, not a cost).
    cost = server.query("SELECT cost_source FROM events WHERE event_id = {e:String}", {"e": ids[0]})
    assert cost == [{"cost_source": "computed"}]
    client.close()


@observe(name="lookup", as_type="tool_call")
def lookup(city: str) -> dict[str, str]:
    return {"city": city, "weather": "sunny"}


@observe
def numbers(n: int) -> Any:
    for i in range(n):
        lookup(str(i))
        yield i


@observe
async def fetch(x: int) -> int:
    await asyncio.sleep(0)
    lookup("async")
    return x * 2


@observe
async def stream(n: int) -> Any:
    for i in range(n):
        await fetch(i)
        yield i


@observe
def fails() -> None:
    lookup("before the error")
    raise KeyError("missing")


@observe
def agent(question: str) -> str:
    lookup("paris")
    assert list(numbers(2)) == [0, 1]
    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(lookup, "thread"))
    worker.start()
    worker.join()

    async def both() -> list[Any]:
        # Two tasks: each inherits the current run; one observed async generator.
        got = await asyncio.gather(fetch(1), fetch(2))
        return [*got, [i async for i in stream(1)]]

    assert asyncio.run(both()) == [2, 4, [0]]
    with pytest.raises(KeyError):
        fails()
    return "done"


@EVERY_STORE
def test_observe_builds_the_tree(server: Running) -> None:
    client = sdk(server)
    assert agent("q") == "done"
    assert current_run() is None  # nothing leaked out of the decorated calls
    assert client.flush(10), client.stats()
    server.flush()
    runs = server.query("SELECT DISTINCT run_id FROM events WHERE step_name = 'agent'")
    assert len(runs) == 1
    named = names(server, runs[0]["run_id"])
    nodes = tree(server, runs[0]["run_id"])
    assert len(nodes) == 1
    root = nodes[0]
    assert named[root["id"]] == "agent" and root["event"]["status"] == "success"
    kids = shape(root["children"], named)
    lookups = ("tool_call", "lookup", [])
    expected = [
        lookups,
        ("agent_step", "numbers", [lookups, lookups]),
        lookups,  # the thread's call, through copy_context
        ("agent_step", "fetch", [lookups]),
        ("agent_step", "fetch", [lookups]),
        ("agent_step", "stream", [("agent_step", "fetch", [lookups])]),
        ("agent_step", "fails", [("error", "KeyError", []), lookups]),
    ]
    assert sorted(kids, key=repr) == sorted(expected, key=repr)
    failed = [c for c in root["children"] if named[c["id"]] == "fails"]
    assert failed[0]["event"]["status"] == "error"
    errors = server.query("SELECT count() AS n FROM events WHERE event_type = 'error'")
    assert errors == [{"n": 1}]  # one error event, though the exception crossed one frame
    client.close()


def test_run_records_the_exception_and_reraises(server: Running) -> None:
    client = sdk(server)
    with pytest.raises(RuntimeError, match="stop"), client.run(name="broken") as run:
        client.log_tool_call("t")
        raise RuntimeError("stop")
    assert client.flush(10)
    server.flush()
    (root,) = tree(server, run.run_id)
    assert root["event"]["status"] == "error"
    kids = sorted(shape(root["children"], names(server, run.run_id)))
    assert kids == [("error", "RuntimeError", []), ("tool_call", "t", [])]
    client.close()


def test_async_client_and_run(server: Running) -> None:
    async def main() -> str:
        async with AsyncWatchLLM(
            api_key=server.key, base_url=server.url, flush_interval_s=0.05
        ) as client:
            async with client.run(name="async-run") as run:
                await asyncio.gather(*(fetch(i) for i in range(3)))
            assert await client.flush(10)
            assert client.stats()["sent"] == 7
        return run.run_id

    run_id = asyncio.run(main())
    server.flush()
    (root,) = tree(server, run_id)
    assert [c[1] for c in shape(root["children"], names(server, run_id))] == ["fetch"] * 3


def test_strict_raises_at_the_call_site_production_counts(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    strict = sdk(server, strict=True)
    with pytest.raises(ValueError, match="tokens_input"):
        strict.log_prompt_call(model="m", tokens_input=-1)
    with pytest.raises(ValueError, match="nonsense"):
        strict.log_tool_call("t", nonsense=1)
    strict.close()
    relaxed = sdk(server)
    with caplog.at_level(logging.WARNING, logger="watchllm.sdk"):
        relaxed.log_prompt_call(model="m", tokens_input=-1)  # never raises
        relaxed.log_prompt_call(model="m", tokens_input=1)
        assert relaxed.flush(10)
    stats = relaxed.stats()
    assert stats["dropped"]["invalid"] == 1 and stats["sent"] == 1
    assert "tokens_input" in caplog.text
    relaxed.close()


def test_disabled_without_a_key(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.delenv("WATCHLLM_API_KEY", raising=False)
    monkeypatch.delenv("WATCHLLM_BASE_URL", raising=False)
    with caplog.at_level(logging.WARNING, logger="watchllm.sdk"):
        client = WatchLLM()
    assert "disabled" in caplog.text and caplog.text.count("disabled") == 1
    assert not client.enabled
    event_id = client.log_prompt_call(model="m")
    assert isinstance(event_id, str) and client.flush(1)
    assert client.stats()["queued"] == 0
    # A script printing its stats sees why nothing was sent, not a healthy "0 dropped".
    assert client.stats()["last_error"] == (
        "WatchLLM is disabled: no api_key and no WATCHLLM_API_KEY (events are not sent)"
    )
    client.close()
    with caplog.at_level(logging.WARNING, logger="watchllm.sdk"):
        no_url = WatchLLM(api_key="k", transport="http")  # misconfigured: still no exception
    assert not no_url.enabled and "no base_url" in caplog.text
    assert no_url.transport_name == "disabled"
    assert "no base_url" in no_url.stats()["last_error"]
    no_url.close()
    off = WatchLLM(enabled=False)
    assert off.stats()["last_error"] == "disabled (enabled=False)"
    off.close()


def test_from_environment(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHLLM_API_KEY", server.key)
    monkeypatch.setenv("WATCHLLM_BASE_URL", server.url)
    client = WatchLLM(flush_interval_s=0.05)
    assert client.transport_name == "http"
    client.log_tool_call("env")
    assert client.flush(10) and client.stats()["sent"] == 1
    client.close()


def test_sampling_mask_and_metadata_only(server: Running) -> None:
    def mask(event: dict[str, Any]) -> dict[str, Any] | None:
        if event.get("tool_name") == "secret":
            return None
        if isinstance(event.get("response"), str):
            event["response"] = event["response"].replace("alice@example.com", "[email]")
        return event

    masked = sdk(server, mask=mask)
    with masked.run(name="masked") as run1:
        masked.log_prompt_call(model="m", response="mail alice@example.com now")
        masked.log_tool_call("secret", tool_input={"password": "x"})
    assert masked.flush(10)
    masked.close()
    bare = sdk(server, capture_content=False)
    with bare.run(name="bare") as run2:
        bare.log_prompt_call(model="m", prompt="private", response="private", tokens_input=3)
        bare.log_hallucination_detected("judge", 0.5, "private claim")
    assert bare.flush(10)
    bare.close()
    sampled = sdk(server, sample_rate=0.5)
    for _ in range(200):
        with sampled.run():
            sampled.log_tool_call("s")
    assert sampled.flush(10)
    stats = sampled.stats()
    sampled.close()
    server.flush()
    rows = server.query(
        "SELECT event_type, response, tool_name FROM events WHERE run_id = {r:String}"
        " ORDER BY event_type",
        {"r": run1.run_id},
    )
    assert [r["event_type"] for r in rows] == ["agent_step", "prompt_call"]
    assert rows[1]["response"] == "mail [email] now"
    rows = server.query(
        "SELECT prompt, response, claim, tokens_input FROM events WHERE run_id = {r:String}"
        " AND event_type != 'agent_step' ORDER BY event_type",
        {"r": run2.run_id},
    )
    assert all("private" not in str(r) for r in rows), rows
    assert rows[1]["tokens_input"] == 3
    # By run: each run kept whole (its root and its call) or left out whole.
    kept_runs = stats["sent"] // 2
    assert stats["sent"] % 2 == 0 and stats["sampled_out"] == 2 * (200 - kept_runs)
    assert 60 < kept_runs < 140, stats


def test_in_process_transport(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No base_url, an app running in this process: events go straight to its writer. A
    client made before the app starts (at import, in a host app) waits for it."""
    from conftest import ServerThread, make_settings

    from watchllm_ext.app import create_app
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.sdk.context import local_apps

    monkeypatch.delenv("WATCHLLM_BASE_URL", raising=False)
    settings = make_settings(tmp_path)
    keys = KeyStore(settings.keys_path)
    key = keys.create("acme", scope="ingest")
    reader = keys.create("acme", scope="read")
    assert local_apps() == []
    client = WatchLLM(api_key=key, flush_interval_s=0.05, initial_backoff_s=0.05)
    assert client.transport_name == "local"
    with client.run(name="early") as early:
        client.log_tool_call("before the app runs")
    app = create_app(settings)
    # Served on loopback only so the test can read the analytics; the SDK never calls it.
    with ServerThread(app):
        with client.run(name="local") as run:
            client.log_prompt_call(model="gpt-4o", tokens_input=3, tokens_output=4)
        assert client.flush(10), client.stats()
        stats = client.stats()
        assert stats["sent"] == 4 and stats["dropped_total"] == 0 and stats["retries"] >= 1
        refused = WatchLLM(api_key=reader, flush_interval_s=0.05)
        refused.log_tool_call("no ingest scope")
        assert refused.flush(10)
        assert refused.stats()["dropped"]["unauthorized"] == 1
        refused.close()
        wl = app.state.watchllm
        while wl.writer.lag_events():
            time.sleep(0.02)
        rows = wl.store.query(
            "SELECT run_id, count() AS n FROM events WHERE project_id = 'acme'"
            " GROUP BY run_id ORDER BY n"
        )
        assert sorted((r["run_id"], r["n"]) for r in rows) == sorted(
            [(early.run_id, 2), (run.run_id, 2)]
        )
    client.close()


def test_mask_failures_and_odd_values_are_counted_not_raised(server: Running) -> None:
    def mask(event: dict[str, Any]) -> Any:
        if event.get("tool_name") == "raises":
            raise RuntimeError("mask bug")
        if event.get("tool_name") == "list":
            return ["not", "a", "dict"]
        return event

    client = sdk(server, mask=mask)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    client.log_tool_call("raises", tool_input={"password": "hunter2"})
    client.log_tool_call("list")
    client.log_tool_call("cycle", metadata=cycle)
    client.log_tool_call("fine", metadata={"when": object()})  # encoded by str()
    assert client.flush(10)
    stats = client.stats()
    assert stats["dropped"]["mask_error"] == 2 and stats["dropped"]["invalid"] == 1, stats
    assert stats["sent"] == 1 and stats["dropped"]["sdk_error"] == 0
    server.flush()
    rows = server.query("SELECT tool_name FROM events")
    assert rows == [{"tool_name": "fine"}]  # nothing unmasked left the process
    client.close()


def test_many_threads_log_at_once(server: Running) -> None:
    client = sdk(server, flush_at=100)
    with client.run(name="threads") as run:
        workers = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(lambda: [client.log_tool_call("t") for _ in range(500)],),
            )
            for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert client.flush(30)
    stats = client.stats()
    assert stats["logged"] == 4001 and stats["sent"] == 4001 and stats["dropped_total"] == 0
    server.flush()
    rows = server.query(
        "SELECT count() AS n FROM events WHERE run_id = {r:String}", {"r": run.run_id}
    )
    assert rows == [{"n": 4001}]
    client.close()


def test_async_client_inside_a_host_app_on_its_loop(tmp_path: Any) -> None:
    """A route of a host app that mounts WatchLLM logs with AsyncWatchLLM and awaits its
    flush on the app's own event loop: delivered in-process, the loop never blocked."""
    import httpx
    from conftest import ServerThread, make_settings
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from watchllm_ext.app import create_app
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.serving.hosting import lifespan

    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path).create("acme", scope="ingest")
    wl = create_app(settings)
    client = AsyncWatchLLM(api_key=key, transport="local", flush_interval_s=0.05)

    async def work(request: Request) -> JSONResponse:
        with client.run(name="route") as run:
            await fetch(1)
        flushed = await client.flush(10)
        return JSONResponse({"flushed": flushed, "run_id": run.run_id, **client.stats()})

    host = Starlette(routes=[Route("/work", work), Mount("/watchllm", wl)], lifespan=lifespan(wl))
    with ServerThread(host) as thread:
        answer = httpx.get(thread.url + "/work", timeout=30).json()
        assert answer["flushed"] and answer["transport"] == "local", answer
        assert answer["sent"] == 3 and answer["dropped_total"] == 0, answer
        state = wl.state.watchllm
        while state.writer.lag_events():
            time.sleep(0.02)
        rows = state.store.query(
            "SELECT count() AS n FROM events WHERE run_id = {r:String}", {"r": answer["run_id"]}
        )
        assert rows == [{"n": 3}]  # the route's root, fetch, and fetch's lookup
    asyncio.run(client.close())


@observe
def broken_gen() -> Any:
    yield 1
    raise ValueError("gen broke")


@observe
async def broken_agen() -> Any:
    yield 1
    raise ValueError("agen broke")


@observe
def endless() -> Any:
    i = 0
    while True:
        yield i
        i += 1


def test_generators_failing_and_closed_early(server: Running) -> None:
    client = sdk(server)
    with client.run(name="gens") as run:
        with pytest.raises(ValueError, match="gen broke"):
            list(broken_gen())

        async def consume() -> None:
            with pytest.raises(ValueError, match="agen broke"):
                [i async for i in broken_agen()]

        asyncio.run(consume())
        numbers = endless()
        assert [next(numbers) for _ in range(3)] == [0, 1, 2]
        numbers.close()  # closed early: the step ends here, as a success
    assert client.flush(10)
    server.flush()
    named = names(server, run.run_id)
    (root,) = tree(server, run.run_id)
    kids = {named[c["id"]]: c for c in root["children"]}
    assert set(kids) == {"broken_gen", "broken_agen", "endless"}
    for name in ("broken_gen", "broken_agen"):
        assert kids[name]["event"]["status"] == "error"
        assert shape(kids[name]["children"], named) == [("error", "ValueError", [])]
    assert kids["endless"]["event"]["status"] == "success"
    rows = server.query(
        "SELECT observation FROM events WHERE event_id = {e:String}", {"e": kids["endless"]["id"]}
    )
    assert json.loads(rows[0]["observation"]) == {"items": 3, "closed_early": True}
    client.close()


def test_odd_arguments_are_counted_never_raised(server: Running) -> None:
    # Sampling on (the run id 5 is hashed as "5"); run "odd-run" hashes to 0.88: kept.
    client = sdk(server, sample_rate=0.99)
    with client.run(name="odd", run_id="odd-run", tags=["t"], metadata={"a": 1}):
        client.log_tool_call("bad-tags", tags="not-a-list")
        client.log_tool_call("bad-metadata", metadata=[1, 2])
        client.log_tool_call("int-run", run_id=5)
        client.log_error("just a message")
        client.log_tool_call("good", metadata={"b": 2}, tags=["u"])
    assert client.flush(10)
    stats = client.stats()
    # tags and metadata of the wrong type, and a run_id that is not a string
    assert stats["dropped"]["invalid"] == 3, stats
    assert stats["sent"] == 3 and stats["sampled_out"] == 0, stats  # the root, error, good
    server.flush()
    rows = server.query(
        "SELECT tags, metadata, error_type, error_message FROM events"
        " WHERE tool_name = 'good' OR event_type = 'error'"
        " ORDER BY event_type"
    )
    assert rows[0]["error_message"] == "just a message" and rows[0]["error_type"] == "Error"
    assert rows[1]["tags"] == ["t", "u"] and json.loads(rows[1]["metadata"]) == {"a": 1, "b": 2}
    client.close()
