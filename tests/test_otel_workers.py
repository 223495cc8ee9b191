"""OTLP bodies decoded and mapped in worker processes (otel/pool.py, otel/worker.py): the same
rows, events and answers as in the server's own process, and nothing lost when a worker dies.

Real worker processes (`python -m watchllm_ext.otel.worker`), a real server on loopback, real
chDB. Bodies are made big enough (64 KiB and more) to go to a worker."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Running
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from test_otel_receiver import Collect

from watchllm_ext.hookspecs import hookimpl
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.otel import pool
from watchllm_ext.otel.worker import MappedBody, decode_answer, encode_request, map_body

PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests kill workers soon after their start; the pool then waits START_RETRY_S before
    the next start (no respawn per body): shortened here, not skipped."""
    monkeypatch.setattr(pool, "START_RETRY_S", 0.2)


def traces(n: int) -> list[ReadableSpan]:
    """`n` agent traces: a server span, a chat span (a prompt call), a tool span (a tool
    call), a failed span (an error) and a span with no LLM meaning, each trace its own ids."""
    collect = Collect()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(collect))
    tracer = provider.get_tracer("test.app", "0.1")
    for i in range(n):
        with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER):
            with tracer.start_as_current_span(f"chat m-{i % 3}", kind=SpanKind.CLIENT) as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.request.model", f"m-{i % 3}")
                chat.set_attribute("gen_ai.provider.name", "openai")
                chat.set_attribute("gen_ai.usage.input_tokens", 100 + i)
                chat.set_attribute("gen_ai.usage.output_tokens", 7)
                chat.set_attribute("app.custom", "kept" * (i % 4))
            with tracer.start_as_current_span("execute_tool get_weather") as tool:
                tool.set_attribute("gen_ai.operation.name", "execute_tool")
                tool.set_attribute("gen_ai.tool.name", "get_weather")
            with tracer.start_as_current_span("db.query") as failed:
                failed.set_status(Status(StatusCode.ERROR, "timeout after 5s"))
            with tracer.start_as_current_span("render"):
                pass
    provider.shutdown()
    return collect.spans


def big_body(n: int = 150) -> bytes:
    body = encode_spans(traces(n)).SerializeToString()
    assert len(body) >= OFFLOAD_MIN_BYTES
    return body


def wait_for_a_worker() -> None:
    """Ask for a worker and wait until one is ready (the first bodies are done in-process
    meanwhile)."""
    deadline = time.monotonic() + 60
    while pool.POOL.live() == 0:
        pool.POOL.want(1)  # again: a start that failed is tried again after a while
        assert time.monotonic() < deadline, "no OTLP worker process started"
        time.sleep(0.05)


def now_ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def post(running: Running, body: bytes) -> Any:
    return running.client.post(
        "/v1/traces", content=body, headers={**running.headers(), **PROTOBUF}
    )


def stored(running: Running) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    running.flush()
    spans = running.query(
        "SELECT * EXCEPT ingested_at FROM spans FINAL WHERE project_id = 'acme'"
        " ORDER BY trace_id, span_id"
    )
    events = running.query(
        "SELECT * EXCEPT (ingested_at, received_at) FROM events FINAL WHERE project_id = 'acme'"
        " ORDER BY event_id"
    )
    return spans, events


def served(
    server_factory: Any, folder: Path, processes: int, bodies: list[tuple[bytes, str]]
) -> tuple[list[tuple[int, bytes]], tuple[list[dict[str, Any]], list[dict[str, Any]]], int]:
    """Start a server (one at a time: chDB opens one folder per process), post the bodies
    ((body, content type)), stop it: the answers, what it stored, how many bodies went to a
    worker."""
    running: Running = server_factory(otel_worker_processes=processes, data_dir=folder)
    if processes:
        wait_for_a_worker()
    answered = pool.POOL.answered_total
    answers = []
    for body, media in bodies:
        got = running.client.post(
            "/v1/traces", content=body, headers={**running.headers(), "Content-Type": media}
        )
        answers.append((got.status_code, got.content))
    to_workers = pool.POOL.answered_total - answered
    metrics = running.client.get("/metrics").text
    counted = f'watchllm_otel_bodies_total{{where="{"worker" if processes else "server"}"}}'
    assert f"{counted} {float(len(bodies))}" in metrics
    kept = stored(running)
    running.stop()
    return answers, kept, to_workers


def test_a_worker_maps_a_body_as_the_server_does(server_factory: Any, tmp_path: Path) -> None:
    bodies = [(big_body(), PROTOBUF["Content-Type"])]
    here = served(server_factory, tmp_path / "here", 0, bodies)
    there = served(server_factory, tmp_path / "there", 1, bodies)
    assert (here[2], there[2]) == (0, 1)
    assert here[0] == there[0] == [(200, b"\n\x00")]  # an empty partial_success
    spans, events = here[1]
    assert len(spans) == 150 * 5 and len(events) == 150 * 3
    assert there[1] == here[1]


def test_bad_bodies_and_bad_spans_get_the_same_answers(server_factory: Any, tmp_path: Path) -> None:
    request = encode_spans(traces(150))
    request.resource_spans[0].scope_spans[0].spans[3].trace_id = b"\x01" * 15
    request.resource_spans[0].scope_spans[0].spans[7].span_id = b"\x00" * 8
    bodies = [
        (request.SerializeToString(), "application/x-protobuf"),
        (b"\xff" * OFFLOAD_MIN_BYTES, "application/x-protobuf"),
        (b'{"resourceSpans": [' + b" " * OFFLOAD_MIN_BYTES + b"}", "application/json"),
        (b'{"resourceSpans": "no"}' + b" " * OFFLOAD_MIN_BYTES, "application/json"),
    ]
    here = served(server_factory, tmp_path / "here", 0, bodies)
    there = served(server_factory, tmp_path / "there", 1, bodies)
    assert (here[2], there[2]) == (0, 4)
    assert there[0] == here[0]
    assert there[1] == here[1]
    (status, partial), *failed = here[0]
    assert status == 200
    response = ExportTraceServiceResponse.FromString(partial)
    assert response.partial_success.rejected_spans == 2
    assert "traceId has 15 bytes" in response.partial_success.error_message
    assert [status for status, _ in failed] == [400, 400, 400]
    assert len(here[1][0]) == 150 * 5 - 2


class RefuseModel:
    """A plugin rule run by the server on the events a worker mapped."""

    @hookimpl
    def validate_event(self, event: Any, principal: Any) -> str | None:
        return "model m-1 is not allowed here" if getattr(event, "model", None) == "m-1" else None


def test_a_refused_event_takes_its_span_out_of_a_workers_rows(server_factory: Any) -> None:
    running: Running = server_factory(plugin_objects=(RefuseModel(),), otel_worker_processes=1)
    wait_for_a_worker()
    answered = pool.POOL.answered_total
    answer = post(running, big_body(150))
    assert pool.POOL.answered_total == answered + 1
    assert answer.status_code == 200
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 50  # one trace in three has model m-1
    assert "model m-1 is not allowed here" in partial.error_message
    spans, events = stored(running)
    assert len(spans) == 150 * 5 - 50
    assert not [s for s in spans if s["name"] == "chat m-1"]
    assert len(events) == 150 * 3 - 50


def test_a_worker_that_dies_loses_nothing(server_factory: Any) -> None:
    running: Running = server_factory(otel_worker_processes=1)
    wait_for_a_worker()
    started, lost = pool.POOL.started_total, pool.POOL.lost_total
    bodies = [big_body(150) for _ in range(6)]
    answers: list[int] = []

    def send(mine: list[bytes]) -> None:
        for body in mine:
            answers.append(post(running, body).status_code)

    # Two senders: two bodies in flight at the worker (one mapped, one in its pipe).
    senders = [threading.Thread(target=send, args=(bodies[i::2],)) for i in range(2)]
    for sender in senders:
        sender.start()
    # Killed while bodies come: whatever it had is done by the server itself.
    time.sleep(0.05)
    for worker in list(pool.POOL._live):
        os.kill(worker.process.pid, signal.SIGKILL)
    for sender in senders:
        sender.join()
    assert answers == [200] * 6
    assert pool.POOL.lost_total > lost  # the server saw it die under a call
    spans, events = stored(running)
    assert len(spans) == 6 * 150 * 5 and len(events) == 6 * 150 * 3
    deadline = time.monotonic() + 60
    while pool.POOL.started_total == started:  # a new one replaces it, in the background
        post(running, bodies[0])
        assert time.monotonic() < deadline, "no worker replaced the one killed"
        time.sleep(0.05)


def test_the_worker_protocol_round_trip() -> None:
    """What the server sends and reads back (msgpack frames): a worker's answer is
    map_body's, whatever the body."""
    now = datetime.now(UTC)
    body = encode_spans(traces(20)).SerializeToString()  # a small one: called directly
    wait_for_a_worker()
    mapped = pool.POOL.call(encode_request(body, True, "acme", now), 1, decode_answer)
    assert isinstance(mapped, MappedBody) and mapped.crash is None and mapped.problem is None
    assert (mapped.spans, mapped.n_rows, len(mapped.event_rows)) == (100, 100, 60)
    assert mapped == map_body(body, True, "acme", now_ms(now))
    refused = pool.POOL.call(encode_request(b"\x00\x01", True, "acme", now), 1, decode_answer)
    assert refused is not None and refused.problem is not None and refused.problem[0] == 400
    assert map_body(b"\x00\x01", True, "acme", 0).problem == refused.problem


def test_the_span_limit_goes_to_the_worker_with_the_body(server_factory: Any) -> None:
    """A body over the server's max_batch_events is refused by the worker before any of its
    spans is read (decode.check_request), with the server's limit, not a default: the
    request carries it. Through a real server, whose answer is the worker's."""
    now = datetime.now(UTC)
    body = encode_spans(traces(3)).SerializeToString()  # 15 spans
    wait_for_a_worker()
    call = pool.POOL.call
    refused = call(encode_request(body, True, "acme", now, 14), 1, decode_answer)
    assert refused is not None and refused.spans == 0, refused
    assert refused.problem == (
        413,
        "too_many_spans",
        "15 spans in one request is over the limit of 14 (max_batch_events)",
        "resourceSpans",
    )
    taken = call(encode_request(body, True, "acme", now, 15), 1, decode_answer)
    assert taken is not None and taken.problem is None and taken.spans == 15
    running: Running = server_factory(otel_worker_processes=1, max_batch_events=149 * 5)
    answered = pool.POOL.answered_total
    answer = post(running, big_body(150))
    assert answer.status_code == 413, answer.content
    assert pool.POOL.answered_total == answered + 1  # the worker's answer
    assert b"750 spans in one request is over the limit of 745" in answer.content


@pytest.mark.parametrize("processes", [0, 1])
def test_small_bodies_stay_in_the_server(server_factory: Any, processes: int) -> None:
    running: Running = server_factory(otel_worker_processes=processes)
    answered = pool.POOL.answered_total
    body = encode_spans(traces(2)).SerializeToString()
    assert post(running, body).status_code == 200
    assert pool.POOL.answered_total == answered
    assert len(stored(running)[0]) == 10


def test_a_stuck_worker_is_killed_and_its_body_done_here(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "CALL_TIMEOUT_S", 1.0)
    running: Running = server_factory(otel_worker_processes=1)
    wait_for_a_worker()
    lost = pool.POOL.lost_total
    for worker in list(pool.POOL._live):
        os.kill(worker.process.pid, signal.SIGSTOP)  # stopped: it never answers
    started = time.monotonic()
    answer = post(running, big_body(150))
    assert answer.status_code == 200
    assert 1.0 <= time.monotonic() - started < pool.WAIT_FOR_WORKER_S + 10
    assert pool.POOL.lost_total == lost + 1
    assert len(stored(running)[0]) == 150 * 5
    wait_for_a_worker()  # replaced


def test_an_answer_that_does_not_decode_loses_the_worker() -> None:
    """A worker whose answer the server cannot read (another version's, say) is replaced."""
    wait_for_a_worker()
    lost = pool.POOL.lost_total
    request = encode_request(
        encode_spans(traces(2)).SerializeToString(), True, "acme", datetime.now(UTC)
    )

    def refuse(answer: bytes) -> MappedBody:
        raise ValueError("not a MappedBody")

    assert pool.POOL.call(request, 1, refuse) is None
    assert pool.POOL.lost_total == lost + 1
    deadline = time.monotonic() + 60
    while pool.POOL.call(request, 1, decode_answer) is None:  # a new one, after the backoff
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_worker_ends_when_its_server_is_gone() -> None:
    """A worker whose server died (killed by a signal: no clean-up, no end of stdin while
    the worker is busy) ends by itself within a few seconds. Here its stdin stays open (the
    test holds the pipe), so only its watch on the parent can end it."""
    import subprocess
    import sys
    from pathlib import Path as P

    read_end, write_end = os.pipe()
    try:
        middle = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, subprocess, sys\n"
                "fd = int(sys.argv[1])\n"
                "p = subprocess.Popen([sys.executable, '-m', 'watchllm_ext.otel.worker',"
                " str(os.getpid())], stdin=fd, stdout=subprocess.DEVNULL, pass_fds=(fd,))\n"
                "print(p.pid, flush=True)\n",
                str(read_end),
            ],
            stdout=subprocess.PIPE,
            pass_fds=(read_end,),
        )
        assert middle.stdout is not None
        with middle.stdout:
            worker = int(middle.stdout.readline())
        assert middle.wait(timeout=30) == 0  # the "server" is gone; the worker's stdin is not
        deadline = time.monotonic() + 30
        while True:
            try:
                state = P(f"/proc/{worker}/status").read_text()
            except FileNotFoundError:
                break  # ended and reaped
            if "\nState:\tZ" in state:
                break  # ended (a zombie until whoever adopted it reaps it)
            assert time.monotonic() < deadline, "the worker outlived its server"
            time.sleep(0.1)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and pipe sizes: Linux")
def test_a_worker_keeps_its_buffers_and_its_pipes_hold_a_whole_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's malloc keeps a body's buffers between bodies (WORKER_MALLOC in its
    environment, where the server's does not say otherwise) and its pipes hold 1 MiB (Linux)."""
    import fcntl

    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")  # the user's own setting is left as it is
    worker = pool._Worker()
    try:
        worker.wait_ready()
        environ = Path(f"/proc/{worker.process.pid}/environ").read_bytes().split(b"\0")
        assert f"MALLOC_MMAP_THRESHOLD_={32 << 20}".encode() in environ
        assert f"MALLOC_TRIM_THRESHOLD_={64 << 20}".encode() in environ
        assert b"MALLOC_TOP_PAD_=4096" in environ
        # Root may always ask for 1 MiB; another user may be refused (a lowered
        # fs.pipe-max-size, pipe-user-pages-soft used up), and the pipes then stay as they are.
        assert worker.widened or os.geteuid() != 0
        if worker.widened:
            for stream in (worker.stdin, worker.stdout):
                assert fcntl.fcntl(stream.fileno(), fcntl.F_GETPIPE_SZ) == pool.PIPE_BYTES
        # And it still answers: a body bigger than the default 64 KiB pipe each way.
        body = big_body()
        request = encode_request(body, True, "p", datetime.now(UTC))
        answer = decode_answer(worker.call(request))
        assert answer.n_rows == answer.spans > 0 and answer.crash is None
    finally:
        worker.stop()
