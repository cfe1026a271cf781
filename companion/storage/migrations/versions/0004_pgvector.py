"""pgvector: where the database is PostgreSQL with the pgvector extension available, a native
vector column for the memories (searched in the database); elsewhere nothing changes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import struct

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DIMENSIONS = 384


def _vector_available(bind: sa.Connection) -> bool:
    if bind.dialect.name != "postgresql":
        return False
    if not bind.scalar(sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'")):
        return False
    try:
        with bind.begin_nested():  # a role that may not create extensions leaves the schema as it was
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
    except sa.exc.DBAPIError:
        return False
    return True


def upgrade() -> None:
    bind = op.get_bind()
    if not _vector_available(bind):
        return
    bind.execute(sa.text(f"ALTER TABLE memories ADD COLUMN IF NOT EXISTS embedding_vec vector({DIMENSIONS})"))
    rows = bind.execute(
        sa.text("SELECT id, embedding FROM memories WHERE embedding_vec IS NULL AND length(embedding) = :size"),
        {"size": DIMENSIONS * 4},
    ).all()
    for memory_id, embedding in rows:
        values = struct.unpack(f"<{DIMENSIONS}f", bytes(embedding))
        literal = "[" + ",".join(f"{v:.7g}" for v in values) + "]"
        bind.execute(
            sa.text("UPDATE memories SET embedding_vec = CAST(:v AS vector) WHERE id = :id"),
            {"v": literal, "id": memory_id},
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text("ALTER TABLE memories DROP COLUMN IF EXISTS embedding_vec"))
