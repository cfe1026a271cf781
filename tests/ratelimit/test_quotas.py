"""Token quotas through the real app, on SQLite and PostgreSQL, with the counters in the private
Redis or in process. The scripted provider's usage is word- and character-based and deterministic:
chats go through while each one's prompt fits in what is left of the window, and the first whose
prompt does not is refused with 429 `token_quota_exceeded` (nothing stored); daily and monthly
windows follow the injected clock; a lost counter (FLUSHALL, a restart) is rebuilt from the stored
usage, so nothing is forgotten."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.ratelimit.quotas import windows
from companion.services import Services
from companion.types import utcnow
from tests.conftest import make_settings
from tests.support.api import create_conversation, create_personality, running_server
from tests.support.live import LiveServer
from tests.support.redis_proc import RedisProcess

QUOTA = 300  # tokens; a turn with the short personality below costs about 120, 140, ... (its history grows; every
# prompt also carries a context block with the date, docs/memory.md)
MAX_TURNS = 20


class MovableClock:
    """The app's clock (aware UTC datetimes): frozen, moved only by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class QuotaApp:
    server: LiveServer
    clock: MovableClock
    user_id: uuid.UUID
    http: httpx.AsyncClient
    api_key: str
    prompts: list[int] = field(default_factory=list)  # each answered post's prompt tokens, in order

    @property
    def services(self) -> Services:
        return self.server.app.state.services

    async def used(self) -> dict[str, int]:
        return {state.window.name: state.used for state in await self.services.quotas.usage(self.user_id)}

    async def post(self, conversation_id: str, content: str) -> httpx.Response:
        response = await self.http.post(
            f"/v1/conversations/{conversation_id}/messages", json={"content": content, "stream": False}
        )
        if response.status_code == 200:
            self.prompts.append(response.json()["usage"]["prompt_tokens"])
        return response

    async def stored(self) -> list[tuple[str, str]]:
        conversations, _ = await self.services.conversations.list(self.user_id, limit=200)
        result = []
        for conversation in conversations:
            messages, _ = await self.services.conversations.list_messages(self.user_id, conversation.id, limit=200)
            result += [(m.role, m.content) for m in messages]
        return result


def quota_settings(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest, **extra: Any
) -> Settings:
    values: dict[str, Any] = dict(extra)
    if limiter_mode == "redis":
        values.update(redis_enabled=True, redis_url=request.getfixturevalue("redis_url"))
    return make_settings(database_url, tmp_path, **values)


@asynccontextmanager
async def quota_app(
    settings: Settings, clock: MovableClock, user: tuple[uuid.UUID, str] | None = None
) -> AsyncIterator[QuotaApp]:
    """The app on `clock`, with a user (a new one, or `user` again after a restart) who has a
    personality with a one-line prompt, so that turns are small."""
    async with running_server(settings, ScriptedProvider(), clock=clock) as server:
        services: Services = server.app.state.services
        if user is None:
            created = await services.users.create("quota")
            user = (created.id, created.api_key)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"Authorization": f"Bearer {user[1]}"}, timeout=30
        ) as http:
            if (await http.get("/v1/personalities/brief")).status_code == 404:
                await create_personality(http, "brief", system_prompt="Be brief.")
            yield QuotaApp(server, clock, user[0], http, user[1])


async def chat_until_refused(app: QuotaApp, conversation_id: str) -> tuple[list[int], httpx.Response]:
    """Send turns until one is refused; returns each admitted turn's total tokens and the refusal."""
    usages: list[int] = []
    for index in range(MAX_TURNS):
        response = await app.post(conversation_id, f"message {index}")
        if response.status_code != 200:
            return usages, response
        usages.append(response.json()["usage"]["total_tokens"])
    raise AssertionError(f"no refusal after {MAX_TURNS} turns: {usages}")


def assert_quota_refused(response: httpx.Response, window: str, quota: int) -> dict[str, Any]:
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param", "retry_after"}, error
    assert error["code"] == "token_quota_exceeded" and error["type"] == "rate_limit_error", error
    assert f"{window} token quota ({quota} tokens)" in error["message"], error
    assert int(response.headers["Retry-After"]) == max(math.ceil(error["retry_after"]), 1)
    return error


def assert_used_up_exactly_when_due(app: QuotaApp, usages: list[int], refused: httpx.Response, quota: int) -> None:
    """Every admitted turn's prompt fitted in what was left of the quota (its reply may then run past
    it, by at most its max_tokens), and the refusal came once the next one's did not."""
    assert len(usages) >= 2, usages  # more than one turn fitted: the test shows a countdown
    prompts = app.prompts[-len(usages) :]
    for index, prompt in enumerate(prompts):
        assert sum(usages[:index]) + prompt <= quota, (usages, prompts)
    assert sum(usages) <= quota + app.services.chat.limits.max_tokens, usages
    left = quota - sum(usages)
    if left > 0:  # not used up: refused because the next turn needed more than was left
        found = re.search(
            r"has (\d+) tokens left, fewer than this turn needs \((\d+)\)", refused.json()["error"]["message"]
        )
        assert found is not None, refused.text
        assert int(found[1]) == left < int(found[2]), refused.text


def real_now_clock() -> MovableClock:
    # Anchored at the real time: the chat service computes Retry-After against the real clock.
    return MovableClock(utcnow())


async def test_daily_quota_refuses_once_used_up_and_stores_nothing(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_daily=QUOTA)
    clock = real_now_clock()
    async with quota_app(settings, clock) as app:
        conversation = await create_conversation(app.http, "brief")
        usages, refused = await chat_until_refused(app, conversation["id"])
        assert_used_up_exactly_when_due(app, usages, refused, QUOTA)
        assert await app.used() == {"daily": sum(usages)}
        error = assert_quota_refused(refused, "daily", QUOTA)
        # Retry when the UTC day ends.
        day_end = windows(clock(), QUOTA, 0)[0].end
        assert abs(error["retry_after"] - max((day_end - utcnow()).total_seconds(), 1.0)) < 5
        # Nothing was stored for the refused turn, streamed or not; the quota did not move.
        before = await app.stored()
        assert len(before) == 2 * len(usages)
        streamed = await app.http.post(
            f"/v1/conversations/{conversation['id']}/messages", json={"content": "more", "stream": True}
        )
        assert_quota_refused(streamed, "daily", QUOTA)
        assert_quota_refused(await app.post(conversation["id"], "and more"), "daily", QUOTA)
        assert await app.stored() == before
        assert await app.used() == {"daily": sum(usages)}


async def test_monthly_quota_holds_for_the_whole_month(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_monthly=QUOTA)
    clock = MovableClock(datetime(2031, 3, 10, 12, 0, tzinfo=UTC))
    async with quota_app(settings, clock) as app:
        conversation = await create_conversation(app.http, "brief")
        usages, refused = await chat_until_refused(app, conversation["id"])
        assert_used_up_exactly_when_due(app, usages, refused, QUOTA)
        assert_quota_refused(refused, "monthly", QUOTA)
        # Days later in the same month: still used up.
        clock.advance(timedelta(days=15))
        assert_quota_refused(await app.post(conversation["id"], "later"), "monthly", QUOTA)
        assert await app.used() == {"monthly": sum(usages)}
        # A new month: a fresh window.
        clock.now = datetime(2031, 4, 1, 0, 0, 1, tzinfo=UTC)
        assert await app.used() == {"monthly": 0}
        assert (await app.post(conversation["id"], "april")).status_code == 200


async def test_a_new_day_starts_a_fresh_daily_window(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    settings = quota_settings(
        limiter_mode, database_url, tmp_path, request, token_quota_daily=QUOTA, token_quota_monthly=10 * QUOTA
    )
    clock = MovableClock(datetime(2031, 3, 10, 23, 58, tzinfo=UTC))
    async with quota_app(settings, clock) as app:
        conversation = await create_conversation(app.http, "brief")
        first_day, refused = await chat_until_refused(app, conversation["id"])
        assert_quota_refused(refused, "daily", QUOTA)
        clock.advance(timedelta(minutes=1, seconds=59))  # 23:59:59: still the same day
        assert_quota_refused(await app.post(conversation["id"], "not yet"), "daily", QUOTA)
        clock.advance(timedelta(seconds=2))  # the next day
        assert await app.used() == {"daily": 0, "monthly": sum(first_day)}
        # A new conversation: this one's history has grown past what two turns of the day can fit.
        second_day, refused = await chat_until_refused(app, (await create_conversation(app.http, "brief"))["id"])
        assert_used_up_exactly_when_due(app, second_day, refused, QUOTA)
        assert_quota_refused(refused, "daily", QUOTA)
        assert await app.used() == {"daily": sum(second_day), "monthly": sum(first_day) + sum(second_day)}


async def test_a_lost_counter_is_rebuilt_from_the_database(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """FLUSHALL on Redis, or a restart of the in-process app: the usage comes back from the stored
    messages, both before a check and when a reply is charged to a missing counter."""
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_daily=QUOTA)
    clock = real_now_clock()

    async def lose_counters(app: QuotaApp) -> None:
        if limiter_mode == "redis":
            raw = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
            try:
                await raw.flushall()
                assert await raw.dbsize() == 0
            finally:
                await raw.aclose()
        else:
            await app.services.quotas.reset(app.user_id)

    async with quota_app(settings, clock) as app:
        user = (app.user_id, app.api_key)
        conversation = await create_conversation(app.http, "brief")
        first = (await app.post(conversation["id"], "one")).json()["usage"]["total_tokens"]
        await lose_counters(app)
        assert await app.used() == {"daily": first}
        await lose_counters(app)
        second = (await app.post(conversation["id"], "two")).json()["usage"]["total_tokens"]
        assert await app.used() == {"daily": first + second}
        usages, refused = await chat_until_refused(app, conversation["id"])
        assert_quota_refused(refused, "daily", QUOTA)
        total = first + second + sum(usages)
        await lose_counters(app)
        assert_quota_refused(await app.post(conversation["id"], "after the flush"), "daily", QUOTA)
        assert await app.used() == {"daily": total}
    # A restart on the same database (a new process: an empty in-process counter).
    async with quota_app(settings, clock, user) as again:
        assert await again.used() == {"daily": total}
        assert_quota_refused(await again.post(conversation["id"], "after the restart"), "daily", QUOTA)


async def test_charging_a_missing_counter_counts_the_stored_reply_once(
    limiter_mode: str, sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    settings = quota_settings(limiter_mode, sqlite_url, tmp_path, request, token_quota_daily=10 * QUOTA)
    async with quota_app(settings, real_now_clock()) as app:
        conversation = await create_conversation(app.http, "brief")
        total = 0
        for content in ("one", "two", "three"):
            total += (await app.post(conversation["id"], content)).json()["usage"]["total_tokens"]
            assert await app.used() == {"daily": total}
        # The counter disappears between a reply being stored and its charge: the charge rebuilds it
        # from the database (which holds the reply) instead of adding the reply a second time.
        await app.services.quotas.reset(app.user_id)
        await app.services.quotas.charge(app.user_id, 68)
        assert await app.used() == {"daily": total}
        await app.services.quotas.charge(app.user_id, 5)  # an existing counter is incremented
        assert await app.used() == {"daily": total + 5}


async def test_the_openai_route_refuses_a_spent_quota_without_storing_anything(
    limiter_mode: str, sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
):
    settings = quota_settings(limiter_mode, sqlite_url, tmp_path, request, token_quota_daily=QUOTA)
    async with quota_app(settings, real_now_clock()) as app:
        conversation = await create_conversation(app.http, "brief")
        await chat_until_refused(app, conversation["id"])
        before = await app.stored()
        conversations_before, _ = await app.services.conversations.list(app.user_id)
        async with openai.AsyncOpenAI(
            base_url=app.server.base_url + "/v1", api_key=app.api_key, max_retries=0, timeout=30
        ) as oai:
            for model in ("brief", "elara"):  # an existing conversation, and one not started yet
                with pytest.raises(openai.RateLimitError) as caught:
                    await oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
                assert caught.value.code == "token_quota_exceeded"
                assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert await app.stored() == before
        assert (await app.services.conversations.list(app.user_id))[0] == conversations_before


async def test_the_quota_holds_while_redis_is_down(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest, private_redis: RedisProcess
):
    """Redis gone mid-day: the counter is rebuilt from the database in the in-process fallback, so
    the quota is still enforced at the same point, and the usage is still right afterwards."""
    settings = quota_settings("redis", database_url, tmp_path, request, token_quota_daily=QUOTA)
    async with quota_app(settings, real_now_clock()) as app:
        conversation = await create_conversation(app.http, "brief")
        first = (await app.post(conversation["id"], "before the outage")).json()["usage"]["total_tokens"]
        await private_redis.stop()
        usages, refused = await chat_until_refused(app, conversation["id"])
        assert_used_up_exactly_when_due(app, [first, *usages], refused, QUOTA)
        assert_quota_refused(refused, "daily", QUOTA)
        assert await app.used() == {"daily": first + sum(usages)}
        expected: list[tuple[str, str]] = []
        for content in ["before the outage", *(f"message {index}" for index in range(len(usages)))]:
            expected += [("user", content), ("assistant", f"You said: {content}")]
        assert await app.stored() == expected  # the refused turn stored nothing
