"""Per-key limits: the requests a caller key has in flight (MAX_STREAMS_PER_KEY) and starts a minute
(MAX_REQUESTS_PER_MINUTE_PER_KEY), counted in this process or, with REDIS_URL, across every replica.

In Redis each key has two sorted sets, named by a hash of the key (never the key itself): its leases
(one per request in flight, scored by when it expires) and its last minute's requests. One script
checks and takes both at once, on Redis's clock, so replicas whose clocks differ count alike. A lease
is renewed while its request runs and expires LEASE_SECONDS after a replica that held it died, so a
crash never holds a key's slots for long.

Redis out of reach (or slower than REDIS_TIMEOUT_SECONDS): the replica counts in the process, says so
once in the log and in custom_llm_limits_unshared_total, and tries Redis again after RETRY_SECONDS;
with REDIS_REQUIRED it refuses instead, 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from custom_llm_server.core import metrics
from custom_llm_server.core.errors import ApiError
from custom_llm_server.core.redact import printable

log = logging.getLogger("custom_llm.limits")

LEASE_SECONDS = 30.0  # a dead replica's requests stop counting this long after its last renewal
RETRY_SECONDS = 5.0  # Redis found out of reach: counted in the process until then
MAX_UNRELEASED = 10_000  # leases remembered to give back once Redis answers (the rest expire)
MINUTE_MS = 60_000

# KEYS: leases, last minute. ARGV: in flight allowed (0: any), a minute allowed (0: any), lease id,
# lease ms. Returns {0} taken, {1} too many in flight, {2, ms until the minute's oldest request ages out}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local streams, per_minute = tonumber(ARGV[1]), tonumber(ARGV[2])
if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= streams then return {1, 0} end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, tonumber(oldest[2]) + 60000 - now}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 60000)
end
if streams > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
end
return {0, 0}
"""
# KEYS: leases. ARGV: lease ms, then the lease ids this replica holds for that key.
RENEW = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""

Release = Callable[[], Awaitable[None]]


def too_many_in_flight(limit: int) -> ApiError:
    return ApiError(
        429,
        f"This key already has {limit} requests in flight.",
        "rate_limit_error",
        "too_many_concurrent_requests",
        headers={"retry-after": "1"},
    )


def too_many_a_minute(limit: int, wait_ms: float) -> ApiError:
    return ApiError(
        429,
        f"This key may start {limit} requests a minute.",
        "rate_limit_error",
        "too_many_requests",
        headers={"retry-after": str(max(1, int(wait_ms / 1000 + 0.999)))},
    )


LIMITS_UNAVAILABLE = ApiError(
    503,
    "The server cannot count this key's requests right now; try again shortly.",
    "server_error",
    "limits_unavailable",
    headers={"retry-after": str(int(RETRY_SECONDS))},
)


class InProcess:
    """The limits counted in this process alone: one machine's, or any replica's while Redis is away."""

    def __init__(self) -> None:
        self.in_flight: dict[bytes, int] = {}
        self.recent: dict[bytes, deque[float]] = {}  # the last minute's starts, at most the limit's worth

    def take(self, key: bytes, streams: int, per_minute: int) -> ApiError | Release:
        if streams and self.in_flight.get(key, 0) >= streams:
            return too_many_in_flight(streams)
        if per_minute:
            now, recent = time.monotonic(), self.recent.get(key)
            if recent is None or recent.maxlen != per_minute:  # new, or its limit changed with a reload
                recent = self.recent[key] = deque(recent or (), maxlen=per_minute)
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= per_minute:
                return too_many_a_minute(per_minute, (recent[0] + 60 - now) * 1000)
            recent.append(now)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

        async def release() -> None:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]  # keys come and go with reloads

        return release


class Limits:
    """Takes a request's place within its key's limits, in Redis when REDIS_URL is set."""

    def __init__(self, redis_url: str = "", required: bool = False, timeout: float = 0.5, lease_seconds=LEASE_SECONDS):
        self.redis_url, self.required, self.timeout, self.lease = redis_url, required, timeout, lease_seconds
        self.local = InProcess()
        self.redis: Any = None  # redis.asyncio.Redis, made in the event loop that uses it
        self.away_until = 0.0  # Redis out of reach: in the process until then
        self.leases: dict[str, set[str]] = {}  # the leases this replica holds, by Redis key
        self.unreleased: set[tuple[str, str]] = set()  # leases given back while Redis was away
        self._renewing: asyncio.Task[None] | None = None

    async def take(self, key: bytes, streams: int, per_minute: int) -> ApiError | Release:
        """A way to give the place back, or the error that refuses the request."""
        if not (streams or per_minute):
            return _nothing
        if self.redis_url and time.monotonic() >= self.away_until:
            try:
                return await self._take_shared(key, streams, per_minute)
            except Exception as error:  # redis's errors and timeouts alike
                self._away(error)
        if self.redis_url:
            metrics.LIMITS_UNSHARED.inc()
            if self.required:
                return LIMITS_UNAVAILABLE
        return self.local.take(key, streams, per_minute)

    async def _take_shared(self, key: bytes, streams: int, per_minute: int) -> ApiError | Release:
        redis = self._client()
        if self.unreleased:  # first: they would count against this request
            await self._release_late()
        name = "custom-llm:{" + hashlib.sha256(key).hexdigest()[:32] + "}"  # one slot in a Redis Cluster
        leases, minute, lease = f"{name}:in-flight", f"{name}:minute", uuid.uuid4().hex
        async with asyncio.timeout(self.timeout):
            taken, wait_ms = await redis.eval(TAKE, 2, leases, minute, streams, per_minute, lease, self.lease * 1000)
        if self.away_until:
            log.info("per-key limits: Redis reachable again; counting across replicas")
            self.away_until = 0.0
        if taken == 1:
            return too_many_in_flight(streams)
        if taken == 2:
            return too_many_a_minute(per_minute, float(wait_ms))
        if not streams:
            return _nothing
        self.leases.setdefault(leases, set()).add(lease)
        self._keep_renewing()

        async def release() -> None:
            held = self.leases.get(leases, set())
            held.discard(lease)
            if not held:
                self.leases.pop(leases, None)
            try:
                async with asyncio.timeout(self.timeout):
                    await redis.zrem(leases, lease)
            except Exception as error:  # given back when Redis answers again (else it expires)
                if len(self.unreleased) < MAX_UNRELEASED:
                    self.unreleased.add((leases, lease))
                self._away(error)

        return release

    async def _release_late(self) -> None:
        """Give back the leases whose release Redis missed, so they do not hold their key's places
        until they expire."""
        late, self.unreleased = self.unreleased, set()
        try:
            async with asyncio.timeout(self.timeout * 4):
                pipe = self._client().pipeline(transaction=False)
                for leases, lease in late:
                    pipe.zrem(leases, lease)
                await pipe.execute()
        except Exception:
            self.unreleased |= late
            raise  # Redis still away: take() counts in the process

    def _client(self) -> Any:
        if self.redis is None:
            import redis.asyncio

            self.redis = redis.asyncio.Redis.from_url(
                self.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        return self.redis

    def _away(self, error: BaseException) -> None:
        if not self.away_until:
            then = "refusing requests with limits" if self.required else "counting in this process"
            log.warning(
                "per-key limits: Redis out of reach (%s); %s", printable(error, 200) or type(error).__name__, then
            )
        self.away_until = time.monotonic() + RETRY_SECONDS

    def _keep_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Renew the leases held here, a third of their life at a time, while there are any."""
        while self.leases:
            await asyncio.sleep(self.lease / 3)
            try:
                async with asyncio.timeout(self.timeout * 4):
                    pipe = self._client().pipeline(transaction=False)
                    for leases, held in list(self.leases.items()):
                        if held:
                            pipe.eval(RENEW, 1, leases, self.lease * 1000, *held)
                    await pipe.execute()
            except Exception as error:  # the leases expire; the next request finds Redis away
                self._away(error)

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


async def _nothing() -> None:
    return None
