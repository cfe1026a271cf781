"""Recall quality: 36 facts a user states in passing, each followed later by a question that needs
it. All facts are extracted by the deterministic rules (the path a small local model relies on) into
one user's memories; each question must find its fact among the top 3 (recall@3 ≥ 0.9)."""

from __future__ import annotations

import pytest

from companion.services import Services

PAIRS: list[tuple[str, str]] = [
    ("My sister Ana lives in Berlin.", "Where does my sister live?"),
    ("My name is Tomás.", "What is my name?"),
    ("I'm allergic to peanuts.", "Is there any food I should avoid?"),
    ("I work as a nurse at the children's hospital.", "What do I do for a living?"),
    ("My dog is called Biscuit.", "What's my dog's name?"),
    ("I grew up in a small village near Porto.", "Where did I grow up?"),
    ("My favorite band is Radiohead.", "Which band do I like most?"),
    ("Next month I'm flying to Tokyo for a conference.", "Where am I travelling next month?"),
    ("I play the cello in a community orchestra.", "Which instrument do I play?"),
    ("My husband Leo is a chef.", "What does my husband do?"),
    ("I'm vegetarian.", "Do I eat meat?"),
    ("I have two daughters, Mia and Zoe.", "What are my kids called?"),
    ("I hate horror movies.", "What kind of films do I dislike?"),
    ("My birthday is on March 3rd.", "When is my birthday?"),
    ("I studied physics at the University of Warsaw.", "What did I study at university?"),
    ("I'm learning Japanese on weekends.", "Which language am I learning?"),
    ("My best friend Karim moved to Montreal.", "Where does Karim live now?"),
    ("I love hiking in the Alps.", "What do I like to do outdoors?"),
    ("I drive an old red Volvo.", "What car do I have?"),
    ("My mother is recovering from knee surgery.", "How is my mom's health?"),
    ("I'm training for the Berlin marathon in September.", "What race am I preparing for?"),
    ("My favorite food is spicy ramen.", "What's my favourite dish?"),
    ("I live in a flat in Lisbon with two cats.", "Which city do I live in?"),
    ("I'm afraid of flying.", "How do I feel about planes?"),
    ("My brother Jonas is getting married in June.", "Whose wedding is coming up?"),
    ("I collect vintage postcards.", "What's my hobby as a collector?"),
    ("I'm 34 years old.", "How old am I?"),
    ("I prefer tea over coffee.", "Which hot drink do I prefer?"),
    ("My partner and I are planning to buy a house.", "What big purchase am I planning?"),
    ("I speak Portuguese and German.", "Which languages do I speak?"),
    ("My cat Luna is afraid of the vacuum cleaner.", "What scares my cat?"),
    ("I'm a huge fan of Formula 1.", "Which sport do I follow?"),
    ("I broke my wrist skiing last winter.", "Have I had any injuries?"),
    ("My grandfather was a fisherman in Norway.", "What did my grandpa do for work?"),
    ("I'm moving to Amsterdam in the spring.", "Where am I relocating?"),
    ("I don't like mushrooms.", "Which food don't I like?"),
]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_recall_at_3_is_at_least_0_9(services: Services) -> None:
    user = (await services.users.create("recall")).id
    source: dict[int, str] = {}
    for message_id, (fact, _) in enumerate(PAIRS, start=1):
        kept = await services.memories.extract(user, None, message_id, fact)
        assert kept, f"no memory extracted from {fact!r}"
        source[message_id] = fact
    assert len(await services.memories.list(user, limit=500, scope="facts")) == len(PAIRS)  # no fact merged into another
    assert len(await services.memories.list(user, limit=500, scope="episodes")) == len(PAIRS)

    misses = []
    for message_id, (fact, question) in enumerate(PAIRS, start=1):
        top = await services.memories.search(user, question, limit=3)
        if message_id not in [m.source_message_id for m in top]:
            misses.append((question, fact, [m.text for m in top]))
    recall = 1 - len(misses) / len(PAIRS)
    assert recall >= 0.9, f"recall@3 = {recall:.2f}; misses:\n" + "\n".join(map(str, misses))
