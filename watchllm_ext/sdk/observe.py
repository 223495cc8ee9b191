"""Runs and nesting: `client.run()` and the `@observe` decorator.

Both set the run context (watchllm_ext.sdk.context) for the code inside, so every event logged
there, by the caller, by `@observe`d functions below or by the OpenAI/Anthropic integrations,
takes its `run_id` and nests under the innermost open step (`parent_event_id`). Each observed
call is one event (an `agent_step` by default, or a `tool_call`) timed from call to return;
an exception is recorded as an `error` event under it (once, however many observed frames it
crosses) and re-raised unchanged. Generators are timed until they are exhausted or closed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import Token
from datetime import UTC, datetime
from typing import Any, Literal

from ._events import capture, capture_text
from .context import RunContext, _current, current_run, new_id

StepKind = Literal["agent_step", "tool_call"]
_LOGGED_MARK = "__watchllm_logged__"

# step_number of agent steps, counted per run (bounded: runs of the host middleware never
# say when they end, so the oldest counters go first).
_steps: OrderedDict[str, Iterator[int]] = OrderedDict()
_steps_lock = threading.Lock()
_MAX_RUNS_COUNTED = 10_000


def _next_step(run_id: str) -> int:
    with _steps_lock:
        counter = _steps.get(run_id)
        if counter is None:
            counter = _steps[run_id] = itertools.count(1)
            if len(_steps) > _MAX_RUNS_COUNTED:
                _steps.popitem(last=False)
        return next(counter)


def _forget_run(run_id: str) -> None:
    with _steps_lock:
        _steps.pop(run_id, None)


def _record_exception(client: Any, exc: BaseException, ctx: RunContext) -> None:
    """One `error` event per exception, under the innermost step it left."""
    if getattr(exc, _LOGGED_MARK, False):
        return
    # Exceptions with __slots__ cannot be marked: they may be logged once per frame then.
    with contextlib.suppress(AttributeError):
        setattr(exc, _LOGGED_MARK, True)
    # strict mode's validation must not replace the user's exception.
    with contextlib.suppress(Exception):
        client.log_error(exc, run_id=ctx.run_id, parent_event_id=ctx.parent_event_id)


class _Step:
    """One timed step: its event id is known at the start, so what runs inside nests under it;
    the event itself is logged at the end with the latency and status."""

    def __init__(
        self,
        client: Any,
        kind: StepKind,
        name: str,
        outer: RunContext | None,
        run_fields: dict[str, Any] | None = None,
        step_number: int | None = None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.name = name
        self.event_id = new_id()
        if outer is None:
            outer = RunContext(run_id=new_id(), **(run_fields or {}))
            self.root = True
        else:
            self.root = False
        self.outer = outer
        self.inner = outer.child(self.event_id)
        self.step_number = step_number
        self.started = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.input: Any = None
        self.output: Any = None
        self.has_output = False

    def finish(self, exc: BaseException | None = None) -> None:
        latency_ms = (time.perf_counter() - self.t0) * 1000.0
        status = "success"
        if exc is not None:
            status = "error"
            _record_exception(self.client, exc, self.inner)
        fields: dict[str, Any] = {
            "event_id": self.event_id,
            "timestamp": self.started,
            "run_id": self.outer.run_id,
            "latency_ms": latency_ms,
            "status": status,
        }
        # Logged in the outer context: its parent, user, session, tags and metadata apply.
        token = _current.set(self.outer)
        try:
            if self.kind == "tool_call":
                self.client.log_tool_call(
                    self.name,
                    tool_input=self.input,
                    tool_output=self.output if self.has_output else None,
                    error_message=None if exc is None else f"{type(exc).__name__}: {exc}"[:10_000],
                    **fields,
                )
            else:
                number = self.step_number
                if number is None:
                    number = _next_step(self.outer.run_id)
                self.client.log_agent_step(
                    number,
                    step_name=self.name,
                    action=None if self.input is None else capture_text(self.input),
                    observation=capture_text(self.output) if self.has_output else None,
                    **fields,
                )
        except Exception:
            if exc is None:  # strict mode: a bad event surfaces, but never over the user's error
                raise
        finally:
            _current.reset(token)
        if self.root:
            _forget_run(self.outer.run_id)


class Run:
    """What `client.run(...)` returns: a sync and async context manager for one run."""

    def __init__(
        self,
        client: Any,
        name: str | None,
        run_id: str | None,
        user_id: str | None,
        session_id: str | None,
        tags: tuple[str, ...],
        metadata: dict[str, Any],
    ) -> None:
        self.client = client
        self.name = name or "run"
        self.context = RunContext(
            run_id=run_id or new_id(),
            user_id=user_id,
            session_id=session_id,
            tags=tags,
            metadata=metadata,
        )
        self._step: _Step | None = None
        self._token: Token[RunContext | None] | None = None

    @property
    def run_id(self) -> str:
        return self.context.run_id

    def __enter__(self) -> Run:
        # step 0: the run's root; steps and calls inside count from 1.
        self._step = _Step(self.client, "agent_step", self.name, self.context, step_number=0)
        self._step.root = True
        self._token = _current.set(self._step.inner)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._step is not None and self._token is not None
        _current.reset(self._token)
        self._step.finish(exc)

    async def __aenter__(self) -> Run:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


def observe(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    as_type: StepKind = "agent_step",
    capture_input: bool = True,
    capture_output: bool = True,
    client: Any = None,
) -> Any:
    """Decorate a function (sync, async, generator or async generator) so each call is a
    step of the current run (a new run when there is none): `@observe`, or
    `@observe(name="search", as_type="tool_call", capture_input=False)`.

    Logs to `client`, or to the client made last in this process (`get_client()`, resolved
    at each call, so the decorator can be applied before the client exists).
    """
    if as_type not in ("agent_step", "tool_call"):
        raise ValueError(f"as_type: must be 'agent_step' or 'tool_call', not {as_type!r}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        label = name or getattr(func, "__qualname__", None) or repr(func)

        def start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Step:
            from .core import get_client

            step = _Step(client or get_client(), as_type, label, current_run())
            # A disabled client (tests, no key) logs nothing: skip the capture's cost.
            if capture_input and step.client.enabled:
                step.input = capture({"args": list(args), "kwargs": kwargs})
            return step

        def done(step: _Step, value: Any) -> None:
            if capture_output and step.client.enabled:
                step.output = capture(value)
                step.has_output = True
            step.finish()

        if inspect.isasyncgenfunction(func):

            @functools.wraps(func)
            async def agen_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                step = start(args, kwargs)
                token = _current.set(step.inner)
                try:
                    agen = func(*args, **kwargs)
                finally:
                    _current.reset(token)
                items = 0
                method: Callable[[Any], Any] = agen.asend
                arg: Any = None
                try:
                    while True:
                        # Each step runs in the observed context; between steps the caller's
                        # context is its own again (a yield must not leak ours out).
                        token = _current.set(step.inner)
                        try:
                            item = await method(arg)
                        except StopAsyncIteration:
                            break
                        finally:
                            _current.reset(token)
                        items += 1
                        try:
                            arg = yield item
                            method = agen.asend
                        except GeneratorExit:
                            await agen.aclose()
                            raise
                        except BaseException as thrown:
                            method, arg = agen.athrow, thrown
                except GeneratorExit:
                    done(step, {"items": items, "closed_early": True})
                    raise
                except BaseException as exc:
                    step.finish(exc)
                    raise
                done(step, {"items": items})

            return agen_wrapper

        if inspect.isgeneratorfunction(func):

            @functools.wraps(func)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                step = start(args, kwargs)
                token = _current.set(step.inner)
                try:
                    gen = func(*args, **kwargs)
                finally:
                    _current.reset(token)
                items = 0
                method: Callable[[Any], Any] = gen.send
                arg: Any = None
                try:
                    while True:
                        token = _current.set(step.inner)
                        try:
                            item = method(arg)
                        except StopIteration as stop:
                            result = stop.value
                            break
                        finally:
                            _current.reset(token)
                        items += 1
                        try:
                            arg = yield item
                            method = gen.send
                        except GeneratorExit:
                            gen.close()
                            raise
                        except BaseException as thrown:
                            method, arg = gen.throw, thrown
                except GeneratorExit:
                    done(step, {"items": items, "closed_early": True})
                    raise
                except BaseException as exc:
                    step.finish(exc)
                    raise
                done(step, {"items": items, "return": result})
                return result

            return gen_wrapper

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                step = start(args, kwargs)
                token = _current.set(step.inner)
                try:
                    value = await func(*args, **kwargs)
                except BaseException as exc:
                    _current.reset(token)
                    step.finish(exc)
                    raise
                _current.reset(token)
                done(step, value)
                return value

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            step = start(args, kwargs)
            token = _current.set(step.inner)
            try:
                value = func(*args, **kwargs)
            except BaseException as exc:
                _current.reset(token)
                step.finish(exc)
                raise
            _current.reset(token)
            done(step, value)
            return value

        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate
