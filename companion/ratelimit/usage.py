"""A user's token usage over time: every reply stores its prompt and completion tokens; this adds
them up per UTC day and month, and sets them beside the user's quotas (see quotas.py)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from pydantic import BaseModel, Field
from sqlalchemy import select

from companion.ratelimit.quotas import TokenQuotas
from companion.storage.database import Database
from companion.storage.models import Conversation, Message
from companion.types import Clock, utcnow


class UsageTotal(BaseModel):
    period: str = Field(description="The UTC day (YYYY-MM-DD) or month (YYYY-MM).")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    replies: int


class QuotaOut(BaseModel):
    window: str = Field(description="daily | monthly")
    quota: int
    used: int
    remaining: int
    resets_at: datetime


class UsageReport(BaseModel):
    days: list[UsageTotal] = Field(description="The last `days` UTC days, oldest first (days without use too).")
    months: list[UsageTotal] = Field(description="The last `months` UTC months, oldest first.")
    quotas: list[QuotaOut] = Field(description="Each token quota that is set (none: unlimited).")
    context_tokens: int = Field(description="The model's context window, to compare a reply's prompt_tokens with.")


def _month_start(moment: datetime, months_back: int) -> datetime:
    year, month = moment.year, moment.month - months_back
    while month <= 0:
        year, month = year - 1, month + 12
    return moment.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)


class UsageService:
    def __init__(self, database: Database, quotas: TokenQuotas, *, context_tokens: int, clock: Clock = utcnow) -> None:
        self._db = database
        self._quotas = quotas
        self._context_tokens = context_tokens
        self._clock = clock

    async def report(self, user_id: uuid.UUID, *, days: int = 30, months: int = 12) -> UsageReport:
        now = self._clock()
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        first_day = today - timedelta(days=days - 1)
        first_month = _month_start(now, months - 1)
        since = min(first_day, first_month)
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Message.created_at, Message.prompt_tokens, Message.completion_tokens)
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(
                        Conversation.user_id == user_id,
                        Message.role == "assistant",
                        Message.created_at >= since,
                        Message.prompt_tokens.is_not(None),
                    )
                )
            ).all()
        per_day: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        per_month: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for created_at, prompt, completion in rows:
            for bucket in (per_day[f"{created_at:%Y-%m-%d}"], per_month[f"{created_at:%Y-%m}"]):
                bucket[0] += prompt or 0
                bucket[1] += completion or 0
                bucket[2] += 1

        def total(period: str, sums: list[int]) -> UsageTotal:
            return UsageTotal(
                period=period,
                prompt_tokens=sums[0],
                completion_tokens=sums[1],
                total_tokens=sums[0] + sums[1],
                replies=sums[2],
            )

        day_labels = [f"{first_day + timedelta(days=n):%Y-%m-%d}" for n in range(days)]
        month_labels = [f"{_month_start(now, n):%Y-%m}" for n in range(months - 1, -1, -1)]
        quotas = [
            QuotaOut(
                window=state.window.name,
                quota=state.window.quota,
                used=state.used,
                remaining=state.remaining,
                resets_at=state.window.end,
            )
            for state in (await self._quotas.usage(user_id) if self._quotas.enabled else [])
        ]
        return UsageReport(
            days=[total(label, per_day.get(label, [0, 0, 0])) for label in day_labels],
            months=[total(label, per_month.get(label, [0, 0, 0])) for label in month_labels],
            quotas=quotas,
            context_tokens=self._context_tokens,
        )
