"""`WatchLLM`: log events from any thread; a background worker batches and delivers them.

The caller's thread only builds a dict and appends it to a bounded queue (no lock, no I/O,
no validation unless `strict=True`), so a `log_*` call costs microseconds and never raises or
blocks. The worker validates, masks, batches by count and bytes, gzips, sends and retries;
everything it could not deliver is counted by reason in `stats()`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import platform
import random
import signal
import socket
import threading
import time
import traceback
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from .. import __version__
from ._events import InvalidEvent, Mask, prepare, validate
from .context import RunContext, current_run, new_id, register_local_sender
from .transport import (
    Answer,
    HttpTransport,
    LocalTransport,
    NetworkError,
    Transport,
    check_base_url,
)

log = logging.getLogger("watchllm.sdk")

# Answers worth another try: the server is busy, restarting or behind a proxy that failed.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
DROP_REASONS = (
    "queue_full",  # the buffer held max_queue events or max_queue_bytes; the new one was dropped
    "invalid",  # the contract refuses the event (logged with the fields at fault)
    "mask_error",  # the mask callback raised: the event is dropped, never sent unmasked
    "rejected",  # the server refused it (400, 422, 207's rejected list); not retried
    "unauthorized",  # 401 or 403: the key is unknown, revoked or has no ingest scope
    "too_large",  # one event alone over the server's body limit (413)
    "server_error",  # 500 or another answer that is not retried
    "retries_exhausted",  # still failing after retry_for_s
    "shutdown",  # still buffered or waiting for a retry when close()'s timeout ran out
    "sdk_error",  # a bug in the SDK itself (logged with its traceback)
)
Transports = Literal["auto", "http", "local"]
# Drops of one reason after its first warning are added up and reported at most this often
# (and at close): a hot loop must not flood the log, nor hide how many it lost.
DROP_REPORT_EVERY_S = 10.0


class WatchLLM:
    """The WatchLLM SDK client.

    `WatchLLM(api_key=..., base_url=...)`, or from `WATCHLLM_API_KEY` / `WATCHLLM_BASE_URL`.
    Without a key it is disabled (one warning): every method still works and sends nothing.
    Without a base URL it delivers to a WatchLLM app mounted in this process (`transport=
    "local"`); see docs/SDK.md for every option.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        transport: Transports = "auto",
        enabled: bool = True,
        strict: bool = False,
        sample_rate: float = 1.0,
        mask: Mask | None = None,
        capture_content: bool = True,
        env: str | None = None,
        release: str | None = None,
        flush_at: int = 500,
        flush_interval_s: float = 1.0,
        max_batch_events: int = 1000,
        max_batch_bytes: int = 4 * 1024 * 1024,
        max_queue: int = 10_000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        gzip: bool = True,
        timeout_s: float = 10.0,
        retry_for_s: float = 300.0,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        flush_at_exit_s: float = 5.0,
        handle_sigterm: bool = True,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate: must be between 0 and 1, not {sample_rate}")
        if transport not in ("auto", "http", "local"):
            raise ValueError(f"transport: must be 'auto', 'http' or 'local', not {transport!r}")
        for name, value in (
            ("flush_at", flush_at),
            ("max_batch_events", max_batch_events),
            ("max_queue", max_queue),
            ("max_queue_bytes", max_queue_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, not {value}")
        self.api_key = api_key or os.environ.get("WATCHLLM_API_KEY") or None
        # A malformed URL is a mistake to hear about now, not a server that seems down (its
        # events retried for retry_for_s, then dropped). The variable is not checked for a
        # client made disabled: get_client() falls back to one when it is malformed.
        if base_url:
            self.base_url: str | None = check_base_url(base_url)
        else:
            self.base_url = os.environ.get("WATCHLLM_BASE_URL") or None
            if self.base_url and enabled:
                check_base_url(self.base_url, "base_url (from WATCHLLM_BASE_URL)")
        self.strict = strict
        self.sample_rate = sample_rate
        self.mask = mask
        self.capture_content = capture_content
        self.env = env
        self.release = release
        self.flush_at = flush_at
        self.flush_interval_s = flush_interval_s
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.gzip = gzip
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.flush_at_exit_s = flush_at_exit_s
        self._transport_choice = transport
        self._client_info = {
            "sdk_version": f"watchllm-python/{__version__}",
            "hostname": socket.gethostname()[:256],
            "platform": f"python {platform.python_version()} {platform.system()}"[:256],
        }
        self.enabled = enabled
        # Why the client sends nothing, for stats()'s last_error: a script that prints its
        # stats sees the cause, not a healthy-looking "0 sent, 0 dropped".
        self.disabled_reason: str | None = None if enabled else "disabled (enabled=False)"
        if enabled and not self.api_key:
            self._disable("no api_key and no WATCHLLM_API_KEY")
        if self.enabled and transport == "http" and not self.base_url:
            self._disable("transport='http' and no base_url")
        if self.enabled and self._uses_local() and not self.base_url:
            log.info("WatchLLM: no base_url, events go to the WatchLLM app in this process")
        self._reset_state()
        if self.enabled and self._uses_local():
            # The app flushes us before it stops: at exit (atexit, SIGTERM) it is gone already.
            register_local_sender(self)
        _clients.add(self)
        global _default_client
        _default_client = self
        if self.enabled and handle_sigterm:
            _flush_on_sigterm()

    def _disable(self, why: str) -> None:
        # Missing configuration never raises into the host: one warning, nothing sent.
        self.enabled = False
        self.disabled_reason = f"WatchLLM is disabled: {why} (events are not sent)"
        log.warning("%s", self.disabled_reason)

    # -- state, fork safety ----------------------------------------------------------------

    def _uses_local(self) -> bool:
        return self._transport_choice == "local" or (
            self._transport_choice == "auto" and not self.base_url
        )

    def _reset_state(self) -> None:
        """Everything that belongs to one process: a forked child calls it again and so gets
        an empty buffer, fresh locks and counters, and a worker of its own on first use."""
        self._pid = os.getpid()
        # (event, its estimated size in bytes), oldest first.
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self._queued_bytes = 0
        self._wake = threading.Event()
        self._abandon = threading.Event()
        self._start_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._settled_cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._closing = False
        self._transport: Transport | None = None
        # Events appended so far and settled ones (delivered or dropped by the worker): flush()
        # waits for the second to reach the first. The lock is uncontended: ~0.1 us a call.
        self._count_lock = threading.Lock()
        self._enqueued = 0
        self._settled = 0
        self._in_flight = 0  # events the worker holds: being sent, or waiting to be retried
        self._sending = 0  # of those, the ones in a transport send under way
        # Why the batch being retried has not landed (None once the server answers): what
        # close() names, as a drop meanwhile (queue_full, say) takes last_error.
        self._failing: str | None = None
        self._stats: dict[str, Any] = {
            "sent": 0,
            "batches": 0,
            "retries": 0,
            "sampled_out": 0,
            "dropped": dict.fromkeys(DROP_REASONS, 0),
            "last_error": None,
        }
        # By reason: when drops were last reported, and those since (count, last message).
        self._reported_at: dict[str, float] = {}
        self._unreported: dict[str, tuple[int, str]] = {}

    def _after_fork_in_child(self) -> None:
        # The parent's worker and HTTP connections do not exist here (threads are not copied;
        # sockets are shared with the parent, so they are left alone, not closed).
        closed = self._closed
        self._reset_state()
        self._closed = closed

    def _make_transport(self) -> Transport:
        assert self.api_key is not None
        if self._uses_local():
            chosen = self._transport_choice == "local"
            return LocalTransport(self.api_key, self.timeout_s, chosen)
        assert self.base_url is not None
        return HttpTransport(self.base_url, self.api_key, self.timeout_s, self.gzip)

    @property
    def transport_name(self) -> str:
        """'http', 'local', or 'disabled'."""
        if not self.enabled:
            return "disabled"
        return "local" if self._uses_local() else "http"

    # -- logging (the caller's thread) -------------------------------------------------------

    def log_event(self, event_type: str, **fields: Any) -> str:
        """Log one event of any type (fields of the v1 contract); returns its event_id.

        Fills event_id, timestamp, run_id, parent_event_id, user_id, session_id, tags and
        metadata from the current run (see `run()` and `@observe`) unless given.
        """
        event = self._build(event_type, fields)
        self._enqueue(event)
        return event["event_id"]

    def _build(self, event_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        event = {k: v for k, v in fields.items() if v is not None}
        event["event_type"] = event_type
        if "event_id" not in event:
            # 128 random bits as 32 hex digits, like new_id() but 4x cheaper than a uuid4:
            # this is the hottest line of a log call.
            event["event_id"] = os.urandom(16).hex()
        if "timestamp" not in event:
            event["timestamp"] = datetime.now(UTC)
        ctx = current_run()
        if ctx is not None:
            event.setdefault("run_id", ctx.run_id)
            if ctx.parent_event_id is not None and event["run_id"] == ctx.run_id:
                event.setdefault("parent_event_id", ctx.parent_event_id)
            if ctx.user_id is not None:
                event.setdefault("user_id", ctx.user_id)
            if ctx.session_id is not None:
                event.setdefault("session_id", ctx.session_id)
            # Merged only with values of the right type: anything else is left for the
            # validation to report (counted), never a TypeError in the caller's code.
            tags = event.get("tags", ())
            if ctx.tags and isinstance(tags, list | tuple):
                event["tags"] = [*ctx.tags, *tags]
            metadata = event.get("metadata", {})
            if ctx.metadata and isinstance(metadata, dict):
                event["metadata"] = {**ctx.metadata, **metadata}
            if ctx.tally is not None and event["run_id"] == ctx.run_id:
                ctx.tally.count(event)  # a host request's summary counts its calls (context.py)
        elif "run_id" not in event:
            event["run_id"] = event["event_id"]  # an event outside any run is a run of its own
        if self.env is not None:
            event.setdefault("env", self.env)
        if self.release is not None:
            event.setdefault("release", self.release)
        event.setdefault("client", self._client_info)
        return event

    def _enqueue(self, event: dict[str, Any]) -> None:
        if self.strict:
            validate(event)  # raises at the call site: a mistake is found in development
        if not self.enabled or self._closed:
            return
        if self.sample_rate < 1.0 and not self._sampled(event["run_id"]):
            with self._stats_lock:
                self._stats["sampled_out"] += 1
            return
        if self._pid != os.getpid():  # forked without register_at_fork (os.fork is covered)
            self._after_fork_in_child()
        queue = self._queue
        size = approx_size(event)
        with self._count_lock:
            full = len(queue) >= self.max_queue or self._queued_bytes + size > self.max_queue_bytes
            if not full:
                queue.append((event, size))
                self._queued_bytes += size
                self._enqueued += 1
        if full:
            self._drop(
                "queue_full",
                1,
                f"the buffer holds {len(queue)} events, about {self._queued_bytes} bytes"
                f" (max_queue {self.max_queue}, max_queue_bytes {self.max_queue_bytes})",
            )
            return
        if self._worker is None:
            self._start_worker()
        elif len(queue) >= self.flush_at:
            self._wake.set()

    def _sampled(self, run_id: str) -> bool:
        # By run, not by event: a run is kept or left out whole, so its tree stays complete.
        return zlib.crc32(str(run_id).encode()) / 0x1_0000_0000 < self.sample_rate

    def log_prompt_call(
        self,
        *,
        model: str | None = None,
        provider: str | None = None,
        prompt: Any = None,
        response: str | None = None,
        tokens_input: int | None = None,
        tokens_output: int | None = None,
        latency_ms: float | None = None,
        status: str | None = None,
        error_message: str | None = None,
        cost_estimate_usd: float | None = None,
        **fields: Any,
    ) -> str:
        """A call to a model. Without `cost_estimate_usd` the server prices it from the
        tokens and its price tables. `prompt` is text or a list of {role, content} messages."""
        return self.log_event(
            "prompt_call",
            model=model,
            provider=provider,
            prompt=prompt,
            response=response,
            tokens_input=tokens_input,
            tokens_output=tokens_output,
            latency_ms=latency_ms,
            status=status,
            error_message=error_message,
            cost_estimate_usd=cost_estimate_usd,
            **fields,
        )

    def log_tool_call(
        self,
        tool_name: str,
        *,
        tool_input: Any = None,
        tool_output: Any = None,
        status: str | None = None,
        latency_ms: float | None = None,
        error_message: str | None = None,
        **fields: Any,
    ) -> str:
        return self.log_event(
            "tool_call",
            tool_name=tool_name,
            tool_input=tool_input,
            tool_output=tool_output,
            status=status,
            latency_ms=latency_ms,
            error_message=error_message,
            **fields,
        )

    def log_agent_step(
        self,
        step_number: int,
        *,
        step_name: str | None = None,
        reasoning: str | None = None,
        action: str | None = None,
        observation: str | None = None,
        status: str | None = None,
        latency_ms: float | None = None,
        **fields: Any,
    ) -> str:
        return self.log_event(
            "agent_step",
            step_number=step_number,
            step_name=step_name,
            reasoning=reasoning,
            action=action,
            observation=observation,
            status=status,
            latency_ms=latency_ms,
            **fields,
        )

    def log_error(
        self,
        error: BaseException | None = None,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        stack_trace: str | None = None,
        **fields: Any,
    ) -> str:
        """An error: `log_error(exc)` takes type, message and traceback from the exception."""
        if error is not None and not isinstance(error, BaseException):
            # log_error("message"): taken as the message, not an exception to read.
            error_message, error = error_message or str(error), None
            error_type = error_type or "Error"
        if error is not None:
            error_type = error_type or type(error).__name__
            if error_message is None:
                error_message = str(error)[:10_000]  # the contract's limit for messages
            if stack_trace is None and error.__traceback__ is not None:
                stack_trace = "".join(traceback.format_exception(error))
        return self.log_event(
            "error",
            error_type=error_type,
            error_message=error_message,
            stack_trace=stack_trace,
            **fields,
        )

    def log_assertion_failed(
        self,
        assertion_name: str,
        *,
        expected: Any = None,
        actual: Any = None,
        severity: str | None = None,
        **fields: Any,
    ) -> str:
        return self.log_event(
            "assertion_failed",
            assertion_name=assertion_name,
            expected=expected,
            actual=actual,
            severity=severity,
            **fields,
        )

    def log_hallucination_detected(
        self,
        detection_method: str,
        confidence: float,
        claim: str,
        *,
        evidence: str | None = None,
        severity: str | None = None,
        **fields: Any,
    ) -> str:
        return self.log_event(
            "hallucination_detected",
            detection_method=detection_method,
            confidence=confidence,
            claim=claim,
            evidence=evidence,
            severity=severity,
            **fields,
        )

    def log_cost_threshold_exceeded(
        self, threshold_usd: float, actual_usd: float, window: str, **fields: Any
    ) -> str:
        return self.log_event(
            "cost_threshold_exceeded",
            threshold_usd=threshold_usd,
            actual_usd=actual_usd,
            window=window,
            **fields,
        )

    def log_performance_alert(
        self, metric: str, threshold: float, actual: float, window: str, **fields: Any
    ) -> str:
        return self.log_event(
            "performance_alert",
            metric=metric,
            threshold=threshold,
            actual=actual,
            window=window,
            **fields,
        )

    # -- runs and nesting ------------------------------------------------------------------

    def run(
        self,
        name: str | None = None,
        *,
        run_id: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """`with client.run(name="answer"):` (or `async with`): a new run; events logged inside
        belong to it and nest under its root step, which records the run's time and status."""
        from .observe import Run

        return Run(self, name, run_id, user_id, session_id, tuple(tags), metadata or {})

    def observe(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """`@client.observe` / `@client.observe(name=..., as_type="tool_call")`: see
        `watchllm_ext.sdk.observe`; this one always logs to this client."""
        from .observe import observe

        return observe(fn, client=self, **options)

    # -- the worker --------------------------------------------------------------------------

    def _start_worker(self) -> None:
        with self._start_lock:
            if self._worker is not None or self._closed:
                return
            worker = threading.Thread(target=self._work, name="watchllm-sdk", daemon=True)
            self._worker = worker
            worker.start()

    def _work(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # a bug here must not kill the worker silently
                log.exception("WatchLLM SDK worker error")
                self._note_error(f"worker: {exc!r}")
            self._report_drops()
            if self._closing and not self._queue:
                return

    def _take(self) -> list[dict[str, Any]]:
        queue = self._queue
        taken: list[dict[str, Any]] = []
        freed = 0
        with self._count_lock:
            while queue and len(taken) < self.max_batch_events:
                event, size = queue.popleft()
                taken.append(event)
                freed += size
            self._queued_bytes -= freed
        return taken

    def _drain(self) -> None:
        # What waits now goes; what comes meanwhile waits for flush_at events or the next
        # wake-up (flush_interval_s, or a flush()), as documented: sending on while anything
        # is queued made a request of a few events every few ms under a steady stream.
        owed = len(self._queue)
        while self._queue and (owed > 0 or len(self._queue) >= self.flush_at):
            if self._abandon.is_set():
                self._drop_all_queued()
                return
            taken = self._take()
            owed -= len(taken)
            self._in_flight = len(taken)
            ready: list[bytes] = []
            for event in taken:
                try:
                    data = prepare(event, self.mask, self.capture_content)
                except InvalidEvent as exc:
                    self._drop(exc.reason, 1, str(exc), settle=True)
                    continue
                except Exception as exc:  # a value no encoder takes (a cycle, say)
                    self._drop("invalid", 1, f"cannot encode the event: {exc!r}", settle=True)
                    continue
                if data is None:  # the mask chose to drop it: by design, not a loss
                    self._settle(1)
                    continue
                ready.append(data)
            for batch in self._by_bytes(ready):
                try:
                    self._deliver(batch)
                except Exception as exc:  # a bug of ours: counted, and the worker goes on
                    log.exception("WatchLLM SDK: delivering a batch failed")
                    self._drop("sdk_error", len(batch), repr(exc), settle=True)
            self._in_flight = 0

    def _by_bytes(self, events: list[bytes]) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        size = 0
        for data in events:
            if batch and size + len(data) + 1 > self.max_batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(data)
            size += len(data) + 1
        if batch:
            yield batch

    def _get_transport(self) -> Transport:
        if self._transport is None:
            self._transport = self._make_transport()
        return self._transport

    def _deliver(self, batch: list[bytes]) -> None:
        """Send one batch until it is settled: accepted, refused, or out of retries."""
        pending = [batch]
        deadline = time.monotonic() + self.retry_for_s
        attempt = 0
        while pending:
            part = pending.pop()
            # Set before _abandon is read, as close() sets _abandon before it reads this: a
            # part either is dropped here or is counted by close() as possibly landing.
            self._sending = len(part)
            if self._abandon.is_set():
                self._sending = 0
                self._drop("shutdown", len(part), "close() timed out", settle=True)
                continue
            try:
                answer: Answer | None = self._get_transport().send(part)
                problem = None
            except NetworkError as exc:
                answer, problem = None, str(exc)
            finally:
                self._sending = 0
            self._failing = None  # set again below if this try failed too
            if answer is not None and answer.status in (200, 201, 202, 207):
                self._accepted(part, answer)
                attempt = 0
                continue
            if answer is not None and answer.status == 413:
                if len(part) > 1:  # over the server's count or byte limit: halve and resend
                    half = len(part) // 2
                    pending += [part[half:], part[:half]]
                else:
                    self._drop("too_large", 1, f"413 {answer.message}", settle=True)
                continue
            if answer is not None and answer.status not in RETRY_STATUSES:
                self._refused(part, answer)
                continue
            # Retriable: no answer, 408, 429, 502, 503, 504.
            why = problem if answer is None else f"{answer.status} {answer.message}"
            self._failing = why
            attempt += 1
            backoff = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
            delay = random.uniform(0, backoff)  # full jitter: clients do not retry in step
            if answer is not None and answer.retry_after_s is not None:
                delay = min(answer.retry_after_s, max(self.max_backoff_s, self.retry_for_s))
            if time.monotonic() + delay > deadline:
                self._drop("retries_exhausted", len(part), f"still failing: {why}", settle=True)
                continue
            with self._stats_lock:
                self._stats["retries"] += 1
            self._note_error(f"retrying in {delay:.2f} s: {why}")
            pending.append(part)
            self._abandon.wait(delay)
            self._report_drops()  # the buffer may be filling meanwhile (queue_full)

    def _accepted(self, part: list[bytes], answer: Answer) -> None:
        body = answer.body if isinstance(answer.body, dict) else {}
        rejected = body.get("rejected") or []
        n_rejected = int(body.get("rejected_count") or len(rejected))
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["sent"] += len(part) - n_rejected
        self._settle(len(part) - n_rejected)
        if n_rejected:
            self._drop("rejected", n_rejected, _rejection(answer), settle=True, warn=True)

    def _refused(self, part: list[bytes], answer: Answer) -> None:
        if answer.status in (401, 403):
            reason = "unauthorized"
        elif 400 <= answer.status < 500:
            reason = "rejected"
        else:
            reason = "server_error"
        self._drop(reason, len(part), _rejection(answer), settle=True, warn=True)

    # -- counting ----------------------------------------------------------------------------

    def _settle(self, n: int) -> None:
        with self._settled_cond:
            self._settled += n
            self._settled_cond.notify_all()

    def _note_error(self, message: str) -> None:
        with self._stats_lock:
            self._stats["last_error"] = message

    def _drop(
        self, reason: str, n: int, message: str, *, settle: bool = False, warn: bool = False
    ) -> None:
        now = time.monotonic()  # queue_full runs in the caller's loop: one clock read, no I/O
        with self._stats_lock:
            self._stats["dropped"][reason] += n
            self._stats["last_error"] = f"{reason}: {message}"
            # Server refusals are reported each time (each is one answer, never retried).
            report = (n, True) if warn else self._due_report(reason, n, message, now)
        if report is None:
            log.debug("WatchLLM dropped %d event(s) (%s): %s", n, reason, message)
        else:
            count, first = report
            log.warning(_DROPPED if first else _DROPPED_MORE, _count(count), reason, message)
        if settle:  # after the report: whoever waits in flush() sees it logged
            self._settle(n)

    def _due_report(self, reason: str, n: int, message: str, now: float) -> tuple[int, bool] | None:
        """Under _stats_lock: (events to report now, whether it is the reason's first report),
        or None when the drop is added up for a later report (_report_drops)."""
        if reason == "shutdown":
            return None  # close()'s own warning counted them
        last = self._reported_at.get(reason)
        if last is not None and now - last < DROP_REPORT_EVERY_S:
            self._unreported[reason] = (self._unreported.get(reason, (0, ""))[0] + n, message)
            return None
        self._reported_at[reason] = now
        return n + self._unreported.pop(reason, (0, ""))[0], last is None

    def _report_drops(self, every: bool = False) -> None:
        """Report the drops added up since each reason's last report: those due, or `every`
        one (at close). Called by the worker too, so a burst that stopped is not left unsaid."""
        if not self._unreported:  # the common case, without the lock
            return
        now = time.monotonic()
        with self._stats_lock:
            due = [
                reason
                for reason in self._unreported
                if every or now - self._reported_at[reason] >= DROP_REPORT_EVERY_S
            ]
            reports = [(reason, *self._unreported.pop(reason)) for reason in due]
            for reason in due:
                self._reported_at[reason] = now
        for reason, n, message in reports:
            log.warning(_DROPPED_MORE, _count(n), reason, message)

    def _drop_all_queued(self) -> None:
        n = len(self._take())
        while n:
            self._drop("shutdown", n, "close() timed out", settle=True)
            n = len(self._take())

    # -- flush, close, stats -----------------------------------------------------------------

    def _wait_settled(self, timeout: float | None) -> bool:
        target = self._enqueued
        if self._worker is None:
            return self._settled >= target
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._settled_cond:
            while self._settled < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._settled_cond.wait(0.1 if left is None else min(left, 0.1))
                self._wake.set()
        return True

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send everything logged so far; wait at most `timeout` seconds. True when every
        event is settled (delivered, or dropped and counted), False when time ran out (the
        worker goes on sending in the background)."""
        if not self.enabled or self._pid != os.getpid():
            return True
        return self._wait_settled(timeout)

    def flush_before_app_stops(self, max_s: float) -> bool:
        """Called (from a thread) by the WatchLLM app this client delivers to in process, as it
        stops: send what is logged so far while the app still takes it, waiting at most
        `flush_at_exit_s` (and `max_s`). Sync for AsyncWatchLLM too (sdk/context.py)."""
        if not self.enabled or self._closed or self._pid != os.getpid():
            return True
        return self._wait_settled(min(self.flush_at_exit_s, max_s))

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush (at most `timeout` s), then stop: later calls log nothing. What is still
        buffered when the time runs out is dropped and counted as `shutdown`."""
        return self._close(timeout)

    def _close(self, timeout: float | None) -> bool:
        if self._closed or self._pid != os.getpid():
            return True
        done = self._wait_settled(timeout) if self.enabled else True
        self._closed = True
        self._report_drops(every=True)  # after _closed: later log calls drop nothing
        self._closing = True
        self._wake.set()
        worker = self._worker
        if not done:
            self._abandon.set()
            self._warn_close_timed_out(timeout)
        if worker is not None and done:
            worker.join(timeout=0.2)  # it has nothing left to send: it ends at once
        if done and self._transport is not None:
            self._transport.close()
        _clients.discard(self)
        return done

    def _warn_close_timed_out(self, timeout: float | None) -> None:
        # Only a send under way may still land: a batch waiting to be retried is dropped
        # (shutdown) once the worker sees _abandon, so it is counted with the dropped ones.
        sending = self._sending  # read first: a send ending meanwhile errs toward "may land"
        left = self._enqueued - self._settled
        sending = min(sending, left)
        fates = []
        if left > sending:
            fates.append(f"{_count(left - sending)} are dropped (shutdown)")
        if sending:
            fates.append(f"{_count(sending)} in a request under way may still land")
        error = self._failing or self._stats["last_error"]
        log.warning(
            "WatchLLM: close() ran out of time (%s s) with %s event(s) not delivered%s%s",
            timeout,
            _count(left),
            ": " + "; ".join(fates) if fates else "",
            f". Last error: {error}" if error else "",
        )

    def stats(self) -> dict[str, Any]:
        """Counters of this process: `logged`, `sent`, `batches`, `retries`, `sampled_out`,
        `queued`, `dropped` (by reason, see DROP_REASONS), `dropped_total`, `last_error`
        (for a disabled client: why it is), `transport`, `enabled`."""
        with self._stats_lock:
            out = {**self._stats, "dropped": dict(self._stats["dropped"])}
        if not self.enabled and out["last_error"] is None:
            out["last_error"] = self.disabled_reason
        out["dropped_total"] = sum(out["dropped"].values())
        out["logged"] = self._enqueued
        out["queued"] = len(self._queue) + self._in_flight
        out["queued_bytes"] = self._queued_bytes
        out["transport"] = self.transport_name
        out["enabled"] = self.enabled
        return out

    def __enter__(self) -> WatchLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DROPPED = "WatchLLM dropped %s event(s) (%s): %s"
_DROPPED_MORE = "WatchLLM dropped %s more event(s) (%s) since its last report: %s"


def _count(n: int) -> str:
    return f"{n:,}"  # 6,909: a count read at a glance


def approx_size(event: dict[str, Any]) -> int:
    """An event's size in bytes, roughly and cheaply (about 1 us): its text fields counted,
    containers guessed from their first level. Bounds the buffer's memory, not the batches'
    bytes, which the worker measures exactly once encoded."""
    n = 256  # ids, timestamp, numbers, keys
    for value in event.values():
        kind = value.__class__
        if kind is str:
            n += len(value)
        elif kind is list or kind is dict:
            items = value.values() if kind is dict else value
            for item in items:
                if item.__class__ is str:
                    n += len(item)
                elif item.__class__ is dict:  # a chat message, a tool call
                    content = item.get("content")
                    n += 64 + (len(content) if content.__class__ is str else 256)
                else:
                    n += 64
    return n


def _rejection(answer: Answer) -> str:
    """The server's refusal in one line: status, message, and the rejected indexes."""
    body = answer.body if isinstance(answer.body, dict) else {}
    if answer.status == 207:
        text = f"207 {body.get('accepted')} accepted, {len(body.get('rejected') or [])} refused"
    else:
        text = f"{answer.status} {answer.message}"
    rejected = body.get("rejected") or []
    if rejected:
        shown = []
        for item in rejected[:10]:
            fields = ", ".join(
                f"{e.get('field')}: {e.get('message')}" for e in (item.get("errors") or [])[:3]
            )
            shown.append(f"#{item.get('index')} ({fields})")
        more = len(rejected) - len(shown)
        text += "; rejected " + "; ".join(shown) + (f" and {more} more" if more > 0 else "")
    return text


class AsyncWatchLLM(WatchLLM):
    """`WatchLLM` for asyncio code: the same `log_*` calls (they never block), and `flush`,
    `close` and `async with` that wait without blocking the event loop."""

    async def flush(self, timeout: float | None = 10.0) -> bool:  # type: ignore[override]
        import asyncio

        if not self.enabled:
            return True
        return await asyncio.to_thread(self._wait_settled, timeout)

    async def close(self, timeout: float | None = 10.0) -> bool:  # type: ignore[override]
        import asyncio

        return await asyncio.to_thread(self._close, timeout)

    async def __aenter__(self) -> AsyncWatchLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# Every live client of this process: flushed at exit, reset in a forked child.
_clients: weakref.WeakSet[WatchLLM] = weakref.WeakSet()
# The client made last: what @observe and the integrations log to unless told otherwise.
_default_client: WatchLLM | None = None


def get_client() -> WatchLLM:
    """The client made last in this process (while open), else a new one configured from the
    environment (which becomes the default: a disabled one warns once, not at every call)."""
    client = _default_client
    if client is None or client._closed:
        try:
            client = WatchLLM()
        except ValueError as exc:  # WATCHLLM_BASE_URL is malformed
            # Called by @observe and the integrations at each call, where the SDK never
            # raises: said once, as a disabled client that becomes the default.
            reason = f"WatchLLM is disabled: {exc} (events are not sent)"
            log.error("%s", reason)
            client = WatchLLM(enabled=False)
            client.disabled_reason = reason
    return client


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._after_fork_in_child()


def _at_exit() -> None:
    for client in list(_clients):
        with contextlib.suppress(Exception):  # exit must never fail because of the SDK
            client._close(client.flush_at_exit_s)


def _flush_on_sigterm() -> None:
    """SIGTERM (docker stop, Kubernetes, systemd) ends a Python process that has no handler
    for it without running atexit: whatever the clients hold was lost. Where nothing else
    handles it (servers such as uvicorn and gunicorn do, and exit through atexit), a handler
    flushes first, then ends the process by the signal as before. Only the main thread can
    set one; a handler set later by the host replaces it."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):  # not the main interpreter
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    # On a thread of its own: the signal may have stopped this thread holding a lock the
    # flush needs, and the wait is bounded whatever happens.
    flushing = threading.Thread(target=_at_exit, name="watchllm-sigterm-flush", daemon=True)
    flushing.start()
    flushing.join(sum(client.flush_at_exit_s for client in list(_clients)) + 1.0)
    os.kill(os.getpid(), signal.SIGTERM)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def new_run(**fields: Any) -> RunContext:
    """A RunContext for a new run (run_id chosen here unless given)."""
    fields.setdefault("run_id", new_id())
    return RunContext(**fields)
