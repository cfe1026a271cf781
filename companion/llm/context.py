"""The context block a prompt's newest user message may begin with (notes the service adds: long-term
memories, the running summary), and how to tell it from what the user typed. Built by
companion/chat/prompt.py; here so that a provider (the scripted one echoes the user) can read it too."""

from __future__ import annotations

CONTEXT_OPEN = "<context>"
CONTEXT_CLOSE = "</context>"


def split_context(content: str) -> tuple[str, str]:
    """(context block, the user's own message) of a prompt message; the block is "" if none."""
    if content.startswith(CONTEXT_OPEN + "\n"):
        end = content.find("\n" + CONTEXT_CLOSE + "\n\n")
        if end != -1:
            cut = end + len(CONTEXT_CLOSE) + 3
            return content[:cut], content[cut:]
    return "", content
