"""One chat turn, end to end: check the input, store the user's message, assemble the prompt,
stream the reply while saving it, and settle its final state whatever happens.

Durability rules (DESIGN-NOTES #6): the user's message is committed before generation starts; the
reply row is created at its first token and its text saved at least every
STREAM_FLUSH_INTERVAL_SECONDS while streaming; a client that leaves mid-reply leaves the partial
text marked `incomplete`; a provider failure mid-reply leaves what was generated marked `error`; a
stop request leaves it `stopped`. While the reply streams, its row carries a heartbeat (every save,
and every `heartbeat_seconds` while the model stalls), which tells other instances it is alive.

A turn is consumed by its reply run (companion.chat.runs), on a task of its own, not by a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import anyio

from companion.cache.backend import CacheUnavailable
from companion.chat.context import ContextAssembler
from companion.chat.prompt import Remembered, build_prompt, user_name
from companion.conversations.buffer import BufferedMessage, stamp
from companion.conversations.schemas import ConversationOut, MessageOut
from companion.conversations.service import HEAD, AtHead, ConversationService, ConversationState
from companion.conversations.turns import LocalTurnLock, TurnLock
from companion.errors import CompanionError, InvalidInput, ServiceUnavailable
from companion.interchange import cards
from companion.interchange.cards import fill_user
from companion.llm.base import ChatMessage, GenerationParams, LLMProvider, Usage, estimate_tokens
from companion.personalities.schemas import PersonalityOut
from companion.preferences.schemas import Preferences
from companion.ratelimit.quotas import TokenQuotas
from companion.types import check_text

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ChatLimits:
    max_message_chars: int = 8000
    context_tokens: int = 2048
    max_tokens: int = 256
    temperature: float = 0.7
    repeat_penalty: float = 1.1
    flush_interval_seconds: float = 0.25
    memory_tokens: int = 200
    heartbeat_seconds: float = 2.0


NOTHING_BEFORE = "nothing"


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Turn:
    """Everything decided before the first token: who, where, the stored user message, the prompt.

    A turn holds its conversation (one turn at a time) until `run` has finished with it; a caller
    that never runs a turn it began must `await turn.release()`.
    """

    user_id: uuid.UUID
    conversation: ConversationOut
    user_message: MessageOut
    prompt: list[ChatMessage]
    params: GenerationParams
    release: Callable[[], Awaitable[None]] = _nothing
    history_length: int = 0
    learn: bool = False  # extract long-term memories from the user's message afterwards
    prompt_tokens: int = 0  # estimated; what the quota is charged when the model reports no usage
    reserved_tokens: int = 0  # charged to the user's token quota so far (trued up when it settles)


@dataclass(frozen=True)
class ReplyStarted:
    """The reply's row exists (before its first token is yielded): its id names the reply."""

    message_id: int


@dataclass(frozen=True)
class TokenEvent:
    text: str


@dataclass(frozen=True)
class DoneEvent:
    message_id: int
    user_message_id: int
    content: str
    usage: Usage
    finish_reason: str


@dataclass(frozen=True)
class ErrorEvent:
    error: CompanionError
    message_id: int | None
    content: str = ""


ChatEvent = ReplyStarted | TokenEvent | DoneEvent | ErrorEvent


@dataclass
class RunControl:
    """Set by whoever runs a turn before cancelling its task: a cancellation with `stop_requested`
    is a stop (the reply ends `stopped`, with a DoneEvent), any other one leaves it `incomplete`."""

    stop_requested: bool = False


@dataclass
class _Reply:
    parts: list[str] = field(default_factory=list)
    message_id: int | None = None
    created_at: datetime | None = None
    usage: Usage | None = None
    finish_reason: str = "stop"
    saved_chars: int = 0
    last_flush: float = 0.0
    # Saving happens from the turn's task and, while the model stalls, from a background flusher.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    flusher: asyncio.Task[None] | None = None
    # Another instance settled this reply (it thought the run dead): stop generating it.
    taken_over: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ChatService:
    def __init__(
        self,
        *,
        conversations: ConversationService,
        context: ContextAssembler,
        provider: LLMProvider,
        limits: ChatLimits,
        turns: TurnLock | None = None,
        quotas: TokenQuotas | None = None,
    ) -> None:
        self._conversations = conversations
        self._context = context
        self._provider = provider
        self.limits = limits
        self._turns = turns or LocalTurnLock()
        self._quotas = quotas

    async def forget_conversation(self, conversation_id: uuid.UUID) -> None:
        """Drop a deleted conversation's cached context (buffer, summary) everywhere."""
        await self._context.forget_conversation(conversation_id)

    def check_message(self, content: str) -> str:
        """Raises InvalidInput for empty, oversized or control-character input; stores nothing."""
        if not content.strip():
            raise InvalidInput("The message is empty.", code="empty_message", param="content")
        if len(content) > self.limits.max_message_chars:
            raise InvalidInput(
                f"The message is longer than {self.limits.max_message_chars} characters; split it up.",
                code="message_too_long",
                param="content",
            )
        try:
            check_text(content)
        except ValueError as error:
            raise InvalidInput(f"The message is not acceptable: {error}.", param="content") from None
        return content

    async def begin(
        self,
        user_id: uuid.UUID,
        conversation: ConversationOut,
        content: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        parent_id: int | AtHead | None = HEAD,
    ) -> Turn:
        """Validate, take the conversation's turn, store the user's message and build the prompt.
        The message follows `parent_id` (default: the end of the active path; an edit passes the
        edited message's parent, which starts a new branch).

        Raises InvalidInput (422), NotFound (personality or conversation gone), Conflict (409: another
        reply is still streaming here and did not finish in time), RateLimited (429: the token quota
        has no room for the prompt), ServiceUnavailable (503). Nothing is stored when it raises (a
        turn its quota refuses once its prompt is counted is withdrawn): once the message is stored,
        the turn goes ahead with whatever context could be read (as recall already does).
        """
        content = self.check_message(content)
        personality, preferences = await self._context.profile(user_id, conversation)
        # Before anything is stored: refused at once when not even the message fits in the quota
        # (the common refusal); the prompt is reserved, exactly, once it is built (`_admit`).
        await self.enforce_quota(user_id, content)
        held = contextlib.AsyncExitStack()
        try:
            await held.enter_async_context(self._turns.hold(conversation.id))
            # Read again now that the turn is ours, in the transaction that stores the message: the
            # time of the message it follows is what the buffer must end with (see
            # ContextAssembler.history); the memory generation keys the recall.
            user_message, previous_at, generation, before = await self._conversations.add_turn_message(
                user_id, conversation.id, content, parent_id=parent_id
            )
        except BaseException:
            await held.aclose()
            raise
        try:
            newest = BufferedMessage(
                id=user_message.id, role="user", content=content, at=stamp(user_message.created_at)
            )
            # A message that follows nothing (the first, or an edit of the first) must not extend any
            # buffer: no buffered message is stamped NOTHING_BEFORE, so one that exists is rebuilt.
            after = stamp(previous_at) if previous_at is not None else NOTHING_BEFORE
            history = await _or_without(self._context.history(conversation.id, newest, after=after), [newest])
            if not isinstance(parent_id, AtHead):  # an edit: a new branch
                await _or_without(self._context.path_changed(conversation.id), None)
            summary = await _or_without(self._context.summary(conversation.id), None)
            memories = await _or_without(
                self._context.recall(user_id, preferences, content, generation=generation), []
            )
        except BaseException:
            await held.aclose()
            raise
        turn = self._turn(
            user_id,
            conversation,
            user_message,
            personality,
            preferences,
            history,
            summary,
            memories,
            held,
            max_tokens=max_tokens,
            temperature=temperature,
            learn=preferences.memory_enabled,
        )
        return await self._admit(turn, before, withdraw=user_message.id)

    async def regenerate(self, user_id: uuid.UUID, conversation: ConversationOut, message_id: int) -> Turn:
        """A turn that answers an existing user message again (`message_id`: it, or a reply to it):
        the new reply becomes an alternative to the earlier ones and the active one. Raises as
        `begin` does, and InvalidInput for a greeting."""
        personality, preferences = await self._context.profile(user_id, conversation)
        await self.enforce_quota(user_id)
        held = contextlib.AsyncExitStack()
        try:
            await held.enter_async_context(self._turns.hold(conversation.id))
            user_message, before = await self._conversations.rewind(user_id, conversation.id, message_id)
            history = await self._context.rebuild(conversation.id)
            summary = await self._context.summary(conversation.id)
            memories = await self._context.recall(user_id, preferences, user_message.content)
        except BaseException:
            await held.aclose()
            raise
        turn = self._turn(
            user_id, conversation, user_message, personality, preferences, history, summary, memories, held, learn=False
        )
        return await self._admit(turn, before, withdraw=None)

    async def switch(self, user_id: uuid.UUID, conversation: ConversationOut, message_id: int) -> int:
        """Make the branch through `message_id` the active one (between turns) and rebuild the
        buffer from it. Returns the new end of the active path."""
        async with self._turns.hold(conversation.id):
            head = await self._conversations.switch(user_id, conversation.id, message_id)
            await self._context.rebuild(conversation.id)
        return head

    async def open_conversation(
        self, user_id: uuid.UUID, personality: PersonalityOut, title: str | None = None
    ) -> ConversationOut:
        """A new conversation; a character card's greetings open it (`{{user}}` filled in)."""
        greetings: list[str] = []
        if personality.card is not None:
            preferences = await self._context.preferences(user_id)
            greetings = [fill_user(text, user_name(preferences)) for text in cards.greetings(personality.card.data)]
        return await self._conversations.create(user_id, personality.name, title, greetings=greetings)

    def _turn(
        self,
        user_id: uuid.UUID,
        conversation: ConversationOut,
        user_message: MessageOut,
        personality: PersonalityOut,
        preferences: Preferences,
        history: list[BufferedMessage],
        summary: str | None,
        memories: Sequence[Remembered | str],
        held: contextlib.AsyncExitStack,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        learn: bool,
    ) -> Turn:
        params = GenerationParams(
            max_tokens=min(max_tokens or self.limits.max_tokens, self.limits.max_tokens),
            temperature=self.limits.temperature if temperature is None else temperature,
            repeat_penalty=self.limits.repeat_penalty,
        )
        prompt = build_prompt(
            personality,
            preferences,
            history,
            token_budget=self.limits.context_tokens - params.max_tokens,
            summary=summary,
            memories=memories,
            memory_budget=self.limits.memory_tokens,
            now=user_message.created_at,
        )
        return Turn(user_id, conversation, user_message, prompt, params, held.aclose, len(history), learn=learn)

    async def enforce_quota(self, user_id: uuid.UUID, content: str | None = None) -> None:
        """RateLimited (429) when the user's token quota has no room left for a turn: for the message
        `content` at least, or (None) is used up. Reserves nothing; call before storing anything."""
        if self._quotas is not None and self._quotas.enabled:
            await self._quotas.enforce(user_id, estimate_tokens(content) if content is not None else 1)

    async def _admit(self, turn: Turn, before: ConversationState, *, withdraw: int | None) -> Turn:
        """Reserve the turn's prompt (counted now that it is built) and its max_tokens in the user's
        token quota: the prompt is charged as generation starts, the completion held until the reply
        settles. When the prompt does not fit (429), or the reservation is cancelled, the turn is
        undone: the message it stored (`withdraw`) is deleted, the conversation put back as it was
        (`before`) and released, so that a turn that raises has stored nothing."""
        prompt_tokens = sum(estimate_tokens(message.content) for message in turn.prompt)
        reserved = 0
        if self._quotas is not None and self._quotas.enabled:
            try:
                reserved = await self._quotas.admit(turn.user_id, prompt_tokens, turn.params.max_tokens)
            except (ServiceUnavailable, CacheUnavailable):
                # The counter could not be read (Redis down without a fallback, or the database gone
                # while rebuilding it): the message is stored, so the turn goes ahead, charged when it
                # settles, as it goes ahead without a context read that failed.
                logger.warning("could not reserve the token quota; the turn goes ahead", exc_info=True)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._conversations.withdraw(turn.conversation.id, before, withdraw)
                        # The buffer held the message, and an edit or a regenerate moved the
                        # summary to its path: both follow the restored path again.
                        await self._context.rebuild(turn.conversation.id)
                    except CompanionError:
                        logger.warning("could not withdraw a turn refused by its token quota", exc_info=True)
                    finally:
                        await turn.release()
                raise
        return dataclasses.replace(turn, prompt_tokens=prompt_tokens, reserved_tokens=reserved)

    async def _true_up(self, user_id: uuid.UUID, delta: int) -> None:
        if self._quotas is None or not delta:
            return
        try:
            await self._quotas.adjust(user_id, delta)
        except (CompanionError, CacheUnavailable):
            logger.warning("could not adjust the token quota by %d", delta, exc_info=True)

    async def run(self, turn: Turn, control: RunControl | None = None) -> AsyncGenerator[ChatEvent, None]:
        """Generate and persist the reply, yielding ReplyStarted (once its row exists), its tokens,
        then one DoneEvent or ErrorEvent (an ErrorEvent without a message id: it failed before any).

        If the consumer stops early or is cancelled, the partial reply is saved `incomplete`; if it
        is cancelled with `control.stop_requested`, it is saved `stopped` and ends with a DoneEvent
        (finish_reason `stopped`). The conversation is released before the final event, so the
        client may send at once.
        """
        reply = _Reply(last_flush=time.monotonic())
        settled = False
        failure: ErrorEvent | None = None
        try:
            try:
                stream = self._provider.stream(turn.prompt, turn.params)
                try:
                    async for chunk in stream:
                        if chunk.usage is not None:
                            reply.usage = chunk.usage
                        if chunk.finish_reason is not None:
                            reply.finish_reason = chunk.finish_reason
                        if not chunk.text:
                            continue
                        reply.parts.append(chunk.text)
                        if reply.message_id is None:
                            await self._save_progress(turn, reply)
                            assert reply.message_id is not None
                            yield ReplyStarted(reply.message_id)
                        else:
                            await self._save_progress(turn, reply)
                        yield TokenEvent(chunk.text)
                        if reply.taken_over:
                            break
                finally:
                    await stream.aclose()  # type: ignore[attr-defined]
                if reply.message_id is None:
                    # A model may legitimately say nothing; record that the turn was answered.
                    message = await self._conversations.add_message(
                        turn.conversation.id, "assistant", "", parent_id=turn.user_message.id
                    )
                    reply.message_id, reply.created_at = message.id, message.created_at
                    yield ReplyStarted(reply.message_id)
                await self._settle(turn, reply, "complete")
                settled = True
            except CompanionError as error:
                # Provider failure (502/504) or the database going away mid-reply (503).
                settled = await self._settle_quietly(turn, reply, "error")
                failure = ErrorEvent(error, reply.message_id, reply.text)
            except asyncio.CancelledError:
                if control is None or not control.stop_requested or reply.message_id is None:
                    raise
                # A stop request, not a hang-up: the reply ends here, as if the model had finished.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                reply.finish_reason = "stopped"
                with anyio.CancelScope(shield=True):
                    settled = await self._settle_quietly(turn, reply, "stopped")
            finally:
                if not settled:
                    # Cancelled or closed (the client left): keep what the user already saw,
                    # shielded from the cancellation that is tearing the response down.
                    with anyio.CancelScope(shield=True):
                        await self._settle_quietly(turn, reply, "incomplete")
        finally:
            with anyio.CancelScope(shield=True):
                await turn.release()
        self._context.after_turn(turn.conversation.id, turn.history_length + 1)
        if turn.learn:
            self._context.learn(
                turn.user_id,
                turn.conversation.id,
                turn.user_message.id,
                turn.user_message.content,
                turn.user_message.created_at,
            )
        if failure is not None:
            yield failure
            return
        usage = reply.usage or Usage(turn.prompt_tokens, len(reply.parts))
        assert reply.message_id is not None
        yield DoneEvent(reply.message_id, turn.user_message.id, reply.text, usage, reply.finish_reason)

    async def _save_progress(self, turn: Turn, reply: _Reply) -> None:
        if reply.message_id is None:
            message = await self._conversations.add_message(
                turn.conversation.id, "assistant", reply.text, status="streaming", parent_id=turn.user_message.id
            )
            reply.message_id, reply.created_at = message.id, message.created_at
            reply.saved_chars = len(reply.text)
            reply.last_flush = time.monotonic()
            reply.flusher = asyncio.create_task(self._flush_while_stalled(reply))
            return
        if time.monotonic() - reply.last_flush >= self.limits.flush_interval_seconds:
            await self._flush(reply)

    async def _flush(self, reply: _Reply) -> None:
        """Save the text generated so far as `streaming` (which renews the heartbeat), unless it is
        saved already or settled; with nothing new to save, beat once `heartbeat_seconds` passed."""
        async with reply.lock:
            if reply.closed or reply.message_id is None:
                return
            now = time.monotonic()
            if reply.saved_chars == len(reply.text):
                if now - reply.last_flush < self.limits.heartbeat_seconds:
                    return
                reply.last_flush = now
                reply.taken_over = not await self._conversations.heartbeat(reply.message_id)
                return
            text = reply.text
            reply.last_flush = now  # before the write: a failing write waits one interval
            updated = await self._conversations.update_message(
                reply.message_id, text, status="streaming", only_streaming=True
            )
            reply.saved_chars = len(text)
            reply.taken_over = not updated

    async def _flush_while_stalled(self, reply: _Reply) -> None:
        """Tokens are saved as they arrive, but a model can stall after a burst: save what the user
        has already seen once the flush interval has passed, whether or not another token comes."""
        interval = self.limits.flush_interval_seconds
        while not reply.closed:
            pending = reply.saved_chars < len(reply.text)
            delay = max(reply.last_flush + interval - time.monotonic(), 0.0) if pending else interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await reply.stopped.wait()
            try:
                await self._flush(reply)
            except Exception:
                logger.warning("could not save the progress of reply %s", reply.message_id, exc_info=True)

    async def _stop_flushing(self, reply: _Reply) -> None:
        """Stop the background flusher and wait for a write it has in flight, so that the final
        state is always the last write."""
        reply.closed = True
        reply.stopped.set()
        if reply.flusher is not None:
            await asyncio.wait({reply.flusher})

    async def _settle(self, turn: Turn, reply: _Reply, status: str) -> None:
        await self._stop_flushing(reply)
        if reply.message_id is None:
            # Nothing generated: only the prompt was spent (charged when generation started).
            await self._true_up(turn.user_id, turn.prompt_tokens - turn.reserved_tokens if turn.reserved_tokens else 0)
            return
        # Without the model's report (it failed, or the client left first), the estimated prompt and
        # one token per chunk: the prompt, most of a turn's tokens, is never left uncharged.
        usage = reply.usage or Usage(turn.prompt_tokens, len(reply.parts))
        kept = await self._conversations.update_message(
            reply.message_id,
            reply.text,
            status=status,  # type: ignore[arg-type]
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            only_streaming=True,  # one that another instance settled meanwhile stays as it settled it
        )
        assert reply.created_at is not None
        if kept:
            await self._context.remember(
                turn.conversation.id,
                BufferedMessage(id=reply.message_id, role="assistant", content=reply.text, at=stamp(reply.created_at)),
                after=stamp(turn.user_message.created_at),
            )
        if turn.reserved_tokens:
            # After the reply is saved: a counter rebuilt from the database from now on includes it.
            await self._true_up(turn.user_id, usage.total_tokens - turn.reserved_tokens)

    async def _settle_quietly(self, turn: Turn, reply: _Reply, status: str) -> bool:
        try:
            await self._settle(turn, reply, status)
        except CompanionError:
            logger.warning("could not save the final state of reply %s", reply.message_id, exc_info=True)
        return True


async def _or_without(read: Awaitable[T], fallback: T) -> T:
    """A context read once the user's message is stored: if the database went away meanwhile, the
    turn goes ahead without that part rather than leave the message unanswered."""
    try:
        return await read
    except ServiceUnavailable:
        logger.warning("answering without part of the context: the database is unavailable")
        return fallback
