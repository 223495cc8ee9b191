"""`GET /openapi.json`: every public route, with request and answer schemas taken from the
pydantic models that validate and shape them (so the document cannot drift from the code)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .analytics import models as answers
from .analytics import params as P
from .schema import EVENT_TYPES, ID_FIELD_PATTERN, MAX_ID_CHARS, PROJECT_ID_PATTERN, Event

REF = "#/components/schemas/{model}"


class ErrorBody(BaseModel):
    """Every error answer: a stable code, a message for people, the field at fault."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str
    field: str | None = None


class FieldError(BaseModel):
    field: str
    message: str


class Rejection(BaseModel):
    index: int
    event_id: str | None = None
    errors: list[FieldError]


class Accepted(BaseModel):
    project_id: str
    accepted: int
    event_ids: list[str]
    rejected: list[Rejection] = Field(default_factory=list)


class Batch(BaseModel):
    events: list[Event] = Field(min_length=1)


class AdminCount(BaseModel):
    table: str
    project: str | None
    run: str | None
    count: int


class DeadLetterEntry(BaseModel):
    sink: str
    at: str
    reason: str
    events: int


class DeadLetters(BaseModel):
    project: str | None
    dead_letters: list[DeadLetterEntry]
    torn_records: int


class Replayed(BaseModel):
    project: str | None
    entries: int
    replayed_events: int
    torn_records: int
    unknown_sinks: list[str]


_SECURITY = [{"bearer": []}]
# OpenAPI 3.1 lets a non-OAuth scheme list the roles a route needs: the key's scope here.
_ADMIN_SECURITY = [{"bearer": ["admin"]}]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad parameter or malformed body",
        401: "missing or unknown API key",
        403: "the key's project or scope does not allow this",
        404: "not found",
        408: "the body did not arrive within body_timeout_s (or paused over body_idle_timeout_s);"
        " the connection is closed",
        413: "body or batch over the limit",
        415: "unsupported content type or encoding",
        422: "no event was valid",
        429: "quota exceeded",
        503: "overloaded or not ready; retry after Retry-After",
    }
    return {str(code): _json(_ref(ErrorBody), text[code]) for code in codes}


def _query(
    name: str, description: str, schema: dict[str, Any] | None = None, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


# The bounds below are those of analytics/params.py, taken from its constants where it has them.
_ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ID_CHARS,
    "pattern": ID_FIELD_PATTERN,
}
_TIME = {"type": "string", "format": "date-time", "maxLength": 64}
_PROJECT = _query(
    "project_id",
    "the project read (default: the key's own; another project is 403). Required with an"
    " `operator` key, which may read any project (without it: 400 naming `project_id`)",
    {"type": "string", "pattern": f"^{PROJECT_ID_PATTERN}$"},
)
# One time-range vocabulary on every route with a range (docs/ANALYTICS.md, "Time range").
_RANGE = [
    _query(
        "period",
        "the range ends at `to` (default: now) and goes back this long; not with `from`"
        f" (default: {P.DEFAULT_PERIOD} when `from` is not given either)",
        {"enum": list(P.PERIODS)},
    ),
    _query("from", "RFC 3339 time with a zone, 1970 to 2100; not with `period`", _TIME),
    _query("to", "RFC 3339 time with a zone, 1970 to 2100 (default: now)", _TIME),
]


def _page(default: int) -> list[dict[str, Any]]:
    return [
        _query(
            "limit",
            "rows per page",
            {"type": "integer", "minimum": 1, "maximum": 1000, "default": default},
        ),
        _query(
            "cursor",
            "next_cursor of the previous page, as it is",
            {"type": "string", "maxLength": 1024},
        ),
    ]


def _text(name: str, description: str = "", max_chars: int = 256) -> dict[str, Any]:
    return _query(name, description, {"type": "string", "maxLength": max_chars})


def _get(
    summary: str,
    answer: type[BaseModel],
    parameters: list[dict[str, Any]],
    extra_errors: tuple[int, ...] = (),
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": _SECURITY,
            "parameters": parameters,
            "responses": {
                "200": _json(_ref(answer), "the answer"),
                **_errors(400, 401, 403, *extra_errors, 503),
            },
        }
    }


# Project ids as keys take them (schema.ProjectId); another `project` is 400 naming it. Empty
# is as if left out (the admin routes read `project=` so).
PROJECT_ID_SCHEMA = {"type": "string", "pattern": f"^({PROJECT_ID_PATTERN})?$"}
_ADMIN_PROJECT = _query(
    "project",
    "the project administered (default: the key's own; with an `operator` key: every project)."
    " An `admin` key may name its own project only; another is 403 naming `project`; one"
    " that is not a project id is 400 naming it",
    PROJECT_ID_SCHEMA,
)
_SINK = _query("sink", "only the dead letters of this sink")


def _admin(
    method: str,
    summary: str,
    answer: type[BaseModel] | None,
    parameters: list[dict[str, Any]],
    codes: tuple[int, ...],
) -> dict[str, Any]:
    """An admin route: an `admin` key for its own project, an `operator` key for any
    (docs/API.md, "Keys and scopes")."""
    schema = _ref(answer) if answer else {"type": "object"}
    return {
        method: {
            "summary": summary,
            "description": "Needs an `admin` key (its own project) or an `operator` key (every"
            " project); any other key is 403.",
            "security": _ADMIN_SECURITY,
            "parameters": parameters,
            "responses": {"200": _json(schema, "the answer"), **_errors(*codes)},
        }
    }


def _admin_paths() -> dict[str, Any]:
    from .app import STORE_TABLES  # the app imports this module: import on use

    return {
        "/v1/admin/store": _admin(
            "get", "The store's name and version", None, [], (400, 401, 403, 503)
        ),
        "/v1/admin/tables": _admin("get", "The store's tables", None, [], (400, 401, 403, 503)),
        "/-/plugins": _admin(
            "get",
            "The loaded plugins: each one's name, hooks, distribution and version",
            None,
            [],
            (400, 401, 403),
        ),
        "/v1/admin/count": _admin(
            "get",
            "Distinct rows of a table, for one project or (operator) all of them",
            AdminCount,
            [
                _query("table", "", {"enum": list(STORE_TABLES), "default": "events"}),
                _ADMIN_PROJECT,
                _query(
                    "run",
                    "count only this run's rows (a trace id for spans)",
                    {"type": "string", "maxLength": 256},
                ),
            ],
            (400, 401, 403, 503),
        ),
        "/v1/admin/dead-letters": _admin(
            "get",
            "Dead-letter entries holding the project's events, with its event count only",
            DeadLetters,
            [_SINK, _ADMIN_PROJECT],
            (400, 401, 403),
        ),
        "/v1/admin/dead-letters/replay": _admin(
            "post",
            "Put the project's dead-lettered events back in the spool for the sink that refused"
            " them; a `sink` that is not running is 400 and nothing is replayed",
            Replayed,
            [_SINK, _ADMIN_PROJECT],
            (400, 401, 403, 503),
        ),
    }


def described(
    endpoint: Any, operations: dict[str, Any], models: Sequence[type[BaseModel]] = ()
) -> Any:
    """Give a plugin's route (register_routes) its OpenAPI operations ({"get": {...}}) and the
    models they refer to (`_ref`): the document of an app that serves the route lists it, and
    an app without it (the feature off) does not."""
    endpoint.__openapi__ = (operations, tuple(models))
    return endpoint


def _described(routes: Iterable[Any]) -> tuple[dict[str, Any], list[type[BaseModel]]]:
    paths: dict[str, Any] = {}
    models: list[type[BaseModel]] = []
    for route in routes:
        found = getattr(getattr(route, "endpoint", None), "__openapi__", None)
        if isinstance(route, Route) and found is not None:
            paths.setdefault(route.path, {}).update(found[0])
            models += [m for m in found[1] if m not in models]
    return paths, models


def build_document(routes: Iterable[Any] = ()) -> dict[str, Any]:
    """The document of the core routes, and of those of `routes` (an app's) that plugins
    described (`described`)."""
    plugin_paths, plugin_models = _described(routes)
    _, defs = models_json_schema(
        [
            (m, "serialization")
            for m in (
                *plugin_models,
                answers.Stats,
                answers.Timeseries,
                answers.LogsPage,
                answers.EventDetail,
                answers.RunsPage,
                answers.RunDetail,
                ErrorBody,
                Accepted,
                Batch,
                AdminCount,
                DeadLetters,
                Replayed,
            )
        ],
        ref_template=REF,
    )
    components = dict(defs.get("$defs", {}))
    event_schema = TypeAdapter(Event).json_schema(ref_template=REF)
    components.update(event_schema.pop("$defs", {}))
    components["Event"] = event_schema
    event_ref = {"$ref": REF.format(model="Event")}
    ingest_responses = {
        "202": _json(_ref(Accepted), "every event accepted (stored durably)"),
        "207": _json(_ref(Accepted), "some events accepted; `rejected` lists the others"),
        **_errors(400, 401, 403, 408, 413, 415, 422, 429, 503),
    }
    paths: dict[str, Any] = {
        "/v1/projects/{project_id}/events": {
            "post": {
                "summary": "Send one event or an array of events",
                "security": _SECURITY,
                "parameters": [_path("project_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    event_ref,
                                    {"type": "array", "items": event_ref, "minItems": 1},
                                ]
                            }
                        }
                    },
                },
                "responses": ingest_responses,
            }
        },
        "/v1/events/batch": {
            "post": {
                "summary": "Send a batch of events",
                "security": _SECURITY,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(Batch)}},
                },
                "responses": ingest_responses,
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is up",
                "responses": {"200": _json({"type": "object"}, "up")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Store reachable, writer running, spool not full",
                "responses": {
                    "200": _json({"type": "object"}, "ready"),
                    "503": _json({"type": "object"}, "not ready"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/analytics/stats": _get(
            "Totals, latency percentiles, errors, top models", answers.Stats, [_PROJECT, *_RANGE]
        ),
        "/v1/analytics/timeseries": _get(
            "Requests, errors, tokens, cost, latency per bucket",
            answers.Timeseries,
            [
                _PROJECT,
                *_RANGE,
                _query(
                    "interval",
                    f"bucket size (default: one that fits the range; at most {P.MAX_BUCKETS}"
                    " buckets)",
                    {"enum": list(P.INTERVALS)},
                ),
                _query(
                    "tz",
                    "IANA time zone of the buckets, known to Python and the store (default UTC)",
                    {"type": "string", "maxLength": P.MAX_TZ_CHARS, "default": "UTC"},
                ),
                _query(
                    "group_by", "one series per value", {"enum": ["model", "status", "event_type"]}
                ),
                _query(
                    "groups",
                    "with group_by: the top groups shown as series of their own; the rest are"
                    f" summed in `other` (lowered to keep within {P.MAX_POINTS} points)",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": P.MAX_GROUPS,
                        "default": P.DEFAULT_GROUPS,
                    },
                ),
                _query(
                    "rank_by",
                    "with group_by: the measure the groups are ranked by",
                    {"enum": list(P.RANK_BY), "default": "events"},
                ),
            ],
        ),
        "/v1/analytics/logs": _get(
            "Events, newest first, filtered, paginated",
            answers.LogsPage,
            [
                _PROJECT,
                *_RANGE,
                *_page(100),
                _query(
                    "status",
                    "",
                    {"enum": ["success", "error", "timeout", "assertion_failed", "warning"]},
                ),
                _query("event_type", "", {"enum": list(EVENT_TYPES)}),
                _text("model"),
                _text("run_id"),
                _text("user_id"),
                _text("tag"),
                _text("q", "text searched in prompts and responses", 1000),
            ],
        ),
        "/v1/analytics/event/{event_id}": _get(
            "One event with its tool calls, steps, family",
            answers.EventDetail,
            [_PROJECT, _path("event_id", _ID_SCHEMA)],
            (404,),
        ),
        "/v1/analytics/runs": _get(
            "Runs that started in the range", answers.RunsPage, [_PROJECT, *_RANGE, *_page(50)]
        ),
        "/v1/analytics/runs/{run_id}": _get(
            "One run as a tree of its events and spans",
            answers.RunDetail,
            [
                _PROJECT,
                _path("run_id", _ID_SCHEMA),
                _query(
                    "limit",
                    "nodes of the tree at most (events and spans)",
                    {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 10_000},
                ),
            ],
            (404,),
        ),
        **_admin_paths(),
        **plugin_paths,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WatchLLM",
            "version": __version__,
            "description": "LLM observability: ingestion and analytics.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key: wllm_...",
                },
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "the API key as the password (OTLP receiver only)",
                },
            },
        },
    }


async def openapi_endpoint(request: Request) -> Response:
    wl = request.app.state.watchllm
    if wl.openapi is None:
        wl.openapi = build_document(request.app.routes)
    return JSONResponse(wl.openapi)
