"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL
(a model change without its migration fails here, not in production)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from companion.services import Services
from companion.storage.models import Base


def _differences(connection: Any) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": False})
    return list(compare_metadata(context, Base.metadata))


async def test_migrated_schema_matches_the_models(services: Services) -> None:
    async with services.database.engine.connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == []
