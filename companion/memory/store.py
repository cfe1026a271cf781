"""Where memories live: the `VectorStore` interface, and its implementation on the relational
database with exact cosine search in numpy.

Vectors are stored in the `memories` table next to their text (float32 bytes), so the store works
the same on SQLite and PostgreSQL, and every statement filters on `user_id`: no query can reach
another user's memories. Each change to a user's memories also bumps `users.memory_generation` in
the same transaction; a search reads that generation and reuses the user's vector matrix held in
memory only if it was loaded at that same generation. So the matrix is loaded once per change, not
once per search, and a deleted memory is never found again, on any instance.

Words are searched in each database's full-text index (`companion/memory/fulltext.py`); the
service fuses that ranking with the vector ranking. Where PostgreSQL has pgvector,
`companion/memory/pgvector.py` runs the vector search in the database instead.

Kinds: "episode" (a passage the user said, verbatim), "note" (added on purpose) and the fact kinds
(name, person, place, preference, plan, fact), each fact pointing to its episode.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from companion.errors import NotFound
from companion.locks import KeyedLocks
from companion.memory import when
from companion.memory.fulltext import EPISODE, FullTextIndex, Scope, full_text_for
from companion.storage.database import Database
from companion.storage.models import Memory, User


class DateOut(BaseModel):
    """A relative date in the memory's text, resolved against when it was said."""

    model_config = ConfigDict(frozen=True)

    phrase: str
    start: date
    end: date  # inclusive


class MemoryOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    text: str
    kind: str  # "episode" (what the user said, verbatim), "note" (added on purpose) or a fact kind
    conversation_id: uuid.UUID | None = None
    source_message_id: int | None = None
    episode_id: uuid.UUID | None = None  # a fact's episode
    said_at: datetime | None = None  # when the user said it
    dates: list[DateOut] = []  # relative dates in the text, resolved against `said_at`
    created_at: datetime
    updated_at: datetime
    score: float | None = None  # cosine similarity to the query, when found by a search


@dataclass(frozen=True)
class NewMemory:
    text: str
    kind: str
    vector: np.ndarray
    conversation_id: uuid.UUID | None = None
    source_message_id: int | None = None
    episode_id: uuid.UUID | None = None
    said_at: datetime | None = None  # None: now
    dates: str | None = None  # `when.encode` of the resolved dates


def memory_not_found() -> NotFound:
    return NotFound("No such memory: it may have been deleted already.", code="memory_not_found", param="memory_id")


class VectorStore(Protocol):
    async def generation(self, user_id: uuid.UUID) -> int:
        """The user's memory generation: changes whenever any of the user's memories changes."""
        ...

    async def search(
        self,
        user_id: uuid.UUID,
        vector: np.ndarray,
        k: int,
        *,
        min_score: float = -1.0,
        generation: int | None = None,
        scope: Scope = "all",
    ) -> list[MemoryOut]:
        """The user's `k` memories in `scope` most similar to `vector` (a unit vector), best first,
        with `score`."""
        ...

    async def text_search(
        self,
        user_id: uuid.UUID,
        words: Sequence[str],
        vector: np.ndarray,
        k: int,
        *,
        generation: int | None = None,
        scope: Scope = "all",
    ) -> list[MemoryOut]:
        """The user's `k` memories in `scope` that best match any of `words` (full text), best
        first, each with its cosine similarity to `vector` as `score`. Memories embedded by another
        model are left out (they are not searchable until re-embedded)."""
        ...

    async def match(self, user_id: uuid.UUID, words: Sequence[str], k: int, *, scope: Scope = "all") -> list[uuid.UUID]:
        """The ids of the user's `k` memories in `scope` that best match any of `words` (full text),
        best first. Needs no vector: it can run while the query is being embedded."""
        ...

    async def scored(
        self, user_id: uuid.UUID, ids: Sequence[uuid.UUID], vector: np.ndarray, *, generation: int | None = None
    ) -> list[MemoryOut]:
        """The user's memories with these ids, in that order, each with its cosine similarity to
        `vector` as `score` (ids of other users, deleted memories or another model's: left out)."""
        ...

    async def recent(
        self, user_id: uuid.UUID, n: int, *, generation: int | None = None, scope: Scope = "all"
    ) -> list[MemoryOut]:
        """The user's `n` most recently added or updated memories in `scope`, newest first."""
        ...

    async def add(self, user_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut: ...

    async def add_many(self, user_id: uuid.UUID, memories: Sequence[NewMemory], at: datetime) -> list[MemoryOut]:
        """Add several memories in one transaction (one generation bump)."""
        ...

    async def replace(self, user_id: uuid.UUID, memory_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        """Give an existing memory new text and vector (a restated or updated fact)."""
        ...

    async def list(self, user_id: uuid.UUID, *, limit: int, offset: int = 0, scope: Scope = "all") -> list[MemoryOut]:
        """Newest (last updated) first."""
        ...

    async def count(self, user_id: uuid.UUID, *, scope: Scope = "all") -> int: ...

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        """Delete a memory and, if it is an episode, the facts drawn from it. Raises NotFound if the
        user has no such memory."""
        ...

    async def delete_from(
        self, user_id: uuid.UUID, *, conversation_id: uuid.UUID | None = None, message_id: int | None = None
    ) -> int:
        """Delete the user's memories that came from a conversation, or from one message (episodes
        and facts alike); how many."""
        ...

    async def delete_oldest_episodes(self, user_id: uuid.UUID, n: int) -> int:
        """Delete the user's `n` oldest episodes (by when they were said) and their facts; how many."""
        ...

    async def delete_all(self, user_id: uuid.UUID) -> int: ...


@dataclass(frozen=True)
class _Matrix:
    generation: int
    memories: list[MemoryOut]
    vectors: np.ndarray  # (len(memories), dimensions), unit rows
    index: dict[uuid.UUID, int]  # memory id -> row
    episodes: np.ndarray  # one bool per row: an episode
    # Rows newest first, per scope, computed on first use: sorting 10,000 memories on every recall
    # cost milliseconds, and the matrix is replaced (not changed) whenever a memory changes.
    by_recency: dict[str, list[int]] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, generation: int, memories: list[MemoryOut], vectors: np.ndarray) -> _Matrix:
        index = {memory.id: i for i, memory in enumerate(memories)}
        episodes = np.fromiter((m.kind == EPISODE for m in memories), dtype=bool, count=len(memories))
        return cls(generation, memories, vectors, index, episodes)

    def in_scope(self, scope: Scope) -> np.ndarray | None:
        """A boolean mask of the rows in `scope`; None for all rows."""
        if scope == "all":
            return None
        return self.episodes if scope == "episodes" else ~self.episodes

    def newest(self, scope: Scope) -> list[int]:
        order = self.by_recency.get(scope)
        if order is None:
            mask = self.in_scope(scope)
            rows = range(len(self.memories)) if mask is None else np.flatnonzero(mask).tolist()
            memories = self.memories
            order = sorted(rows, key=lambda i: (memories[i].updated_at, memories[i].created_at), reverse=True)
            self.by_recency[scope] = order
        return order


_FIELDS = (
    "id",
    "text",
    "kind",
    "conversation_id",
    "source_message_id",
    "episode_id",
    "said_at",
    "dates",
    "created_at",
    "updated_at",
)
_COLUMNS = tuple(getattr(Memory, name) for name in _FIELDS)


def _values(row: Any) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in _FIELDS}
    stored = values["dates"]
    values["dates"] = [DateOut(phrase=r.phrase, start=r.start, end=r.end) for r in when.decode(stored)] if stored else []
    if values["said_at"] is None:  # memories kept before migration 0005 were stored as they were said
        values["said_at"] = values["created_at"]
    return values


def _out(row: Any, score: float | None = None) -> MemoryOut:
    """A memory from an ORM row or a result row with the `_FIELDS` columns."""
    return MemoryOut(**_values(row), score=score)


def scoped(query: Any, scope: Scope) -> Any:
    if scope == "episodes":
        return query.where(Memory.kind == EPISODE)
    if scope == "facts":
        return query.where(Memory.kind != EPISODE)
    return query


def _generation_of(user_id: uuid.UUID) -> Select[int]:
    return select(User.memory_generation).where(User.id == user_id)


def _row(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float32).reshape(1, -1)


def cosines(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """`rows @ vector` (unit vectors: cosine similarities) without BLAS: OpenBLAS splits a 10,000-row
    product over threads that spin-wait, and beside the embedder's thread on a busy machine one
    search took 8-15 ms instead of 0.3 (measured); numpy's own single-threaded loop takes 0.35 ms."""
    return np.einsum("ij,j->i", rows, np.asarray(vector, dtype=np.float32))


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class SqlVectorStore:
    def __init__(
        self,
        database: Database,
        *,
        model_id: str,
        dimensions: int,
        max_cached_users: int = 256,
        max_cached_memories: int = 100_000,
    ) -> None:
        self._db = database
        self._full_text: FullTextIndex = full_text_for(database.dialect)
        self.model_id = model_id
        self.dimensions = dimensions
        self._matrices: collections.OrderedDict[uuid.UUID, _Matrix] = collections.OrderedDict()
        self.max_cached_users = max_cached_users
        # A cached memory costs about 3.5 KB here (its vector and its Python object; docs/memory.md):
        # the budget bounds the instance's cache near 350 MB however many memories its users have.
        self.max_cached_memories = max_cached_memories
        self._cached_memories = 0
        self._loading: KeyedLocks[uuid.UUID] = KeyedLocks()  # one load per user at a time
        self.loads = 0  # matrices loaded from the database (tests and benchmarks read it)

    async def generation(self, user_id: uuid.UUID) -> int:
        async with self._db.session() as session:
            found = await session.scalar(_generation_of(user_id))
        return int(found or 0)

    async def _matrix(self, user_id: uuid.UUID, generation: int | None) -> _Matrix:
        cached = self._matrices.get(user_id)
        if cached is not None and generation is not None and cached.generation >= generation:
            self._matrices.move_to_end(user_id)
            return cached
        async with self._loading.hold(user_id):
            cached = self._matrices.get(user_id)
            if cached is not None and generation is not None and cached.generation >= generation:
                return cached  # loaded (or updated) while this caller waited
            async with self._db.session() as session:  # the generation and the rows from one transaction
                current = int(await session.scalar(_generation_of(user_id)) or 0)
                if cached is not None and cached.generation == current:
                    self._matrices.move_to_end(user_id)
                    return cached
                rows = (
                    await session.execute(
                        select(*_COLUMNS, Memory.embedding)
                        .where(Memory.user_id == user_id, Memory.model == self.model_id)
                        .order_by(Memory.created_at, Memory.id)
                    )
                ).all()
            self.loads += 1
            rows = [row for row in rows if len(row.embedding) == self.dimensions * 4]
            vectors = (
                np.frombuffer(b"".join(row.embedding for row in rows), dtype="<f4").reshape(len(rows), self.dimensions)
                if rows
                else np.empty((0, self.dimensions), dtype=np.float32)
            )
            # Rows straight from our own table: no validation needed (10,000 of them cost ~10x more with it).
            memories = [MemoryOut.model_construct(**_values(row)) for row in rows]
            matrix = _Matrix.of(current, memories, vectors)
            self._keep(user_id, matrix)
        return matrix

    def _keep(self, user_id: uuid.UUID, matrix: _Matrix) -> None:
        replaced = self._matrices.get(user_id)
        self._cached_memories += len(matrix.memories) - (len(replaced.memories) if replaced is not None else 0)
        self._matrices[user_id] = matrix
        self._matrices.move_to_end(user_id)
        while len(self._matrices) > 1 and (
            len(self._matrices) > self.max_cached_users or self._cached_memories > self.max_cached_memories
        ):
            _, dropped = self._matrices.popitem(last=False)
            self._cached_memories -= len(dropped.memories)

    def _changed(self, user_id: uuid.UUID, generation: int | None, change: Callable[[_Matrix], _Matrix]) -> None:
        """After this instance committed one change that took the user from `generation - 1` to
        `generation`: apply it to the cached matrix if that is exactly the state before it (so a
        memory added by extraction costs no reload of all the user's vectors); otherwise drop it."""
        cached = self._matrices.get(user_id)
        if cached is None:
            return
        if generation is None or cached.generation != generation - 1:
            self._matrices.pop(user_id, None)
            self._cached_memories -= len(cached.memories)
            return
        self._keep(user_id, change(cached))

    async def search(
        self,
        user_id: uuid.UUID,
        vector: np.ndarray,
        k: int,
        *,
        min_score: float = -1.0,
        generation: int | None = None,
        scope: Scope = "all",
    ) -> list[MemoryOut]:
        matrix = await self._matrix(user_id, generation)
        if not matrix.memories or k <= 0:
            return []
        scores = cosines(matrix.vectors, vector)
        mask = matrix.in_scope(scope)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
            k = min(k, int(mask.sum()))
            if k == 0:
                return []
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            matrix.memories[i].model_copy(update={"score": round(float(scores[i]), 4)})
            for i in top
            if scores[i] >= min_score
        ]

    async def text_search(
        self,
        user_id: uuid.UUID,
        words: Sequence[str],
        vector: np.ndarray,
        k: int,
        *,
        generation: int | None = None,
        scope: Scope = "all",
    ) -> list[MemoryOut]:
        ids = await self.match(user_id, words, k, scope=scope)
        return await self.scored(user_id, ids, vector, generation=generation) if ids else []

    async def match(self, user_id: uuid.UUID, words: Sequence[str], k: int, *, scope: Scope = "all") -> list[uuid.UUID]:
        if not words or k <= 0:
            return []
        async with self._db.session() as session:
            return await self._full_text.search(session, user_id, words, k, scope=scope)

    async def scored(
        self, user_id: uuid.UUID, ids: Sequence[uuid.UUID], vector: np.ndarray, *, generation: int | None = None
    ) -> list[MemoryOut]:
        if not ids:
            return []
        matrix = await self._matrix(user_id, generation)
        # A row committed after the matrix was loaded is left to the next generation's search.
        rows = [matrix.index[memory_id] for memory_id in ids if memory_id in matrix.index]
        if not rows:
            return []
        scores = matrix.vectors[rows] @ np.asarray(vector, dtype=np.float32)
        return [
            matrix.memories[i].model_copy(update={"score": round(float(score), 4)})
            for i, score in zip(rows, scores, strict=True)
        ]

    async def recent(
        self, user_id: uuid.UUID, n: int, *, generation: int | None = None, scope: Scope = "all"
    ) -> list[MemoryOut]:
        if n <= 0:
            return []
        matrix = await self._matrix(user_id, generation)
        return [matrix.memories[i] for i in matrix.newest(scope)[:n]]

    def _row_of(self, user_id: uuid.UUID, memory: NewMemory, at: datetime) -> Memory:
        return Memory(
            user_id=user_id,
            text=memory.text,
            kind=memory.kind,
            embedding=to_bytes(memory.vector),
            model=self.model_id,
            conversation_id=memory.conversation_id,
            source_message_id=memory.source_message_id,
            episode_id=memory.episode_id,
            said_at=memory.said_at or at,
            dates=memory.dates,
            created_at=at,
            updated_at=at,
        )

    async def add(self, user_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        (added,) = await self.add_many(user_id, [memory], at)
        return added

    async def add_many(self, user_id: uuid.UUID, memories: Sequence[NewMemory], at: datetime) -> list[MemoryOut]:
        if not memories:
            return []
        rows = [self._row_of(user_id, memory, at) for memory in memories]
        async with self._db.session() as session:
            session.add_all(rows)
            await session.flush()  # ids assigned
            for row, memory in zip(rows, memories, strict=True):
                await self._write_vector(session, row, memory.vector)
            generation = await self._bump(session, user_id)
            added = [_out(row) for row in rows]
        vectors = np.vstack([_row(memory.vector) for memory in memories])
        self._changed(
            user_id,
            generation,
            lambda m: _Matrix.of(generation or 0, [*m.memories, *added], np.vstack([m.vectors, vectors])),
        )
        return added

    async def replace(self, user_id: uuid.UUID, memory_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        async with self._db.session() as session:
            row = await session.scalar(select(Memory).where(Memory.id == memory_id, Memory.user_id == user_id))
            if row is None:
                raise memory_not_found()
            row.text, row.kind, row.embedding, row.model = memory.text, memory.kind, to_bytes(memory.vector), self.model_id
            row.conversation_id, row.source_message_id, row.updated_at = (
                memory.conversation_id,
                memory.source_message_id,
                at,
            )
            row.episode_id, row.said_at, row.dates = memory.episode_id, memory.said_at or at, memory.dates
            await self._write_vector(session, row, memory.vector)
            generation = await self._bump(session, user_id)
            replaced = _out(row)

        def change(m: _Matrix) -> _Matrix:
            index = m.index.get(memory_id)
            if index is None:  # it was not searchable here (another model's vector): now it is
                return _Matrix.of(generation or 0, [*m.memories, replaced], np.vstack([m.vectors, _row(memory.vector)]))
            vectors = m.vectors.copy()
            vectors[index] = _row(memory.vector)
            return _Matrix.of(generation or 0, [*m.memories[:index], replaced, *m.memories[index + 1 :]], vectors)

        self._changed(user_id, generation, change)
        return replaced

    async def list(self, user_id: uuid.UUID, *, limit: int, offset: int = 0, scope: Scope = "all") -> list[MemoryOut]:
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    scoped(select(Memory).where(Memory.user_id == user_id), scope)
                    .order_by(Memory.updated_at.desc(), Memory.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).scalars()
            return [_out(row) for row in rows]

    async def count(self, user_id: uuid.UUID, *, scope: Scope = "all") -> int:
        async with self._db.session() as session:
            query = scoped(select(func.count()).select_from(Memory).where(Memory.user_id == user_id), scope)
            return int(await session.scalar(query) or 0)

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        if not await self._delete(user_id, Memory.id == memory_id):
            raise memory_not_found()

    async def delete_from(
        self, user_id: uuid.UUID, *, conversation_id: uuid.UUID | None = None, message_id: int | None = None
    ) -> int:
        conditions = []
        if conversation_id is not None:
            conditions.append(Memory.conversation_id == conversation_id)
        if message_id is not None:
            conditions.append(Memory.source_message_id == message_id)
        if not conditions:
            return 0
        return len(await self._delete(user_id, *conditions))

    async def delete_oldest_episodes(self, user_id: uuid.UUID, n: int) -> int:
        if n <= 0:
            return 0
        async with self._db.session() as session:
            ids = list(
                (
                    await session.execute(
                        select(Memory.id)
                        .where(Memory.user_id == user_id, Memory.kind == EPISODE)
                        .order_by(Memory.said_at, Memory.created_at, Memory.id)
                        .limit(n)
                    )
                ).scalars()
            )
        if not ids:
            return 0
        return len(await self._delete(user_id, Memory.id.in_(ids)))

    async def _delete(self, user_id: uuid.UUID, *conditions: Any) -> set[uuid.UUID]:
        """Delete the user's memories matching all `conditions`, and the facts of any episode among
        them, in one transaction; the ids deleted (the generation is bumped only if there were any)."""
        async with self._db.session() as session:
            chosen = list((await session.execute(select(Memory.id).where(Memory.user_id == user_id, *conditions))).scalars())
            if not chosen:
                return set()
            deleted = set(
                (
                    await session.execute(
                        delete(Memory)
                        .where(Memory.user_id == user_id, Memory.id.in_(chosen) | Memory.episode_id.in_(chosen))
                        .returning(Memory.id)
                    )
                ).scalars()
            )
            generation = await self._bump(session, user_id)

        def change(m: _Matrix) -> _Matrix:
            keep = [i for i, kept in enumerate(m.memories) if kept.id not in deleted]
            return _Matrix.of(generation or 0, [m.memories[i] for i in keep], m.vectors[keep])

        self._changed(user_id, generation, change)
        return deleted

    async def delete_all(self, user_id: uuid.UUID) -> int:
        async with self._db.session() as session:
            result = await session.execute(delete(Memory).where(Memory.user_id == user_id))
            generation = await self._bump(session, user_id)
        self._changed(
            user_id,
            generation,
            lambda m: _Matrix.of(generation or 0, [], np.empty((0, self.dimensions), dtype=np.float32)),
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def _write_vector(self, session: AsyncSession, row: Memory, vector: np.ndarray) -> None:
        """Store the vector in any further form a subclass searches (in the change's transaction)."""

    @staticmethod
    async def _bump(session: AsyncSession, user_id: uuid.UUID) -> int | None:
        """Bump the user's memory generation in the change's own transaction; the new value."""
        bumped = await session.scalar(
            update(User)
            .where(User.id == user_id)
            .values(memory_generation=User.memory_generation + 1)
            .returning(User.memory_generation)
        )
        return None if bumped is None else int(bumped)
