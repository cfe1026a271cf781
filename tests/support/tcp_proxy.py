"""A tiny TCP proxy for simulating a database outage: `stop()` closes the listener and cuts every
open connection at once (as a crashed or unreachable server would), `start()` listens again on the
same port, so that clients configured with the proxy's address can come back by themselves.

`stall()` simulates a server that is up but too slow: connections stay open and new ones are
accepted, but no byte moves in either direction until `resume()`, which delivers what was held, late
(as a server that was busy would still run the commands it had received)."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0  # chosen by the OS at the first start(), then kept
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> None:
        """Hold every byte, both ways, on open and new connections, until `resume()`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        """Refuse new connections and reset every open one; returns when all are gone (a stall
        ends too: what it held goes nowhere)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        self._flowing.set()
        if server is not None:
            await server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._transports.add(client_writer.transport)
        try:
            if self._server is None:  # accepted just as we stopped
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return
            self._transports.add(upstream_writer.transport)
            try:
                await asyncio.gather(
                    self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
                )
            finally:
                upstream_writer.transport.abort()
                self._transports.discard(upstream_writer.transport)
        finally:
            client_writer.transport.abort()
            self._transports.discard(client_writer.transport)
            self._handlers.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF or an error, then cut the other side too."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
