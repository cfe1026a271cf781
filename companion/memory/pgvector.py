"""The `VectorStore` on PostgreSQL with the pgvector extension: the search runs in the database.

Used when the database is PostgreSQL and pgvector is installed there (MEMORY_VECTOR_STORE=auto, the
default; `pgvector` insists on it). Migration 0004 then adds `memories.embedding_vec vector(384)`
beside the portable float32 bytes, which stay the source every store can read. The search is exact
cosine (`<=>`) over the user's own rows (`WHERE user_id = ...`, on the user's index), ordered in the
database, so an instance never holds a user's vectors in memory. Everything else (writes, the
generation bump in the change's transaction, listing, deleting) is the relational store's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from companion.memory.fulltext import Scope, scope_clause
from companion.memory.store import _FIELDS, MemoryOut, SqlVectorStore, _out
from companion.storage.database import Database
from companion.storage.models import Memory


def vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in np.asarray(vector, dtype=np.float32).ravel()) + "]"


async def pgvector_ready(database: Database) -> bool:
    """Whether this database can run the pgvector store: PostgreSQL, the extension installed and
    the `embedding_vec` column in place (migration 0004 adds it where the extension is available)."""
    if database.dialect != "postgresql":
        return False
    async with database.session() as session:
        found = await session.scalar(
            text(
                "SELECT count(*) FROM pg_extension e, information_schema.columns c "
                "WHERE e.extname = 'vector' AND c.table_name = 'memories' AND c.column_name = 'embedding_vec'"
            )
        )
    return bool(found)


class PgVectorStore(SqlVectorStore):
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
        if k <= 0:
            return []
        columns = ", ".join(_FIELDS)
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    text(
                        f"SELECT {columns}, 1 - (embedding_vec <=> CAST(:query AS vector)) AS score FROM memories "
                        "WHERE user_id = :user_id AND model = :model AND embedding_vec IS NOT NULL"
                        + scope_clause(scope)
                        + " ORDER BY embedding_vec <=> CAST(:query AS vector), id LIMIT :k"
                    ),
                    {"query": vector_literal(vector), "user_id": user_id, "model": self.model_id, "k": k},
                )
            ).all()
        return [_out(row, score=round(float(row.score), 4)) for row in rows if row.score >= min_score]

    async def scored(
        self, user_id: uuid.UUID, ids: Sequence[uuid.UUID], vector: np.ndarray, *, generation: int | None = None
    ) -> list[MemoryOut]:
        if not ids:
            return []
        columns = ", ".join(_FIELDS)
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    text(
                        f"SELECT {columns}, 1 - (embedding_vec <=> CAST(:query AS vector)) AS score FROM memories "
                        "WHERE user_id = :user_id AND model = :model AND embedding_vec IS NOT NULL "
                        "AND id = ANY(:ids)"
                    ),
                    {"query": vector_literal(vector), "user_id": user_id, "model": self.model_id, "ids": list(ids)},
                )
            ).all()
        found = {row.id: row for row in rows}
        return [_out(found[i], score=round(float(found[i].score), 4)) for i in ids if i in found]

    async def recent(
        self, user_id: uuid.UUID, n: int, *, generation: int | None = None, scope: Scope = "all"
    ) -> list[MemoryOut]:
        page = await self.list(user_id, limit=max(n, 1), scope=scope)
        return page[:n]

    async def _write_vector(self, session: AsyncSession, row: Memory, vector: np.ndarray) -> None:
        await session.flush()  # the row exists (a new one gets its id) before its vector is set
        await session.execute(
            text("UPDATE memories SET embedding_vec = CAST(:vector AS vector) WHERE id = :id"),
            {"vector": vector_literal(vector), "id": row.id},
        )
