"""Shared fixtures: a real WatchLLM server (uvicorn on loopback, chDB in a temp folder, or the
ClickHouse store of the test's `store_backend`: see tests/stores.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn

from watchllm_ext.app import create_app
from watchllm_ext.keys import KeyStore
from watchllm_ext.settings import Settings

if TYPE_CHECKING:  # imported by pytest as a plugin first, for its assertion rewriting
    from stores import StoreBackend

# store_backend and the EVERY_STORE parametrization of the storage tests.
pytest_plugins = ["stores"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an ASGI app on loopback in a thread, with its lifespan."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@dataclass
class Running:
    url: str
    app: Any
    settings: Settings
    keys: KeyStore
    key: str  # ingest+read+admin key of project "acme"
    client: httpx.Client
    thread: ServerThread

    def stop(self) -> None:
        """Shut the server down (its lifespan flushes what the sinks can take)."""
        self.thread.__exit__()

    @property
    def wl(self) -> Any:
        return self.app.state.watchllm

    def flush(self) -> None:
        """Wait until everything accepted so far is in the store."""
        writer = self.wl.writer
        assert writer is not None
        # The writer lives on the server's loop; wait from here by polling its counters.
        deadline = time.monotonic() + 30
        while writer.lag_events():
            if time.monotonic() > deadline:
                raise AssertionError(f"writer did not flush: {writer.stats()}")
            time.sleep(0.02)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        assert self.wl.store is not None
        return self.wl.store.query(sql, params)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def clear_watchllm_env(monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    """No WATCHLLM_* variable of the machine (any case: the settings read them so), and a
    working folder without a watchllm.toml."""
    for name in list(os.environ):
        if name.upper().startswith("WATCHLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "flush_interval_s": 0.05,
        "create_default_key": False,
        "shutdown_grace_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def server_factory(tmp_path: Path, store_backend: StoreBackend) -> Iterator[Any]:
    """Start a server with given settings overrides and plugins; stopped at teardown. Its
    store is the test's `store_backend` (the embedded chDB unless the test runs on every
    store), unless the overrides name another."""
    started: list[ServerThread] = []
    clients: list[httpx.Client] = []

    def start(plugin_objects: tuple[Any, ...] = (), **overrides: Any) -> Running:
        settings = make_settings(tmp_path, **{**store_backend.settings(), **overrides})
        keys = KeyStore(settings.keys_path, refresh_s=0.2)
        key = keys.create("acme", scope="admin")
        app = create_app(settings, plugins=plugin_objects)
        thread = ServerThread(app).__enter__()
        started.append(thread)
        if store_backend.is_clickhouse and not plugin_objects and "clickhouse_url" not in overrides:
            # The test id names this store: make sure no other one was used instead.
            assert app.state.watchllm.store.name == "clickhouse", app.state.watchllm.store
        client = httpx.Client(base_url=thread.url, timeout=30)
        clients.append(client)
        return Running(thread.url, app, settings, keys, key, client, thread)

    yield start
    for client in clients:
        client.close()
    for thread in reversed(started):
        if thread.thread.is_alive():
            thread.__exit__()


@pytest.fixture
def server(server_factory: Any) -> Running:
    return server_factory()


def prompt_call(event_id: str = "e1", **fields: Any) -> dict[str, Any]:
    event = {
        "event_id": event_id,
        "event_type": "prompt_call",
        "run_id": "run-1",
        "timestamp": "2026-01-02T03:04:05.678Z",
        "model": "gpt-4o",
        "provider": "openai",
        "tokens_input": 100,
        "tokens_output": 50,
        "prompt": "hello",
        "response": "world",
        "latency_ms": 123.5,
    }
    event.update(fields)
    return event


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Mount small tmpfs folders: a real disk that fills up (ENOSPC). Needs root, which CI
    and the dev machines have; skipped where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
