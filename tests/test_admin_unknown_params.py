"""A query parameter an admin route does not accept is a 400 naming it, never ignored.

A misspelled `project` used to be dropped: an operator key then counted, or replayed the dead
letters of, every project. The admin routes declare what they accept with the analytics
routes' `accepts` (tests/test_analytics_unknown_params.py); these tests take the names from
those declarations, over a real server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import Running
from test_scopes import OWN, Picky, _dead_letter

from watchllm_ext.openapi import build_document


def _refused(r: httpx.Response, name: str, accepted: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_parameter" and body["field"] == name, body
    assert body["message"] == (
        f"{name}: unknown query parameter {name!r}; this route accepts: {accepted}"
    ), body


def test_a_misspelled_count_parameter_is_a_400_naming_it(server: Running) -> None:
    operator = server.headers(server.keys.create(OWN, scope="operator"))
    r = server.client.get("/v1/admin/count?projetc=calc", headers=operator)
    _refused(r, "projetc", "project, run, table")
    assert server.client.get("/v1/admin/count?project=calc", headers=operator).status_code == 200


def test_a_misspelled_replay_parameter_is_a_400_and_nothing_is_replayed(
    server_factory: Any,
) -> None:
    sink = Picky()
    server: Running = server_factory(plugin_objects=(sink,))
    operator = server.headers(server.keys.create(OWN, scope="operator"))
    _dead_letter(server, "d1")
    folder = server.settings.spool_path / "dead-letter"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    sink.accept_all = True

    r = server.client.post("/v1/admin/dead-letters/replay?projcet=acme&snk=picky", headers=operator)
    _refused(r, "projcet", "project, sink")
    r = server.client.post("/v1/admin/dead-letters/replay?snk=picky", headers=operator)
    _refused(r, "snk", "project, sink")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    server.flush()
    assert sink.got == []
    # Spelled right, the same replay is done.
    r = server.client.post(
        "/v1/admin/dead-letters/replay?project=acme&sink=picky", headers=operator
    )
    assert (r.status_code, r.json()["replayed_events"]) == (200, 1), r.text


def test_a_sink_that_neither_runs_nor_has_dead_letters_is_a_400(server_factory: Any) -> None:
    """Listing the dead letters of a misspelled sink listed nothing, as if all were well (and
    took any name: 5,000 characters, a NUL); a sink with dead letters is listed, and so is
    one that runs and has none."""
    sink = Picky()
    server: Running = server_factory(plugin_objects=(sink,))
    _dead_letter(server, "d1")
    headers = server.headers()

    def listed(name: str) -> httpx.Response:
        return server.client.get("/v1/admin/dead-letters", params={"sink": name}, headers=headers)

    for name in ("pciky", "\x00"):
        r = listed(name)
        assert r.status_code == 400, r.text
        body = r.json()
        assert (body["error"], body["field"]) == ("unknown_sink", "sink"), body
        assert body["message"].startswith(f"no sink named {name!r} is running"), body
        assert "picky" in body["message"]  # the running ones, to pick from
    r = listed("x" * 5000)
    assert (r.status_code, r.json()["field"]) == (400, "sink"), r.text
    assert r.json()["message"] == "sink: at most 128 characters"
    r = listed("picky")
    assert r.status_code == 200 and len(r.json()["dead_letters"]) == 1, r.text
    running = next(s for s in server.app.state.watchllm.writer.sinks if s.sink.name != "picky")
    r = listed(running.sink.name)
    assert r.status_code == 200 and r.json()["dead_letters"] == [], r.text
    # A sink that no longer runs, whose dead letters are another project's: none of acme's
    # (200, nothing listed), not an unknown sink.
    folder = server.settings.spool_path / "dead-letter"
    record = json.loads((folder / "picky.jsonl").read_text().splitlines()[0])
    record["sink"] = "gone"
    for event in record["events"]:
        event["project_id"] = "other"
    (folder / "gone.jsonl").write_text(json.dumps(record) + "\n")
    r = listed("gone")
    assert r.status_code == 200 and r.json()["dead_letters"] == [], r.text
    operator = server.headers(server.keys.create(OWN, scope="operator"))
    r = server.client.get("/v1/admin/dead-letters", params={"sink": "gone"}, headers=operator)
    assert r.status_code == 200 and len(r.json()["dead_letters"]) == 1, r.text


@pytest.fixture
def with_quotas(server_factory: Any) -> Running:
    """A server with /v1/admin/usage too (the quota plugin's admin route)."""
    return server_factory(
        quota_backend="memory", quota_plans={"default": {"events_per_day": 10}}, durability="memory"
    )


ADMIN_PATHS = {
    "/v1/admin/store",
    "/v1/admin/tables",
    "/v1/admin/count",
    "/v1/admin/dead-letters",
    "/v1/admin/dead-letters/replay",
    "/v1/admin/usage",
    "/-/plugins",
}


def _declared(server: Running) -> dict[tuple[str, str], frozenset[str]]:
    """(method, path) -> the names it accepts, for every route that declares them outside
    the analytics routes (which tests/test_analytics_unknown_params.py drives)."""
    return {
        (method, route.path): route.endpoint.accepted
        for route in server.app.routes
        if hasattr(getattr(route, "endpoint", None), "accepted")
        and not route.path.startswith("/v1/analytics/")
        for method in sorted(route.methods - {"HEAD"})
    }


def test_every_admin_route_refuses_an_unknown_parameter(with_quotas: Running) -> None:
    server = with_quotas
    # An operator key: POST /v1/admin/usage needs one.
    operator = server.headers(server.keys.create(OWN, scope="operator"))
    declared = _declared(server)
    assert {path for _, path in declared} >= ADMIN_PATHS
    for method, path in sorted(declared):
        accepted = ", ".join(sorted(declared[method, path])) or "none"
        r = server.client.request(method, f"{path}?nope=1", headers=operator)
        _refused(r, "nope", accepted)
        # A key is checked first: no key learns the route's parameters.
        assert server.client.request(method, f"{path}?nope=1").status_code == 401, path
        # Every declared name is taken.
        good = {"project": OWN, "table": "events", "run": "run-1", "sink": ""}
        params = {name: good[name] for name in declared[method, path]}
        r = server.client.request(method, path, params=params, headers=operator)
        assert r.status_code == 200, (method, path, r.text)


def test_declarations_match_the_openapi_document(with_quotas: Running) -> None:
    paths = build_document(with_quotas.app.routes)["paths"]
    declared = _declared(with_quotas)
    assert {path for _, path in declared} >= ADMIN_PATHS
    for (method, path), accepted in declared.items():
        if path not in paths:  # not documented at all (/-/plugins): nothing to keep in step
            continue
        operation = paths[path][method.lower()]
        documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        assert documented == accepted, (method, path)
        assert "400" in operation["responses"], (method, path)
