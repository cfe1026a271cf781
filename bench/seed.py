"""Data the groups measure against: users, conversations of a given length and long-term memories,
written straight to the database in bulk (seeding 10,000 rows through the services would take
longer than measuring them)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import aliased

from companion.conversations.buffer import BufferedMessage, stamp
from companion.conversations.schemas import ConversationOut
from companion.conversations.service import ConversationService
from companion.storage.database import Database
from companion.storage.models import Conversation, ConversationSummary, Message
from companion.types import utcnow

WORDS = (
    "river garden music travel coffee book sister mountain evening project football painting "
    "recipe weekend train letter harbor winter lantern orchard"
).split()


def sentence(index: int, words: int = 14) -> str:
    return " ".join(WORDS[(index * 7 + k * 3) % len(WORDS)] for k in range(words)).capitalize() + "."


@dataclass(frozen=True)
class SeededConversation:
    conversation: ConversationOut
    newest: BufferedMessage  # the last message, a user message: the one a turn would be answering
    after: str  # the stamp of the message stored before it


async def conversation(
    database: Database, user_id: uuid.UUID, *, messages: int, personality: str = "elara", summary_window: int = 0
) -> SeededConversation:
    """A conversation of `messages` messages (alternating, ending with the user's), in one transaction.
    With `summary_window`, the messages before the last `summary_window` already have a running
    summary, as the background summarizer would have written (capped at 4,000 characters)."""
    assert messages >= 2
    created = await ConversationService(database).create(user_id, personality, title="bench")
    start = utcnow() - timedelta(seconds=messages + 10)
    rows = []
    for index in range(messages):
        role = "user" if (messages - 1 - index) % 2 == 0 else "assistant"
        rows.append(
            {
                "conversation_id": created.id,
                "role": role,
                "content": sentence(index),
                "status": "complete",
                "created_at": start + timedelta(seconds=index),
            }
        )
    async with database.session() as session:
        for chunk in range(0, len(rows), 2000):
            await session.execute(insert(Message), rows[chunk : chunk + 2000])
        # A straight line: each message follows the one before it, the newest ends the active path.
        earlier = aliased(Message)
        await session.execute(
            update(Message)
            .where(Message.conversation_id == created.id)
            .values(
                parent_id=select(func.max(earlier.id))
                .where(earlier.conversation_id == created.id, earlier.id < Message.id)
                .scalar_subquery()
            )
        )
        newest_id = select(func.max(Message.id)).where(Message.conversation_id == created.id).scalar_subquery()
        await session.execute(
            update(Conversation)
            .where(Conversation.id == created.id)
            .values(updated_at=rows[-1]["created_at"], head_id=newest_id)
        )
    if summary_window and messages > summary_window:
        departed = messages - summary_window
        async with database.session() as session:
            first_id = int(
                await session.scalar(select(func.min(Message.id)).where(Message.conversation_id == created.id)) or 0
            )
        text = "\n".join(f"The user said: {sentence(i)}" for i in range(0, departed, 2))[-3999:]
        async with database.session() as session:
            session.add(
                ConversationSummary(
                    conversation_id=created.id,
                    upto_message_id=first_id + departed - 1,
                    content=text,
                    created_at=utcnow(),
                )
            )
    recent = await ConversationService(database).recent_messages(created.id, 2)
    before, last = recent[-2], recent[-1]
    newest = BufferedMessage(id=last.id, role=last.role, content=last.content, at=stamp(last.created_at))
    return SeededConversation(created, newest, stamp(before.created_at))


async def memories(database: Database, user_id: uuid.UUID, *, count: int, model_id: str, dimensions: int) -> None:
    """`count` memories with random unit vectors (search cost does not depend on what they say), then
    one bump of the user's memory generation, as the store does for each change."""
    from companion.storage.models import Memory, User

    generator = np.random.default_rng(count)
    vectors = generator.standard_normal((count, dimensions)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = utcnow()
    rows = [
        {
            "id": uuid.uuid4(),
            "user_id": user_id,
            "text": f"The user mentioned {sentence(index, 6).lower()}",
            "kind": "fact",
            "embedding": np.ascontiguousarray(vectors[index], dtype="<f4").tobytes(),
            "model": model_id,
            "created_at": now - timedelta(seconds=count - index),
            "updated_at": now - timedelta(seconds=count - index),
        }
        for index in range(count)
    ]
    async with database.session() as session:
        for chunk in range(0, len(rows), 1000):
            await session.execute(insert(Memory), rows[chunk : chunk + 1000])
        await session.execute(
            update(User).where(User.id == user_id).values(memory_generation=User.memory_generation + 1)
        )
