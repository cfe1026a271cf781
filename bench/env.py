"""What a benchmark run stands on: its own PostgreSQL database (created, migrated, dropped at the
end), a private redis-server on a free loopback port (stopped at the end), settings pointing at
both, and a description of the machine and the versions in use.

Nothing here touches the shared Redis on 6379 or another database: the run can go alongside the
test suite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType

import asyncpg
import redis.asyncio as aioredis

from companion.config import Settings, load_settings
from companion.services import Services
from companion.storage import migrate
from companion.storage.database import Database

DEFAULT_PG_ADMIN_DSN = os.environ.get("COMPANION_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark process dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """redis-server on a free loopback port, without persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("error: redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # prctl only, before exec
        )
        client = aioredis.Redis(port=self.port, socket_timeout=1)
        try:
            for _ in range(500):
                with contextlib.suppress(OSError, aioredis.RedisError):
                    if await client.ping():
                        return
                if self._process.poll() is not None:
                    raise SystemExit(f"error: redis-server exited at start-up (see {self.directory / 'redis.log'})")
                await asyncio.sleep(0.01)
            raise SystemExit("error: the private redis-server did not answer PING within 5 s")
        finally:
            await client.aclose()

    def stop(self) -> None:
        process, self._process = self._process, None
        end_process(process, grace_seconds=10)


def end_process(process: subprocess.Popen[bytes] | None, *, grace_seconds: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_seconds`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class BenchEnv:
    """`async with BenchEnv() as env:` a migrated database and a private Redis for one run."""

    pg_admin_dsn: str = DEFAULT_PG_ADMIN_DSN
    database_name: str = field(default_factory=lambda: f"companion_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="companion-bench-")))
    redis: PrivateRedis | None = None
    _services: list[Services] = field(default_factory=list)
    postgres_version: str = "?"
    redis_version: str = "?"

    @property
    def database_url(self) -> str:
        base = self.pg_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        return f"{base}/{self.database_name}"

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    async def __aenter__(self) -> BenchEnv:
        try:
            admin = await asyncpg.connect(self.pg_admin_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError) as error:
            raise SystemExit(f"error: PostgreSQL is not reachable at {self.pg_admin_dsn} ({error})") from None
        try:
            self.postgres_version = str(await admin.fetchval("SHOW server_version"))
            for (stale,) in await admin.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'companion_bench_%'"):
                if not _owner_alive(stale):  # left by a run that crashed
                    await admin.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{self.database_name}"')
        finally:
            await admin.close()
        try:
            database = Database(self.database_url)
            try:
                await migrate.upgrade(database)
            finally:
                await database.dispose()
            self.redis = PrivateRedis(self.workdir / "redis")
            await self.redis.start()
            client = aioredis.Redis.from_url(self.redis.url)
            try:
                self.redis_version = str((await client.info("server")).get("redis_version", "?"))
            finally:
                await client.aclose()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        for services in self._services:
            with contextlib.suppress(Exception):
                await services.aclose()
        self._services.clear()
        if self.redis is not None:
            self.redis.stop()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            admin = await asyncpg.connect(self.pg_admin_dsn, timeout=5)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
            finally:
                await admin.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def settings(self, *, redis: bool, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "_env_file": None,  # a developer's .env must not change what is measured
            "database_url": self.database_url,
            "data_dir": self.workdir,
            "llm_provider": "scripted",
            "auto_migrate": False,
            "redis_enabled": redis,
            "redis_url": self.redis_url,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return load_settings(**values)

    def server_environment(self, *, redis: bool = True, **overrides: str) -> dict[str, str]:
        """Environment variables for a `companion` server subprocess using this run's backends."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "REDIS_", "DATABASE_", "RATE_LIMIT_"))}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_ENABLED="true" if redis else "false",
            REDIS_URL=self.redis_url,
            LLM_PROVIDER="scripted",
            AUTO_MIGRATE="false",
            LOG_LEVEL="WARNING",
            DATA_DIR=str(self.workdir),
        )
        env.update(overrides)
        return env

    async def services(self, *, redis: bool, **overrides: object) -> Services:
        """A started service container (no model loaded), closed with the environment."""
        services = Services.build(self.settings(redis=redis, **overrides))
        self._services.append(services)
        await services.start(load_model=False)
        return services

    async def close_services(self, services: Services) -> None:
        if services in self._services:
            self._services.remove(services)
        await services.aclose()


def _owner_alive(database: str) -> bool:
    """`companion_bench_<pid>_<suffix>`: whether process <pid> still runs."""
    try:
        os.kill(int(database.split("_")[2]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    return {
        "CPU": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "load average (1 min) at the end": f"{os.getloadavg()[0]:.2f} (other work on the machine shares its cores)",
    }


VERSIONED = (
    ("SQLAlchemy", "sqlalchemy"),
    ("asyncpg", "asyncpg"),
    ("redis-py", "redis"),
    ("hiredis", "hiredis"),
    ("limits", "limits"),
    ("FastAPI", "fastapi"),
    ("uvicorn", "uvicorn"),
    ("uvloop", "uvloop"),
    ("xllamacpp (llama.cpp)", "xllamacpp"),
    ("onnxruntime", "onnxruntime"),
    ("numpy", "numpy"),
    ("matplotlib", "matplotlib"),
)


def versions(env: BenchEnv | None) -> dict[str, str]:
    found: dict[str, str] = {}
    if env is not None:
        found["PostgreSQL server"] = env.postgres_version
        found["Redis server"] = env.redis_version
    for label, distribution in VERSIONED:
        try:
            found[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[label] = "not installed"
    wrk = shutil.which("wrk")
    if wrk:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=5)
            found["wrk"] = (out.stdout or out.stderr).split("[")[0].replace("wrk", "").strip() or "installed"
    else:
        found["wrk"] = "not installed (Python load generator used)"
    return found
