"""memory episodes, time and full-text search: each memory says when it was said and which episode
a fact came from, keeps relative dates resolved, and is found by its words as well as its meaning
(SQLite: an FTS5 index kept by triggers; PostgreSQL: a generated tsvector column with a GIN index)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from companion.storage.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Objects created here that the ORM models do not describe (one per dialect); tests/test_migrations.py
# leaves them out of its models-equal-migrations comparison by these names.
_SQLITE_FTS = """
CREATE VIRTUAL TABLE memories_fts USING fts5(
    text, user_id, content='memories', content_rowid='rowid', tokenize='porter unicode61 remove_diacritics 2'
)
"""
_SQLITE_TRIGGERS = (
    """CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, text, user_id) VALUES (new.rowid, new.text, new.user_id);
    END""",
    """CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text, user_id) VALUES ('delete', old.rowid, old.text, old.user_id);
    END""",
    """CREATE TRIGGER memories_fts_update AFTER UPDATE OF text, user_id ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, text, user_id) VALUES ('delete', old.rowid, old.text, old.user_id);
        INSERT INTO memories_fts(rowid, text, user_id) VALUES (new.rowid, new.text, new.user_id);
    END""",
)


def upgrade() -> None:
    op.add_column("memories", sa.Column("episode_id", sa.Uuid(), nullable=True))
    op.add_column("memories", sa.Column("said_at", UTCDateTime(), nullable=True))
    op.add_column("memories", sa.Column("dates", sa.Text(), nullable=True))
    # Forgetting a conversation's memories, and the SET NULL when a conversation is deleted.
    op.create_index("ix_memories_conversation_id", "memories", ["conversation_id"])
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        bind.execute(sa.text(_SQLITE_FTS))
        for trigger in _SQLITE_TRIGGERS:
            bind.execute(sa.text(trigger))
        bind.execute(sa.text("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')"))
    elif bind.dialect.name == "postgresql":
        bind.execute(
            sa.text(
                "ALTER TABLE memories ADD COLUMN text_tsv tsvector "
                "GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED"
            )
        )
        bind.execute(sa.text("CREATE INDEX ix_memories_text_tsv ON memories USING gin (text_tsv)"))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in ("memories_fts_insert", "memories_fts_delete", "memories_fts_update"):
            bind.execute(sa.text(f"DROP TRIGGER IF EXISTS {name}"))
        bind.execute(sa.text("DROP TABLE IF EXISTS memories_fts"))
    elif bind.dialect.name == "postgresql":
        bind.execute(sa.text("DROP INDEX IF EXISTS ix_memories_text_tsv"))
        bind.execute(sa.text("ALTER TABLE memories DROP COLUMN IF EXISTS text_tsv"))
    op.drop_index("ix_memories_conversation_id", "memories")
    with op.batch_alter_table("memories") as batch:
        batch.drop_column("dates")
        batch.drop_column("said_at")
        batch.drop_column("episode_id")
