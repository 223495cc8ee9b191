"""Usage in Redis, shared by every WatchLLM process in front of it.

Each check is one round trip (EVALSHA, pipelined with the other requests' checks on one
connection per process: resp.py): a Lua script (atomic in Redis, so concurrent batches from any
number of processes are counted exactly) drains the minute bucket by Redis's own clock,
checks every window, counts the batch only if all of them have room, and returns the plan
the project holds, so a plan change reaches every process on its next request. All keys of a
project share the hash tag `{project}` (one slot in a Redis Cluster).

Any Redis error or a reply slower than `quota_redis_timeout_ms` raises QuotaUnavailable; the
plugin then fails open or closed (plugin.py). A timeout is not retried (that would only add
the timeout again to a request that is waiting), and the check given up stays in flight: its
late reply says whether Redis counted it. The other commands (usage show/set/reset, plans,
billing ids) are rare and go through redis-py, whose broken connections are retried once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .engine import MINUTE_MS, Outcome, QuotaUnavailable, Usage, drained
from .plans import WINDOWS, Periods, Plan
from .resp import ConnectionLost, ReplyError, Request, RespClient

PREFIX = "wlq"
GRACE_TURNS = 4  # loop turns a reply may take to be read once the timeout has passed
MAX_EXTRA_WAIT_S = 0.5  # the most a busy event loop adds to quota_redis_timeout_ms
BILLING_SEEN_TTL_S = 30 * 86_400  # Stripe retries a delivery for 3 days; keep ids far longer

# KEYS: 1 minute bucket ("level|ms": events in it, when), 2 day counter, 3 month counter,
#       4 payload bytes of the month, 5 the project's plan ("name|at"). All strings: one MGET
#       reads them (each redis.call costs the script about a microsecond).
# ARGV: 1 n, 2-5 limits (minute, day, month, bytes; 0 = none), 6 day ttl s, 7 month ttl s,
#       8 events to add first (taken while Redis was away; negative: a check given up at its
#       timeout that Redis ran after all), 9 payload bytes to add first.
# The steps of engine.decide, kept in step with it (tests run both on the same cases).
CHECK_SCRIPT = """
local n = tonumber(ARGV[1])
local lim = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local day_ttl, month_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local carry_events, carry_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function add(key, by, ttl)
  if redis.call('INCRBY', key, by) < 0 then redis.call('SET', key, 0) end
  redis.call('EXPIRE', key, ttl)
end
if carry_events ~= 0 then
  add(KEYS[2], carry_events, day_ttl)
  add(KEYS[3], carry_events, month_ttl)
end
if carry_bytes ~= 0 then add(KEYS[4], carry_bytes, month_ttl) end
local got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local used = {0, 0, 0, 0}
if lim[1] > 0 and got[1] then
  local u, at = string.match(got[1], '^(.-)|(.*)$')
  u = tonumber(u) or 0
  local elapsed = now - (tonumber(at) or now)
  if elapsed < 0 then elapsed = 0 end
  u = u - elapsed * lim[1] / 60000
  if u < 0 then u = 0 end
  used[1] = u
end
for i = 2, 4 do
  if lim[i] > 0 then used[i] = tonumber(got[i] or '0') end
end
local rem = {-1, -1, -1, -1}
local fit = -1
local denied = 0
for i = 1, 3 do
  if lim[i] > 0 then
    local r = math.floor(lim[i] - used[i] + 1e-9)
    if r < 0 then r = 0 end
    rem[i] = r
    if fit < 0 or r < fit then fit = r end
    if denied == 0 and r < n then denied = i end
  end
end
if lim[4] > 0 then
  local r = lim[4] - used[4]
  if r < 0 then r = 0 end
  rem[4] = r
  if r == 0 then
    fit = 0
    if denied == 0 then denied = 4 end
  end
end
if fit < 0 then fit = n end
local allowed = denied == 0
local level = used[1]
if allowed then level = level + n end
local retry = 0
if (not allowed) and denied == 1 then
  local excess = level
  if n <= lim[1] then excess = level + n - lim[1] end
  if excess < 0 then excess = 0 end
  retry = math.ceil(excess * 60000 / lim[1])
end
local reset = 0
if lim[1] > 0 then reset = math.ceil(level * 60000 / lim[1]) end
if allowed then
  if lim[1] > 0 then
    redis.call('SET', KEYS[1], string.format('%.17g|%.17g', level, now), 'PX', reset + 1000)
  end
  -- A counter gets its expiry when it is created (set by hand: SET ... EX), not at every call.
  if redis.call('INCRBY', KEYS[2], n) == n then redis.call('EXPIRE', KEYS[2], day_ttl) end
  if redis.call('INCRBY', KEYS[3], n) == n then redis.call('EXPIRE', KEYS[3], month_ttl) end
  for i = 1, 3 do
    if rem[i] >= 0 then rem[i] = rem[i] - n end
  end
end
local allowed_flag = 0
if allowed then allowed_flag = 1 end
return {allowed_flag, fit, denied, rem[1], rem[2], rem[3], rem[4], retry, reset, got[5] or ''}
"""

# KEYS: 1 minute bucket. ARGV: 1 level. Stamped by Redis's clock, as CHECK_SCRIPT reads it.
SET_MINUTE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%.17g', now), 'PX', 86400000)
return 1
"""

# KEYS: 1 the project's plan. ARGV: 1 plan name ('' for none), 2 the event's time ('' for
# none). An assignment older than the one held is ignored (billing events arrive unordered).
SET_PLAN_SCRIPT = """
local held = redis.call('GET', KEYS[1])
local at = ARGV[2]
if at ~= '' and held then
  local held_at = tonumber(string.match(held, '|(.*)$')) or 0
  if held_at > tonumber(at) then return 0 end
end
if at == '' then
  at = '0'
  if held then at = string.match(held, '|(.*)$') or '0' end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. at)
return 1
"""


def keys(project: str, p: Periods) -> list[str]:
    tag = f"{PREFIX}:{{{project}}}"
    # ":bucket", a string: not the ":min" hash of earlier versions, so that servers of both
    # during an upgrade never read each other's key (WRONGTYPE); the old key expires itself.
    return [f"{tag}:bucket", f"{tag}:day:{p.day}", f"{tag}:mon:{p.month}", f"{tag}:bytes:{p.month}"]


def plan_key(project: str) -> str:
    return f"{PREFIX}:{{{project}}}:plan"


def _plan_name(held: Any) -> str | None:
    if isinstance(held, bytes):
        held = held.decode()
    if not held:
        return None
    name = str(held).rsplit("|", 1)[0]
    return name or None


class RedisUsage:
    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, Any] = {}
        # The check's own connection (TLS URLs: redis-py's, as the other commands).
        self._fast: RespClient | None = None
        if RespClient.supports(url):
            backstop = max(1.0, timeout_s * 10)
            self._fast = RespClient(url, connect_timeout_s=backstop, stale_s=backstop)
            self._fast.add_script("check", CHECK_SCRIPT)

    def _redis(self) -> Redis:
        # A client belongs to one event loop (the server's; asyncio.run's for the CLI).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = Redis.from_url(
                self.url,
                # Only a backstop: _call enforces quota_redis_timeout_ms itself.
                socket_timeout=max(1.0, self.timeout_s * 10),
                socket_connect_timeout=max(1.0, self.timeout_s * 10),
                # One retry, at once, on a broken connection: after Redis restarts, every
                # pooled connection is dead once; a Redis that is down refuses at once again.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._loop = loop
            self._scripts = {
                name: self._client.register_script(text)
                for name, text in (
                    ("check", CHECK_SCRIPT),
                    ("minute", SET_MINUTE_SCRIPT),
                    ("plan", SET_PLAN_SCRIPT),
                )
            }
        return self._client

    async def _call(self, fn: Any) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(fn())
        try:
            started = loop.time()
            await asyncio.wait({task}, timeout=self.timeout_s)
            late = loop.time() - started - self.timeout_s
            if not task.done() and late > 0:
                # The loop woke us `late` seconds after the deadline: it is busy, and the
                # reply waits behind the same work. Give it that backlog again (bounded).
                await asyncio.wait({task}, timeout=min(2 * late, MAX_EXTRA_WAIT_S))
            # A reply may have come in while the event loop was busy with other requests:
            # let it be read (a few turns of the loop) before calling Redis slow. Without
            # this, a loaded server would count its own delays as Redis's and fall back.
            for _ in range(GRACE_TURNS):
                if task.done():
                    break
                await asyncio.sleep(0)
        except BaseException:
            task.cancel()  # this request was cancelled: so is its Redis call
            raise
        if not task.done():
            task.cancel()
            raise QuotaUnavailable(
                f"Redis at {self._where()} did not answer within {self.timeout_s * 1000:g} ms",
                slow=True,
            )
        try:
            return task.result()
        except (RedisError, OSError, TimeoutError, ReplyError) as exc:
            where = self._where()
            raise QuotaUnavailable(
                f"Redis at {where}: {type(exc).__name__}: {exc}",
                slow=isinstance(exc, TimeoutError),
            ) from exc

    def _where(self) -> str:
        # The URL without its password.
        rest = self.url.split("@", 1)[-1]
        return rest.split("://", 1)[-1]

    async def check(
        self,
        project: str,
        n: int,
        plan_name: str,
        plan: Plan,
        p: Periods,
        carry_events: int = 0,
        carry_bytes: int = 0,
    ) -> tuple[Outcome, str | None]:
        args = [n, *plan.limits(), p.day_ttl_s, p.month_ttl_s, carry_events, carry_bytes]
        names = [*keys(project, p), plan_key(project)]
        if self._fast is not None:
            reply = await self._check_fast(self._fast, names, args)
        else:
            self._redis()
            script = self._scripts["check"]
            reply = await self._call(lambda: script(keys=names, args=args))
        allowed, fit, denied, r1, r2, r3, r4, retry, reset, held = reply
        outcome = Outcome(
            bool(allowed),
            int(fit),
            WINDOWS[int(denied) - 1] if int(denied) else None,
            (int(r1), int(r2), int(r3), int(r4)),
            int(retry),
            int(reset),
            plan_name,
        )
        return outcome, _plan_name(held)

    async def _check_fast(self, fast: RespClient, names: list[str], args: list[Any]) -> Any:
        conn = fast.ready()
        if conn is None:
            conn = await self._call(fast.connect)
        try:
            reply = await self._wait(fast.evalsha(conn, "check", names, args))
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                # The scripts are loaded at connect; a SCRIPT FLUSH since then: send it whole.
                reply = await self._wait(fast.eval(conn, "check", names, args))
        except ConnectionLost as exc:  # closed before the command could be sent
            raise QuotaUnavailable(f"Redis at {self._where()}: {exc}") from exc
        if isinstance(reply, ReplyError):
            raise QuotaUnavailable(f"Redis at {self._where()}: {reply}")
        return reply

    async def _wait(self, request: Request) -> Any:
        """The reply of a pipelined command, or QuotaUnavailable: late (past the timeout; the
        command stays in flight, see QuotaUnavailable.request) or its connection lost."""
        future = request.future
        if not future.done():
            deadline = _Deadline(future, self.timeout_s, self._where())
            try:
                await future
            except QuotaUnavailable as exc:
                exc.request = request
                raise
            except ConnectionLost as exc:
                raise QuotaUnavailable(f"Redis at {self._where()}: {exc}") from exc
            finally:
                deadline.cancel()
        try:
            return future.result()
        except ConnectionLost as exc:
            raise QuotaUnavailable(f"Redis at {self._where()}: {exc}") from exc

    async def add_counts(self, project: str, n_events: int, n_bytes: int, p: Periods) -> None:
        _, day, month, payload = keys(project, p)
        sums = [(day, n_events, p.day_ttl_s), (month, n_events, p.month_ttl_s)] if n_events else []
        if n_bytes:
            sums.append((payload, n_bytes, p.month_ttl_s))
        if not sums:
            return

        async def run() -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                for key, by, ttl in sums:
                    pipe.incrby(key, by)
                    pipe.expire(key, ttl)
                totals = await pipe.execute()
            below = [key for (key, _, _), total in zip(sums, totals[::2], strict=True) if total < 0]
            # A correction larger than the count (a new period began): 0, not less.
            for key in below:
                await self._redis().set(key, 0, keepttl=True)

        await self._call(run)

    async def show(self, project: str, p: Periods, minute_limit: int = 0) -> Usage:
        minute, day, month, payload = keys(project, p)

        async def run() -> list[Any]:
            async with self._redis().pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.get(minute)
                pipe.get(day)
                pipe.get(month)
                pipe.get(payload)
                return await pipe.execute()

        (secs, micros), bucket, d, m, b = await self._call(run)
        now_ms = secs * 1000 + micros / 1000
        level = 0.0
        if bucket:
            u, _, at = bucket.decode().partition("|")
            level = float(u)
            if minute_limit:
                level = drained(level, minute_limit, now_ms - float(at))
        return Usage(minute=level, day=int(d or 0), month=int(m or 0), payload_bytes=int(b or 0))

    async def set(self, project: str, p: Periods, values: dict[str, int]) -> None:
        minute, day, month, payload = keys(project, p)

        async def run() -> None:
            if "minute" in values:
                await self._scripts["minute"](keys=[minute], args=[float(values["minute"])])
            async with self._redis().pipeline(transaction=True) as pipe:
                for window, key, ttl in (
                    ("day", day, p.day_ttl_s),
                    ("month", month, p.month_ttl_s),
                    ("payload_bytes", payload, p.month_ttl_s),
                ):
                    if window in values:
                        pipe.set(key, int(values[window]), ex=ttl)
                await pipe.execute()

        self._redis()
        await self._call(run)

    async def reset(self, project: str, p: Periods) -> None:
        await self._call(lambda: self._redis().delete(*keys(project, p)))

    async def get_plan(self, project: str) -> str | None:
        return _plan_name(await self._call(lambda: self._redis().get(plan_key(project))))

    async def set_plan(self, project: str, plan: str | None, at: float | None = None) -> bool:
        self._redis()
        script = self._scripts["plan"]
        args = [plan or "", "" if at is None else repr(float(at))]
        return bool(await self._call(lambda: script(keys=[plan_key(project)], args=args)))

    async def first_delivery(self, event_id: str) -> bool:
        key = f"{PREFIX}:billing:{event_id}"
        done = await self._call(lambda: self._redis().set(key, 1, nx=True, ex=BILLING_SEEN_TTL_S))
        return bool(done)

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        client, self._client = self._client, None
        if client is not None:
            # Closing a client whose loop is gone or whose server is down.
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await client.aclose()


class _Deadline:
    """Gives up waiting for a reply after `timeout_s`, as `_call` does: a loop that wakes us
    late (it is busy, and the reply waits behind the same work) gets that delay again, bounded,
    and a reply already in the socket gets a few loop turns to be read. No task, one timer."""

    __slots__ = ("extended", "future", "handle", "started", "timeout_s", "turns", "where")

    def __init__(self, future: asyncio.Future[Any], timeout_s: float, where: str) -> None:
        loop = future.get_loop()
        self.future = future
        self.timeout_s = timeout_s
        self.where = where
        self.started = loop.time()
        self.extended = False
        self.turns = 0
        self.handle: asyncio.Handle = loop.call_later(timeout_s, self.fire)

    def fire(self) -> None:
        future = self.future
        if future.done():
            return
        loop = future.get_loop()
        late = loop.time() - self.started - self.timeout_s
        if not self.extended and late > 0:
            self.extended = True
            self.handle = loop.call_later(min(2 * late, MAX_EXTRA_WAIT_S), self.fire)
        elif self.turns < GRACE_TURNS:
            self.turns += 1
            self.handle = loop.call_soon(self.fire)
        else:
            future.set_exception(
                QuotaUnavailable(
                    f"Redis at {self.where} did not answer within {self.timeout_s * 1000:g} ms",
                    slow=True,
                )
            )

    def cancel(self) -> None:
        self.handle.cancel()


def minute_reset_s(level: float, limit: int) -> float:
    return math.ceil(level * MINUTE_MS / limit) / 1000 if limit else 0.0
