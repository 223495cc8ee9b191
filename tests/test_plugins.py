"""The plugin system: discovery (entry point, settings, create_app) and one test per hook."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from conftest import Running, prompt_call
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchllm_ext import hookimpl, hookspecs
from watchllm_ext.auth import Principal
from watchllm_ext.ingest.validate import OFFLOAD_MIN_BYTES
from watchllm_ext.plugins import PluginError, get_plugin_manager
from watchllm_ext.quota import QuotaDecision
from watchllm_ext.settings import Settings
from watchllm_ext.testing import MemorySink

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "redact_emails"
HOOK_NAMES = sorted(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "watchllm_spec")
)


@pytest.fixture
def example_on_path() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLE_DIR))
    yield
    sys.path.remove(str(EXAMPLE_DIR))
    sys.modules.pop("watchllm_redact_emails", None)


@pytest.fixture
def example_entry_point(tmp_path: Path, example_on_path: None) -> Iterator[None]:
    """Make the example plugin discoverable as an installed distribution would be."""
    dist = tmp_path / "site" / "watchllm_redact_emails-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: watchllm-redact-emails\nVersion: 0.1.0\n"
    )
    (dist / "entry_points.txt").write_text("[watchllm]\nredact_emails = watchllm_redact_emails\n")
    sys.path.insert(0, str(dist.parent))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(dist.parent))
    importlib.invalidate_caches()


def _redaction_roundtrip(server: Running) -> None:
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={
            "events": [
                prompt_call("r1", prompt="mail bob@example.com now", response="ok"),
                prompt_call("r2", user_id="alice@example.com"),
            ]
        },
    )
    assert r.status_code == 207, r.text
    assert r.json()["rejected"][0]["errors"] == [
        {"field": "user_id", "message": "must be an opaque id, not an e-mail address"}
    ]
    server.flush()
    assert server.query("SELECT prompt FROM events") == [{"prompt": "mail [email] now"}]
    assert server.client.get("/-/redactions").status_code == 401  # a key is asked for
    counted = server.client.get("/-/redactions", headers=server.headers()).json()
    assert counted == {"project_id": "acme", "redacted_total": 1}
    plugins = server.client.get("/-/plugins", headers=server.headers()).json()["plugins"]
    return plugins


def test_plugin_from_entry_point(server_factory: Any, example_entry_point: None) -> None:
    server = server_factory()
    plugins = _redaction_roundtrip(server)
    found = {p["name"]: p for p in plugins}
    assert found["redact_emails"]["distribution"] == "watchllm-redact-emails"
    assert found["redact_emails"]["version"] == "0.1.0"
    assert found["redact_emails"]["hooks"] == [
        "register_routes",
        "transform_events",
        "transform_spans",
        "validate_event",
    ]
    # Our own store plugin comes through the same entry-point group.
    assert "register_store" in found["chdb_store"]["hooks"]


def test_plugin_from_settings(server_factory: Any, example_on_path: None) -> None:
    server = server_factory(plugins=["watchllm_redact_emails"])
    plugins = _redaction_roundtrip(server)
    assert "watchllm_redact_emails" in {p["name"] for p in plugins}


def test_a_plugin_installed_and_named_in_settings_loads_once(
    server_factory: Any, example_entry_point: None
) -> None:
    # Its make_plugin gives a new object each load: only the module tells it is the same one.
    server = server_factory(plugins=["watchllm_redact_emails"])
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call("r1", user_id="alice@example.com")]},
    )
    assert len(r.json()["rejected"][0]["errors"]) == 1, r.text
    names = {
        p["name"]
        for p in server.client.get("/-/plugins", headers=server.headers()).json()["plugins"]
    }
    assert "redact_emails" in names and "watchllm_redact_emails" not in names


def test_plugin_from_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WATCHLLM_PLUGINS", "json, watchllm_ext.testing")
    settings = Settings(data_dir=tmp_path)
    assert settings.plugins == ["json", "watchllm_ext.testing"]


def test_bad_plugin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="no_such_module"):
        get_plugin_manager(Settings(data_dir=tmp_path, plugins=["no_such_module"]))

    class Misspelled:
        @hookimpl
        def transform_event(self, events: Any) -> None:  # the hook is transform_events
            pass

    with pytest.raises(PluginError, match="transform_event"):
        get_plugin_manager(Settings(data_dir=tmp_path), [Misspelled()])


def test_builtins_can_be_disabled(tmp_path: Path) -> None:
    pm = get_plugin_manager(Settings(data_dir=tmp_path, disable_plugins=["cost", "chdb_store"]))
    names = {name for name, _ in pm.list_name_plugin()}
    assert "watchllm_ext.builtins.cost" not in names and "chdb_store" not in names
    assert "watchllm_ext.builtins.key_auth" in names


def test_every_hook_has_a_test_and_docs() -> None:
    tests = {name for name in globals() if name.startswith("test_hook_")}
    assert tests == {f"test_hook_{name}" for name in HOOK_NAMES}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "PLUGINS.md").read_text()
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        assert f"`{name}(" in docs, f"{name} is not documented in docs/PLUGINS.md"
        for arg in spec.__code__.co_varnames[: spec.__code__.co_argcount]:
            assert arg in docs, f"argument {arg} of {name} is not documented"


# --- one test per hook ------------------------------------------------------------------------


class HeaderAuth:
    """Trusts a gateway's token format: 'gw:<project>'."""

    @hookimpl
    def authenticate(self, token: str, request: Request | None) -> Principal | None:
        if token.startswith("gw:"):
            return Principal(token[3:], frozenset({"ingest"}))
        return None


def test_hook_authenticate(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(HeaderAuth(),))
    r = server.client.post(
        "/v1/projects/team7/events",
        json=prompt_call(),
        headers={"Authorization": "Bearer gw:team7"},
    )
    assert r.status_code == 202, r.text
    # Built-in keys still work (the built-in is asked last).
    r = server.client.post("/v1/projects/acme/events", json=prompt_call(), headers=server.headers())
    assert r.status_code == 202


class FixedQuota:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @hookimpl
    async def check_quota(self, principal: Principal, n_events: int) -> QuotaDecision:
        if self.used + n_events > self.limit:
            return QuotaDecision(
                False,
                retry_after_s=30,
                limit=self.limit,
                remaining=self.limit - self.used,
                reason="monthly event quota",
            )
        self.used += n_events
        return QuotaDecision(True)


def test_hook_check_quota(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(FixedQuota(3),))
    ok = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call(f"q{i}") for i in range(3)]},
    )
    assert ok.status_code == 202
    denied = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("q9")]}
    )
    assert denied.status_code == 429
    assert denied.headers["Retry-After"] == "30"
    assert denied.headers["X-RateLimit-Limit"] == "3"
    assert denied.headers["X-RateLimit-Remaining"] == "0"
    assert denied.json()["message"] == "monthly event quota"
    server.flush()
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == 3


class RefundedQuota(FixedQuota):
    """FixedQuota that takes back what ingestion refused."""

    @hookimpl
    async def refund_quota(self, principal: Principal, n_events: int) -> None:
        self.used -= n_events


def test_hook_refund_quota(server_factory: Any) -> None:
    quota = RefundedQuota(3)
    server = server_factory(plugin_objects=(quota,))
    h = server.headers()
    bad = {"event_type": "bogus"}
    r = server.client.post("/v1/events/batch", headers=h, json={"events": [bad, bad, bad]})
    assert r.status_code == 422 and quota.used == 0  # refused whole: all three given back
    events = [prompt_call("r1"), bad, prompt_call("r2")]
    r = server.client.post("/v1/events/batch", headers=h, json={"events": events})
    assert r.status_code == 207 and quota.used == 2  # the invalid one given back
    r = server.client.post("/v1/events/batch", headers=h, json={"events": [prompt_call("r3")]})
    assert r.status_code == 202 and quota.used == 3  # nothing to give back


class RequireModel:
    @hookimpl
    def validate_event(self, event: Any, principal: Principal) -> Sequence[str] | None:
        if event.event_type == "prompt_call" and not event.model:
            return ["model is required by this deployment"]
        return None


def test_hook_validate_event(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(RequireModel(),))
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call("v1"), prompt_call("v2", model=None)]},
    )
    assert r.status_code == 207
    assert r.json()["rejected"] == [
        {
            "index": 1,
            "event_id": "v2",
            "errors": [{"field": "(event)", "message": "model is required by this deployment"}],
        }
    ]


class RequireUser:
    """Names the field it checks, alone or among plain problems."""

    @hookimpl
    def validate_event(self, event: Any, principal: Principal) -> Any:
        if "user_id" in event.metadata:
            return None
        missing = {"field": "metadata.user_id", "message": "a user id is required"}
        if event.event_id.endswith("1"):
            return MappingProxyType(missing)  # any mapping, not only a dict
        return [missing, "and a second problem"]


def test_a_validator_names_a_field(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(RequireUser(),))
    events = [prompt_call("f1"), prompt_call("f2"), prompt_call("f3", metadata={"user_id": "u"})]
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": events})
    assert r.status_code == 207, r.text
    missing = {"field": "metadata.user_id", "message": "a user id is required"}
    assert r.json()["rejected"] == [
        {"index": 0, "event_id": "f1", "errors": [missing]},
        {
            "index": 1,
            "event_id": "f2",
            "errors": [missing, {"field": "(event)", "message": "and a second problem"}],
        },
    ]


class AddTag:
    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        for event in events:
            event.tags = [*event.tags, f"project:{principal.project_id}"]


def test_hook_transform_events(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(AddTag(),))
    r = server.client.post(
        "/v1/projects/acme/events", headers=server.headers(), json=prompt_call("t1", tags=["x"])
    )
    assert r.status_code == 202
    server.flush()
    assert server.query("SELECT tags FROM events") == [{"tags": ["x", "project:acme"]}]


class TagSpans:
    """Sets an attribute on every span row, and notes whose rows it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def transform_spans(self, spans: list[Any], principal: Principal) -> None:
        for span in spans:
            self.seen.append((principal.project_id, span.name))
            span.attributes = {**span.attributes, "tagged.by": f"project:{principal.project_id}"}


def test_hook_transform_spans(server_factory: Any) -> None:
    tagger = TagSpans()
    server = server_factory(plugin_objects=(tagger,))
    start = time.time_ns()
    span = {"traceId": "5b8efff798038103d269b633813fc60c", "startTimeUnixNano": str(start)}
    spans = [
        {**span, "spanId": "eee19b7ec3c1b174", "name": "render", "endTimeUnixNano": str(start)},
        {
            **span,
            "spanId": "eee19b7ec3c1b175",
            "name": "chat gpt-4o",
            "endTimeUnixNano": str(start),
            "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}],
        },
    ]
    body = {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}
    r = server.client.post("/v1/traces", headers=server.headers(), json=body)
    assert r.status_code == 200, r.text
    server.flush()
    rows = server.query("SELECT name, attributes FROM spans FINAL ORDER BY name")
    assert [row["name"] for row in rows] == ["chat gpt-4o", "render"]
    assert all(row["attributes"]["tagged.by"] == "project:acme" for row in rows)
    assert sorted(tagger.seen) == [("acme", "chat gpt-4o"), ("acme", "render")]


class WhereHooksRun:
    """Records, per call, whether the hook ran on the event loop's thread."""

    def __init__(self) -> None:
        self.on_loop: dict[str, list[bool]] = {"validate_event": [], "transform_events": []}

    @staticmethod
    def _on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    @hookimpl
    def validate_event(self, event: Any, principal: Principal) -> None:
        self.on_loop["validate_event"].append(self._on_loop())

    @hookimpl
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        self.on_loop["transform_events"].append(self._on_loop())


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "per-event"])
def test_validators_and_transforms_of_big_bodies_run_on_a_worker_thread(
    server_factory: Any, fast_path: bool
) -> None:
    """As docs/PLUGINS.md says: a body of OFFLOAD_MIN_BYTES or more has its validate_event and
    transform_events called off the event loop, a smaller one on it."""
    where = WhereHooksRun()
    server = server_factory(plugin_objects=(where,))
    # An invalid event sends the batch down the per-event path instead of the fast one; it is
    # rejected by the schema, so the validators see one event fewer.
    extra = {} if fast_path else {"tokens_input": -1}
    small = {"events": [prompt_call("small-1"), prompt_call("small-2", **extra)]}
    events = [prompt_call(f"big-{i}", prompt="x" * 1000) for i in range(100)]
    events[1].update(extra)
    big = {"events": events}
    for body, on_loop in ((small, True), (big, False)):
        where.on_loop = {"validate_event": [], "transform_events": []}
        content = json.dumps(body).encode()
        assert (len(content) >= OFFLOAD_MIN_BYTES) is not on_loop
        r = server.client.post("/v1/events/batch", headers=server.headers(), content=content)
        assert r.status_code == (202 if fast_path else 207), r.text
        validated = len(body["events"]) - (0 if fast_path else 1)
        assert where.on_loop["validate_event"] == [on_loop] * validated
        assert where.on_loop["transform_events"] == [on_loop]


class NoStore:
    @hookimpl(tryfirst=True)
    def register_store(self, settings: Settings) -> Any:
        return OtherStore()


class OtherStore:
    name = "other"

    def __init__(self) -> None:
        self.inserted: dict[str, int] = {}

    def execute(self, sql: str, params: Any = None) -> None:
        pass

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        if "version()" in sql:
            return [{"v": "0-test"}]
        return []

    def insert(self, table: str, data: Any) -> None:
        self.inserted[table] = self.inserted.get(table, 0) + data.num_rows

    def version(self) -> str:
        return "0-test"

    def close(self) -> None:
        pass


def test_hook_register_store(server_factory: Any) -> None:
    # A store plugin takes precedence over the embedded chDB store (which is trylast).
    server = server_factory(plugin_objects=(NoStore(),))
    assert server.wl.store.name == "other"
    r = server.client.post("/v1/projects/acme/events", headers=server.headers(), json=prompt_call())
    assert r.status_code == 202
    server.flush()
    assert server.wl.store.inserted == {"events": 1}
    assert server.client.get("/readyz").json()["checks"]["store"]["version"] == "0-test"


def test_hook_register_sinks(server_factory: Any) -> None:
    sink = MemorySink()
    server = server_factory(plugin_objects=(sink,))
    r = server.client.post(
        "/v1/events/batch",
        headers=server.headers(),
        json={"events": [prompt_call(f"s{i}") for i in range(4)]},
    )
    assert r.status_code == 202
    server.flush()
    assert [e.event_id for e in sink.events] == ["s0", "s1", "s2", "s3"]
    # The store sink got the same batch.
    assert server.query("SELECT count() AS n FROM events")[0]["n"] == 4


class ExtraRoute:
    @hookimpl
    def register_routes(self, settings: Settings) -> list[Route]:
        async def hello(request: Request) -> JSONResponse:
            return JSONResponse({"data_dir": str(settings.data_dir)})

        return [Route("/-/hello", hello)]


def test_hook_register_routes(server_factory: Any) -> None:
    server = server_factory(plugin_objects=(ExtraRoute(),))
    assert server.client.get("/-/hello").json() == {"data_dir": str(server.settings.data_dir)}


class Ticker:
    """Background tasks: one that ticks until the server stops, one that fails at once."""

    def __init__(self) -> None:
        self.ticks = 0
        self.cancelled = False
        self.store_name: str | None = None

    @hookimpl
    def register_background_tasks(self, settings: Settings, store: Any) -> list[Any]:
        self.store_name = store.name if store is not None else None

        async def tick() -> None:
            import anyio

            try:
                while True:
                    self.ticks += 1
                    await anyio.sleep(0.01)
            except anyio.get_cancelled_exc_class():
                self.cancelled = True
                raise

        async def fail() -> None:
            raise RuntimeError("broken background task")

        return [tick, fail]


def test_hook_register_background_tasks(
    server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ticker = Ticker()
    server = server_factory(plugin_objects=(ticker,))
    assert ticker.store_name == "chdb"  # called after the store is open
    deadline = time.monotonic() + 5
    while ticker.ticks < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ticker.ticks >= 5
    # The failing task is logged with its name; the server keeps serving.
    assert any("fail" in r.getMessage() and r.exc_info for r in caplog.records)
    response = server.client.post(
        "/v1/projects/acme/events", json=prompt_call(), headers=server.headers()
    )
    assert response.status_code == 202
    server.stop()
    assert ticker.cancelled


class BetaForOneUser:
    """A flag provider: `beta` is on for user u1 only; no opinion on any other flag."""

    @hookimpl
    def feature_enabled(
        self, name: str, principal: Principal, user_id: str | None, default: bool
    ) -> bool | None:
        if name != "beta":
            return None
        return user_id == "u1" and principal.project_id == "acme"


def test_hook_feature_enabled(tmp_path: Path) -> None:
    from watchllm_ext.flags import feature_enabled

    settings = Settings(data_dir=tmp_path, flags={"beta": True, "guardian": True})
    pm = get_plugin_manager(settings, [BetaForOneUser()], entry_points=False)
    acme = Principal("acme", frozenset({"ingest"}))
    # The plugin is asked before the built-in provider (settings), which it overrules.
    assert feature_enabled(pm, "beta", acme, user_id="u1")
    assert not feature_enabled(pm, "beta", acme, user_id="u2")
    assert not feature_enabled(pm, "beta", acme)
    # No opinion: the built-in provider answers, and `default` when nobody knows the flag.
    assert feature_enabled(pm, "guardian", acme)
    assert feature_enabled(pm, "nobody-knows", acme, default=True)


class AlertListener:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    async def on_alert(self, alert: Any) -> None:
        self.seen.append((alert.state, alert.rule.name))


class BrokenListener:
    @hookimpl
    def on_alert(self, alert: Any) -> None:
        raise RuntimeError("notifier down")


def test_hook_on_alert(server_factory: Any) -> None:
    from datetime import UTC, datetime

    listener = AlertListener()
    server = server_factory(
        plugin_objects=(listener, BrokenListener()),
        flags={"guardian": True},
        guardian_rules=[{"name": "errs", "metric": "error_rate", "threshold": 0.5}],
        guardian_interval_s=0.2,
    )
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")

    def batch(statuses: list[str], prefix: str) -> dict[str, Any]:
        return {
            "events": [
                prompt_call(f"{prefix}{i}", status=s, timestamp=now) for i, s in enumerate(statuses)
            ]
        }

    r = server.client.post("/v1/events/batch", headers=server.headers(), json=batch(["error"], "a"))
    assert r.status_code == 202
    deadline = time.monotonic() + 10
    while not listener.seen and time.monotonic() < deadline:
        time.sleep(0.02)
    body = batch(["success"] * 3, "b")  # 1 error in 4: back under 0.5
    assert server.client.post("/v1/events/batch", headers=server.headers(), json=body).status_code
    while len(listener.seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    # Once per episode start, once at recovery; the broken listener stops nobody.
    assert listener.seen == [("firing", "errs"), ("recovered", "errs")]
