"""Conversations out of and into the database, whole: for exports (every message of the tree) and
imports (all of a file's conversations in one transaction, so that a file that fails stores
nothing). The file formats themselves are in companion.interchange.chats."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from companion.conversations.schemas import ConversationOut
from companion.interchange.chats import ExportedConversation, ExportedMessage
from companion.storage.models import Conversation, Message


async def export(
    session: AsyncSession, user_id: uuid.UUID, conversation_id: uuid.UUID | None = None
) -> list[ExportedConversation]:
    """The user's conversations (or the one), newest first, each with its whole tree."""
    query = select(Conversation).where(Conversation.user_id == user_id)
    if conversation_id is not None:
        query = query.where(Conversation.id == conversation_id)
    conversations = list((await session.execute(query.order_by(Conversation.updated_at.desc()))).scalars())
    if not conversations:
        return []
    messages: dict[uuid.UUID, list[ExportedMessage]] = {c.id: [] for c in conversations}
    rows = await session.execute(
        select(Message).where(Message.conversation_id.in_(list(messages))).order_by(Message.id)
    )
    for row in rows.scalars():
        messages[row.conversation_id].append(
            ExportedMessage(
                id=row.id,
                parent_id=row.parent_id,
                role=row.role,  # type: ignore[arg-type]
                content=row.content,
                status=row.status,  # type: ignore[arg-type]
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                created_at=row.created_at,
            )
        )
    return [
        ExportedConversation(
            id=c.id,
            title=c.title,
            personality=c.personality_name,
            created_at=c.created_at,
            updated_at=c.updated_at,
            head_id=c.head_id,
            messages=messages[c.id],
        )
        for c in conversations
    ]


async def import_(
    session: AsyncSession, user_id: uuid.UUID, conversations: Sequence[ExportedConversation]
) -> list[ConversationOut]:
    """Store validated conversations as new ones of the user (new ids; the tree, statuses, usage
    and times as in the file). Parents come before children in each conversation's messages."""
    created: list[ConversationOut] = []
    for conversation in conversations:
        row = Conversation(
            id=uuid.uuid4(),
            user_id=user_id,
            personality_name=conversation.personality,
            title=conversation.title,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
        )
        session.add(row)
        await session.flush()
        # Two bulk statements, not one per message: insert all (ids come back in order), then point
        # each at its parent's new id.
        new_ids: dict[int, int] = {}
        if conversation.messages:
            inserted = await session.execute(
                insert(Message).returning(Message.id, sort_by_parameter_order=True),
                [
                    {
                        "conversation_id": row.id,
                        "role": message.role,
                        "content": message.content,
                        "status": message.status,
                        "prompt_tokens": message.prompt_tokens,
                        "completion_tokens": message.completion_tokens,
                        "created_at": message.created_at,
                    }
                    for message in conversation.messages
                ],
            )
            new_ids = {m.id: int(new_id) for m, new_id in zip(conversation.messages, inserted.scalars(), strict=True)}
            parents = [
                {"id": new_ids[m.id], "parent_id": new_ids[m.parent_id]}
                for m in conversation.messages
                if m.parent_id is not None
            ]
            if parents:
                await session.execute(update(Message), parents)
        row.head_id = new_ids[conversation.head_id] if conversation.head_id is not None else None
        created.append(
            ConversationOut(
                id=row.id,
                personality=row.personality_name,
                title=row.title,
                created_at=conversation.created_at,
                updated_at=conversation.updated_at,
            )
        )
    return created
