"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL
(a model change without its migration fails here, not in production)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from companion.services import Services
from companion.storage.models import Base

# The memories' full-text index is made by migration 0005 per dialect and is not an ORM model:
# SQLite's FTS5 table (and the shadow tables FTS5 keeps), PostgreSQL's generated tsvector column.
_NOT_IN_MODELS = ("memories_fts", "text_tsv", "ix_memories_text_tsv")


def _in_models(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not (reflected and name is not None and name.startswith(_NOT_IN_MODELS))


def _differences(connection: Any) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "compare_server_default": False, "include_object": _in_models},
    )
    return list(compare_metadata(context, Base.metadata))


async def test_migrated_schema_matches_the_models(services: Services) -> None:
    async with services.database.engine.connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == []
