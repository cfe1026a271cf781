"""The relational schema (system of record): users and their API keys, personalities, preferences,
conversations and messages. Alembic migrations in `migrations/` create exactly these tables."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Bumped in the same transaction as any change to the user's memories: the version that every
    # cached memory search and in-process vector matrix is keyed by (see companion/memory/store.py).
    memory_generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the whole key: keys are 256-bit random, so a slow password hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # What the user calls it ("laptop", "ci"); several keys per user, each revocable on its own.
    name: Mapped[str] = mapped_column(String(100), default="default", server_default="default")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Written at most once per API_KEY_LAST_USED_FLUSH_SECONDS per key and instance, never per request.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Personality(Base):
    __tablename__ = "personalities"
    __table_args__ = (
        Index("uq_personalities_owner_name", "owner_id", "name", unique=True),
        # NULL owners are distinct in a unique index, so globals need their own partial index.
        Index(
            "uq_personalities_global_name",
            "name",
            unique=True,
            sqlite_where=text("owner_id IS NULL"),
            postgresql_where=text("owner_id IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    name: Mapped[str] = mapped_column(String(40))
    display_name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(String(500))
    system_prompt: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The character card it was imported from (companion.interchange.cards.CardData), kept whole so
    # that an export gives back what came in; and the card's PNG picture, if it came as one.
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    avatar: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)


class Preferences(Base):
    __tablename__ = "preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_user_personality", "user_id", "personality_name", "updated_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # By name, not id: a conversation follows the personality the user sees under that name.
    personality_name: Mapped[str] = mapped_column(String(40))
    title: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The newest message of the active path (None: no messages yet). Messages form a tree through
    # `Message.parent_id`; prompts, the buffer and the summary follow the path that ends here.
    head_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        Index("ix_messages_parent_id", "parent_id"),
        # The sweeper looks for replies still streaming every few seconds: only those are indexed.
        Index(
            "ix_messages_streaming",
            "status",
            sqlite_where=text("status = 'streaming'"),
            postgresql_where=text("status = 'streaming'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    # The message this one follows (None: the first of the conversation, or one of its greetings).
    # Siblings are alternatives: regenerated replies, or an edited user message.
    parent_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # complete | streaming | stopped (stop requested) | incomplete (its instance died, or an
    # OpenAI-compatible client left) | error (provider failed mid-reply)
    status: Mapped[str] = mapped_column(String(16), default="complete")
    # While streaming: when its run last showed it was alive (every save, and a heartbeat while the
    # model stalls). A streaming reply whose heartbeat is stale has lost its instance (companion.chat.runs).
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ConversationSummary(Base):
    """A running summary of the messages that left the short-term window, up to `upto_message_id`.
    Rows are only ever added: a new summary extends the previous one and never touches messages."""

    __tablename__ = "conversation_summaries"
    __table_args__ = (Index("ix_conversation_summaries_conversation_id_id", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    upto_message_id: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Memory(Base):
    """Something the user said (`kind` "episode": a passage of their message, verbatim), a fact
    distilled from it (pointing to its episode), or a note they added, with its embedding (float32,
    little-endian, `dimensions` long), when it was said and where it came from. Searched per user
    only: every query filters on `user_id`. Its words are indexed outside this model (migration 0005:
    SQLite FTS5 `memories_fts`, PostgreSQL `text_tsv`)."""

    __tablename__ = "memories"
    __table_args__ = (
        Index("ix_memories_user_id_updated_at", "user_id", "updated_at"),
        Index("ix_memories_conversation_id", "conversation_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    model: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL"), nullable=True
    )
    source_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A fact's episode (no foreign key: deleting an episode deletes its facts in the store).
    episode_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    said_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # None: created_at
    dates: Mapped[str | None] = mapped_column(Text, nullable=True)  # relative dates resolved, as JSON

