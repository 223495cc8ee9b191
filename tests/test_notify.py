"""Alert notifiers: the signed webhook (retried) and the Slack incoming webhook, received by a
real local HTTP server, from a real WatchLLM server whose Guardian rule fires and recovers."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest
from conftest import prompt_call

from watchllm_ext.notify import post_with_retries, sign, verify_signature

SECRET = "s3cret-for-tests"


class Receiver:
    """A local HTTP server that records each POST; `fail_first[path]`: the statuses to answer
    the first POSTs to that path with."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail_first: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.posts.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    failing = receiver.fail_first.get(self.path) or [200]
                    status = failing.pop(0)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["path"] == path]

    def wait(self, path: str, n: int, within_s: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        while len(self.on(path)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.on(path))} posts to {path}, not {n}")
            time.sleep(0.02)
        return self.on(path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def call(**fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return prompt_call(f"c-{uuid.uuid4().hex[:12]}", timestamp=now, **fields)


def test_webhook_and_slack_get_each_end_of_the_episode(
    server_factory: Any, receiver: Receiver
) -> None:
    receiver.fail_first = {"/hook": [503]}  # the first notice is refused once, then retried
    server = server_factory(
        flags={"guardian": True},
        guardian_rules=[
            {"name": "errors", "metric": "error_rate", "threshold": 0.5, "min_events": 2}
        ],
        guardian_interval_s=0.2,
        alert_webhook_url=f"{receiver.url}/hook",
        alert_webhook_secret=SECRET,
        alert_webhook_retries=3,
        alert_slack_webhook_url=f"{receiver.url}/slack",
    )
    send = server.client.post
    body = {"events": [call(status="error"), call(status="error")]}
    assert send("/v1/events/batch", headers=server.headers(), json=body).status_code == 202
    hooks = receiver.wait("/hook", 2)  # the 503, then the retry
    body = {"events": [call() for _ in range(4)]}
    assert send("/v1/events/batch", headers=server.headers(), json=body).status_code == 202
    hooks = receiver.wait("/hook", 3)
    slack = receiver.wait("/slack", 2)

    for post in hooks:
        headers = {k.lower(): v for k, v in post["headers"].items()}
        assert verify_signature(
            SECRET, headers["x-watchllm-timestamp"], post["body"], headers["x-watchllm-signature"]
        )
        assert not verify_signature(
            "wrong", headers["x-watchllm-timestamp"], post["body"], headers["x-watchllm-signature"]
        )
    first, retry, recovery = (json.loads(p["body"]) for p in hooks)
    assert first == retry  # the same notice, delivered again
    assert hooks[0]["headers"]["X-WatchLLM-Delivery"] == hooks[1]["headers"]["X-WatchLLM-Delivery"]
    assert (first["state"], first["rule"], first["project_id"]) == ("firing", "errors", "acme")
    assert first["value"] == 1.0 and first["threshold"] == 0.5
    assert (recovery["state"], recovery["episode_id"]) == ("recovered", first["episode_id"])
    assert "prompt" not in hooks[0]["body"].decode()  # the rule and figures only
    texts = [json.loads(p["body"])["text"] for p in slack]
    assert "[firing] rule errors on acme" in texts[0]
    assert "[recovered] rule errors on acme" in texts[1]


def test_retries_stop_at_a_refusal_and_after_the_limit(receiver: Receiver) -> None:
    async def deliver(retries: int) -> bool:
        return await post_with_retries(
            f"{receiver.url}/x", b"{}", {}, retries, sign_with=SECRET, initial_s=0.01
        )

    receiver.fail_first = {"/x": [400]}
    assert anyio.run(deliver, 5) is False
    assert len(receiver.on("/x")) == 1  # a 400 will never be taken: not retried
    receiver.fail_first = {"/x": [500, 500, 500]}
    assert anyio.run(deliver, 2) is False
    assert len(receiver.on("/x")) == 4  # one try and two retries
    receiver.fail_first = {"/x": [429, 502]}
    assert anyio.run(deliver, 2) is True
    assert len(receiver.on("/x")) == 7


def test_old_signatures_are_refused() -> None:
    old = str(int(time.time()) - 3600)
    assert not verify_signature(SECRET, old, b"{}", sign(SECRET, old, b"{}"))
    assert not verify_signature(SECRET, "soon", b"{}", "sha256=00")


HOSTILE_USER = (
    "<!channel> <https://evil.example/login|Your WatchLLM session expired: sign in again>"
    " & co\nINFO watchllm.app: forged log line\r\u2028\u2029\x85\x1b[2J"
)


def test_a_hostile_user_id_injects_nothing_into_notices_or_the_log(
    server_factory: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A per-user rule fires for a user id (free text from any ingest key) holding Slack
    markup and line breaks: Slack shows it as typed (no ping, no disguised link), the webhook's
    summary and the log record stay one line, and the webhook's `subject` is the id as sent."""
    caplog.set_level(logging.WARNING, logger="watchllm.guardian")
    server = server_factory(
        flags={"guardian": True},
        guardian_rules=[
            {"name": "user-spend", "metric": "cost_usd", "per": "user", "threshold": 1.0}
        ],
        guardian_interval_s=0.2,
        alert_webhook_url=f"{receiver.url}/hook",
        alert_slack_webhook_url=f"{receiver.url}/slack",
    )
    body = {"events": [call(user_id=HOSTILE_USER, cost_estimate_usd=2.0)]}
    r = server.client.post("/v1/events/batch", headers=server.headers(), json=body)
    assert r.status_code == 202, r.text
    (slack,) = receiver.wait("/slack", 1)
    (hook,) = receiver.wait("/hook", 1)

    text = json.loads(slack["body"])["text"]
    assert "<" not in text and ">" not in text  # no mention, link or other markup of Slack's
    assert "&lt;!channel&gt; &lt;https://evil.example/login|Your" in text
    assert " &amp; co\\nINFO watchllm.app: forged" in text  # the & escaped, the LF shown as \n
    assert text.isprintable()  # no CR, LF, C0/C1 control or line/paragraph separator
    notice = json.loads(hook["body"])
    assert notice["subject"] == HOSTILE_USER  # the data itself, exact, in JSON
    assert notice["summary"].isprintable()
    assert "user <!channel> <https://evil.example/login|" in notice["summary"]
    assert "\\r\\u2028\\u2029\\x85\\x1b[2J" in notice["summary"]

    (record,) = [r for r in caplog.records if r.name == "watchllm.guardian"]
    line = record.getMessage()
    assert line.isprintable() and line.startswith("Guardian [firing] rule user-spend on acme")
