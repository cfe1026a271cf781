"""Character card files shaped like the ones people download (chub.ai, SillyTavern exports),
built in the tests: V1 root fields, V2 and V3 JSON, and PNGs carrying them in text chunks."""

from __future__ import annotations

import base64
import copy
from typing import Any

import orjson

from companion.interchange import png

LOREBOOK: dict[str, Any] = {
    "name": "Harbor lore",
    "scan_depth": 4,
    "token_budget": 200,
    "recursive_scanning": False,
    "extensions": {},
    "entries": [
        {
            "keys": ["lighthouse", "beacon"],
            "content": "The lighthouse on Gull Rock has been dark since the storm of '09.",
            "extensions": {"depth": 4, "weight": 10},
            "enabled": True,
            "insertion_order": 100,
            "case_sensitive": False,
            "name": "Lighthouse",
            "priority": 10,
            "id": 0,
            "comment": "",
            "selective": False,
            "secondary_keys": [],
            "constant": False,
            "position": "after_char",
        },
        {
            "keys": ["Marguerite"],
            "content": "@@depth 2\nMarguerite runs the fish market and owes {{char}} a favour.",
            "extensions": {},
            "enabled": True,
            "insertion_order": 50,
            "position": "before_char",
        },
        {
            "keys": ["treasure"],
            "content": "There is no treasure; it was always a story for {{user}}.",
            "extensions": {},
            "enabled": False,
            "insertion_order": 10,
        },
    ],
}

V2: dict[str, Any] = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Captain Mira Vale",
        "description": "{{char}} is a retired sea captain who runs a tea shop by the harbor. She calls {{user}} 'sailor'.",
        "personality": "gruff, warm, nostalgic",
        "scenario": "{{user}} walks into {{char}}'s tea shop on a rainy evening.",
        "first_mes": "*{{char}} looks up from the counter.* Evening, {{user}}. Tea or a story?",
        "mes_example": "<START>\n{{user}}: Any news?\n{{char}}: *snorts* The gulls know more than I do.",
        "creator_notes": "Best with long replies. SECRET-CREATOR-NOTE",
        "system_prompt": "{{original}} Never break character.",
        "post_history_instructions": "Keep {{char}}'s replies under 80 words.",
        "alternate_greetings": ["*{{char}} is asleep in her chair.* Mm? Oh, {{user}}.", "Closed! ...oh, it's you."],
        "character_book": LOREBOOK,
        "tags": ["SECRET-TAG", "slice of life"],
        "creator": "SECRET-CREATOR",
        "character_version": "1.2",
        "extensions": {"talkativeness": "0.5", "fav": False, "world": "", "depth_prompt": {"prompt": "", "depth": 4}},
    },
}


def v2(**changes: Any) -> dict[str, Any]:
    card = copy.deepcopy(V2)
    card["data"].update(changes)
    return card


def v3(**changes: Any) -> dict[str, Any]:
    card = copy.deepcopy(V2)
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"].update(
        {
            "nickname": "Cap",
            "group_only_greetings": [],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
            "source": ["https://example.invalid/cards/mira"],
            "creation_date": 1700000000,
            "modification_date": 1700000500,
        }
    )
    card["data"].update(changes)
    return card


def v1() -> dict[str, Any]:
    """A TavernAI V1 card: the six fields at the root, old-style <USER>/<BOT> macros."""
    return {
        "name": "Old Tom",
        "description": "<BOT> is a lighthouse keeper who talks to <USER> about the sea.",
        "personality": "quiet",
        "scenario": "",
        "first_mes": "Ahoy, <USER>.",
        "mes_example": "",
    }


def as_json(card: dict[str, Any]) -> bytes:
    return orjson.dumps(card)


def as_png(
    *, chara: dict[str, Any] | None = None, ccv3: dict[str, Any] | None = None, picture: bytes | None = None
) -> bytes:
    texts = {}
    if chara is not None:
        texts["chara"] = base64.b64encode(orjson.dumps(chara)).decode()
    if ccv3 is not None:
        texts["ccv3"] = base64.b64encode(orjson.dumps(ccv3)).decode()
    return png.with_text(picture or png.minimal_png(3, 2, (10, 20, 30)), texts)
