"""Character cards, the format companion front-ends exchange characters in: Character Card V1 (the
fields at the root), V2 (`chara_card_v2`) and V3 (`chara_card_v3`), as JSON or inside a PNG's
`chara` / `ccv3` text chunk (base64 JSON; `ccv3` wins when both are there).

`parse_card` turns a file into a `CharacterCard` (or raises InvalidInput naming the bad field);
`to_v2` / `to_png` give it back. Everything a card carries is kept, including fields and
`extensions` this service does not use, so that an export returns what came in.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from companion.errors import InvalidInput
from companion.interchange import png
from companion.types import check_text

MAX_CARD_BYTES = 8 * 1024 * 1024  # a PNG card is mostly its picture
MAX_TEXT_CHARS = 100_000
CARD_CHUNKS = ("ccv3", "chara")  # in order of preference

CardText = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(check_text)]
ShortText = Annotated[str, Field(max_length=1000), AfterValidator(check_text)]
Number = int | float


class LoreEntry(BaseModel):
    """One lorebook entry (V2 and V3 fields; unknown ones are kept)."""

    model_config = ConfigDict(extra="allow")

    keys: Annotated[list[ShortText], Field(max_length=200)] = Field(default_factory=list)
    content: CardText = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: Number = 0
    case_sensitive: bool | None = None
    use_regex: bool | None = None
    constant: bool | None = None
    name: str | None = None
    priority: Number | None = None
    id: int | str | None = None
    comment: str | None = None
    selective: bool | None = None
    secondary_keys: Annotated[list[ShortText], Field(max_length=200)] | None = None
    position: str | None = None


class Lorebook(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    description: str | None = None
    scan_depth: Annotated[int, Field(ge=0, le=1000)] | None = None
    token_budget: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = Field(default_factory=dict)
    entries: Annotated[list[LoreEntry], Field(max_length=5000)] = Field(default_factory=list)


class CardData(BaseModel):
    """The card's `data` (a V1 card's root). Fields this service does not know are kept."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_text)]
    description: CardText = ""
    personality: CardText = ""
    scenario: CardText = ""
    first_mes: CardText = ""
    mes_example: CardText = ""
    creator_notes: CardText = ""
    system_prompt: CardText = ""
    post_history_instructions: CardText = ""
    alternate_greetings: Annotated[list[CardText], Field(max_length=100)] = Field(default_factory=list)
    character_book: Lorebook | None = None
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    nickname: Annotated[str, Field(max_length=200), AfterValidator(check_text)] | None = None


class CharacterCard(BaseModel):
    """A card as stored with its personality: where it came from (`spec`) and its data."""

    model_config = ConfigDict(frozen=True)

    spec: str  # chara_card_v1 (root fields) | chara_card_v2 | chara_card_v3
    spec_version: str | None = None
    data: CardData
    has_avatar: bool = False  # it came as a PNG, whose picture is kept for the export


@dataclass(frozen=True)
class ParsedCard:
    card: CharacterCard
    avatar: bytes | None  # the PNG it came in, without its card chunks


def _invalid(message: str, param: str = "file") -> InvalidInput:
    return InvalidInput(message, code="invalid_card", param=param)


def parse_card(raw: bytes) -> ParsedCard:
    """A card from a JSON or PNG file. Raises InvalidInput (422 `invalid_card` or
    `card_too_large`) whose `param` names the field at fault."""
    if len(raw) > MAX_CARD_BYTES:
        raise InvalidInput(
            f"The card file is larger than {MAX_CARD_BYTES // (1024 * 1024)} MiB.", code="card_too_large", param="file"
        )
    avatar: bytes | None = None
    if png.is_png(raw):
        try:
            texts = png.text_chunks(raw)
            avatar = png.with_text(raw, {}, remove=CARD_CHUNKS)
        except png.PngError as error:
            raise _invalid(f"The PNG could not be read: {error}.") from None
        chunk = next((name for name in CARD_CHUNKS if name in texts), None)
        if chunk is None:
            raise _invalid("The PNG carries no character card (no `ccv3` or `chara` text chunk).")
        try:
            text = base64.b64decode(texts[chunk], validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _invalid(f"The PNG's `{chunk}` chunk is not base64-encoded UTF-8 JSON.", chunk) from None
        source = chunk
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _invalid("The card is neither a PNG nor UTF-8 JSON.") from None
        source = "file"
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise _invalid(f"The card is not valid JSON ({error}).", source) from None
    card = card_from_json(document)
    if avatar is not None:
        card = card.model_copy(update={"has_avatar": True})
    return ParsedCard(card=card, avatar=avatar)


def card_from_json(document: Any) -> CharacterCard:
    """A card from its decoded JSON: V2/V3 (`spec` and `data`) or V1 (fields at the root)."""
    if not isinstance(document, dict):
        raise _invalid("The card must be a JSON object.")
    spec = document.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data, prefix = document.get("data"), "data."
        if not isinstance(data, dict):
            raise _invalid(f"A `{spec}` card needs a `data` object.", "data")
    elif spec is None:
        data, prefix, spec = document, "", "chara_card_v1"
    else:
        raise _invalid(f"Unknown card spec {str(spec)[:40]!r}; expected chara_card_v2 or chara_card_v3.", "spec")
    try:
        card_data = CardData.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = prefix + ".".join(str(part) for part in first["loc"])
        raise _invalid(f"The card's `{field}` is not valid: {first['msg']}.", field) from None
    if not card_data.name.strip():
        raise _invalid("The card's name is empty.", prefix + "name")
    version = document.get("spec_version")
    return CharacterCard(spec=spec, spec_version=version if isinstance(version, str) else None, data=card_data)


def _dump(card: CharacterCard) -> dict[str, Any]:
    return card.data.model_dump(mode="json", exclude_none=True)


def to_v2(card: CharacterCard) -> dict[str, Any]:
    """The card as Character Card V2 JSON (fields V2 does not define are kept in `data`)."""
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": _dump(card)}


def to_v3(card: CharacterCard) -> dict[str, Any]:
    data = _dump(card)
    data.setdefault("group_only_greetings", [])
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def _b64(document: dict[str, Any]) -> str:
    return base64.b64encode(orjson.dumps(document)).decode("ascii")


def to_png(card: CharacterCard, avatar: bytes | None) -> bytes:
    """The card inside its picture (or a plain one): V2 in `chara`, V3 in `ccv3`."""
    return png.with_text(avatar or png.minimal_png(), {"chara": _b64(to_v2(card)), "ccv3": _b64(to_v3(card))})


# --- from card to personality ------------------------------------------------------------------

_CHAR = re.compile(r"\{\{char\}\}|<BOT>|<CHAR>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
DEFAULT_SYSTEM_PROMPT = (
    "You are {{char}}. Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}. "
    "Stay in character."
)


def character_name(data: CardData) -> str:
    """The name `{{char}}` stands for (V3: the nickname, when there is one)."""
    return (data.nickname or data.name).strip()


def fill_char(text: str, char: str) -> str:
    return _CHAR.sub(lambda _: char, text)


def fill_user(text: str, user: str) -> str:
    return _USER.sub(lambda _: user, text)


def system_prompt(data: CardData) -> str:
    """The personality's system prompt made from the card: its own system prompt (or a default;
    `{{original}}` stands for the default), then description, personality, scenario and example
    dialogue. `{{char}}` is filled in; `{{user}}` stays, filled per user when the prompt is built.
    creator_notes, tags, creator and character_version never go in."""
    own = data.system_prompt.strip()
    parts = [own.replace("{{original}}", DEFAULT_SYSTEM_PROMPT) if own else DEFAULT_SYSTEM_PROMPT]
    if data.description.strip():
        parts.append(data.description.strip())
    if data.personality.strip():
        parts.append(f"{{{{char}}}}'s personality: {data.personality.strip()}")
    if data.scenario.strip():
        parts.append(f"Scenario: {data.scenario.strip()}")
    if data.mes_example.strip():
        examples = data.mes_example.replace("<START>", "").strip()
        parts.append(f"Examples of how {{{{char}}}} talks:\n{examples}")
    return fill_char("\n\n".join(parts), character_name(data))


def greetings(data: CardData) -> list[str]:
    """The greeting first, then the alternates; `{{char}}` filled in, empty ones left out."""
    char = character_name(data)
    return [fill_char(text, char) for text in [data.first_mes, *data.alternate_greetings] if text.strip()]


def blurb(data: CardData) -> str:
    """One line for lists of personalities: the creator's notes (shown to people, never to the
    model), else the description."""
    text = " ".join((data.creator_notes or data.description or data.name).split())
    text = fill_char(text, character_name(data))
    return text if len(text) <= 500 else text[:499] + "…"


def slug(name: str) -> str:
    """A personality name from a card's name: "Dr. Élise Moreau" -> "dr-elise-moreau"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    value = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:40].strip("-")
    return value or "character"
