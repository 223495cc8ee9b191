"""`GET /openapi.json`: every public route, with request and answer schemas taken from the
pydantic models that validate and shape them (so the document cannot drift from the code)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import __version__
from .analytics import models as answers
from .schema import EVENT_TYPES, Event

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


_SECURITY = [{"bearer": []}]


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


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_PROJECT = _query("project_id", "the project; must be the key's", required=True)
_RANGE = [
    _query(
        "from",
        "RFC 3339 time with a zone (default: 24 hours before `to`)",
        {"type": "string", "format": "date-time"},
    ),
    _query(
        "to", "RFC 3339 time with a zone (default: now)", {"type": "string", "format": "date-time"}
    ),
]
_PAGE = [
    _query("limit", "rows per page", {"type": "integer", "minimum": 1, "maximum": 1000}),
    _query("cursor", "next_cursor of the previous page"),
]


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


def build_document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (m, "serialization")
            for m in (
                answers.Stats,
                answers.Timeseries,
                answers.LogsPage,
                answers.EventDetail,
                answers.RunsPage,
                answers.RunDetail,
                ErrorBody,
                Accepted,
                Batch,
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
        **_errors(400, 401, 403, 413, 415, 422, 429, 503),
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
                _query("period", "instead of from", {"enum": ["1h", "6h", "24h", "7d", "30d"]}),
                _query("interval", "bucket size", {"enum": ["1m", "5m", "15m", "1h", "6h", "1d"]}),
                _query("tz", "IANA time zone of the buckets (default UTC)"),
                _query(
                    "group_by", "one series per value", {"enum": ["model", "status", "event_type"]}
                ),
            ],
        ),
        "/v1/analytics/logs": _get(
            "Events, newest first, filtered, paginated",
            answers.LogsPage,
            [
                _PROJECT,
                *_RANGE,
                *_PAGE,
                _query(
                    "status",
                    "",
                    {"enum": ["success", "error", "timeout", "assertion_failed", "warning"]},
                ),
                _query("event_type", "", {"enum": list(EVENT_TYPES)}),
                _query("model", ""),
                _query("run_id", ""),
                _query("user_id", ""),
                _query("tag", ""),
                _query("q", "text searched in prompts and responses"),
            ],
        ),
        "/v1/analytics/event/{event_id}": _get(
            "One event with its tool calls, steps, family",
            answers.EventDetail,
            [_PROJECT, _path("event_id")],
            (404,),
        ),
        "/v1/analytics/runs": _get(
            "Runs that started in the range", answers.RunsPage, [_PROJECT, *_RANGE, *_PAGE]
        ),
        "/v1/analytics/runs/{run_id}": _get(
            "One run as a tree of its events and spans",
            answers.RunDetail,
            [_PROJECT, _path("run_id")],
            (404,),
        ),
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
                }
            },
        },
    }


async def openapi_endpoint(request: Request) -> Response:
    wl = request.app.state.watchllm
    if wl.openapi is None:
        wl.openapi = build_document()
    return JSONResponse(wl.openapi)
