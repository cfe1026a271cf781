"""Episodes: what the user said, kept verbatim, split into passages of one sentence or a few
(never cut inside a sentence), each of which is embedded, indexed and recalled on its own."""

from __future__ import annotations

import re

from companion.memory.extract import sentences

# A passage groups consecutive sentences up to this many characters: short enough that one
# embedding still stands for it (our tokenizer gives MiniLM at most 128 word pieces), long enough that "She loves it
# there." keeps the sentence it refers to. A single longer sentence is one passage by itself.
PASSAGE_CHARS = 200
# Nothing worth remembering: a sentence made only of these words (greetings, thanks, laughter,
# yes and no, reactions) is small talk.
_SMALL_TALK = frozenset(
    """hi hey hello yo hiya heya morning good evening night afternoon thanks thank you thx ty ok okay k kk cool nice
    great awesome sure yes yeah yep yup no nope nah lol lmao haha hahaha hehe hmm hmmm wow oh ah aw aww bye goodbye
    see ya later fine alright right true same me too i sounds got it that s thats is it its so very really much all
    amazing funny interesting perfect wonderful lovely totally agree exactly indeed well glad to hear love this
    cute omg wait what oops sorry np worries problem welcome mean a the and just of course definitely absolutely
    makes sense""".split()
)
_WORD = re.compile(r"[^\W_]+")


def worth_keeping(sentence: str) -> bool:
    """False for a sentence that says nothing lasting: small talk, a question (what the user asks
    is rarely what they will want recalled, and keeping every question would change the user's
    memories on every turn), or fewer than three words."""
    words = [word.lower() for word in _WORD.findall(sentence)]
    return (
        len(words) >= 3
        and not all(word in _SMALL_TALK for word in words)
        and not sentence.rstrip("\"')»”").endswith("?")
    )


def passages(message: str, *, limit: int = PASSAGE_CHARS) -> list[str]:
    """The passages of `message` worth keeping, in order: runs of consecutive sentences of which at
    least one is worth keeping (the others stay for context)."""
    grouped: list[str] = []
    current = ""
    for sentence in sentences(message):
        if current and len(current) + 1 + len(sentence) > limit:
            grouped.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        grouped.append(current)
    return [passage for passage in grouped if any(worth_keeping(s) for s in sentences(passage))]
