"""Property-based fuzzing of the ingestion endpoints over real HTTP.

Whatever the body, the answer is never a 5xx, and every event id answered as accepted is
in the store afterwards (nothing accepted and then dropped).
"""

from __future__ import annotations

import json
from typing import Any

from conftest import Running, prompt_call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchllm_ext.schema import EVENT_TYPES

json_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "event_id",
    "event_type",
    "run_id",
    "timestamp",
    "model",
    "tokens_input",
    "tokens_output",
    "latency_ms",
    "status",
    "tags",
    "metadata",
    "prompt",
    "tool_calls",
    "tool_name",
    "step_number",
    "confidence",
    "env",
    "client",
    "cost_estimate_usd",
    "window",
    "threshold",
]


@st.composite
def mutated_event(draw: Any) -> dict[str, Any]:
    """A valid event of a random type with a few fields replaced by random JSON."""
    event = prompt_call(draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)))
    event["event_type"] = draw(st.sampled_from([*EVENT_TYPES, "bogus"]))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            event[name] = draw(json_value)
        else:
            event.pop(name, None)
    return event


def _post(server: Running, path: str, body: bytes) -> None:
    r = server.client.post(
        path, content=body, headers={**server.headers(), "Content-Type": "application/json"}
    )
    assert r.status_code < 500, (r.status_code, r.text, body[:500])
    payload = r.json()
    assert "error" in payload or "accepted" in payload
    if r.status_code in (202, 207):
        # Accepted means stored: check each accepted id reached the store.
        ids = payload["event_ids"]
        server.flush()
        rows = server.query(
            "SELECT count(DISTINCT event_id) AS n FROM events"
            " WHERE has({ids:Array(String)}, event_id)",
            {"ids": ids},
        )
        assert rows[0]["n"] == len(set(ids))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_value | st.lists(mutated_event(), min_size=1, max_size=5))
def test_fuzz_single_endpoint(server: Running, body: Any) -> None:
    _post(server, "/v1/projects/acme/events", json.dumps(body).encode())


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=st.lists(mutated_event(), max_size=6), raw=st.binary(max_size=64))
def test_fuzz_batch_endpoint(server: Running, events: list[dict[str, Any]], raw: bytes) -> None:
    _post(server, "/v1/events/batch", json.dumps({"events": events}).encode())
    _post(server, "/v1/events/batch", raw)
