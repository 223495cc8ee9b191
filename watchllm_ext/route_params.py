"""Query parameters a route declares: any other name sent is a 400 naming it.

Every route that reads a query string (analytics, admin, quotas) declares the names it takes
with `accepts`; the route reads them from a `Query`, which refuses the rest (a misspelled
filter would otherwise widen the answer without a word)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from urllib.parse import unquote_to_bytes

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from .errors import ECHO_CHARS, Problem, echo

# How much of a refused parameter's name an error shows.
MAX_NAME_SHOWN = ECHO_CHARS


def bad(name: str, message: str) -> Problem:
    return Problem(400, "bad_parameter", f"{name}: {message}", field=name)


class UndeclaredParameter(RuntimeError):
    """A route read a query parameter it does not declare: a bug in the route, not the
    request's fault, raised on the first call of that route so that no test misses it."""


class Query(QueryParams):
    """A route's query parameters, held to the names it accepts (its declaration). `check`
    answers a name sent that is not accepted (a misspelling, another route's filter) with
    400 naming it and listing the accepted ones, instead of ignoring it and answering
    unfiltered data; and a name sent twice too (`?tag=a&tag=b` filtered on b alone: which
    value is meant would depend on who reads it, as for two Authorization headers). Reading
    a name that is not accepted raises UndeclaredParameter, so a route cannot parse a
    parameter without accepting it."""

    def __init__(
        self, params: QueryParams, accepted: frozenset[str], raw: bytes | None = None
    ) -> None:
        super().__init__(params)
        self.accepted = accepted
        self.raw = raw  # the query string as sent, for the UTF-8 check

    def check(self) -> None:
        """400 for the first name sent that is not accepted, or sent again: a set look-up or
        two a name; and for a value whose percent-encoded bytes are not UTF-8 (read as U+FFFD,
        it would be searched for as that character)."""
        seen: set[str] = set()
        for name, value in self._list:
            if name not in self.accepted:
                accepts = ", ".join(sorted(self.accepted)) or "none"
                if not name:  # "?=x" or "?&=x": a value with no name to refuse it by
                    raise bad(
                        "query",
                        f"a query parameter has no name (=value); this route accepts: {accepts}",
                    )
                shown = echo(name, MAX_NAME_SHOWN)
                raise bad(
                    shown, f"unknown query parameter {shown!r}; this route accepts: {accepts}"
                )
            if name in seen:
                shown = echo(name, MAX_NAME_SHOWN)
                raise bad(shown, "sent more than once; send each parameter once")
            seen.add(name)
            if "\ufffd" in value and self.raw is not None:  # rare: then the bytes sent decide
                _check_utf8(self.raw)

    def _declared(self, name: object) -> None:
        if name not in self.accepted:
            raise UndeclaredParameter(
                f"the route reads query parameter {name!r} but does not accept it;"
                f" add it to its declaration (accepts: {', '.join(sorted(self.accepted))})"
            )

    def __getitem__(self, key: str) -> str:
        self._declared(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._declared(key)
        return super().__contains__(key)

    def getlist(self, key: object) -> list[str]:
        self._declared(key)
        return super().getlist(key)


def _check_utf8(raw: bytes) -> None:
    """400 naming the first parameter whose value's bytes (percent-decoded) are not UTF-8."""
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode()
        except UnicodeDecodeError:
            shown = echo(unquote_to_bytes(name).decode(errors="replace"), MAX_NAME_SHOWN)
            raise bad(shown, "not valid UTF-8 text (percent-encoded bytes)") from None


def refuse_query(request: Request) -> None:
    """For a route that takes no query parameters (the ingest routes): 400 naming the first
    one sent. An event posted with `?dry_run=1` or `?project_id=other` was stored as if the
    parameter were not there; nothing to do for the query string nearly every request has,
    an empty one."""
    if request.scope["query_string"]:
        for name in request.query_params:  # none for "?&"
            if not name:  # "?=x": a value with no name to refuse it by
                raise bad("query", "this route takes no query parameters (sent a nameless value)")
            raise bad(echo(name, MAX_NAME_SHOWN), "this route takes no query parameters")


Endpoint = Callable[[Request], Awaitable[Response]]
# A route as written: the request, and its query parameters held to those it accepts.
Declared = Callable[[Request, Query], Awaitable[Response]]


def accepts(*names: Iterable[str]) -> Callable[[Declared], Endpoint]:
    """Declare the query parameters a route accepts (groups of names, such as
    analytics/params.py's PROJECT, RANGE, PAGE, and the route's own), the one list of them:
    the route gets its query string as a Query of these names, which it reads them from, and
    refuses any other name sent (`Query.check`) with a 400 naming it (docs/ANALYTICS.md,
    "Parameters"). The names are the endpoint's `accepted` (tests drive every one)."""
    accepted = frozenset(name for group in names for name in group)

    def declare(route: Declared) -> Endpoint:
        @wraps(route)
        async def endpoint(request: Request) -> Response:
            query = Query(request.query_params, accepted, request.scope["query_string"])
            return await route(request, query)

        endpoint.accepted = accepted  # type: ignore[attr-defined]
        return endpoint

    return declare
