"""Context assembly: everything read before the model is called (personality, preferences, the
running summary, the recent messages and the long-term memories), from the caches, with the
database as the fallback for each. The recent messages come from the conversation buffer; a miss rebuilds it from the database,
and a buffer that could not be updated is dropped (now or, if Redis is down, on recovery), so it can
only ever be missing, never wrong. Another instance may reach Redis before that drop (or Redis may
come back with the old list), so each append also checks that the buffer ends with the message the
database has just before the new one (by stamp), and rebuilds it if not."""

from __future__ import annotations

import uuid
from datetime import datetime

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.tiered import TieredCache
from companion.chat.summary import Summarizer
from companion.conversations.buffer import BufferedMessage, ConversationBuffer, stamp
from companion.conversations.schemas import ConversationOut
from companion.conversations.service import ConversationService
from companion.memory.service import MemoryService
from companion.memory.store import MemoryOut
from companion.personalities.schemas import PersonalityOut
from companion.personalities.service import PersonalityService
from companion.preferences.schemas import Preferences
from companion.preferences.service import PreferenceService


class ContextAssembler:
    def __init__(
        self,
        *,
        conversations: ConversationService,
        personalities: PersonalityService,
        preferences: PreferenceService,
        buffer: ConversationBuffer,
        summarizer: Summarizer | None,
        memories: MemoryService | None = None,
        cache: TieredCache,
        window: int,
    ) -> None:
        self._conversations = conversations
        self._personalities = personalities
        self._preferences = preferences
        self._buffer = buffer
        self._summarizer = summarizer
        self.memories = memories
        self._cache = cache
        self.window = window

    async def profile(self, user_id: uuid.UUID, conversation: ConversationOut) -> tuple[PersonalityOut, Preferences]:
        """Raises NotFound if the conversation's personality no longer exists for this user."""
        personality = await self._personalities.resolve(user_id, conversation.personality)
        return personality, await self._preferences.get(user_id)

    async def history(
        self, conversation_id: uuid.UUID, newest: BufferedMessage, *, after: str | None = None
    ) -> list[BufferedMessage]:
        """The last `window` messages ending with `newest` (just stored), appending it to the buffer.
        `after` is the stamp of the message stored before it (the conversation's `updated_at` read
        just before storing `newest`): a buffer that does not end with it missed a message."""
        recent: list[BufferedMessage] | None = None
        try:
            if await self._buffer.append(conversation_id, newest, after=after):
                recent = await self._buffer.recent(conversation_id, self.window)
        except CacheUnavailable:
            await self._forget(conversation_id)
        if recent and recent[-1].id == newest.id:
            return recent
        rows = await self._conversations.recent_messages(conversation_id, self.window)
        recent = [BufferedMessage(id=m.id, role=m.role, content=m.content, at=stamp(m.created_at)) for m in rows]
        if not recent or recent[-1].id != newest.id:
            # Turns are serialized per conversation, so this only happens if the buffer and the
            # database disagree; the prompt must still end with the message being answered.
            recent = [*[m for m in recent if m.id < newest.id][-(self.window - 1) :], newest]
        try:
            await self._buffer.replace(conversation_id, recent)
        except CacheUnavailable:
            await self._forget(conversation_id)
        return recent

    async def rebuild(self, conversation_id: uuid.UUID) -> list[BufferedMessage]:
        """After the active path changed (a branch switch, a regenerate): the buffer rebuilt from the
        path's newest messages, and the summary made one of the new path."""
        rows = await self._conversations.recent_messages(conversation_id, self.window)
        recent = [BufferedMessage(id=m.id, role=m.role, content=m.content, at=stamp(m.created_at)) for m in rows]
        try:
            if recent:
                await self._buffer.replace(conversation_id, recent)
            else:
                await self._buffer.drop(conversation_id)
        except CacheUnavailable:
            await self._forget(conversation_id)
        await self.path_changed(conversation_id)
        return recent

    async def path_changed(self, conversation_id: uuid.UUID) -> None:
        """The active path no longer ends where it did: the summary must be one of the new path."""
        if self._summarizer is not None:
            await self._summarizer.follow_path(conversation_id)

    async def preferences(self, user_id: uuid.UUID) -> Preferences:
        return await self._preferences.get(user_id)

    async def remember(self, conversation_id: uuid.UUID, message: BufferedMessage, *, after: str | None = None) -> None:
        """Add a settled reply to the buffer (or drop the buffer if that fails). `after`: the stamp of
        the message it answers."""
        if not message.content:
            return
        try:
            await self._buffer.append(conversation_id, message, after=after)
        except CacheUnavailable:
            await self._forget(conversation_id)

    async def _forget(self, conversation_id: uuid.UUID) -> None:
        # Deferred until Redis answers again if it is down: a buffer that missed a message must
        # never be read after the outage.
        await self._cache.invalidate(keys.conversation_buffer(conversation_id))

    async def summary(self, conversation_id: uuid.UUID) -> str | None:
        if self._summarizer is None:
            return None
        found = await self._summarizer.latest(conversation_id)
        return found.content if found else None

    async def recall(
        self, user_id: uuid.UUID, preferences: Preferences, query: str, *, generation: int | None = None
    ) -> list[MemoryOut]:
        """Long-term memories for the prompt (none if the user turned memory off), each with when it
        was said. `generation`: the user's memory generation if the caller has just read it."""
        if self.memories is None or not preferences.memory_enabled:
            return []
        return await self.memories.recall(user_id, query, generation=generation)

    def after_turn(self, conversation_id: uuid.UUID, history_length: int) -> None:
        if self._summarizer is not None and history_length >= self.window:
            self._summarizer.schedule(conversation_id)

    def learn(
        self,
        user_id: uuid.UUID,
        conversation_id: uuid.UUID,
        message_id: int,
        content: str,
        said_at: datetime | None = None,
    ) -> None:
        """Extract long-term memories from the user's message, in the background. `said_at`: when it
        was stored (a "forget everything" since then drops it)."""
        if self.memories is not None:
            self.memories.schedule_extraction(user_id, conversation_id, message_id, content, said_at=said_at)

    async def forget_conversation(self, conversation_id: uuid.UUID) -> None:
        """A deleted conversation's buffer and summary go from Redis and every instance's L1 now, not
        when they expire (deferred until Redis answers, if it does not now)."""
        try:
            await self._buffer.drop(conversation_id)
        except CacheUnavailable:
            pass  # the invalidation below is remembered and replayed
        await self._cache.invalidate(
            keys.conversation_buffer(conversation_id), keys.conversation_summary(conversation_id)
        )
