"""A deterministic provider for tests and benchmarks: instant, scripted replies, and a record of
every prompt it was given. It never calls a model. Select it with LLM_PROVIDER=scripted."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from companion.errors import ProviderError, ProviderTimeout
from companion.llm.base import ChatMessage, Chunk, GenerationParams, Usage, estimate_tokens
from companion.llm.context import split_context

_TOKEN_RE = re.compile(r"\S+\s*|\s+")


@dataclass
class ScriptedReply:
    """One scripted reply. Tokens are whitespace-delimited words.

    fail_after: raise ProviderError after this many tokens (0: before the first one).
    timeout_after: raise ProviderTimeout after this many tokens.
    hang_after: after this many tokens, wait until the consumer goes away (a stuck model).
    gate: when set, each token waits for one release of this semaphore (lets a test pace tokens).
    prompt_tokens: the prompt size to report instead of the estimate (lets a test check that the
    provider's own figure is what reaches the client and the database).
    """

    text: str
    fail_after: int | None = None
    timeout_after: int | None = None
    hang_after: int | None = None
    gate: asyncio.Semaphore | None = None
    prompt_tokens: int | None = None


def default_reply(messages: Sequence[ChatMessage]) -> str:
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    return f"You said: {split_context(last_user)[1]}"  # what the user typed, not the notes before it


class ScriptedProvider:
    name = "scripted"

    def __init__(self, replies: Sequence[str | ScriptedReply] = (), *, model: str = "scripted") -> None:
        self.model = model
        self._script: list[ScriptedReply] = [r if isinstance(r, ScriptedReply) else ScriptedReply(r) for r in replies]
        self.prompts: list[list[ChatMessage]] = []
        self.params: list[GenerationParams] = []

    def queue(self, *replies: str | ScriptedReply) -> None:
        self._script.extend(r if isinstance(r, ScriptedReply) else ScriptedReply(r) for r in replies)

    async def start(self) -> None:
        return None

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        self.prompts.append(list(messages))
        self.params.append(params)
        reply = self._script.pop(0) if self._script else ScriptedReply(default_reply(messages))
        all_tokens = _TOKEN_RE.findall(reply.text)
        tokens = all_tokens[: params.max_tokens]
        prompt_tokens = reply.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = sum(estimate_tokens(m.content) for m in messages)
        for index, token in enumerate(tokens):
            if reply.fail_after == index:
                raise ProviderError("The scripted provider failed as scripted.")
            if reply.timeout_after == index:
                raise ProviderTimeout("The scripted provider timed out as scripted.")
            if reply.hang_after == index:
                await asyncio.Event().wait()
            if reply.gate is not None:
                await reply.gate.acquire()
            yield Chunk(text=token)
        if reply.fail_after is not None and reply.fail_after >= len(tokens):
            raise ProviderError("The scripted provider failed as scripted.")
        yield Chunk(
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens)),
            finish_reason="length" if len(all_tokens) > len(tokens) else "stop",
        )

    def health(self) -> dict[str, Any]:
        return {"provider": self.name, "model": self.model, "status": "ok"}

    async def aclose(self) -> None:
        return None
