"""Small helpers for the cache tests: a fake monotonic clock, one description of "a backend under
test" for both backends, a pass-through recorder for calls that reach a real backend, and a loader
whose progress a test controls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from companion.cache.backend import CacheBackend
from companion.cache.memory import MemoryBackend
from companion.cache.redis import RedisBackend
from tests.support.live import wait_for
from tests.support.redis_server import RedisServer


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class BackendCase:
    """One backend under test. The memory backend runs on `clock`; Redis on its own real clock, so
    there a TTL is long enough that no read races it, is checked to be what was asked for, and is
    then run out at once with PEXPIRE (Redis's own expiry, never a sleep)."""

    backend: MemoryBackend | RedisBackend
    clock: FakeClock | None = None
    redis: aioredis.Redis | None = None
    server: RedisServer | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def is_redis(self) -> bool:
        return isinstance(self.backend, RedisBackend)

    @property
    def short_ttl(self) -> float:
        """A TTL a test can see run out: 5 fake seconds in memory; on Redis 20 real seconds, far
        more than any read that must land before it takes, ended early by `after_ttl`."""
        return 20.0 if self.is_redis else 5.0

    async def after_ttl(
        self, condition: Callable[[], Awaitable[bool]], *, key: str, seconds: float | None = None
    ) -> None:
        """Let `seconds` (default: short_ttl) pass for `key`, then require `condition`: on the memory
        backend by moving its clock; on Redis by checking that `key` carries that TTL (not more, and
        not much less: the TTL asked for, in the right unit), expiring it now, and waiting for
        `condition` with a deadline."""
        ttl = seconds if seconds is not None else self.short_ttl
        if self.clock is not None:
            self.clock.advance(ttl + 0.001)
            assert await condition()
            return
        assert self.redis is not None
        remaining = await self.redis.pttl(key)
        assert ttl * 1000 / 2 < remaining <= ttl * 1000, f"{key} has a TTL of {remaining} ms, not about {ttl} s"
        assert await self.redis.pexpire(key, 1)
        await wait_for(condition, timeout=5, what="a Redis TTL to run out")

    async def still_there_for_a_while(self, condition: Callable[[], Awaitable[bool]]) -> None:
        """`condition` holds now and, on the memory backend, also after a very long time."""
        assert await condition()
        if self.clock is not None:
            self.clock.advance(10_000_000)
            assert await condition()


class RecordingBackend:
    """Passes every call through to a real backend and records it (name, arguments, result), so a
    test can see what reached the backend and run a step right after a given call returned."""

    def __init__(self, inner: CacheBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[tuple[str, tuple[Any, ...], Any]] = []
        self.after: dict[str, Callable[[tuple[Any, ...], Any], Awaitable[None]]] = {}

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self.inner, attribute)
        if not callable(target) or attribute.startswith("_") or attribute == "aclose":
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = await target(*args, **kwargs)
            self.calls.append((attribute, args, result))
            hook = self.after.get(attribute)
            if hook is not None:
                await hook(args, result)
            return result

        return call

    def count(self, operation: str | None = None) -> int:
        return sum(1 for name, _, _ in self.calls if operation is None or name == operation)


class Item(BaseModel):
    """A cached value: frozen, as the real cached models are."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: int = 0


class ItemCodec:
    def encode(self, value: Item) -> bytes:
        return value.model_dump_json().encode()

    def decode(self, data: bytes) -> Item:
        return Item.model_validate_json(data)


@dataclass
class Loader:
    """A database stand-in: returns `value` as it is when the load starts; counts calls; with
    `gated`, each call waits for `gate` after reading (so a test can change the data and
    invalidate while a load is in flight)."""

    value: Item | None
    gated: bool = False
    calls: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    error: Exception | None = None

    async def __call__(self) -> Item | None:
        self.calls += 1
        read = self.value
        self.started.set()
        if self.gated:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return read


class HoldingProxy:
    """A loopback TCP proxy in front of Redis that can hold back client-to-server bytes containing
    `hold` (e.g. b"SUBSCRIBE") until `release()`: the moment between a command being sent and
    Redis having run it, made as long as a test needs."""

    def __init__(self, target_port: int, *, hold: bytes | None = None) -> None:
        self.target_port = target_port
        self.hold = hold
        self.held = asyncio.Event()
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def release(self) -> None:
        self._released.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for task in (self._pipe(reader, up_writer, upstream=True), self._pipe(up_reader, writer, upstream=False)):
            started = asyncio.create_task(task)
            self._tasks.add(started)
            started.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and self.hold is not None and self.hold in data and not self._released.is_set():
                    self.held.set()
                    await self._released.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
