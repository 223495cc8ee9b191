"""The SDK's delivery under failure, against a real local HTTP server written for these tests
(it answers 429/503 with Retry-After, 500, 422, 207, 413, hangs, and closes connections) and a
real WatchLLM server that is stopped and started again mid-stream. Also: fork, flush at exit."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import free_port, make_settings

from watchllm_ext.app import create_app
from watchllm_ext.keys import KeyStore
from watchllm_ext.sdk import WatchLLM

# One scripted behaviour per request, in order; "ok" once the script is used up.
# ("status", code, headers, body) | ("hang", seconds) | ("close",) | ("ok",) | ("partial",)
Step = tuple[Any, ...]


class ScriptedServer:
    """A batch endpoint that follows a script, and records every request and event id."""

    def __init__(self, script: list[Step] | None = None, max_events: int | None = None) -> None:
        self.script = list(script or [])
        self.max_events = max_events  # more events than this in one request: 413
        self.requests: list[dict[str, Any]] = []
        self.accepted: Counter[str] = Counter()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                gzipped = self.headers.get("Content-Encoding") == "gzip"
                body = json.loads(gzip.decompress(raw) if gzipped else raw)
                ids = [e["event_id"] for e in body["events"]]
                with outer.lock:
                    step = outer.script.pop(0) if outer.script else ("ok",)
                    self.record = {"at": time.monotonic(), "ids": ids, "gzip": gzipped}
                    self.record["step"] = step[0]
                    outer.requests.append(self.record)
                if step[0] == "hang":
                    time.sleep(step[1])
                    self.close_connection = True
                    return
                if step[0] == "close":
                    self.close_connection = True
                    self.connection.close()
                    return
                if step[0] == "status":
                    self.answer(step[1], step[3], step[2])
                    return
                if outer.max_events is not None and len(ids) > outer.max_events:
                    self.answer(413, {"error": "too_many_events", "message": "too many"}, {})
                    return
                rejected = []
                if step[0] == "partial":
                    rejected = [
                        {
                            "index": 0,
                            "event_id": ids[0],
                            "errors": [{"field": "model", "message": "bad"}],
                        }
                    ]
                kept = ids[len(rejected) :]
                with outer.lock:
                    outer.accepted.update(kept)
                answer: dict[str, Any] = {"accepted": len(kept), "event_ids": kept}
                if rejected:
                    answer["rejected"] = rejected
                self.answer(207 if rejected else 202, answer, {})

            def answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.record["status"] = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def delivered(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted)


@pytest.fixture
def scripted() -> Iterator[Any]:
    made: list[ScriptedServer] = []

    def make(script: list[Step] | None = None, **kw: Any) -> ScriptedServer:
        made.append(ScriptedServer(script, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def client_for(url: str, key: str = "wllm_test", **options: Any) -> WatchLLM:
    options.setdefault("flush_interval_s", 0.02)
    options.setdefault("initial_backoff_s", 0.05)
    options.setdefault("max_backoff_s", 0.2)
    return WatchLLM(api_key=key, base_url=url, **options)


def log_n(client: WatchLLM, n: int) -> list[str]:
    return [client.log_tool_call("t", tool_input={"i": i}) for i in range(n)]


def test_retries_each_retriable_failure_and_delivers_once(scripted: Any) -> None:
    server = scripted(
        [
            ("status", 429, {"Retry-After": "1"}, {"error": "quota_exceeded", "message": "slow"}),
            ("status", 503, {"Retry-After": "0"}, {"error": "overloaded", "message": "full"}),
            ("status", 502, {}, "bad gateway"),
            ("status", 504, {}, "gateway timeout"),
            ("close",),
            ("hang", 1.5),  # longer than timeout_s: the client gives up and sends again
        ]
    )
    client = client_for(server.url, timeout_s=0.5)
    ids = log_n(client, 20)
    assert client.flush(30), client.stats()
    stats = client.stats()
    assert stats["retries"] == 6 and stats["sent"] == 20 and stats["dropped_total"] == 0, stats
    delivered = server.delivered()
    assert set(delivered) == set(ids) and set(delivered.values()) == {1}
    # Every attempt carried the same ids (a retry is idempotent on a real server).
    assert all(sorted(r["ids"]) == sorted(ids) for r in server.requests)
    # Retry-After: 1 was honoured (the next try came a second later, not after the backoff).
    assert server.requests[1]["at"] - server.requests[0]["at"] >= 0.95
    client.close()


def test_refusals_are_not_retried_and_are_counted(
    scripted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rejected = [
        {"index": i, "event_id": None, "errors": [{"field": "tool_name", "message": "too long"}]}
        for i in range(3)
    ]
    server = scripted(
        [
            ("status", 500, {}, {"error": "internal", "message": "it broke"}),
            (
                "status",
                422,
                {},
                {
                    "error": "validation_failed",
                    "message": "no event valid",
                    "accepted": 0,
                    "rejected": rejected,
                },
            ),
            ("partial",),
            (
                "status",
                401,
                {},
                {"error": "unauthorized", "message": "unknown key", "field": "Authorization"},
            ),
        ]
    )
    # Each round's three events go in one request: the flusher must not send the first one alone.
    client = client_for(server.url, flush_at=10_000, flush_interval_s=30)
    for _ in range(4):
        log_n(client, 3)
        assert client.flush(10)
    stats = client.stats()
    assert stats["retries"] == 0 and len(server.requests) == 4, server.requests
    assert stats["dropped"]["server_error"] == 3
    assert stats["dropped"]["rejected"] == 3 + 1
    assert stats["dropped"]["unauthorized"] == 3
    assert stats["sent"] == 2
    text = caplog.text
    assert "422 no event valid" in text and "#0 (tool_name: too long)" in text and "#2" in text
    assert "unknown key" in text and "it broke" in text
    client.close()


def test_413_halves_the_batch(scripted: Any) -> None:
    server = scripted(max_events=3)
    client = client_for(server.url, flush_at=10_000, flush_interval_s=0.5)
    ids = log_n(client, 10)
    assert client.flush(10)
    assert client.stats()["sent"] == 10 and server.delivered() == Counter(ids)
    assert max(len(r["ids"]) for r in server.requests if r["status"] == 202) <= 3
    assert [len(r["ids"]) for r in server.requests if r["status"] == 413] == [10, 5, 5]
    client.close()


def test_batches_by_count_and_bytes_and_gzips(scripted: Any) -> None:
    server = scripted()
    client = client_for(server.url, flush_at=10_000, flush_interval_s=0.3, max_batch_events=10)
    log_n(client, 25)
    assert client.flush(10)
    assert sorted(len(r["ids"]) for r in server.requests) == [5, 10, 10]
    assert all(r["gzip"] for r in server.requests)  # bodies over 1 KB go compressed
    client.close()
    small = scripted()
    client = client_for(small.url, flush_at=10_000, flush_interval_s=0.3, max_batch_bytes=2000)
    for i in range(10):
        client.log_tool_call("t", tool_output="x" * 500, metadata={"i": i})
    assert client.flush(10)
    sizes = [len(r["ids"]) for r in small.requests]
    assert sum(sizes) == 10 and max(sizes) <= 3, sizes
    client.close()


def test_the_host_never_waits_or_raises(scripted: Any) -> None:
    server = scripted([("hang", 3.0)] * 3)
    client = client_for(server.url, timeout_s=1.0, max_queue=50, retry_for_s=60)
    worst = 0.0
    for i in range(200):
        t0 = time.perf_counter()
        client.log_prompt_call(model="m", tokens_input=i)
        worst = max(worst, time.perf_counter() - t0)
    # A log call never waits for the network (a request here takes the 1 s timeout); the
    # bound leaves room for a loaded CI machine's scheduling, far below that second.
    assert worst < 0.3, worst
    stats = client.stats()
    assert stats["dropped"]["queue_full"] >= 150 - client.max_batch_events, stats
    t0 = time.monotonic()
    assert client.flush(0.5) is False  # the server still hangs: flush says so, on time
    assert time.monotonic() - t0 < 1.2
    t0 = time.monotonic()
    client.close(0.5)
    assert time.monotonic() - t0 < 1.2
    client.log_tool_call("after close")  # a no-op, not an error


def test_gives_up_after_retry_for_s(scripted: Any) -> None:
    server = scripted([("status", 503, {}, {"error": "overloaded", "message": "x"})] * 100)
    client = client_for(server.url, retry_for_s=0.5)
    log_n(client, 4)
    assert client.flush(10)
    stats = client.stats()
    assert stats["dropped"]["retries_exhausted"] == 4 and stats["retries"] >= 2, stats
    assert "overloaded" not in (stats["last_error"] or "") or "still failing" in stats["last_error"]
    client.close()


def test_nothing_lost_when_the_server_restarts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    key = KeyStore(settings.keys_path, refresh_s=0.2).create("acme", scope="admin")
    port = free_port()

    def start() -> tuple[uvicorn.Server, threading.Thread, Any]:
        app = create_app(settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        return server, thread, app

    server, thread, _ = start()
    client = client_for(f"http://127.0.0.1:{port}", key, max_backoff_s=0.5, retry_for_s=120)
    sent: list[str] = []
    for round_ in range(3):
        for _ in range(100):
            sent.append(client.log_tool_call("stream", metadata={"round": round_}))
            time.sleep(0.001)
        if round_ == 0:  # killed mid-stream: the SDK keeps what it has and tries again
            server.should_exit = True
            thread.join(30)
        if round_ == 1:
            time.sleep(0.5)
            server, thread, app = start()
    assert client.flush(60), client.stats()
    stats = client.stats()
    assert stats["dropped_total"] == 0 and stats["retries"] >= 1, stats
    wl = app.state.watchllm
    deadline = time.monotonic() + 30
    while wl.writer.lag_events() and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = wl.store.query(
        "SELECT count() AS n, uniqExact(event_id) AS ids FROM events FINAL"
        " WHERE tool_name = 'stream'"
    )
    assert rows == [{"n": 300, "ids": 300}]
    client.close()
    server.should_exit = True
    thread.join(30)


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_fork_parent_and_child_each_send_their_own_once(scripted: Any) -> None:
    server = scripted()
    done = run_python(
        f"""
        import os
        from watchllm_ext.sdk import WatchLLM
        client = WatchLLM(api_key="k", base_url={server.url!r}, flush_interval_s=0.3)
        for i in range(5):
            client.log_tool_call("before", tool_input=i)  # still buffered at the fork
        pid = os.fork()
        who = "child" if pid == 0 else "parent"
        for i in range(5):
            client.log_tool_call(who, tool_input=i)
        ok = client.flush(20) and client.stats()["sent"] == (5 if pid == 0 else 10)
        if pid == 0:
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert ok and os.waitstatus_to_exitcode(status) == 0, client.stats()
        """
    )
    assert done.returncode == 0, done.stderr
    delivered = server.delivered()
    assert len(delivered) == 15 and set(delivered.values()) == {1}, delivered


def test_flushed_at_interpreter_exit(scripted: Any) -> None:
    server = scripted()
    done = run_python(
        f"""
        from watchllm_ext.sdk import WatchLLM
        client = WatchLLM(api_key="k", base_url={server.url!r}, flush_interval_s=60)
        for i in range(30):
            client.log_tool_call("exit", tool_input=i)
        """
    )
    assert done.returncode == 0, done.stderr
    assert len(server.delivered()) == 30


def test_exit_with_the_server_gone_waits_at_most_flush_at_exit_s() -> None:
    port = free_port()  # nothing listens there: every attempt is refused
    code = f"""
        import time
        from watchllm_ext.sdk import WatchLLM
        client = WatchLLM(api_key="k", base_url="http://127.0.0.1:{port}", flush_at_exit_s=1.0)
        for i in range(10):
            client.log_tool_call("lost", tool_input=i)
        print(time.monotonic(), flush=True)
        """
    done = run_python(code)
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    logged_at = float(done.stdout.strip())
    # The exit flush gave up after 1 s (and said what it dropped); interpreter teardown aside.
    assert ended - logged_at < 3.0, ended - logged_at
    assert "with 10 event(s) not delivered" in done.stderr and "Connection refused" in done.stderr


def test_retry_after_as_seconds_or_http_date() -> None:
    from email.utils import formatdate

    from watchllm_ext.sdk.transport import parse_retry_after

    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8 <= in_ten <= 10


def test_the_buffer_is_bounded_in_bytes_too(scripted: Any) -> None:
    server = scripted([("hang", 2.0)])
    client = client_for(server.url, timeout_s=1.0, max_queue_bytes=1_000_000)
    client.log_tool_call("first")  # taken by the worker, which then waits on the hang
    time.sleep(0.2)
    big = "x" * 100_000
    for _ in range(30):
        client.log_prompt_call(model="m", prompt=[{"role": "user", "content": big}])
    stats = client.stats()
    # ~100 KB each: about ten fit in 1 MB, the rest are refused at once and counted.
    assert 8 <= stats["queued"] - 1 <= 10 and stats["queued_bytes"] <= 1_000_000, stats
    assert stats["dropped"]["queue_full"] == 30 - (stats["queued"] - 1), stats
    assert client.flush(20)
    assert client.stats()["sent"] == stats["queued"] and client.stats()["queued_bytes"] == 0
    client.close()


@pytest.mark.parametrize("case", ["no handler", "handle_sigterm=False", "the host's handler"])
def test_sigterm_flushes_what_is_buffered_then_ends_the_process(scripted: Any, case: str) -> None:
    """docker stop, Kubernetes and systemd send SIGTERM, which ends a process without a
    handler before atexit runs: its 2,000 buffered events were lost. The client now flushes
    first and the process still ends by the signal; a host's own handler is left alone (it
    decides how to exit), as is a client made with handle_sigterm=False."""
    import signal

    server = scripted()
    options = ", handle_sigterm=False" if case == "handle_sigterm=False" else ""
    host = "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))" if "host" in case else ""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import signal, sys, time
            {host}
            from watchllm_ext.sdk import WatchLLM
            client = WatchLLM(api_key="k", base_url={server.url!r}, flush_interval_s=600,
                              flush_at=100_000{options})
            for i in range(2000):
                client.log_tool_call("t", tool_input=i)
            print("logged", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with child:
        assert child.stdout is not None and child.stdout.readline().strip() == "logged"
        time.sleep(0.3)
        assert server.delivered() == Counter()  # all still buffered
        child.send_signal(signal.SIGTERM)
        code = child.wait(30)
    if case == "no handler":
        assert code == -signal.SIGTERM
        assert len(server.delivered()) == 2000 and set(server.delivered().values()) == {1}
    elif case == "handle_sigterm=False":
        assert code == -signal.SIGTERM and server.delivered() == Counter()
    else:  # the host's handler exits through atexit, which flushes
        assert code == 7 and len(server.delivered()) == 2000


def test_a_steady_stream_goes_in_batches_of_flush_at_not_a_request_every_few_events(
    scripted: Any,
) -> None:
    """1,000 events a second for two seconds: a batch when flush_at (500) wait or at each
    flush_interval_s, as documented. The worker used to send on while anything was queued:
    ~100 requests a second of ~9 events, each an fsync on the server."""
    server = scripted()
    client = client_for(server.url, flush_at=500, flush_interval_s=1.0)
    try:
        for i in range(2000):
            client.log_tool_call("t", tool_input=i)
            time.sleep(0.001)
        assert client.flush(20)
    finally:
        client.close(5)
    assert len(server.delivered()) == 2000
    assert len(server.requests) <= 12, [len(r["ids"]) for r in server.requests]
