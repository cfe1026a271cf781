"""The invalidation listener: a Redis pub/sub subscription that tells this instance's L1 what
other instances changed. While it is down, L1 is cleared and bypassed; when it comes back, L1 is
cleared once more (anything may have changed meanwhile) and re-enabled, and invalidations this
instance could not publish are replayed, together with a drop of every cached namespace in Redis,
which may still hold entries other instances could not delete during the outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from companion.cache import keys
from companion.cache.redis import REDIS_ERRORS
from companion.cache.tiered import TieredCache

logger = logging.getLogger(__name__)


class PubSubSource(Protocol):
    """A Redis client, or a `companion.cache.topology.Topology` (which picks the node on a cluster)."""

    def pubsub(self) -> Any: ...


class InvalidationListener:
    def __init__(
        self, client: PubSubSource, cache: TieredCache, *, retry_seconds: float = 0.2, max_retry_seconds: float = 2.0
    ) -> None:
        self._client = client
        self._cache = cache
        self._retry_seconds = retry_seconds
        self._max_retry_seconds = max_retry_seconds
        self._confirm_seconds = 5.0
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Also run whenever the channel (re)connects, i.e. Redis answers again (deferred revocations).
        self.on_connect: list[Callable[[], Awaitable[None]]] = []

    def start(self) -> None:
        self._cache.local.enabled = False  # until the subscription is confirmed
        self._task = asyncio.create_task(self._run(), name="cache-invalidation-listener")

    async def _run(self) -> None:
        delay = self._retry_seconds
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(keys.INVALIDATION_CHANNEL)
                # SUBSCRIBE has only been sent: until Redis confirms it, a publish reaches no one.
                async with asyncio.timeout(self._confirm_seconds):
                    while (message := await pubsub.get_message(timeout=1.0)) is None or message["type"] != "subscribe":
                        pass
                # Subscribed: anything published from now on reaches us, so L1 can be trusted again.
                self._cache.local.clear()
                self._cache.local.enabled = True
                self.connected.set()
                delay = self._retry_seconds
                logger.info("cache invalidation channel connected")
                await self._cache.replay_pending()
                for callback in self.on_connect:
                    await callback()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        self._cache.on_message(message["data"])
                    elif message["type"] == "subscribe":
                        # redis-py lost the connection and resubscribed by itself: whatever was
                        # published in between never reached us.
                        logger.warning("cache invalidation channel reconnected; L1 cleared")
                        self._cache.local.clear()
                        self._cache.distrust_backend()
                        await self._cache.replay_pending()
                        for callback in self.on_connect:
                            await callback()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as error:
                if self.connected.is_set():
                    logger.warning(
                        "cache invalidation channel lost (%s); L1 cleared and bypassed", type(error).__name__
                    )
                self._lost()
            except Exception:
                logger.exception("cache invalidation listener failed; L1 cleared and bypassed")
                self._lost()
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_seconds)

    def _lost(self) -> None:
        self.connected.clear()
        self._cache.local.enabled = False
        self._cache.local.clear()
        # Redis may come back with entries other instances could not delete meanwhile.
        self._cache.distrust_backend()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
