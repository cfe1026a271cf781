"""Rate limits through the real app on uvicorn, with the limits kept in the private Redis or in
process: the 429 body and headers (IETF RateLimit draft-09) on the native API and on the OpenAI-
compatible route (which the stock openai client turns into RateLimitError), RateLimit headers on
successful responses, per-route overrides, recovery, failed authentications per address, the per-IP
limit on unauthenticated routes with /health and /metrics exempt, a Redis outage (fail-open on the
in-process limiter, or 503 with RATE_LIMIT_FAIL_CLOSED), and the Prometheus counters."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request

from companion.api.deps import client_ip
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.ratelimit.limiter import MemoryRateLimiter
from companion.ratelimit.policy import RateLimited, RateLimitService
from companion.services import Services
from tests.conftest import make_settings
from tests.ratelimit.conftest import FakeClock
from tests.support.api import assert_error, running_server
from tests.support.instances import metric_value
from tests.support.live import LiveServer
from tests.support.redis_proc import RedisProcess

RATE_LIMIT_FIELDS = {"message", "type", "code", "param", "retry_after", "limit"}
PER_MINUTE = 3
CHAT_ROUTE = "POST /v1/chat/completions"


def limit_settings(
    limiter_mode: str, url: str, tmp_path: Path, request: pytest.FixtureRequest, **extra: Any
) -> Settings:
    values: dict[str, Any] = {"rate_limit_enabled": True, "rate_limit_requests_per_minute": PER_MINUTE}
    if limiter_mode == "redis":
        values.update(redis_enabled=True, redis_url=request.getfixturevalue("redis_url"))
    values.update(extra)
    return make_settings(url, tmp_path, **values)


@dataclass
class App:
    server: LiveServer
    provider: ScriptedProvider

    @property
    def services(self) -> Services:
        return self.server.app.state.services

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def client(self, api_key: str | None = None, **headers: str) -> httpx.AsyncClient:
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)

    async def metric(self, sample: str, **labels: str) -> float:
        async with self.client() as http:
            response = await http.get("/metrics")
        assert response.status_code == 200, response.text
        return metric_value(response.text, sample, **labels)


@asynccontextmanager
async def start_app(settings: Settings) -> AsyncIterator[App]:
    provider = ScriptedProvider()
    async with running_server(settings, provider) as server:
        yield App(server, provider)


@pytest.fixture
async def app(limiter_mode: str, sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    settings = limit_settings(
        limiter_mode,
        sqlite_url,
        tmp_path,
        request,
        rate_limit_route_overrides={CHAT_ROUTE: 2},
        rate_limit_ip_requests_per_minute=3,
        rate_limit_auth_failures_per_minute=3,
    )
    async with start_app(settings) as running:
        yield running


@pytest.fixture
async def user(app: App) -> tuple[uuid.UUID, str]:
    created = await app.services.users.create("limited")
    return created.id, created.api_key


def assert_rate_limited(
    response: httpx.Response, *, policy: str = "user", limit: int = PER_MINUTE, code: str = "rate_limit_exceeded"
) -> dict[str, Any]:
    """429 with the one error shape plus `retry_after` and `limit`, and the headers that go with it."""
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == RATE_LIMIT_FIELDS, error
    assert error["type"] == "rate_limit_error" and error["code"] == code and error["param"] is None, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["retry_after"], int | float) and error["retry_after"] > 0, error
    assert error["limit"] == {"policy": policy, "limit": limit, "window_seconds": 60}, error
    retry_after = int(response.headers["Retry-After"])
    assert retry_after == max(math.ceil(error["retry_after"]), 1), (retry_after, error)
    assert response.headers["RateLimit-Policy"] == f'"{policy}";q={limit};w=60'
    assert re.fullmatch(rf'"{re.escape(policy)}";r=0;t=\d+', response.headers["RateLimit"]), response.headers
    assert 0 < reset_of(response) <= 60
    return error


def remaining_of(response: httpx.Response) -> int:
    match = re.fullmatch(r'"[^"]+";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    assert match, response.headers["RateLimit"]
    return int(match.group(1))


def reset_of(response: httpx.Response) -> int:
    match = re.fullmatch(r'"[^"]+";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    assert match, response.headers["RateLimit"]
    return int(match.group(2))


# --- the per-user limit ----------------------------------------------------------------------------


async def test_over_the_user_limit_the_native_api_answers_429(app: App, user: tuple[uuid.UUID, str]):
    async with app.client(user[1]) as http:
        answers = [await http.get("/v1/personalities") for _ in range(PER_MINUTE)]
        refused = await http.get("/v1/personalities")
        also_refused = await http.post("/v1/conversations", json={"personality": "elara"})
    assert [r.status_code for r in answers] == [200] * PER_MINUTE
    # Draft-09 structured fields on every successful response: the quota counts down, and `t` is
    # the time until it is whole again (one 20 s emission interval per request spent).
    assert [r.headers["RateLimit-Policy"] for r in answers] == [f'"user";q={PER_MINUTE};w=60'] * PER_MINUTE
    assert [remaining_of(r) for r in answers] == [2, 1, 0]
    assert [reset_of(r) for r in answers] in ([20, 40, 60], [20, 40, 59], [20, 39, 59])
    error = assert_rate_limited(refused)
    assert 19 <= error["retry_after"] <= 20  # the next cell, one emission interval after the first
    assert "3 per minute" in error["message"]
    assert_rate_limited(also_refused)
    assert (await app.services.conversations.list(user[0]))[0] == []  # the refused POST stored nothing


async def test_successful_responses_carry_ratelimit_headers(app: App, user: tuple[uuid.UUID, str]):
    async with app.client(user[1]) as http:
        created = await http.post("/v1/conversations", json={"personality": "elara"})
        assert created.status_code == 201, created.text
        assert created.headers["RateLimit"] == '"user";r=2;t=20'
        assert created.headers["RateLimit-Policy"] == '"user";q=3;w=60'
        conversation_id = created.json()["id"]
        # A streamed reply: the headers are on the event stream's response too.
        async with http.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "hi", "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert remaining_of(streamed) == 1
            await streamed.aread()
        # Errors that are not about the limit carry them as well (the request was counted).
        missing = await http.get(f"/v1/conversations/{uuid.uuid4()}")
        assert_error(missing, 404)
        assert remaining_of(missing) == 0


async def test_chat_completions_has_its_own_limit_and_the_openai_client_sees_rate_limit_error(
    app: App, user: tuple[uuid.UUID, str]
):
    async with openai.AsyncOpenAI(base_url=app.base_url + "/v1", api_key=user[1], max_retries=0, timeout=30) as oai:
        for remaining in (1, 0):
            raw = await oai.chat.completions.with_raw_response.create(
                model="elara", messages=[{"role": "user", "content": "hello"}]
            )
            assert raw.http_response.status_code == 200
            assert raw.headers["RateLimit-Policy"] == f'"{CHAT_ROUTE}";q=2;w=60'
            assert remaining_of(raw.http_response) == remaining
            assert raw.parse().choices[0].message.content == "You said: hello"
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(model="elara", messages=[{"role": "user", "content": "again"}])
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error"
    assert isinstance(error.body, dict) and set(error.body) == RATE_LIMIT_FIELDS
    assert error.body["limit"] == {"policy": CHAT_ROUTE, "limit": 2, "window_seconds": 60}
    assert_rate_limited(error.response, policy=CHAT_ROUTE, limit=2)
    assert 29 <= error.body["retry_after"] <= 30  # 60 s / 2
    # The override is its own budget: the rest of the API still has the user's three.
    async with app.client(user[1]) as http:
        listed = await http.get("/v1/personalities")
    assert listed.status_code == 200 and remaining_of(listed) == 2
    # The refused completion stored nothing: two turns, four messages.
    conversations, _ = await app.services.conversations.list(user[0])
    assert len(conversations) == 1
    messages, _ = await app.services.conversations.list_messages(user[0], conversations[0].id)
    assert [m.content for m in messages if m.role == "user"] == ["hello", "hello"]


async def test_users_are_limited_separately(app: App):
    first = await app.services.users.create("first")
    second = await app.services.users.create("second")
    async with app.client(first.api_key) as one, app.client(second.api_key) as two:
        for _ in range(PER_MINUTE):
            assert (await one.get("/v1/preferences")).status_code == 200
        assert_rate_limited(await one.get("/v1/preferences"))
        assert (await two.get("/v1/preferences")).status_code == 200


async def test_after_a_reset_the_user_succeeds_again(app: App, user: tuple[uuid.UUID, str]):
    async with app.client(user[1]) as http:
        for _ in range(PER_MINUTE):
            assert (await http.get("/v1/preferences")).status_code == 200
        assert_rate_limited(await http.get("/v1/preferences"))
        await app.services.rate_limits.reset(str(user[0]))
        again = await http.get("/v1/preferences")
    assert again.status_code == 200 and remaining_of(again) == 2


async def test_after_the_window_the_user_succeeds_again(fake_clock: FakeClock):
    """The same policy service the app builds, on an in-process limiter whose clock a test moves:
    a refused user gets one request back per emission interval, and the whole quota after a window."""
    limits = RateLimitService(MemoryRateLimiter(clock=fake_clock), per_user_per_minute=PER_MINUTE)
    for _ in range(PER_MINUTE):
        await limits.check_user("u1", "GET /v1/preferences")
    with pytest.raises(RateLimited) as caught:
        await limits.check_user("u1", "GET /v1/preferences")
    assert caught.value.retry_after == pytest.approx(20)
    fake_clock.advance(caught.value.retry_after)
    assert (await limits.check_user("u1", "GET /v1/preferences")).remaining == 0
    with pytest.raises(RateLimited):
        await limits.check_user("u1", "GET /v1/preferences")
    fake_clock.advance(60)
    decisions = [await limits.check_user("u1", "GET /v1/preferences") for _ in range(PER_MINUTE)]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    assert (limits.counts.allowed["user"], limits.counts.limited["user"]) == (7, 2)


# --- per address -----------------------------------------------------------------------------------


async def test_failed_authentications_per_address_are_limited(app: App, user: tuple[uuid.UUID, str]):
    async with app.client("ck_wrong-key") as wrong, app.client() as anonymous, app.client(user[1]) as good:
        failures = [await wrong.get("/v1/personalities") for _ in range(2)]
        failures.append(await anonymous.get("/v1/personalities"))  # no key at all is a failure too
        for failure in failures:
            assert_error(failure, 401)
        blocked = await wrong.get("/v1/personalities")
        assert_rate_limited(blocked, policy="auth-failures", limit=3, code="too_many_auth_failures")
        assert_rate_limited(
            await anonymous.post("/v1/chat/completions", json={}), policy="auth-failures", limit=3,
            code="too_many_auth_failures",
        )  # fmt: skip
        # Over its limit, the address is refused before any key is looked up: a valid key too
        # (issue 15: the limit blocks before it authenticates, so guessing costs no lookups).
        assert_rate_limited(
            await good.get("/v1/personalities"), policy="auth-failures", limit=3, code="too_many_auth_failures"
        )
    assert await app.metric("companion_ratelimit_limited_total", policy="auth-failures") == 3
    assert await app.metric("companion_ratelimit_allowed_total", policy="auth-failures") == 3


async def test_unauthenticated_routes_are_limited_per_address_but_health_and_metrics_are_exempt(app: App):
    async with app.client() as http:
        served = [await http.get(path) for path in ("/openapi.json", "/docs", "/openapi.json")]
        assert [r.status_code for r in served] == [200, 200, 200]
        assert [remaining_of(r) for r in served] == [2, 1, 0]
        assert all(r.headers["RateLimit-Policy"] == '"ip";q=3;w=60' for r in served)
        assert_rate_limited(await http.get("/openapi.json"), policy="ip", limit=3)
        assert_rate_limited(await http.get("/docs"), policy="ip", limit=3)
        assert_rate_limited(await http.get("/no-such-page"), policy="ip", limit=3)
        for _ in range(10):
            health = await http.get("/health")
            metrics = await http.get("/metrics")
            assert health.status_code == metrics.status_code == 200
            assert "RateLimit" not in health.headers and "RateLimit" not in metrics.headers
        # Paths that only start like an exempt one are not exempt.
        assert_rate_limited(await http.get("/healthz"), policy="ip", limit=3)
    assert await app.metric("companion_ratelimit_allowed_total", policy="ip") == 3
    assert await app.metric("companion_ratelimit_limited_total", policy="ip") == 4


async def test_a_forged_forwarded_address_does_not_buy_a_fresh_budget(
    limiter_mode: str, sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """Behind a proxy that appends the real address (`X-Forwarded-For: <whatever the client sent>,
    <client>`), the client's own entries are ignored whether or not TRUST_FORWARDED_FOR is set."""
    for trusted in (False, True):
        settings = limit_settings(
            limiter_mode,
            sqlite_url,
            tmp_path,
            request,
            rate_limit_ip_requests_per_minute=2,
            trust_forwarded_for=trusted,
        )
        async with start_app(settings) as running:
            async with running.client() as http:
                answers = [
                    await http.get("/openapi.json", headers={"X-Forwarded-For": f"203.0.113.{index}, 198.51.100.7"})
                    for index in range(4)
                ]
            assert [r.status_code for r in answers] == [200, 200, 429, 429], trusted
            await running.services.rate_limits.reset("198.51.100.7")


@pytest.mark.parametrize(
    ("trusted", "header", "expected"),
    [
        (False, "203.0.113.9", "10.1.2.3"),
        (False, None, "10.1.2.3"),
        (True, "203.0.113.9", "203.0.113.9"),
        (True, "203.0.113.9, 198.51.100.7", "198.51.100.7"),
        (True, "203.0.113.9,198.51.100.7 ", "198.51.100.7"),
        (True, None, "10.1.2.3"),
        (True, "", "10.1.2.3"),
    ],
)
def test_client_ip_reads_forwarded_for_only_when_trusted(trusted: bool, header: str | None, expected: str):
    headers = [(b"x-forwarded-for", header.encode())] if header is not None else []
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "client": ("10.1.2.3", 5555)}
    services = SimpleNamespace(settings=SimpleNamespace(trust_forwarded_for=trusted, trusted_proxies="10.0.0.0/8"))
    assert client_ip(Request(scope), services) == expected  # type: ignore[arg-type]


# --- Redis outage ------------------------------------------------------------------------------------


async def test_redis_down_fails_open_onto_the_in_process_limiter(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest, private_redis: RedisProcess
):
    settings = limit_settings("redis", sqlite_url, tmp_path, request, rate_limit_ip_requests_per_minute=2)
    async with start_app(settings) as running:
        created = await running.services.users.create("outage")
        async with running.client(created.api_key) as http, running.client() as anonymous:
            assert (await http.get("/v1/personalities")).status_code == 200  # decided by Redis
            await private_redis.stop()
            answers = [await http.get("/v1/personalities") for _ in range(PER_MINUTE + 2)]
            docs = [await anonymous.get("/openapi.json") for _ in range(3)]
            assert (await anonymous.get("/health")).json()["checks"]["redis"]["status"] == "down"
        # Still limited, by this instance alone (it cannot know what Redis had counted): no 500.
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        assert_rate_limited(answers[-1])
        assert [r.status_code for r in docs] == [200, 200, 429]
        assert_rate_limited(docs[-1], policy="ip", limit=2)
        counts = running.services.rate_limits.counts
        assert counts.fallbacks == len(answers) + len(docs)
        assert await running.metric("companion_ratelimit_fallbacks_total") == counts.fallbacks
        assert await running.metric("companion_ratelimit_limited_total", policy="user") == 2
        assert await running.metric("companion_ratelimit_unavailable_total") == 0


async def test_redis_down_with_fail_closed_answers_503(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest, private_redis: RedisProcess
):
    settings = limit_settings("redis", sqlite_url, tmp_path, request, rate_limit_fail_closed=True)
    async with start_app(settings) as running:
        created = await running.services.users.create("closed")
        async with running.client(created.api_key) as http, running.client() as anonymous:
            assert (await http.get("/v1/personalities")).status_code == 200
            await private_redis.stop()
            refused = await http.get("/v1/personalities")
            refused_docs = await anonymous.get("/openapi.json")
            health = await anonymous.get("/health")  # exempt: monitors still get through
        for response in (refused, refused_docs):
            error = assert_error(response, 503, "rate_limiter_unavailable")
            assert error["type"] == "service_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
        assert health.status_code == 200
        assert running.services.rate_limits.counts.fallbacks == 0
        assert await running.metric("companion_ratelimit_unavailable_total") == 2


# --- metrics and the switch ------------------------------------------------------------------------


async def test_metrics_count_decisions_per_policy(app: App, user: tuple[uuid.UUID, str]):
    assert await app.metric("companion_ratelimit_allowed_total", policy="user") == 0
    async with app.client(user[1]) as http:
        for _ in range(PER_MINUTE + 2):
            await http.get("/v1/preferences")
        await http.post("/v1/chat/completions", json={"model": "elara", "messages": [{"role": "user", "content": "x"}]})
    assert await app.metric("companion_ratelimit_allowed_total", policy="user") == PER_MINUTE
    assert await app.metric("companion_ratelimit_limited_total", policy="user") == 2
    assert await app.metric("companion_ratelimit_allowed_total", policy=CHAT_ROUTE) == 1
    assert await app.metric("companion_ratelimit_fallbacks_total") == 0
    async with app.client() as http:
        text = (await http.get("/metrics")).text
    assert "# TYPE companion_ratelimit_allowed_total counter" in text
    assert "# TYPE companion_ratelimit_limited_total counter" in text
    assert "# TYPE companion_ratelimit_fallbacks_total counter" in text


async def test_no_limits_when_disabled(sqlite_url: str, tmp_path: Path):
    settings = make_settings(sqlite_url, tmp_path, rate_limit_enabled=False, rate_limit_requests_per_minute=1)
    async with start_app(settings) as running:
        created = await running.services.users.create("free")
        async with running.client(created.api_key) as http, running.client() as anonymous:
            answers = [await http.get("/v1/preferences") for _ in range(5)]
            docs = [await anonymous.get("/openapi.json") for _ in range(5)]
        assert all(r.status_code == 200 and "RateLimit" not in r.headers for r in answers + docs)
        assert await running.metric("companion_ratelimit_allowed_total", policy="user") == 0
