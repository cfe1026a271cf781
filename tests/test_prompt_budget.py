"""The prompt's token budgets, as the README promises them: the history is cut to
LLM_CONTEXT_SIZE - LLM_MAX_TOKENS, oldest messages first (the new message is always kept), and the
long-term memories to MEMORY_TOKEN_BUDGET. Expected prompts are written out by hand for messages and
memories of known sizes (the estimate is about three characters a token, plus four)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from companion.llm.context import split_context
from companion.llm.scripted import ScriptedProvider
from companion.personalities.schemas import PersonalityCreate
from companion.services import Services
from tests.conftest import make_settings


def message(number: int) -> str:
    """60 characters: 24 tokens by the estimate."""
    return f"Message {number:02d}: " + "x" * 48


async def started(database_url: str, tmp_path: Path, **overrides: object) -> Services:
    services = Services.build(make_settings(database_url, tmp_path, **overrides), provider=ScriptedProvider())
    await services.start()
    return services


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Services]]:
    built: list[Services] = []
    yield built
    for services in built:
        await services.aclose()


@pytest.mark.parametrize(
    ("max_tokens", "kept"),
    [
        # A 256-token context; the system prompt ("You are Pip. Keep replies to a short paragraph
        # unless asked for more." and the rule for reading the context block) is 113 tokens, each
        # message 24; there is no context block (no memories, no summary).
        (8, [7, 8, 9, 10, 11]),  # 135 tokens left: the five newest
        (56, [9, 10, 11]),  # 87 left: the three newest
        (100, [11]),  # 43 left: only the new message
        (240, [11]),  # none left: the new message all the same
    ],
)
async def test_the_history_is_cut_to_the_context_minus_the_reply_oldest_first(
    database_url: str, tmp_path: Path, cleanup: list[Services], max_tokens: int, kept: list[int]
) -> None:
    services = await started(
        database_url, tmp_path, llm_context_size=256, llm_max_tokens=max_tokens, memory_enabled=False
    )
    cleanup.append(services)
    user = await services.users.create("alice")
    await services.personalities.create(
        user.id, PersonalityCreate(name="pip", description="Pip.", system_prompt="You are Pip.")
    )
    conversation = await services.conversations.create(user.id, "pip")
    for number in range(1, 11):
        await services.conversations.add_message(conversation.id, "user" if number % 2 else "assistant", message(number))

    turn = await services.chat.begin(user.id, conversation, message(11))
    await turn.release()
    assert turn.prompt[0].role == "system"
    assert turn.prompt[0].content.startswith("You are Pip. Keep replies to a short paragraph unless asked for more. ")
    assert [m.content for m in turn.prompt[1:]] == [message(n) for n in kept]
    assert turn.params.max_tokens == max_tokens


MEMORIES = [
    "I play the cello every Sunday.",
    "I grow tomatoes on my balcony.",
    "My sister Ana lives in Berlin.",
    "I am allergic to peanuts.",
]


@pytest.mark.parametrize(
    ("budget", "lines"),
    [
        # Each memory line ('- Sun 29 Nov 2026, the user said: "I am allergic to peanuts."') is 61
        # to 67 characters: 25 to 27 tokens; the recall brings at least two of the four.
        (0, 0),  # no memory fits: no context block at all
        (30, 1),  # any one fits, no two do (at least 50 tokens)
        (60, 2),  # any two fit (at most 54 tokens)
    ],
)
async def test_memories_in_the_prompt_are_cut_to_the_memory_token_budget(
    database_url: str, tmp_path: Path, cleanup: list[Services], budget: int, lines: int
) -> None:
    services = await started(database_url, tmp_path, memory_token_budget=budget)
    cleanup.append(services)
    user = await services.users.create("alice")
    for text in MEMORIES:
        assert await services.memories.add(user.id, text) is not None
    conversation = await services.conversations.create(user.id, "elara")

    question = "What do you know about my hobbies and my family?"
    turn = await services.chat.begin(user.id, conversation, question)
    await turn.release()
    context, text = split_context(turn.prompt[-1].content)
    assert text == question
    shown = [line for line in context.splitlines() if line.startswith("- ")]
    assert len(shown) == lines, context
    assert all(json.loads(line.split(" the user said: ", 1)[1]) in MEMORIES for line in shown), shown
    assert (context != "") == (lines > 0)
