"""Token quotas cannot be dodged (issue 15, item 5): the prompt is charged when generation starts
and the completion as it is produced, so a client that leaves or a model that fails mid-reply still
pays for what was spent; concurrent replies of one user overrun a quota by at most one reply."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from companion.chat.service import TokenEvent
from companion.llm.base import estimate_tokens
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.ratelimit.test_quotas import QuotaApp, quota_app, quota_settings, real_now_clock
from tests.support.api import create_conversation
from tests.support.live import wait_for

LONG = " ".join(f"w{i}" for i in range(200))


def _provider(app: QuotaApp) -> ScriptedProvider:
    provider = app.services.provider
    assert isinstance(provider, ScriptedProvider)
    return provider


def _last_prompt_tokens(app: QuotaApp) -> int:
    return sum(estimate_tokens(m.content) for m in _provider(app).prompts[-1])


async def test_a_model_failing_mid_reply_is_charged_its_prompt_and_what_it_produced(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_daily=100_000)
    async with quota_app(settings, real_now_clock()) as app:
        conversation = await create_conversation(app.http, "brief")
        _provider(app).queue(ScriptedReply("one two three four five", fail_after=3))
        response = await app.post(conversation["id"], "hello there")
        assert response.status_code == 502, response.text
        prompt = _last_prompt_tokens(app)
        assert prompt > 3
        assert await app.used() == {"daily": prompt + 3}
        # The stored reply carries the same usage, so a counter rebuilt from the database agrees.
        await app.services.quotas.reset(app.user_id)
        assert await app.used() == {"daily": prompt + 3}


async def test_a_reply_ended_early_is_charged_its_prompt_and_what_it_produced(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Whoever consumes a turn (a run; a request before runs existed) may stop it or be cancelled
    before the model's usage report: the prompt and the tokens produced are charged all the same."""
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_daily=100_000)
    async with quota_app(settings, real_now_clock()) as app:
        conversation = await app.services.conversations.get(
            app.user_id, uuid.UUID((await create_conversation(app.http, "brief"))["id"])
        )
        _provider(app).queue(ScriptedReply("a b c d e f", hang_after=2))
        turn = await app.services.chat.begin(app.user_id, conversation, "stay a while")
        events = app.services.chat.run(turn)
        tokens = 0
        async for event in events:
            tokens += isinstance(event, TokenEvent)
            if tokens == 2:
                break
        await events.aclose()  # the consumer goes away while the model is still generating
        prompt = _last_prompt_tokens(app)
        assert await app.used() == {"daily": prompt + 2}
        messages, _ = await app.services.conversations.list_messages(app.user_id, conversation.id)
        assert (messages[-1].status, messages[-1].prompt_tokens, messages[-1].completion_tokens) == (
            "incomplete",
            prompt,
            2,
        )


async def test_concurrent_replies_overrun_the_quota_by_at_most_one_reply(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    quota, max_tokens = 300, 40
    settings = quota_settings(
        limiter_mode,
        database_url,
        tmp_path,
        request,
        token_quota_daily=quota,
        llm_max_tokens=max_tokens,
        llm_context_size=256,
    )
    async with quota_app(settings, real_now_clock()) as app:
        conversations = [await create_conversation(app.http, "brief") for _ in range(8)]
        gate = asyncio.Semaphore(0)
        _provider(app).queue(*[ScriptedReply(LONG, gate=gate) for _ in conversations])
        # All eight start together; each waits inside generation until the gate opens.
        posts = [asyncio.create_task(app.post(c["id"], "tell me everything")) for c in conversations]

        async def all_decided() -> bool:
            return sum(t.done() for t in posts) + len(_provider(app).prompts) == len(posts)

        try:
            await wait_for(all_decided, what="every request to be admitted or refused")
        finally:
            for _ in range(len(posts) * max_tokens):  # never leave a reply waiting, even on failure
                gate.release()
        answers = await asyncio.gather(*posts)
        admitted = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(admitted) + len(refused) == len(answers), [a.status_code for a in answers]
        assert admitted and refused
        used = (await app.used())["daily"]
        largest_prompt = max(sum(estimate_tokens(m.content) for m in p) for p in _provider(app).prompts)
        assert used == sum(a.json()["usage"]["total_tokens"] for a in admitted)
        assert used <= quota + largest_prompt + max_tokens, (used, len(admitted))
