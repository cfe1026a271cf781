"""Where memories live: the `VectorStore` interface, and its implementation on the relational
database with exact cosine search in numpy.

Vectors are stored in the `memories` table next to their text (float32 bytes), so the store works
the same on SQLite and PostgreSQL, and every statement filters on `user_id`: no query can reach
another user's memories. Each change to a user's memories also bumps `users.memory_generation` in
the same transaction; a search reads that generation and reuses the user's vector matrix held in
memory only if it was loaded at that same generation. So the matrix is loaded once per change, not
once per search, and a deleted memory is never found again, on any instance.

Where PostgreSQL has pgvector, `companion/memory/pgvector.py` searches in the database instead.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from companion.errors import NotFound
from companion.locks import KeyedLocks
from companion.storage.database import Database
from companion.storage.models import Memory, User


class MemoryOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    text: str
    kind: str
    conversation_id: uuid.UUID | None = None
    source_message_id: int | None = None
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


def memory_not_found() -> NotFound:
    return NotFound("No such memory: it may have been deleted already.", code="memory_not_found", param="memory_id")


class VectorStore(Protocol):
    async def generation(self, user_id: uuid.UUID) -> int:
        """The user's memory generation: changes whenever any of the user's memories changes."""
        ...

    async def search(
        self, user_id: uuid.UUID, vector: np.ndarray, k: int, *, min_score: float = -1.0, generation: int | None = None
    ) -> list[MemoryOut]:
        """The user's `k` memories most similar to `vector` (a unit vector), best first, with `score`."""
        ...

    async def recent(self, user_id: uuid.UUID, n: int, *, generation: int | None = None) -> list[MemoryOut]:
        """The user's `n` most recently added or updated memories, newest first."""
        ...

    async def add(self, user_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut: ...

    async def replace(self, user_id: uuid.UUID, memory_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        """Give an existing memory new text and vector (a restated or updated fact)."""
        ...

    async def list(self, user_id: uuid.UUID, *, limit: int, offset: int = 0) -> list[MemoryOut]:
        """Newest (last updated) first."""
        ...

    async def count(self, user_id: uuid.UUID) -> int: ...

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        """Raises NotFound if the user has no such memory."""
        ...

    async def delete_all(self, user_id: uuid.UUID) -> int: ...


@dataclass(frozen=True)
class _Matrix:
    generation: int
    memories: list[MemoryOut]
    vectors: np.ndarray  # (len(memories), dimensions), unit rows


_FIELDS = ("id", "text", "kind", "conversation_id", "source_message_id", "created_at", "updated_at")
_COLUMNS = tuple(getattr(Memory, name) for name in _FIELDS)


def _out(row: Any, score: float | None = None) -> MemoryOut:
    """A memory from an ORM row or a result row with the `_FIELDS` columns."""
    return MemoryOut(**{name: getattr(row, name) for name in _FIELDS}, score=score)


def _generation_of(user_id: uuid.UUID) -> Select[int]:
    return select(User.memory_generation).where(User.id == user_id)


def _row(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float32).reshape(1, -1)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class SqlVectorStore:
    def __init__(self, database: Database, *, model_id: str, dimensions: int, max_cached_users: int = 256) -> None:
        self._db = database
        self.model_id = model_id
        self.dimensions = dimensions
        self._matrices: collections.OrderedDict[uuid.UUID, _Matrix] = collections.OrderedDict()
        self.max_cached_users = max_cached_users
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
            memories = [MemoryOut.model_construct(**{name: getattr(row, name) for name in _FIELDS}) for row in rows]
            matrix = _Matrix(current, memories, vectors)
            self._keep(user_id, matrix)
        return matrix

    def _keep(self, user_id: uuid.UUID, matrix: _Matrix) -> None:
        self._matrices[user_id] = matrix
        self._matrices.move_to_end(user_id)
        while len(self._matrices) > self.max_cached_users:
            self._matrices.popitem(last=False)

    def _changed(self, user_id: uuid.UUID, generation: int | None, change: Callable[[_Matrix], _Matrix]) -> None:
        """After this instance committed one change that took the user from `generation - 1` to
        `generation`: apply it to the cached matrix if that is exactly the state before it (so a
        memory added by extraction costs no reload of all the user's vectors); otherwise drop it."""
        cached = self._matrices.get(user_id)
        if cached is None:
            return
        if generation is None or cached.generation != generation - 1:
            self._matrices.pop(user_id, None)
            return
        self._keep(user_id, change(cached))

    async def search(
        self, user_id: uuid.UUID, vector: np.ndarray, k: int, *, min_score: float = -1.0, generation: int | None = None
    ) -> list[MemoryOut]:
        matrix = await self._matrix(user_id, generation)
        if not matrix.memories or k <= 0:
            return []
        scores = matrix.vectors @ np.asarray(vector, dtype=np.float32)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            matrix.memories[i].model_copy(update={"score": round(float(scores[i]), 4)})
            for i in top
            if scores[i] >= min_score
        ]

    async def recent(self, user_id: uuid.UUID, n: int, *, generation: int | None = None) -> list[MemoryOut]:
        matrix = await self._matrix(user_id, generation)
        return sorted(matrix.memories, key=lambda m: (m.updated_at, m.created_at), reverse=True)[:n]

    async def add(self, user_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        row = Memory(
            user_id=user_id,
            text=memory.text,
            kind=memory.kind,
            embedding=to_bytes(memory.vector),
            model=self.model_id,
            conversation_id=memory.conversation_id,
            source_message_id=memory.source_message_id,
            created_at=at,
            updated_at=at,
        )
        async with self._db.session() as session:
            session.add(row)
            await self._write_vector(session, row, memory.vector)
            generation = await self._bump(session, user_id)
        added = _out(row)
        self._changed(
            user_id,
            generation,
            lambda m: _Matrix(generation or 0, [*m.memories, added], np.vstack([m.vectors, _row(memory.vector)])),
        )
        return added

    async def replace(self, user_id: uuid.UUID, memory_id: uuid.UUID, memory: NewMemory, at: datetime) -> MemoryOut:
        async with self._db.session() as session:
            row = await session.scalar(select(Memory).where(Memory.id == memory_id, Memory.user_id == user_id))
            if row is None:
                raise memory_not_found()
            row.text, row.kind, row.embedding, row.model = (
                memory.text,
                memory.kind,
                to_bytes(memory.vector),
                self.model_id,
            )
            row.conversation_id, row.source_message_id, row.updated_at = (
                memory.conversation_id,
                memory.source_message_id,
                at,
            )
            await self._write_vector(session, row, memory.vector)
            generation = await self._bump(session, user_id)
            replaced = _out(row)

        def change(m: _Matrix) -> _Matrix:
            index = next((i for i, kept in enumerate(m.memories) if kept.id == memory_id), None)
            if index is None:  # it was not searchable here (another model's vector): now it is
                return _Matrix(generation or 0, [*m.memories, replaced], np.vstack([m.vectors, _row(memory.vector)]))
            vectors = m.vectors.copy()
            vectors[index] = _row(memory.vector)
            return _Matrix(generation or 0, [*m.memories[:index], replaced, *m.memories[index + 1 :]], vectors)

        self._changed(user_id, generation, change)
        return replaced

    async def list(self, user_id: uuid.UUID, *, limit: int, offset: int = 0) -> list[MemoryOut]:
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Memory)
                    .where(Memory.user_id == user_id)
                    .order_by(Memory.updated_at.desc(), Memory.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).scalars()
            return [_out(row) for row in rows]

    async def count(self, user_id: uuid.UUID) -> int:
        async with self._db.session() as session:
            return int(await session.scalar(select(func.count()).where(Memory.user_id == user_id)) or 0)

    async def delete(self, user_id: uuid.UUID, memory_id: uuid.UUID) -> None:
        async with self._db.session() as session:
            result = await session.execute(delete(Memory).where(Memory.id == memory_id, Memory.user_id == user_id))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise memory_not_found()
            generation = await self._bump(session, user_id)

        def change(m: _Matrix) -> _Matrix:
            keep = [i for i, kept in enumerate(m.memories) if kept.id != memory_id]
            return _Matrix(generation or 0, [m.memories[i] for i in keep], m.vectors[keep])

        self._changed(user_id, generation, change)

    async def delete_all(self, user_id: uuid.UUID) -> int:
        async with self._db.session() as session:
            result = await session.execute(delete(Memory).where(Memory.user_id == user_id))
            generation = await self._bump(session, user_id)
        self._changed(
            user_id,
            generation,
            lambda m: _Matrix(generation or 0, [], np.empty((0, self.dimensions), dtype=np.float32)),
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
