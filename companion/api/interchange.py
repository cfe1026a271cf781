"""Files in and out: character cards (import as a personality, export as V2 JSON or PNG), chat
exports (JSON or Markdown, one conversation or all) and imports (ours, or ChatGPT's), and the
user's token usage. The formats live in companion.interchange; these routes only read the body,
call them and store or send the result."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from starlette.responses import JSONResponse

from companion.api.deps import ServicesDep, UserIdDep
from companion.conversations.schemas import ConversationOut
from companion.errors import InvalidInput, NotFound
from companion.interchange import cards, chats
from companion.personalities.schemas import PersonalityOut
from companion.ratelimit.usage import UsageReport, UsageService
from companion.services import Services
from companion.types import PersonalityName, is_valid_name

router = APIRouter(prefix="/v1", tags=["import and export"])

UPLOAD_LIMITS = {
    "/v1/personalities/import": cards.MAX_CARD_BYTES,
    "/v1/conversations/import": chats.MAX_IMPORT_BYTES,
}
CARD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "description": "A V1, V2 or V3 character card."}},
            "image/png": {"schema": {"type": "string", "format": "binary", "description": "A card PNG."}},
        },
    }
}
IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "Our export (GET /v1/conversations/export) or ChatGPT's conversations.json.",
                }
            }
        },
    }
}


# --- character cards ----------------------------------------------------------------------------


@router.post("/personalities/import", status_code=201, response_model=PersonalityOut, openapi_extra=CARD_BODY)
async def import_card(
    request: Request,
    user_id: UserIdDep,
    services: ServicesDep,
    name: Annotated[
        PersonalityName | None,
        Query(max_length=40, description="The personality's name (default: made from the card's name)."),
    ] = None,
) -> PersonalityOut:
    """Create your own personality from a character card: V1, V2 or V3 JSON, or a PNG with the card
    in its `chara` or `ccv3` text chunk (`ccv3` wins). A malformed card is a 422 whose `param`
    names the field."""
    parsed = cards.parse_card(await request.body())
    return await services.personalities.import_card(user_id, parsed, name)


@router.get(
    "/personalities/{name}/export",
    responses={200: {"content": {"application/json": {}, "image/png": {}}, "description": "The card."}},
)
async def export_card(
    name: str,
    user_id: UserIdDep,
    services: ServicesDep,
    format: Annotated[
        Literal["json", "png"] | None,
        Query(
            description="json (Character Card V2) or png (the card in its picture); default: png if one was imported."
        ),
    ] = None,
) -> Response:
    """A personality as a character card: what was imported comes back, unknown fields included."""
    card, avatar = await services.personalities.card_of(user_id, name)
    filename = cards.slug(card.data.name)
    if format == "png" or (format is None and avatar is not None):
        return Response(
            cards.to_png(card, avatar),
            media_type="image/png",
            headers={"Content-Disposition": f'attachment; filename="{filename}.png"'},
        )
    return Response(
        orjson.dumps(cards.to_v2(card), option=orjson.OPT_INDENT_2),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{filename}.json"'},
    )


# --- conversations ------------------------------------------------------------------------------

ExportFormat = Annotated[
    Literal["json", "markdown"],
    Query(description="json: complete (the tree, statuses, times, usage); markdown: the active path, to read."),
]


async def _export(services: Services, user_id: uuid.UUID, conversation_id: uuid.UUID | None, fmt: str) -> Response:
    conversations = await services.conversations.export(user_id, conversation_id)
    stem = f"conversation-{conversation_id}" if conversation_id else "conversations"
    if fmt == "markdown":
        names = {p.name: p.display_name for p in await services.personalities.list_visible(user_id)}
        return Response(
            chats.to_markdown(conversations, names),
            media_type="text/markdown; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{stem}.md"'},
        )
    export = chats.ChatExport(exported_at=services.clock(), conversations=conversations)
    return Response(
        chats.to_json(export),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{stem}.json"'},
    )


@router.get("/conversations/export", responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
async def export_conversations(user_id: UserIdDep, services: ServicesDep, format: ExportFormat = "json") -> Response:
    """All your conversations in one file."""
    return await _export(services, user_id, None, format)


@router.get(
    "/conversations/{conversation_id}/export",
    responses={200: {"content": {"application/json": {}, "text/markdown": {}}}},
)
async def export_conversation(
    conversation_id: uuid.UUID, user_id: UserIdDep, services: ServicesDep, format: ExportFormat = "json"
) -> Response:
    return await _export(services, user_id, conversation_id, format)


@router.post("/conversations/import", status_code=201, response_model=list[ConversationOut], openapi_extra=IMPORT_BODY)
async def import_conversations(
    request: Request,
    user_id: UserIdDep,
    services: ServicesDep,
    personality: Annotated[
        str, Query(max_length=40, description="Who a ChatGPT conversation continues with (ours name theirs).")
    ] = "elara",
) -> JSONResponse:
    """Import our JSON export (each conversation comes back whole, with new ids) or a ChatGPT
    `conversations.json`. The whole file is checked first; a bad one stores nothing."""
    if not is_valid_name(personality):
        raise InvalidInput("Not a personality name.", param="personality")
    conversations = chats.parse_import(await request.body(), personality=personality, now=services.clock())
    for index, conversation in enumerate(conversations):
        try:
            await services.personalities.resolve(user_id, conversation.personality)
        except NotFound:
            raise InvalidInput(
                f"There is no personality named {conversation.personality!r} to continue this conversation with; "
                "create it first.",
                code="personality_not_found",
                param=f"conversations[{index}].personality",
            ) from None
    created = await services.conversations.import_(user_id, conversations)
    return JSONResponse([c.model_dump(mode="json") for c in created], status_code=201)


# --- usage --------------------------------------------------------------------------------------


@router.get("/usage", response_model=UsageReport)
async def usage(
    user_id: UserIdDep,
    services: ServicesDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
    months: Annotated[int, Query(ge=1, le=36)] = 12,
) -> UsageReport:
    """Your tokens per UTC day and month (every reply's prompt and completion tokens), against your
    daily and monthly quotas."""
    report = UsageService(
        services.database, services.quotas, context_tokens=services.settings.llm_context_size, clock=services.clock
    )
    return await report.report(user_id, days=days, months=months)
