"""The first event after a restart: how long from its 202 until the API can read it, on a
data folder that already holds many events, against an empty one in the same run.

The store sink keeps out copies of stored event ids with a filter of the ids stored, read
from the store when the server starts. A run here:

1. fills a data folder's `event_ids` table with `--ids` ids (straight into the table: the
   filter reads nothing else) and leaves a second folder empty;
2. for each folder, `--rounds` times: starts `watchllm serve` on it, posts one event, and
   times the wait until `GET /v1/analytics/event/{id}` finds it, then stops the server.

Printed: the median wait of each folder and their ratio (big over empty). With the filter
built before the first insert the wait grew with the store (~1 us an id stored); with it
built beside the inserts it is the writer's flush interval (1 s) whatever the store holds.

    python bench/bench_restart.py --ids 4000000 --rounds 3
"""

from __future__ import annotations

import argparse
import atexit
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import free_port, spawn, stop, stop_all  # noqa: E402

PROJECT = "bench"


def fill(data_dir: Path, ids: int) -> None:
    """`ids` stored event ids in the folder's store (its schema applied first)."""
    from watchllm_ext.plugins import get_plugin_manager
    from watchllm_ext.settings import Settings
    from watchllm_ext.store import apply_migrations
    from watchllm_ext.store.folders import open_store

    settings = Settings(data_dir=data_dir)
    store = open_store(get_plugin_manager(settings), settings)
    try:
        apply_migrations(store)
        if ids:
            store.execute(
                f"INSERT INTO event_ids SELECT '{PROJECT}', concat('old-', toString(number)),"
                f" now64(3) FROM numbers({ids})"
            )
    finally:
        store.close()


def first_event_wait(work: Path, key: str, n: int) -> float:
    """Start `watchllm serve` on work/data, post one event, wait until it can be read."""
    port = free_port()
    serve = [sys.executable, "-m", "watchllm_ext.cli", "serve"]
    proc = spawn(
        [*serve, "--data-dir", str(work / "data"), "--port", str(port)],
        log=work / "serve.log",
        cwd=work,
    )
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("watchllm serve did not start; see " + str(work / "serve.log"))
            time.sleep(0.05)
        event_id = f"after-restart-{n}"
        event = {"event_id": event_id, "event_type": "prompt_call", "run_id": "r", "model": "m"}
        answer = client.post(f"/v1/projects/{PROJECT}/events", json=event)
        posted = time.monotonic()
        assert answer.status_code == 202, answer.text
        while client.get(f"/v1/analytics/event/{event_id}").status_code != 200:
            if time.monotonic() - posted > 300:
                raise RuntimeError("the event did not become readable in 300 s")
            time.sleep(0.02)
        return time.monotonic() - posted
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=4_000_000, help="ids in the big store")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    atexit.register(stop_all)
    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    waits: dict[str, list[float]] = {"empty": [], "big": []}
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        works = {name: Path(tmp) / name for name in waits}
        keys = {}
        for name, work in works.items():
            work.mkdir()
            (work / "watchllm.toml").write_text(
                'log_level = "warning"\ncreate_default_key = false\n'
            )
            fill(work / "data", args.ids if name == "big" else 0)
            keys[name] = KeyStore(Settings(data_dir=work / "data").keys_path).create(
                PROJECT, scope="admin"
            )
        for n in range(args.rounds):  # alternating: the host's noise falls on both alike
            for name, work in works.items():
                waits[name].append(first_event_wait(work, keys[name], n))
                print(f"round {n + 1}: {name} {waits[name][-1]:.2f} s", flush=True)
    empty, big = (statistics.median(waits[name]) for name in ("empty", "big"))
    print(f"first event readable after a restart, median of {args.rounds}:")
    print(f"  empty store: {empty:.2f} s")
    print(f"  {args.ids:,} ids stored: {big:.2f} s (x{big / empty:.2f} the empty store's)")


if __name__ == "__main__":
    main()
