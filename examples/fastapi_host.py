"""A FastAPI service with WatchLLM mounted at /watchllm, sharing the host's lifespan.

    pip install -e '.[server]' fastapi
    watchllm keys create --project default --data-dir ./.watchllm-host   # key: last line
    python examples/fastapi_host.py
    curl -X POST localhost:8000/watchllm/v1/projects/default/events \
      -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d '{"event_id":"e1","event_type":"prompt_call","run_id":"r1",
           "timestamp":"2026-01-01T00:00:00Z","model":"gpt-4o","tokens_input":5}'

`python examples/fastapi_host.py --self-test` starts it, sends one event through the mounted
app, stops it (which flushes the writer) and checks the event is stored.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from watchllm_ext import Settings, create_app, lifespan
from watchllm_ext.keys import KeyStore


def build(data_dir: Path) -> FastAPI:
    watchllm = create_app(Settings(data_dir=data_dir, create_default_key=False))

    @asynccontextmanager
    async def my_lifespan(app: Any) -> AsyncIterator[None]:
        print("host: starting")  # the host's own startup work runs inside WatchLLM's
        yield
        print("host: stopping")

    app = FastAPI(lifespan=lifespan(watchllm, host_lifespan=my_lifespan))

    @app.get("/")
    def home() -> dict[str, str]:
        return {"service": "my app", "observability": "/watchllm"}

    app.mount("/watchllm", watchllm)
    return app


def self_test() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        key = KeyStore(data / "keys.sqlite3").create("default", scope="admin")
        server = uvicorn.Server(uvicorn.Config(build(data), port=0, log_level="warning"))
        thread = threading.Thread(target=server.run)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]  # port 0: the OS picked one
        event = {
            "event_id": "host-1",
            "event_type": "prompt_call",
            "run_id": "r1",
            "timestamp": "2026-01-01T00:00:00Z",
            "model": "gpt-4o",
            "tokens_input": 5,
        }
        r = httpx.post(
            f"http://127.0.0.1:{port}/watchllm/v1/projects/default/events",
            json=event,
            headers={"Authorization": f"Bearer {key}"},
        )
        print("ingest:", r.status_code, r.json())
        server.should_exit = True
        thread.join()
        store = create_app(Settings(data_dir=data)).state.watchllm.open_store()
        try:
            rows = store.query("SELECT event_id, cost_estimate_usd FROM events")
        finally:
            store.close()
        print("stored:", rows)
        assert rows and rows[0]["event_id"] == "host-1"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=Path(".watchllm-host"))
    args = parser.parse_args()
    if args.self_test:
        self_test()
    else:
        uvicorn.run(build(args.data_dir), port=8000)
