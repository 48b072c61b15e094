"""Rate limits per caller, shared by every replica: a token bucket in Redis, one script call per request.

The bucket is the caller ``Authenticate`` decided (``orchestrator/auth.py``): the key's name, or for a
caller without a key its address (X-Forwarded-For only from listed proxies). Nothing else the client
sends picks it. Writes (any method but GET/HEAD/OPTIONS) and reads have separate buckets and limits
(``events.rate_per_s``/``burst``, ``reads.rate_per_s``/``burst``; the read limit is off by default).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from orchestrator import metrics
from orchestrator.auth import SAFE_METHODS, caller_of
from orchestrator.errors import RateLimited
from orchestrator.guards import UNGUARDED_PATHS, ASGIApp, RateLimiter, Receive, Scope, Send, send_json
from orchestrator.store import keys
from orchestrator.store.backend import Backend, Command

log = logging.getLogger("orchestrator")

# Token bucket, atomic in Redis. The clock is Redis's (TIME), so replicas with skewed clocks share one
# bucket correctly. The key lives only until a full bucket would be back (forgetting it then changes
# nothing), so idle callers leave nothing behind. Returns the seconds to wait (a string: Lua numbers
# would be truncated to integers on the way out), "0" when a token was taken.
TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tostring(wait)
"""


class Limiter(Protocol):
    async def wait_s(self, bucket: str) -> float:
        """0 if the caller may go on (a token was taken); else the seconds until a token is back."""
        ...


@dataclass(frozen=True)
class Limit:
    rate_per_s: float
    burst: int

    @property
    def ttl_s(self) -> int:
        return math.ceil(self.burst / self.rate_per_s) + 1


class NoLimit:
    """A limit that is off."""

    async def wait_s(self, bucket: str) -> float:
        return 0.0


class LocalLimiter:
    """A bucket per caller in this process only (tests, and the fallback of the shared one)."""

    def __init__(self, limit: Limit, clock: Callable[[], float] | None = None) -> None:
        self.buckets = (
            RateLimiter(limit.rate_per_s, limit.burst)
            if clock is None
            else RateLimiter(limit.rate_per_s, limit.burst, clock=clock)
        )

    async def wait_s(self, bucket: str) -> float:
        return self.buckets.acquire(bucket)


class SharedLimiter:
    """The bucket in Redis, shared by every replica: N replicas do not multiply a caller's limit.

    When Redis does not answer (within the store's per-shard deadline), this fails open to a bucket per
    replica with the same limit: a caller then gets at most N times its limit for the outage. Failing
    closed would turn a Redis outage into a refusal of every request, reads included, which the read path
    is built to survive (fallbacks); and a write cannot be stored without Redis anyway.
    """

    def __init__(self, backend: Backend, scope: str, limit: Limit) -> None:
        self.backend = backend
        self.scope = scope
        self.limit = limit
        self.local = LocalLimiter(limit)

    async def wait_s(self, bucket: str) -> float:
        limit = self.limit
        # EVAL, not EVALSHA: no NOSCRIPT round trip after a Redis restart; the server caches the compiled
        # script by its digest, so sending its text costs bytes, not a compile.
        command = Command(
            "EVAL",
            keys.rate_bucket(self.scope, bucket),
            (limit.rate_per_s, limit.burst, limit.ttl_s),
            head=(TOKEN_BUCKET, 1),
        )
        replies = await self.backend.execute([command])
        if replies.down:
            metrics.RATE_LIMIT_FALLBACKS.inc()
            return await self.local.wait_s(bucket)
        return float(replies.values[0])


class RateLimit:
    """ASGI middleware after ``Authenticate``: 429 + Retry-After for a caller past its burst, before its
    body is read. The limiters come from the services the lifespan built (``services.limiters``)."""

    def __init__(self, app: ASGIApp, read_limit_on: bool) -> None:
        self.app = app
        self.read_limit_on = read_limit_on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        read = scope["method"] in SAFE_METHODS
        if read and not self.read_limit_on:
            await self.app(scope, receive, send)
            return
        limiters: Limiters = scope["app"].state.services.limiters
        limiter, what = (limiters.reads, "reads") if read else (limiters.writes, "writes")
        wait_s = await limiter.wait_s(caller_of(scope).bucket)
        if wait_s > 0:
            metrics.REJECTED_WRITES.labels("rate_limit" if not read else "read_rate_limit").inc()
            error = RateLimited(what, limiters.limit(read).rate_per_s, wait_s)
            await send_json(send, error.status, error.detail, error.headers)
            return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Limiters:
    writes: Limiter
    reads: Limiter
    write_limit: Limit
    read_limit: Limit

    def limit(self, read: bool) -> Limit:
        return self.read_limit if read else self.write_limit
