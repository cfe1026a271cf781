"""What every command shares: settings or a clean exit, running a coroutine, and reaching the
database with errors that name its backend but never DATABASE_URL itself (it may hold a password)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from companion.config import Settings, load_settings
from companion.errors import CompanionError, ServiceUnavailable, SettingsError
from companion.llm.base import LLMProvider
from companion.services import Services
from companion.storage.database import Database

T = TypeVar("T")

# What a wrong or unreachable DATABASE_URL raises: refused connections and timeouts come mapped to
# ServiceUnavailable, but "no such database/role" arrive as DBAPIError and a bad SQLite path as OSError.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (ServiceUnavailable, SQLAlchemyError, OSError)


class CliFailure(Exception):
    """A failure reported as one line on stderr, then exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    """The settings, or exit 2 with SettingsError's message (it names variables, never values)."""
    try:
        return load_settings()
    except SettingsError as error:
        fail(error.message, 2)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; known failures become a one-line message and an exit code."""
    try:
        return asyncio.run(coroutine)
    except CliFailure as failure:
        fail(failure.message, failure.code)
    except CompanionError as error:
        fail(error.message)


def database_backend(settings: Settings) -> str:
    return make_url(settings.resolved_database_url).get_backend_name()


def unreachable(settings: Settings, error: BaseException) -> CliFailure:
    cause = error.__cause__ if isinstance(error, ServiceUnavailable) and error.__cause__ else error
    if isinstance(cause, DBAPIError) and cause.orig is not None:
        # The driver's own words ("database "x" does not exist"); servers never echo a password.
        reason = str(cause.orig).splitlines()[0]
    else:
        reason = type(cause).__name__
    return CliFailure(
        f"cannot reach the {database_backend(settings)} database set by DATABASE_URL ({reason}). "
        "Check that the database is running and that DATABASE_URL points at it."
    )


def _database(settings: Settings) -> Database:
    try:
        return Database(
            settings.resolved_database_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            pool_size=settings.database_pool_size,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        )
    except OSError as error:  # SQLite: the file's directory cannot be created
        raise unreachable(settings, error) from None


@asynccontextmanager
async def reachable_database(settings: Settings) -> AsyncIterator[Database]:
    """A Database that answered a ping; raises CliFailure (exit 1) when it cannot be reached."""
    database = _database(settings)
    try:
        try:
            await database.ping()
        except DATABASE_ERRORS as error:
            raise unreachable(settings, error) from None
        yield database
    finally:
        await database.dispose()


@asynccontextmanager
async def started_services(settings: Settings, *, provider: LLMProvider | None = None) -> AsyncIterator[Services]:
    """Services migrated and seeded but without the model loaded (callers that chat load it)."""
    try:
        services = Services.build(settings, provider=provider)
    except OSError as error:
        raise unreachable(settings, error) from None
    try:
        try:
            await services.database.ping()
            await services.start(load_model=False)
        except DATABASE_ERRORS as error:
            raise unreachable(settings, error) from None
        yield services
    finally:
        await services.aclose()
