"""Client-facing errors: one exception type, one JSON shape, every status the API uses."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope


class Problem(Exception):
    """An answer other than success. `field` names what was wrong, when one thing was."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Routes whose errors have a shape of their own (the OTLP receiver's: a Status message in the
# request's encoding), by path: for a Problem answered before the route runs (a middleware's).
_RENDERERS: dict[str, Callable[[Scope, Problem], Response]] = {}


def render_problems_at(paths: Iterable[str], render: Callable[[Scope, Problem], Response]) -> None:
    """Answer a Problem raised before a route at one of `paths` runs with `render`."""
    for path in paths:
        _RENDERERS[path] = render


def answer_for(scope: Scope, problem: Problem) -> Response:
    """The answer to `problem` for the request of `scope`, in its route's shape."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):  # mounted under a prefix in a host app
        path = path[len(root) :]
    render = _RENDERERS.get(path)
    return problem.response() if render is None else render(scope, problem)


def unauthorized(message: str) -> Problem:
    return Problem(
        401,
        "unauthorized",
        message,
        field="Authorization",
        headers={"WWW-Authenticate": 'Bearer realm="watchllm"'},
    )


def other_project(key_project: str, named: str) -> Problem:
    """403 for a request naming a project (`project_id`) other than its key's."""
    return Problem(
        403,
        "forbidden",
        f"the key belongs to project {key_project!r}, not {named!r}",
        field="project_id",
    )


ECHO_CHARS = 64  # the most of a client's own text (a name, a value) an error repeats


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` as an error repeats it: cut at `limit` characters, "..." marking the cut (an
    answer stays small whatever name or value a client sent)."""
    return text if len(text) <= limit else text[:limit] + "..."


def not_a_project_id(value: str, field: str = "project") -> Problem:
    """400 for a parameter (of the query or the path) that should name a project and is not a
    project id (checked before anything is read or made for it); a long value is shown cut
    at 64 characters, the most a project id has."""
    return Problem(
        400,
        "bad_parameter",
        f"{field}: not a project id (1-64 of A-Z a-z 0-9 _ . -): {echo(value)!r}",
        field=field,
    )


async def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()
