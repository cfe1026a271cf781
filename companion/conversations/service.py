"""Conversations and their messages, always scoped to the owning user: another user's ids are
indistinguishable from ids that do not exist (NotFound)."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, bindparam, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from companion.conversations import transfer, tree
from companion.conversations.schemas import ConversationOut, MessageOut, MessageStatus
from companion.errors import Conflict, InvalidInput, NotFound
from companion.interchange.chats import ExportedConversation
from companion.storage.database import Database
from companion.storage.models import Conversation, Message, User
from companion.storage.user_lock import lock_user
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
        parent_id=row.parent_id,
    )


class AtHead:
    """The default parent of a new message: the end of the conversation's active path."""


@dataclass(frozen=True)
class ConversationState:
    """What a turn changes on its conversation before its reply (head, activity time, title): what
    `withdraw` puts back when the turn is refused after it began."""

    head_id: int | None
    updated_at: datetime
    title: str | None


HEAD = AtHead()
TITLE_CHARS = 60


def title_from(content: str) -> str:
    """A conversation's title from its first message: its first line, shortened."""
    line = " ".join(content.strip().splitlines()[0].split()) if content.strip() else ""
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def _turn_state() -> Select[datetime, int | None, str | None, int, datetime]:
    head = aliased(Message)
    return (
        select(
            Conversation.updated_at,
            Conversation.head_id,
            Conversation.title,
            User.memory_generation,
            head.created_at.label("head_at"),
        )
        .join(User, User.id == Conversation.user_id)
        .outerjoin(head, head.id == Conversation.head_id)
        .where(Conversation.id == bindparam("conversation_id"), Conversation.user_id == bindparam("user_id"))
    )


# What a turn reads in the transaction that stores its message (see add_turn_message). Built once:
# an alias of a table costs more to build than the query costs to run.
_TURN_STATE = _turn_state()


async def _head_of(session: AsyncSession, conversation_id: uuid.UUID) -> int | None:
    return (
        await session.execute(select(Conversation.head_id).where(Conversation.id == conversation_id))
    ).scalar_one_or_none()


async def _append(session: AsyncSession, message: Message) -> None:
    """Add the message at the end of the active path (it becomes the head) and mark its
    conversation active as of the message's time."""
    session.add(message)
    await session.flush()
    await session.execute(
        update(Conversation)
        .where(Conversation.id == message.conversation_id)
        .values(updated_at=message.created_at, head_id=message.id)
    )


def _conversation_not_found() -> NotFound:
    return NotFound("No such conversation. List yours with GET /v1/conversations.", code="conversation_not_found")


class ConversationService:
    def __init__(self, database: Database, clock: Clock = utcnow, *, max_per_user: int = 10_000) -> None:
        self._db = database
        self._clock = clock
        self.max_per_user = max_per_user  # CONVERSATIONS_MAX_PER_USER

    async def create(
        self, user_id: uuid.UUID, personality_name: str, title: str | None = None, *, greetings: Sequence[str] = ()
    ) -> ConversationOut:
        """A new conversation; `greetings` (a character card's) open it as the assistant's first
        message, the first one active and the others alternatives to swipe to. Raises Conflict (409
        `too_many_conversations`) past CONVERSATIONS_MAX_PER_USER."""
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
            await lock_user(session, user_id)  # the count below holds until this one is in
            held = (await session.execute(select(func.count()).where(Conversation.user_id == user_id))).scalar_one()
            if held >= self.max_per_user:
                raise Conflict(
                    f"You already have {held} conversations (CONVERSATIONS_MAX_PER_USER={self.max_per_user}); "
                    "delete some first (DELETE /v1/conversations/{id}).",
                    code="too_many_conversations",
                )
            session.add(row)
            await session.flush()
            first: int | None = None
            for text in greetings:
                greeting = Message(
                    conversation_id=row.id, role="assistant", content=text, status="complete", created_at=now
                )
                session.add(greeting)
                await session.flush()
                first = greeting.id if first is None else first
            if first is not None:
                row.head_id = first
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
        parent_id: int | AtHead | None = HEAD,
    ) -> MessageOut:
        """Store a message after `parent_id` (by default at the end of the active path), make it the
        head and mark the conversation active; returns it with its id."""
        now = self._clock()
        row = Message(conversation_id=conversation_id, role=role, content=content, status=status, created_at=now)
        async with self._db.session() as session:
            row.parent_id = await _head_of(session, conversation_id) if isinstance(parent_id, AtHead) else parent_id
            await _append(session, row)
        return _message_out(row)

    async def add_turn_message(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, content: str, *, parent_id: int | AtHead | None = HEAD
    ) -> tuple[MessageOut, datetime | None, int, ConversationState]:
        """Store the user's message that starts a turn, after `parent_id` (by default the end of the
        active path; an edit gives the edited message's parent), in one transaction that also reads
        what the turn needs: the time of the message it follows (the stamp the buffer must end with;
        None when it follows nothing), the user's memory generation, and the conversation as it was
        (for `withdraw`).
        An untitled conversation takes its title from the message. Raises NotFound if the
        conversation is gone or is not the user's."""
        now = self._clock()
        row = Message(conversation_id=conversation_id, role="user", content=content, status="complete", created_at=now)
        async with self._db.session() as session:
            found = (
                await session.execute(_TURN_STATE, {"conversation_id": conversation_id, "user_id": user_id})
            ).one_or_none()
            if found is None:
                raise _conversation_not_found()
            previous_at: datetime | None
            if isinstance(parent_id, AtHead):
                parent, previous_at = found.head_id, found.head_at
            else:
                parent, previous_at = parent_id, None
                if parent is not None:
                    previous_at = (
                        await session.execute(
                            select(Message.created_at).where(
                                Message.id == parent, Message.conversation_id == conversation_id
                            )
                        )
                    ).scalar_one_or_none()
            row.parent_id = parent
            await _append(session, row)
            if found.title is None:
                await session.execute(
                    update(Conversation).where(Conversation.id == conversation_id).values(title=title_from(content))
                )
        before = ConversationState(found.head_id, found.updated_at, found.title)
        return _message_out(row), previous_at, int(found.memory_generation), before

    async def withdraw(self, conversation_id: uuid.UUID, before: ConversationState, message_id: int | None) -> None:
        """Undo a turn refused after it began (its quota had no room for its prompt): delete the user
        message it stored (`message_id`; None when it stored none) and put the conversation's head,
        activity time and title back as they were. Call while holding the conversation's turn."""
        restore: dict[str, object] = {"head_id": before.head_id, "updated_at": before.updated_at}
        if before.title is None:  # the turn's message titled it
            restore["title"] = None
        async with self._db.session() as session:
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(**restore))
            if message_id is not None:
                await session.execute(
                    delete(Message).where(Message.id == message_id, Message.conversation_id == conversation_id)
                )

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
        message = await self.owned_message(user_id, conversation_id, message_id)
        if message.role != "assistant":
            raise NotFound("No such reply in this conversation.", code="message_not_found")
        return message

    async def message(self, message_id: int) -> MessageOut | None:
        async with self._db.session() as session:
            row = await session.get(Message, message_id)
        return _message_out(row) if row is not None else None

    async def user_message_before(self, conversation_id: uuid.UUID, message_id: int) -> int | None:
        """The id of the user's message a reply answers: its parent (with branches, the newest user
        message before it may be on another branch)."""
        async with self._db.session() as session:
            parent = await session.scalar(
                select(Message.parent_id).where(Message.id == message_id, Message.conversation_id == conversation_id)
            )
            if parent is not None:
                return int(parent)
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
        whole_tree: bool = False,
    ) -> tuple[builtins.list[MessageOut], bool]:
        """A page of the active path in chronological order (each message with the ids of its
        alternatives in `siblings`), or of every message of the tree with `whole_tree`: the newest
        `limit` by default, those older than `before`, or those newer than `after`. Raises NotFound
        for another user's conversation."""
        async with self._db.session() as session:
            head = (
                await session.execute(
                    select(Conversation.head_id).where(
                        Conversation.id == conversation_id, Conversation.user_id == user_id
                    )
                )
            ).one_or_none()
            if head is None:
                raise _conversation_not_found()
            query = select(Message).where(Message.conversation_id == conversation_id)
            if not whole_tree:
                # The newest page (the usual read) walks only as far back along the path as it shows.
                depth = limit + 1 if before is None and after is None else None
                query = query.where(Message.id.in_(tree.path_select(head[0], limit=depth)))
            if after is not None:
                query = query.where(Message.id > after).order_by(Message.id.asc())
            else:
                if before is not None:
                    query = query.where(Message.id < before)
                query = query.order_by(Message.id.desc())
            rows = list((await session.execute(query.limit(limit + 1))).scalars())
            has_more = len(rows) > limit
            rows = rows[:limit]
            if after is None:
                rows.reverse()
            if whole_tree:
                return [_message_out(r) for r in rows], has_more
            children = await tree.siblings_of(session, conversation_id, {r.parent_id for r in rows})
        return [_message_out(r).model_copy(update={"siblings": children[r.parent_id]}) for r in rows], has_more

    async def recent_messages(self, conversation_id: uuid.UUID, count: int) -> Sequence[MessageOut]:
        """The newest `count` messages of the active path that belong in a prompt, oldest first. A
        reply still being generated is left out; partial replies the user already saw are kept."""
        async with self._db.session() as session:
            head = await _head_of(session, conversation_id)
            # A few more than asked for: replies that are empty or still streaming are skipped.
            ids = tree.path_select(head, limit=count * 2 + 4)
            rows = list(
                (
                    await session.execute(
                        select(Message)
                        .where(Message.id.in_(ids), Message.status != "streaming", Message.content != "")
                        .order_by(Message.id.desc())
                        .limit(count)
                    )
                ).scalars()
            )
        rows.reverse()
        return [_message_out(r) for r in rows]

    async def active_path(self, conversation_id: uuid.UUID) -> builtins.list[MessageOut]:
        """Every message of the active path, oldest first (exports, summaries)."""
        async with self._db.session() as session:
            ids = tree.path_select(await _head_of(session, conversation_id))
            rows = (await session.execute(select(Message).where(Message.id.in_(ids)).order_by(Message.id))).scalars()
            return [_message_out(r) for r in rows]

    async def owned_message(self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int) -> MessageOut:
        """One message of the user's conversation. Raises NotFound."""
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Message)
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(
                        Message.id == message_id,
                        Message.conversation_id == conversation_id,
                        Conversation.user_id == user_id,
                    )
                )
            ).scalar_one_or_none()
        if row is None:
            raise NotFound("No such message in this conversation.", code="message_not_found")
        return _message_out(row)

    async def switch(self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int) -> int:
        """Make the branch through `message_id` the active path: the head becomes the newest leaf
        below it. Returns the new head. Raises NotFound."""
        await self.owned_message(user_id, conversation_id, message_id)
        async with self._db.session() as session:
            head = tree.newest_leaf(await tree.children_of(session, conversation_id), message_id)
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(head_id=head))
        return head

    async def rewind(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int
    ) -> tuple[MessageOut, ConversationState]:
        """Make the user message `message_id` (or the one a reply `message_id` answers) the end of the
        active path, so that a new reply to it becomes an alternative to the ones it has. Returns
        that user message and the conversation as it was (for `withdraw`). Raises NotFound,
        InvalidInput."""
        found = await self.owned_message(user_id, conversation_id, message_id)
        if found.role == "assistant" and found.parent_id is not None:
            found = await self.owned_message(user_id, conversation_id, found.parent_id)
        if found.role != "user":
            raise InvalidInput(
                "Only a reply to one of your messages can be regenerated (not a greeting).",
                code="cannot_regenerate",
                param="message_id",
            )
        async with self._db.session() as session:
            was = (
                await session.execute(
                    select(Conversation.head_id, Conversation.updated_at, Conversation.title).where(
                        Conversation.id == conversation_id
                    )
                )
            ).one()
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(head_id=found.id)
            )
        return found, ConversationState(was.head_id, was.updated_at, was.title)

    async def export(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID | None = None
    ) -> builtins.list[ExportedConversation]:
        """The user's conversations whole (or the one: NotFound if it is not theirs)."""
        async with self._db.session() as session:
            found = await transfer.export(session, user_id, conversation_id)
        if conversation_id is not None and not found:
            raise _conversation_not_found()
        return found

    async def import_(
        self, user_id: uuid.UUID, conversations: Sequence[ExportedConversation]
    ) -> builtins.list[ConversationOut]:
        """Store conversations read from a file, all or (on any error) none. Raises Conflict (409
        `too_many_conversations`) when they would take the user past CONVERSATIONS_MAX_PER_USER."""
        async with self._db.session() as session:
            await lock_user(session, user_id)  # the count below holds until this one is in
            held = (await session.execute(select(func.count()).where(Conversation.user_id == user_id))).scalar_one()
            if held + len(conversations) > self.max_per_user:
                raise Conflict(
                    f"You have {held} conversations and the file holds {len(conversations)}: more than "
                    f"CONVERSATIONS_MAX_PER_USER={self.max_per_user}; delete some first.",
                    code="too_many_conversations",
                )
            return await transfer.import_(session, user_id, conversations)

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
