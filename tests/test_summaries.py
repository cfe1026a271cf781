"""Running summaries of long conversations (`companion.chat.summary`), with SHORT_TERM_MEMORY_SIZE=4
and SUMMARY_BATCH=2, on SQLite and PostgreSQL: a summary row appears once messages leave the window;
summaries are additive (each row extends the previous one, no row and no message is ever changed or
deleted); the newest summary reaches the next prompt's system message; the extractive mode is
deterministic; the LLM mode uses the provider's text and falls back to the extractive one when the
provider fails or says nothing. Background runs are awaited with `Summarizer.wait_idle()`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from companion.chat.service import DoneEvent
from companion.chat.summary import Summarizer
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.services import Services
from companion.storage.models import ConversationSummary, Message
from tests.conftest import make_settings
from tests.support.api import chat, create_conversation
from tests.support.conversation import Pair, Transcript, paged_history, pairs, prompt_summary
from tests.support.instances import running_instances
from tests.support.redis_proc import RedisProcess, running_redis

WINDOW = 4
BATCH = 2
TEST_BUDGET = 60.0

Row = tuple[int, int, str]  # id, upto_message_id, content
Stored = tuple[int, str, str, str]  # id, role, content, status


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, short_term_memory_size=WINDOW, summary_batch=BATCH)


def said(turn: int) -> str:
    return f"Turn {turn} is here. Extra detail {turn}."


def summary_through(turns: int) -> str:
    """The extractive summary of turns 1..`turns` of `said` and their scripted replies ("You said:
    ..."), written out: each message's first sentence on its own line."""
    return "\n".join(
        line
        for turn in range(1, turns + 1)
        for line in (f"The user said: Turn {turn} is here.", f"You replied: You said: Turn {turn} is here.")
    )


async def summary_rows(services: Services, conversation_id: str | uuid.UUID) -> list[Row]:
    async with services.database.session() as session:
        rows = await session.execute(
            select(ConversationSummary)
            .where(ConversationSummary.conversation_id == uuid.UUID(str(conversation_id)))
            .order_by(ConversationSummary.id)
        )
        return [(r.id, r.upto_message_id, r.content) for r in rows.scalars()]


async def stored_messages(services: Services, conversation_id: str | uuid.UUID) -> list[Stored]:
    async with services.database.session() as session:
        rows = await session.execute(
            select(Message).where(Message.conversation_id == uuid.UUID(str(conversation_id))).order_by(Message.id)
        )
        return [(m.id, m.role, m.content, m.status) for m in rows.scalars()]


def assert_additive(rows: list[Row], max_chars: int = 4000) -> None:
    """Each row extends the previous one, or is a base row (the `…` line, then the newest whole lines:
    the previous row's newest ones, if any fit, and new ones); none is longer than `max_chars`."""
    for _, _, content in rows:
        assert len(content) <= max_chars, f"a summary row of {len(content)} characters"
    for (_, upto_before, before), (_, upto, content) in pairwise(rows):
        assert upto > upto_before
        if content.startswith("…\n"):
            lines, previous = content.split("\n")[1:], before.split("\n")
            carried = next((n for n in range(len(lines), -1, -1) if previous[len(previous) - n :] == lines[:n]), 0)
            assert carried < len(lines), f"a base row with nothing new:\n{content}"
        else:
            assert content.startswith(before + "\n"), (
                f"a summary does not extend the previous one:\n{before}\n---\n{content}"
            )


# --- extractive summaries through the app ----------------------------------------------------------


async def test_summaries_are_additive_and_never_delete_a_message(client: httpx.AsyncClient, app_services: Services):
    assert app_services.summarizer.mode == "extractive"  # SUMMARY_MODE=auto with the scripted provider
    conversation_id = (await create_conversation(client))["id"]
    rows: list[Row] = []
    messages: list[Stored] = []
    for turn in range(1, 9):
        await chat(client, conversation_id, said(turn))
        await app_services.summarizer.wait_idle()

        now_messages = await stored_messages(app_services, conversation_id)
        assert len(now_messages) == 2 * turn, "a message is missing"
        assert now_messages[: len(messages)] == messages, "a stored message was changed or deleted"
        now_rows = await summary_rows(app_services, conversation_id)
        assert now_rows[: len(rows)] == rows, "a summary row was changed or deleted"
        assert len(now_rows) == max(turn - 2, 0), f"turn {turn}: {now_rows}"  # one new row per turn from turn 3
        assert_additive(now_rows)
        # Row n covers turns 1..n (a turn's two messages leave the window two turns later).
        assert [content for _, _, content in now_rows] == [summary_through(n) for n in range(1, turn - 1)]
        if now_rows:
            # Only messages that left the window: the newest WINDOW ones are never in it.
            assert now_rows[-1][1] == now_messages[-WINDOW - 1][0]
        rows, messages = now_rows, now_messages

    assert rows[0][2] == "The user said: Turn 1 is here.\nYou replied: You said: Turn 1 is here."
    history = await paged_history(client, conversation_id)
    assert [(m["id"], m["role"], m["content"], m["status"]) for m in history] == messages


@pytest.fixture(params=["in-process", "redis"])
def cache_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def redis_or_none(cache_mode: str, tmp_path: Path) -> AsyncIterator[RedisProcess | None]:
    if cache_mode == "in-process":
        yield None
        return
    async with running_redis(tmp_path / "redis") as server:
        yield server


async def test_the_newest_summary_reaches_the_next_prompt(
    cache_mode: str, database_url: str, tmp_path: Path, redis_or_none: RedisProcess | None
):
    """With Redis on, the summary is cached in L1 and Redis: a new one must replace it at once."""
    redis = {"redis_enabled": True, "redis_url": redis_or_none.url} if redis_or_none is not None else {}
    settings = make_settings(database_url, tmp_path, short_term_memory_size=WINDOW, summary_batch=BATCH, **redis)
    async with asyncio.timeout(TEST_BUDGET), running_instances(settings, count=1) as (a,):
        if redis_or_none is not None:
            await a.wait_channel_connected()
        async with a.client((await a.services.users.create("alice")).api_key) as client:
            conversation_id = (await create_conversation(client))["id"]
            transcript = Transcript(WINDOW)
            windows: list[list[Pair]] = []  # what each turn's prompt must hold, from what the client saw
            for turn in range(1, 8):
                _, window = await transcript.chat(client, conversation_id, said(turn))
                windows.append(window)
                await a.services.summarizer.wait_idle()
            history = await paged_history(client, conversation_id)
            rows = await summary_rows(a.services, conversation_id)

    prompts = a.provider.prompts
    assert len(prompts) == 7
    base = prompts[0][0].content
    assert base.startswith("You are Elara") and "Summary" not in base
    # With SHORT_TERM_MEMORY_SIZE=4, turn 7's prompt holds turn 5's reply, turn 6 and turn 7.
    assert pairs(prompts[-1][1:]) == [
        ("assistant", f"You said: {said(5)}"),
        ("user", said(6)),
        ("assistant", f"You said: {said(6)}"),
        ("user", said(7)),
    ]
    for turn, (prompt, window) in enumerate(zip(prompts, windows, strict=True), start=1):
        assert pairs(prompt[1:]) == window, f"turn {turn}"
        assert prompt[0].content == base, f"turn {turn}: the system message changed"
        if turn <= 3:
            assert prompt_summary(prompt) is None, f"turn {turn} had a summary before any message left the window"
            continue
        # The row written after the previous turn, in full, in the newest message's context block.
        _, upto, content = rows[turn - 4]
        assert prompt_summary(prompt) == content, f"turn {turn}"
        first_in_window = next(m["id"] for m in history if (m["role"], m["content"]) == pairs(prompt[1:])[0])
        assert upto < first_in_window, "the summary repeats a message that is still in the window"


async def test_extractive_summaries_are_deterministic(client: httpx.AsyncClient, app_services: Services):
    """The same conversation twice gives the same summary, word for word; each message contributes
    its first sentence, on one line, cut at 160 characters."""
    contents = [
        "No punctuation at all in this one",
        "Line one\n  still line one! Then a second sentence.",
        "x" * 200,
        "What about questions? They end sentences too.",
        "Short.",
    ]
    summaries = []
    for _ in range(2):
        conversation_id = (await create_conversation(client))["id"]
        for content in contents:
            await chat(client, conversation_id, content)
            await app_services.summarizer.wait_idle()
        rows = await summary_rows(app_services, conversation_id)
        assert rows
        assert_additive(rows)
        summaries.append(rows[-1][2])
    assert summaries[0] == summaries[1]
    assert summaries[0].split("\n") == [
        "The user said: No punctuation at all in this one",
        "You replied: You said: No punctuation at all in this one",
        "The user said: Line one still line one!",
        "You replied: You said: Line one still line one!",
        "The user said: " + "x" * 159 + "…",
        "You replied: You said: " + "x" * 149 + "…",
    ]


# --- the LLM mode, on the service container --------------------------------------------------------


async def add_turns(services: Services, conversation_id: uuid.UUID, turns: range) -> None:
    for turn in turns:
        await services.conversations.add_message(conversation_id, "user", said(turn))
        await services.conversations.add_message(conversation_id, "assistant", f"Reply {turn}. More words.")


async def test_llm_summaries_use_the_providers_text_and_fall_back_to_extractive(services: Services):
    user = await services.users.create("alice")
    conversation = await services.conversations.create(user.id, "elara")
    cid = conversation.id
    llm = ScriptedProvider(["A short summary."])
    summarizer = Summarizer(services.database, services.cache, provider=llm, mode="llm", window=WINDOW, batch=BATCH)

    # Too few messages: nothing to summarize, and the model is not asked.
    await add_turns(services, cid, range(1, 3))
    summarizer.schedule(cid)
    await summarizer.wait_idle()
    assert await summary_rows(services, cid) == [] and llm.prompts == []

    # Two messages left the window: the model's text becomes the summary.
    await add_turns(services, cid, range(3, 4))
    summarizer.schedule(cid)
    await summarizer.wait_idle()
    messages = await stored_messages(services, cid)
    rows = await summary_rows(services, cid)
    assert [(upto, content) for _, upto, content in rows] == [(messages[1][0], "A short summary.")]
    assert len(llm.prompts) == 1
    system, transcript = llm.prompts[0]
    assert system.role == "system" and system.content.startswith("Summarize the conversation excerpt")
    assert transcript.role == "user"
    assert transcript.content == f"user: {said(1)}\nassistant: Reply 1. More words."  # the departed ones only
    latest = await summarizer.latest(cid)
    assert latest is not None and latest.content == "A short summary."
    # The app's own summarizer reads the same (cached) newest summary.
    assert (await services.summarizer.latest(cid)) == latest

    # The provider fails: the new part is the extractive one, and the old part is kept.
    await add_turns(services, cid, range(4, 5))
    llm.queue(ScriptedReply("Never said.", fail_after=0))
    summarizer.schedule(cid)
    await summarizer.wait_idle()
    rows = await summary_rows(services, cid)
    assert rows[-1][2] == "A short summary.\nThe user said: Turn 2 is here.\nYou replied: Reply 2."
    assert len(llm.prompts) == 2

    # The provider says nothing: extractive again.
    await add_turns(services, cid, range(5, 6))
    llm.queue(ScriptedReply("   "))
    summary = await summarizer.summarize(cid)
    assert summary is not None and summary.content.endswith("\nThe user said: Turn 3 is here.\nYou replied: Reply 3.")

    # And it works again.
    await add_turns(services, cid, range(6, 7))
    llm.queue("Fourth part.")
    summary = await summarizer.summarize(cid)
    assert summary is not None
    rows = await summary_rows(services, cid)
    assert len(rows) == 4 and rows[-1][2] == summary.content and summary.content.endswith("\nFourth part.")
    assert_additive(rows)
    assert len(await stored_messages(services, cid)) == 12, "a summary deleted messages"

    # The next turn's prompt carries it after the personality's prompt.
    turn = await services.chat.begin(user.id, conversation, "What do you remember?")
    events = [event async for event in services.chat.run(turn)]
    assert isinstance(events[-1], DoneEvent)
    assert prompt_summary(turn.prompt) == summary.content
    assert pairs(turn.prompt[1:]) == [
        ("assistant", "Reply 5. More words."),
        ("user", said(6)),
        ("assistant", "Reply 6. More words."),
        ("user", "What do you remember?"),
    ]


# --- the length cap: base rows ---------------------------------------------------------------------


async def summarize_turns(services: Services, summarizer: Summarizer, cid: uuid.UUID, turns: range) -> list[Row]:
    for turn in turns:
        await add_turns(services, cid, range(turn, turn + 1))
        await summarizer.summarize(cid)
    return await summary_rows(services, cid)


async def test_a_summary_past_its_cap_starts_a_base_row_and_the_next_rows_extend_it(services: Services):
    user = await services.users.create("alice")
    cid = (await services.conversations.create(user.id, "elara")).id
    summarizer = Summarizer(services.database, services.cache, mode="extractive", window=WINDOW, batch=BATCH, max_chars=100)
    rows = await summarize_turns(services, summarizer, cid, range(1, 6))
    # Turn n's two messages leave the window after turn n + 2; each gives two lines of 30 and 21
    # characters, so a row holds the lines of one turn (52), but not of two (105): base rows.
    assert [content for _, _, content in rows] == [
        "The user said: Turn 1 is here.\nYou replied: Reply 1.",
        "…\nYou replied: Reply 1.\nThe user said: Turn 2 is here.\nYou replied: Reply 2.",
        "…\nYou replied: Reply 2.\nThe user said: Turn 3 is here.\nYou replied: Reply 3.",
    ]
    assert_additive(rows, max_chars=100)
    assert len(await stored_messages(services, cid)) == 10, "a summary deleted messages"


async def test_with_the_4000_character_cap_rows_extend_until_a_base_row_and_the_prompt_gets_the_newest(
    services: Services,
):
    """The app's own summarizer (4,000 characters): long first sentences (160 characters in the
    summary) fill it in a few runs; the stored rows stay additive and within the cap, and the next
    prompt carries the newest row, which ends with the newest departed messages."""
    user = await services.users.create("alice")
    conversation = await services.conversations.create(user.id, "elara")
    summarizer = services.summarizer
    summarizer.window, summarizer.batch = WINDOW, BATCH
    long_line = "word " * 40
    for turn in range(1, 20):
        await services.conversations.add_message(conversation.id, "user", f"Turn {turn} {long_line}")
        await services.conversations.add_message(conversation.id, "assistant", f"Reply {turn} {long_line}")
        await summarizer.summarize(conversation.id)
    rows = await summary_rows(services, conversation.id)
    assert len(rows) == 17
    assert_additive(rows)
    bases = [index for index, (_, _, content) in enumerate(rows) if content.startswith("…\n")]
    assert bases and rows[bases[0] - 1][2].startswith("The user said: Turn 1 "), "no row extended before the cap"
    newest = rows[-1][2]
    assert newest.split("\n")[-2].startswith("The user said: Turn 17 ")
    assert newest.split("\n")[-1].startswith("You replied: Reply 17 ")
    assert "Turn 1 " not in newest  # the oldest lines are only in the older rows
    turn = await services.chat.begin(user.id, conversation, "What do you remember?")
    await turn.release()
    assert prompt_summary(turn.prompt) == newest
