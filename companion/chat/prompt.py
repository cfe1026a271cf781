"""Prompt assembly: the personality's system prompt, shaped by the user's preferences, then the
recent turns, newest kept first when the token budget is tight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from companion.llm.base import ChatMessage, estimate_tokens
from companion.personalities.schemas import PersonalityOut
from companion.preferences.schemas import Preferences

_LENGTH = {
    "short": "Keep replies short: one to three sentences.",
    "medium": "Keep replies to a short paragraph unless asked for more.",
    "long": "Detailed replies are welcome when the topic calls for them.",
}
_TONE = {"casual": "Use a casual, relaxed tone.", "neutral": "", "formal": "Use a polite, formal tone."}


def system_prompt(personality: PersonalityOut, preferences: Preferences) -> str:
    parts = [personality.system_prompt.strip()]
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
    running summary of older messages follow the system prompt."""
    text = system_prompt(personality, preferences)
    remembered = _within(memories, memory_budget)
    if remembered:
        text += "\n\nWhat you remember about the user from earlier conversations (use it when relevant):\n" + "\n".join(
            f"- {memory}" for memory in remembered
        )
    if summary:
        text += "\n\nSummary of the earlier conversation:\n" + summary
    system = ChatMessage("system", text)
    remaining = token_budget - estimate_tokens(system.content)
    kept: list[ChatMessage] = []
    for message in reversed(history):
        cost = estimate_tokens(message.content)
        if kept and cost > remaining:
            break
        kept.append(ChatMessage(message.role, message.content))  # type: ignore[arg-type]
        remaining -= cost
    kept.reverse()
    return [system, *kept]
