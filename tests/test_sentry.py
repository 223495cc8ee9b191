"""Sentry: WatchLLM's own errors reach a Sentry transport once each, with no event text or
keys in them. The transport is a test one (no network): every envelope is kept in memory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from conftest import prompt_call
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchllm_ext import create_app, hookimpl
from watchllm_ext.observability.sentry import init_sentry, scrub_event
from watchllm_ext.settings import Settings

SECRET_PROMPT = "my-very-private-prompt-text"
DSN = "http://public@127.0.0.1:9/1"


class CaptureTransport(Transport):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            if item.type == "event" and item.payload.json is not None:
                self.events.append(item.payload.json)


def sentry_off() -> None:
    """No client: the SDK is off (for the next test, and for create_app to start its own)."""
    sentry_sdk.get_client().close(timeout=0)
    sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture
def transport() -> Iterator[CaptureTransport]:
    capture = CaptureTransport()
    yield capture
    sentry_off()


class FailingOnce:
    """A sink that refuses its first batch with an error naming the prompt and the key, and a
    route that fails."""

    name = "failing-once"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def register_sinks(self, settings: Settings, store: Any) -> Any:
        return self

    async def write(self, events: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError(f"cannot write {events[0].prompt!r} (key 'wllm_abc_{'x' * 20}')")

    @hookimpl
    def register_routes(self, settings: Settings) -> list[Route]:
        async def boom(request: Request) -> JSONResponse:
            raise ValueError(f"unexpected {SECRET_PROMPT!r}")

        return [Route("/-/boom", boom)]


def started(server_factory: Any, transport: CaptureTransport, plugin: Any, tmp_path: Path) -> Any:
    # The start create_app would make, with the test's transport in place of the network
    # (create_app keeps a client that is running already).
    settings = Settings(data_dir=tmp_path, sentry_dsn=DSN, sentry_environment="test")
    assert init_sentry(settings, transport=transport)
    return server_factory(plugin_objects=(plugin,), sentry_dsn=DSN, sentry_environment="test")


def test_create_app_starts_sentry_from_the_settings(tmp_path: Path) -> None:
    sentry_off()
    try:
        create_app(
            Settings(
                data_dir=tmp_path,
                sentry_dsn=DSN,
                sentry_environment="staging",
                sentry_release="r1",
                sentry_sample_rate=0.5,
            )
        )
        client = sentry_sdk.get_client()
        assert client.is_active()
        assert (client.options["environment"], client.options["release"]) == ("staging", "r1")
        assert client.options["sample_rate"] == 0.5
        assert client.options["before_send"] is scrub_event
    finally:
        sentry_off()


def wait_for(check: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.02)


def test_a_sink_error_is_captured_once_without_prompt_or_key(
    server_factory: Any, transport: CaptureTransport, tmp_path: Path
) -> None:
    sink = FailingOnce()
    server = started(server_factory, transport, sink, tmp_path)
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call("e1", prompt=SECRET_PROMPT)]},
    )
    assert r.status_code == 202
    wait_for(lambda: sink.calls >= 2)  # retried, then delivered
    server.flush()
    sentry_sdk.flush()
    (event,) = transport.events
    (exc,) = event["exception"]["values"]
    assert exc["type"] == "RuntimeError"
    text = json.dumps(event)
    assert SECRET_PROMPT not in text
    assert "wllm_abc_" + "x" * 20 not in text and server.key not in text
    assert exc["value"].startswith("cannot write [redacted]")
    assert any(f.get("function") == "write" for f in exc["stacktrace"]["frames"])
    assert all("vars" not in f for f in exc["stacktrace"]["frames"])


def test_an_unhandled_route_error_is_captured_once(
    server_factory: Any, transport: CaptureTransport, tmp_path: Path
) -> None:
    server = started(server_factory, transport, FailingOnce(), tmp_path)
    r = server.client.get("/-/boom", headers=server.headers())
    assert r.status_code == 500
    sentry_sdk.flush()
    wait_for(lambda: len(transport.events) >= 1)
    time.sleep(0.2)
    (event,) = transport.events
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    text = json.dumps(event)
    assert SECRET_PROMPT not in text and server.key not in text


def test_scrubber_drops_request_data_headers_and_breadcrumbs() -> None:
    event = {
        "request": {
            "url": "http://x/v1/events/batch",
            "data": {"events": [{"prompt": SECRET_PROMPT}]},
            "headers": {"Authorization": "Bearer wllm_k_s", "User-Agent": "sdk"},
            "cookies": {"a": "b"},
        },
        "breadcrumbs": {
            "values": [
                {"message": f"sink failed: {SECRET_PROMPT!r}", "data": {"prompt": SECRET_PROMPT}}
            ]
        },
        "logentry": {"message": "x %s", "params": [SECRET_PROMPT], "formatted": "x"},
        "extra": {"response": SECRET_PROMPT, "count": 3},
    }
    scrubbed = json.dumps(scrub_event(event))
    assert SECRET_PROMPT not in scrubbed and "wllm_k_s" not in scrubbed
    assert event["request"]["headers"]["User-Agent"] == "sdk"
    assert event["extra"]["count"] == 3


def test_no_dsn_no_sentry(tmp_path: Path) -> None:
    assert init_sentry(Settings(data_dir=tmp_path)) is False
    logging.getLogger("watchllm.test").info("nothing is sent")


class FailingTask:
    """A background task that fails once (then ends), naming a prompt in its error."""

    def __init__(self) -> None:
        self.runs = 0

    @hookimpl
    def register_background_tasks(self, settings: Settings, store: Any) -> Any:
        async def task() -> None:
            self.runs += 1
            if self.runs == 1:
                raise RuntimeError(f"could not summarise {SECRET_PROMPT!r}")

        return task


def test_a_background_task_error_is_captured_once(
    server_factory: Any, transport: CaptureTransport, tmp_path: Path
) -> None:
    failing = FailingTask()
    started(server_factory, transport, failing, tmp_path)
    wait_for(lambda: failing.runs >= 2)  # restarted after 1 s, and then done
    sentry_sdk.flush()
    (event,) = transport.events
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert event["logger"] == "watchllm.app"
    assert SECRET_PROMPT not in json.dumps(event)
