"""Redis topologies: one factory that turns the settings into a client for a single server
(standalone), a Redis Cluster, or a primary watched by Sentinel, so that nothing above `cache/`
knows which one it talks to.

Every topology gives the same `redis.asyncio` command interface (`Redis`, or `RedisCluster`, which
routes each key to its slot's primary). The few things that differ live here, behind `Topology`:
what `/health` reports, where the invalidation listener subscribes, and which servers hold keys
(`companion cache stats|invalidate` visit every primary).

Choices (docs/scaling.md says why):
* `REDIS_MODE=auto` asks REDIS_URL's server once, at start (`INFO cluster`): `cluster_enabled:1`
  means cluster, anything else standalone. An unreachable server is taken as standalone, and
  `/health` says the mode was not detected; set REDIS_MODE explicitly in production.
* On a cluster, invalidations travel by classic PUBLISH (broadcast to every node), and the listener
  subscribes on any node, moving to the next one when its node goes: measured, the one channel we
  have makes sharded pub/sub's scaling moot, and classic survives a primary's loss without waiting
  for the failover.
* Like the standalone pool, the cluster client makes a caller wait for a free connection instead of
  failing when all are busy (redis-py's cluster raises MaxConnectionsError at once).
* Sentinel: the pool asks the sentinels for the primary on every new connection and drops idle
  connections when it moved; a connection to a demoted primary is dropped on its first READONLY.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from companion.cache.redis import (
    REDIS_ERRORS,
    PoolExhausted,
    QueueingConnectionPool,
    make_client,
    socket_timeout_backstop,
)
from companion.overload.loop import excluded_wait

if TYPE_CHECKING:
    from companion.config import Settings

logger = logging.getLogger(__name__)

Mode = Literal["standalone", "cluster", "sentinel"]


@dataclass(frozen=True)
class RedisOptions:
    """The Redis settings, independent of where they came from (settings, CLI, tests, bench)."""

    url: str = "redis://127.0.0.1:6379/0"
    mode: Literal["auto", "standalone", "cluster", "sentinel"] = "auto"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str | None = None
    socket_timeout_ms: int = 250
    connect_timeout_ms: int = 250
    retries: int = 1
    max_connections: int = 64
    health_check_interval: int = 15
    client_name: str = "companion"

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisOptions:
        password = settings.redis_sentinel_password
        return cls(
            url=settings.redis_url.get_secret_value(),
            mode=settings.redis_mode,
            sentinels=parse_sentinels(settings.redis_sentinels),
            sentinel_master=settings.redis_sentinel_master,
            sentinel_password=password.get_secret_value() if password is not None else None,
            socket_timeout_ms=settings.redis_socket_timeout_ms,
            connect_timeout_ms=settings.redis_connect_timeout_ms,
            retries=settings.redis_retries,
            max_connections=settings.redis_max_connections,
            health_check_interval=settings.redis_health_check_interval_seconds,
        )


def parse_sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (validated by Settings) as pairs."""
    pairs = []
    for entry in filter(None, (item.strip() for item in value.split(","))):
        host, _, port = entry.rpartition(":")
        pairs.append((host.strip("[]"), int(port)))
    return tuple(pairs)


class Topology(Protocol):
    """What differs between topologies, for the few callers that must know."""

    mode: Mode
    client: Any  # aioredis.Redis or RedisCluster: the same commands either way

    def pubsub(self) -> Any:
        """A PubSub for the invalidation channel, on a server that is likely up (a new one per call)."""
        ...

    async def status(self) -> dict[str, Any]:
        """What /health shows: the mode and the state of the servers. Raises a REDIS_ERRORS error."""
        ...

    async def primaries(self) -> list[aioredis.Redis]:
        """One client per primary (for SCAN/INFO over every shard); the caller closes them."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class StandaloneTopology:
    client: aioredis.Redis
    detected: bool = True  # False: REDIS_MODE=auto could not reach the server at start
    mode: Mode = "standalone"

    def pubsub(self) -> Any:
        return self.client.pubsub()

    async def status(self) -> dict[str, Any]:
        return {"mode": "standalone"} if self.detected else {"mode": "standalone", "detected": False}

    async def primaries(self) -> list[aioredis.Redis]:
        return [aioredis.Redis(connection_pool=self.client.connection_pool)]

    async def aclose(self) -> None:
        await self.client.aclose()


class QueueingRedisCluster(RedisCluster):
    """A RedisCluster that makes a caller wait (up to `queue_timeout` seconds) while
    `max_commands` are in flight, as QueueingConnectionPool does for one server: redis-py's cluster
    raises MaxConnectionsError at once when a node's pool is full, which would open the breaker
    on a burst instead of queueing it briefly."""

    def __init__(self, *args: Any, max_commands: int = 64, queue_timeout: float = 0.25, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(max_commands)
        self._queue_timeout = queue_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_flight.locked():
            try:
                with excluded_wait():  # our own queue: not the cluster's time (the operation's timeout)
                    async with asyncio.timeout(self._queue_timeout):
                        await self._in_flight.acquire()
            except TimeoutError as error:
                raise PoolExhausted("No connection available.") from error
        else:
            await self._in_flight.acquire()
        try:
            return await super().execute_command(*args, **kwargs)
        except (KeyError, AttributeError) as error:
            # redis-py's cluster client resets its slot and node tables while it reloads them
            # (after MOVED, ClusterDown or a lost node: a failover); a command arriving meanwhile
            # can hit the half-empty tables. That means "not available right now", like the
            # ConnectionError it would get a moment earlier, so it must not become a 500.
            raise RedisClusterException(f"cluster slot map unavailable ({type(error).__name__})") from error
        finally:
            self._in_flight.release()


@dataclass
class ClusterTopology:
    client: QueueingRedisCluster
    # How to reach one node directly: REDIS_URL's credentials and TLS options, timeouts, name.
    node_kwargs: dict[str, Any] = field(default_factory=dict)
    probe_timeout: float = 0.5  # per node, for /health
    mode: Mode = "cluster"
    _rotation: itertools.count[int] = field(default_factory=itertools.count)
    _initializing: asyncio.Task[None] | None = None

    def pubsub(self) -> Any:
        # Classic pub/sub is broadcast to every node, so any node will do, and a plain connection to
        # it is all it takes (redis-py's ClusterPubSub would pick the node owning the channel's
        # slot, and fails before the client has loaded the slot map). Take the next known node on
        # each (re)subscription, so a dead node is left behind at once.
        nodes = self.client.get_nodes()
        if not nodes:
            # The client has not loaded the slot map yet (no command ran): start it now, so that
            # the next (re)subscription knows every node, not just REDIS_URL's.
            self._initializing = asyncio.get_running_loop().create_task(self._initialize_quietly())
            nodes = list(self.client.nodes_manager.startup_nodes.values())
        return self.node_client(nodes[next(self._rotation) % len(nodes)]).pubsub()

    async def _initialize_quietly(self) -> None:
        try:
            await self.client.initialize()
        except REDIS_ERRORS:
            pass  # the next command or subscription tries again

    def node_client(self, node: ClusterNode) -> aioredis.Redis:
        """A plain client of one node, with the cluster client's credentials, TLS and timeouts."""
        return aioredis.Redis(host=node.host, port=int(node.port), retry=_retry_from(self.client), **self.node_kwargs)

    async def status(self) -> dict[str, Any]:
        if not self.client.get_nodes():
            await self.client.initialize()
        primaries = self.client.get_primaries()
        timeout = self.probe_timeout

        async def probe(node: ClusterNode) -> dict[str, Any] | None:
            try:
                async with asyncio.timeout(timeout):
                    return await self.client.execute_command("CLUSTER INFO", target_nodes=node)
            except REDIS_ERRORS:
                return None

        answers = await asyncio.gather(*(probe(node) for node in primaries))
        reachable = [(node, info) for node, info in zip(primaries, answers, strict=True) if info is not None]
        if not reachable:
            raise RedisConnectionError("no cluster primary answered")
        node, info = reachable[0]
        # The cluster's own view of every node, replicas included: which ones it marks failing.
        table = await self.client.execute_command("CLUSTER NODES", target_nodes=node)
        flags = [str(row.get("flags", "")) for row in (table.values() if isinstance(table, dict) else [])]
        return {
            "mode": "cluster",
            "cluster_state": str(info.get("cluster_state")),
            "slots_covered": int(info.get("cluster_slots_ok", 0)),
            "slots_failing": int(info.get("cluster_slots_pfail", 0)) + int(info.get("cluster_slots_fail", 0)),
            "primaries": len(primaries),
            "primaries_reachable": len(reachable),
            "nodes": int(info.get("cluster_known_nodes", len(flags))),
            "nodes_failing": sum(1 for f in flags if "fail" in f),
        }

    async def primaries(self) -> list[aioredis.Redis]:
        if not self.client.get_nodes():
            await self.client.initialize()
        return [self.node_client(node) for node in self.client.get_primaries()]

    async def aclose(self) -> None:
        if self._initializing is not None:
            self._initializing.cancel()
        await self.client.aclose()


class QueueingSentinelConnectionPool(QueueingConnectionPool, SentinelConnectionPool):
    """The sentinel-managed pool with the same wait-for-a-free-connection behaviour."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name=service_name, sentinel_manager=sentinel_manager, **kwargs)


@dataclass
class SentinelTopology:
    client: aioredis.Redis
    sentinel: Sentinel
    master_name: str
    mode: Mode = "sentinel"

    def pubsub(self) -> Any:
        return self.client.pubsub()

    async def status(self) -> dict[str, Any]:
        host, port = await self.sentinel.discover_master(self.master_name)
        return {"mode": "sentinel", "master_name": self.master_name, "primary": f"{host}:{port}"}

    async def primaries(self) -> list[aioredis.Redis]:
        return [aioredis.Redis(connection_pool=self.client.connection_pool)]

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.sentinel.aclose()


def detect_mode(options: RedisOptions) -> tuple[Mode, bool]:
    """(mode, detected) for REDIS_MODE=auto: one blocking `INFO cluster` at start-up."""
    timeout = max(options.connect_timeout_ms, options.socket_timeout_ms, 500) / 1000
    probe = redis.Redis.from_url(options.url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        info = probe.info("cluster")
    except (RedisError, OSError) as error:
        logger.warning(
            "REDIS_MODE=auto: cannot reach Redis to detect a cluster (%s); using standalone", type(error).__name__
        )
        return "standalone", False
    finally:
        probe.close()
    return ("cluster" if int(info.get("cluster_enabled", 0)) else "standalone"), True


def _retry_from(client: RedisCluster) -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), client.retry.get_retries())


def _retry(options: RedisOptions) -> Retry:
    # A fresh Retry per client: they carry state.
    return Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), options.retries)


def _tls_and_auth(url: str) -> dict[str, Any]:
    """REDIS_URL's credentials, database and TLS options, without its host and port."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    return kwargs


def sentinel_connection_kwargs(options: RedisOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs for the primary's connections, kwargs for the sentinels' connections): the primary
    takes REDIS_URL's credentials, database and TLS options; the sentinels its TLS options and
    REDIS_SENTINEL_PASSWORD."""
    primary = _tls_and_auth(options.url)
    sentinels: dict[str, Any] = {k: v for k, v in primary.items() if k.startswith("ssl")}
    if options.sentinel_password is not None:
        sentinels["password"] = options.sentinel_password
    connect = {"socket_connect_timeout": options.connect_timeout_ms / 1000}
    # The primary's operations are bounded by RedisBackend in loop time (REDIS_SOCKET_TIMEOUT_MS);
    # the socket timeout is only the backstop, as for a single server. Sentinel queries are not
    # run through the backend: they keep the plain timeout.
    backstop = socket_timeout_backstop(options.socket_timeout_ms / 1000)
    return (
        {**primary, **connect, "socket_timeout": backstop},
        {**sentinels, **connect, "socket_timeout": options.socket_timeout_ms / 1000},
    )


def make_topology(options: RedisOptions) -> Topology:
    """The client for `options.mode` (`auto`: detected now). Builds no connection except the
    detection probe; clients connect on first use."""
    mode = options.mode
    detected = True
    if mode == "auto":
        mode, detected = detect_mode(options)
    if mode == "cluster":
        kwargs = _tls_and_auth(options.url)
        kwargs.pop("db", None)
        kwargs.update(
            socket_timeout=socket_timeout_backstop(options.socket_timeout_ms / 1000),  # as for one server
            socket_connect_timeout=options.connect_timeout_ms / 1000,
            health_check_interval=options.health_check_interval,
            client_name=options.client_name,
        )
        node = parse_url(options.url)
        client = QueueingRedisCluster(
            host=str(node.get("host", "127.0.0.1")),
            port=int(node.get("port", 6379)),
            max_commands=options.max_connections,
            queue_timeout=options.connect_timeout_ms / 1000,
            max_connections=options.max_connections + 2,
            retry=_retry(options),
            **kwargs,
        )
        return ClusterTopology(client, node_kwargs=kwargs, probe_timeout=max(0.5, 2 * options.socket_timeout_ms / 1000))
    if mode == "sentinel":
        primary, sentinel_kwargs = sentinel_connection_kwargs(options)
        sentinel = Sentinel(list(options.sentinels), sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(
            options.sentinel_master,
            connection_pool_class=QueueingSentinelConnectionPool,
            max_connections=options.max_connections,
            timeout=options.connect_timeout_ms / 1000,
            retry=_retry(options),
            health_check_interval=options.health_check_interval,
            client_name=options.client_name,
            **primary,
        )
        return SentinelTopology(client, sentinel, options.sentinel_master)
    standalone = make_client(
        options.url,
        socket_timeout_ms=options.socket_timeout_ms,
        connect_timeout_ms=options.connect_timeout_ms,
        retries=options.retries,
        max_connections=options.max_connections,
        health_check_interval=options.health_check_interval,
        client_name=options.client_name,
    )
    return StandaloneTopology(standalone, detected=detected)


def standalone(client: aioredis.Redis) -> StandaloneTopology:
    """Wrap an existing single-server client (tests, tools)."""
    return StandaloneTopology(client)


def distrust_after_failover(backend: Any, cache: Any) -> Any:
    """A recovery callback for `RedisBackend.on_recovery` on a cluster or behind Sentinel: after an
    outage that opened the circuit, a replica may have taken over without the last writes its
    primary acknowledged (replication is asynchronous), among them deletes of stale cache entries.
    So every cached namespace is dropped from Redis and every instance's L1 (one SCAN + UNLINK per
    namespace on every primary, and one message), as when the invalidation channel was lost."""
    seen = backend.breaker.outages

    async def after_outage() -> None:
        nonlocal seen
        if backend.breaker.outages != seen:
            seen = backend.breaker.outages
            cache.distrust_backend()
            await cache.replay_pending()

    return after_outage
