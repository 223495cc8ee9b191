"""The dashboard (docs/DASHBOARD.md) in a real Chromium (Debian's, driven by Playwright) against
a real server (uvicorn on loopback, chDB in a temp folder) seeded with `watchllm demo`'s
sample: sign-in, overview, explorer filters and paging, event and run views, the empty state,
accessibility, isolation between projects, sessions, CSRF and revoked keys.

Screenshots go to tests/artifacts/dashboard/ (git-ignored), for a person to look at.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ServerThread, make_settings
from system_packages import debian_program

from watchllm_ext.app import create_app
from watchllm_ext.dashboard import charts
from watchllm_ext.dashboard.session import SECRET_FILE
from watchllm_ext.dashboard.views import waterfall
from watchllm_ext.demo import build, send
from watchllm_ext.keys import KeyStore, split_key

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "dashboard"
BETA_SECRET = "BETA-SECRET-PROMPT"


@dataclass
class Site:
    url: str
    keys: KeyStore
    admin: str  # acme, admin scope
    reader: str  # acme, read scope
    ingest_only: str  # acme, ingest scope
    beta: str  # beta, admin scope
    operator: str  # ops, operator scope
    beta_event: str
    tool_run: str
    app: Any

    def api(self, path: str, key: str | None = None, **params: Any) -> dict[str, Any]:
        r = httpx.get(
            self.url + path,
            params=params,
            headers={"Authorization": f"Bearer {key or self.admin}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()


def _wait_for(site: Site, key: str, events: int) -> None:
    deadline = time.monotonic() + 60
    while site.api("/v1/analytics/stats", key, period="30d")["total_events"] < events:
        assert time.monotonic() < deadline, "the seeded events did not reach the store"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dashboard")
    settings = make_settings(tmp, key_refresh_s=0.2, dashboard_key_recheck_s=0.2)
    keys = KeyStore(settings.keys_path, refresh_s=0.2)
    admin = keys.create("acme", scope="admin")
    app = create_app(settings)
    with ServerThread(app) as server:
        sample = build(600, seed=1)
        send(server.url, admin, sample, say=lambda _: None)
        beta = keys.create("beta", scope="admin")
        beta_events = [
            {
                "event_type": "prompt_call",
                "event_id": f"beta-event-{i}",
                "run_id": "beta-run-1",
                "model": "beta-only-model",
                "user_id": "beta-user",
                "prompt": f"{BETA_SECRET} {i}",
                "response": "beta answer",
                "latency_ms": 250.0,
            }
            for i in range(5)
        ]
        r = httpx.post(
            server.url + "/v1/events/batch",
            json={"events": beta_events},
            headers={"Authorization": f"Bearer {beta}"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        s = Site(
            url=server.url,
            keys=keys,
            admin=admin,
            reader=keys.create("acme", scope="read"),
            ingest_only=keys.create("acme", scope="ingest"),
            beta=beta,
            operator=keys.create("ops", scope="operator"),
            beta_event="beta-event-0",
            tool_run=sample.tool_run,
            app=app,
        )
        _wait_for(s, admin, 600)
        _wait_for(s, beta, 5)
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = debian_program("chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in_browser(browser: Any, site: Site, key: str, **context: Any) -> Any:
    page = browser.new_context(**context).new_page()
    page.goto(site.url + "/")
    assert "/dashboard/signin" in page.url  # signed out: sent to sign-in
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/dashboard/(\?.*)?$"))
    return page


@contextmanager
def _session(site: Site, key: str) -> Iterator[httpx.Client]:
    """An HTTP client signed in through the sign-in form, as a browser would."""
    with httpx.Client(base_url=site.url, timeout=60) as client:
        form = client.get("/dashboard/signin")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text
        r = client.post("/dashboard/signin", data={"api_key": key, "csrf_token": token.group(1)})
        assert r.status_code == 303, r.text
        yield client


def _card(page: Any, label: str) -> str:
    return page.locator(f'[data-card="{label}"]').inner_text().strip()


# --- the pages, in a browser ------------------------------------------------------------------


def test_sign_in_overview_explorer_event_and_run(browser: Any, site: Site) -> None:
    page = _sign_in_browser(browser, site, site.admin)
    stats = site.api("/v1/analytics/stats", period="24h")
    assert stats["total_requests"] > 0
    assert page.get_by_role("heading", level=1).inner_text() == "Overview"
    # The cards show the API's own figures for the same range.
    assert _card(page, "Requests") == f"{stats['total_requests']:,}"
    assert _card(page, "Error rate") == f"{100 * stats['error_rate']:.1f}%"
    assert _card(page, "Cost") == f"${stats['total_cost']:,.2f}"
    assert page.locator(".card .change").count() >= 5  # against the previous 24 h
    for chart in ("requests", "tokens", "latency", "cost"):
        assert page.locator(f"#chart-{chart} svg polyline").count() >= 1, chart
    models = {m["model"] for m in stats["top_models"]}
    legend = set(page.locator("#chart-cost .legend li").all_inner_texts())
    assert models & legend
    _shot(page, "overview")

    # A longer range and another zone: the URL says so, the charts follow.
    page.select_option("#period", "7d")
    page.wait_for_url(re.compile(r"period=7d"))
    page.select_option("#tz", "Asia/Tokyo")
    page.wait_for_url(re.compile(r"tz=Asia%2FTokyo"))
    week = site.api("/v1/analytics/stats", period="7d")
    assert _card(page, "Requests") == f"{week['total_requests']:,}"
    # The chart's data table is labelled in the chosen zone (Tokyo is UTC+9, no DST).
    labels = page.locator("#chart-requests table tbody tr td:first-child").all_text_contents()
    series = site.api("/v1/analytics/timeseries", period="7d", tz="Asia/Tokyo")
    points = series["series"]["all"]
    assert len(labels) == len(points)
    first = datetime.fromisoformat(points[0]["t"].replace("Z", "+00:00")) + timedelta(hours=9)
    assert labels[0] == first.strftime("%Y-%m-%d %H:%M:%S")

    # The explorer: filter by status, then page with the keyset cursor.
    page.get_by_role("link", name="Requests").click()
    page.wait_for_url(re.compile(r"/dashboard/requests"))
    page.select_option("#period", "7d")
    page.wait_for_url(re.compile(r"period=7d"))
    page.select_option("#status", "error")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"status=error"))
    statuses = page.locator("table.explorer tbody td:nth-child(4)").all_inner_texts()
    api_errors = site.api("/v1/analytics/logs", period="7d", status="error", limit=50)
    assert statuses and set(s.strip() for s in statuses) == {"error"}
    assert len(statuses) == len(api_errors["events"])
    _shot(page, "explorer-errors")

    page.goto(site.url + "/dashboard/requests?period=7d")
    first = page.locator("[data-event]").evaluate_all("els => els.map(e => e.dataset.event)")
    assert len(first) == 50
    page.get_by_role("link", name="Older events").click()
    page.wait_for_url(re.compile(r"cursor="))
    second = page.locator("[data-event]").evaluate_all("els => els.map(e => e.dataset.event)")
    api_page = site.api("/v1/analytics/logs", period="7d", limit=50)
    api_next = site.api("/v1/analytics/logs", period="7d", limit=50, cursor=api_page["next_cursor"])
    assert first == [e["event_id"] for e in api_page["events"]]
    assert second == [e["event_id"] for e in api_next["events"]]
    assert not set(first) & set(second)
    # The URL is the page: a bookmark opened elsewhere shows the same rows.
    bookmark = page.url
    other = browser.new_context().new_page()
    cookies = page.context.cookies()
    other.context.add_cookies(cookies)
    other.goto(bookmark)
    assert (
        other.locator("[data-event]").evaluate_all("els => els.map(e => e.dataset.event)") == second
    )
    other.context.close()

    # An event: the prompt as chat messages or text, the JSON of every field.
    page.locator("[data-event]").first.click()
    page.wait_for_url(re.compile(r"/dashboard/event/"))
    event_id = page.url.rsplit("/", 1)[1].split("?")[0]
    detail = site.api(f"/v1/analytics/event/{event_id}")
    assert event_id in page.get_by_role("heading", level=1).inner_text()
    assert page.get_by_role("heading", name="Every stored field").is_visible()
    if detail["event"].get("run_id"):
        assert page.get_by_role("link", name=detail["event"]["run_id"]).count() >= 1
    _shot(page, "event")

    # A run with tool calls: a tree (levels below the root) with a timing waterfall.
    page.goto(f"{site.url}/dashboard/run/{site.tool_run}")
    run = site.api(f"/v1/analytics/runs/{site.tool_run}")
    rows = page.locator("table.tree tbody tr")
    assert rows.count() == _count_nodes(run["tree"])
    levels = rows.evaluate_all("rs => rs.map(r => Number(r.getAttribute('aria-level')))")
    assert max(levels) >= 2
    assert page.locator("table.tree rect.bar").count() == rows.count()
    assert run["run"]["run_id"] in page.get_by_role("heading", level=1).inner_text()
    _shot(page, "run")
    # ...and the runs list links to it.
    page.goto(f"{site.url}/dashboard/runs?period=7d")
    assert page.locator("table.explorer tbody tr").count() > 0
    page.context.close()


def _count_nodes(tree: list[dict[str, Any]]) -> int:
    return sum(1 + _count_nodes(n["children"]) for n in tree)


def test_large_payloads_fold_and_chat_messages_render(browser: Any, site: Site) -> None:
    big = "x" * 5000
    event = {
        "event_type": "prompt_call",
        "event_id": "chat-big-1",
        "run_id": "chat-run",
        "model": "gpt-4o",
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        "response": big,
        "metadata": {"feature": "checkout", "attempt": 2},
    }
    r = httpx.post(
        site.url + "/v1/events/batch",
        json={"events": [event]},
        headers={"Authorization": f"Bearer {site.admin}"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while (
        httpx.get(
            site.url + "/v1/analytics/event/chat-big-1",
            headers={"Authorization": f"Bearer {site.admin}"},
            timeout=60,
        ).status_code
        != 200
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    page = _sign_in_browser(browser, site, site.reader)
    page.goto(site.url + "/dashboard/event/chat-big-1")
    roles = page.locator("#prompt .msg .role").all_inner_texts()
    assert [r.lower() for r in roles] == ["system", "user"]
    assert page.locator("#prompt").get_attribute("open") is not None  # short: open
    assert page.locator("#response").get_attribute("open") is None  # 5,000 chars: folded
    assert not page.locator("#response pre").is_visible()
    page.locator("#response summary").click()
    assert page.locator("#response pre").is_visible()
    assert '"feature": "checkout"' in page.locator("#field-metadata pre").inner_text()
    _shot(page, "event-chat")
    page.context.close()


def test_a_new_project_shows_a_curl_command_that_works(browser: Any, site: Site) -> None:
    key = site.keys.create("fresh", scope="admin")
    page = _sign_in_browser(browser, site, key)
    assert page.get_by_role("heading", name="No events yet in project fresh").is_visible()
    command = page.locator("#example-curl").inner_text()
    assert site.url in command and "$WATCHLLM_API_KEY" in command
    python = page.locator("#example-python").inner_text()
    assert site.url in python and "WATCHLLM_API_KEY" in python
    _shot(page, "empty")
    # The command as shown, pasted into a shell: the event arrives and the page shows it.
    done = subprocess.run(
        ["bash", "-c", command + " -w '\\n%{http_code}'"],
        env={**os.environ, "WATCHLLM_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip().endswith("202"), done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while True:
        page.reload()
        # (a reload between the store's answers may see the range empty for a moment)
        if page.locator('[data-card="Requests"]').count() and _card(page, "Requests") == "1":
            break
        assert time.monotonic() < deadline, "the curl event did not show"
        time.sleep(0.2)
    assert not page.locator("#example-curl").count()  # the empty state is gone
    # The Python shown beside it, run as it is: its event arrives too.
    ran = subprocess.run(
        [sys.executable, "-c", python],
        env={**os.environ, "WATCHLLM_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0 and not ran.stderr, ran.stdout + ran.stderr
    deadline = time.monotonic() + 30
    while _card(page, "Requests") != "2":
        assert time.monotonic() < deadline, "the Python snippet's event did not show"
        time.sleep(0.2)
        page.reload()
    page.context.close()


def test_overview_refreshes_itself(browser: Any, site: Site) -> None:
    """Auto-refresh swaps the figures in place (the browser's clock is moved on, not waited)."""
    key = site.keys.create("ticker", scope="admin")

    def send_one(i: int) -> None:
        r = httpx.post(
            site.url + "/v1/events/batch",
            json={"events": [{"event_type": "prompt_call", "run_id": f"tick-{i}", "model": "m"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 202, r.text

    send_one(1)
    _wait_for(site, key, 1)
    page = _sign_in_browser(browser, site, key)
    page.clock.install()
    page.goto(site.url + "/dashboard/?refresh=30")
    assert _card(page, "Requests") == "1"
    send_one(2)
    _wait_for(site, key, 2)
    page.evaluate("window.loadedOnce = true")  # gone if the page were reloaded instead
    page.clock.fast_forward("00:31")
    deadline = time.monotonic() + 15
    while _card(page, "Requests") != "2":  # the page's CSP allows no string eval to wait on
        assert time.monotonic() < deadline, "the overview did not refresh"
        time.sleep(0.1)
    assert page.evaluate("window.loadedOnce") is True
    page.context.close()


def test_phone_width_and_dark_theme(browser: Any, site: Site) -> None:
    page = _sign_in_browser(
        browser,
        site,
        site.reader,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
    )
    # Nothing wider than the screen but the scrolling tables.
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert _rgb(background) == _rgb_hex("#111418")
    _shot(page, "overview-phone-dark")
    page.context.close()


# --- accessibility ----------------------------------------------------------------------------


def _rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return r, g, b


def _rgb_hex(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return r, g, b


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def test_palettes_meet_wcag_graphics_contrast() -> None:
    for colour in charts.LIGHT_PALETTE:
        assert charts.contrast(colour, charts.LIGHT_BACKGROUND) >= 3.0, colour
    for colour in charts.DARK_PALETTE:
        assert charts.contrast(colour, charts.DARK_BACKGROUND) >= 3.0, colour
    # The check itself: black on white is 21, a colour on itself 1.
    assert round(charts.contrast("#000000", "#ffffff"), 1) == 21.0
    assert charts.contrast("#777777", "#777777") == 1.0


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessibility_in_the_browser(browser: Any, site: Site, scheme: str) -> None:
    page = _sign_in_browser(browser, site, site.admin, color_scheme=scheme)
    paths = [
        "/dashboard/?period=7d",
        "/dashboard/requests?period=7d",
        f"/dashboard/run/{site.tool_run}",
        "/dashboard/runs?period=7d",
    ]
    for path in paths:
        page.goto(site.url + path)
        # Every form control has a label a screen reader reads.
        unlabeled = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                .map(el => el.name || el.id)"""
        )
        assert unlabeled == [], (path, unlabeled)
        # One h1, and headings that never skip a level.
        levels = page.evaluate(
            "() => [...document.querySelectorAll('h1,h2,h3,h4')].map(h => Number(h.tagName[1]))"
        )
        assert levels.count(1) == 1, (path, levels)
        assert all(b - a <= 1 for a, b in itertools.pairwise(levels)), (path, levels)
        # Every chart has a name.
        names = page.evaluate(
            "() => [...document.querySelectorAll('svg[role=img]')]"
            ".map(s => s.getAttribute('aria-label'))"
        )
        assert all(names), path
    # The chart colours as the browser paints them, against the panel they sit on.
    page.goto(site.url + "/dashboard/?period=7d")
    panel = _hex(
        _rgb(page.evaluate("getComputedStyle(document.querySelector('.panel')).backgroundColor"))
    )
    strokes = page.evaluate(
        "() => [...document.querySelectorAll('svg.chart polyline')]"
        ".map(p => getComputedStyle(p).stroke)"
    )
    assert strokes
    for stroke in set(strokes):
        assert charts.contrast(_hex(_rgb(stroke)), panel) >= 3.0, (stroke, panel)
    # Text: muted labels on panels pass WCAG AA for normal text (4.5:1).
    muted = page.evaluate("getComputedStyle(document.querySelector('.card .label')).color")
    assert charts.contrast(_hex(_rgb(muted)), panel) >= 4.5
    _shot(page, f"overview-{scheme}")

    # The keyboard: the first Tab reaches the skip link, which moves focus to the content.
    page.goto(site.url + "/dashboard/requests?period=7d")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # j / k walk the rows; Enter opens the focused one.
    page.keyboard.press("j")
    page.keyboard.press("j")
    second = page.evaluate("document.activeElement.dataset.event")
    rows = page.locator("[data-event]").evaluate_all("els => els.map(e => e.dataset.event)")
    assert second == rows[1]
    page.keyboard.press("k")
    assert page.evaluate("document.activeElement.dataset.event") == rows[0]
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"/dashboard/event/{re.escape(rows[0])}"))
    page.context.close()


def test_sign_in_form_by_keyboard_alone(browser: Any, site: Site) -> None:
    page = browser.new_context().new_page()
    page.goto(site.url + "/dashboard/signin")
    assert page.evaluate("document.activeElement.id") == "api_key"  # autofocus
    page.keyboard.type(site.reader)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/dashboard/$"))
    assert page.get_by_role("heading", level=1).inner_text() == "Overview"
    # A wrong key: the message names the field, the field is marked invalid.
    page.context.clear_cookies()
    page.goto(site.url + "/dashboard/signin")
    page.get_by_label("API key").fill("wllm_nope_nope")
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    assert "api_key" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    page.context.close()


# --- isolation and sessions (HTTP: what a browser would send, and what it must not get) -------


def test_a_project_key_never_sees_another_projects_data(site: Site) -> None:
    with _session(site, site.admin) as acme:
        pages = [
            "/dashboard/?period=30d",
            "/dashboard/requests?period=30d",
            "/dashboard/runs?period=30d",
            "/dashboard/requests?period=30d&model=beta-only-model",
            "/dashboard/requests?period=30d&run_id=beta-run-1",
            "/dashboard/requests?period=30d&q=BETA-SECRET",
        ]
        for path in pages:
            r = acme.get(path)
            assert r.status_code == 200, (path, r.text)
            assert BETA_SECRET not in r.text and "beta-user" not in r.text, path
            if "&" in path:  # a filter naming beta's values: its value is in the form, no row
                assert "data-event=" not in r.text, path
            else:
                assert "beta-only-model" not in r.text and "beta-run-1" not in r.text, path
        # URL edits: another project's id, event, run.
        r = acme.get("/dashboard/requests?project_id=beta")
        assert r.status_code == 403 and "project_id" in r.text and BETA_SECRET not in r.text
        r = acme.get("/dashboard/?project_id=beta")
        assert r.status_code == 403 and "beta-only-model" not in r.text
        r = acme.get(f"/dashboard/event/{site.beta_event}")
        assert r.status_code == 404 and BETA_SECRET not in r.text and "event_id" in r.text
        r = acme.get("/dashboard/run/beta-run-1")
        assert r.status_code == 404 and BETA_SECRET not in r.text
        r = acme.get(f"/dashboard/event/{site.beta_event}?project_id=beta")
        assert r.status_code == 403 and BETA_SECRET not in r.text
        # No project switcher for a project's key: it reads one project.
        assert 'name="project_id"' not in acme.get("/dashboard/").text
    with _session(site, site.beta) as beta:
        r = beta.get(f"/dashboard/event/{site.beta_event}")
        assert r.status_code == 200 and BETA_SECRET in r.text
        assert "beta-only-model" in beta.get("/dashboard/requests?period=30d").text
    # An operator key reads any project it names (the switcher), and each page keeps it.
    with _session(site, site.operator) as ops:
        page = ops.get("/dashboard/requests?period=30d&project_id=beta")
        assert page.status_code == 200 and "beta-only-model" in page.text
        assert 'name="project_id"' in page.text
        assert "project_id=beta" in ops.get("/dashboard/?project_id=beta").text


@pytest.mark.parametrize(
    "tz", ["Nope/Zone", "right/UTC", "../../../etc/passwd", "localtime", "Europe", "a" * 300]
)
def test_every_page_refuses_an_unknown_zone_as_the_overview_does(site: Site, tz: str) -> None:
    """The requests, runs, event and run pages answer a `tz` Python does not know as the
    overview does (the API's 400 naming tz), not with the zone in their headings."""
    with _session(site, site.admin) as acme:
        overview = acme.get("/dashboard/", params={"tz": tz})
        assert overview.status_code == 400
        message = re.search(r"tz: unknown time zone[^<]*", overview.text)
        assert message, overview.text
        for path in (
            "/dashboard/requests",
            "/dashboard/runs",
            f"/dashboard/run/{site.tool_run}",
            "/dashboard/event/no-such-event",
        ):
            page = acme.get(path, params={"tz": tz})
            assert page.status_code == 400, (path, page.text)
            assert message.group(0) in page.text, path
            assert "newest first (" not in page.text


def test_the_overview_refuses_a_refresh_it_does_not_offer(site: Site) -> None:
    """`refresh=<b>` was shown as the 60 s default without a word: 400 naming refresh."""
    with _session(site, site.admin) as acme:
        page = acme.get("/dashboard/", params={"refresh": "<b>"})
        assert page.status_code == 400, page.text
        assert "refresh: one of 0, 30, 60, 300 (seconds; 0 is off)" in page.text
        assert acme.get("/dashboard/", params={"refresh": "300"}).status_code == 200


def test_a_known_zone_is_shown_on_the_explorer_pages(site: Site) -> None:
    with _session(site, site.admin) as acme:
        for path in ("/dashboard/requests", "/dashboard/runs"):
            page = acme.get(path, params={"tz": "Asia/Tokyo", "period": "30d"})
            assert page.status_code == 200 and "(Asia/Tokyo)" in page.text, path


def test_signed_out_users_are_sent_to_sign_in(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=60) as anon:
        for path in [
            "/",
            "/dashboard/",
            "/dashboard/requests?status=error",
            "/dashboard/runs",
            f"/dashboard/event/{site.beta_event}",
            "/dashboard/run/beta-run-1",
        ]:
            r = anon.get(path)
            assert r.status_code == 303, path
            location = r.headers["location"]
            if path != "/":
                assert location.startswith("/dashboard/signin?"), path
                assert parse_qs(urlsplit(location).query)["next"] == [path]
        page = anon.get("/dashboard/signin")
        assert page.status_code == 200 and "<title>Sign in · WatchLLM</title>" in page.text
        # A forged or damaged cookie is no session.
        anon.cookies.set("watchllm_session", "AAAA" * 30)
        assert anon.get("/dashboard/").status_code == 303
    # A session cookie altered by one byte is refused.
    with _session(site, site.reader) as client:
        real = client.cookies["watchllm_session"]
        assert client.get("/dashboard/").status_code == 200
        flipped = real[:-3] + ("A" if real[-3] != "A" else "B") + real[-2:]
        client.cookies.set("watchllm_session", flipped)
        assert client.get("/dashboard/").status_code == 303
    # Sign-in returns to the page asked for, never to another site.
    with httpx.Client(base_url=site.url, timeout=60) as c:
        form = c.get("/dashboard/signin?next=https://evil.example/")
        assert "evil.example" not in form.text


def test_forms_without_the_csrf_token_are_refused(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=60) as c:
        c.get("/dashboard/signin")  # has the CSRF cookie, but the post lacks the token
        r = c.post("/dashboard/signin", data={"api_key": site.reader})
        assert r.status_code == 403 and "csrf_token" in r.text
        assert "watchllm_session" not in c.cookies
        r = c.post("/dashboard/signin", data={"api_key": site.reader, "csrf_token": "guess"})
        assert r.status_code == 403
    with _session(site, site.reader) as c:
        r = c.post("/dashboard/signout", data={})
        assert r.status_code == 403 and "csrf_token" in r.text
        assert c.get("/dashboard/").status_code == 200  # still signed in
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/dashboard/").text).group(1)  # type: ignore[union-attr]
        copied = c.cookies["watchllm_session"]  # a copy of the cookie, taken before
        r = c.post("/dashboard/signout", data={"csrf_token": token})
        assert r.status_code == 303 and "why=out" in r.headers["location"]
        assert c.get("/dashboard/").status_code == 303
    # The copy no longer signs in: the session ended on the server too, not only the cookie.
    with httpx.Client(base_url=site.url, timeout=60) as thief:
        thief.cookies.set("watchllm_session", copied)
        assert thief.get("/dashboard/").status_code == 303
    with _session(site, site.reader) as again:  # a new sign-in of the same key is a new session
        assert again.get("/dashboard/").status_code == 200


def test_keys_without_read_scope_or_not_valid_cannot_sign_in(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=60) as c:
        for key, status in ((site.ingest_only, 403), ("wllm_aaaaaaaaaaaa_nope", 401), ("", 400)):
            form = c.get("/dashboard/signin")
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
            r = c.post("/dashboard/signin", data={"api_key": key, "csrf_token": token})
            assert r.status_code == status, (key, r.text)
            assert "api_key" in r.text and "watchllm_session" not in c.cookies


def test_a_revoked_keys_session_ends(site: Site) -> None:
    key = site.keys.create("acme", scope="read")
    with _session(site, key) as c:
        assert c.get("/dashboard/requests").status_code == 200
        key_id = split_key(key)[0]  # type: ignore[index]
        assert site.keys.revoke(key_id)
        deadline = time.monotonic() + 10
        while True:
            r = c.get("/dashboard/requests")
            if r.status_code == 303:
                break
            assert time.monotonic() < deadline, "the revoked key's session went on"
            time.sleep(0.1)
        assert "why=ended" in r.headers["location"]
        assert "watchllm_session" not in c.cookies  # the cookie was cleared
        assert "no longer valid" in c.get(r.headers["location"]).text


def test_session_cookie_is_encrypted_httponly_lax_and_secret_file_private(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=60) as c:
        token = re.search(
            r'name="csrf_token" value="([^"]+)"', c.get("/dashboard/signin").text
        ).group(1)  # type: ignore[union-attr]
        r = c.post("/dashboard/signin", data={"api_key": site.reader, "csrf_token": token})
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("watchllm_session="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=lax" in flags
    assert "secure" not in flags  # plain http on loopback; see the next test for TLS
    value = cookie.split(";")[0].split("=", 1)[1]
    import base64

    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    secret_part = site.reader.rsplit("_", 1)[1]
    assert secret_part.encode() not in raw and site.reader.encode() not in raw
    settings = site.app.state.watchllm.settings
    mode = stat.S_IMODE((Path(settings.data_dir) / SECRET_FILE).stat().st_mode)
    assert mode == 0o600
    # Pages are never cached, and scripts come from this server only.
    with _session(site, site.reader) as c:
        page = c.get("/dashboard/")
        assert page.headers["cache-control"] == "no-store"
        assert "default-src 'self'" in page.headers["content-security-policy"]


# --- the waterfall's geometry ---------------------------------------------------------------


def test_waterfall_places_nodes_on_the_runs_time() -> None:
    def node(i: str, ts: str, ms: float, children: list[Any] | None = None) -> dict[str, Any]:
        return {
            "kind": "event",
            "id": i,
            "timestamp": ts,
            "event": {"event_type": "prompt_call", "model": "m", "latency_ms": ms},
            "children": children or [],
        }

    tree = [
        node(
            "root",
            "2026-01-01T00:00:00.000Z",
            1000,
            [node("child", "2026-01-01T00:00:00.500Z", 500)],
        )
    ]
    rows = waterfall(tree)
    assert [(r.id, r.depth) for r in rows] == [("root", 0), ("child", 1)]
    assert rows[0].left == 0 and rows[0].width == 100
    assert rows[1].left == 50 and rows[1].width == 50
    assert waterfall([]) == []
