"""Conversation files: our own export (JSON: every conversation whole, its tree of messages, their
statuses, token usage and times, and the personality; Markdown: the active path, for people to
read), and ChatGPT's `conversations.json` (a `mapping` tree of nodes per conversation).

`parse_import` turns a file into validated `ExportedConversation`s, or raises InvalidInput naming
the field at fault, before anything is stored.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from companion.conversations.schemas import MessageStatus
from companion.errors import InvalidInput
from companion.types import PersonalityName, check_text

FORMAT = "companion.conversations"
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_CONVERSATIONS = 1000
MAX_MESSAGES = 20_000  # in one file, all conversations together
MAX_MESSAGE_CHARS = 100_000


class ExportedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[int, Field(ge=1, le=2**63 - 1)]
    parent_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None
    role: Literal["user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS), AfterValidator(check_text)]
    status: MessageStatus
    prompt_tokens: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    completion_tokens: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    created_at: AwareDatetime


class ExportedConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID | None = None  # informative: an import always makes new ids
    title: Annotated[str, Field(max_length=200), AfterValidator(lambda v: check_text(v, multiline=False))] | None
    personality: PersonalityName
    created_at: AwareDatetime
    updated_at: AwareDatetime
    head_id: int | None = Field(description="The newest message of the active path.")
    messages: list[ExportedMessage]


class ChatExport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["companion.conversations"] = "companion.conversations"
    version: Literal[1] = 1
    exported_at: AwareDatetime
    conversations: list[ExportedConversation]


def _invalid(message: str, param: str = "file") -> InvalidInput:
    return InvalidInput(message, code="invalid_import", param=param)


# --- export -------------------------------------------------------------------------------------


def to_json(export: ChatExport) -> bytes:
    return orjson.dumps(export.model_dump(mode="json"), option=orjson.OPT_INDENT_2)


def active_path(conversation: ExportedConversation) -> list[ExportedMessage]:
    by_id = {m.id: m for m in conversation.messages}
    path: list[ExportedMessage] = []
    current = by_id.get(conversation.head_id) if conversation.head_id is not None else None
    while current is not None:
        path.append(current)
        current = by_id.get(current.parent_id) if current.parent_id is not None else None
    path.reverse()
    return path


def to_markdown(conversations: Sequence[ExportedConversation], display_names: dict[str, str]) -> str:
    """The active path of each conversation, for reading."""
    parts: list[str] = []
    for conversation in conversations:
        name = display_names.get(conversation.personality, conversation.personality)
        parts.append(f"# {conversation.title or 'Conversation with ' + name}\n")
        parts.append(
            f"*With {name} · started {conversation.created_at:%Y-%m-%d %H:%M} UTC · "
            f"last message {conversation.updated_at:%Y-%m-%d %H:%M} UTC*\n"
        )
        for message in active_path(conversation):
            who = "You" if message.role == "user" else name
            note = "" if message.status == "complete" else f" *({message.status})*"
            parts.append(f"**{who}** · {message.created_at:%Y-%m-%d %H:%M}{note}\n\n{message.content}\n")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


# --- import -------------------------------------------------------------------------------------


def _check_tree(conversation: ExportedConversation, where: str) -> ExportedConversation:
    seen: set[int] = set()
    for index, message in enumerate(conversation.messages):
        if message.id in seen:
            raise _invalid(f"Message id {message.id} appears twice.", f"{where}.messages[{index}].id")
        if message.parent_id is not None and message.parent_id not in seen:
            raise _invalid(
                f"Message {message.id} follows message {message.parent_id}, which does not come before it.",
                f"{where}.messages[{index}].parent_id",
            )
        seen.add(message.id)
    if conversation.head_id is not None and conversation.head_id not in seen:
        raise _invalid(f"head_id {conversation.head_id} is not one of the messages.", f"{where}.head_id")
    if conversation.head_id is None and conversation.messages:
        raise _invalid("A conversation with messages needs its head_id.", f"{where}.head_id")
    # Nothing is streaming in a file: a reply that was, is what was saved of it.
    messages = [
        m.model_copy(update={"status": "incomplete"}) if m.status == "streaming" else m for m in conversation.messages
    ]
    return conversation.model_copy(update={"messages": messages})


def _ours(document: dict[str, Any]) -> list[ExportedConversation]:
    try:
        export = ChatExport.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"]).replace(".[", "[")
        raise _invalid(f"`{field}` is not valid: {first['msg']}.", field) from None
    if len(export.conversations) > MAX_CONVERSATIONS:
        raise _invalid(f"At most {MAX_CONVERSATIONS} conversations per file.", "conversations")
    return [_check_tree(c, f"conversations[{i}]") for i, c in enumerate(export.conversations)]


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(part for part in parts if isinstance(part, str)).strip()
    text = content.get("text")
    return text.strip() if isinstance(text, str) else ""


def _when(value: Any, fallback: datetime) -> datetime:
    if isinstance(value, int | float) and 0 < value < 10**11:
        return datetime.fromtimestamp(value, UTC)
    return fallback


def _chatgpt_one(item: Any, where: str, personality: str, now: datetime) -> ExportedConversation:
    if not isinstance(item, dict) or not isinstance(item.get("mapping"), dict):
        raise _invalid("A ChatGPT conversation needs its `mapping` of nodes.", f"{where}.mapping")
    mapping: dict[str, Any] = item["mapping"]
    started = _when(item.get("create_time"), now)
    nodes: dict[str, dict[str, Any]] = {}
    for key, node in mapping.items():
        if not isinstance(node, dict):
            raise _invalid(f"Node {str(key)[:40]!r} is not an object.", f"{where}.mapping")
        nodes[str(key)] = node
    # Keep user and assistant messages with text; every other node (system, tool, hidden) is
    # skipped and its children follow its nearest kept ancestor.
    kept: dict[str, ExportedMessage] = {}
    new_parent: dict[str, str | None] = {}
    order = deque(k for k, n in nodes.items() if n.get("parent") is None or str(n.get("parent")) not in nodes)
    next_id = 1
    visited: set[str] = set()
    messages: list[ExportedMessage] = []
    while order:
        key = order.popleft()
        if key in visited:
            continue
        visited.add(key)
        node = nodes[key]
        parent_key = node.get("parent")
        parent_key = str(parent_key) if parent_key is not None and str(parent_key) in nodes else None
        anchor = parent_key if parent_key is None or parent_key in kept else new_parent.get(parent_key)
        message = node.get("message")
        role = (
            message.get("author", {}).get("role")
            if isinstance(message, dict) and isinstance(message.get("author"), dict)
            else None
        )
        text = _text_of(message) if isinstance(message, dict) else ""
        if role in ("user", "assistant") and text and isinstance(message, dict):
            try:
                check_text(text)
            except ValueError as error:
                raise _invalid(f"A message's text is not acceptable: {error}.", f"{where}.mapping.{key[:40]}") from None
            stored = ExportedMessage(
                id=next_id,
                parent_id=kept[anchor].id if anchor is not None else None,
                role=role,
                content=text[:MAX_MESSAGE_CHARS],
                status="complete",
                created_at=_when(message.get("create_time"), started),
            )
            kept[key] = stored
            messages.append(stored)
            next_id += 1
        else:
            new_parent[key] = anchor
        children = node.get("children") or []
        if isinstance(children, list):
            order.extend(str(child) for child in children if str(child) in nodes)
    current = item.get("current_node")
    head: int | None = None
    cursor = str(current) if current is not None and str(current) in nodes else None
    while cursor is not None and head is None:
        if cursor in kept:
            head = kept[cursor].id
        else:
            parent = nodes[cursor].get("parent")
            cursor = str(parent) if parent is not None and str(parent) in nodes else None
    if head is None and messages:
        head = messages[-1].id
    title = item.get("title")
    title = " ".join(title.split())[:200] if isinstance(title, str) and title.strip() else None
    return ExportedConversation(
        title=title,
        personality=personality,
        created_at=started,
        updated_at=_when(item.get("update_time"), max([started, *(m.created_at for m in messages)])),
        head_id=head,
        messages=messages,
    )


def _chatgpt(document: Any, personality: str, now: datetime) -> list[ExportedConversation]:
    items = document if isinstance(document, list) else [document]
    if len(items) > MAX_CONVERSATIONS:
        raise _invalid(f"At most {MAX_CONVERSATIONS} conversations per file.")
    return [_chatgpt_one(item, f"[{index}]", personality, now) for index, item in enumerate(items)]


def parse_import(raw: bytes, *, personality: str, now: datetime) -> list[ExportedConversation]:
    """Conversations from our JSON export or a ChatGPT `conversations.json` (those are given to
    `personality`). Raises InvalidInput (422 `invalid_import` or `import_too_large`)."""
    if len(raw) > MAX_IMPORT_BYTES:
        raise InvalidInput(
            f"The file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB.", code="import_too_large", param="file"
        )
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise _invalid(f"The file is not valid JSON ({error}).") from None
    if isinstance(document, dict) and "format" in document:
        if document.get("format") != FORMAT:
            raise _invalid(f"Unknown format {str(document.get('format'))[:40]!r}.", "format")
        conversations = _ours(document)
    elif isinstance(document, list) or (isinstance(document, dict) and "mapping" in document):
        conversations = _chatgpt(document, personality, now)
    else:
        raise _invalid("Expected a companion export or a ChatGPT conversations.json.")
    if sum(len(c.messages) for c in conversations) > MAX_MESSAGES:
        raise InvalidInput(f"At most {MAX_MESSAGES} messages per file.", code="import_too_large", param="file")
    return conversations
