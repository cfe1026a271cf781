"""Prompt assembly: the personality's system prompt, shaped by the user's preferences, then the
recent turns, newest kept first when the token budget is tight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from companion.interchange.cards import character_name, fill_char, fill_user
from companion.llm.base import ChatMessage, estimate_tokens
from companion.personalities import lorebook
from companion.personalities.schemas import PersonalityOut
from companion.preferences.schemas import Preferences

_LENGTH = {
    "short": "Keep replies short: one to three sentences.",
    "medium": "Keep replies to a short paragraph unless asked for more.",
    "long": "Detailed replies are welcome when the topic calls for them.",
}
_TONE = {"casual": "Use a casual, relaxed tone.", "neutral": "", "formal": "Use a polite, formal tone."}


LORE_TOKENS = 400  # at most this much of a character card's lorebook goes into one prompt


def user_name(preferences: Preferences) -> str:
    """What `{{user}}` in a character card stands for."""
    return preferences.preferred_name or "User"


def system_prompt(personality: PersonalityOut, preferences: Preferences) -> str:
    parts = [fill_user(personality.system_prompt.strip(), user_name(preferences))]
    if preferences.preferred_name:
        parts.append(f"Address the user as {preferences.preferred_name}.")
    parts.append(_LENGTH[preferences.reply_length])
    if _TONE[preferences.tone]:
        parts.append(_TONE[preferences.tone])
    if preferences.language:
        parts.append(f"Always reply in {preferences.language}.")
    if preferences.interests:
        parts.append("The user is interested in: " + ", ".join(preferences.interests) + ".")
    return " ".join(parts)


def _within(memories: Sequence[str], budget: int) -> list[str]:
    kept: list[str] = []
    for memory in memories:
        cost = estimate_tokens(memory) + 1
        if cost > budget:
            break
        kept.append(memory)
        budget -= cost
    return kept


class Turnlike(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def build_prompt(
    personality: PersonalityOut,
    preferences: Preferences,
    history: Sequence[Turnlike],
    *,
    token_budget: int,
    summary: str | None = None,
    memories: Sequence[str] = (),
    memory_budget: int = 200,
) -> list[ChatMessage]:
    """`history` is oldest first and ends with the new user message, which is always kept. The
    long-term memories (most relevant first, as many as fit in `memory_budget` tokens) and the
    running summary of older messages follow the system prompt. A character card adds the lorebook
    entries the recent messages call up (around the system prompt) and its post-history
    instructions (last)."""
    text = system_prompt(personality, preferences)
    card = personality.card.data if personality.card is not None else None
    post_history: ChatMessage | None = None
    if card is not None:
        lore = lorebook.select(card.character_book, [m.content for m in history], budget=LORE_TOKENS)
        char, user = character_name(card), user_name(preferences)
        fill = lambda entries: [fill_user(fill_char(entry, char), user) for entry in entries]  # noqa: E731
        text = "\n\n".join([*fill(lore.before), text, *fill(lore.after)])
        if card.post_history_instructions.strip():
            post_history = ChatMessage(
                "system", fill_user(fill_char(card.post_history_instructions.strip(), char), user)
            )
    remembered = _within(memories, memory_budget)
    if remembered:
        text += "\n\nWhat you remember about the user from earlier conversations (use it when relevant):\n" + "\n".join(
            f"- {memory}" for memory in remembered
        )
    if summary:
        text += "\n\nSummary of the earlier conversation:\n" + summary
    system = ChatMessage("system", text)
    remaining = token_budget - estimate_tokens(system.content)
    if post_history is not None:
        remaining -= estimate_tokens(post_history.content)
    kept: list[ChatMessage] = []
    for message in reversed(history):
        cost = estimate_tokens(message.content)
        if kept and cost > remaining:
            break
        kept.append(ChatMessage(message.role, message.content))  # type: ignore[arg-type]
        remaining -= cost
    kept.reverse()
    # A card's post-history instructions come after the conversation, where they weigh most.
    return [system, *kept, *([post_history] if post_history is not None else [])]
