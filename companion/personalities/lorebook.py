"""A character card's lorebook at prompt time: the entries whose keys appear in the recent
messages (or that are constant) go into the prompt, within a token budget.

Matching is plain substring search (case-insensitive unless the entry says otherwise); a
`selective` entry also needs one of its `secondary_keys`. Entries with `use_regex` never match:
a card's pattern would run on the shared event loop, where one catastrophic backtrack stalls every
user's reply, and the V3 spec allows treating a pattern it cannot use as no match. Over budget, the
lowest `priority` goes first (then the highest `insertion_order`); what is kept is inserted by
`insertion_order`. `@@decorator` lines (V3) are removed from the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from companion.interchange.cards import Lorebook, LoreEntry
from companion.llm.base import estimate_tokens

DEFAULT_SCAN_DEPTH = 4


@dataclass(frozen=True)
class Lore:
    before: list[str]  # goes before the character's definition
    after: list[str]  # and after it (the default)


def _contains(text: str, key: str, case_sensitive: bool) -> bool:
    key = key.strip()
    if not key:
        return False
    return key in text if case_sensitive else key.casefold() in text.casefold()


def _matches(entry: LoreEntry, text: str) -> bool:
    if not entry.enabled or entry.use_regex or not entry.content.strip():
        return False
    if entry.constant:
        return True
    sensitive = bool(entry.case_sensitive)
    if not any(_contains(text, key, sensitive) for key in entry.keys):
        return False
    if entry.selective and entry.secondary_keys:
        return any(_contains(text, key, sensitive) for key in entry.secondary_keys)
    return True


def _text(entry: LoreEntry) -> str:
    return "\n".join(line for line in entry.content.splitlines() if not line.lstrip().startswith("@@")).strip()


def select(book: Lorebook | None, recent: Sequence[str], *, budget: int) -> Lore:
    """The entries to insert, given the recent messages (oldest first) and at most `budget` tokens
    (the book's own `token_budget` when smaller)."""
    if book is None or not book.entries:
        return Lore([], [])
    depth = book.scan_depth if book.scan_depth is not None else DEFAULT_SCAN_DEPTH
    text = "\n".join(recent[-depth:]) if depth > 0 else ""
    if book.token_budget is not None:
        budget = min(budget, book.token_budget)
    matched = [entry for entry in book.entries if _matches(entry, text)]
    # Most important first: higher priority, then lower insertion order.
    ranked = sorted(matched, key=lambda e: (-(e.priority or 0), e.insertion_order))
    kept: list[LoreEntry] = []
    for entry in ranked:
        cost = estimate_tokens(_text(entry)) + 1
        if cost > budget:
            continue
        kept.append(entry)
        budget -= cost
    kept.sort(key=lambda e: e.insertion_order)
    before = [_text(e) for e in kept if e.position == "before_char"]
    after = [_text(e) for e in kept if e.position != "before_char"]
    return Lore(before, after)
