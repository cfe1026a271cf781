"""The memory evaluation: every user message of the frozen conversations (bench/data/memory_eval.json)
is remembered as the chat turn would remember it (`MemoryService.extract`: episodes and facts, with
the session's date), then each question goes to `MemoryService.search` (what `GET /v1/memories?query=`
answers) and is judged by where its evidence messages are.

    python -m bench --only memory-eval --output .bench/memory.md   # the test part, on PostgreSQL
    python -m bench.memory_eval                                     # the test part, on SQLite
    python -m bench.memory_eval --split dev --mode meaning          # tuning: the development part only

Figures:
- evidence recall@k: the share of a question's evidence messages among the sources of the top k
  memories (`source_message_id`), averaged over questions (a two-memory question found half way
  counts one half);
- answer-in-memories@5: one of the answer's words (or, for a date, its ISO form among the dates
  resolved in a memory or the day it was said) in the top 5 memories;
- false-memory rate: the share of small-talk messages that left a fact (episodes are not facts);
- everyday self-disclosures recall@3: each fact alone in a message, its question's top 3.

The file's SHA-256 is checked, so a changed question cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from bench.memory_eval_data import PATH
from companion.config import load_settings
from companion.memory.fulltext import terms
from companion.memory.store import MemoryOut
from companion.services import Services
from companion.storage import migrate
from companion.storage.database import Database

DATA_SHA256 = "556335eac808daee02178cd9e65a1cbbae6f71ce5f7c7f8e972413c9733622b0"
Mode = Literal["hybrid", "meaning", "words"]
KS = (3, 5, 10)


@dataclass
class Figures:
    split: str
    mode: str
    questions: int = 0
    recall: dict[int, float] = field(default_factory=dict)
    answer_at_5: float = 0.0
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {"n", "recall@10", "recall@5"}
    chitchat: int = 0
    false_memories: int = 0
    disclosures: dict[str, float] = field(default_factory=dict)  # source -> recall@3
    messages: int = 0
    episodes: int = 0
    facts: int = 0
    bytes_per_memory: float = 0.0
    remember_ms: float = 0.0  # median time to remember one message (embedding included)
    search_ms: float = 0.0  # median time of one search

    @property
    def false_memory_rate(self) -> float:
        return self.false_memories / self.chitchat if self.chitchat else 0.0

    def lines(self) -> list[str]:
        out = [
            f"split {self.split}, {self.mode} search: {self.questions} questions over {self.messages} messages "
            f"({self.episodes} episodes, {self.facts} facts, {self.bytes_per_memory:.0f} bytes per memory)",
            "evidence recall " + ", ".join(f"@{k} {self.recall[k]:.3f}" for k in KS),
            f"answer in memories @5 {self.answer_at_5:.3f}",
            f"false-memory rate on small talk {self.false_memory_rate:.3f} ({self.false_memories} of {self.chitchat})",
            "everyday self-disclosures recall@3 "
            + ", ".join(f"{source} {value:.3f}" for source, value in self.disclosures.items()),
        ]
        for kind, values in sorted(self.by_kind.items()):
            out.append(f"  {kind}: n={values['n']:.0f} recall@5 {values['recall@5']:.3f} recall@10 {values['recall@10']:.3f}")
        out.append(f"remember one message p50 {self.remember_ms:.1f} ms, search p50 {self.search_ms:.1f} ms")
        return out


def load() -> dict[str, Any]:
    raw = PATH.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DATA_SHA256:
        raise SystemExit(f"{PATH} changed (sha256 {digest}); the evaluation's questions are frozen")
    return json.loads(raw)  # type: ignore[no-any-return]


async def _search(services: Services, user: uuid.UUID, question: str, k: int, mode: Mode) -> list[MemoryOut]:
    memories = services.memories
    if mode == "hybrid":
        return await memories.search(user, question, limit=k)
    (vector,) = await memories.embedder.embed([question])
    if mode == "meaning":
        return await memories.store.search(user, vector, k)
    return await memories.store.text_search(user, terms(question), vector, k)


def _answered(answer: list[str], memories: list[MemoryOut]) -> bool:
    haystack = []
    for memory in memories:
        haystack.append(memory.text.casefold())
        haystack += [f"{d.start.isoformat()} {d.end.isoformat()}" for d in memory.dates]
        if memory.said_at is not None:
            haystack.append(memory.said_at.date().isoformat())
    text = "\n".join(haystack)
    return any(a.casefold() in text for a in answer)


async def evaluate(services: Services, data: dict[str, Any], *, split: str, mode: Mode = "hybrid") -> Figures:
    figures = Figures(split, mode)
    recalls: dict[int, list[float]] = {k: [] for k in KS}
    answered: list[bool] = []
    kinds: dict[str, dict[int, list[float]]] = defaultdict(lambda: {5: [], 10: []})
    remember_ms: list[float] = []
    search_ms: list[float] = []
    for person in data["people"]:
        if person["split"] != split:
            continue
        user = (await services.users.create(f"memory-eval-{person['person']}")).id
        for session in person["sessions"]:
            day = datetime.fromisoformat(session["date"]).replace(hour=12, tzinfo=UTC)
            for minute, message in enumerate(session["messages"]):
                started = time.perf_counter()
                facts = await services.memories.extract(
                    user, None, message["id"], message["text"], said_at=day + timedelta(minutes=minute)
                )
                remember_ms.append((time.perf_counter() - started) * 1000)
                figures.messages += 1
                if message["chitchat"]:
                    figures.chitchat += 1
                    figures.false_memories += bool(facts)
        figures.episodes += await services.memories.store.count(user, scope="episodes")
        figures.facts += await services.memories.store.count(user, scope="facts")
        for question in person["questions"]:
            started = time.perf_counter()
            found = await _search(services, user, question["question"], max(KS), mode)
            search_ms.append((time.perf_counter() - started) * 1000)
            evidence = set(question["evidence"])
            for k in KS:
                sources = {m.source_message_id for m in found[:k]}
                recalls[k].append(len(evidence & sources) / len(evidence))
            for k in (5, 10):
                kinds[question["kind"]][k].append(recalls[k][-1])
            answered.append(_answered(question["answer"], found[:5]))
            figures.questions += 1
    figures.recall = {k: statistics.fmean(values) for k, values in recalls.items()}
    figures.answer_at_5 = statistics.fmean(answered)
    figures.by_kind = {
        kind: {"n": float(len(v[10])), "recall@5": statistics.fmean(v[5]), "recall@10": statistics.fmean(v[10])}
        for kind, v in kinds.items()
    }
    figures.disclosures = await _disclosures(services, data, mode)
    figures.bytes_per_memory = await _bytes_per_memory(services)
    figures.remember_ms = statistics.median(remember_ms)
    figures.search_ms = statistics.median(search_ms)
    return figures


async def _disclosures(services: Services, data: dict[str, Any], mode: Mode) -> dict[str, float]:
    user = (await services.users.create("memory-eval-disclosures")).id
    pairs = data["disclosures"]
    for message_id, pair in enumerate(pairs, start=1):
        await services.memories.extract(user, None, message_id, pair["fact"])
    hits: dict[str, list[bool]] = defaultdict(list)
    for message_id, pair in enumerate(pairs, start=1):
        found = await _search(services, user, pair["question"], 3, mode)
        hits[pair["source"]].append(message_id in {m.source_message_id for m in found})
    hits["all"] = [hit for source in ("project", "new") for hit in hits.get(source, [])]
    return {source: statistics.fmean(values) for source, values in hits.items() if values}


async def _bytes_per_memory(services: Services) -> float:
    """The table's rows and indexes over its row count (SQLite: dbstat if compiled in, else the file;
    PostgreSQL: pg_total_relation_size of `memories`, its indexes and TOAST included)."""
    from sqlalchemy import text

    async with services.database.session() as session:
        count = int(await session.scalar(text("SELECT count(*) FROM memories")) or 0)
        if not count:
            return 0.0
        if services.database.dialect == "postgresql":
            size = await session.scalar(text("SELECT pg_total_relation_size('memories')"))
        else:
            try:
                size = await session.scalar(
                    text("SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'memories%' OR name LIKE 'ix_memories%'")
                )
            except Exception:  # dbstat not compiled in: the whole file, an upper bound
                page = await session.scalar(text("PRAGMA page_size"))
                pages = await session.scalar(text("PRAGMA page_count"))
                size = int(page or 0) * int(pages or 0)
    return float(size or 0) / count


async def recall_latency(services: Services, data: dict[str, Any], *, memories: int = 10_000, rounds: int = 100) -> dict[str, tuple[float, float]]:
    """p50 (wall ms, this process's CPU ms) of `MemoryService.recall` for a new message, for a user with
    `memories` memories (the evaluation's sentences, random unit vectors), hybrid and meaning only,
    interleaved so that a busy machine weighs on both alike. The deadline is lifted to see the cost."""
    import numpy as np
    from sqlalchemy import insert, update

    from companion.storage.models import Memory, User

    memory = services.memories
    saved = memory.config
    memory.config = dataclasses.replace(saved, deadline_seconds=60.0)
    texts = [m["text"] for p in data["people"] for s in p["sessions"] for m in s["messages"] if not m["chitchat"]]
    questions = [q["question"] for p in data["people"] for q in p["questions"]]
    user = (await services.users.create("memory-eval-latency")).id
    rng = np.random.default_rng(12)
    vectors = rng.standard_normal((memories, memory.embedder.dimensions)).astype("<f4")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "user_id": user,
            "text": f"{texts[i % len(texts)]} ({i})",
            "kind": "fact" if i % 3 == 0 else "episode",
            "embedding": vectors[i].tobytes(),
            "model": memory.embedder.model_id,
            "created_at": start + timedelta(seconds=i),
            "updated_at": start + timedelta(seconds=i),
            "said_at": start + timedelta(seconds=i),
        }
        for i in range(memories)
    ]
    async with services.database.session() as session:
        for i in range(0, memories, 1000):
            await session.execute(insert(Memory), rows[i : i + 1000])
        await session.execute(update(User).where(User.id == user).values(memory_generation=User.memory_generation + 1))
    generation = await memory.store.generation(user)
    await memory.recall(user, "warm up", generation=generation)
    store: Any = memory.store
    match = store.match

    async def no_words(*args: Any, **kwargs: Any) -> list[uuid.UUID]:
        return []

    samples: dict[str, list[tuple[float, float]]] = {"hybrid": [], "meaning only": []}
    try:
        for i in range(rounds):
            for label in samples:
                store.match = match if label == "hybrid" else no_words  # this instance only, restored below
                question = f"{questions[i % len(questions)]} ({label} {i})"
                wall, cpu = time.perf_counter(), time.process_time()
                await memory.recall(user, question, generation=generation)
                samples[label].append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
    finally:
        store.match = match
        memory.config = saved
    return {label: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for label, s in samples.items()}


async def run_sqlite(split: str, mode: Mode, *, latency: bool = False, **tuning: Any) -> Figures:
    data = load()
    with tempfile.TemporaryDirectory(prefix="memory-eval-") as workdir:
        url = f"sqlite+aiosqlite:///{workdir}/eval.db"
        database = Database(url)
        try:
            await migrate.upgrade(database)
        finally:
            await database.dispose()
        settings = load_settings(
            _env_file=None,
            database_url=url,
            data_dir=Path(workdir),
            llm_provider="scripted",
            auto_migrate=False,
            redis_enabled=False,
            log_level="WARNING",
        )
        services = Services.build(settings)
        services.memories.config = dataclasses.replace(services.memories.config, **tuning)
        await services.start(load_model=False)
        try:
            figures = await evaluate(services, data, split=split, mode=mode)
            if latency:
                for label, (wall, cpu) in (await recall_latency(services, data)).items():
                    print(f"recall at 10,000 memories, a new message, {label}: p50 {wall:.1f} ms ({cpu:.1f} ms CPU)")
            return figures
        finally:
            await services.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    parser.add_argument("--mode", choices=["hybrid", "meaning", "words"], default="hybrid")
    parser.add_argument("--latency", action="store_true", help="also time recall at 10,000 memories")
    parser.add_argument("--rrf-k", type=int, default=None, help="tuning: the fusion's k")
    parser.add_argument("--text-weight", type=float, default=None, help="tuning: the word ranking's weight")
    args = parser.parse_args(argv)
    tuning = {name: value for name, value in (("rrf_k", args.rrf_k), ("text_weight", args.text_weight)) if value is not None}
    if tuning and args.split == "test":
        parser.error("tune on --split dev only")
    figures = asyncio.run(run_sqlite(args.split, args.mode, latency=args.latency, **tuning))
    print("\n".join(figures.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


async def run(env: Any) -> Any:
    """The `memory-eval` group of `python -m bench`: the test part on the run's PostgreSQL."""
    from bench.report import Outcome, Section, Table

    services = await env.services(redis=False)
    data = load()
    figures = await evaluate(services, data, split="test")
    latency = await recall_latency(services, data)
    await env.close_services(services)
    kinds = ", ".join(f"{kind} {v['recall@10']:.2f} (n={v['n']:.0f})" for kind, v in sorted(figures.by_kind.items()))
    table = Table(
        ["figure (test part)", "measured", "goal"],
        [
            ["evidence recall@3", f"{figures.recall[3]:.3f}", ""],
            ["evidence recall@5", f"{figures.recall[5]:.3f}", "≥ 0.75"],
            ["evidence recall@10", f"{figures.recall[10]:.3f}", "≥ 0.85"],
            ["answer in memories@5", f"{figures.answer_at_5:.3f}", ""],
            [
                "false-memory rate on small talk",
                f"{figures.false_memory_rate:.3f} ({figures.false_memories} of {figures.chitchat})",
                "≤ 0.10",
            ],
            [
                "everyday self-disclosures recall@3",
                f"{figures.disclosures['all']:.3f} (the project's {figures.disclosures['project']:.3f}, "
                f"new {figures.disclosures['new']:.3f})",
                "≥ 0.95",
            ],
            ["bytes per memory (table, indexes, TOAST)", f"{figures.bytes_per_memory:.0f}", ""],
            ["remember one message, p50 (background)", f"{figures.remember_ms:.1f} ms", ""],
            ["search, p50", f"{figures.search_ms:.1f} ms", ""],
            *[
                [f"recall at 10,000 memories, a new message, {label}, p50 (CPU)", f"{wall:.1f} ms ({cpu:.1f} ms)", "< 15 ms"]
                for label, (wall, cpu) in latency.items()
            ],
        ],
        right={1},
    )
    section = Section(
        title="Memory evaluation",
        intro=f"{figures.questions} questions over {figures.messages} user messages of the frozen conversations "
        f"(bench/data/memory_eval.json, test part), remembered as {figures.episodes} episodes and {figures.facts} facts, "
        f"searched as `GET /v1/memories?query=` does. Evidence recall@10 by kind: {kinds}.",
        tables=[table],
    )
    outcome = Outcome(sections=[section])
    outcome.figures.update(
        {
            "memory_eval.recall@5": figures.recall[5],
            "memory_eval.recall@10": figures.recall[10],
            "memory_eval.false_memory_rate": figures.false_memory_rate,
            "memory_eval.disclosures@3": figures.disclosures["all"],
            "memory_eval.recall_10k.p50_ms": latency["hybrid"][0],
        }
    )
    return outcome
