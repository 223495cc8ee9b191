"""What the SDK tells its user when events are lost: every drop is reported in the log (the
first of each reason at once, the rest added up at most every DROP_REPORT_EVERY_S and at
close), close() says which events may still land, and a client made without base_url says
how to reach a server (docs/SDK.md)."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable

import pytest
from conftest import free_port

from watchllm_ext.sdk import WatchLLM, context, core
from watchllm_ext.sdk.transport import no_app_message

Warnings = Callable[[], list[str]]


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Warnings:
    """The SDK's warnings logged so far."""
    caplog.set_level(logging.WARNING, logger="watchllm.sdk")
    return lambda: [
        r.getMessage()
        for r in caplog.records
        if r.name == "watchllm.sdk" and r.levelno >= logging.WARNING
    ]


def down_client(**options: object) -> WatchLLM:
    """A client of a server that is down: a loopback port nothing listens on."""
    options.setdefault("flush_interval_s", 0.05)
    options.setdefault("initial_backoff_s", 0.05)
    options.setdefault("max_backoff_s", 0.05)
    options.setdefault("retry_for_s", 60.0)
    return WatchLLM(api_key="wllm_k", base_url=f"http://127.0.0.1:{free_port()}", **options)


def reported(lines: list[str], reason: str) -> int:
    """The events the drop warnings of one reason add up to."""
    counts = [
        re.match(r"WatchLLM dropped ([\d,]+) (?:more )?event", line)
        for line in lines
        if f"event(s) ({reason})" in line
    ]
    return sum(int(m.group(1).replace(",", "")) for m in counts if m)


def test_a_burst_of_queue_full_drops_is_reported_whole_at_close(warnings: Warnings) -> None:
    """25,000 events into a 10,000-event buffer: one warning at the first drop, none in the
    loop, and close() reports the 14,999 others (it used to say "dropped 1 event(s)")."""
    client = down_client(flush_at=100_000, flush_interval_s=60)  # the worker does not take any
    for i in range(25_000):
        client.log_tool_call("t", tool_input=i)
    assert client.stats()["dropped"]["queue_full"] == 15_000
    (first,) = warnings()
    assert first.startswith("WatchLLM dropped 1 event(s) (queue_full): the buffer holds 10000")
    client.close(0.2)
    assert client._worker is not None
    client._worker.join(5)
    lines = warnings()
    assert any(
        "WatchLLM dropped 14,999 more event(s) (queue_full) since its last report" in line
        for line in lines
    ), lines
    assert reported(lines, "queue_full") == 15_000
    # The buffered ones are counted by close()'s own warning, not a second time.
    assert reported(lines, "shutdown") == 0
    assert "close() ran out of time" in lines[-1], lines


def test_drops_are_reported_again_once_the_interval_has_passed(
    warnings: Warnings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By the logging thread at its next drop, or by the worker when none comes."""
    monkeypatch.setattr(core, "DROP_REPORT_EVERY_S", 0.3)
    client = down_client(max_queue=1)
    client.log_tool_call("held by the worker")
    deadline = time.monotonic() + 5
    while client.stats()["retries"] == 0:  # the worker holds it, retrying: the buffer is empty
        assert time.monotonic() < deadline, client.stats()
        time.sleep(0.01)
    client.log_tool_call("buffered")
    for _ in range(5):
        client.log_tool_call("dropped")
    assert len(warnings()) == 1 and "dropped 1 event(s) (queue_full)" in warnings()[0]
    deadline = time.monotonic() + 5
    while len(warnings()) == 1:  # the worker, between two tries, reports the 4 others
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "dropped 4 more event(s) (queue_full) since its last report" in warnings()[1]
    time.sleep(0.35)
    client.log_tool_call("dropped")  # the interval has passed: reported at once
    assert len(warnings()) == 3 and "dropped 1 more event(s)" in warnings()[2]
    client.log_tool_call("dropped")
    assert len(warnings()) == 3  # within the interval: added up
    client.close(0.1)
    assert reported(warnings(), "queue_full") == client.stats()["dropped"]["queue_full"] == 7


def test_close_does_not_say_events_waiting_for_a_retry_may_still_land(
    warnings: Warnings,
) -> None:
    """The server is down: the worker holds the batch only to wait between tries, and close()
    drops it (it used to say "10 in a request under way may still land")."""
    client = down_client(initial_backoff_s=60, max_backoff_s=60)
    for i in range(10):
        client.log_tool_call("t", tool_input=i)
    deadline = time.monotonic() + 5
    while client.stats()["retries"] == 0:  # tried once: now waiting (up to 60 s) to try again
        assert time.monotonic() < deadline, client.stats()
        time.sleep(0.01)
    assert client.close(0.3) is False
    said = warnings()[-1]
    assert "with 10 event(s) not delivered: 10 are dropped (shutdown)" in said, said
    assert "may still land" not in said and "Connection refused" in said
    assert client._worker is not None
    client._worker.join(5)
    assert client.stats()["dropped"]["shutdown"] == 10


def test_close_says_a_request_under_way_may_still_land(warnings: Warnings) -> None:
    """A server that takes the connection and has not answered yet."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # never accepted: the request is sent, no answer comes
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = WatchLLM(api_key="wllm_k", base_url=url, flush_interval_s=0.05, timeout_s=5)
        for i in range(10):
            client.log_tool_call("t", tool_input=i)
        deadline = time.monotonic() + 5
        while client._sending == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.close(0.2) is False
        said = warnings()[-1]
    assert "with 10 event(s) not delivered: 10 in a request under way may still land" in said, said


HINT = (
    'pass base_url="http://127.0.0.1:8787" (where `watchllm serve` listens)'
    " or set WATCHLLM_BASE_URL"
)


@pytest.fixture
def no_app_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with a key, no base URL, and no WatchLLM app (another test may have run one)."""
    monkeypatch.delenv("WATCHLLM_BASE_URL", raising=False)
    monkeypatch.setattr(context, "_ever_ran", False)
    assert context.local_apps() == []


def local_client(**options: object) -> WatchLLM:
    options.setdefault("flush_interval_s", 0.05)
    options.setdefault("initial_backoff_s", 0.05)
    options.setdefault("max_backoff_s", 0.05)
    client = WatchLLM(api_key="wllm_k", **options)
    assert client.transport_name == "local"
    return client


def test_a_client_without_base_url_says_how_to_reach_a_server(
    warnings: Warnings, no_app_ever: None
) -> None:
    """It used to retry "503 no WatchLLM app runs in this process yet", then drop, unexplained."""
    client = local_client(retry_for_s=0.3)
    client.log_tool_call("t")
    assert client.flush(10)
    stats = client.stats()
    assert stats["dropped"]["retries_exhausted"] == 1 and HINT in stats["last_error"], stats
    (said,) = [line for line in warnings() if "(retries_exhausted)" in line]
    assert "no WatchLLM app runs in this process yet" in said and HINT in said, said
    assert "or mount WatchLLM in this process" in said
    client.close(0.1)


def test_close_says_it_too_even_after_other_drops(warnings: Warnings, no_app_ever: None) -> None:
    client = local_client(retry_for_s=60, max_queue=5)
    client.log_tool_call("t")
    deadline = time.monotonic() + 5
    while client.stats()["retries"] == 0:
        assert time.monotonic() < deadline, client.stats()
        time.sleep(0.01)
    for _ in range(10):
        client.log_tool_call("t")  # 5 dropped: last_error is now the full buffer's
    assert client.stats()["last_error"].startswith("queue_full")
    assert client.close(0.2) is False
    said = warnings()[-1]
    assert "close() ran out of time" in said and HINT in said, said


def test_the_message_once_an_app_has_run_or_with_transport_local(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(context, "_ever_ran", False)
    chosen = no_app_message(chosen=True)
    assert "made with transport='local': mount WatchLLM in this process" in chosen, chosen
    monkeypatch.setattr(context, "_ever_ran", True)
    assert no_app_message(chosen=False) == (
        "no WatchLLM app runs in this process now (the one that ran has stopped)"
    )
