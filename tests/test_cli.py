"""The `companion` command: in-process through Typer's CliRunner where the command is synchronous,
and as real subprocesses (`companion serve`, `companion chat --url`) for the remote chat."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from companion.app import create_app
from companion.cli.chat import ChatBackend, EmbeddedChat, RemoteChat, run_chat
from companion.cli.main import app
from companion.config import Settings
from companion.conversations.schemas import MessageOut
from companion.conversations.service import ConversationService
from companion.llm.scripted import ScriptedProvider, ScriptedReply
from companion.storage import migrate
from companion.storage.database import Database
from companion.users.service import CreatedUser, UserService, hash_api_key
from tests.conftest import make_settings
from tests.support.live import LiveServer, wait_for

COMPANION = Path(sys.executable).with_name("companion")
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Settings for a command, as the environment gives them."""
    return {
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "LLM_PROVIDER": "scripted",
        "ENVIRONMENT": "test",
        "REDIS_ENABLED": "false",
        "AUTO_MIGRATE": "true",
    }


@pytest.fixture
def use_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Set the environment for in-process commands; run from tmp_path so no stray .env is read."""
    monkeypatch.chdir(tmp_path)
    for name in ("COMPANION_URL", "COMPANION_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    def apply(database_url: str, **extra: str) -> None:
        for name, value in {**cli_env(database_url, tmp_path), **extra}.items():
            monkeypatch.setenv(name, value)

    return apply


async def _stored_chat(database_url: str, user_id: uuid.UUID | None = None) -> list[list[MessageOut]]:
    """Every conversation of `user_id` (default: the embedded chat's "local" user), oldest first."""
    database = Database(database_url)
    try:
        user_id = user_id or await UserService(database).find_by_name("local")
        assert user_id is not None, "the chat should have created its local user"
        conversations = ConversationService(database)
        page, _ = await conversations.list(user_id)
        result = []
        for conversation in sorted(page, key=lambda c: c.created_at):
            messages, _ = await conversations.list_messages(user_id, conversation.id)
            result.append(messages)
        return result
    finally:
        await database.dispose()


def _turns(messages: list[MessageOut]) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in messages]


# --- users, personalities, db ----------------------------------------------------------------------


def test_users_create_json_prints_a_key_that_authenticates_and_is_stored_hashed(
    database_url: str, use_env: Any
) -> None:
    use_env(database_url)
    result = runner.invoke(app, ["users", "create", "alice", "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    created = json.loads(lines[0])
    assert set(created) == {"id", "api_key"}

    async def check() -> list[tuple[Any, ...]]:
        database = Database(database_url)
        try:
            assert await UserService(database).authenticate(created["api_key"]) == uuid.UUID(created["id"])
            async with database.session() as session:
                return [tuple(row) for row in await session.execute(text("SELECT * FROM api_keys"))]
        finally:
            await database.dispose()

    rows = asyncio.run(check())
    assert len(rows) == 1
    stored = [str(value) for value in rows[0]]
    assert hash_api_key(created["api_key"]) in stored
    assert not any(created["api_key"] in value for value in stored), "the raw key must not be stored"


def test_users_create_says_the_key_is_shown_once(database_url: str, use_env: Any) -> None:
    use_env(database_url)
    result = runner.invoke(app, ["users", "create", "bob"])
    assert result.exit_code == 0, result.output
    assert "shown only once" in result.stdout
    assert "cmp_" in result.stdout


def test_users_create_rejects_a_blank_name(database_url: str, use_env: Any) -> None:
    use_env(database_url)
    result = runner.invoke(app, ["users", "create", "   "])
    assert result.exit_code == 2
    assert "1-100 characters" in result.stderr
    assert "Traceback" not in result.output


def test_personalities_list_shows_the_eight_globals(database_url: str, use_env: Any) -> None:
    use_env(database_url)
    table = runner.invoke(app, ["personalities", "list"])
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["NAME", "DISPLAY", "NAME", "DESCRIPTION"]
    assert len(rows) == 8
    elara = next(row for row in rows if row.startswith("elara "))
    assert "Elara" in elara and "listens first" in elara

    as_json = runner.invoke(app, ["personalities", "list", "--json"])
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.stdout)
    assert len(listed) == 8
    assert {"name": "elara", "display_name": "Elara"}.items() <= next(p for p in listed if p["name"] == "elara").items()
    assert all(set(p) == {"name", "display_name", "description"} for p in listed)


def test_db_upgrade_creates_the_schema_on_an_empty_sqlite_file(use_env: Any, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh' / 'empty.db'}"
    use_env(url, AUTO_MIGRATE="false")
    for _ in range(2):  # and again: upgrading an up-to-date schema is a no-op
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert f"revision {migrate.head_revision()} (head)" in result.stdout

    async def tables() -> tuple[set[str], str | None]:
        database = Database(url)
        try:
            async with database.session() as session:
                names = await session.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
                found = {row[0] for row in names}
            return found, await migrate.current_revision(database)
        finally:
            await database.dispose()

    found, revision = asyncio.run(tables())
    assert {"users", "api_keys", "personalities", "conversations", "messages", "preferences"} <= found
    assert revision == migrate.head_revision()


# --- serve: refusing to start -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("SHORT_TERM_MEMORY_SIZE", "abc", None),
        ("LLM_PROVIDER", "nope", None),
        ("DATABASE_URL", "mysql://user:s3cret-value@h/db", "s3cret-value"),
    ],
)
def test_serve_with_an_invalid_setting_exits_2_naming_the_variable(
    use_env: Any, tmp_path: Path, variable: str, value: str, secret: str | None
) -> None:
    use_env(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", **{variable: value})
    result = runner.invoke(app, ["serve", "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert variable in result.stderr
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)
    if secret is not None:
        assert secret not in result.output
        assert secret not in result.stderr


def test_serve_with_an_unreachable_database_exits_1_naming_the_backend_only(use_env: Any) -> None:
    password = "hunter2-not-shown"
    use_env(f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{free_port()}/companion")
    result = runner.invoke(app, ["serve", "--port", str(free_port())])
    assert result.exit_code == 1, result.output
    assert "postgresql" in result.stderr and "DATABASE_URL" in result.stderr
    assert password not in result.output and "127.0.0.1" not in result.stderr
    assert "Traceback" not in result.output


# --- chat, embedded -----------------------------------------------------------------------------


def test_chat_embedded_streams_replies_and_stores_them(database_url: str, use_env: Any) -> None:
    use_env(database_url)
    first = runner.invoke(app, ["chat", "--personality", "elara"], input="Hello Elara\n\n/new\nA fresh start\n/quit\n")
    assert first.exit_code == 0, first.output
    assert "elara> You said: Hello Elara\n" in first.stdout
    assert "elara> You said: A fresh start\n" in first.stdout
    assert first.stdout.count("(new conversation ") == 2

    # Without --new, the next session continues the latest conversation; EOF ends it.
    second = runner.invoke(app, ["chat"], input="And again\n")
    assert second.exit_code == 0, second.output
    assert "elara> You said: And again" in second.stdout

    stored = asyncio.run(_stored_chat(database_url))
    assert [_turns(messages) for messages in stored] == [
        [("user", "Hello Elara", "complete"), ("assistant", "You said: Hello Elara", "complete")],
        [
            ("user", "A fresh start", "complete"),
            ("assistant", "You said: A fresh start", "complete"),
            ("user", "And again", "complete"),
            ("assistant", "You said: And again", "complete"),
        ],
    ]
    assert f"continuing conversation {stored[1][0].conversation_id}" in second.stdout


def test_chat_embedded_explains_an_unknown_personality_and_conversation(database_url: str, use_env: Any) -> None:
    use_env(database_url)
    unknown = runner.invoke(app, ["chat", "--personality", "nobody"], input="hi\n")
    assert unknown.exit_code == 1
    assert "companion personalities list" in unknown.stderr

    missing = runner.invoke(app, ["chat", "--conversation", str(uuid.uuid4())], input="hi\n")
    assert missing.exit_code == 1
    assert "No such conversation" in missing.stderr

    malformed = runner.invoke(app, ["chat", "--conversation", "not-an-id"], input="hi\n")
    assert malformed.exit_code == 2
    assert "Traceback" not in unknown.output + missing.output + malformed.output


class _Output(io.StringIO):
    """stdout for the chat loop that lets another thread wait until some text has been printed."""

    def __init__(self, awaited: str) -> None:
        super().__init__()
        self._awaited = awaited
        self.seen = threading.Event()

    def write(self, value: str) -> int:
        written = super().write(value)
        if self._awaited in self.getvalue():
            self.seen.set()
        return written


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handling, as in a terminal. Earlier tests can leave another handler
    installed (uvicorn restores the one it found, which may be a finished event loop's)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _server_in_thread(settings: Settings, provider: ScriptedProvider) -> Iterator[tuple[str, CreatedUser]]:
    """The app on uvicorn in its own thread and loop, so that the chat can own the main thread
    (where Ctrl-C arrives). Yields the base URL and a user with a key."""
    started: dict[str, Any] = {}
    ready, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        live = LiveServer(create_app(settings, provider=provider))
        await live.start()
        try:
            started["url"] = live.base_url
            started["user"] = await live.app.state.services.users.create("remote")
            ready.set()
            await wait_for(stop.is_set, timeout=120, what="the test to finish")
        finally:
            await live.stop()

    def main() -> None:
        try:
            asyncio.run(serve())
        finally:
            ready.set()

    thread = threading.Thread(target=main, name="live-server")
    thread.start()
    try:
        assert ready.wait(timeout=30) and "user" in started, "the server thread did not start"
        yield started["url"], started["user"]
    finally:
        stop.set()
        thread.join(timeout=30)


@pytest.mark.parametrize("mode", ["embedded", "remote"])
def test_chat_ctrl_c_stops_the_reply_keeps_it_incomplete_and_returns_to_the_prompt(
    mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, python_sigint: None
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    settings = make_settings(url, tmp_path, auto_migrate=True)
    # A model that writes one word and then hangs, until the user presses Ctrl-C.
    provider = ScriptedProvider([ScriptedReply("Partial reply", hang_after=1)])
    output = _Output("elara> Partial ")
    presses = 0

    def press_ctrl_c() -> None:
        nonlocal presses
        if not output.seen.wait(timeout=30):
            return
        # One press must stop the reply, whenever it lands: a SIGINT that arrived just as the chat's
        # loop went to sleep in select() used to go unseen while the model hung (run_chat's wakeup
        # fd fixed that). Should one go unseen again, a second press ends the hang and the count
        # below fails the test, instead of the run hanging for ever.
        for _ in range(3):
            presses += 1
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if "(reply stopped" in output.getvalue():
                    return
                time.sleep(0.01)

    with ExitStack() as stack:
        backend: ChatBackend
        user_id: uuid.UUID | None = None
        if mode == "embedded":
            backend = EmbeddedChat(settings, provider=provider)
        else:
            base_url, user = stack.enter_context(_server_in_thread(settings, provider))
            backend, user_id = RemoteChat(base_url, user.api_key), user.id
        monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story\nAre you there?\n/quit\n"))
        monkeypatch.setattr(sys, "stdout", output)
        presser = threading.Thread(target=press_ctrl_c, daemon=True)
        presser.start()
        code = run_chat(backend, "elara")
        presser.join(timeout=30)
        monkeypatch.undo()

        assert output.seen.is_set(), output.getvalue()
        assert presses == 1, "the first Ctrl-C was not seen by the chat"
        assert code == 0
        printed = output.getvalue()
        assert "elara> Partial \n(reply stopped" in printed
        assert "elara> You said: Are you there?" in printed

        def settled() -> list[MessageOut]:
            # The service notices the closed stream on its own time; poll, with a deadline.
            deadline = time.monotonic() + 10
            while True:
                [messages] = asyncio.run(_stored_chat(url, user_id))
                if all(m.status != "streaming" for m in messages) or time.monotonic() > deadline:
                    return messages
                time.sleep(0.02)

        # Remote: Ctrl-C asks the service to stop the reply (it runs apart from the connection).
        assert _turns(settled()) == [
            ("user", "Tell me a story", "complete"),
            ("assistant", "Partial ", "incomplete" if mode == "embedded" else "stopped"),
            ("user", "Are you there?", "complete"),
            ("assistant", "You said: Are you there?", "complete"),
        ]


# --- chat, remote: `companion serve` and `companion chat --url` as real processes ----------------------


class ServedCompanion:
    """`companion serve` in a subprocess on a loopback port; restartable on the same database."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._log = workdir / "serve.log"

    def start(self, timeout: float = 30.0) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(COMPANION), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"companion serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"companion serve was not healthy within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """Stop it abruptly, as a crash would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=15)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def cli(self, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(COMPANION), *args],
            input=stdin,
            env=env or self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def client(self, api_key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedCompanion]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPANION_")}
    env.update(cli_env(f"sqlite+aiosqlite:///{tmp_path / 'served.db'}", tmp_path))
    companion = ServedCompanion(env, tmp_path)
    try:
        companion.start()
        yield companion
    finally:
        companion.stop()


def _create_user(served: ServedCompanion, name: str) -> dict[str, str]:
    result = served.cli("users", "create", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_chat_remote_streams_from_a_running_server_and_the_conversation_is_stored(
    served: ServedCompanion,
) -> None:
    user = _create_user(served, "dana")
    result = served.cli(
        "chat", "--url", served.base_url, "--api-key", user["api_key"], stdin="Hello over HTTP\n/quit\n"
    )
    assert result.returncode == 0, result.stderr
    assert "elara> You said: Hello over HTTP\n" in result.stdout
    assert "Traceback" not in result.stderr

    with served.client(user["api_key"]) as client:
        conversations = client.get("/v1/conversations", params={"personality": "elara"}).json()["data"]
        assert len(conversations) == 1
        messages = client.get(f"/v1/conversations/{conversations[0]['id']}/messages").json()["data"]
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "Hello over HTTP", "complete"),
        ("assistant", "You said: Hello over HTTP", "complete"),
    ]


def test_chat_remote_explains_a_wrong_key(served: ServedCompanion) -> None:
    wrong = served.cli("chat", "--url", served.base_url, "--api-key", "cmp_not-a-real-key", stdin="hi\n")
    assert wrong.returncode == 1
    assert "--api-key" in wrong.stderr and "Traceback" not in wrong.stderr


def test_chat_remote_explains_an_unreachable_service_and_a_missing_key(use_env: Any, tmp_path: Path) -> None:
    use_env(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    url = f"http://127.0.0.1:{free_port()}"
    nowhere = runner.invoke(app, ["chat", "--url", url, "--api-key", "cmp_x"], input="hi\n")
    assert nowhere.exit_code == 1
    assert "cannot reach the service" in nowhere.stderr
    assert not isinstance(nowhere.exception, Exception)

    no_key = runner.invoke(app, ["chat", "--url", url], input="hi\n")
    assert no_key.exit_code == 2
    assert "COMPANION_API_KEY" in no_key.stderr


def test_history_survives_a_server_crash_and_the_next_chat_continues_it(served: ServedCompanion) -> None:
    user = _create_user(served, "erin")
    first = served.cli("chat", "--url", served.base_url, "--api-key", user["api_key"], stdin="Remember me\n")
    assert first.returncode == 0, first.stderr
    assert "elara> You said: Remember me" in first.stdout

    served.kill()
    served.start()

    # URL and key from the environment this time.
    env = {**served.env, "COMPANION_URL": served.base_url, "COMPANION_API_KEY": user["api_key"]}
    second = served.cli("chat", stdin="Still here?\n", env=env)
    assert second.returncode == 0, second.stderr
    assert "elara> You said: Still here?" in second.stdout

    with served.client(user["api_key"]) as client:
        [conversation] = client.get("/v1/conversations").json()["data"]
        messages = client.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
    assert f"continuing conversation {conversation['id']}" in second.stdout
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "Remember me", "complete"),
        ("assistant", "You said: Remember me", "complete"),
        ("user", "Still here?", "complete"),
        ("assistant", "You said: Still here?", "complete"),
    ]
