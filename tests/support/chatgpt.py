"""A ChatGPT `conversations.json` shaped like a real export: a `mapping` of nodes with a hidden
system root, a regenerated (branched) reply, a tool message and multimodal parts."""

from __future__ import annotations

from typing import Any


def _node(
    node_id: str, parent: str | None, children: list[str], role: str | None, parts: list[Any], t: float
) -> dict[str, Any]:
    message = None
    if role is not None:
        message = {
            "id": node_id,
            "author": {"role": role, "name": None, "metadata": {}},
            "create_time": t,
            "update_time": None,
            "content": {"content_type": "text", "parts": parts},
            "status": "finished_successfully",
            "end_turn": True,
            "weight": 1.0,
            "metadata": {"is_visually_hidden_from_conversation": role == "system"},
            "recipient": "all",
        }
    return {"id": node_id, "message": message, "parent": parent, "children": children}


def conversations_json() -> list[dict[str, Any]]:
    t = 1_730_000_000.0
    mapping = {
        "root": _node("root", None, ["sys"], None, [], t),
        "sys": _node("sys", "root", ["u1"], "system", [""], t),
        "u1": _node("u1", "sys", ["a1", "a1b"], "user", ["What should I plant in October?"], t + 10),
        "a1": _node("a1", "u1", [], "assistant", ["Garlic and tulip bulbs."], t + 20),
        "a1b": _node("a1b", "u1", ["tool"], "assistant", ["Try garlic."], t + 30),
        "tool": _node("tool", "a1b", ["u2"], "tool", ["search results"], t + 35),
        "u2": _node("u2", "tool", ["a2"], "user", ["And in pots?", {"content_type": "image_asset_pointer"}], t + 40),
        "a2": _node("a2", "u2", [], "assistant", ["Pansies do well in pots."], t + 50),
    }
    return [
        {
            "title": "Autumn garden",
            "create_time": t,
            "update_time": t + 50,
            "mapping": mapping,
            "moderation_results": [],
            "current_node": "a2",
            "conversation_id": "6f1c-real-looking",
            "default_model_slug": "gpt-4o",
        },
        {
            "title": "Empty one",
            "create_time": t + 100,
            "update_time": t + 100,
            "mapping": {"r": _node("r", None, [], None, [], t + 100)},
            "current_node": "r",
        },
    ]
