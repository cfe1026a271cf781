"""Token usage through the routes, on SQLite and PostgreSQL: each reply's usage is stored and
listed with its message, and GET /v1/usage adds it up per day and month against the quotas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from companion.llm.scripted import ScriptedProvider
from tests.conftest import make_settings
from tests.support.api import all_messages, assert_error, chat, create_conversation, running_server, user_client


class SteppingClock:
    """An injected clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


async def test_usage_per_day_and_month_against_the_quotas(database_url: str, tmp_path: Path):
    clock = SteppingClock(datetime(2026, 10, 31, 12, 0, tzinfo=UTC))
    settings = make_settings(database_url, tmp_path, token_quota_daily=100_000, token_quota_monthly=1_000_000)
    async with running_server(settings, ScriptedProvider(), clock=clock) as server:
        async with user_client(server, "ana") as client:
            conversation = await create_conversation(client)
            first = await chat(client, conversation["id"], "One two three.")
            clock.now += timedelta(days=1)  # November 1st: a new day and a new month
            second = await chat(client, conversation["id"], "Four five.")
            third = await chat(client, conversation["id"], "Six.")

            replies = [m for m in await all_messages(client, conversation["id"]) if m["role"] == "assistant"]
            assert [(m["prompt_tokens"], m["completion_tokens"]) for m in replies] == [
                (d["usage"]["prompt_tokens"], d["usage"]["completion_tokens"]) for d in (first, second, third)
            ]

            response = await client.get("/v1/usage", params={"days": 3, "months": 2})
            assert response.status_code == 200, response.text
            report = response.json()
            today = second["usage"]["total_tokens"] + third["usage"]["total_tokens"]
            assert [(d["period"], d["total_tokens"], d["replies"]) for d in report["days"]] == [
                ("2026-10-30", 0, 0),
                ("2026-10-31", first["usage"]["total_tokens"], 1),
                ("2026-11-01", today, 2),
            ]
            assert [(m["period"], m["total_tokens"]) for m in report["months"]] == [
                ("2026-10", first["usage"]["total_tokens"]),
                ("2026-11", today),
            ]
            day = report["days"][-1]
            assert day["prompt_tokens"] + day["completion_tokens"] == day["total_tokens"]
            quotas = {q["window"]: q for q in report["quotas"]}
            assert quotas["daily"]["used"] == today and quotas["daily"]["quota"] == 100_000
            assert quotas["daily"]["remaining"] == 100_000 - today
            assert quotas["daily"]["resets_at"].startswith("2026-11-02T00:00:00")
            assert quotas["monthly"]["used"] == today and quotas["monthly"]["resets_at"].startswith("2026-12-01")
            assert report["context_tokens"] == settings.llm_context_size

            # Another user's usage is their own.
            async with user_client(server, "bob") as other:
                theirs = (await other.get("/v1/usage")).json()
                assert all(d["total_tokens"] == 0 for d in theirs["days"])


async def test_usage_without_quotas_and_bad_parameters(client: httpx.AsyncClient):
    conversation = await create_conversation(client)
    done = await chat(client, conversation["id"], "Hello there.")
    report = (await client.get("/v1/usage")).json()
    assert report["quotas"] == []
    assert len(report["days"]) == 30 and len(report["months"]) == 12
    assert report["days"][-1]["total_tokens"] == done["usage"]["total_tokens"]
    assert_error(await client.get("/v1/usage", params={"days": 0}), 422)
    assert_error(await client.get("/v1/usage", params={"months": 1000}), 422)
