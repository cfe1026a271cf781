"""Token quotas cannot be dodged (issue 15, item 5): the prompt is charged when generation starts
and the completion as it is produced, so a client that leaves or a model that fails mid-reply still
pays for what was spent; concurrent replies of one user overrun a quota by at most one reply's
max_tokens."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import pytest

from companion.chat.service import TokenEvent
from companion.llm.base import estimate_tokens
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.ratelimit.policy import RateLimited
from companion.storage.models import ConversationSummary
from companion.types import utcnow
from tests.ratelimit.test_quotas import (
    QUOTA,
    QuotaApp,
    assert_quota_refused,
    chat_until_refused,
    quota_app,
    quota_settings,
    real_now_clock,
)
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


async def test_concurrent_replies_overrun_the_quota_by_at_most_one_replys_max_tokens(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight replies of one user at once (on two instances sharing Redis; on one with the counters in
    process), each with a prompt of P tokens and a reply that runs to max_tokens (M), when what is
    left of the quota (2 * LLM_CONTEXT_SIZE + 1) holds two of them (2P + M <= left < 3P + 2M): two
    are admitted, the rest refused with nothing stored, and the total charged stays within the
    quota plus M. (A turn admitted while the quota was not yet used up, reserving its worst case
    until its prompt was known, let a third in: 3P + 3M, past the quota by up to a whole reply.)"""
    quota, max_tokens, context = 3000, 40, 256
    left = 2 * context + 1
    settings = quota_settings(
        limiter_mode,
        database_url,
        tmp_path,
        request,
        token_quota_daily=quota,
        llm_max_tokens=max_tokens,
        llm_context_size=context,
        memory_enabled=False,  # what the measuring turn said must not be recalled into the others' prompts
    )
    message = "tell me everything about " + " ".join(f"topic{i}" for i in range(22))
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(quota_app(settings, real_now_clock()))
        apps = [first]
        if limiter_mode == "redis":  # a second instance on the same database and Redis
            apps.append(
                await stack.enter_async_context(quota_app(settings, real_now_clock(), (first.user_id, first.api_key)))
            )
        # One turn alone measures the prompt (every conversation's first turn has the same one).
        _provider(first).queue(ScriptedReply(LONG))
        measured = await first.post((await create_conversation(first.http, "brief"))["id"], message)
        assert measured.status_code == 200, measured.text
        prompt = measured.json()["usage"]["prompt_tokens"]
        assert 2 * prompt + max_tokens <= left < 3 * prompt + 2 * max_tokens, prompt  # room for two, not three
        await first.services.quotas.charge(first.user_id, quota - left - (await first.used())["daily"])
        assert await first.used() == {"daily": quota - left}

        conversations = [await create_conversation(first.http, "brief") for _ in range(8)]
        gate = asyncio.Semaphore(0)
        for app in apps:
            _provider(app).queue(*[ScriptedReply(LONG, gate=gate) for _ in conversations])
        # All eight start together; each admitted one waits inside generation until the gate opens.
        posts = [
            asyncio.create_task(apps[index % len(apps)].post(c["id"], message)) for index, c in enumerate(conversations)
        ]

        def all_decided() -> bool:
            generating = sum(len(_provider(app).prompts) for app in apps) - 1
            return sum(t.done() for t in posts) + generating == len(posts)

        try:
            await wait_for(all_decided, what="every request to be admitted or refused")
        finally:
            for _ in range(len(posts) * max_tokens):  # never leave a reply waiting, even on failure
                gate.release()
        answers = await asyncio.gather(*posts)
        admitted = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(admitted) + len(refused) == len(answers), [a.text for a in answers]
        reply = {"prompt_tokens": prompt, "completion_tokens": max_tokens, "total_tokens": prompt + max_tokens}
        assert [a.json()["usage"] for a in admitted] == [reply] * len(admitted)
        used = (await first.used())["daily"]
        assert used == quota - left + len(admitted) * (prompt + max_tokens)
        assert used <= quota + max_tokens, (used, len(admitted))
        assert len(admitted) == 2, len(admitted)
        # The refused turns stored nothing: only the measuring turn and the admitted ones are there.
        assert len(await first.stored()) == 2 * (1 + len(admitted))


async def test_a_turn_refused_once_its_prompt_is_counted_leaves_nothing_behind(
    limiter_mode: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A message small enough to pass the first check whose prompt then does not fit is withdrawn:
    no message, the conversation's head, title and activity time as they were, and a buffer that
    does not remember it; so are an edit and a regenerate refused the same way."""
    settings = quota_settings(limiter_mode, database_url, tmp_path, request, token_quota_daily=QUOTA)
    async with quota_app(settings, real_now_clock()) as app:
        chats = app.services.chat
        counted = await create_conversation(app.http, "brief")
        usages, _ = await chat_until_refused(app, counted["id"])
        assert 0 < QUOTA - sum(usages) < _last_prompt_tokens(app)  # room left, but for no prompt
        untitled = await create_conversation(app.http, "brief")
        conversations = [uuid.UUID(counted["id"]), uuid.UUID(untitled["id"])]
        before = [await app.services.conversations.get(app.user_id, c) for c in conversations]
        paths = [await app.services.conversations.active_path(c) for c in conversations]
        # A running summary of the first exchange: an edit of the first message starts a path it
        # does not cover, so the edit made the newest summary an empty one; withdrawn, it is back.
        async with app.services.database.session() as session:
            session.add(
                ConversationSummary(
                    conversation_id=conversations[0],
                    upto_message_id=paths[0][1].id,
                    content="SUMMARY-MARK",
                    created_at=utcnow(),
                )
            )

        async def whole_trees() -> list[list[tuple[int, str]]]:
            trees = []
            for conversation in conversations:
                messages, _ = await app.services.conversations.list_messages(
                    app.user_id, conversation, limit=200, whole_tree=True
                )
                trees.append([(m.id, m.content) for m in messages])
            return trees

        stored = await whole_trees()

        for conversation in (counted, untitled):
            assert_quota_refused(await app.post(conversation["id"], "withdrawn words"), "daily", QUOTA)
        first_user, first_reply = paths[0][0], paths[0][1]
        with pytest.raises(RateLimited):  # an edit of the first message: a new branch
            await chats.begin(app.user_id, before[0], "withdrawn edit", parent_id=first_user.parent_id)
        with pytest.raises(RateLimited):
            await chats.regenerate(app.user_id, before[0], first_reply.id)

        assert await whole_trees() == stored
        assert [await app.services.conversations.get(app.user_id, c) for c in conversations] == before
        assert before[1].title is None
        assert [await app.services.conversations.active_path(c) for c in conversations] == paths
        # With room again, the next turn's prompt holds none of what was withdrawn.
        await app.services.quotas.adjust(app.user_id, -QUOTA)
        assert (await app.post(counted["id"], "after")).status_code == 200
        prompt = " ".join(m.content for m in _provider(app).prompts[-1])
        assert "after" in prompt and "SUMMARY-MARK" in prompt and "withdrawn" not in prompt
        assert len(await app.services.conversations.active_path(conversations[0])) == len(paths[0]) + 2
