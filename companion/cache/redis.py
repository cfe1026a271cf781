"""The Redis cache backend: `redis.asyncio` with hiredis, one connection pool, an explicit `Retry`
with backoff, timeouts in milliseconds, a health-check interval and a client name. Every call goes
through a circuit breaker, and any Redis error surfaces as `CacheUnavailable`.

Timeouts tolerate a late event loop: each operation gets `REDIS_SOCKET_TIMEOUT_MS` of loop time not
lost to our own stalls (`companion.overload.loop`), and the client's socket timeout is only a
backstop (`socket_timeout_backstop`). The breaker counts errors, not late replies: a timeout while
our loop was stalled, or a wait for one of our own pooled connections, says nothing about Redis.

The client may be a single server's, a Sentinel-managed primary's or a `RedisCluster`
(`companion.cache.topology` builds it); the backend's callers cannot tell. The few commands whose
cluster form differs (MGET over slots, SCAN over every primary) are chosen here once."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from companion.cache.backend import CacheUnavailable
from companion.cache.breaker import CircuitBreaker
from companion.cache.keys import PREFIX
from companion.overload.loop import LagTolerantTimeout, LoopMonitor, excluded_wait

T = TypeVar("T")

# Everything a Redis call can raise when Redis (not our code) is the trouble. RedisClusterException
# is not a RedisError (e.g. SlotNotCoveredError while a cluster failover is under way).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)

# KEYS: value key, lock key (same hash tag, same slot). ARGV: value, lock token, ttl in ms.
_SET_IF_LOCKED = """
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


class PoolExhausted(RedisConnectionError):
    """Every connection of our own pool stayed in use for the pool's wait: this process is busy;
    Redis may be perfectly well."""


def socket_timeout_backstop(seconds: float) -> float:
    """The socket timeout given to redis-py: a hard bound for reads that nothing else bounds (the
    pub/sub connection, a connection's set-up). Operations through `RedisBackend` time out after
    `seconds` of loop time; this wall-time bound only catches what a stalled loop would otherwise
    report as a dead Redis."""
    return max(seconds * 8, 2.0)


class QueueingConnectionPool(aioredis.ConnectionPool):
    """A pool that, like redis-py's BlockingConnectionPool, makes a caller wait (up to `timeout`
    seconds, then ConnectionError) while all `max_connections` are in use, instead of failing at
    once. BlockingConnectionPool takes an asyncio.Condition and starts an async timeout around every
    command, even when a connection is free: about 17 µs of a 85 µs loopback round trip, a third of
    the client's CPU per command in a profile (docs/benchmarks.md). Here a free slot costs a
    semaphore decrement, and only a caller that must wait sets up a timeout."""

    def __init__(self, *, timeout: float = 20.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(self.max_connections)
        self._held: builtins.set[Any] = set()  # handed out and not yet given back: each holds a slot

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._slots.locked():
            try:
                with excluded_wait():  # our own queue: not Redis's time (the operation's timeout)
                    async with asyncio.timeout(self.timeout):
                        await self._slots.acquire()
            except TimeoutError as error:
                raise PoolExhausted("No connection available.") from error
        else:
            await self._slots.acquire()  # returns at once
        try:
            connection = await super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        self._held.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            # Only connections we handed out free a slot (the parent also releases, through this
            # method, a connection it failed to connect before handing it out).
            if connection in self._held:
                self._held.discard(connection)
                self._slots.release()


def make_client(
    url: str,
    *,
    socket_timeout_ms: int = 250,
    connect_timeout_ms: int = 250,
    retries: int = 1,
    max_connections: int = 64,
    health_check_interval: int = 15,
    client_name: str = "companion",
) -> aioredis.Redis:
    """A client for `redis://`, `rediss://` (TLS) and `redis://USER:<password>@` (ACL) URLs.

    The pool blocks (up to the connect timeout) when all `max_connections` are busy, instead of
    failing at once: a burst of requests queues briefly rather than tripping the circuit breaker.
    """
    pool = QueueingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=connect_timeout_ms / 1000,
        socket_timeout=socket_timeout_backstop(socket_timeout_ms / 1000),
        socket_connect_timeout=connect_timeout_ms / 1000,
        # A fresh Retry per client: they carry state.
        retry=Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), retries),
        health_check_interval=health_check_interval,
        client_name=client_name,
    )
    return aioredis.Redis.from_pool(pool)


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        client: Any,
        *,
        breaker: CircuitBreaker | None = None,
        topology: Any = None,
        loop: LoopMonitor | None = None,
        timeout: float = 0.25,
    ) -> None:
        """`client`: an `aioredis.Redis` or a `RedisCluster`; `topology`: the
        `companion.cache.topology.Topology` it came from (a single server's when not given).
        `timeout`: seconds of loop time an operation may take (REDIS_SOCKET_TIMEOUT_MS); `loop`
        measures our own event loop's stalls, which do not count against it."""
        if topology is None:
            from companion.cache.topology import StandaloneTopology  # it builds on this module

            topology = StandaloneTopology(client)
        self.client = client
        self.topology = topology
        self.cluster = isinstance(client, RedisCluster)
        self.breaker = breaker or CircuitBreaker()
        self.loop = loop
        self.timeout = timeout
        self._cap = socket_timeout_backstop(timeout)
        self.late = 0  # calls that failed while our own loop was stalled (not counted by the breaker)
        self.on_recovery: list[Callable[[], Awaitable[None]]] = []
        self._set_if_locked = client.register_script(_SET_IF_LOCKED)

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation through the breaker; any failure becomes CacheUnavailable."""
        return await self._call(operation)

    async def _call(self, operation: Callable[[], Awaitable[T]], *, bounded: bool = True) -> T:
        if not self.breaker.allow():
            raise CacheUnavailable("redis circuit open")
        stalled = self.loop.stalled_now() if self.loop is not None else 0.0
        try:
            if bounded:
                async with LagTolerantTimeout(self.loop, self.timeout, cap=self._cap):
                    result = await operation()
            else:
                result = await operation()
        except REDIS_ERRORS as error:
            if self._busy_not_broken(error, stalled):
                self.late += 1
                self.breaker.abandon()
            else:
                self.breaker.record_failure()
            raise CacheUnavailable(type(error).__name__) from error
        except BaseException:
            # Cancelled (a client hung up) or a bug: says nothing about Redis, but must not leave a
            # half-open trial pending forever, or no call would ever be admitted again.
            self.breaker.abandon()
            raise
        if self.breaker.record_success():
            for callback in self.on_recovery:
                await callback()
        return result

    def _busy_not_broken(self, error: BaseException, stalled_before: float) -> bool:
        """A failure that is our own doing: no free connection in our pool, or a timeout while our
        loop stalled for at least half the timeout (the reply may well have been there, unread)."""
        if isinstance(error, PoolExhausted):
            return True
        if isinstance(error, TimeoutError | RedisTimeoutError) and self.loop is not None:
            return self.loop.stalled_now() - stalled_before >= self.timeout / 2
        return False

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self.client.get(key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self.cluster:  # keys of several slots: one MGET per slot
            return await self._call(lambda: self.client.mget_nonatomic(list(keys)))
        return await self._call(lambda: self.client.mget(list(keys)))

    async def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        px = int(ttl_seconds * 1000) if ttl_seconds is not None else None
        await self._call(lambda: self.client.set(key, value, px=px))

    async def add(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        result = await self._call(lambda: self.client.set(key, value, px=int(ttl_seconds * 1000), nx=True))
        return bool(result)

    async def set_if_locked(self, key: str, value: bytes, ttl_seconds: float, lock_key: str, token: str) -> bool:
        result = await self._call(
            lambda: self._set_if_locked(keys=[key, lock_key], args=[value, token, int(ttl_seconds * 1000)])
        )
        return bool(result)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return int(await self._call(lambda: self.client.unlink(*keys)))

    async def expire(self, key: str, ttl_seconds: float) -> bool:
        return bool(await self._call(lambda: self.client.pexpire(key, int(ttl_seconds * 1000))))

    async def incr(self, key: str) -> int:
        return int(await self._call(lambda: self.client.incr(key)))

    async def sadd(self, key: str, member: str, ttl_seconds: float | None = None) -> None:
        async def run() -> Any:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.sadd(key, member)
                if ttl_seconds is not None:
                    pipe.pexpire(key, int(ttl_seconds * 1000))
                return await pipe.execute()

        await self._call(run)

    async def srem(self, key: str, member: str) -> None:
        await self._call(lambda: self.client.srem(key, member))

    async def smembers(self, key: str) -> builtins.set[str]:
        members = await self._call(lambda: self.client.smembers(key))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def delete_matching(self, pattern: str) -> int:
        """SCAN and UNLINK in batches; refuses patterns outside our prefix (never FLUSHDB)."""
        if not pattern.startswith(PREFIX + ":"):
            raise ValueError("refusing to delete outside the companion namespace")

        async def run() -> int:
            removed = 0
            batch: list[Any] = []
            async for key in self.client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await self.client.unlink(*batch)
                    batch = []
            if batch:
                removed += await self.client.unlink(*batch)
            return removed

        return await self._call(run, bounded=False)  # many round trips: each bounded by the socket

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(lambda: self.client.publish(channel, message))

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._call(self.client.ping)
        return (time.perf_counter() - started) * 1000

    async def describe(self) -> dict[str, Any]:
        """The topology's mode and state for /health (cluster: nodes reachable, slots covered;
        sentinel: the current primary). Raises CacheUnavailable."""
        return await self._call(self.topology.status)

    async def info(self) -> dict[str, Any]:
        """Redis's own counters and memory, summed over every primary (numbers) on a cluster."""

        async def run() -> dict[str, Any]:
            total: dict[str, Any] = {}
            primaries = await self.topology.primaries()
            try:
                for client in primaries:
                    stats = await client.info("stats")
                    memory = await client.info("memory")
                    for name, value in {**stats, **memory}.items():
                        if isinstance(value, int | float) and not isinstance(value, bool) and name in total:
                            total[name] += value
                        else:
                            total.setdefault(name, value)
            finally:
                if self.topology.mode == "cluster":
                    for client in primaries:
                        await client.aclose()
            total["primaries"] = len(primaries)
            return total

        return await self._call(run)

    async def aclose(self) -> None:
        await self.topology.aclose()
