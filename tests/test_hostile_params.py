"""Hostile parameters on every analytics route (issue 9, finding 3): whatever a client puts
in the query string or the path, the answer is never a 5xx, and a 400 names the parameter
(`field`). Driven by hypothesis through the real app (Starlette's TestClient) on every store,
plus the values that once answered 500, over one keep-alive connection to a real uvicorn."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Running, make_settings, prompt_call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from stores import EVERY_STORE, StoreBackend

from watchllm_ext.analytics.params import PERIODS
from watchllm_ext.app import create_app
from watchllm_ext.keys import KeyStore

pytestmark = EVERY_STORE

# Each route's query parameters (project_id on all of them; the time range on each route
# that has one) and its path parameter, if any.
COMMON = ("project_id",)
RANGE = ("period", "from", "to")
FILTERS = ("model", "run_id", "user_id", "tag", "q")
ROUTES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "/v1/analytics/stats": ((*COMMON, *RANGE), None),
    "/v1/analytics/timeseries": (
        (*COMMON, *RANGE, "interval", "tz", "group_by", "groups", "rank_by"),
        None,
    ),
    "/v1/analytics/logs": (
        (*COMMON, *RANGE, "limit", "cursor", "status", "event_type", *FILTERS),
        None,
    ),
    "/v1/analytics/event/{event_id}": (COMMON, "event_id"),
    "/v1/analytics/runs": ((*COMMON, *RANGE, "limit", "cursor"), None),
    "/v1/analytics/runs/{run_id}": ((*COMMON, "limit"), "run_id"),
}

# Values that broke parsers before, or that a parser could plausibly trip on.
NASTY = [
    "",
    " ",
    "-1",
    "0",
    "1e309",
    "NaN",
    "-0",
    "9" * 5000,
    "٣",  # a digit int() takes
    "1_000",
    "x" * 300,
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "'; DROP TABLE events; --",
    "1' OR '1'='1",
    "{project:String}",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "right/UTC",
    "Europe",
    "__pycache__",
    "posix/UTC",
    "localtime",
    "Factory",
    "z" * 256,
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0999-01-01T00:00:00Z",
    "2026-01-01T00:00:00+25:00",
    "2026-01-01T00:00:00",
    "1h",
    "1m",
    "30d",
    "90d",
    "15m",
    "2h",
    "24H",
    "1d",
    "model",
    "acme",
    "UTC",
]


# Values each parameter accepts (the data below is on 2026-01-02).
GOOD = {
    "from": ["2026-01-01T00:00:00Z", "2026-01-02T03:00:00+01:00"],
    "to": ["2026-01-03T00:00:00Z", "1970-01-01T00:10:00Z", "2100-01-01T00:00:00Z"],
    "period": list(PERIODS),
    "project_id": ["acme", "beta"],
    "interval": ["1h", "1d", "15m"],
    "tz": ["Europe/Paris", "Asia/Kolkata", "UTC"],
    "group_by": ["model", "status", "event_type"],
    "groups": ["1", "3", "50"],
    "rank_by": ["cost", "tokens", "errors"],
    "limit": ["1", "1000"],
    "status": ["success", "error"],
    "event_type": ["prompt_call"],
    "model": ["m1"],
    "run_id": ["run-1"],
    "q": ["hello"],
}


def _cursor(ts: Any, key: Any) -> str:
    """A cursor as the API encodes it, around any values (ensure_ascii writes a lone
    surrogate as \\ud800, which the server's JSON decoder turns back into one)."""
    raw = json.dumps({"ts": ts, "id": key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Unicode of every category, lone surrogates included (st.text() leaves those out).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=80)
HUGE = st.integers(min_value=-(10**30), max_value=10**30).map(str)
TIMES = st.datetimes().map(lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f"))
FORGED_CURSORS = st.one_of(
    st.builds(
        _cursor,
        st.one_of(TIMES, ANY_TEXT, st.integers(), st.none()),
        st.one_of(
            ANY_TEXT, st.text(min_size=129, max_size=300), st.integers(), st.lists(st.none())
        ),
    ),
    st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
)
HOSTILE = st.one_of(
    st.sampled_from(NASTY),
    ANY_TEXT,
    HUGE,
    st.floats().map(str),
    FORGED_CURSORS,
    st.text(min_size=200, max_size=2000),
)


def _query(params: dict[str, str]) -> str:
    """The query string as bytes on the wire would be: UTF-8, with lone surrogates passed
    through as their (invalid) UTF-8 bytes, which the server must survive."""
    return "&".join(
        f"{quote(k)}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in params.items()
    )


@pytest.fixture
def app_client(
    tmp_path: Path, store_backend: StoreBackend
) -> Iterator[tuple[TestClient, str, str]]:
    settings_ = make_settings(tmp_path, **store_backend.settings())
    keys = KeyStore(settings_.keys_path)
    key = keys.create("acme", scope="admin")
    # Instance-wide: it names the project it reads, any project (docs/API.md).
    operator = keys.create("ops", scope="operator")
    app = create_app(settings_)
    with TestClient(app, raise_server_exceptions=False) as client:
        events = [prompt_call(f"h{i}", run_id=f"run-{i % 3}", model=f"m{i % 4}") for i in range(20)]
        r = client.post(
            "/v1/events/batch", headers={"Authorization": f"Bearer {key}"}, json={"events": events}
        )
        assert r.status_code == 202, r.text
        yield client, key, operator


def test_hostile_values_on_every_route_never_5xx_and_400_names_the_field(
    app_client: tuple[TestClient, str, str],
) -> None:
    client, key, operator = app_client

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, dict[str, str], set[str], str]:
        path = draw(st.sampled_from(sorted(ROUTES)))
        names, path_param = ROUTES[path]
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
        # Hostile values beside good ones, so that a parser late in a route is reached too.
        params = {
            name: draw(st.one_of(HOSTILE, st.sampled_from(GOOD.get(name, ["x"]))))
            for name in chosen
        }
        # Mostly a project the key may read (its own, named or left out, or any for the
        # operator key), so that the other parameters reach their parsers.
        caller = draw(st.sampled_from([key, key, operator]))
        if "project_id" not in params or draw(st.booleans()):
            choices = ["acme", None] if caller == key else ["acme", "beta", None]
            project = draw(st.sampled_from(choices))
            params.pop("project_id", None)
            if project:
                params["project_id"] = project
        # An operator key without project_id is a 400 naming it.
        fields = set(params) | ({"project_id"} if caller == operator else set())
        if path_param:
            value = draw(st.one_of(HOSTILE, st.sampled_from(["h1", "run-1"])))
            path = path.replace(
                "{" + path_param + "}", quote(value.encode("utf-8", "surrogatepass"), safe="")
            )
            fields.add(path_param)
        return path, params, fields, caller

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(requests())
    def check(request: tuple[str, dict[str, str], set[str], str]) -> None:
        path, params, fields, caller = request
        r = client.get(f"{path}?{_query(params)}", headers={"Authorization": f"Bearer {caller}"})
        assert r.status_code < 500, (path, params, r.status_code, r.text[:300])
        if r.status_code in (400, 403):
            body = r.json()
            assert body.get("field") in fields, (path, params, body)
            assert body["field"] in body["message"] or r.status_code == 403, body

    check()


# The values of the issue that answered 500 (and dropped the connection), each a 400 naming
# its parameter now; sent one after another on one connection, then a good request on it.
FORMER_500S = [
    ("/v1/analytics/logs", {"cursor": _cursor("0999-01-01 00:00:00.000", "e1")}, "cursor"),
    ("/v1/analytics/logs", {"cursor": _cursor("2100-01-01 00:00:00.000", "e1")}, "cursor"),
    ("/v1/analytics/runs", {"cursor": _cursor("1969-12-31 23:59:59.999", "r")}, "cursor"),
    ("/v1/analytics/logs", {"cursor": _cursor("2026-01-01 00:00:00.000", "a\ud800")}, "cursor"),
    ("/v1/analytics/runs", {"cursor": _cursor("2026-01-01 00:00:00.000", "r" * 200)}, "cursor"),
    ("/v1/analytics/timeseries", {"tz": "right/UTC"}, "tz"),
    ("/v1/analytics/timeseries", {"tz": "Europe"}, "tz"),
    ("/v1/analytics/timeseries", {"tz": "__pycache__"}, "tz"),
    ("/v1/analytics/timeseries", {"tz": "Z" * 256}, "tz"),
    ("/v1/analytics/timeseries", {"tz": "localtime"}, "tz"),
    ("/v1/analytics/timeseries", {"groups": "0", "group_by": "model"}, "groups"),
    ("/v1/analytics/timeseries", {"groups": "٣", "group_by": "model"}, "groups"),
    ("/v1/analytics/timeseries", {"rank_by": "latency", "group_by": "model"}, "rank_by"),
    ("/v1/analytics/timeseries", {"groups": "3"}, "groups"),
    ("/v1/analytics/stats", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
    ("/v1/analytics/logs", {"limit": "9" * 5000}, "limit"),
    ("/v1/analytics/event/..%5Cetc%5Cpasswd", {}, "event_id"),
    ("/v1/analytics/runs/" + "r" * 129, {}, "run_id"),
    ("/v1/analytics/event/%ED%A0%80", {}, "event_id"),
]


def _exchange(sock: socket.socket, reader: Any, target: str, key: str) -> tuple[int, bytes, str]:
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    )
    status = int(reader.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline().decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers["content-length"]))
    return status, body, headers.get("connection", "")


def test_former_500s_are_400s_and_keep_the_connection(server: Running) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        reader = sock.makefile("rb")
        for path, params, field in FORMER_500S:
            target = f"{path}?{_query({'project_id': 'acme', **params})}"
            status, body, connection = _exchange(sock, reader, target, server.key)
            assert status == 400, (path, params, body[:300])
            assert json.loads(body)["field"] == field, (path, params, body[:300])
            assert connection.lower() != "close"
        # The same connection still serves a good request.
        status, body, _ = _exchange(
            sock, reader, "/v1/analytics/timeseries?project_id=acme&tz=Europe/Paris", server.key
        )
        assert status == 200 and json.loads(body)["tz"] == "Europe/Paris"


def test_a_value_whose_percent_encoded_bytes_are_not_utf8_is_400_naming_it(
    server: Running,
) -> None:
    """`q=%ff%fe` was read as two U+FFFD characters and searched for (200, nothing found). A
    U+FFFD sent as its UTF-8 bytes is text like any other."""
    headers = server.headers()
    r = server.client.get("/v1/analytics/logs?project_id=acme&q=%ff%fe", headers=headers)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "bad_parameter",
        "message": "q: not valid UTF-8 text (percent-encoded bytes)",
        "field": "q",
    }
    fine = server.client.get("/v1/analytics/logs?project_id=acme&q=%EF%BF%BD", headers=headers)
    assert fine.status_code == 200, fine.text
