"""The terminal chat: a prompt loop over a `ChatBackend`, which is either `RemoteChat` (a running
service, over HTTP and Server-Sent Events) or `EmbeddedChat` (the services, in this process)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from companion.chat.service import ErrorEvent, TokenEvent
from companion.cli.support import CliFailure, started_services
from companion.config import Settings
from companion.errors import CompanionError
from companion.llm.base import LLMProvider
from companion.services import Services

LOCAL_USER = "local"
QUIT_COMMANDS = {"/quit", "/exit"}
HELP = "Type a message; /new starts a new conversation, /quit leaves, Ctrl-C stops a reply."


@dataclass(frozen=True)
class Conversation:
    id: uuid.UUID
    personality: str


class ChatFailure(Exception):
    """Shown as one line saying what to do next; the chat goes on unless it has not started yet."""


class ChatBackend(Protocol):
    async def start(self) -> None: ...

    async def get(self, conversation_id: uuid.UUID) -> Conversation: ...

    async def latest(self, personality: str) -> Conversation | None: ...

    async def create(self, personality: str) -> Conversation: ...

    def reply(self, conversation: Conversation, content: str) -> AsyncGenerator[str, None]:
        """Send `content`; yield the reply's text as it streams. Raises ChatFailure."""
        ...

    async def aclose(self) -> None: ...


def cli_message(code: str | None, message: str) -> str:
    """The service's messages point at HTTP endpoints; in the terminal, point at the CLI instead."""
    if code == "personality_not_found":
        return "No such personality; `companion personalities list` shows the ones you can use."
    if code == "conversation_not_found":
        return "No such conversation; leave out --conversation to continue your latest one, or pass --new."
    return message


async def open_conversation(
    backend: ChatBackend, personality: str, conversation_id: uuid.UUID | None, new: bool
) -> tuple[Conversation, bool]:
    """The conversation to chat in, and whether it already existed."""
    if conversation_id is not None:
        return await backend.get(conversation_id), True
    if not new:
        latest = await backend.latest(personality)
        if latest is not None:
            return latest, True
    return await backend.create(personality), False


def run_chat(
    backend: ChatBackend, personality: str, *, conversation_id: uuid.UUID | None = None, new: bool = False
) -> int:
    """Run the prompt loop until /quit or end of input; return the exit code.

    One event loop serves the whole session, and `asyncio.Runner` turns Ctrl-C during a reply into
    cancelling that reply (the service keeps what was written: `incomplete` embedded, `stopped` through
    --url, where the reply runs apart from the connection and is asked to stop) and a KeyboardInterrupt.
    """
    with asyncio.Runner() as runner, _signals_wake(runner.get_loop()):
        try:
            try:
                runner.run(backend.start())
                conversation, existed = runner.run(open_conversation(backend, personality, conversation_id, new))
            except ChatFailure as failure:
                _error(failure)
                return 1
            except KeyboardInterrupt:
                return 130
            _announce(conversation, existed)
            print(HELP, flush=True)
            while True:
                try:
                    line = input("you> ").strip()
                except (EOFError, KeyboardInterrupt):
                    print()
                    return 0
                if not line:
                    continue
                if line in QUIT_COMMANDS:
                    return 0
                try:
                    if line == "/new":
                        conversation = runner.run(backend.create(conversation.personality))
                        _announce(conversation, False)
                    elif line == "/help":
                        print(HELP)
                    else:
                        runner.run(_print_reply(backend, conversation, line))
                except ChatFailure as failure:
                    _error(failure)
                except KeyboardInterrupt:
                    print("(reply stopped; what was written so far is kept)", flush=True)
        finally:
            runner.run(backend.aclose())


@contextmanager
def _signals_wake(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Make a signal wake `loop` from its sleep in select().

    `asyncio.Runner` handles Ctrl-C with a plain `signal.signal` handler, and Python runs such a
    handler only when the main thread next runs Python code. A SIGINT that arrives after the loop's
    last look and before it blocks in select() (the moment the GIL is handed to other threads) is
    noticed only when something else wakes the loop: while a remote model hangs, nothing does, and
    the reply could not be stopped. A wakeup fd (what asyncio's own `add_signal_handler` sets up,
    which the Runner's handler does not use) makes the signal itself end that sleep.
    """
    receive, send = socket.socketpair()
    receive.setblocking(False)
    send.setblocking(False)
    try:
        try:
            loop.add_reader(receive.fileno(), _drain, receive)
        except NotImplementedError:  # a loop without readers (Windows' proactor sets its own wakeup fd)
            yield
            return
        try:
            previous = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread, where the Runner handles no Ctrl-C either
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            loop.remove_reader(receive.fileno())
    finally:
        receive.close()
        send.close()


def _drain(sock: socket.socket) -> None:
    with suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass


def _announce(conversation: Conversation, existed: bool) -> None:
    state = "continuing conversation" if existed else "new conversation"
    print(f"Chatting with {conversation.personality} ({state} {conversation.id}).", flush=True)


def _error(failure: ChatFailure) -> None:
    print(f"error: {failure}", file=sys.stderr, flush=True)


async def _print_reply(backend: ChatBackend, conversation: Conversation, content: str) -> None:
    prefix = f"{conversation.personality}> "
    started = False
    try:
        async with aclosing(backend.reply(conversation, content)) as tokens:
            async for token in tokens:
                if not started:
                    print(prefix, end="")
                    started = True
                print(token, end="", flush=True)
        if not started:  # an empty reply is still a reply
            print(prefix, end="")
            started = True
    finally:
        if started:
            print(flush=True)


class RemoteChat:
    """Chat with a running service through its native API."""

    def __init__(self, url: str, api_key: str) -> None:
        self._url = url.rstrip("/")
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "start() first"
        return self._client

    async def start(self) -> None:
        # A local model can take a while before its first token: patient reads, quick connects.
        self._client = httpx.AsyncClient(
            base_url=self._url,
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=httpx.Timeout(10.0, read=300.0),
        )

    async def get(self, conversation_id: uuid.UUID) -> Conversation:
        return _conversation(await self._request("GET", f"/v1/conversations/{conversation_id}"))

    async def latest(self, personality: str) -> Conversation | None:
        page = await self._request("GET", "/v1/conversations", params={"personality": personality, "limit": 1})
        data = page.get("data") or []
        return _conversation(data[0]) if data else None

    async def create(self, personality: str) -> Conversation:
        return _conversation(await self._request("POST", "/v1/conversations", json={"personality": personality}))

    async def reply(self, conversation: Conversation, content: str) -> AsyncGenerator[str, None]:
        path = f"/v1/conversations/{conversation.id}/messages"
        message_id: int | None = None
        try:
            async with self.client.stream("POST", path, json={"content": content}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise ChatFailure(self._describe(response))
                async with aclosing(_sse_events(response)) as events:
                    async for event, data in events:
                        if event == "message":
                            message_id = data.get("message_id")
                        elif event == "token":
                            yield data["text"]
                        elif event == "done":
                            return
                        elif event == "error":
                            message = data.get("error", {}).get("message", "the reply failed")
                            raise ChatFailure(f"{message} (what arrived is kept); try again.")
        except httpx.TransportError as error:
            raise ChatFailure(self._transport_message(error, mid_reply=True)) from None
        except asyncio.CancelledError:
            # Ctrl-C: the service generates a reply apart from its connection, so ask it to stop.
            if message_id is not None:
                with suppress(httpx.HTTPError):
                    await self.client.post(f"{path}/{message_id}/stop", timeout=5.0)
            raise
        raise ChatFailure("The reply ended before it was complete; try again.")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ChatFailure(self._transport_message(error, mid_reply=False)) from None
        if response.status_code >= 400:
            raise ChatFailure(self._describe(response))
        try:
            return response.json()
        except ValueError:
            raise ChatFailure(f"{self._shown_url} did not answer like companion does; check --url.") from None

    @property
    def _shown_url(self) -> str:
        # Never echo credentials someone put in the URL.
        return str(httpx.URL(self._url).copy_with(userinfo=b""))

    def _transport_message(self, error: httpx.TransportError, *, mid_reply: bool) -> str:
        if isinstance(error, httpx.ConnectError):
            return f"cannot reach the service at {self._shown_url}; check that `companion serve` runs there and --url is right."
        if isinstance(error, httpx.TimeoutException):
            return f"the service at {self._shown_url} did not answer in time; try again."
        if mid_reply:
            return "the connection to the service broke mid-reply (what arrived is kept); try again."
        return f"the connection to {self._shown_url} failed ({type(error).__name__}); try again."

    def _describe(self, response: httpx.Response) -> str:
        try:
            error = response.json()["error"]
            code, message = error.get("code"), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return f"{self._shown_url} answered HTTP {response.status_code}; check --url points at companion."
        if response.status_code == 401:
            # The service's own hint is right, but says nothing about where the CLI takes the key from.
            return (
                "the service rejected the API key. Pass the key printed by `companion users create NAME` "
                "with --api-key or COMPANION_API_KEY."
            )
        return cli_message(code, message)


def _conversation(data: Any) -> Conversation:
    try:
        return Conversation(uuid.UUID(data["id"]), str(data["personality"]))
    except (KeyError, TypeError, ValueError):
        raise ChatFailure("the service answered with an unexpected conversation; check --url.") from None


async def _sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str | None, Any], None]:
    """Parse Server-Sent Events as they arrive: (event name, decoded JSON data)."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    raise ChatFailure("the service sent an unreadable event; check --url.") from None
                yield event, payload
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


class EmbeddedChat:
    """Chat with the services built in this process (the embedded defaults: SQLite, local model)."""

    def __init__(self, settings: Settings, *, provider: LLMProvider | None = None) -> None:
        self._settings = settings
        self._provider = provider
        self._stack = AsyncExitStack()
        self._services: Services | None = None
        self._user_id: uuid.UUID | None = None

    @property
    def services(self) -> Services:
        assert self._services is not None, "start() first"
        return self._services

    @property
    def user_id(self) -> uuid.UUID:
        assert self._user_id is not None, "start() first"
        return self._user_id

    async def start(self) -> None:
        try:
            self._services = await self._stack.enter_async_context(
                started_services(self._settings, provider=self._provider)
            )
            await self._services.provider.start()
            users = self._services.users
            self._user_id = await users.find_by_name(LOCAL_USER) or await users.create_without_key(LOCAL_USER)
        except CliFailure as failure:
            raise ChatFailure(failure.message) from None
        except CompanionError as error:
            raise ChatFailure(error.message) from None

    async def get(self, conversation_id: uuid.UUID) -> Conversation:
        async with _failures():
            found = await self.services.conversations.get(self.user_id, conversation_id)
        return Conversation(found.id, found.personality)

    async def latest(self, personality: str) -> Conversation | None:
        async with _failures():
            found = await self.services.conversations.latest(self.user_id, personality)
        return Conversation(found.id, found.personality) if found else None

    async def create(self, personality: str) -> Conversation:
        async with _failures():
            resolved = await self.services.personalities.resolve(self.user_id, personality)
            created = await self.services.conversations.create(self.user_id, resolved.name)
        return Conversation(created.id, created.personality)

    async def reply(self, conversation: Conversation, content: str) -> AsyncGenerator[str, None]:
        async with _failures():
            stored = await self.services.conversations.get(self.user_id, conversation.id)
            turn = await self.services.chat.begin(self.user_id, stored, content)
        async with aclosing(self.services.chat.run(turn)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    yield event.text
                elif isinstance(event, ErrorEvent):
                    raise ChatFailure(f"{event.error.message} (what arrived is kept); try again.")

    async def aclose(self) -> None:
        await self._stack.aclose()


@asynccontextmanager
async def _failures() -> AsyncIterator[None]:
    """Turn a CompanionError into a ChatFailure worded for the terminal."""
    try:
        yield
    except CompanionError as error:
        raise ChatFailure(cli_message(error.code, error.message)) from None
