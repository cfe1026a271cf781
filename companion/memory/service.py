"""Long-term memory: what the companion keeps about each user, and how it finds it again.

- After each exchange, in the background, `schedule_extraction` keeps the user's message as
  episodes (its passages, verbatim) and finds durable facts in it (rules, the LLM, or both), each
  pointing to its episode. A fact close to one already kept (cosine ≥ the dedupe threshold) replaces
  it instead of adding a second. Every memory records its source message, when it was said, and the
  relative dates in it resolved against that time.
- Before generating, `recall` returns the memories most relevant to the new message (by meaning
  and by words, fused by rank) plus the most recent facts, through the memory-search cache (keyed by
  the user's memory generation, read from the database), within a deadline: past it, the reply goes
  ahead without memories.
- The user lists, searches, adds and deletes memories (`/v1/memories`); a deletion bumps the
  generation in the same transaction, so no cache on any instance can return the memory again.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from companion.cache.codec import ModelCodec
from companion.cache.memory_search import MemorySearchCache
from companion.errors import CompanionError, Conflict
from companion.llm.base import LLMProvider
from companion.locks import KeyedLocks
from companion.memory import when
from companion.memory.embedder import Embedder
from companion.memory.episodes import passages
from companion.memory.extract import Fact, clean, llm_facts, rule_facts
from companion.memory.fulltext import EPISODE, RRF_K, TEXT_WEIGHT, Scope, fuse, terms
from companion.memory.store import MemoryOut, NewMemory, VectorStore
from companion.types import Clock, utcnow

logger = logging.getLogger(__name__)
Extractor = Literal["rules", "llm", "both"]


@dataclass(frozen=True)
class MemoryConfig:
    enabled: bool = True
    extractor: Extractor = "rules"
    top_k: int = 5
    recent: int = 2
    min_score: float = 0.3
    dedupe_threshold: float = 0.9
    deadline_seconds: float = 0.05
    max_per_user: int = 10_000
    episodes: bool = True  # keep what the user said, verbatim, beside the facts
    # Hybrid search: each ranking (meaning, words) offers this many candidates to the fusion.
    candidates: int = 30
    rrf_k: int = RRF_K
    text_weight: float = TEXT_WEIGHT  # the word ranking's weight in the fusion (the meaning ranking's is 1)
    # A memory found by its words enters a prompt if its cosine is at least this (lower than
    # `min_score`: the words already say it is about the question).
    text_min_score: float = 0.1


@dataclass
class MemoryStats:
    recalls: int = 0
    recall_timeouts: int = 0
    recall_failures: int = 0
    added: int = 0
    updated: int = 0
    episodes: int = 0
    evicted: int = 0
    extraction_failures: int = 0


class _Recalled(BaseModel):
    memories: list[MemoryOut]


_CODEC = ModelCodec(_Recalled)


def memory_disabled() -> Conflict:
    return Conflict(
        "Long-term memory is turned off on this server (MEMORY_ENABLED=false); stored memories can still be "
        "listed and deleted.",
        code="memory_disabled",
    )


class MemoryService:
    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        cache: MemorySearchCache,
        *,
        provider: LLMProvider | None = None,
        config: MemoryConfig | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self._cache = cache
        self._provider = provider
        self.config = config or MemoryConfig()
        self._clock = clock
        self.stats = MemoryStats()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._writers: KeyedLocks[uuid.UUID] = KeyedLocks()  # one writer per user in this instance
        self._cleared: dict[uuid.UUID, datetime] = {}  # when each user last forgot everything (here)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    async def start(self) -> None:
        if self.enabled:
            await self.embedder.start()

    async def aclose(self) -> None:
        await self.wait_idle()
        await self.embedder.aclose()

    # --- recall, for prompts ---------------------------------------------------------------------

    async def recall(self, user_id: uuid.UUID, query: str, *, generation: int | None = None) -> list[MemoryOut]:
        """The memories to put in the prompt answering `query`: relevant ones first, then recent
        ones. Never raises: on a timeout or a failure the reply goes ahead without memories.
        `generation`: the user's memory generation, if the caller read it from the database just now
        (a chat turn reads it with the user's message); otherwise it is read here."""
        if not self.enabled:
            return []
        self.stats.recalls += 1
        # Past the deadline the reply goes ahead, but the search itself runs on in the background:
        # the vectors it loads and the result it caches make the next recall fast (a user with many
        # memories may need longer than one deadline to load, and must not time out forever).
        search = asyncio.ensure_future(self._recall(user_id, query, generation))
        self._track(search)
        try:
            return await asyncio.wait_for(asyncio.shield(search), self.config.deadline_seconds)
        except TimeoutError:
            self.stats.recall_timeouts += 1
            logger.warning("memory recall took longer than %.0f ms; replying without it", self.config.deadline_seconds * 1000)
        except CompanionError:
            self.stats.recall_failures += 1
            logger.warning("memory recall failed; replying without it", exc_info=True)
        return []

    async def _recall(self, user_id: uuid.UUID, query: str, generation: int | None) -> list[MemoryOut]:
        if generation is None:
            generation = await self.store.generation(user_id)
        if generation == 0:
            return []  # never had a memory: no embedding needed

        async def search() -> _Recalled:
            relevant = await self.hybrid(
                user_id,
                query,
                self.config.top_k,
                generation=generation,
                min_score=self.config.min_score,
                text_min_score=self.config.text_min_score,
            )
            # A fact beside the very episode it was drawn from says the same thing twice.
            episodes = {memory.id for memory in relevant if memory.kind == EPISODE}
            relevant = [m for m in relevant if m.episode_id is None or m.episode_id not in episodes]
            recent = await self.store.recent(user_id, self.config.recent, generation=generation, scope="facts")
            seen = {memory.id for memory in relevant} | {m.episode_id for m in relevant if m.episode_id}
            return _Recalled(memories=[*relevant, *(m for m in recent if m.id not in seen and m.episode_id not in seen)])

        found = await self._cache.get_or_search(user_id, generation, None, query, search, _CODEC)
        return found.memories

    # --- the user's control ----------------------------------------------------------------------

    async def hybrid(
        self,
        user_id: uuid.UUID,
        query: str,
        k: int,
        *,
        vector: np.ndarray | None = None,
        generation: int | None = None,
        scope: Scope = "all",
        min_score: float = -1.0,
        text_min_score: float = -1.0,
    ) -> builtins.list[MemoryOut]:
        """The user's `k` memories best for `query`: the ranking by meaning (cosine to the query's
        embedding, `vector` if given) and the ranking by words (full text) fused by reciprocal rank.
        A memory found by meaning needs cosine ≥ `min_score`, one found by words ≥ `text_min_score`;
        `score` is the cosine. The word query runs while the query is embedded."""
        n = max(k, self.config.candidates)
        words = terms(query)
        matching = asyncio.ensure_future(self.store.match(user_id, words, n, scope=scope)) if words else None
        try:
            if vector is None:
                (vector,) = await self.embedder.embed([query])
            by_meaning = await self.store.search(user_id, vector, n, generation=generation, scope=scope)
            ids = await matching if matching is not None else []
        finally:
            if matching is not None and not matching.done():
                matching.cancel()
        found = {m.id: m for m in by_meaning}
        missing = [memory_id for memory_id in ids if memory_id not in found]
        if missing:
            found |= {m.id: m for m in await self.store.scored(user_id, missing, vector, generation=generation)}
        by_words = [found[memory_id] for memory_id in ids if memory_id in found]
        admitted = {m.id for m in by_meaning if (m.score or 0.0) >= min_score} | {
            m.id for m in by_words if (m.score or 0.0) >= text_min_score
        }
        ranked = fuse(
            [[m.id for m in by_meaning], [m.id for m in by_words]],
            k=self.config.rrf_k,
            weights=(1.0, self.config.text_weight),
        )
        return [found[memory_id] for memory_id in ranked if memory_id in admitted][:k]

    async def list(
        self, user_id: uuid.UUID, *, limit: int = 100, offset: int = 0, scope: Scope = "all"
    ) -> builtins.list[MemoryOut]:
        return await self.store.list(user_id, limit=limit, offset=offset, scope=scope)

    async def search(
        self, user_id: uuid.UUID, query: str, *, limit: int = 10, scope: Scope = "all"
    ) -> builtins.list[MemoryOut]:
        if not self.enabled:
            raise memory_disabled()
        return await self.hybrid(user_id, query, limit, scope=scope)

    async def add(
        self,
        user_id: uuid.UUID,
        text: str,
        *,
        kind: str = "note",
        conversation_id: uuid.UUID | None = None,
        source_message_id: int | None = None,
    ) -> MemoryOut | None:
        """Keep `text` as the user wrote it, or update the memory it nearly duplicates. None when the
        user is at the cap. It is not rewritten: it reaches prompts quoted, as something the user said."""
        if not self.enabled:
            raise memory_disabled()
        kept = await self._keep(user_id, [Fact(clean(text), kind)], conversation_id, source_message_id, self._clock())
        return kept[0] if kept else None

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        await self.store.delete(user_id, memory_id)  # NotFound (404) if it is not this user's

    async def forget(
        self, user_id: uuid.UUID, *, conversation_id: uuid.UUID | None = None, message_id: int | None = None
    ) -> int:
        """Forget what came from a conversation or one of its messages: its episodes and the facts
        drawn from them. How many memories went."""
        # A message of it may still be being remembered on this instance: let that finish first, so
        # that nothing from it is written after the forgetting.
        pending = [task for task in self._tasks if task.get_name().startswith("memory-extract-")]  # type: ignore[attr-defined]
        if pending:
            await asyncio.wait(pending)
        return await self.store.delete_from(user_id, conversation_id=conversation_id, message_id=message_id)

    async def delete_all(self, user_id: uuid.UUID) -> int:
        """Forget everything. Nothing said before it comes back: an extraction already running on this
        instance is waited for (then deleted with the rest), and one scheduled later for a message
        said before it (a reply that settles afterwards) is dropped."""
        self._cleared[user_id] = self._clock()
        pending = [task for task in self._tasks if task.get_name().startswith("memory-extract-")]  # type: ignore[attr-defined]
        if pending:
            await asyncio.wait(pending)
        return await self.store.delete_all(user_id)

    # --- extraction ------------------------------------------------------------------------------

    def schedule_extraction(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID,
        message_id: int,
        text: str,
        *,
        said_at: datetime | None = None,
    ) -> None:
        """Remember a user's message (episodes and facts) in the background. `said_at`: when the
        message was stored (now if not given)."""
        if not self.enabled:
            return
        said_at = said_at or self._clock()
        self._track(
            asyncio.create_task(
                self._extract_quietly(user_id, conversation_id, message_id, text, said_at),
                name=f"memory-extract-{message_id}",
            )
        )

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Retrieve the outcome, so a background failure is logged here and never as "never retrieved".
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def wait_idle(self) -> None:
        """Wait for background extractions (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _extract_quietly(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int, text: str, said_at: datetime
    ) -> None:
        try:
            await self.extract(user_id, conversation_id, message_id, text, said_at=said_at)
        except Exception:
            self.stats.extraction_failures += 1
            logger.warning("memory extraction from message %s failed", message_id, exc_info=True)

    async def extract(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID | None,
        message_id: int | None,
        text: str,
        *,
        said_at: datetime | None = None,
    ) -> builtins.list[MemoryOut]:
        """Remember a user's message now: its episodes (if `config.episodes`), then its facts, each
        fact pointing to the episode it is closest to. Returns the facts kept (added or updated)."""
        said_at = said_at or self._clock()
        cleared = self._cleared.get(user_id)
        if cleared is not None and said_at < cleared:
            return []  # said before the user asked to forget everything
        facts: builtins.list[Fact] = []
        if self.config.extractor in ("rules", "both"):
            facts += rule_facts(text)
        if self.config.extractor in ("llm", "both") and self._provider is not None:
            facts += await llm_facts(self._provider, text)
        unique = list({" ".join(f.text.casefold().split()): f for f in facts}.values())
        found = passages(text) if self.config.episodes else []
        if not found and not unique:
            return []
        # One call to the embedder for the passages and the facts: a run of the model per message,
        # not two.
        vectors = await self.embedder.embed([*found, *(fact.text for fact in unique)])
        episodes: builtins.list[MemoryOut] = []
        episode_vectors = np.empty((0, 0), dtype=np.float32)
        if found:
            episodes, episode_vectors = await self._keep_episodes(
                user_id, conversation_id, message_id, found, vectors[: len(found)], said_at
            )
        if not unique:
            return []
        return await self._keep(
            user_id, unique, conversation_id, message_id, said_at, episodes, episode_vectors, vectors[len(found) :]
        )

    async def _keep_episodes(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID | None,
        message_id: int | None,
        found: Sequence[str],
        vectors: np.ndarray,
        said_at: datetime,
    ) -> tuple[builtins.list[MemoryOut], np.ndarray]:
        new = [
            NewMemory(
                passage, EPISODE, vector, conversation_id, message_id, said_at=said_at, dates=when.encode(when.resolve(passage, said_at))
            )
            for passage, vector in zip(found, vectors, strict=True)
        ]
        async with self._writers.hold(user_id):
            # At the cap, the oldest episodes make room: what was said most recently matters most,
            # and facts and notes are never pushed out by episodes.
            excess = await self.store.count(user_id) + len(new) - self.config.max_per_user
            if excess > 0:
                evicted = await self.store.delete_oldest_episodes(user_id, excess)
                self.stats.evicted += evicted
                if evicted < excess:
                    logger.warning("user %s is at the maximum of %d memories; episodes not kept", user_id, self.config.max_per_user)
                    return [], np.empty((0, 0), dtype=np.float32)
            kept = await self.store.add_many(user_id, new, self._clock())
        self.stats.episodes += len(kept)
        return kept, np.asarray(vectors, dtype=np.float32)

    async def _keep(
        self,
        user_id: uuid.UUID,
        facts: Sequence[Fact],
        conversation_id: uuid.UUID | None,
        message_id: int | None,
        said_at: datetime,
        episodes: Sequence[MemoryOut] = (),
        episode_vectors: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
    ) -> builtins.list[MemoryOut]:
        if vectors is None:
            vectors = await self.embedder.embed([fact.text for fact in facts])
        kept: builtins.list[MemoryOut] = []
        async with self._writers.hold(user_id):  # near-duplicates merge, not race
            for fact, vector in zip(facts, vectors, strict=True):
                episode_id = None
                if episodes and episode_vectors is not None and len(episode_vectors):
                    episode_id = episodes[int(np.argmax(episode_vectors @ vector))].id
                memory = NewMemory(
                    fact.text,
                    fact.kind,
                    vector,
                    conversation_id,
                    message_id,
                    episode_id=episode_id,
                    said_at=said_at,
                    dates=when.encode(when.resolve(fact.text, said_at)),
                )
                nearest = await self.store.search(
                    user_id, vector, 1, min_score=self.config.dedupe_threshold, scope="facts"
                )
                if nearest:
                    kept.append(await self.store.replace(user_id, nearest[0].id, memory, self._clock()))
                    self.stats.updated += 1
                    continue
                if await self.store.count(user_id) >= self.config.max_per_user:
                    # A fact takes the place of the oldest episode; with no episode left, nothing is added.
                    if not await self.store.delete_oldest_episodes(user_id, 1):
                        logger.warning("user %s has %d memories, the maximum; not adding more", user_id, self.config.max_per_user)
                        continue
                    self.stats.evicted += 1
                kept.append(await self.store.add(user_id, memory, self._clock()))
                self.stats.added += 1
        return kept
