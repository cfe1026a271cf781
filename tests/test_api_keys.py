"""API keys have a lifecycle: several named keys per user, listed with when they were created and
last used, created and revoked over HTTP and with `companion users keys`. A revoked key is refused at
once, on every instance, and the sessions made from it end with it; a user's last key cannot be
revoked by accident; the last-used time is not a database write per request."""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from companion.cli.main import app as cli
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from tests.conftest import make_settings
from tests.support.api import assert_error, running_server
from tests.support.instances import running_instances, served_within, statement_log
from tests.support.live import LiveServer
from tests.support.redis_proc import RedisProcess, running_redis


def _bearer(server: LiveServer, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


async def _new_key(client: httpx.AsyncClient, name: str) -> tuple[str, dict[str, Any]]:
    response = await client.post("/v1/api-keys", json={"name": name})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["api_key"], body["key"]


async def test_a_user_has_several_named_keys_and_revokes_one_for_good(
    server: LiveServer, client: httpx.AsyncClient, app_services: Services
) -> None:
    listed = await client.get("/v1/api-keys")
    assert listed.status_code == 200, listed.text
    [first] = listed.json()
    assert first["name"] == "default" and first["current"] is True and first["revoked_at"] is None
    assert first["last_used_at"] is not None  # this very request, flushed before listing
    assert "key_hash" not in first and "api_key" not in first

    laptop_key, laptop = await _new_key(client, "laptop")
    assert laptop_key.startswith("cmp_") and laptop["name"] == "laptop" and laptop["current"] is False
    async with _bearer(server, laptop_key) as as_laptop:
        assert (await as_laptop.get("/v1/preferences")).status_code == 200
        names = [(k["name"], k["current"]) for k in (await as_laptop.get("/v1/api-keys")).json()]
        assert names == [("default", False), ("laptop", True)]

        assert (await client.delete(f"/v1/api-keys/{laptop['id']}")).status_code == 204
        assert_error(await as_laptop.get("/v1/preferences"), 401, "invalid_api_key")
        [_, revoked] = (await client.get("/v1/api-keys")).json()
        assert revoked["revoked_at"] is not None
        # Revoked already: not found among the active keys, nothing happens twice.
        assert_error(await client.delete(f"/v1/api-keys/{laptop['id']}"), 404, "api_key_not_found")


async def test_the_last_active_key_cannot_be_revoked_through_the_api(client: httpx.AsyncClient) -> None:
    [only] = (await client.get("/v1/api-keys")).json()
    assert_error(await client.delete(f"/v1/api-keys/{only['id']}"), 409, "last_api_key")
    assert (await client.get("/v1/preferences")).status_code == 200


async def test_a_key_can_revoke_itself_when_another_stays(server: LiveServer, client: httpx.AsyncClient) -> None:
    [old] = (await client.get("/v1/api-keys")).json()
    new_key, _ = await _new_key(client, "rotated")
    assert (await client.delete(f"/v1/api-keys/{old['id']}")).status_code == 204
    assert_error(await client.get("/v1/api-keys"), 401)
    async with _bearer(server, new_key) as rotated:
        assert (await rotated.get("/v1/preferences")).status_code == 200


async def test_another_users_key_is_not_found(server: LiveServer, client: httpx.AsyncClient) -> None:
    await _new_key(client, "spare")
    [mine, _] = (await client.get("/v1/api-keys")).json()
    async with await _other(server) as bob:
        assert_error(await bob.delete(f"/v1/api-keys/{mine['id']}"), 404, "api_key_not_found")
        assert_error(await bob.delete(f"/v1/api-keys/{uuid.uuid4()}"), 404, "api_key_not_found")
        assert [k["name"] for k in (await bob.get("/v1/api-keys")).json()] == ["default"]
    assert (await client.get("/v1/preferences")).status_code == 200


async def _other(server: LiveServer) -> httpx.AsyncClient:
    services: Services = server.app.state.services
    return _bearer(server, (await services.users.create("bob")).api_key)


async def test_keys_are_managed_with_a_key_not_a_session(server: LiveServer, client: httpx.AsyncClient) -> None:
    token = (await client.post("/v1/sessions")).json()["token"]
    async with _bearer(server, token) as as_session:
        assert (await as_session.get("/v1/preferences")).status_code == 200
        assert_error(await as_session.get("/v1/api-keys"), 403, "api_key_required")
        assert_error(await as_session.post("/v1/api-keys", json={"name": "x"}), 403, "api_key_required")
    assert len((await client.get("/v1/api-keys")).json()) == 1


async def test_bad_names_and_too_many_keys_are_clear_errors(
    database_url: str, tmp_path: Path, provider: ScriptedProvider
) -> None:
    settings = make_settings(database_url, tmp_path, api_keys_max_per_user=2)
    async with running_server(settings, provider) as server:
        key = (await server.app.state.services.users.create("alice")).api_key
        async with _bearer(server, key) as client:
            assert_error(await client.post("/v1/api-keys", json={"name": ""}), 422)
            assert_error(await client.post("/v1/api-keys", json={"name": "x" * 101}), 422)
            assert_error(await client.post("/v1/api-keys", json={"name": "   "}), 422)
            await _new_key(client, "second")
            assert_error(await client.post("/v1/api-keys", json={"name": "third"}), 409, "too_many_api_keys")
            assert len((await client.get("/v1/api-keys")).json()) == 2


async def test_sessions_made_from_a_revoked_key_end_with_it(
    server: LiveServer, client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    other_key, other = await _new_key(client, "tablet")
    async with _bearer(server, other_key) as as_other:
        made = (await as_other.post("/v1/sessions")).json()
        assert made["session"]["api_key_id"] == other["id"]
        # A session made from that session inherits its key.
        async with _bearer(server, made["token"]) as as_session:
            child = (await as_session.post("/v1/sessions")).json()
            assert child["session"]["api_key_id"] == other["id"]
        # The web page's cookie session, signed in with that key.
        signed_in = await anon.post("/web/session", json={"api_key": other_key})
        assert signed_in.status_code == 200, signed_in.text
        own_session = (await client.post("/v1/sessions")).json()

        assert (await client.delete(f"/v1/api-keys/{other['id']}")).status_code == 204

    for token in (made["token"], child["token"]):
        async with _bearer(server, token) as as_session:
            assert_error(await as_session.get("/v1/preferences"), 401, "invalid_session")
    assert_error(await anon.get("/web/session"), 401, "invalid_session")
    assert_error(await anon.get("/v1/preferences"), 401, "invalid_session")  # the cookie
    # Sessions made from the key that stays are untouched, and the ended ones are no longer listed.
    assert [s["id"] for s in (await client.get("/v1/sessions")).json()] == [own_session["session"]["id"]]
    async with _bearer(server, own_session["token"]) as as_own:
        assert (await as_own.get("/v1/preferences")).status_code == 200


async def test_last_used_is_recorded_without_a_write_per_request(
    client: httpx.AsyncClient, app_services: Services, api_key: str
) -> None:
    assert (await client.get("/v1/preferences")).status_code == 200
    with statement_log(app_services) as log:
        for _ in range(20):
            assert (await client.get("/v1/preferences")).status_code == 200
        assert not [s for s in log.touching("api_keys") if s.lstrip().upper().startswith("UPDATE")]
        await app_services.users.flush_last_used()
        assert len([s for s in log.touching("api_keys") if s.lstrip().upper().startswith("UPDATE")]) == 1
    [key] = await app_services.users.list_keys(await app_services.users.authenticate(api_key))
    assert key.last_used_at is not None


async def test_a_key_revoked_on_one_instance_is_refused_by_another_within_a_second(
    database_url: str, tmp_path: Path
) -> None:
    async with running_redis(tmp_path / "redis") as redis_server:
        await _revoked_across_instances(database_url, tmp_path, redis_server)


async def _revoked_across_instances(database_url: str, tmp_path: Path, redis_server: RedisProcess) -> None:
    settings = make_settings(database_url, tmp_path, redis_enabled=True, redis_url=redis_server.url)
    async with running_instances(settings) as (a, b), AsyncExitStack() as stack:
        await a.wait_channel_connected()
        await b.wait_channel_connected()
        main_key = (await a.services.users.create("alice")).api_key
        ca = await stack.enter_async_context(a.client(main_key))
        leaked_key, leaked = await _new_key(ca, "leaked")
        cb = await stack.enter_async_context(b.client(leaked_key))
        # B knows the key: it is in B's L1 now, so only an invalidation can make B refuse it.
        assert (await cb.get("/v1/preferences")).status_code == 200
        l1_before = b.services.cache.stats["apikey"].l1_hits
        assert (await cb.get("/v1/preferences")).status_code == 200
        assert b.services.cache.stats["apikey"].l1_hits > l1_before

        loop = asyncio.get_running_loop()
        revoked = await ca.delete(f"/v1/api-keys/{leaked['id']}")
        assert revoked.status_code == 204, revoked.text
        elapsed = await served_within(
            lambda: cb.get("/v1/preferences"), lambda r: r.status_code == 401, started=loop.time()
        )
        print(f"revoked key refused by the other instance after {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0, elapsed


# --- the CLI --------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "LLM_PROVIDER": "scripted",
        "ENVIRONMENT": "test",
        "REDIS_ENABLED": "false",
        "AUTO_MIGRATE": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _invoke(*args: str) -> Any:
    result = runner.invoke(cli, list(args))
    return result


def test_users_keys_list_create_revoke(cli_env: None) -> None:
    created = _invoke("users", "create", "carol", "--json")
    assert created.exit_code == 0, created.output
    user_id = json.loads(created.output)["id"]

    made = _invoke("users", "keys", "create", user_id, "--name", "ci", "--json")
    assert made.exit_code == 0, made.output
    ci = json.loads(made.output)
    assert ci["name"] == "ci" and ci["api_key"].startswith("cmp_")

    listed = _invoke("users", "keys", "list", user_id, "--json")
    assert listed.exit_code == 0, listed.output
    keys = json.loads(listed.output)
    assert [k["name"] for k in keys] == ["default", "ci"]
    assert all("api_key" not in k and "key_hash" not in k for k in keys)
    table = _invoke("users", "keys", "list", user_id)
    assert "ci" in table.output and "never" in table.output

    assert _invoke("users", "keys", "revoke", user_id, ci["id"]).exit_code == 0
    default_id = keys[0]["id"]
    refused = _invoke("users", "keys", "revoke", user_id, default_id)
    assert refused.exit_code == 1 and "--allow-last" in refused.output
    forced = _invoke("users", "keys", "revoke", user_id, default_id, "--allow-last")
    assert forced.exit_code == 0, forced.output
    after = json.loads(_invoke("users", "keys", "list", user_id, "--json").output)
    assert all(k["revoked_at"] for k in after)
    assert _invoke("users", "keys", "revoke", user_id, "not-a-uuid").exit_code == 2
    assert _invoke("users", "keys", "list", str(uuid.uuid4())).exit_code == 1
