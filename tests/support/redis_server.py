"""A private `redis-server` for tests: its own process on a free loopback port and a temporary
directory, so tests can flush it, stop it and start it again (on the same port, as a restarted
Redis would come back) without ever touching a shared Redis.

    server = RedisServer()                                   # plain
    server = RedisServer(password="s3cret")                  # --requirepass
    server = RedisServer(acl=["user app on >pw ~companion:* &* +@all"], username="app", password="pw")
    server = RedisServer(tls=True)                           # TLS only, certificates made with openssl
    server.start(); server.url; server.stop(); server.start(); server.cleanup()

`stop(keep_data=True)` snapshots the data first, so the next `start()` comes back with it (a Redis
restart with persistence, or a network partition), instead of empty (the default, `--save ""`).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.exceptions import RedisError

HOST = "127.0.0.1"
DUMP_FILE = "dump.rdb"


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=companion test CA",
            "-keyout", str(ca_key), "-out", str(ca_cert))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(extensions), "-out", str(cert))  # fmt: skip
    return {"ca": ca_cert, "cert": cert, "key": key}


class RedisServer:
    def __init__(
        self,
        *,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        username: str | None = None,
        acl: Sequence[str] = (),
        tls: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        self.host = HOST
        self.port = free_port()
        self.password = password
        self.username = username
        self.tls = tls
        self.start_timeout = start_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="companion-redis-"))
        self.tls_files: dict[str, Path] = make_tls_files(self.directory) if tls else {}
        self._extra_args = list(extra_args)
        self._acl = list(acl)
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # --- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL for `make_client`: `redis://`, or `rediss://...?ssl_ca_certs=` with TLS; with
        credentials when the server requires them."""
        scheme = "rediss" if self.tls else "redis"
        credentials = ""
        if self.password is not None:
            user = urllib.parse.quote(self.username or "", safe="")
            credentials = f"{user}:{urllib.parse.quote(self.password, safe='')}@"
        url = f"{scheme}://{credentials}{self.host}:{self.port}/0"
        if self.tls:
            url += "?" + urllib.parse.urlencode({"ssl_ca_certs": str(self.tls_files["ca"])})
        return url

    def sync_client(self, **overrides: Any) -> redis.Redis:
        """A blocking client with admin rights on this server (for set-up and inspection)."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
        }
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls_files["ca"]))
        options.update(overrides)
        return redis.Redis(**options)

    # --- life cycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [
            "redis-server",
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--dbfilename", DUMP_FILE,
            "--logfile", "",
        ]  # fmt: skip
        if self.tls:
            command += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls_files["cert"]),
                "--tls-key-file", str(self.tls_files["key"]),
                "--tls-ca-cert-file", str(self.tls_files["ca"]),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        if self.password is not None and self.username is None:
            command += ["--requirepass", self.password]
        for rule in self._acl:
            command += ["--user", *rule.split()]
        return command + self._extra_args

    def start(self) -> None:
        """Start on this server's port (the same one every time) and return once it answers PING."""
        if self.running:
            return
        log = (self.directory / "redis.log").open("ab")
        try:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        client = self.sync_client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(RedisError, OSError):
                    if client.ping():
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self.start_timeout}s:\n{self.log_tail()}"
                    )
                time.sleep(0.005)  # polling, bounded by the deadline above
        finally:
            client.close()
        # A snapshot taken by stop(keep_data=True) is loaded once, not by every later start.
        (self.directory / DUMP_FILE).unlink(missing_ok=True)

    def stop(self, *, keep_data: bool = False) -> None:
        """Terminate the server and wait until it is gone (its port refuses connections).
        With `keep_data`, snapshot first so the next start() comes back with the same keys."""
        if not self.running:
            self._process = None
            return
        assert self._process is not None
        if keep_data:
            client = self.sync_client()
            try:
                client.save()
            finally:
                client.close()
        else:
            (self.directory / DUMP_FILE).unlink(missing_ok=True)
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.directory / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cleanup()
