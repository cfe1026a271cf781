"""The LLM provider interface: one streaming call, plus start-up and shutdown.

Implementations: `LlamaCppProvider` (local, the default), `OpenAICompatibleProvider` (any server
speaking the OpenAI API) and `ScriptedProvider` (deterministic, for tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    repeat_penalty: float = 1.1


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """The `usage` object both APIs return (OpenAI's field names)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a reply: some text, or (last) the usage and why generation stopped."""

    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None


class LLMProvider(Protocol):
    name: str
    model: str

    async def start(self) -> None:
        """Load models or open clients. Called once by the app's lifespan before serving."""

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        """Generate a reply token by token.

        Raises ProviderError (HTTP 502) when the provider fails, ProviderTimeout (504) when it does
        not answer in time. Closing the iterator early stops generation.
        """
        ...

    def health(self) -> dict[str, Any]:
        """A small, secret-free description for /health."""
        ...

    async def aclose(self) -> None:
        """Release models, threads and connections."""


def estimate_tokens(text: str) -> int:
    """A conservative token estimate (about 3 characters a token for English BPE vocabularies)."""
    return len(text) // 3 + 4


async def complete(provider: LLMProvider, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
    """The whole reply as one string, for background work (summaries, memory extraction). Raises
    what `stream` raises."""
    return "".join([chunk.text async for chunk in provider.stream(messages, params)])
