"""Conversations and their messages, always scoped to the owning user: another user's ids are
indistinguishable from ids that do not exist (NotFound)."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from companion.conversations.schemas import ConversationOut, MessageOut, MessageStatus
from companion.errors import NotFound
from companion.storage.database import Database
from companion.storage.models import Conversation, Message, User
from companion.types import Clock, utcnow


def _conversation_out(row: Conversation) -> ConversationOut:
    return ConversationOut(
        id=row.id,
        personality=row.personality_name,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _message_out(row: Message) -> MessageOut:
    return MessageOut(
        id=row.id,
        conversation_id=row.conversation_id,
        role=row.role,  # type: ignore[arg-type]
        content=row.content,
        status=row.status,  # type: ignore[arg-type]
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        created_at=row.created_at,
    )


async def _append(session: AsyncSession, message: Message) -> None:
    """Add the message and mark its conversation active as of the message's time."""
    session.add(message)
    await session.execute(
        update(Conversation).where(Conversation.id == message.conversation_id).values(updated_at=message.created_at)
    )


def _conversation_not_found() -> NotFound:
    return NotFound("No such conversation. List yours with GET /v1/conversations.", code="conversation_not_found")


class ConversationService:
    def __init__(self, database: Database, clock: Clock = utcnow) -> None:
        self._db = database
        self._clock = clock

    async def create(self, user_id: uuid.UUID, personality_name: str, title: str | None = None) -> ConversationOut:
        now = self._clock()
        row = Conversation(
            id=uuid.uuid4(),
            user_id=user_id,
            personality_name=personality_name,
            title=title,
            created_at=now,
            updated_at=now,
        )
        async with self._db.session() as session:
            session.add(row)
        return _conversation_out(row)

    async def get(self, user_id: uuid.UUID, conversation_id: uuid.UUID) -> ConversationOut:
        """Raises NotFound when missing or owned by someone else."""
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Conversation).where(Conversation.id == conversation_id, Conversation.user_id == user_id)
                )
            ).scalar_one_or_none()
        if row is None:
            raise _conversation_not_found()
        return _conversation_out(row)

    async def latest(self, user_id: uuid.UUID, personality_name: str) -> ConversationOut | None:
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Conversation)
                    .where(Conversation.user_id == user_id, Conversation.personality_name == personality_name)
                    .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        return _conversation_out(row) if row else None

    async def list(
        self, user_id: uuid.UUID, *, personality: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[ConversationOut], bool]:
        query = select(Conversation).where(Conversation.user_id == user_id)
        if personality is not None:
            query = query.where(Conversation.personality_name == personality)
        query = query.order_by(Conversation.updated_at.desc(), Conversation.id).offset(offset).limit(limit + 1)
        async with self._db.session() as session:
            rows = list((await session.execute(query)).scalars())
        return [_conversation_out(r) for r in rows[:limit]], len(rows) > limit

    async def delete(self, user_id: uuid.UUID, conversation_id: uuid.UUID) -> None:
        async with self._db.session() as session:
            result = await session.execute(
                delete(Conversation).where(Conversation.id == conversation_id, Conversation.user_id == user_id)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise _conversation_not_found()

    # --- messages -------------------------------------------------------------------------------

    async def add_message(
        self,
        conversation_id: uuid.UUID,
        role: str,
        content: str,
        *,
        status: MessageStatus = "complete",
    ) -> MessageOut:
        """Store a message and mark the conversation active; returns it with its id."""
        now = self._clock()
        row = Message(conversation_id=conversation_id, role=role, content=content, status=status, created_at=now)
        async with self._db.session() as session:
            await _append(session, row)
        return _message_out(row)

    async def add_turn_message(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, content: str
    ) -> tuple[MessageOut, datetime, int]:
        """Store the user's message that starts a turn, in one transaction that also reads what the
        turn needs: the conversation's `updated_at` before this message (the stamp of the message
        stored before it) and the user's memory generation. Raises NotFound if the conversation is
        gone or is not the user's."""
        now = self._clock()
        row = Message(conversation_id=conversation_id, role="user", content=content, status="complete", created_at=now)
        async with self._db.session() as session:
            found = (
                await session.execute(
                    select(Conversation.updated_at, User.memory_generation)
                    .join(User, User.id == Conversation.user_id)
                    .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
                )
            ).one_or_none()
            if found is None:
                raise _conversation_not_found()
            await _append(session, row)
        return _message_out(row), found.updated_at, int(found.memory_generation)

    async def update_message(
        self,
        message_id: int,
        content: str,
        *,
        status: MessageStatus,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        only_streaming: bool = False,
    ) -> bool:
        """Write a reply's text and status; a `streaming` write also renews its heartbeat. With
        `only_streaming`, only a reply still streaming is changed, so that a reply another instance
        has settled (its run was thought dead) is never brought back. True if the row changed."""
        values: dict[str, object] = {"content": content, "status": status}
        if status == "streaming":
            values["heartbeat_at"] = self._clock()
        if prompt_tokens is not None:
            values["prompt_tokens"] = prompt_tokens
        if completion_tokens is not None:
            values["completion_tokens"] = completion_tokens
        query = update(Message).where(Message.id == message_id)
        if only_streaming:
            query = query.where(Message.status == "streaming")
        async with self._db.session() as session:
            result = await session.execute(query.values(**values))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def heartbeat(self, message_id: int) -> bool:
        """Show that a streaming reply's run is alive. False if the reply is no longer streaming."""
        async with self._db.session() as session:
            result = await session.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "streaming")
                .values(heartbeat_at=self._clock())
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def get_reply(self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int) -> MessageOut:
        """An assistant message of one of the user's conversations; NotFound otherwise (another
        user's reply is indistinguishable from one that does not exist)."""
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Message)
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(
                        Message.id == message_id,
                        Message.conversation_id == conversation_id,
                        Message.role == "assistant",
                        Conversation.user_id == user_id,
                    )
                )
            ).scalar_one_or_none()
        if row is None:
            raise NotFound("No such reply in this conversation.", code="message_not_found")
        return _message_out(row)

    async def message(self, message_id: int) -> MessageOut | None:
        async with self._db.session() as session:
            row = await session.get(Message, message_id)
        return _message_out(row) if row is not None else None

    async def user_message_before(self, conversation_id: uuid.UUID, message_id: int) -> int | None:
        """The id of the user's message a reply answers (the newest user message before it)."""
        async with self._db.session() as session:
            found = await session.scalar(
                select(Message.id)
                .where(Message.conversation_id == conversation_id, Message.id < message_id, Message.role == "user")
                .order_by(Message.id.desc())
                .limit(1)
            )
        return int(found) if found is not None else None

    async def list_messages(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID,
        *,
        limit: int = 50,
        before: int | None = None,
        after: int | None = None,
    ) -> tuple[builtins.list[MessageOut], bool]:
        """A page of messages in chronological order: the newest `limit` by default, those older than
        `before`, or those newer than `after`. Raises NotFound for another user's conversation."""
        await self.get(user_id, conversation_id)
        query = select(Message).where(Message.conversation_id == conversation_id)
        if after is not None:
            query = query.where(Message.id > after).order_by(Message.id.asc())
        else:
            if before is not None:
                query = query.where(Message.id < before)
            query = query.order_by(Message.id.desc())
        async with self._db.session() as session:
            rows = list((await session.execute(query.limit(limit + 1))).scalars())
        has_more = len(rows) > limit
        rows = rows[:limit]
        if after is None:
            rows.reverse()
        return [_message_out(r) for r in rows], has_more

    async def recent_messages(self, conversation_id: uuid.UUID, count: int) -> Sequence[MessageOut]:
        """The newest `count` messages that belong in a prompt, oldest first. A reply still being
        generated is left out; partial replies the user already saw are kept."""
        async with self._db.session() as session:
            rows = list(
                (
                    await session.execute(
                        select(Message)
                        .where(
                            Message.conversation_id == conversation_id,
                            Message.status != "streaming",
                            Message.content != "",
                        )
                        .order_by(Message.id.desc())
                        .limit(count)
                    )
                ).scalars()
            )
        rows.reverse()
        return [_message_out(r) for r in rows]

    async def settle_stale(self, older_than: datetime, *, skip: Collection[int] = ()) -> builtins.list[MessageOut]:
        """Mark `incomplete` the replies still `streaming` whose run has shown no sign of life since
        `older_than` (heartbeat, or creation if it never beat): their instance died. The text saved
        so far is kept. `skip`: replies this instance is running itself. Returns the settled ones."""
        alive_at = func.coalesce(Message.heartbeat_at, Message.created_at)
        async with self._db.session() as session:
            candidates = list(
                (
                    await session.execute(
                        select(Message.id).where(Message.status == "streaming", alive_at < older_than).limit(500)
                    )
                ).scalars()
            )
        settled: builtins.list[MessageOut] = []
        for message_id in candidates:
            if message_id in skip:
                continue
            async with self._db.session() as session:
                # Checked again in the update: its run may have beaten (or settled it) meanwhile.
                result = await session.execute(
                    update(Message)
                    .where(Message.id == message_id, Message.status == "streaming", alive_at < older_than)
                    .values(status="incomplete")
                )
                row = await session.get(Message, message_id) if result.rowcount else None  # type: ignore[attr-defined]
                if row is not None:
                    settled.append(_message_out(row))
        return settled
