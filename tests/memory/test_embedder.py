"""The embedder: the int8 ONNX model matches the vectors sentence-transformers itself computed
(tests/data/minilm_reference.json, made by scripts/reference-vectors.py), runs off the event loop,
and merges concurrent requests into shared batches."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest

from companion.memory.embedder import DIMENSIONS, OnnxEmbedder, bundled_model_path

REFERENCE = json.loads((pathlib.Path(__file__).parent.parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture
async def embedder() -> AsyncIterator[OnnxEmbedder]:
    built = OnnxEmbedder(threads=1)
    await built.start()
    yield built
    await built.aclose()


def test_the_model_comes_from_the_installed_package_not_a_download() -> None:
    path = bundled_model_path()
    assert path.is_file()
    assert {"site-packages", "dist-packages"} & set(path.parts), path


async def test_vectors_match_sentence_transformers_reference(embedder: OnnxEmbedder) -> None:
    vectors = await embedder.embed(REFERENCE["sentences"])
    reference = np.array(REFERENCE["vectors"], dtype=np.float32)
    cosines = (vectors * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert vectors.shape == (len(REFERENCE["sentences"]), DIMENSIONS)
    assert cosines.min() >= 0.99, cosines


async def test_vectors_are_unit_length_and_independent_of_batch_company(embedder: OnnxEmbedder) -> None:
    alone = (await embedder.embed(["My sister Ana lives in Berlin."]))[0]
    together = (await embedder.embed(["My sister Ana lives in Berlin.", "x " * 200]))[0]
    assert abs(float(np.linalg.norm(alone)) - 1) < 1e-4
    assert float(alone @ together) > 0.9999  # padding to a longer neighbour changes nothing


async def test_meaning_decides_similarity(embedder: OnnxEmbedder) -> None:
    fact, question, unrelated = await embedder.embed(
        ["The user's sister Ana lives in Berlin.", "Where does my sister live?", "The stock market fell today."]
    )
    assert float(fact @ question) > float(fact @ unrelated) + 0.2


async def test_concurrent_requests_share_batches(embedder: OnnxEmbedder) -> None:
    before = embedder.batches
    texts = [f"sentence number {i}" for i in range(24)]
    results = await asyncio.gather(*(embedder.embed([text]) for text in texts))
    assert embedder.batches - before < len(texts)
    singly = await embedder.embed(texts[:1])
    assert float(results[0][0] @ singly[0]) > 0.9999


async def test_inference_runs_off_the_event_loop(embedder: OnnxEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    encode = embedder._encode

    def recording(texts: list[str]) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return encode(texts)

    monkeypatch.setattr(embedder, "_encode", recording)
    await embedder.embed(["hello"])
    assert threads and all(name.startswith("embed") for name in threads)
    assert threading.current_thread().name not in threads


async def test_empty_long_and_odd_inputs(embedder: OnnxEmbedder) -> None:
    assert (await embedder.embed([])).shape == (0, DIMENSIONS)
    vectors = await embedder.embed(["", "word " * 5000, "🙂\u200b\u202eabc\x00", "companion:v1:{u:x}:memsearch"])
    assert vectors.shape == (4, DIMENSIONS)
    assert np.isfinite(vectors).all()


async def test_a_caller_that_gives_up_does_not_break_the_others(embedder: OnnxEmbedder) -> None:
    abandoned = asyncio.ensure_future(embedder.embed(["first"]))
    kept = asyncio.ensure_future(embedder.embed(["second"]))
    abandoned.cancel()
    vector = await kept
    assert vector.shape == (1, DIMENSIONS)
    assert (await embedder.embed(["third"])).shape == (1, DIMENSIONS)


async def test_a_text_embedded_again_soon_costs_no_inference(embedder: OnnxEmbedder) -> None:
    """A turn embeds the user's message to recall with it, then again as the episode it keeps: the
    second time comes from the recent vectors, identical; a new text still runs the model."""
    text = "I went hiking in the mountains with my sister Anna last weekend (embedder cache test)."
    (first,) = await embedder.embed([text])
    before = embedder.batches
    again, other = await embedder.embed([text, "A text this test has not embedded before."])
    assert embedder.batches - before == 1  # only the new text ran
    assert np.array_equal(first, again)
    (repeated,) = await embedder.embed([text])
    assert embedder.batches - before == 1 and np.array_equal(first, repeated)
    assert float(other @ first) < 0.9
