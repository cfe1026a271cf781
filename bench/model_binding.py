"""One llama.cpp binding measured on its own, in whatever venv runs this file (no companion imports:
`bench/model.py` runs it by path inside a fresh venv holding only that binding).

    python bench/model_binding.py --binding xllamacpp --model PATH.gguf [--threads 2 ...]

Prints JSON: load seconds; for 1, 4 and 8 concurrent streams (several rounds each), each stream's
time to its first token and the aggregate tokens per second (the median round's). The same chat prompt every time (a different user line per
stream), temperature 0.7, `max_tokens` new tokens. llama-cpp-python's `Llama` holds one sequence, so
its streams take turns behind a lock, as the service had to run them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SYSTEM = (
    "You are Elara, a warm and attentive companion. Listen closely, reflect back what the user feels, "
    "ask one gentle question at a time, and keep your replies short and kind."
)
NAMES = ("Ana", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana")


def messages(index: int) -> list[dict[str, str]]:
    name = NAMES[index % len(NAMES)]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Hi, I'm {name}. I had a long day at work and I'd like to talk about it."},
    ]


Streamer = Callable[[list[dict[str, str]], int], Iterator[str]]


def load_xllamacpp(model: str, threads: int, parallel: int, context: int) -> tuple[Streamer, Callable[[], None]]:
    import os
    import queue
    import secrets
    import shutil
    import tempfile

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.n_parallel = parallel
    params.n_ctx = context * parallel
    params.n_batch = 512
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 1
    params.ui = False
    params.verbosity = 0
    params.cache_ram_mib = 128
    socket_dir = tempfile.mkdtemp()
    params.hostnames = [os.path.join(socket_dir, "llama.sock")]
    params.api_keys = [secrets.token_urlsafe(16)]
    server = xllamacpp.Server(params)

    def stream(prompt: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
        chunks: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        request = {"messages": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0.7}

        def on_chunk(part: dict[str, Any]) -> bool:
            for choice in part.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    chunks.put(text)
            return False

        def run() -> None:
            try:
                server.handle_chat_completions(request, on_chunk)
            finally:
                chunks.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (text := chunks.get()) is not None:
            yield text

    def close() -> None:
        shutil.rmtree(socket_dir, ignore_errors=True)

    return stream, close


def load_llama_cpp_python(model: str, threads: int, parallel: int, context: int) -> tuple[Streamer, Callable[[], None]]:
    from llama_cpp import Llama

    llama = Llama(model_path=model, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
    lock = threading.Lock()

    def stream(prompt: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
        with lock:
            for part in llama.create_chat_completion(
                messages=prompt,  # type: ignore[arg-type]
                stream=True,
                max_tokens=max_tokens,
                temperature=0.7,
            ):
                text = part["choices"][0].get("delta", {}).get("content")  # type: ignore[index]
                if text:
                    yield text

    return stream, llama.close


def concurrent(stream: Streamer, count: int, max_tokens: int, offset: int) -> dict[str, Any]:
    first: list[float] = [0.0] * count
    tokens: list[int] = [0] * count
    began = time.perf_counter()

    def one(index: int) -> None:
        for _ in stream(messages(offset + index), max_tokens):
            if not first[index]:
                first[index] = time.perf_counter() - began
            tokens[index] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {"first_token_s": first, "tokens": sum(tokens), "elapsed_s": elapsed, "tokens_per_s": sum(tokens) / elapsed}


def main() -> None:
    import os

    # As companion.llm.local does (both bindings use OpenMP): passive waiting, see there.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser()
    parser.add_argument("--binding", choices=("xllamacpp", "llama-cpp-python"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="xllamacpp slots")
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loader = load_xllamacpp if args.binding == "xllamacpp" else load_llama_cpp_python
    started = time.perf_counter()
    stream, close = loader(args.model, args.threads, args.parallel, args.context)
    result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    for _ in stream(messages(99), 4):  # warm-up: the system prompt is now in the cache
        pass
    result["runs"] = {}
    for offset, count in enumerate(int(c) for c in args.concurrency.split(",")):
        # Several rounds, because other work on a shared machine moves any single one a lot: every
        # stream's first token across the rounds, and the median round's aggregate rate.
        rounds = [concurrent(stream, count, args.max_tokens, offset * 8 + r) for r in range(args.rounds)]
        result["runs"][str(count)] = {
            "first_token_s": [f for r in rounds for f in r["first_token_s"]],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
            "rounds": rounds,
        }
    close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
