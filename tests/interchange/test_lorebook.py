"""A card's lorebook in the prompt: entries whose keys appear in the recent messages, within the
token budget, in insertion order, before or after the character's definition."""

from __future__ import annotations

from companion.interchange.cards import Lorebook
from companion.personalities import lorebook
from tests.support import cards as files


def _book(**changes: object) -> Lorebook:
    return Lorebook.model_validate({**files.LOREBOOK, **changes})


def test_an_entry_whose_key_appears_recently_is_inserted():
    lore = lorebook.select(_book(), ["hello", "Is the LIGHTHOUSE still dark?"], budget=500)
    assert lore.after == ["The lighthouse on Gull Rock has been dark since the storm of '09."]
    assert lore.before == []


def test_nothing_matches_nothing_is_inserted_and_disabled_entries_never_are():
    assert lorebook.select(_book(), ["tell me about the weather"], budget=500) == lorebook.Lore([], [])
    assert lorebook.select(_book(), ["where is the treasure?"], budget=500) == lorebook.Lore([], [])


def test_only_the_last_scan_depth_messages_are_scanned():
    history = ["the lighthouse!", "a", "b", "c", "d"]
    assert lorebook.select(_book(scan_depth=4), history, budget=500).after == []
    assert lorebook.select(_book(scan_depth=5), history, budget=500).after != []


def test_position_decorators_and_order():
    lore = lorebook.select(_book(), ["Marguerite mentioned the beacon"], budget=500)
    assert lore.before == ["Marguerite runs the fish market and owes {{char}} a favour."]
    assert len(lore.after) == 1


def test_the_budget_keeps_the_higher_priority_entry():
    entries = [
        {"keys": ["a"], "content": "low " * 30, "priority": 1, "insertion_order": 1},
        {"keys": ["a"], "content": "high " * 30, "priority": 5, "insertion_order": 2},
    ]
    lore = lorebook.select(Lorebook.model_validate({"entries": entries}), ["a"], budget=60)
    assert lore.after == [("high " * 30).strip()]


def test_the_books_own_budget_applies_when_smaller():
    lore = lorebook.select(_book(token_budget=5), ["lighthouse"], budget=500)
    assert lore.after == []


def test_constant_and_selective_entries():
    entries = [
        {"keys": [], "content": "Always here.", "constant": True},
        {"keys": ["ship"], "content": "Needs both.", "selective": True, "secondary_keys": ["storm"]},
        {"keys": ["ship"], "content": "Regex never runs.", "use_regex": True},
    ]
    book = Lorebook.model_validate({"entries": entries})
    assert lorebook.select(book, ["a ship"], budget=500).after == ["Always here."]
    assert lorebook.select(book, ["a ship in a storm"], budget=500).after == ["Always here.", "Needs both."]


def test_case_sensitive_entries():
    book = Lorebook.model_validate({"entries": [{"keys": ["Rex"], "content": "Rex is a dog.", "case_sensitive": True}]})
    assert lorebook.select(book, ["rex"], budget=500).after == []
    assert lorebook.select(book, ["Rex"], budget=500).after == ["Rex is a dog."]
