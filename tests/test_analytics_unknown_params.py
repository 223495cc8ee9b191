"""A query parameter an analytics route does not accept is a 400 naming it, never ignored.

A misspelled filter (`modle=`, `stauts=`) or another route's (`user_id=` on stats) used to be
dropped silently, and the answer was the unfiltered data with a 200. Each route declares what
it accepts (routes.accepts): the tests below take the names from those declarations, so a
parameter added to a route is driven here too, and one read without being declared fails.

Parameters are checked before any query, so these tests run on the embedded store alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import Running, prompt_call
from starlette.datastructures import QueryParams

from watchllm_ext.analytics import params as P
from watchllm_ext.analytics.routes import ROUTES
from watchllm_ext.errors import Problem
from watchllm_ext.route_params import MAX_NAME_SHOWN, Query, UndeclaredParameter

# Each route's path with its path parameter filled in (an id the data below has).
PATHS = {path: path.replace("{event_id}", "e1").replace("{run_id}", "run-1") for path, _ in ROUTES}
ACCEPTED: dict[str, frozenset[str]] = {path: endpoint.accepted for path, endpoint in ROUTES}

# A good value for every parameter any route accepts: the query it is sent in (some need
# another beside them). A route that accepts a name missing here fails
# test_every_declared_parameter_is_accepted until a value is added.
GOOD: dict[str, dict[str, str]] = {
    "project_id": {"project_id": "acme"},
    "period": {"period": "7d"},
    "from": {"from": "2026-01-01T00:00:00Z"},
    "to": {"to": "2026-01-03T00:00:00Z"},
    "interval": {"interval": "1h"},
    "tz": {"tz": "Europe/Paris"},
    "group_by": {"group_by": "model"},
    "groups": {"group_by": "model", "groups": "3"},
    "rank_by": {"group_by": "model", "rank_by": "cost"},
    "limit": {"limit": "5"},
    "cursor": {"cursor": P.encode_cursor("2026-01-02 03:04:05.678", "e1")},
    "status": {"status": "success"},
    "event_type": {"event_type": "prompt_call"},
    "model": {"model": "gpt-4o"},
    "run_id": {"run_id": "run-1"},
    "user_id": {"user_id": "u1"},
    "tag": {"tag": "blue"},
    "q": {"q": "hello"},
}


def _loaded(server: Running) -> Running:
    """One event an hour old (inside every route's default range), id e1 of run run-1."""
    t = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="milliseconds")
    event = prompt_call("e1", run_id="run-1", timestamp=t.replace("+00:00", "Z"))
    r = server.client.post("/v1/events/batch", headers=server.headers(), json={"events": [event]})
    assert r.status_code == 202, r.text
    server.flush()
    return server


def _get(server: Running, path: str, query: str | dict[str, str]) -> httpx.Response:
    target = f"{path}?{query}" if isinstance(query, str) else path
    params = None if isinstance(query, str) else query
    return server.client.get(target, params=params, headers=server.headers())


def _refused(r: httpx.Response, name: str, accepted: frozenset[str]) -> None:
    """A 400 in the shape of every bad parameter, naming `name` and listing `accepted`."""
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_parameter" and body["field"] == name, body
    assert body["message"].startswith(f"{name}: unknown query parameter {name!r}"), body
    assert body["message"].endswith("this route accepts: " + ", ".join(sorted(accepted))), body


# --- the reported cases ---


def test_the_reported_misspellings_are_400s_naming_them(server: Running) -> None:
    _loaded(server)
    logs, stats = "/v1/analytics/logs", "/v1/analytics/stats"
    # The right spelling filters; the wrong one used to answer the event, unfiltered.
    assert _get(server, logs, "model=nonexistent&limit=1").json()["events"] == []
    assert len(_get(server, logs, "limit=1").json()["events"]) == 1
    r = _get(server, logs, "modle=nonexistent&limit=1")
    _refused(r, "modle", ACCEPTED[logs])
    assert "model" in r.json()["message"]  # the right spelling is in the list
    _refused(_get(server, logs, "stauts=error"), "stauts", ACCEPTED[logs])
    # stats has no user filter: the whole project's figures were answered for any user.
    r = _get(server, stats, "user_id=nobody")
    _refused(r, "user_id", ACCEPTED[stats])
    assert r.json()["message"].endswith("from, period, project_id, to")


# --- every route ---


@pytest.mark.parametrize("path", list(PATHS))
def test_every_route_refuses_an_unknown_parameter(server: Running, path: str) -> None:
    _loaded(server)
    url, accepted = PATHS[path], ACCEPTED[path]
    _refused(_get(server, url, "nope=1"), "nope", accepted)
    # Beside good parameters, and with no value at all (`?nope`).
    _refused(_get(server, url, "project_id=acme&nope"), "nope", accepted)
    # Any parameter some other route takes but this one does not.
    for name in sorted(set().union(*ACCEPTED.values()) - accepted):
        _refused(_get(server, url, {name: GOOD[name][name]}), name, accepted)
    # The first unknown one is named; a bad value of an accepted one is reported as before.
    _refused(_get(server, url, "project_id=acme&zzz=1&aaa=2"), "zzz", accepted)
    r = _get(server, url, "project_id=no%20such")
    assert (r.status_code, r.json()["field"]) == (400, "project_id")
    # Same shape as any other bad parameter: the same keys, the same code.
    assert set(r.json()) == set(_get(server, url, "nope=1").json())


@pytest.mark.parametrize("path", list(PATHS))
def test_every_declared_parameter_is_accepted(server: Running, path: str) -> None:
    _loaded(server)
    url = PATHS[path]
    assert {"project_id"} <= ACCEPTED[path]
    for name in sorted(ACCEPTED[path]):
        assert name in GOOD, f"{path} accepts {name!r}: give it a good value in GOOD"
        r = _get(server, url, GOOD[name])
        assert r.status_code == 200, (name, r.text)
    # All of them at once (period and from are two starts: from is left out).
    together = {k: v for name in ACCEPTED[path] - {"from"} for k, v in GOOD[name].items()}
    r = _get(server, url, together)
    assert r.status_code == 200, (together, r.text)
    # A repeated parameter is a 400 naming it, whatever its values.
    if "limit" in ACCEPTED[path]:
        for twice in ("limit=0&limit=5", "limit=5&limit=5"):
            r = _get(server, url, twice)
            assert (r.status_code, r.json()["field"]) == (400, "limit"), r.text
            assert r.json()["message"] == "limit: sent more than once; send each parameter once"


def test_declarations_match_the_openapi_document() -> None:
    """What a route accepts is what /openapi.json documents for it, no more, no less."""
    from watchllm_ext.openapi import build_document

    paths = build_document()["paths"]
    for path, accepted in ACCEPTED.items():
        documented = {p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}
        assert documented == accepted, path


def test_a_key_is_checked_before_the_parameters(server: Running) -> None:
    for path in PATHS.values():
        r = server.client.get(path, params={"nope": "1"})
        assert r.status_code == 401, (path, r.text)


# --- route_params.Query itself ---


def test_query_refuses_unknown_names_and_guards_undeclared_reads() -> None:
    accepted = frozenset({"limit", "model"})
    Query(QueryParams("limit=3&model=x"), accepted).check()
    with pytest.raises(Problem) as twice:
        Query(QueryParams("limit=3&model=x&model=y"), accepted).check()
    assert (twice.value.status, twice.value.field) == (400, "model")
    q = Query(QueryParams("limit=3&modle=x"), accepted)
    with pytest.raises(Problem) as refused:
        q.check()
    problem = refused.value
    assert (problem.status, problem.code, problem.field) == (400, "bad_parameter", "modle")
    assert (
        problem.message
        == "modle: unknown query parameter 'modle'; this route accepts: limit, model"
    )
    # A name the route does not declare is a bug.
    assert Query(QueryParams(""), accepted).get("model", "z") == "z"
    for read in (lambda: q.get("user_id"), lambda: "user_id" in q, lambda: q.getlist("user_id")):
        with pytest.raises(UndeclaredParameter, match="user_id"):
            read()
    # An empty name is said to be one; a huge one is named, cut.
    with pytest.raises(Problem) as refused:
        Query(QueryParams("=1"), accepted).check()
    assert refused.value.field == "query"  # as the ingest routes name it (refuse_query)
    assert refused.value.message == (
        "query: a query parameter has no name (=value); this route accepts: limit, model"
    )
    with pytest.raises(Problem) as refused:
        Query(QueryParams("x" * 5000 + "=1"), accepted).check()
    assert refused.value.field == "x" * MAX_NAME_SHOWN + "..."
    assert len(refused.value.message) < 400


def test_every_route_reads_only_what_it_declares(server: Running) -> None:
    """Each route parses every parameter it declares without tripping the guard: all of them
    at once, bad values included, are answered 200 or 400 naming one of them, never 500."""
    _loaded(server)
    for path, url in PATHS.items():
        for value in ("x", "0", ""):
            query = {name: value for name in ACCEPTED[path] - {"project_id"}}
            r = _get(server, url, query)
            assert r.status_code in (200, 400), (path, value, r.text)
            if r.status_code == 400:
                assert r.json()["field"] in ACCEPTED[path], (path, r.text)
