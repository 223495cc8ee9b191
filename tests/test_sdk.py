"""The client SDK: light to import, and it talks to a real server."""

from __future__ import annotations

import subprocess
import sys

from conftest import Running

from watchllm_ext.sdk import WatchLLMClient, WatchLLMError


def test_sdk_imports_without_server_dependencies() -> None:
    code = (
        "import sys, watchllm_ext.sdk\n"
        "server_side = {'chdb', 'pandas', 'pyarrow', 'starlette', 'uvicorn', 'pluggy'}\n"
        "heavy = server_side & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sdk_sends_a_batch(server: Running) -> None:
    with WatchLLMClient(server.url, server.key) as client:
        event = client.new_event("prompt_call", "run-9", model="gpt-4o", tokens_input=1)
        result = client.send(
            [
                event,
                {"event_type": "error", "run_id": "run-9", "error_type": "E", "error_message": "m"},
            ]
        )
        assert result.status == 202 and result.accepted == 2
        assert result.event_ids[0] == event["event_id"]
        try:
            client.send([{"event_type": "nope", "run_id": "r"}])
        except WatchLLMError as exc:
            assert exc.status == 422
        else:
            raise AssertionError("an invalid event was accepted")
    server.flush()
    assert server.query("SELECT count() AS n FROM events WHERE run_id = 'run-9'") == [{"n": 2}]
