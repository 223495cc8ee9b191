"""A FastAPI service with WatchLLM mounted at /watchllm, sharing the host's lifespan.

    pip install -e '.[examples]'      # the server, and FastAPI
    python examples/fastapi_host.py   # first start: prints KEY=wllm_... (project "default")
    curl -X POST localhost:${WATCHLLM_PORT:-8000}/watchllm/v1/projects/default/events \
      -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d '{"event_id":"e1","event_type":"prompt_call","run_id":"r1",
           "timestamp":"'"$(date -u +%Y-%m-%dT%H:%M:%SZ)"'","model":"gpt-4o","tokens_input":5}'

`--port` (default $WATCHLLM_PORT, else 8000) and `--data-dir` (default $WATCHLLM_DATA_DIR,
else ./.watchllm-host). On its first start in a data folder it creates an admin key of
project "default" there and prints it once, as `watchllm serve` does; later starts use the
keys already there (`watchllm keys create --project default --data-dir ./.watchllm-host`
makes more, the server sees them within 2 seconds). Ctrl-C stops it and flushes the writer.

`python examples/fastapi_host.py --self-test` starts it on a temporary folder, sends one
event through the mounted app, stops it (which flushes the writer) and checks the event is
stored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import httpx
    import uvicorn
    from fastapi import FastAPI

    from watchllm_ext import Settings, create_app, lifespan
    from watchllm_ext.keys import KeyStore
except ImportError as exc:  # one line, not a traceback: say which extra installs it
    sys.exit(f"error: {exc.name} is missing: pip install -e '.[examples]'")


def build(data_dir: Path) -> FastAPI:
    watchllm = create_app(Settings(data_dir=data_dir, create_default_key=False))

    @asynccontextmanager
    async def my_lifespan(app: Any) -> AsyncIterator[None]:
        print("host: starting", flush=True)  # the host's own startup runs inside WatchLLM's
        yield
        print("host: stopping", flush=True)

    app = FastAPI(lifespan=lifespan(watchllm, host_lifespan=my_lifespan))

    @app.get("/")
    def home() -> dict[str, str]:
        return {"service": "my app", "observability": "/watchllm"}

    app.mount("/watchllm", watchllm)
    return app


def first_key(data_dir: Path) -> str | None:
    """An admin key of project "default", made in the app's own key file when it has none."""
    keys = KeyStore(Settings(data_dir=data_dir).keys_path)
    if not keys.is_empty():
        return None
    return keys.create("default", scope="admin", name="created by examples/fastapi_host.py")


def self_test() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        key = first_key(data)
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
            "timestamp": datetime.now(UTC).isoformat(),
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


def main() -> int:
    parser = argparse.ArgumentParser(description="A FastAPI app with WatchLLM mounted.")
    parser.add_argument("--self-test", action="store_true")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("WATCHLLM_DATA_DIR") or ".watchllm-host"),
        help="WatchLLM's data folder (default: $WATCHLLM_DATA_DIR or ./.watchllm-host)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("WATCHLLM_PORT") or 8000),
        help="listen port on 127.0.0.1 (default: $WATCHLLM_PORT or 8000)",
    )
    args = parser.parse_args()
    if args.self_test:
        self_test()
        return 0
    key = first_key(args.data_dir)
    if key:
        print(f"No API keys yet in {args.data_dir}: created an admin key of project 'default'.")
        print(f"KEY={key}")
    print(f"WatchLLM mounted at http://127.0.0.1:{args.port}/watchllm", flush=True)
    uvicorn.run(build(args.data_dir), host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
