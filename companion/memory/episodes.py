"""Episodes: what the user said, kept verbatim, split into passages of one sentence or a few
(never cut inside a sentence), each of which is embedded, indexed and recalled on its own."""

from __future__ import annotations

import re

from companion.memory.extract import sentences

# A passage groups consecutive sentences up to this many characters: short enough that one
# embedding still stands for it (MiniLM reads about 256 word pieces), long enough that "She loves it
# there." keeps the sentence it refers to. A single longer sentence is one passage by itself.
PASSAGE_CHARS = 200
# Nothing worth remembering: greetings, thanks, laughter, yes and no.
_SMALL_TALK = re.compile(
    r"^(?:(?:hi|hey|hello|yo|hiya|morning|good (?:morning|evening|night|afternoon)|thanks?|thank you|thx|ty|ok|okay|"
    r"k|cool|nice|great|awesome|sure|yes|yeah|yep|no|nope|nah|lol|haha+|hehe|hmm+|wow|oh|ah|bye|goodbye|see you|"
    r"good|fine|alright|right|true|same|me too|you too|sounds good|got it|i see|no worries|np)\b[\s,.!?:;)(-]*)+$",
    re.I,
)
_WORD = re.compile(r"[^\W_]+")


def worth_keeping(sentence: str) -> bool:
    """False for a sentence that says nothing lasting: small talk, a question (what the user asks
    is rarely what they will want recalled, and keeping every question would change the user's
    memories on every turn), or fewer than three words."""
    return (
        len(_WORD.findall(sentence)) >= 3 and not _SMALL_TALK.match(sentence) and not sentence.rstrip('"\')»”').endswith("?")
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
