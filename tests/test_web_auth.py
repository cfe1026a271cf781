"""The web page's cookie session over plain HTTP: the page and its headers, signing in (cookie
flags, wrong keys, other origins, throttling), CSRF on every cookie-authenticated change, bearer
clients unaffected, and sign-out revoking the session on the server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings
from tests.support.api import assert_error, running_server
from tests.support.live import LiveServer

COOKIE = "companion_session"


@asynccontextmanager
async def signed_in(server: LiveServer, api_key: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A browser-like client holding the session cookie, and its CSRF token."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.post("/web/session", json={"api_key": api_key})
        assert response.status_code == 200, response.text
        assert http.cookies.get(COOKIE, "").startswith("cms_")
        yield http, response.json()["csrf_token"]


def _set_cookie(response: httpx.Response) -> dict[str, str]:
    """The attributes of the session cookie the response sets (names lower-cased)."""
    header = next(h for h in response.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}="))
    name_value, *attributes = [part.strip() for part in header.split(";")]
    parsed = {"value": name_value.split("=", 1)[1]}
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        parsed[key.lower()] = value
    return parsed


async def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy(anon: httpx.AsyncClient):
    page = await anon.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy, policy
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    # Nothing from another origin (the machines are offline) and no inline script or style.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    assert not re.search(r"<script>|<style|\sstyle=|\son\w+=", page.text)

    for path, kind in [
        ("/static/app.js", "javascript"),
        ("/static/app.css", "text/css"),
        ("/static/icon.svg", "image/svg+xml"),
    ]:
        response = await anon.get(path)
        assert response.status_code == 200, path
        assert kind in response.headers["content-type"], (path, response.headers["content-type"])
        assert response.headers["content-security-policy"] == policy
    assert_error(await anon.get("/static/missing.js"), 404)
    assert (await anon.get("/static/../app.py")).status_code == 404


def test_the_page_files_ship_inside_the_package():
    static = Path(__import__("companion.web", fromlist=["_"]).__file__).parent / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "app.css", "icon.svg"}
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"web/static/*"' in pyproject


async def test_signing_in_sets_an_httponly_samesite_cookie_and_returns_a_csrf_token(
    anon: httpx.AsyncClient, api_key: str
):
    response = await anon.post("/web/session", json={"api_key": api_key})
    assert response.status_code == 200, response.text
    cookie = _set_cookie(response)
    assert cookie["value"].startswith("cms_")
    assert "httponly" in cookie and cookie["samesite"].lower() == "strict" and cookie["path"] == "/"
    assert "secure" not in cookie  # SESSION_COOKIE_SECURE is off by default (plain local http)
    assert int(cookie["max-age"]) == 43200
    body = response.json()
    assert set(body) == {"user_id", "session_id", "csrf_token", "expires_in"}
    token = body["csrf_token"]
    assert isinstance(token, str) and len(token) >= 32, token  # unguessable
    assert cookie["value"] not in response.text  # the token only travels in the HttpOnly cookie
    assert token not in cookie["value"]

    again = await anon.get("/web/session")
    assert again.status_code == 200
    assert again.json()["csrf_token"] == token  # the same for the whole session
    assert _set_cookie(again)["value"] == cookie["value"]  # renewed on each page load
    # ... and it is what a change made with the cookie needs (which other tokens do not do:
    # test_cookie_requests_read_freely_but_every_change_needs_the_csrf_token).
    put = await anon.put("/v1/preferences", json={"preferred_name": "Ana"}, headers={"X-CSRF-Token": token})
    assert put.status_code == 200, put.text

    # A new session (signing in again) gets a token of its own.
    second = await anon.post("/web/session", json={"api_key": api_key})
    assert second.status_code == 200 and second.json()["csrf_token"] not in (token, "")


async def test_the_cookie_is_secure_when_configured(settings: Settings, tmp_path: Path, provider: ScriptedProvider):
    secure = make_settings(settings.database_url.get_secret_value(), tmp_path, session_cookie_secure=True)
    async with running_server(secure, provider) as server:
        key = (await server.app.state.services.users.create("ana")).api_key
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            response = await http.post("/web/session", json={"api_key": key})
            assert response.status_code == 200
            assert "secure" in _set_cookie(response)
            signed_out = await http.post("/web/signout")
            assert "secure" in _set_cookie(signed_out)


async def test_no_session_cookie_means_not_signed_in(anon: httpx.AsyncClient):
    assert_error(await anon.get("/web/session"), 401, "invalid_session")
    anon.cookies.set(COOKIE, "cms_forged.0123456789abcdef.secret")
    assert_error(await anon.get("/web/session"), 401, "invalid_session")
    assert_error(await anon.get("/v1/personalities"), 401, "invalid_session")


@pytest.mark.parametrize(
    "body",
    [{"api_key": "cmp_not-a-real-key"}, {"api_key": "cms_0.0.0"}, {"api_key": " "}],
    ids=["unknown-key", "session-token-format", "blank"],
)
async def test_a_wrong_key_does_not_sign_in(anon: httpx.AsyncClient, body: dict[str, str]):
    response = await anon.post("/web/session", json=body)
    assert_error(response, 401)
    assert COOKIE not in response.headers.get("set-cookie", "")


async def test_a_malformed_sign_in_is_422(anon: httpx.AsyncClient):
    assert_error(await anon.post("/web/session", json={}), 422)
    assert_error(await anon.post("/web/session", json={"api_key": "x", "extra": 1}), 422)
    # A cross-site form can only send form or plain-text bodies; neither is accepted.
    assert_error(
        await anon.post("/web/session", content=b'{"api_key": "x"}', headers={"content-type": "text/plain"}), 422
    )


async def test_signing_in_from_another_origin_is_refused(server: LiveServer, anon: httpx.AsyncClient, api_key: str):
    response = await anon.post("/web/session", json={"api_key": api_key}, headers={"Origin": "http://evil.example"})
    assert_error(response, 403, "cross_origin")
    assert COOKIE not in response.headers.get("set-cookie", "")
    same = await anon.post("/web/session", json={"api_key": api_key}, headers={"Origin": server.base_url})
    assert same.status_code == 200


async def test_failed_sign_ins_are_throttled_per_address(
    settings: Settings, tmp_path: Path, provider: ScriptedProvider
):
    limited = make_settings(
        settings.database_url.get_secret_value(),
        tmp_path,
        rate_limit_enabled=True,
        rate_limit_auth_failures_per_minute=3,
    )
    async with running_server(limited, provider) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        statuses = [(await http.post("/web/session", json={"api_key": "cmp_wrong"})).status_code for _ in range(6)]
        assert statuses[:3] == [401, 401, 401]
        assert 429 in statuses[3:], statuses


async def test_cookie_requests_read_freely_but_every_change_needs_the_csrf_token(server: LiveServer, api_key: str):
    # A second session of the same user: its token is no good for the first.
    async with signed_in(server, api_key) as (http, csrf), signed_in(server, api_key) as (_, other_csrf):
        assert (await http.get("/v1/personalities")).status_code == 200
        assert (await http.get("/v1/conversations")).status_code == 200

        changes = [
            ("POST", "/v1/conversations", {"personality": "elara"}),
            ("PUT", "/v1/preferences", {"preferred_name": "Mallory"}),
            ("POST", "/v1/personalities", {"name": "evil", "description": "d", "system_prompt": "p"}),
            ("POST", "/v1/memories", {"text": "I am a forged memory."}),
            ("DELETE", "/v1/memories", None),
            ("POST", "/v1/chat/completions", {"model": "elara", "messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/v1/sessions", None),
        ]
        for method, path, body in changes:
            for headers in (
                {},
                {"X-CSRF-Token": "0" * 64},
                {"X-CSRF-Token": other_csrf},
                {"X-CSRF-Token": "ü".encode()},
            ):
                response = await http.request(method, path, json=body, headers=headers)
                error = assert_error(response, 403, "csrf_token_invalid")
                assert "X-CSRF-Token" in error["message"], (method, path)
        # None of them did anything.
        assert (await http.get("/v1/conversations")).json()["data"] == []
        assert (await http.get("/v1/preferences")).json()["preferred_name"] is None
        assert [p["name"] for p in (await http.get("/v1/personalities")).json() if p["scope"] == "user"] == []
        assert (await http.get("/v1/memories")).json()["data"] == []

        created = await http.post("/v1/conversations", json={"personality": "elara"}, headers={"X-CSRF-Token": csrf})
        assert created.status_code == 201, created.text
        put = await http.put("/v1/preferences", json={"preferred_name": "Ana"}, headers={"X-CSRF-Token": csrf})
        assert put.status_code == 200 and put.json()["preferred_name"] == "Ana"


async def test_bearer_clients_need_no_csrf_token_and_win_over_a_cookie(
    server: LiveServer, client: httpx.AsyncClient, api_key: str
):
    assert (await client.post("/v1/conversations", json={"personality": "elara"})).status_code == 201
    # A session token sent as a bearer is not ambient authority either.
    session = await client.post("/v1/sessions")
    token = session.json()["token"]
    async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}) as bearer:
        bearer.cookies.set(COOKIE, "cms_forged.0123456789abcdef.secret")  # ignored: the header wins
        assert (await bearer.post("/v1/conversations", json={"personality": "orion"})).status_code == 201
    assert len((await client.get("/v1/conversations")).json()["data"]) == 2


async def test_signing_out_revokes_the_session_and_drops_the_cookie(
    server: LiveServer, client: httpx.AsyncClient, api_key: str
):
    async with signed_in(server, api_key) as (http, csrf):
        token = http.cookies[COOKIE]
        assert len((await client.get("/v1/sessions")).json()) == 1

        assert_error(await http.post("/web/signout"), 403, "csrf_token_invalid")
        assert (await http.get("/v1/personalities")).status_code == 200  # still signed in

        response = await http.post("/web/signout", headers={"X-CSRF-Token": csrf})
        assert response.status_code == 204
        assert _set_cookie(response)["max-age"] == "0"
        assert COOKIE not in http.cookies

        assert (await client.get("/v1/sessions")).json() == []
        async with httpx.AsyncClient(base_url=server.base_url) as stale:
            stale.cookies.set(COOKIE, token)
            assert_error(await stale.get("/v1/personalities"), 401, "invalid_session")
            assert_error(await stale.get("/web/session"), 401, "invalid_session")
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}) as bearer:
            assert_error(await bearer.get("/v1/personalities"), 401, "invalid_session")
        # Signing out again, or without any session, is harmless.
        assert (await http.post("/web/signout")).status_code == 204


async def test_a_session_revoked_elsewhere_ends_the_page_session(
    server: LiveServer, client: httpx.AsyncClient, api_key: str
):
    async with signed_in(server, api_key) as (http, _):
        session_id = (await client.get("/v1/sessions")).json()[0]["id"]
        assert (await client.delete(f"/v1/sessions/{session_id}")).status_code == 204
        assert_error(await http.get("/v1/personalities"), 401, "invalid_session")
        assert_error(await http.get("/web/session"), 401, "invalid_session")
