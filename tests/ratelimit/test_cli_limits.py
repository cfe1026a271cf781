"""`companion limits show USER_ID` and `companion limits reset USER_ID`, in-process through Typer's
CliRunner with settings from the environment: with the limits in the private Redis (what the
command sees and resets is what every instance uses), and with Redis disabled (each server keeps
its own limits in memory, which the command says instead of printing made-up numbers)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from companion.cache import keys
from companion.cli.main import app
from companion.config import load_settings
from companion.llm.scripted import ScriptedProvider
from companion.ratelimit.quotas import windows
from companion.services import Services
from companion.types import utcnow
from tests.support.redis_proc import RedisProcess

runner = CliRunner()
CHAT_ROUTE = "POST /v1/chat/completions"
PROMPT_TOKENS, COMPLETION_TOKENS = 10, 5


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str) -> Any:
    """Settings for in-process commands, from the environment; run from tmp_path (no stray .env)."""
    monkeypatch.chdir(tmp_path)

    def apply(**extra: str) -> None:
        values = {
            "DATABASE_URL": sqlite_url,
            "DATA_DIR": str(tmp_path),
            "LLM_PROVIDER": "scripted",
            "ENVIRONMENT": "test",
            "AUTO_MIGRATE": "true",
            "REDIS_ENABLED": "false",
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "30",
            "RATE_LIMIT_ROUTE_OVERRIDES": json.dumps({CHAT_ROUTE: 5}),
            "TOKEN_QUOTA_DAILY": "100",
            "TOKEN_QUOTA_MONTHLY": "1000",
            **extra,
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return apply


async def _seed(spend: bool) -> uuid.UUID:
    """A user with one stored reply of 15 tokens; with `spend`, two general requests and one chat
    completion counted against their limits (as a running instance would)."""
    services = Services.build(load_settings(), provider=ScriptedProvider())
    await services.start(load_model=False)
    try:
        user_id = (await services.users.create("carol")).id
        conversation = await services.conversations.create(user_id, "elara")
        await services.conversations.add_message(conversation.id, "user", "hello")
        reply = await services.conversations.add_message(conversation.id, "assistant", "hi")
        await services.conversations.update_message(
            reply.id, "hi", status="complete", prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS
        )
        await services.quotas.charge(user_id, PROMPT_TOKENS + COMPLETION_TOKENS)
        if spend:
            for route in ("GET /v1/preferences", "GET /v1/personalities", CHAT_ROUTE):
                await services.rate_limits.check_user(str(user_id), route)
        return user_id
    finally:
        await services.aclose()


def seed(spend: bool = False) -> uuid.UUID:
    return asyncio.run(_seed(spend))


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["limits", *args])


def rows(output: str) -> dict[str, list[str]]:
    """Table rows by their first cell (cells are separated by two or more spaces)."""
    found = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4:
            found[cells[0]] = cells[1:]
    return found


# --- Redis disabled ---------------------------------------------------------------------------------


def test_show_without_redis_prints_the_policies_and_the_quota_usage(cli_env: Any):
    cli_env()
    user_id = seed()
    result = invoke("show", str(user_id))
    assert result.exit_code == 0, result.output
    assert f"User 'carol' ({user_id})." in result.stdout
    assert "kept in each server's own memory" in result.stdout
    table = rows(result.stdout)
    assert table["POLICY"] == ["LIMIT", "REMAINING", "RESET (S)"]
    assert table["user"] == ["30/60s", "n/a", "n/a"]
    assert table[CHAT_ROUTE] == ["5/60s", "n/a", "n/a"]
    daily, monthly = windows(utcnow(), 100, 1000)
    assert table["daily"] == ["100", "15", "85", daily.end.isoformat()]
    assert table["monthly"] == ["1000", "15", "985", monthly.end.isoformat()]

    as_json = invoke("show", str(user_id), "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["name"] == "carol" and data["rate_limits_shared"] is False
    assert data["policies"][0] == {
        "policy": "user", "limit": 30, "window_seconds": 60, "remaining": None, "reset_seconds": None,
    }  # fmt: skip
    assert [(q["window"], q["used"], q["remaining"]) for q in data["token_quotas"]] == [
        ("daily", 15, 85),
        ("monthly", 15, 985),
    ]


def test_show_says_unlimited_without_quotas_and_off_without_limits(cli_env: Any):
    cli_env(TOKEN_QUOTA_DAILY="0", TOKEN_QUOTA_MONTHLY="0", RATE_LIMIT_ENABLED="false")
    user_id = seed()
    result = invoke("show", str(user_id))
    assert result.exit_code == 0, result.output
    assert "Request rate limits are off (RATE_LIMIT_ENABLED=false)" in result.stdout
    assert "Token quotas: unlimited" in result.stdout
    reset = invoke("reset", str(user_id))
    assert reset.exit_code == 0, reset.output
    assert "token quotas: unlimited, nothing to reset." in reset.stdout


def test_reset_without_redis_says_what_it_could_and_could_not_do(cli_env: Any):
    cli_env()
    user_id = seed()
    result = invoke("reset", str(user_id))
    assert result.exit_code == 0, result.output
    assert "request limits not reset" in result.stdout and "Restart the servers" in result.stdout
    assert "recounted from stored usage: daily 15/100, monthly 15/1000 tokens." in result.stdout


def test_bad_and_unknown_user_ids_fail_cleanly(cli_env: Any):
    cli_env()
    seed()
    bad = invoke("show", "not-a-uuid")
    assert bad.exit_code == 2 and "must be a user id" in bad.stderr
    for command in ("show", "reset"):
        unknown = invoke(command, str(uuid.uuid4()))
        assert unknown.exit_code == 1, unknown.output
        assert "no user with id" in unknown.stderr
        assert "Traceback" not in unknown.output


# --- Redis enabled --------------------------------------------------------------------------------


def test_show_and_reset_with_redis(cli_env: Any, redis_url: str):
    # Limits whose requests come back slowly (one every 20 s and 30 s): the remaining counts below
    # hold however long a loaded machine takes between spending them and showing them.
    cli_env(
        REDIS_ENABLED="true",
        REDIS_URL=redis_url,
        RATE_LIMIT_REQUESTS_PER_MINUTE="3",
        RATE_LIMIT_ROUTE_OVERRIDES=json.dumps({CHAT_ROUTE: 2}),
    )
    user_id = seed(spend=True)
    shown = invoke("show", str(user_id))
    assert shown.exit_code == 0, shown.output
    assert "memory" not in shown.stdout
    table = rows(shown.stdout)
    assert table["user"][:2] == ["3/60s", "1"]
    assert 20.0 < float(table["user"][2]) <= 40.0  # two requests: two 20 s emission intervals
    assert table[CHAT_ROUTE][:2] == ["2/60s", "1"]
    assert table["daily"][:3] == ["100", "15", "85"]

    reset = invoke("reset", str(user_id))
    assert reset.exit_code == 0, reset.output
    assert f"request limits reset: user, {CHAT_ROUTE} (full quota available again)." in reset.stdout
    assert "recounted from stored usage: daily 15/100, monthly 15/1000 tokens." in reset.stdout

    after = rows(invoke("show", str(user_id)).stdout)
    assert after["user"] == ["3/60s", "3", "0.0"]
    assert after[CHAT_ROUTE] == ["2/60s", "2", "0.0"]
    assert after["daily"][:3] == ["100", "15", "85"]  # usage is stored: a reset does not forgive it
    raw = redis.Redis.from_url(redis_url)
    try:
        daily = windows(utcnow(), 100, 0)[0]
        assert raw.get(keys.token_quota(user_id, "daily", daily.label)) == b"15"
        assert raw.exists(keys.rate_limit("user", str(user_id))) == 0
    finally:
        raw.close()


def test_show_with_redis_unreachable_fails_with_a_message(cli_env: Any, redis_url: str, private_redis: RedisProcess):
    cli_env(REDIS_ENABLED="true", REDIS_URL=redis_url)
    user_id = seed()
    asyncio.run(private_redis.stop())
    for command in ("show", "reset"):
        result = invoke(command, str(user_id))
        assert result.exit_code == 1, result.output
        assert "cannot reach Redis" in result.stderr
        assert "Traceback" not in result.output
