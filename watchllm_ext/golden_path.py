"""The golden path, end to end: an event sent over HTTP as any client would send it is
stored and visible in the analytics API. `watchllm golden-path` runs it against a server
(`--url`/`--key`), or against a temporary one it starts on a scratch data folder."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from .remote import answer_message, unreachable

SUCCESS = "Success: Event logged, processed, and visible in API."


class StepFailed(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"golden path failed at step '{step}': {detail}")


def run(url: str, key: str, *, timeout_s: float = 30.0, say: Callable[[str], None] = print) -> None:
    """Raise StepFailed naming the step that failed; return when everything worked."""
    headers = {"Authorization": f"Bearer {key}"}
    event_id = f"golden-{uuid.uuid4().hex}"
    run_id = f"golden-run-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10) as client:
        step = "health"
        try:
            health = client.get("/healthz")
        except httpx.HTTPError as exc:
            raise StepFailed(step, unreachable(url, exc)) from None
        if health.status_code != 200:
            raise StepFailed(step, f"/healthz answered {health.status_code}")
        # The key must read as well as send: checked before the event is sent, so that a key
        # that only ingests leaves no stray event behind.
        step = "key"
        read = client.get("/v1/analytics/stats", params={"period": "15m"})
        if read.status_code in (401, 403):
            raise StepFailed(
                step,
                f"the key cannot read the analytics API ({read.status_code}:"
                f" {answer_message(read)});"
                " golden-path needs a key with ingest and read scopes (an admin key)",
            )
        say(f"1/3 server up at {url}")

        step = "send"
        event = {
            "event_id": event_id,
            "event_type": "prompt_call",
            "run_id": run_id,
            "timestamp": datetime.now(UTC).isoformat(),
            "model": "gpt-4o",
            "provider": "openai",
            "prompt": "golden path",
            "response": "ok",
            "tokens_input": 12,
            "tokens_output": 3,
            "latency_ms": 42.0,
            "tags": ["golden-path"],
        }
        sent = client.post("/v1/events/batch", json={"events": [event]})
        if sent.status_code != 202:
            raise StepFailed(step, f"ingest answered {sent.status_code}: {sent.text[:300]}")
        project = sent.json()["project_id"]
        say(f"2/3 event {event_id} accepted for project {project}")

        step = "visible"
        deadline = time.monotonic() + timeout_s
        while True:
            found = client.get(f"/v1/analytics/event/{event_id}", params={"project_id": project})
            if found.status_code == 200:
                stored = found.json()["event"]
                if stored.get("cost_source") != "computed" or stored.get("model") != "gpt-4o":
                    raise StepFailed(step, f"the stored event is not what was sent: {stored}")
                break
            if found.status_code != 404:
                raise StepFailed(
                    step, f"analytics answered {found.status_code}: {found.text[:300]}"
                )
            if time.monotonic() > deadline:
                raise StepFailed(step, f"the event was not visible after {timeout_s:.0f}s")
            time.sleep(0.2)
        logs = client.get("/v1/analytics/logs", params={"project_id": project, "run_id": run_id})
        if logs.status_code != 200 or [e["event_id"] for e in logs.json()["events"]] != [event_id]:
            raise StepFailed(step, f"the logs do not show the event: {logs.text[:300]}")
        say("3/3 event visible in /v1/analytics/event and /v1/analytics/logs")
    say(SUCCESS)


def run_on_scratch_server(say: Callable[[str], None] = print) -> None:
    """Start a temporary server (scratch data folder, loopback port), run, stop it."""
    import socket
    import tempfile
    import threading
    from pathlib import Path

    import uvicorn

    from .app import create_app
    from .keys import KeyStore
    from .settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), create_default_key=False, flush_interval_s=0.2)
        key = KeyStore(settings.keys_path).create("golden", scope="admin")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise StepFailed("start", "the scratch server did not start")
            time.sleep(0.05)
        try:
            run(f"http://127.0.0.1:{port}", key, say=say)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
