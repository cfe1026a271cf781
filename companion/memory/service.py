"""Long-term memory: what the companion keeps about each user, and how it finds it again.

- After each exchange, `schedule_extraction` finds durable facts in the user's message (rules, the
  LLM, or both), in the background. A fact close to one already kept (cosine ≥ the dedupe threshold)
  replaces it instead of adding a second; each memory records its source message and time.
- Before generating, `recall` returns the memories most relevant to the new message plus the most
  recent ones, through the memory-search cache (keyed by the user's memory generation, read from the
  database), within a deadline: past it, the reply goes ahead without memories.
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
from typing import Any, Literal

from pydantic import BaseModel

from companion.cache.codec import ModelCodec
from companion.cache.memory_search import MemorySearchCache
from companion.errors import CompanionError, Conflict
from companion.llm.base import LLMProvider
from companion.locks import KeyedLocks
from companion.memory.embedder import Embedder
from companion.memory.extract import Fact, llm_facts, rule_facts, third_person
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


@dataclass
class MemoryStats:
    recalls: int = 0
    recall_timeouts: int = 0
    recall_failures: int = 0
    added: int = 0
    updated: int = 0
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
            logger.warning(
                "memory recall took longer than %.0f ms; replying without it", self.config.deadline_seconds * 1000
            )
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
            recent = await self.store.recent(user_id, self.config.recent, generation=generation)
            if not recent:
                return _Recalled(memories=[])
            (vector,) = await self.embedder.embed([query])
            relevant = await self.store.search(
                user_id, vector, self.config.top_k, min_score=self.config.min_score, generation=generation
            )
            seen = {memory.id for memory in relevant}
            return _Recalled(memories=[*relevant, *(m for m in recent if m.id not in seen)])

        found = await self._cache.get_or_search(user_id, generation, None, query, search, _CODEC)
        return found.memories

    # --- the user's control ----------------------------------------------------------------------

    async def list(self, user_id: uuid.UUID, *, limit: int = 100, offset: int = 0) -> list[MemoryOut]:
        return await self.store.list(user_id, limit=limit, offset=offset)

    async def search(self, user_id: uuid.UUID, query: str, *, limit: int = 10) -> builtins.list[MemoryOut]:
        if not self.enabled:
            raise memory_disabled()
        (vector,) = await self.embedder.embed([query])
        return await self.store.search(user_id, vector, limit)

    async def add(
        self,
        user_id: uuid.UUID,
        text: str,
        *,
        kind: str = "note",
        conversation_id: uuid.UUID | None = None,
        source_message_id: int | None = None,
    ) -> MemoryOut | None:
        """Keep `text`, or update the memory it nearly duplicates. None when the user is at the cap."""
        if not self.enabled:
            raise memory_disabled()
        # Shown to the model as facts about the user: "I am vegetarian" becomes "The user is vegetarian."
        kept = await self._keep(user_id, [Fact(third_person(text), kind)], conversation_id, source_message_id)
        return kept[0] if kept else None

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        await self.store.delete(user_id, memory_id)  # NotFound (404) if it is not this user's

    async def delete_all(self, user_id: uuid.UUID) -> int:
        return await self.store.delete_all(user_id)

    # --- extraction ------------------------------------------------------------------------------

    def schedule_extraction(self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int, text: str) -> None:
        """Extract memories from a user's message in the background."""
        if not self.enabled:
            return
        self._track(
            asyncio.create_task(
                self._extract_quietly(user_id, conversation_id, message_id, text), name=f"memory-extract-{message_id}"
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
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int, text: str
    ) -> None:
        try:
            await self.extract(user_id, conversation_id, message_id, text)
        except Exception:
            self.stats.extraction_failures += 1
            logger.warning("memory extraction from message %s failed", message_id, exc_info=True)

    async def extract(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID | None, message_id: int | None, text: str
    ) -> builtins.list[MemoryOut]:
        facts: builtins.list[Fact] = []
        if self.config.extractor in ("rules", "both"):
            facts += rule_facts(text)
        if self.config.extractor in ("llm", "both") and self._provider is not None:
            facts += await llm_facts(self._provider, text)
        unique = list({" ".join(f.text.casefold().split()): f for f in facts}.values())
        if not unique:
            return []
        return await self._keep(user_id, unique, conversation_id, message_id)

    async def _keep(
        self,
        user_id: uuid.UUID,
        facts: Sequence[Fact],
        conversation_id: uuid.UUID | None,
        message_id: int | None,
    ) -> builtins.list[MemoryOut]:
        vectors = await self.embedder.embed([fact.text for fact in facts])
        kept: builtins.list[MemoryOut] = []
        async with self._writers.hold(user_id):  # near-duplicates merge, not race
            for fact, vector in zip(facts, vectors, strict=True):
                memory = NewMemory(fact.text, fact.kind, vector, conversation_id, message_id)
                nearest = await self.store.search(user_id, vector, 1, min_score=self.config.dedupe_threshold)
                if nearest:
                    kept.append(await self.store.replace(user_id, nearest[0].id, memory, self._clock()))
                    self.stats.updated += 1
                elif await self.store.count(user_id) >= self.config.max_per_user:
                    logger.warning(
                        "user %s has %d memories, the maximum; not adding more", user_id, self.config.max_per_user
                    )
                else:
                    kept.append(await self.store.add(user_id, memory, self._clock()))
                    self.stats.added += 1
        return kept
