"""The summarizer runs after every turn, so what it reads must not grow with the conversation: it
walks the active path only back to the newest summary's last message (about SHORT_TERM_MEMORY_SIZE +
SUMMARY_BATCH messages), and reads message texts only when a summary is due. On SQLite and
PostgreSQL, a 300-message conversation."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from companion.chat import summary as summary_module
from companion.config import Settings
from companion.services import Services
from tests.conftest import make_settings

WINDOW = 4
BATCH = 2
MESSAGES = 300


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, short_term_memory_size=WINDOW, summary_batch=BATCH)


async def add_pair(services: Services, user_id: uuid.UUID, conversation_id: uuid.UUID, turn: int) -> None:
    conversations = services.conversations
    await conversations.add_message(conversation_id, "user", f"Turn {turn} is here.")
    await conversations.add_message(conversation_id, "assistant", f"Reply {turn} is here.")


async def test_a_summary_check_reads_only_the_path_newer_than_the_last_summary(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[int] = []
    original = summary_module._newer_than_summary

    async def counting(*args: Any) -> list[Any]:
        rows = await original(*args)
        walked.append(len(rows))
        return rows

    monkeypatch.setattr(summary_module, "_newer_than_summary", counting)
    user = await services.users.create("long-talker")
    conversation = await services.conversations.create(user.id, "elara")
    for turn in range(MESSAGES // 2):
        await add_pair(services, user.id, conversation.id, turn)
    summarizer = services.summarizer
    # Catch up: the first check reads the whole path (there is no summary yet), each later one from
    # the newest summary on; every check that writes a summary moves it forward by at least BATCH.
    made = 0
    while await summarizer.summarize(conversation.id) is not None:
        made += 1
    assert made >= 1
    assert walked[0] == MESSAGES
    latest = await summarizer.latest(conversation.id)
    assert latest is not None
    # Caught up: the messages after the summary are the window and fewer than BATCH more.
    assert walked[-1] < WINDOW + BATCH + 1

    walked.clear()
    await add_pair(services, user.id, conversation.id, 1000)  # two more messages leave the window
    written = await summarizer.summarize(conversation.id)
    assert written is not None and written.upto_message_id > latest.upto_message_id
    assert "Turn 1000" not in written.content  # still in the window
    assert walked and max(walked) <= WINDOW + BATCH + 3, walked
    assert await summarizer.summarize(conversation.id) is None  # nothing more to fold in


async def test_walking_a_path_looks_up_one_message_per_step_and_never_scans_the_table(services: Services) -> None:
    """Before any statistics exist (a new or small table), a join in the recursive step let
    PostgreSQL hash the whole messages table at every step of the walk: the table's size times the
    path's length, after every turn. Each step must be a primary-key lookup, on both databases."""
    from sqlalchemy import select, text

    from companion.conversations import tree
    from companion.storage.models import Conversation

    user = await services.users.create("walker")
    conversation = await services.conversations.create(user.id, "elara")
    for turn in range(100):
        await add_pair(services, user.id, conversation.id, turn)
    async with services.database.session() as session:
        head_id = (
            await session.execute(select(Conversation.head_id).where(Conversation.id == conversation.id))
        ).scalar_one()
        query = tree.path_select(head_id, down_to=0)
        compiled = query.compile(dialect=services.database.engine.dialect, compile_kwargs={"literal_binds": True})
        if services.database.dialect == "sqlite":
            plan = "\n".join(str(row[-1]) for row in (await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all())
            assert "SEARCH" in plan and "SCAN messages" not in plan, plan
        else:
            plan = "\n".join(row[0] for row in (await session.execute(text(f"EXPLAIN {compiled}"))).all())
            assert "Index Scan using messages_pkey" in plan and "Seq Scan on messages" not in plan, plan
        ids = await tree.path_ids(session, head_id)
    assert len(ids) == 200 and ids == sorted(ids)
