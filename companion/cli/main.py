"""The `companion` command: serve the API, manage users and the database, list personalities, and
chat in the terminal (against a running service, or with everything in-process)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from companion.cache.backend import CacheUnavailable
from companion.cli.cache import cache_app
from companion.cli.chat import EmbeddedChat, RemoteChat, run_chat
from companion.cli.support import (
    CliFailure,
    database_backend,
    fail,
    reachable_database,
    run,
    settings_or_exit,
    started_services,
)
from companion.config import Settings
from companion.errors import CompanionError
from companion.personalities.schemas import PersonalityOut
from companion.ratelimit.limiter import Decision
from companion.ratelimit.quotas import QuotaState
from companion.services import Services
from companion.storage import migrate
from companion.storage.models import User
from companion.users.service import ApiKeyInfo, CreatedKey, CreatedUser

# Locals can hold settings and keys: never print them in a traceback.
app = typer.Typer(
    help="companion: an AI-companion chat service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
users_app = typer.Typer(help="Manage users and their API keys.", no_args_is_help=True)
personalities_app = typer.Typer(help="The global personalities.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
limits_app = typer.Typer(help="A user's request rate limits and token quotas.", no_args_is_help=True)
keys_app = typer.Typer(help="A user's API keys: list, create, revoke.", no_args_is_help=True)
users_app.add_typer(keys_app, name="keys")
app.add_typer(users_app, name="users")
app.add_typer(personalities_app, name="personalities")
app.add_typer(db_app, name="db")
app.add_typer(limits_app, name="limits")
app.add_typer(cache_app, name="cache")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
) -> None:
    """Run the HTTP API (settings come from the environment and .env)."""
    import uvicorn

    from companion.app import create_app

    settings = settings_or_exit()
    run(_check_database(settings))
    options = server_options(settings)
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, **options)
    else:
        # Each worker process builds its own app, so uvicorn needs an import string, not an object.
        uvicorn.run("companion.app:create_app_from_env", factory=True, host=host, port=port, workers=workers, **options)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for `serve`. Its proxy-header handling is off whatever the environment says
    (uvicorn trusts 127.0.0.1 by default, and reads FORWARDED_ALLOW_IPS by itself): the client
    address is decided in one place, by TRUST_FORWARDED_FOR and TRUSTED_PROXIES
    (companion/api/client_address.py), never rewritten before it is consulted."""
    return {"log_level": settings.log_level.lower(), "proxy_headers": False, "forwarded_allow_ips": ""}


async def _check_database(settings: Settings) -> None:
    async with reachable_database(settings):
        pass


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="The user's name (1-100 characters).")],
    as_json: JsonFlag = False,
) -> None:
    """Create a user and print their API key (shown this once only)."""
    settings = settings_or_exit()
    created = run(_create_user(settings, name))
    if as_json:
        typer.echo(json.dumps({"id": str(created.id), "api_key": created.api_key}))
        return
    typer.echo(f"Created user {created.name!r} with id {created.id}.")
    typer.echo(f"API key: {created.api_key}")
    typer.echo("This key is shown only once and cannot be recovered: store it now.")


async def _create_user(settings: Settings, name: str) -> CreatedUser:
    async with started_services(settings) as services:
        try:
            return await services.users.create(name)
        except ValueError as error:
            raise CliFailure(str(error), code=2) from None


KeyUserArgument = Annotated[str, typer.Argument(help="The user's id (printed by `companion users create`).")]


@keys_app.command("list")
def keys_list(user_id: KeyUserArgument, as_json: JsonFlag = False) -> None:
    """List a user's API keys (never the keys themselves)."""
    settings = settings_or_exit()
    user = _user_id_or_exit(user_id)
    keys = run(_list_keys(settings, user))
    if as_json:
        typer.echo(json.dumps([key.model_dump(mode="json") for key in keys]))
        return
    _table(
        ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "REVOKED"),
        [
            (
                str(k.id),
                k.name,
                k.prefix + "…",
                k.created_at.isoformat(timespec="seconds"),
                k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "never",
                k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
            )
            for k in keys
        ],
    )


@keys_app.command("create")
def keys_create(
    user_id: KeyUserArgument,
    name: Annotated[str, typer.Option("--name", help="What the key is for (1-100 characters).")] = "cli",
    as_json: JsonFlag = False,
) -> None:
    """Create another API key for a user and print it (shown this once only)."""
    settings = settings_or_exit()
    user = _user_id_or_exit(user_id)
    created = run(_create_key(settings, user, name))
    if as_json:
        typer.echo(json.dumps({"id": str(created.info.id), "name": created.info.name, "api_key": created.api_key}))
        return
    typer.echo(f"Created API key {created.info.name!r} with id {created.info.id}.")
    typer.echo(f"API key: {created.api_key}")
    typer.echo("This key is shown only once and cannot be recovered: store it now.")


@keys_app.command("revoke")
def keys_revoke(
    user_id: KeyUserArgument,
    key_id: Annotated[str, typer.Argument(help="The key's id (from `companion users keys list`).")],
    allow_last: Annotated[
        bool, typer.Option("--allow-last", help="Revoke it even if it is the user's last active key.")
    ] = False,
) -> None:
    """Revoke an API key: refused on every instance at once, and the sessions made from it end."""
    settings = settings_or_exit()
    user = _user_id_or_exit(user_id)
    try:
        key = uuid.UUID(key_id)
    except ValueError:
        fail(f"KEY_ID must be a key id (a UUID), not {key_id!r}.", 2)
    ended = run(_revoke_key(settings, user, key, allow_last))
    typer.echo(f"Revoked API key {key}; {ended} session(s) made from it ended.")


async def _list_keys(settings: Settings, user_id: uuid.UUID) -> list[ApiKeyInfo]:
    async with started_services(settings) as services:
        await _user_name(services, user_id)
        return await services.users.list_keys(user_id)


async def _create_key(settings: Settings, user_id: uuid.UUID, name: str) -> CreatedKey:
    async with started_services(settings) as services:
        try:
            return await services.users.create_key(user_id, name)
        except ValueError as error:
            raise CliFailure(str(error), code=2) from None
        except CompanionError as error:
            raise CliFailure(error.message) from None


async def _revoke_key(settings: Settings, user_id: uuid.UUID, key_id: uuid.UUID, allow_last: bool) -> int:
    async with started_services(settings) as services:
        try:
            await services.users.revoke_key(user_id, key_id, allow_last=allow_last)
        except CompanionError as error:
            hint = " Pass --allow-last to revoke it anyway." if error.code == "last_api_key" else ""
            raise CliFailure(error.message + hint) from None
        try:
            return await services.sessions.revoke_made_with(user_id, key_id)
        except CacheUnavailable:
            # Each session checks its key when used, so they are refused all the same.
            return 0


@personalities_app.command("list")
def personalities_list(as_json: JsonFlag = False) -> None:
    """List the global personalities every user can chat with."""
    settings = settings_or_exit()
    personalities = run(_global_personalities(settings))
    rows = [{"name": p.name, "display_name": p.display_name, "description": p.description} for p in personalities]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    headers = {"name": "NAME", "display_name": "DISPLAY NAME", "description": "DESCRIPTION"}
    name_width = max(len(r["name"]) for r in [headers, *rows])
    display_width = max(len(r["display_name"]) for r in [headers, *rows])
    for row in [headers, *rows]:
        typer.echo(f"{row['name']:<{name_width}}  {row['display_name']:<{display_width}}  {row['description']}")


async def _global_personalities(settings: Settings) -> list[PersonalityOut]:
    async with started_services(settings) as services:
        return await services.personalities.list_global()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema up to date."""
    settings = settings_or_exit()
    revision = run(_upgrade(settings))
    head = " (head)" if revision == migrate.head_revision() else ""
    typer.echo(f"The {database_backend(settings)} database is at revision {revision}{head}.")


async def _upgrade(settings: Settings) -> str | None:
    async with reachable_database(settings) as database:
        await migrate.upgrade(database)
        return await migrate.current_revision(database)


@app.command()
def chat(
    personality: Annotated[str, typer.Option("--personality", "-p", help="Who to chat with.")] = "elara",
    url: Annotated[
        str | None,
        typer.Option(envvar="COMPANION_URL", help="A running service; without it, chat runs in-process."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="COMPANION_API_KEY", show_default=False, help="Your key, with --url."),
    ] = None,
    conversation: Annotated[str | None, typer.Option("--conversation", help="Continue this conversation id.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a new conversation.")] = False,
) -> None:
    """Chat in the terminal, with a running service (--url) or in-process.

    Replies stream as they are written. Ctrl-C stops a reply, /new starts a new conversation,
    /quit (or Ctrl-D) leaves.
    """
    if conversation is not None and new:
        fail("use either --conversation or --new, not both.", 2)
    conversation_id = _conversation_id(conversation)
    if url:
        if not api_key:
            fail(
                "chatting with a service needs an API key: pass --api-key or set COMPANION_API_KEY "
                "(create one with `companion users create NAME`).",
                2,
            )
        backend: RemoteChat | EmbeddedChat = RemoteChat(url, api_key)
    else:
        backend = EmbeddedChat(settings_or_exit())
    raise typer.Exit(run_chat(backend, personality, conversation_id=conversation_id, new=new))


def _conversation_id(value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"--conversation must be a conversation id (a UUID), not {value!r}.", 2)


# --- limits --------------------------------------------------------------------------------------

UserIdArgument = Annotated[str, typer.Argument(help="The user's id (printed by `companion users create`).")]
IN_PROCESS_NOTE = (
    "Request limits are kept in each server's own memory (REDIS_ENABLED=false): this command cannot see or reset them."
)


@limits_app.command("show")
def limits_show(user_id: UserIdArgument, as_json: JsonFlag = False) -> None:
    """Show a user's request limits (each policy: limit, remaining, seconds until whole again) and
    token quota usage per window."""
    settings = settings_or_exit()
    user = _user_id_or_exit(user_id)
    name, decisions, quotas = run(_limits_state(settings, user))
    shared = settings.redis_enabled
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "user_id": str(user),
                    "name": name,
                    "rate_limits_enabled": settings.rate_limit_enabled,
                    "rate_limits_shared": shared,
                    "policies": [_policy_json(d, shared) for d in decisions],
                    "token_quotas": [_quota_json(q) for q in quotas],
                }
            )
        )
        return
    typer.echo(f"User {name!r} ({user}).")
    if not settings.rate_limit_enabled:
        typer.echo("Request rate limits are off (RATE_LIMIT_ENABLED=false); configured:")
    elif not shared:
        typer.echo(IN_PROCESS_NOTE)
    headers = ("POLICY", "LIMIT", "REMAINING", "RESET (S)")
    rows = [
        (
            d.limit.name,
            f"{d.limit.limit}/{int(d.limit.period_seconds)}s",
            str(d.remaining) if shared else "n/a",
            f"{d.reset_seconds:.1f}" if shared else "n/a",
        )
        for d in decisions
    ]
    _table(headers, rows)
    typer.echo("")
    if not quotas:
        typer.echo("Token quotas: unlimited (TOKEN_QUOTA_DAILY and TOKEN_QUOTA_MONTHLY are 0).")
        return
    typer.echo("Token quotas (tokens per UTC window):")
    _table(
        ("WINDOW", "QUOTA", "USED", "REMAINING", "RENEWS AT"),
        [(q.window.name, str(q.window.quota), str(q.used), str(q.remaining), q.window.end.isoformat()) for q in quotas],
    )


@limits_app.command("reset")
def limits_reset(user_id: UserIdArgument) -> None:
    """Reset a user's request limits and recount their token quota counters from stored usage
    (usage is stored with every reply: a reset does not forgive it)."""
    settings = settings_or_exit()
    user = _user_id_or_exit(user_id)
    name, policies, quotas = run(_limits_reset(settings, user))
    typer.echo(f"User {name!r} ({user}):")
    if settings.redis_enabled:
        typer.echo(f"  request limits reset: {', '.join(policies)} (full quota available again).")
    else:
        typer.echo(f"  request limits not reset. {IN_PROCESS_NOTE} Restart the servers to clear them.")
    if not quotas:
        typer.echo("  token quotas: unlimited, nothing to reset.")
        return
    usage = ", ".join(f"{q.window.name} {q.used}/{q.window.quota}" for q in quotas)
    where = "" if settings.redis_enabled else " here (servers keep their own counters)"
    typer.echo(f"  token quota counters cleared{where} and recounted from stored usage: {usage} tokens.")


def _user_id_or_exit(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"USER_ID must be a user id (a UUID), not {value!r}.", 2)


async def _user_name(services: Services, user_id: uuid.UUID) -> str:
    async with services.database.session() as session:
        user = await session.get(User, user_id)
    if user is None:
        raise CliFailure(f"no user with id {user_id}.")
    return user.name


async def _limits_state(settings: Settings, user_id: uuid.UUID) -> tuple[str, list[Decision], list[QuotaState]]:
    async with started_services(settings) as services:
        name = await _user_name(services, user_id)
        try:
            decisions = await services.rate_limits.state(str(user_id))
            quotas = await services.quotas.usage(user_id) if services.quotas.enabled else []
        except CacheUnavailable:
            raise _redis_unreachable() from None
        return name, decisions, quotas


async def _limits_reset(settings: Settings, user_id: uuid.UUID) -> tuple[str, list[str], list[QuotaState]]:
    async with started_services(settings) as services:
        name = await _user_name(services, user_id)
        limits = services.rate_limits
        try:
            await limits.reset(str(user_id))
            quotas: list[QuotaState] = []
            if services.quotas.enabled:
                await services.quotas.reset(user_id)
                quotas = await services.quotas.usage(user_id)
        except CacheUnavailable:
            raise _redis_unreachable() from None
        return name, [limit.name for limit in [limits.user_limit, *limits.route_limits.values()]], quotas


def _redis_unreachable() -> CliFailure:
    return CliFailure("cannot reach Redis at REDIS_URL; the limits live there. Check that Redis is running.")


def _policy_json(decision: Decision, shared: bool) -> dict[str, object]:
    return {
        "policy": decision.limit.name,
        "limit": decision.limit.limit,
        "window_seconds": decision.limit.period_seconds,
        "remaining": decision.remaining if shared else None,
        "reset_seconds": round(decision.reset_seconds, 3) if shared else None,
    }


def _quota_json(state: QuotaState) -> dict[str, object]:
    return {
        "window": state.window.name,
        "quota": state.window.quota,
        "used": state.used,
        "remaining": state.remaining,
        "renews_at": state.window.end.isoformat(),
    }


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
