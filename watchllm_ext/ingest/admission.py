"""Pushback before overload: the request bodies held in memory, and the wait for a place to
work on one. Past either bound a request is answered 503 with Retry-After at once.

Without them a server offered more than it can do took it all in and let it queue: with 500
connections posting 1,000-event batches, requests waited 9-17 s for a place (clients gave up
after 20 s, sent again, and the server still did the work of those it no longer answered);
120 gzip bodies that inflate to the 50 MB limit held 6 GB at once. OpenTelemetry's exporters
retry a 503 with backoff and give up after 10 s, so a prompt 503 keeps what they send; a slow
answer loses it.

- `BodyBudget`: the bytes of request bodies held at once, in all requests of one app
  (`max_body_memory_bytes`). Each piece read (decompressed, when compressed) is charged as it
  comes; a piece over the budget ends the request with 503 (the rest of its body is dropped
  as it comes, unkept). A request's charge is given back when its answer is sent
  (`BodyBudgetMiddleware`), once nothing holds the body. One project's requests hold at
  most its `share` (`max_body_memory_per_project_bytes`), and requests without a key (the
  dashboard's sign-in form, a billing webhook) one share together: otherwise one tenant
  whose bodies inflate and then trickle could hold the whole budget for their time limit,
  and every other project's requests would be 503.
- `wait_for_place`: a place to work on a body (`ingest_threads`, the OTLP decoder) is waited
  for at most `ingest_queue_timeout_s`. Within `one_wait_budget` (the OTLP receiver's
  requests) the waits of a request share that time in all: one that waits for a worker
  process, then for the server's place to decode, then to validate, waited up to three times
  it (6 s of an exporter's 10).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Problem

# The scope key of a request's Charge (set by BodyBudgetMiddleware, read by body.py).
BODY_CHARGE = "watchllm.body_charge"
# Seconds a client is asked to wait: the budget frees as requests end, a few a second.
BODY_RETRY_AFTER_S = 1
QUEUE_RETRY_AFTER_S = 2


# The tenant of requests that read their body before any key is known.
NO_KEY = ""


class BodyBudget:
    """Bytes of request bodies held at once, in all and by tenant; for one event loop (not
    thread-safe)."""

    __slots__ = ("by_tenant", "held", "limit", "share")

    def __init__(self, limit: int, share: int | None = None) -> None:
        self.limit = limit
        self.share = limit if share is None else min(share, limit)
        self.held = 0
        self.by_tenant: dict[str, int] = {}


class Charge:
    """What one request holds of the budget, for its tenant (a project id, or NO_KEY)."""

    __slots__ = ("budget", "held", "tenant")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0
        self.tenant = NO_KEY

    def take(self, n: int) -> None:
        budget = self.budget
        # The connection stays open on a 503: the server drops the rest of the body as it
        # comes (closing with it unread would reset the connection before the client read it).
        if budget.held + n > budget.limit:
            raise _overloaded(
                f"the server holds {budget.held} bytes of request bodies, near its limit of"
                f" {budget.limit} (max_body_memory_bytes)",
                BODY_RETRY_AFTER_S,
            )
        tenant = self.tenant
        ours = budget.by_tenant.get(tenant, 0)
        if ours + n > budget.share:
            whose = f"project {tenant}'s requests hold" if tenant else "requests without a key hold"
            raise _overloaded(
                f"{whose} {ours} bytes of request bodies, near the share of one of"
                f" {budget.share} (max_body_memory_per_project_bytes)",
                BODY_RETRY_AFTER_S,
            )
        budget.held += n
        budget.by_tenant[tenant] = ours + n
        self.held += n

    def for_tenant(self, tenant: str) -> None:
        """Charge what this request reads from now on to `tenant` (its key's project)."""
        if self.held:  # what was read before the key was known stays where it was charged
            raise RuntimeError("a request's tenant is set before its body is read")
        self.tenant = tenant

    def release(self) -> None:
        held = self.held
        if not held:
            return
        budget = self.budget
        budget.held -= held
        left = budget.by_tenant[self.tenant] - held
        if left:
            budget.by_tenant[self.tenant] = left
        else:
            del budget.by_tenant[self.tenant]  # bounded by the tenants reading right now
        self.held = 0


class BodyBudgetMiddleware:
    """Gives each HTTP request a Charge on the app's budget and takes it back at the end."""

    def __init__(self, app: ASGIApp, budget: BodyBudget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        charge = scope[BODY_CHARGE] = Charge(self.budget)
        try:
            await self.app(scope, receive, send)
        finally:
            charge.release()


async def wait_for_place(acquire: Callable[[], Awaitable[object]], timeout_s: float) -> None:
    """`await acquire()`, or 503 when no place comes within `timeout_s` (less what the
    request's wait budget has spent). The caller holds nothing then: a place granted as the
    wait ends is given back by `acquire`'s own cancellation handling, as anyio's limiters and
    slots.FairSlots do."""
    if not await acquire_within(acquire, timeout_s):
        raise _overloaded(
            f"the server is busy: no place to work on this request came within {timeout_s:g} s"
            " (ingest_queue_timeout_s)",
            QUEUE_RETRY_AFTER_S,
        )


# What the current request may still wait, in seconds, when its waits share one budget.
_WAIT_LEFT: ContextVar[list[float] | None] = ContextVar("watchllm_wait_left", default=None)
# The least a wait gets once its request's budget is spent: a place that is free is taken.
MIN_WAIT_S = 0.05


@contextmanager
def one_wait_budget(timeout_s: float) -> Iterator[None]:
    """Within it, the waits of acquire_within (and wait_for_place) share `timeout_s` in all."""
    token = _WAIT_LEFT.set([timeout_s])
    try:
        yield
    finally:
        _WAIT_LEFT.reset(token)


async def acquire_within(acquire: Callable[[], Awaitable[object]], limit_s: float) -> bool:
    """`await acquire()` for at most `limit_s`, and at most what the request's wait budget
    has left (never under MIN_WAIT_S); whether it was acquired. The time waited is spent."""
    left = _WAIT_LEFT.get()
    if left is not None:
        limit_s = min(limit_s, max(left[0], MIN_WAIT_S))
    started = anyio.current_time()
    with anyio.move_on_after(limit_s) as waited:
        await acquire()
    if left is not None:
        left[0] -= anyio.current_time() - started
    return not waited.cancelled_caught


def _overloaded(why: str, retry_after_s: int) -> Problem:
    return Problem(
        503,
        "overloaded",
        f"{why}; retry after {retry_after_s} s",
        field="body",
        headers={"Retry-After": str(retry_after_s)},
    )
