"""Shared state in Redis (redis-py's asyncio client): several handlers behave as one.

Every step that reads and then writes is one Lua script, so it is atomic across handlers: a
run's ``max_calls`` holds exactly however many calls are in flight on however many handlers.
Times are Redis's own clock (``TIME``), so handlers with skewed clocks agree on deadlines and
pacing. Keys (``P`` is ``[state] key_prefix``; ``<n>`` the length of the run id, so that no run
id can spell another run's key)::

    P run:<n>:<run>               hash: key (sha256 of the run key), closed, opened_ms, limits,
                                  deadline_ms, max_*, calls, cached, failed, in, out, cr, cw,
                                  cost (nano-USD), exceeded
    P run:<n>:<run>:flight        zset: request id -> when its reservation expires (ms)
    P run:<n>:<run>:done:<rid>    string: model NUL encoded reply, for replay_ttl_s
    P runs                        zset: open run ids -> when they expire (for ``runs_open``)
    P pace:<alias>:<rpm|tpm>      string: the pacing schedule's next free time (us)
    P cache:<hex>                 string: a cached completion (msgpack), for cache_ttl_s

A reservation expires at its call's deadline plus a grace (``RESERVATION_GRACE_MS``): a handler
that died mid-call does not hold its run's budget forever. The expired call counts as failed;
a request re-sent with the same id takes the reservation over instead of reserving again.

Every operation is bounded by ``[state] timeout_s``, connection waits included; any failure to
reach Redis is a ``StateUnavailable`` (wire code ``unavailable``, retryable). Nothing is
retried here: the client retries the request, and the pool reconnects by itself once Redis
answers again. Redis Cluster is not supported (scripts touch keys of several slots).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from rlmq.protocol import ConfigError, RunLimits, RunUsage, Usage

from ..accounting import BudgetExceeded, RunClosed, refusal_message
from ..accounting import not_yours_message as _not_yours
from ..accounting import unknown_run_message as _unknown
from ..backends.base import Completion
from ..config import StateConfig
from ..errors import HandlerError, UnknownRun
from .base import Admission, CacheStore, Pacer, StateUnavailable, encode_replayed

__all__ = ["RESERVATION_GRACE_MS", "RedisBucket", "RedisCache", "RedisState"]

log = logging.getLogger(__name__)

# A live handler's call may settle a little after its deadline (the wheel fires up to 10 ms
# late, a reply in the socket): its reservation outlives the deadline by this much.
RESERVATION_GRACE_MS = 5_000
NANO = 1_000_000_000  # cost is kept in integer nano-USD: sums of floats drift, sums of ints do not
MAX_BATCH = 1_000  # commands per pipeline
# With replays off, how long a settled request id is still known as settled: past the pipeline's
# background retries of a settlement (SETTLE_RETRY_S) and any reservation's expiry.
SETTLED_MARK_MS = 600_000

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(x)
  if x then return tonumber(x) end
  return nil
end
-- Reservations past their deadline belong to a handler that died mid-call: failed calls.
local function purge(run, fl, now)
  local n = redis.call('ZREMRANGEBYSCORE', fl, '-inf', now)
  if n > 0 then redis.call('HINCRBY', run, 'failed', n) end
end
local function snapshot(run, fl, now)
  return {'ok', redis.call('HGETALL', run), redis.call('ZCARD', fl), now}
end
local function foreign(stored, key)
  return stored ~= '' and stored ~= key
end
"""

# KEYS: run, flight, runs. ARGV: keyhash, limits blob, deadline_ms (from the first open),
# max_calls, max_in, max_out, max_cost (nano), ttl_ms, run id. '' = no limit.
_OPEN = (
    _PRELUDE
    + """
local run, fl = KEYS[1], KEYS[2]
local h = redis.call('HMGET', run, 'key', 'closed')
if h[2] and h[1] ~= ARGV[1] then return {'not_yours'} end
local now = now_ms()
if (not h[2]) or h[2] == '1' then
  -- new, or a closed run opened again: fresh totals
  redis.call('DEL', run, fl)
  redis.call('HSET', run, 'key', ARGV[1], 'closed', '0', 'opened_ms', now, 'calls', 0, 'cached', 0,
    'failed', 0, 'in', 0, 'out', 0, 'cr', 0, 'cw', 0, 'cost', 0)
else
  purge(run, fl, now)
end
redis.call('HSET', run, 'limits', ARGV[2])
local names = {'deadline_ms', 'max_calls', 'max_in', 'max_out', 'max_cost'}
for i, name in ipairs(names) do
  local v = ARGV[2 + i]
  if v == '' then
    redis.call('HDEL', run, name)
  elseif name == 'deadline_ms' then
    redis.call('HSET', run, name, tonumber(redis.call('HGET', run, 'opened_ms')) + tonumber(v))
  else
    redis.call('HSET', run, name, v)
  end
end
redis.call('PEXPIRE', run, ARGV[8])
redis.call('PEXPIRE', fl, ARGV[8])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[9])
return snapshot(run, fl, now)
"""
)

# KEYS: run, flight, runs. ARGV: keyhash, closed_ttl_ms, run id.
_CLOSE = (
    _PRELUDE
    + """
local run, fl = KEYS[1], KEYS[2]
local h = redis.call('HMGET', run, 'key', 'closed')
if not h[2] then return {'unknown'} end
if foreign(h[1], ARGV[1]) then return {'not_yours'} end
local now = now_ms()
purge(run, fl, now)
if h[2] == '0' then
  redis.call('HSET', run, 'closed', '1')
  redis.call('PEXPIRE', run, ARGV[2])
  redis.call('PEXPIRE', fl, ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return snapshot(run, fl, now)
"""
)

# KEYS: run, flight.
_USAGE = (
    _PRELUDE
    + """
local run, fl = KEYS[1], KEYS[2]
if redis.call('EXISTS', run) == 0 then return {'unknown'} end
local now = now_ms()
purge(run, fl, now)
return snapshot(run, fl, now)
"""
)

# KEYS: runs.
_RUNS_OPEN = (
    _PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS: run, flight, done. ARGV: rid, keyhash, max_tokens, timeout_ms, grace_ms, model, ttl_ms.
_ADMIT = (
    _PRELUDE
    + """
local run, fl, done = KEYS[1], KEYS[2], KEYS[3]
local h = redis.call('HMGET', run, 'key', 'closed', 'deadline_ms', 'max_calls', 'max_in', 'max_out',
  'max_cost', 'calls', 'in', 'out', 'cost')
if not h[2] then return 'unknown' end
if foreign(h[1], ARGV[2]) then return 'not_yours' end
local kept = redis.call('GET', done)
if kept then
  local sep = string.find(kept, '\\0', 1, true)
  if sep and string.sub(kept, 1, sep - 1) == ARGV[6] then
    return 'R' .. string.sub(kept, sep + 1)
  end
end
if h[2] == '1' then return 'closed' end
local now = now_ms()
purge(run, fl, now)
local deadline, max_out, out = num(h[3]), num(h[6]), num(h[10]) or 0
-- A re-sent request whose reservation is still held (its handler went away) takes it over.
if not redis.call('ZSCORE', fl, ARGV[1]) then
  local function refuse(limit, used)
    redis.call('HSETNX', run, 'exceeded', limit)
    local limits = redis.call('HGET', run, 'limits') or ''
    return 'L ' .. limit .. ' ' .. string.format('%.0f', used) .. ' ' .. limits
  end
  if deadline and now >= deadline then return refuse('deadline_s', 0) end
  local calls = num(h[8]) or 0
  local limit = num(h[4])
  if limit and calls >= limit then return refuse('max_calls', calls) end
  limit = num(h[5])
  local used = num(h[9]) or 0
  if limit and used >= limit then return refuse('max_input_tokens', used) end
  if max_out and out >= max_out then return refuse('max_output_tokens', out) end
  limit = num(h[7])
  used = num(h[11]) or 0
  if limit and used >= limit then return refuse('max_cost_usd', used) end
  redis.call('HINCRBY', run, 'calls', 1)
end
local timeout_ms = tonumber(ARGV[4])
redis.call('ZADD', fl, now + timeout_ms + tonumber(ARGV[5]), ARGV[1])
local max_tokens = tonumber(ARGV[3])
if max_out then max_tokens = math.max(1, math.min(max_tokens, max_out - out)) end
if deadline then timeout_ms = math.min(timeout_ms, math.max(0, deadline - now)) end
redis.call('PEXPIRE', run, ARGV[7])
redis.call('PEXPIRE', fl, ARGV[7])
return string.format('ok %d %d', max_tokens, timeout_ms)
"""
)

# KEYS: run. ARGV: keyhash.
_ADMIT_CACHED = (
    _PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'key', 'closed')
if not h[2] then return {'unknown'} end
if foreign(h[1], ARGV[1]) then return {'not_yours'} end
if h[2] == '1' then return {'closed'} end
redis.call('HINCRBY', KEYS[1], 'cached', 1)
return {'ok'}
"""
)

# KEYS: run, flight, done. ARGV: rid, ok (1/0), in, out, cr, cw, cost (nano), kept, replay_ttl_ms,
# settled_mark_ms.
_SETTLE = """
local run, fl, done = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', run) == 0 then return 0 end
local removed = redis.call('ZREM', fl, ARGV[1])
if ARGV[2] == '0' then
  if removed == 1 then redis.call('HINCRBY', run, 'failed', 1) end
  return 1
end
if removed == 0 then
  if redis.call('EXISTS', done) == 1 then return 0 end
  -- its reservation had expired and counted as failed, but the call did finish
  if tonumber(redis.call('HGET', run, 'failed') or '0') > 0 then redis.call('HINCRBY', run, 'failed', -1) end
end
redis.call('HINCRBY', run, 'in', ARGV[3])
redis.call('HINCRBY', run, 'out', ARGV[4])
redis.call('HINCRBY', run, 'cr', ARGV[5])
redis.call('HINCRBY', run, 'cw', ARGV[6])
redis.call('HINCRBY', run, 'cost', ARGV[7])
if tonumber(ARGV[9]) > 0 then
  redis.call('SET', done, ARGV[8], 'PX', ARGV[9])
else
  -- replays off: still mark the id settled (no reply kept; admission ignores the mark), so a
  -- second settlement of it (a retry whose first try did land, or a taken-over call) counts once
  redis.call('SET', done, '-', 'PX', ARGV[10])
end
return 1
"""

# A schedule shared by every handler (GCRA): the key holds the time (us) at which everything
# reserved so far has been paid for. A call of `amount` may go once at most `capacity` units are
# outstanding; it is told how long to wait, and the schedule moves on by amount x interval.
# KEYS: schedule. ARGV: interval_us (per unit), capacity (units), amount.
_PACE = (
    _PRELUDE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local interval, cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local start = tat - (cap - math.min(amount, cap)) * interval
local new = tat + amount * interval
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.floor((new - now) / 1000) + 1000)
if start <= now then return 0 end
return math.floor(start - now)
"""
)

# KEYS: schedule. ARGV: interval_us, delta (units; negative refunds).
_PACE_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = math.max(now, tat + tonumber(ARGV[2]) * tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.floor((new - now) / 1000) + 1000)
return 1
"""

# Redis is there but cannot serve now: as unavailable as a closed port.
_UNAVAILABLE_REPLIES = (BusyLoadingError, ReadOnlyError, OutOfMemoryError)


def _keyhash(key: str | None) -> str:
    return "" if key is None else hashlib.sha256(key.encode()).hexdigest()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _Lua:
    source: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324 - Redis's name for it


class RedisState:
    """``State`` in Redis at ``config.url`` (see the module docstring)."""

    local = False

    def __init__(self, config: StateConfig) -> None:
        if config.url is None:
            raise ConfigError("RedisState needs [state] url")
        self.config = config
        self.url = config.redacted_url()
        self._prefix = config.key_prefix
        self._timeout_s = config.timeout_s
        self._replay_ms = round(config.replay_ttl_s * 1000)
        self._run_ttl_ms = _ms(config.run_ttl_s)
        self._closed_ttl_ms = _ms(config.closed_run_ttl_s)
        self._cache_ttl_ms = _ms(config.cache_ttl_s)
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.timeout_s,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            # One immediate retry on a fresh connection: a pooled socket may have died with an
            # earlier Redis. Anything more is the client's to retry; timeout_s bounds it all.
            retry=Retry(NoBackoff(), 1),
        )
        self.redis = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
        self._open = _Lua(_OPEN)
        self._close = _Lua(_CLOSE)
        self._usage = _Lua(_USAGE)
        self._runs_open = _Lua(_RUNS_OPEN)
        self._admit = _Lua(_ADMIT)
        self._admit_cached = _Lua(_ADMIT_CACHED)
        self._settle = _Lua(_SETTLE)
        self._pace = _Lua(_PACE)
        self._pace_adjust = _Lua(_PACE_ADJUST)
        self._background: set[asyncio.Task[Any]] = set()
        # Commands issued in the same turn of the event loop go to Redis as one pipeline.
        self._queue: list[tuple[tuple[Any, ...], _Lua | None, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._direct = 0  # commands sent on their own, in flight

    # ------------------------------------------------------------ plumbing

    def _unavailable(self, exc: BaseException) -> HandlerError:
        """The error a failed Redis operation is answered with."""
        if isinstance(exc, TimeoutError):
            return StateUnavailable(
                f"the shared state at {self.url} did not answer within {self._timeout_s:g} s"
            )
        if isinstance(exc, _UNAVAILABLE_REPLIES):
            return StateUnavailable(f"the shared state at {self.url} cannot serve: {exc}")
        if isinstance(exc, ResponseError):  # a script or command Redis refused: a bug, not an outage
            return HandlerError(f"the shared state at {self.url} refused an operation: {exc}")
        return StateUnavailable(f"the shared state at {self.url} is unreachable: {exc}")

    async def call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis operation within ``timeout_s``; a failure to reach Redis is
        ``StateUnavailable``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op()
        except (TimeoutError, RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def command(self, *args: Any, lua: _Lua | None = None) -> Any:
        """One command (``lua``: the script an EVALSHA runs), sent with every other command
        issued in the same turn of the loop as one pipeline: a burst of thousands of admissions
        costs a few round trips, not thousands. Bounded by ``timeout_s``."""
        if not self._direct and not self._queue:
            # Nothing else is waiting: this one goes at once, without a pipeline or a task.
            self._direct += 1
            try:
                return await self._alone(args, lua)
            finally:
                self._direct -= 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, lua, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError as exc:
            raise self._unavailable(exc) from None

    async def _alone(self, args: tuple[Any, ...], lua: _Lua | None) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    return await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
                except NoScriptError:  # Redis restarted or was flushed: load it, once
                    assert lua is not None
                    await self.redis.script_load(lua.source)
                    return await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
        except (TimeoutError, RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def _eval(self, lua: _Lua, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.command("EVALSHA", lua.sha, len(keys), *keys, *args, lua=lua)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), MAX_BATCH):
            task = asyncio.get_running_loop().create_task(self._send(queue[i : i + MAX_BATCH]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], _Lua | None, asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                results = await self._pipeline([args for args, _, _ in batch])
                # Scripts Redis does not know (it restarted, or was flushed): load, send again.
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    for lua in {batch[i][1] for i in missing if batch[i][1] is not None}:
                        assert lua is not None
                        await self.redis.script_load(lua.source)
                    again = await self._pipeline([batch[i][0] for i in missing])
                    for i, result in zip(missing, again, strict=True):
                        results[i] = result
        except (TimeoutError, RedisError, OSError) as exc:
            error = self._unavailable(exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(result, Exception):
                future.set_exception(self._unavailable(result))
            else:
                future.set_result(result)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def spawn(self, op: Coroutine[Any, Any, Any], what: str) -> None:
        """Run ``op`` in the background (a correction nobody waits for), logging its failure."""

        async def run() -> None:
            try:
                await op
            except HandlerError as exc:
                log.warning("%s failed: %s", what, exc.message)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _run_keys(self, run: str) -> tuple[str, str]:
        base = f"{self._prefix}run:{len(run)}:{run}"
        return base, base + ":flight"

    def _done_key(self, run: str, rid: str) -> str:
        return f"{self._prefix}run:{len(run)}:{run}:done:{rid}"

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """PING within the connect timeout; a handler configured for Redis does not start without it."""
        try:
            async with asyncio.timeout(self.config.connect_timeout_s + self._timeout_s):
                await self.redis.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            await self.aclose()
            reason = str(exc) or "no answer within the connect timeout"
            raise ConfigError(
                f"[state] url {self.url}: cannot reach Redis ({reason}); a handler configured for "
                "shared state does not start without it (remove [state] url to keep state in-process)"
            ) from None

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    # ------------------------------------------------------------ runs

    def _answer(self, run: str, reply: list[Any]) -> list[Any]:
        """The reply of a run script, or the error its first element names."""
        status = _text(reply[0])
        if status == "ok" or status == "replay":
            return reply
        if status == "unknown":
            raise UnknownRun(_unknown(run))
        if status == "not_yours":
            raise UnknownRun(_not_yours(run))
        if status == "closed":
            raise RunClosed(f"run {run!r} is closed")
        raise HandlerError(f"unexpected reply from the shared state: {status}")

    def _snapshot(self, run: str, reply: list[Any]) -> RunUsage:
        flat = reply[1]
        h = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}

        def count(name: str) -> int:
            return int(h.get(name, 0))

        limits = RunLimits.from_wire(msgpack.unpackb(h["limits"])) if "limits" in h else RunLimits()
        exceeded = h.get("exceeded")
        return RunUsage(
            run=run,
            calls=count("calls"),
            cached_calls=count("cached"),
            failed_calls=count("failed"),
            usage=Usage(count("in"), count("out"), count("cr"), count("cw")),
            cost_usd=round(count("cost") / NANO, 9),
            elapsed_s=round((int(reply[3]) - count("opened_ms")) / 1000, 6),
            limits=limits,
            closed=_text(h.get("closed", b"0")) == "1",
            exceeded=None if exceeded is None else _text(exceeded),
            in_flight=int(reply[2]),
        )

    async def run_open(self, run: str, limits: RunLimits, key: str | None) -> RunUsage:
        base, flight = self._run_keys(run)

        def opt(value: int | None) -> str | int:
            return "" if value is None else value

        args = [
            _keyhash(key),
            msgpack.packb(limits.to_wire()),
            "" if limits.deadline_s is None else round(limits.deadline_s * 1000),
            opt(limits.max_calls),
            opt(limits.max_input_tokens),
            opt(limits.max_output_tokens),
            "" if limits.max_cost_usd is None else round(limits.max_cost_usd * NANO),
            self._run_ttl_ms,
            run,
        ]
        reply = await self._eval(self._open, (base, flight, self._prefix + "runs"), args)
        return self._snapshot(run, self._answer(run, reply))

    async def run_close(self, run: str, key: str | None) -> RunUsage:
        base, flight = self._run_keys(run)
        args = [_keyhash(key), self._closed_ttl_ms, run]
        reply = await self._eval(self._close, (base, flight, self._prefix + "runs"), args)
        return self._snapshot(run, self._answer(run, reply))

    async def usage(self, run: str) -> RunUsage:
        reply = await self._eval(self._usage, self._run_keys(run), ())
        return self._snapshot(run, self._answer(run, reply))

    async def runs_open(self) -> int:
        return int(await self._eval(self._runs_open, (self._prefix + "runs",), ()))

    async def admit(
        self, run: str, key: str | None, rid: str, model: str, max_tokens: int, timeout_s: float
    ) -> Admission:
        base, flight = self._run_keys(run)
        args = [rid, _keyhash(key), max_tokens, _ms(timeout_s), RESERVATION_GRACE_MS, model, self._run_ttl_ms]
        # One bulk string back (parsing a reply costs more than the script): "ok MAX_TOKENS
        # TIMEOUT_MS", "R" + a kept reply, "L LIMIT USED LIMITS", or an error's name.
        reply: bytes = await self._eval(self._admit, (base, flight, self._done_key(run, rid)), args)
        if reply.startswith(b"ok "):
            _, clamped, timeout_ms = reply.split(b" ")
            return Admission(int(clamped), int(timeout_ms) / 1000)
        if reply.startswith(b"R"):
            return Admission(max_tokens, timeout_s, encode_replayed(reply[1:]))
        if reply.startswith(b"L "):
            _, limit, used, blob = reply.split(b" ", 3)
            raise _refusal(run, limit.decode(), int(used), blob)
        self._answer(run, [reply])
        raise HandlerError(f"unexpected reply from the shared state: {reply[:40]!r}")

    async def admit_cached(self, run: str, key: str | None) -> None:
        reply = await self._eval(self._admit_cached, (self._run_keys(run)[0],), (_keyhash(key),))
        self._answer(run, reply)

    async def settle(
        self, run: str, rid: str, model: str, usage: Usage | None, cost_usd: float, reply: bytes | None
    ) -> None:
        base, flight = self._run_keys(run)
        if usage is None:
            args: list[Any] = [rid, 0, 0, 0, 0, 0, 0, b"", 0, SETTLED_MARK_MS]
        else:
            kept = model.encode() + b"\0" + bytes(reply) if reply is not None else b""
            args = [
                rid,
                1,
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                round(cost_usd * NANO),
                kept,
                self._replay_ms if reply is not None else 0,
                SETTLED_MARK_MS,
            ]
        await self._eval(self._settle, (base, flight, self._done_key(run, rid)), args)

    # ------------------------------------------------------------ pacing and cache

    def pacer(self, alias: str, kind: str, per_minute: float) -> Pacer:
        return RedisBucket(self, f"{self._prefix}pace:{alias}:{kind}", per_minute)

    def cache(self, alias: str, max_entries: int) -> CacheStore | None:
        return RedisCache(self, self._prefix + "cache:", self._cache_ttl_ms)


def _refusal(run: str, limit: str, used: int, blob: bytes) -> BudgetExceeded:
    """The same refusal, in the same words, as the in-process ``Run`` gives."""
    limits = RunLimits.from_wire(msgpack.unpackb(blob)) if blob else RunLimits()
    spent: float = used / NANO if limit == "max_cost_usd" else used
    return BudgetExceeded(limit, f"run {run!r}: {refusal_message(limit, limits, spent)}")


class RedisBucket:
    """rpm/tpm pacing shared by every handler of one Redis: a schedule (GCRA) kept in Redis.

    The same shape as the in-process ``TokenBucket``: a burst of ``burst_s`` worth of units (at
    least one), calls larger than the burst go into debt, ``adjust`` corrects an estimate. Each
    ``acquire`` is one round trip that reserves the call's place in the schedule and says how
    long to wait for it, so waiters are served in the order they asked, whichever handler they
    are on."""

    def __init__(self, state: RedisState, key: str, per_minute: float, *, burst_s: float = 0.2) -> None:
        self._state = state
        self.key = key
        rate = per_minute / 60.0
        self.interval_us = 1_000_000 / rate
        self.capacity = max(1.0, rate * burst_s)
        self.waiting = 0

    async def acquire(self, amount: float = 1.0) -> None:
        state = self._state
        wait_us = await state._eval(state._pace, (self.key,), (self.interval_us, self.capacity, amount))
        if wait_us:
            self.waiting += 1
            try:
                await asyncio.sleep(int(wait_us) / 1_000_000)
            finally:
                self.waiting -= 1

    def adjust(self, delta: float) -> None:
        if not delta:
            return
        state = self._state
        state.spawn(
            state._eval(state._pace_adjust, (self.key,), (self.interval_us, delta)),
            f"pacing correction of {self.key}",
        )


class RedisCache:
    """The stored side of the response cache: completions by cache key, for ``ttl_ms``."""

    def __init__(self, state: RedisState, prefix: str, ttl_ms: int) -> None:
        self._state = state
        self._prefix = prefix
        self._ttl_ms = ttl_ms

    async def get(self, key: bytes) -> Completion | None:
        raw = await self._state.command("GET", self._prefix + key.hex())
        if raw is None:
            return None
        text, model, usage, stop = msgpack.unpackb(raw)
        return Completion(text, model, Usage(*usage), stop)

    async def put(self, key: bytes, completion: Completion) -> None:
        u = completion.usage
        blob = msgpack.packb(
            [
                completion.text,
                completion.model,
                [u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens],
                completion.stop_reason,
            ]
        )
        await self._state.command("SET", self._prefix + key.hex(), blob, "PX", self._ttl_ms)
