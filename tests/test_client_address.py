"""Client addresses (issue 15, items 3 and 4): one switch decides whether any header may change the
address the per-address limits count, and only the documented trusted proxies may; an address over
its failed-authentication limit is refused before any key lookup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from companion.api.client_address import client_address
from companion.app import create_app
from companion.cli.main import server_options
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from tests.conftest import make_settings
from tests.support.api import assert_error
from tests.support.instances import statement_log
from tests.support.live import LiveServer

LIMIT = 3


@pytest.mark.parametrize(
    ("trust", "peer", "header", "expected"),
    [
        (False, "127.0.0.1", "203.0.113.9", "127.0.0.1"),
        (False, "10.0.0.5", "203.0.113.9, 10.0.0.5", "10.0.0.5"),
        (True, "127.0.0.1", "203.0.113.9", "203.0.113.9"),
        (True, "127.0.0.1", "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the client's own entry is skipped
        (True, "127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.7", "203.0.113.9"),  # past a trusted inner proxy
        (True, "127.0.0.1", "10.0.0.7", "10.0.0.7"),  # only proxies: the left-most
        (True, "198.51.100.1", "203.0.113.9", "198.51.100.1"),  # not through a trusted proxy: ignored
        (True, "127.0.0.1", None, "127.0.0.1"),
        (True, "127.0.0.1", " , ", "127.0.0.1"),
        (True, None, "203.0.113.9", "unknown"),
    ],
)
def test_client_address(trust: bool, peer: str | None, header: str | None, expected: str) -> None:
    assert client_address(peer, header, trust=trust, proxies="127.0.0.1, ::1, 10.0.0.0/8") == expected


def test_trusted_proxies_must_be_addresses(tmp_path: Path) -> None:
    from companion.errors import SettingsError

    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        make_settings("sqlite+aiosqlite:///x.db", tmp_path, trusted_proxies="127.0.0.1, not-an-address")


def test_serve_never_lets_uvicorn_rewrite_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # uvicorn reads this by itself
    for trust in (False, True):
        options = server_options(make_settings("sqlite+aiosqlite:///x.db", tmp_path, trust_forwarded_for=trust))
        assert options["proxy_headers"] is False


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[LiveServer, Services]]:
    """The app on uvicorn with exactly the options `companion serve` gives it."""
    options = server_options(settings)
    options.pop("log_level")
    live = LiveServer(create_app(settings, provider=ScriptedProvider()), **options)
    await live.start()
    try:
        yield live, live.app.state.services
    finally:
        await live.stop()


def _settings(database_url: str, tmp_path: Path, **overrides: object) -> Settings:
    return make_settings(
        database_url, tmp_path, rate_limit_enabled=True, rate_limit_auth_failures_per_minute=LIMIT, **overrides
    )


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.json()["error"]["code"] == "too_many_auth_failures"
    assert int(response.headers["Retry-After"]) >= 1


def _bad(forwarded: str | None = None) -> dict[str, str]:
    headers = {"Authorization": "Bearer cmp_not-a-real-key"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return headers


async def test_with_trust_off_no_header_buys_a_fresh_failed_auth_budget(database_url: str, tmp_path: Path) -> None:
    async with serving(_settings(database_url, tmp_path)) as (live, services):
        key = (await services.users.create("alice")).api_key
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
            for index in range(LIMIT):
                assert_error(await http.get("/v1/preferences", headers=_bad(f"203.0.113.{index}")), 401)
            _refused(await http.get("/v1/preferences", headers=_bad("203.0.113.77")))
            _refused(await http.get("/v1/preferences", headers=_bad()))
            # Over the limit, the address is refused whatever it presents (a good key too).
            good = await http.get(
                "/v1/preferences", headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": "192.0.2.1"}
            )
            _refused(good)


async def test_with_trust_on_only_a_trusted_proxy_sets_the_address(database_url: str, tmp_path: Path) -> None:
    settings = _settings(database_url, tmp_path, trust_forwarded_for=True, trusted_proxies="127.0.0.1")
    async with serving(settings) as (live, _), httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
        # The proxy (our peer, 127.0.0.1) appends the real client: each client has its own budget.
        for index in range(LIMIT + 2):
            assert_error(await http.get("/v1/preferences", headers=_bad(f"203.0.113.{index}")), 401)
        for _ in range(LIMIT - 1):
            assert_error(await http.get("/v1/preferences", headers=_bad("198.51.100.7")), 401)
        # Entries the client wrote itself (left of the proxy's) do not buy it a fresh budget.
        assert_error(await http.get("/v1/preferences", headers=_bad("6.6.6.6, 198.51.100.7")), 401)
        _refused(await http.get("/v1/preferences", headers=_bad("7.7.7.7, 198.51.100.7")))

    untrusted = _settings(database_url, tmp_path, trust_forwarded_for=True, trusted_proxies="10.9.9.9")
    async with serving(untrusted) as (live, _), httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
        # Our peer is not a trusted proxy: its header is its own word and changes nothing.
        for index in range(LIMIT):
            assert_error(await http.get("/v1/preferences", headers=_bad(f"203.0.113.{index}")), 401)
        _refused(await http.get("/v1/preferences", headers=_bad("203.0.113.99")))


async def test_an_address_over_its_limit_is_refused_before_any_key_lookup(database_url: str, tmp_path: Path) -> None:
    async with serving(_settings(database_url, tmp_path)) as (live, services):
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
            for _ in range(LIMIT):
                assert_error(await http.get("/v1/preferences", headers=_bad()), 401)
            with statement_log(services) as log:
                _refused(await http.get("/v1/preferences", headers=_bad()))
                assert log.touching("api_keys") == []
                # Another instance counted the failures (this one has not seen them): the shared
                # limiter is asked before the database.
                services.rate_limits._blocked.clear()
                _refused(await http.get("/v1/preferences", headers=_bad()))
                assert log.touching("api_keys") == []
                # The web sign-in too.
                services.rate_limits._blocked.clear()
                signed = await http.post("/web/session", json={"api_key": "cmp_still-not-a-key"})
                _refused(signed)
                assert log.touching("api_keys") == []
