"""Deleting means gone (issue 15, item 10): a deleted conversation's buffer and summary leave Redis
and every L1 at once; "forget everything" cannot be undone by an extraction for an earlier message;
errors (and so their logs) do not carry SQL parameters, i.e. what users wrote, unless debug logging
is on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from companion.cache import keys
from companion.cache.local import MISSING
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from companion.storage.database import Database
from tests.conftest import make_settings
from tests.support.api import chat, create_conversation, running_server
from tests.support.redis_proc import running_redis


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-process"])
async def test_deleting_a_conversation_drops_its_buffer_and_summary_at_once(
    redis: bool, database_url: str, tmp_path: Path
) -> None:
    async with running_redis(tmp_path / "redis") as server:
        settings = make_settings(
            database_url,
            tmp_path,
            redis_enabled=redis,
            redis_url=server.url,
            short_term_memory_size=2,
            summary_batch=1,
            summary_mode="extractive",
        )
        async with running_server(settings, ScriptedProvider()) as live:
            services: Services = live.app.state.services
            key = (await services.users.create("alice")).api_key
            async with httpx.AsyncClient(base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}) as http:
                conversation = await create_conversation(http)
                for content in ("one", "two", "three", "four"):
                    await chat(http, conversation["id"], content)
                await services.summarizer.wait_idle()
                cid = uuid.UUID(conversation["id"])
                assert await services.summarizer.latest(cid) is not None  # cached now, in L1 and the backend
                assert await services.buffer.recent(cid, 2) is not None
                summary_key = keys.conversation_summary(cid)
                assert await services.cache.backend.get(summary_key) is not None

                assert (await http.delete(f"/v1/conversations/{cid}")).status_code == 204
                assert await services.buffer.recent(cid, 2) is None
                assert await services.cache.backend.get(summary_key) is None
                assert await services.cache.backend.get(keys.conversation_buffer(cid)) is None
                assert services.cache.local.get(summary_key) is MISSING


async def test_forget_everything_is_not_undone_by_an_extraction_for_an_earlier_message(services: Services) -> None:
    user = await services.users.create("alice")
    conversation = await services.conversations.create(user.id, "elara")
    said = await services.conversations.add_message(conversation.id, "user", "My name is Ada and I live in Lisbon.")

    # Already running when the user forgets everything.
    services.memories.schedule_extraction(user.id, conversation.id, said.id, said.content, said_at=said.created_at)
    await services.memories.delete_all(user.id)
    await services.memories.wait_idle()
    assert await services.memories.list(user.id) == []

    # Scheduled afterwards (the reply to that message settled later) for the message said before.
    services.memories.schedule_extraction(user.id, conversation.id, said.id, said.content, said_at=said.created_at)
    await services.memories.wait_idle()
    assert await services.memories.list(user.id) == []

    # What is said afterwards is remembered as usual.
    later = await services.conversations.add_message(conversation.id, "user", "My name is Ada.")
    services.memories.schedule_extraction(user.id, conversation.id, later.id, later.content, said_at=services.clock())
    await services.memories.wait_idle()
    assert await services.memories.list(user.id) != []


@pytest.mark.parametrize("hidden", [True, False])
async def test_database_errors_carry_no_user_text_unless_debugging(hidden: bool, database_url: str) -> None:
    database = Database(database_url, hide_parameters=hidden)
    secret = "what-the-user-wrote-" + uuid.uuid4().hex
    user_id = uuid.uuid4()
    statement = text("INSERT INTO users (id, name, created_at, memory_generation) VALUES (:id, :name, :at, 0)")
    at = "2026-01-01 00:00:00" if database.dialect == "sqlite" else datetime(2026, 1, 1, tzinfo=UTC)
    values = {"id": user_id.hex if database.dialect == "sqlite" else user_id, "name": secret, "at": at}
    try:
        async with database.engine.begin() as connection:
            await connection.execute(statement, values)
            with pytest.raises(Exception) as caught:
                await connection.execute(statement, values)  # the same primary key again
        assert (secret in str(caught.value)) is (not hidden)
    finally:
        await database.dispose()


def test_the_app_hides_parameters_unless_log_level_is_debug(tmp_path: Path) -> None:
    for level, hidden in (("INFO", True), ("DEBUG", False)):
        settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path, log_level=level)
        services = Services.build(settings, provider=ScriptedProvider())
        assert services.database.engine.sync_engine.hide_parameters is hidden
