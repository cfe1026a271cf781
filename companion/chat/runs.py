"""Reply runs: a chat turn generated on a task of its own, apart from the request that asked for it.

A run consumes `ChatService.run(turn)` to the end whoever listens: a client that leaves does not stop
it. Its events go at once to this instance's run log (`MemoryRunLog`), which the asking request and
any resume on this instance follow, and, with Redis, in batches every flush interval to the reply's
Redis Stream (`RedisRunLog`), which any instance can follow; the same round trip reads whether a stop
was asked for. A resume is served from the first source that has the reply: this instance's log, the
Redis Stream, else the database's row (polled while it streams), so it always ends with the reply's
final state. A sweeper on every instance settles the replies whose run died (no heartbeat in the
row for `stale_seconds`) as `incomplete`, and ends their Redis Stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from companion.cache.backend import CacheUnavailable
from companion.chat.service import (
    ChatService,
    DoneEvent,
    ErrorEvent,
    ReplyStarted,
    RunControl,
    TokenEvent,
    Turn,
)
from companion.conversations.schemas import MessageOut
from companion.conversations.service import ConversationService
from companion.errors import CompanionError, Conflict, error_body
from companion.runs.events import RunEvent
from companion.runs.log import RunLog, RunLogMissing, RunLogStalled
from companion.runs.memory import MemoryRunLog
from companion.types import Clock, utcnow

logger = logging.getLogger(__name__)

INTERRUPTED = "reply_interrupted"
SWEEPER_TASK = "reply-sweeper"  # its name: tests that count a turn's queries leave the sweeps out
GIVE_UP_SECONDS = 30.0  # how long an ended run keeps trying to write its last events to Redis


def done_data(event: DoneEvent) -> dict[str, Any]:
    return {
        "message_id": event.message_id,
        "user_message_id": event.user_message_id,
        "content": event.content,
        "finish_reason": event.finish_reason,
        "usage": event.usage.as_dict(),
    }


def interrupted_event(message_id: int, content: str) -> RunEvent:
    """The end of a reply whose run died. It carries the text kept (`content`): a client that was
    streaming from the dead server may have received a little more (up to one flush interval) than
    was saved before it died, and should show this instead."""
    body = error_body(
        "The reply was interrupted before it finished (its server stopped); the text so far is kept.",
        "server_error",
        INTERRUPTED,
    )
    return RunEvent("error", len(content), data={**body, "message_id": message_id, "content": content})


def final_event(message: MessageOut, user_message_id: int | None) -> RunEvent:
    """The terminal event of a settled reply, rebuilt from its row."""
    offset = len(message.content)
    if message.status in ("complete", "stopped"):
        prompt, completion = message.prompt_tokens or 0, message.completion_tokens or 0
        return RunEvent(
            "done",
            offset,
            data={
                "message_id": message.id,
                "user_message_id": user_message_id,
                "content": message.content,
                "finish_reason": "stopped" if message.status == "stopped" else "stop",
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )
    if message.status == "error":
        body = error_body("The model failed while generating this reply.", "upstream_error", "llm_provider_error")
        return RunEvent("error", offset, data={**body, "message_id": message.id})
    return interrupted_event(message.id, message.content)


@dataclass
class Run:
    """One reply being generated on this instance."""

    turn: Turn
    control: RunControl = field(default_factory=RunControl)
    message_id: int | None = None
    # Resolved once the reply's row exists (None) or the turn failed before it (its ErrorEvent).
    started: asyncio.Future[ErrorEvent | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: DoneEvent | ErrorEvent | None = None
    pending: list[RunEvent] = field(default_factory=list)  # not yet in the shared log
    flush_now: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    writer: asyncio.Task[None] | None = None


class ReplyRuns:
    def __init__(
        self,
        chat: ChatService,
        conversations: ConversationService,
        *,
        local: MemoryRunLog | None = None,
        shared: RunLog | None = None,
        flush_seconds: float = 0.25,
        heartbeat_seconds: float = 2.0,
        stale_seconds: float = 10.0,
        clock: Clock = utcnow,
    ) -> None:
        self._chat = chat
        self._conversations = conversations
        self.local = local or MemoryRunLog()
        self.shared = shared
        self.flush_seconds = flush_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self._clock = clock
        self._runs: dict[int, Run] = {}  # by reply id, while generating
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # --- running ---------------------------------------------------------------------------------

    async def start(self, turn: Turn) -> Run:
        """Run the turn on its own task; return once its reply has a row (`run.message_id`) or the
        turn failed before that (`run.started.result()` is then its ErrorEvent)."""
        run = Run(turn)
        run.task = self._spawn(self._pump(run))
        await asyncio.shield(run.started)
        return run

    def running(self, message_id: int) -> bool:
        return message_id in self._runs

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pump(self, run: Run) -> None:
        offset = 0
        text: list[str] = []
        try:
            async with contextlib.aclosing(self._chat.run(run.turn, run.control)) as events:
                async for event in events:
                    if isinstance(event, ReplyStarted):
                        run.message_id = event.message_id
                        self._runs[event.message_id] = run
                        data = {
                            "message_id": event.message_id,
                            "user_message_id": run.turn.user_message.id,
                            "conversation_id": str(run.turn.conversation.id),
                        }
                        self._emit(run, RunEvent("message", 0, data=data))
                        if self.shared is not None:
                            run.writer = self._spawn(self._write_shared(run, event.message_id))
                        run.started.set_result(None)
                    elif isinstance(event, TokenEvent):
                        self._emit(run, RunEvent("token", offset, event.text))
                        offset += len(event.text)
                        text.append(event.text)
                    elif isinstance(event, DoneEvent):
                        run.outcome = event
                        self._emit(run, RunEvent("done", offset, data=done_data(event)))
                    elif isinstance(event, ErrorEvent):
                        run.outcome = event
                        if run.message_id is None:
                            break  # failed before the reply existed: the request answers with the error
                        body = {**event.error.to_body(), "message_id": run.message_id}
                        self._emit(run, RunEvent("error", offset, data=body))
        except BaseException as error:
            if run.message_id is not None and run.outcome is None:
                # Cancelled (shutdown, or an OpenAI-compatible client left) or a bug: the turn has
                # settled its row `incomplete`; followers must end too.
                self._emit(run, interrupted_event(run.message_id, "".join(text)))
            if not run.started.done():
                run.started.set_exception(error if isinstance(error, Exception) else CompanionError("cancelled"))
                run.started.exception()  # retrieved: the asking request may be gone
            if not isinstance(error, Exception):
                raise
            logger.exception("reply run failed")
        finally:
            if not run.started.done():
                assert isinstance(run.outcome, ErrorEvent) or run.outcome is None
                run.started.set_result(run.outcome if isinstance(run.outcome, ErrorEvent) else None)
            if run.message_id is not None:
                self._runs.pop(run.message_id, None)
            run.ended.set()

    def _emit(self, run: Run, event: RunEvent) -> None:
        assert run.message_id is not None
        self.local.append(run.message_id, [event])
        if self.shared is not None:
            run.pending.append(event)
            if event.terminal:
                run.flush_now.set()  # the end goes out at once (if the stream was begun)

    async def _write_shared(self, run: Run, message_id: int) -> None:
        """Write the run's events to the shared log in batches, one round trip per flush interval,
        which also tells whether another instance asked for a stop.

        The first batch goes out one flush interval after the reply started, not at once: a reply
        that ends before then (most replies of a fast model) never writes its stream at all. Its row
        is settled by then, and a resume on another instance that finds no stream reads the row,
        which is polled while it streams, so nothing is lost by waiting; a turn saves two round
        trips and a dozen Redis commands. A reply that ended otherwise (an error, a stop, a cut)
        still writes its stream, in case its row could not be saved. Once the stream is begun, the
        end goes out at once."""
        assert self.shared is not None
        failing_since: float | None = None
        begun = False
        while True:
            if begun:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_seconds):
                        await run.flush_now.wait()
            else:
                await asyncio.sleep(self.flush_seconds)
                if run.ended.is_set() and isinstance(run.outcome, DoneEvent):
                    return  # ended and settled within the first interval: its row has it all
            run.flush_now.clear()
            batch, run.pending = run.pending, []
            try:
                stop = await self.shared.write(message_id, batch)
            except CacheUnavailable:
                run.pending[:0] = batch  # kept for the next round; meanwhile resumes read the database
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    logger.warning("reply %s: events not written to Redis (unreachable); retrying", message_id)
                if run.ended.is_set() and now - failing_since > GIVE_UP_SECONDS:
                    return  # the row is settled: a resume reads it from the database
                continue
            failing_since = None
            begun = True
            if stop and not run.ended.is_set():
                self._stop_here(run)
            if any(event.terminal for event in batch):
                return

    def _stop_here(self, run: Run) -> None:
        if run.task is not None and not run.ended.is_set() and not run.control.stop_requested:
            run.control.stop_requested = True
            run.task.cancel()

    def abandon(self, run: Run) -> None:
        """End a run whose client went away and which must not go on (the OpenAI-compatible route):
        its reply is kept `incomplete`. Does not wait (it is called while a response is torn down)."""
        if run.task is not None and not run.ended.is_set() and not run.control.stop_requested:
            run.task.cancel()

    # --- stop ------------------------------------------------------------------------------------

    async def stop(
        self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int, *, wait: float = 5.0
    ) -> MessageOut:
        """Stop a reply wherever it runs and return its row once settled (waiting at most `wait`
        seconds; then as it is). Raises NotFound (not the user's reply) and Conflict (409
        `reply_elsewhere`) when another instance runs it and Redis, which would reach it, is off or
        unreachable."""
        message = await self._conversations.get_reply(user_id, conversation_id, message_id)
        if message.status != "streaming":
            return message
        run = self._runs.get(message_id)
        if run is not None:
            self._stop_here(run)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await run.ended.wait()
            return await self._conversations.get_reply(user_id, conversation_id, message_id)
        if self.shared is None:
            raise Conflict(
                "This reply is being generated by another server, which this one cannot reach without Redis.",
                code="reply_elsewhere",
            )
        try:
            await self.shared.request_stop(message_id)
        except CacheUnavailable:
            raise Conflict(
                "This reply is being generated by another server, and Redis is unreachable right now; try again.",
                code="reply_elsewhere",
            ) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            message = await self._conversations.get_reply(user_id, conversation_id, message_id)
            if message.status != "streaming":
                break
        return message

    # --- resume ----------------------------------------------------------------------------------

    async def resume(self, user_id: uuid.UUID, conversation_id: uuid.UUID, message_id: int) -> MessageOut:
        """Check that the reply is the user's (NotFound otherwise) before streaming it."""
        return await self._conversations.get_reply(user_id, conversation_id, message_id)

    async def follow(self, message: MessageOut, offset: int) -> AsyncIterator[RunEvent]:
        """The reply's events after `offset`, to its terminal event, from the best source.

        A terminal event that carries the reply's final text is preceded by whatever of that text
        the client still lacks: a dead run's Redis Stream can stop short of the text it last saved
        to the database (the two are written on their own schedules), and the sweeper that settles
        it knows only the saved text. Without this, a client resuming from the stream would get
        the terminal event a few words short of the stored reply."""
        async for event in self._follow_sources(message, offset):
            if event.terminal:
                content = (event.data or {}).get("content")
                start = max(offset, 0)  # -1: a client that has nothing yet (not a slice from the end)
                if isinstance(content, str) and len(content) > start:
                    yield RunEvent("token", start, content[start:])
                yield event
                return
            offset = max(offset, event.end)
            yield event

    async def _follow_sources(self, message: MessageOut, offset: int) -> AsyncIterator[RunEvent]:
        stall = max(self.heartbeat_seconds, self.flush_seconds * 4)
        while True:
            try:
                if message.id in self.local:
                    source = self.local.follow(message.id, offset, stall_seconds=3600)
                elif self.shared is not None:
                    source = self.shared.follow(message.id, offset, stall_seconds=stall)
                else:
                    raise RunLogMissing(message.id)
                async for event in source:
                    offset = max(offset, event.end)
                    yield event
                return
            except RunLogMissing:
                pass
            except RunLogStalled:
                # Nothing new for a while: still generating (a slow model), or its run died.
                current = await self._conversations.message(message.id)
                if current is not None and current.status == "streaming":
                    continue
            except CacheUnavailable:
                logger.warning("resuming reply %s from the database: Redis unreachable", message.id)
            async for event in self._follow_database(message, offset):
                yield event
            return

    async def _follow_database(self, message: MessageOut, offset: int) -> AsyncIterator[RunEvent]:
        """The reply's row, polled every flush interval while it streams: its text only grows."""
        user_message_id = await self._conversations.user_message_before(message.conversation_id, message.id)
        if offset < 0:
            data = {
                "message_id": message.id,
                "user_message_id": user_message_id,
                "conversation_id": str(message.conversation_id),
            }
            yield RunEvent("message", 0, data=data)
            offset = 0
        current: MessageOut | None = message
        while True:
            if current is None:  # deleted with its conversation meanwhile
                yield interrupted_event(message.id, "")
                return
            if len(current.content) > offset:
                yield RunEvent("token", offset, current.content[offset:])
                offset = len(current.content)
            if current.status != "streaming":
                yield final_event(current, user_message_id)
                return
            await asyncio.sleep(self.flush_seconds)
            current = await self._conversations.message(message.id)

    # --- never stuck -----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Settle the replies whose run died (no heartbeat for `stale_seconds`): `incomplete`, text
        kept, their shared log ended. Returns how many."""
        cutoff = self._clock() - timedelta(seconds=self.stale_seconds)
        settled = await self._conversations.settle_stale(cutoff, skip=set(self._runs))
        for message in settled:
            logger.warning("reply %s lost its server; settled as incomplete", message.id)
            if self.shared is not None:
                try:
                    await self.shared.write(message.id, [interrupted_event(message.id, message.content)])
                except CacheUnavailable:
                    pass  # a resume then finds the stream stalled and reads the settled row
        return len(settled)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.sweep()
            except CompanionError as error:
                logger.warning("could not look for replies that lost their server: %s", error.message)
            except Exception:
                logger.exception("the sweep for replies that lost their server failed")

    async def open(self) -> None:
        """Settle what died before this start, then keep sweeping."""
        await self.sweep()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name=SWEEPER_TASK)

    async def aclose(self) -> None:
        """Stop sweeping; end the runs of this instance (their replies are kept `incomplete`) and
        let their last events reach the shared log."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for run in list(self._runs.values()):
            if run.task is not None:
                run.task.cancel()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
