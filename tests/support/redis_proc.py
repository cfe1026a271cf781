"""A private `redis-server` for one test: a subprocess on a free loopback port with no persistence
(unless asked), ready once it answers PING. `stop()` ends it (SIGTERM, or SIGKILL as a crash) and
`start()` brings it back on the same port, so clients configured with its URL recover by themselves.
Extra arguments give it a password, ACL users or TLS. It never touches the shared Redis on 6379."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

REDIS_SERVER = "redis-server"


def free_port() -> int:
    """A loopback port nothing listens on right now (also useful as a closed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path, *, host_ip: str = "127.0.0.1") -> TlsFiles:
    """A throw-away CA and a server certificate for `host_ip` signed by it (openssl, a second or so)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{host_ip}\nbasicConstraints=CA:FALSE\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=companion test CA",
        "-keyout", str(ca_key), "-out", str(ca_cert))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host_ip}", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return TlsFiles(ca_cert=ca_cert, cert=cert, key=key)


class RedisProcess:
    def __init__(
        self,
        directory: Path,
        *,
        args: Sequence[str] = (),
        tls: TlsFiles | None = None,
        persistent: bool = False,
        port: int | None = None,
    ) -> None:
        """`persistent=True` writes every change to an append-only file, so a restart keeps the data
        (as a production Redis with AOF would): that is how stale entries survive an outage."""
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.cert),
                      "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca_cert),
                      "--tls-auth-clients", "no"]  # fmt: skip
        self._argv = [
            REDIS_SERVER,
            *listen,
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--save", "",
            *persistence,
            "--dir", str(directory),
            "--logfile", str(directory / "redis.log"),
            *args,
        ]  # fmt: skip
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The plain URL (no credentials); tests add their own."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Start-up errors (bad arguments) go to stdout before the log file is opened.
        with open(self.directory / "startup.out", "ab") as out:
            return subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    async def start(self, *, within: float = 10.0) -> None:
        """Start (again, on the same port) and return once it answers PING."""
        if self.running:
            return
        process = self._process = self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self._answers_ping():
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited with {process.returncode} at start-up:\n{self.log_tail()}")
            if loop.time() > deadline:
                await self.stop(kill=True)
                raise AssertionError(f"redis-server did not answer PING within {within}s:\n{self.log_tail()}")
            await asyncio.sleep(0.01)

    def _answers_ping(self) -> bool:
        """True once the server answers PING (an error such as NOAUTH also means it is up)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                sock: socket.socket = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                try:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                finally:
                    if sock is not raw:
                        sock.close()
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS", b"-NOPERM", b"-ERR"))

    async def stop(self, *, kill: bool = False, within: float = 10.0) -> None:
        """End the server (SIGTERM: a clean shutdown; `kill`: SIGKILL, a crash) and wait for it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while process.poll() is None:
            if loop.time() > deadline:
                process.kill()
                process.wait(5)
                break
            await asyncio.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("startup.out", "redis.log"):
            with contextlib.suppress(OSError):
                text += (self.directory / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@asynccontextmanager
async def running_redis(
    directory: Path,
    *,
    args: Sequence[str] = (),
    tls: TlsFiles | None = None,
    persistent: bool = False,
    port: int | None = None,
) -> AsyncIterator[RedisProcess]:
    """A started private redis-server, stopped at the end of the block whatever happens."""
    server = RedisProcess(directory, args=args, tls=tls, persistent=persistent, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
