"""A private PostgreSQL 16 with the pgvector extension, for the pgvector store's tests.

The machines' own PostgreSQL has no pgvector (Debian bookworm does not package it), so the server
comes from the PyPI package `pgserver`, which ships PostgreSQL's binaries with pgvector built in.
It runs on a free loopback port from a throw-away data directory, trust auth, and is stopped and
removed at the end. PostgreSQL refuses to run as root: as root, it runs as the `postgres` user."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.redis_proc import free_port


def _bin() -> Path:
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.origin is not None, "pgserver is a dev dependency: run scripts/bootstrap"
    return Path(spec.origin).parent / "pginstall" / "bin"


def _run(args: list[str], *, user: str | None) -> None:
    command = ["runuser", "-u", user, "--", *args] if user else args
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@contextlib.contextmanager
def pgvector_server() -> Iterator[str]:
    """Yields an admin URL, postgresql://postgres@127.0.0.1:PORT/postgres."""
    user = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="companion-pgvector-"))
    data = directory / "data"
    data.mkdir()
    if user:
        entry = pwd.getpwnam(user)
        for path in (directory, data):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    binaries = _bin()
    try:
        _run([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"], user=user)
        _run(
            [
                str(binaries / "pg_ctl"),
                "-D", str(data),
                "-l", str(directory / "server.log"),
                "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off",
                "-w", "start",
            ],
            user=user,
        )  # fmt: skip
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user=user)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
