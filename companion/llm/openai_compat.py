"""Any OpenAI-compatible server (OpenAI, Ollama, vLLM, llama.cpp server) through the `openai`
package, with its own timeouts and retries. Upstream failures become ProviderError (502) or
ProviderTimeout (504) with a message that names the upstream status but never its credentials."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai

from companion.errors import ProviderError, ProviderTimeout
from companion.llm.base import ChatMessage, Chunk, GenerationParams, Usage


class OpenAICompatibleProvider:
    name = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_seconds: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        self.model = model
        self._base_url = base_url
        # Local servers accept any key; the client insists on one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",
            timeout=timeout_seconds,
            max_retries=max_retries,
        )

    async def start(self) -> None:
        return None

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        completion_tokens = 0
        usage: Usage | None = None
        finish_reason: str | None = None
        try:
            response = await self._client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                stream=True,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                stream_options={"include_usage": True},
            )
            async with response:
                async for part in response:
                    if part.usage is not None:
                        usage = Usage(part.usage.prompt_tokens, part.usage.completion_tokens)
                    for choice in part.choices:
                        if choice.delta and choice.delta.content:
                            completion_tokens += 1
                            yield Chunk(text=choice.delta.content)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
        except openai.APITimeoutError as error:
            raise ProviderTimeout("The LLM server did not answer in time.") from error
        except openai.APIConnectionError as error:
            raise ProviderError("Cannot reach the LLM server; check LLM_BASE_URL and that it is running.") from error
        except openai.APIStatusError as error:
            raise ProviderError(f"The LLM server answered HTTP {error.status_code}.") from error
        except openai.OpenAIError as error:
            raise ProviderError("The LLM server sent an error mid-reply.") from error
        except ValueError as error:
            # Not the OpenAI streaming format (e.g. an event that is not JSON): still the upstream's fault.
            raise ProviderError("The LLM server sent a malformed reply.") from error
        yield Chunk(usage=usage or Usage(0, completion_tokens), finish_reason=finish_reason or "stop")

    def health(self) -> dict[str, Any]:
        return {"provider": self.name, "model": self.model, "status": "ok"}

    async def aclose(self) -> None:
        await self._client.close()
