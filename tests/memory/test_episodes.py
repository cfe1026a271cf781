"""Episodes: a message split into passages of whole sentences, small talk and questions left out."""

from __future__ import annotations

from companion.memory.episodes import passages


def test_passages_are_whole_sentences_grouped_up_to_the_limit() -> None:
    message = (
        "We're driving up the coast next weekend for our anniversary. It will be our fifth. "
        "Dr. Mills said St. Ives is lovely, and the 3.5 hour drive is fine. My wife loves seafood."
    )
    found = passages(message, limit=90)
    assert found == [
        "We're driving up the coast next weekend for our anniversary. It will be our fifth.",
        "Dr. Mills said St. Ives is lovely, and the 3.5 hour drive is fine. My wife loves seafood.",
    ]
    assert " ".join(found) == message  # nothing lost, nothing cut inside a sentence
    long = "I " + "really " * 80 + "like long sentences."
    assert passages(long, limit=50) == [long]  # a sentence longer than the limit is kept whole


def test_small_talk_and_questions_are_not_episodes() -> None:
    for message in ["Hi!", "hey lol ok", "Thanks, that's great!", "Where does my sister live?", "ok. sure. thx"]:
        assert passages(message) == [], message
    # A question beside something said stays with it, for context.
    assert passages("Hi! I'm vegetarian. What's for dinner?") == ["Hi! I'm vegetarian. What's for dinner?"]
