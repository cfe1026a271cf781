"""Running summaries of long conversations, built in the background.

Messages that leave the short-term window are folded into the conversation's summary, which goes
into the prompt. Summaries are additive (DESIGN-NOTES #8): each run inserts a new row whose text is
the previous summary plus a summary of the newly departed messages; no summary and no message is
ever updated or deleted, so a bad summarisation can never wipe the context. A row is at most
`max_chars` (4,000) long: the run that would pass it writes a *base row* instead, the mark line "…"
and the newest whole lines that fit, and the rows after it extend it (see `fold`).

Two modes: `extractive` (deterministic: the first sentence of each message; the default for the
small local model, which summarises poorly) and `llm` (the provider writes the new part; falls back
to extractive if it fails or says nothing).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from companion.cache import keys
from companion.cache.codec import ModelCodec
from companion.cache.tiered import Cached, TieredCache
from companion.conversations import tree
from companion.errors import CompanionError
from companion.llm.base import ChatMessage, GenerationParams, LLMProvider, complete
from companion.storage.database import Database
from companion.storage.models import Conversation, ConversationSummary, Message
from companion.types import Clock, utcnow

logger = logging.getLogger(__name__)
SummaryMode = Literal["extractive", "llm"]
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


class Summary(BaseModel):
    model_config = ConfigDict(frozen=True)

    upto_message_id: int
    content: str


def first_sentence(text: str, limit: int) -> str:
    text = " ".join(text.split())
    match = _SENTENCE.match(text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def extractive(messages: list[Message]) -> str:
    lines = []
    for message in messages:
        who = "The user said" if message.role == "user" else "You replied"
        lines.append(f"{who}: {first_sentence(message.content, 160)}")
    return "\n".join(lines)


BASE_MARK = "…"  # the first line of a base row: older lines are in the rows before it


def fold(previous: str | None, addition: str, max_chars: int) -> str:
    """The next summary row: `previous` extended by `addition`, or, when that would pass
    `max_chars`, a base row that starts over with BASE_MARK and the newest whole lines that fit.
    No stored row is changed, so what a base row leaves out is still in the rows before it."""
    content = "\n".join(part for part in (previous or "", addition) if part)
    if len(content) <= max_chars:
        return content
    room = max_chars - len(BASE_MARK)
    kept: list[str] = []
    for line in reversed(content.split("\n")):
        if line == BASE_MARK or len(line) + 1 > room:
            break
        kept.append(line)
        room -= len(line) + 1
    if not kept:  # a single line longer than the whole budget: its end, cut
        return BASE_MARK + "\n" + content[-(max_chars - len(BASE_MARK) - 1) :]
    return "\n".join([BASE_MARK, *reversed(kept)])


def _newer_than_summary_query() -> Select[Any]:
    path = (
        tree.path_select(
            select(Conversation.head_id).where(Conversation.id == bindparam("conversation_id")).scalar_subquery(),
            down_to=bindparam("after"),
        )
    ).subquery("path")
    row = aliased(Message)

    def of_row(column: Any) -> Any:
        # Looked up by primary key, row by row: a join could scan the whole table when the planner
        # thinks it small (no statistics yet), and this runs after every turn.
        return select(column).where(row.id == path.c.id).scalar_subquery()

    return select(path.c.id, of_row(row.status), of_row(row.content != "")).order_by(path.c.id)


# The active path back to the newest summary's last message (that message included), ids and
# status only: what `summarize` reads after every turn. Built once: building it costs more than
# running it.
_NEWER_THAN_SUMMARY = _newer_than_summary_query()


async def _newer_than_summary(session: AsyncSession, conversation_id: uuid.UUID, after: int) -> list[Any]:
    """(id, status, has text) of the active path's messages back to message `after` (included when
    it is on the path), oldest first."""
    return list((await session.execute(_NEWER_THAN_SUMMARY, {"conversation_id": conversation_id, "after": after})).all())


async def _head(session: AsyncSession, conversation_id: uuid.UUID) -> int | None:
    return (
        await session.execute(select(Conversation.head_id).where(Conversation.id == conversation_id))
    ).scalar_one_or_none()


class Summarizer:
    def __init__(
        self,
        database: Database,
        cache: TieredCache,
        *,
        provider: LLMProvider | None = None,
        mode: SummaryMode = "extractive",
        window: int = 20,
        batch: int = 4,
        max_chars: int = 4000,
        clock: Clock = utcnow,
    ) -> None:
        self._db = database
        self._cache = cache
        self._cached = Cached(cache, ModelCodec(Summary), ttl=3600, local_ttl=60, miss_ttl=3600)
        self._provider = provider
        self.mode = mode
        self.window = window
        self.batch = batch
        self.max_chars = max_chars
        self._clock = clock
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}

    async def latest(self, conversation_id: uuid.UUID) -> Summary | None:
        """The newest summary (cached; invalidated when a new one is written)."""

        async def load() -> Summary | None:
            async with self._db.session() as session:
                row = (
                    await session.execute(
                        select(ConversationSummary)
                        .where(ConversationSummary.conversation_id == conversation_id)
                        .order_by(ConversationSummary.id.desc())
                        .limit(1)
                    )
                ).scalar_one_or_none()
            return Summary(upto_message_id=row.upto_message_id, content=row.content) if row else None

        return await self._cached.get(keys.conversation_summary(conversation_id), load)

    async def follow_path(self, conversation_id: uuid.UUID) -> None:
        """After the active path changed (a branch switch, an edit, a regenerate): make the newest
        summary the best one of the new path. A summary covers the path it was made on, up to its
        `upto_message_id`; unless the newest one already reaches as far along the new path as any,
        the one that does (or an empty one) is added again as the newest row, so that nothing is
        deleted and `latest` stays one indexed read."""
        async with self._db.session() as session:
            rows = list(
                (
                    await session.execute(
                        select(ConversationSummary)
                        .where(ConversationSummary.conversation_id == conversation_id)
                        .order_by(ConversationSummary.id.desc())
                    )
                ).scalars()
            )
            if not rows:
                return
            on_path = set(await tree.path_ids(session, await _head(session, conversation_id)))
            # Ids grow along a path: the summary reaching furthest along it covers the most.
            valid = max(
                (row for row in rows if row.upto_message_id in on_path),
                key=lambda row: (row.upto_message_id, row.id),
                default=None,
            )
            if valid is not None and rows[0].upto_message_id == valid.upto_message_id:
                return
            session.add(
                ConversationSummary(
                    conversation_id=conversation_id,
                    upto_message_id=valid.upto_message_id if valid else 0,
                    content=valid.content if valid else "",
                    created_at=self._clock(),
                )
            )
        await self._cache.invalidate(keys.conversation_summary(conversation_id))

    def schedule(self, conversation_id: uuid.UUID) -> None:
        """Fold departed messages into the summary in the background (one run per conversation)."""
        if conversation_id in self._running:
            return
        task = asyncio.create_task(self._run(conversation_id), name=f"summarize-{conversation_id}")
        self._running[conversation_id] = task
        task.add_done_callback(lambda _: self._running.pop(conversation_id, None))

    async def wait_idle(self) -> None:
        """Wait for background runs (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _run(self, conversation_id: uuid.UUID) -> None:
        try:
            await self.summarize(conversation_id)
        except CompanionError:
            logger.warning("summary of conversation %s postponed", conversation_id, exc_info=True)
        except Exception:
            logger.exception("summary of conversation %s failed", conversation_id)

    async def summarize(self, conversation_id: uuid.UUID) -> Summary | None:
        """Add a summary row if at least `batch` messages of the active path have left the window
        since the last summary on that path.

        Runs after every turn, so it reads only the part of the path newer than the last summary
        (about `window + batch` messages, ids and status only): the cost of a turn must not grow with
        the length of the conversation. Message texts are read only when a summary is due."""
        previous = await self.latest(conversation_id)
        after = previous.upto_message_id if previous else 0
        async with self._db.session() as session:
            walked = await _newer_than_summary(session, conversation_id, after)
        if after and (not walked or walked[0].id != after):
            # The summary's last message is not on the active path: it was written for another
            # branch while the path changed under a running summary. Repair.
            await self.follow_path(conversation_id)
            return None
        # Newer than the summary, settled (a reply still streaming is not summarised yet).
        settled = [(message_id, said) for message_id, status, said in walked if message_id > after and status != "streaming"]
        if len(settled) < self.window:
            return None  # what left the window is already in the summary
        oldest_kept = settled[-self.window][0]
        wanted = [message_id for message_id, said in settled if message_id < oldest_kept and said]
        if len(wanted) < self.batch:
            return None
        async with self._db.session() as session:
            departed = list(
                (await session.execute(select(Message).where(Message.id.in_(wanted)).order_by(Message.id))).scalars()
            )
        if len(departed) < self.batch:
            return None  # deleted meanwhile
        addition = await self._describe(departed)
        content = fold(previous.content if previous else None, addition, self.max_chars)
        upto = departed[-1].id
        async with self._db.session() as session:
            session.add(
                ConversationSummary(
                    conversation_id=conversation_id, upto_message_id=upto, content=content, created_at=self._clock()
                )
            )
        await self._cache.invalidate(keys.conversation_summary(conversation_id))
        return Summary(upto_message_id=upto, content=content)

    async def _describe(self, messages: list[Message]) -> str:
        if self.mode != "llm" or self._provider is None:
            return extractive(messages)
        transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
        prompt = [
            ChatMessage(
                "system",
                "Summarize the conversation excerpt in at most three short sentences. Keep facts about the "
                "user (names, people, places, plans, likes). Write nothing else.",
            ),
            ChatMessage("user", transcript[-6000:]),
        ]
        try:
            text = await complete(self._provider, prompt, GenerationParams(max_tokens=120, temperature=0.2))
        except CompanionError:
            logger.warning("LLM summary failed; using the extractive one")
            return extractive(messages)
        return text.strip() or extractive(messages)
