"""The prompt's token budgets, as the README promises them: the history is cut to
LLM_CONTEXT_SIZE - LLM_MAX_TOKENS, oldest messages first (the new message is always kept), and the
long-term memories to MEMORY_TOKEN_BUDGET. Expected prompts are written out by hand for messages and
memories of known sizes (the estimate is about three characters a token, plus four)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from companion.llm.scripted import ScriptedProvider
from companion.personalities.schemas import PersonalityCreate
from companion.services import Services
from tests.conftest import make_settings

MEMORY_HEADER = "What you remember about the user from earlier conversations (use it when relevant):"


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
        # A 256-token context; the system prompt "You are Pip. Keep replies to a short paragraph
        # unless asked for more." is 27 tokens, each message 24.
        (56, [5, 6, 7, 8, 9, 10, 11]),  # 173 tokens left: the seven newest
        (128, [8, 9, 10, 11]),  # 101 left: the four newest
        (200, [11]),  # 29 left: only the new message
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
    assert turn.prompt[0].content == "You are Pip. Keep replies to a short paragraph unless asked for more."
    assert [m.content for m in turn.prompt[1:]] == [message(n) for n in kept]
    assert turn.params.max_tokens == max_tokens


MEMORIES = [  # 15 to 18 tokens each as stored ("The user plays the cello every Sunday.")
    "I play the cello every Sunday.",
    "I grow tomatoes on my balcony.",
    "My sister Ana lives in Berlin.",
    "I am allergic to peanuts.",
]


@pytest.mark.parametrize(
    ("budget", "lines"),
    [
        (0, 0),  # no memory fits: no memory section at all
        (20, 1),  # any one fits (at most 18 tokens), no two do (at least 32)
        (40, 2),  # any two fit (at most 36 tokens), no three do (at least 47)
    ],
)
async def test_memories_in_the_prompt_are_cut_to_the_memory_token_budget(
    database_url: str, tmp_path: Path, cleanup: list[Services], budget: int, lines: int
) -> None:
    services = await started(database_url, tmp_path, memory_token_budget=budget)
    cleanup.append(services)
    user = await services.users.create("alice")
    stored = {(await services.memories.add(user.id, text)).text for text in MEMORIES}  # type: ignore[union-attr]
    assert len(stored) == 4
    conversation = await services.conversations.create(user.id, "elara")

    turn = await services.chat.begin(user.id, conversation, "What do you know about my hobbies and my family?")
    await turn.release()
    system = turn.prompt[0].content
    shown = [line[2:] for line in system.split("\n") if line.startswith("- ")]
    assert len(shown) == lines, system
    assert set(shown) <= stored
    assert (MEMORY_HEADER in system) == (lines > 0)
