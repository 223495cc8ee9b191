"""Time until the dashboard's pages are rendered in Chromium, at ten million events.

    python bench/bench_dashboard.py                      # 10,000,000 events, 10 loads a page
    python bench/bench_dashboard.py --events 1000000     # another size (its own data folder)
    python bench/bench_dashboard.py --calls 5 --json out.json

1. Data: the generator of bench/bench_analytics.py (`--role prepare`: INSERT ... SELECT FROM
   numbers() into chDB, runs of 20 events on six models over the 30 days before the last
   whole hour, rollups computed) builds or reuses <tmp>/watchllm-bench-dashboard-<N>.
2. A server process (bench_analytics.py `--role serve`: what `watchllm serve` runs, one
   worker) on that folder, with a read key of project "bench" made in its key file.
3. Debian's Chromium (through Playwright, `executable_path`; --no-sandbox as root) signs in
   once through the form, then loads each page `--warmups` times untimed and `--calls` times
   timed. A load is timed from `page.goto` to the `load` event: the HTML (server-rendered,
   charts as SVG in it) parsed, the CSS and script loaded, the page painted. Also reported:
   the server's part (Navigation Timing: requestStart to responseEnd).
4. Pages: the overview over the last 24 hours (the default) and over 30 days, the explorer
   (the last 24 hours; 30 days filtered to failed calls; the 10th page by its cursor), one
   event, one run tree. Target: the overview and the explorer under 1 s (median).

Only 127.0.0.1 is contacted; the processes started here are stopped at the end.
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from processes import free_port, spawn, stop, stop_all

HERE = Path(__file__).resolve()
ANALYTICS = HERE.parent / "bench_analytics.py"
PROJECT = "bench"
TARGET_MS = 1000.0


def prepare(events: int, data_dir: Path, regenerate: bool) -> dict[str, Any]:
    args = [sys.executable, str(ANALYTICS), "--role", "prepare", "--events", str(events)]
    args += ["--data-dir", str(data_dir)] + (["--regenerate"] if regenerate else [])
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    for line in done.stdout.splitlines():
        if not line.startswith("{"):
            print(line, flush=True)
    return json.loads(lines[-1])


def chromium() -> str:
    found = shutil.which("chromium")
    if not found:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    return found


def serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen[Any], str]:
    port = free_port()
    proc = spawn(
        [
            sys.executable,
            str(ANALYTICS),
            "--role",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {log}")
        time.sleep(0.2)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered), "p95_ms": p95, "n": len(ordered)}


def measure(url: str, key: str, warmups: int, calls: int, shots: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
        page.goto(url + "/dashboard/signin")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r"/dashboard/$"))
        # Targets found through the pages themselves: a later explorer page, an event, a run.
        page.goto(url + "/dashboard/requests")
        for _ in range(9):
            page.get_by_role("link", name="Older events").click()
            page.wait_for_load_state()
        tenth = page.url
        event = page.locator("[data-event]").first.get_attribute("href")
        run = page.locator("table.explorer tbody tr td:last-child a").first.get_attribute("href")
        pages = {
            "overview, last 24 h": "/dashboard/?refresh=0",
            "overview, 30 days": "/dashboard/?period=30d&refresh=0",
            "explorer, last 24 h": "/dashboard/requests",
            "explorer, 30 days, failed calls": "/dashboard/requests?period=30d&status=error",
            "explorer, 10th page": tenth.removeprefix(url),
            "event": event,
            "run tree": run,
        }
        for label, path in pages.items():
            wall: list[float] = []
            server: list[float] = []
            for i in range(warmups + calls):
                t0 = time.perf_counter()
                response = page.goto(url + path, wait_until="load")
                elapsed = (time.perf_counter() - t0) * 1000
                assert response is not None and response.status == 200, (label, response)
                timing = page.evaluate(
                    "() => { const n = performance.getEntriesByType('navigation')[0];"
                    " return n.responseEnd - n.requestStart; }"
                )
                if i >= warmups:
                    wall.append(elapsed)
                    server.append(float(timing))
            page.screenshot(path=str(shots / f"{re.sub(r'[^a-z0-9]+', '-', label)}.png"))
            results[label] = {
                "path": path,
                "load": summary(wall),
                "server": summary(server),
                "html_bytes": len(page.content()),
            }
            print(
                f"  {label:34s} load median {results[label]['load']['median_ms']:7.1f} ms,"
                f" p95 {results[label]['load']['p95_ms']:7.1f} ms"
                f" (server {results[label]['server']['median_ms']:6.1f} ms)",
                flush=True,
            )
        browser.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=10_000_000, help="events of project 'bench'")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the data folder (default: "
        "<tmp>/watchllm-bench-dashboard-<events>); reused if it holds the events",
    )
    p.add_argument("--regenerate", action="store_true", help="rebuild the data folder")
    p.add_argument("--warmups", type=int, default=2, help="untimed loads of each page")
    p.add_argument("--calls", type=int, default=10, help="timed loads of each page")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    data_dir = args.data_dir or Path(tempfile.gettempdir()) / (
        f"watchllm-bench-dashboard-{args.events}"
    )
    meta = prepare(args.events, data_dir, args.regenerate)
    print(f"data: {args.events:,} events of {PROJECT!r} up to {meta.get('end')}", flush=True)

    from watchllm_ext.keys import KeyStore
    from watchllm_ext.settings import Settings

    settings = Settings(data_dir=data_dir, create_default_key=False)
    key = KeyStore(settings.keys_path).create(PROJECT, scope="read", name="bench_dashboard")
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    proc, url = serve(data_dir, work / "server.log")
    try:
        results = measure(url, key, args.warmups, args.calls, work)
    finally:
        stop(proc, grace_s=30)
    print(f"screenshots and the server log: {work}")
    print()
    print(f"| page ({args.events:,} events) | load median | load p95 | server median |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['load']['median_ms']:.0f} ms | {r['load']['p95_ms']:.0f} ms"
            f" | {r['server']['median_ms']:.0f} ms |"
        )
    slow = [
        label
        for label, r in results.items()
        if label.startswith(("overview", "explorer")) and r["load"]["median_ms"] > TARGET_MS
    ]
    print(
        f"\ntarget: overview and explorer under {TARGET_MS:.0f} ms (median):",
        "met" if not slow else f"missed by {', '.join(slow)}",
    )
    if args.json:
        args.json.write_text(
            json.dumps({"events": args.events, "data": meta, "pages": results}, indent=2)
        )
    return 0 if not slow else 1


if __name__ == "__main__":
    sys.exit(main())
