"""`companion cache stats` and `companion cache invalidate` against a running service and a private
redis-server (never the shared one)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from companion.cache import keys
from companion.cli.cache import _redis_info
from companion.cli.main import app
from companion.cli.support import run
from companion.config import load_settings
from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import LocalCluster
from tests.test_cli import _server_in_thread

runner = CliRunner()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, enabled: bool = True) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("REDIS_ENABLED", "true" if enabled else "false")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")


def test_stats_and_invalidate_against_a_running_instance(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        tmp_path,
        redis_enabled=True,
        redis_url=redis_server.url,
        auto_migrate=True,
    )
    _env(monkeypatch, tmp_path, redis_server.url)
    admin = redis_server.sync_client()
    admin.set("someone-else:key", b"untouched")
    with _server_in_thread(settings, ScriptedProvider()) as (url, user):
        headers = {"Authorization": f"Bearer {user.api_key}"}
        for _ in range(3):
            assert httpx.get(f"{url}/v1/personalities/elara", headers=headers, timeout=10).status_code == 200
        personality_key = keys.personality(user.id, "elara")
        assert admin.exists(personality_key)

        result = runner.invoke(app, ["cache", "stats", "--url", url])
        assert result.exit_code == 0, result.output
        rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
        # One miss then two hits of the in-process L1: a 66.7% hit rate, beside Redis's own counters.
        assert rows["personality"][1:4] == ["2", "0", "1"] and rows["personality"][-1] == "66.7%"
        assert "keyspace_hits" in result.output and "used_memory" in result.output

        result = runner.invoke(app, ["cache", "invalidate", "personality", "elara"])
        assert result.exit_code == 0, result.output
        assert "Invalidated 1 Redis entries" in result.output
        assert not admin.exists(personality_key)

        # Cache something in every namespace again: the personality, the preferences, the API key.
        assert httpx.get(f"{url}/v1/personalities/elara", headers=headers, timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/preferences", headers=headers, timeout=10).status_code == 200
        cached = {
            namespace: sorted(admin.scan_iter(match=keys.namespace_pattern(namespace)))
            for namespace in ("personality", "prefs", "apikey")
        }
        assert cached["personality"] == [personality_key.encode()]
        assert cached["prefs"] == [keys.preferences(user.id).encode()]
        assert len(cached["apikey"]) == 1, cached
        result = runner.invoke(app, ["cache", "invalidate", "--all"])
        assert result.exit_code == 0, result.output
        assert "Invalidated 3 Redis entries" in result.output, result.output
        assert not any(admin.exists(key) for found in cached.values() for key in found)
        assert admin.get("someone-else:key") == b"untouched"  # our prefix only, never FLUSHDB
    admin.close()


def test_invalidate_refuses_bad_arguments_and_explains_disabled_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, tmp_path, redis_server.url)
    for args in (["bogus"], ["personality", "a:*"], ["prefs", "elara"], []):
        result = runner.invoke(app, ["cache", "invalidate", *args])
        assert result.exit_code == 2, (args, result.output)
    _env(monkeypatch, tmp_path, redis_server.url, enabled=False)
    result = runner.invoke(app, ["cache", "invalidate", "--all"])
    assert result.exit_code == 2 and "Redis is disabled" in result.output


def test_commands_explain_an_unreachable_service_or_redis(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, tmp_path, redis_server.url)
    redis_server.stop()
    result = runner.invoke(app, ["cache", "invalidate", "--all"])
    assert result.exit_code == 1 and "cannot reach Redis" in result.output
    result = runner.invoke(app, ["cache", "stats", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "is the service running" in result.output


def test_stats_and_invalidate_cover_every_primary_of_a_cluster(
    redis_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster the CLI visits every primary: Redis's counters are summed over the three, and
    an invalidation deletes matching entries wherever their slot lives."""
    redis_cluster.heal()
    redis_cluster.flush()
    _env(monkeypatch, tmp_path, redis_cluster.url)
    monkeypatch.setenv("REDIS_MODE", "auto")  # detected from the server
    users = [uuid.uuid4() for _ in range(60)]
    admin = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.primary_ports()[0])
    try:
        for user in users:
            admin.set(keys.personality(user, "elara"), b"{}")
            admin.set(keys.preferences(user), b"{}")
        buffer = keys.conversation_buffer(uuid.uuid4())
        admin.set(buffer, b"[]")  # durable state, never a cached namespace
        assert all(client.dbsize() > 0 for client in redis_cluster.primary_clients())

        result = runner.invoke(app, ["cache", "stats", "--url", "http://127.0.0.1:9"])
        assert result.exit_code != 0  # no instance there: says so, and exits non-zero
        result = runner.invoke(app, ["cache", "invalidate", "personality", "elara"])
        assert result.exit_code == 0, result.output
        assert "Invalidated 60 Redis entries" in result.output
        assert not any(admin.exists(keys.personality(user, "elara")) for user in users)
        result = runner.invoke(app, ["cache", "invalidate", "--all"])
        assert result.exit_code == 0, result.output
        assert "Invalidated 60 Redis entries" in result.output
        assert admin.exists(buffer) and sum(client.dbsize() for client in redis_cluster.primary_clients()) == 1
    finally:
        admin.close()


def test_redis_info_sums_every_primary_of_a_cluster(
    redis_cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_cluster.heal()
    _env(monkeypatch, tmp_path, redis_cluster.url)
    monkeypatch.setenv("REDIS_MODE", "cluster")
    info = run(_redis_info(load_settings()))
    assert info is not None and info["primaries"] == 3
    memory = [int(client.info("memory")["used_memory"]) for client in redis_cluster.primary_clients()]
    assert int(str(info["used_memory"])) > max(memory)  # the sum over the three, not one of them
