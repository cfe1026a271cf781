"""Finding durable facts about the user in what they said.

Two extractors, used together or alone (MEMORY_EXTRACTOR):
- `rules`: deterministic patterns for the facts people state about themselves (name, where they
  live, likes, people, pets, work, plans). A 135M local model extracts poorly; these always work.
- `llm`: the provider is asked for a JSON list of facts; the parse tolerates code fences, prose
  around the list, bullet lists and junk, and returns nothing rather than garbage.

Facts are rewritten in the third person ("My sister lives in Berlin" → "The user's sister lives in
Berlin"), since they are shown to the model as things it knows about the user.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from companion.errors import CompanionError
from companion.llm.base import ChatMessage, GenerationParams, LLMProvider, complete

logger = logging.getLogger(__name__)

MIN_CHARS, MAX_CHARS = 8, 300
# A model's answer is at most a few hundred tokens; looking further only lets junk cost more time.
MAX_ANSWER_CHARS = 4_000


@dataclass(frozen=True)
class Fact:
    text: str
    kind: str  # name | person | place | preference | plan | fact


# "St. Louis" and "3.5" do not end a sentence.
_SENTENCES = re.compile(r"(?:\b(?:st|mt|mr|mrs|ms|dr|jr|sr|prof)\.(?= )|\d\.(?=\d)|[^.!?\n])+[.!?]*", re.I)
# Control characters and lone surrogates would corrupt stored memories and prompts.
# (The control characters str.split() treats as whitespace are left to it.)
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")
# Fillers and greetings before the statement, the addressee's name included ("Hey Gina, I ...").
_LEAD = re.compile(
    r"^(?:(?:and|also|so|well|oh|btw|by the way|actually|anyway|hey|hi|hello|yeah|yes|haha|lol|wow|thanks|thank you|"
    r"guess what|you know what)(?: (?-i:[A-Z][a-z]+))?[,!.:]?\s+)+",
    re.I,
)
# The addressee's name at the end: "I love hiking, Gina." (not "I live in Paris, France.": a name
# after a capitalized word is taken for a place).
_VOCATIVE = re.compile(r"(\b[\w']+)\s*,\s*(?-i:[A-Z][a-z]+)\s*([.!?]*)$")


def _without_vocative(sentence: str) -> str:
    found = _VOCATIVE.search(sentence)
    if found is None or found.group(1)[0].isupper():
        return sentence
    return sentence[: found.start()] + found.group(1) + found.group(2)
_PEOPLE = (
    r"sister|brother|mother|mom|mum|father|dad|parents?|son|daughter|kids?|children|wife|husband|partner|"
    r"boyfriend|girlfriend|fianc[eé]e?|friend|best friend|boss|colleague|cousin|aunt|uncle|grandma|grandpa|"
    r"grandmother|grandfather|roommate|neighbou?r|dog|cat|puppy|kitten|pet|bird|horse"
)
_ADV = r"(?:just |recently |finally |currently |now |still |already |also |really |usually |often |actually )?"
_HABIT = r"(?:usually|often|always|normally|typically|sometimes|regularly|never|mostly|rarely)"
# Past tenses: regular ones (but not present verbs ending in -ed) and the common irregular ones.
_PAST = (
    r"(?:(?!(?:need|feed|bleed|breed|speed|succeed|proceed|exceed|embed|shred|wed|red|bed|shed|seed|weed)\b)[a-z]{2,}ed|"
    r"ate|became|began|bought|broke|brought|built|came|caught|chose|drove|fell|felt|flew|forgot|found|gave|got|grew|"
    r"heard|held|kept|knew|left|lost|made|met|paid|ran|sang|sat|saw|sent|slept|sold|spent|spoke|stood|swam|"
    r"taught|took|understood|went|woke|won|wore|wrote|quit|had|did|read|used to)"
)
# Progressives that are moods or talk, not facts ("I'm feeling", "I'm thinking").
_NOT_ACTIVITY = r"(?!(?:feeling|doing|thinking|wondering|guessing|kidding|joking|saying|asking|talking|trying|hoping|looking|sorry|getting tired)\b)"
_KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("name", re.compile(r"\b(?:my name is|call me|i am called|i'm called|my nickname is)\b", re.I)),
    ("person", re.compile(rf"\b(?:my|our) (?:\w+ )?(?:{_PEOPLE})\b|\bi(?: have|'ve got| have got|'ve) (?:a|an|two|three|four|\d+) (?:\w+ )?(?:{_PEOPLE})", re.I)),
    (
        "plan",
        re.compile(
            r"\b(?:(?:i|we)(?:'re|'m| am| are) (?:going|planning|moving|flying|starting|getting|about to|leaving|visiting|"
            r"driving|heading|having|throwing|hosting|taking|booking|running|doing)|"
            r"i plan|we plan|i will|we will|i'll|we'll|i want to|i hope to|i'd like to|my plan|our plan|"
            r"next (?:week|weekend|month|year|summer|winter|spring|fall|autumn|monday|tuesday|wednesday|thursday|friday|"
            r"saturday|sunday)|tomorrow|this (?:weekend|summer|winter|fall|autumn|spring))\b",
            re.I,
        ),
    ),
    (
        "place",
        re.compile(
            rf"\b(?:i|we) {_ADV}(?:live|lived|grew up|was born|moved|relocated|work in|work at|study|studied)\b|"
            r"\bi(?:'m| am) (?:from|based in)\b|"
            r"\bmy (?:home|hometown|city|country|town|office|school|university)\b",
            re.I,
        ),
    ),
    (
        "preference",
        re.compile(
            r"\bi (?:really |truly |absolutely |just )?(?:love|like|enjoy|adore|hate|dislike|prefer|can't stand|"
            r"cannot stand|don't like|do not like|don't eat|do not eat|never eat|don't drink|do not drink|never drink)\b|"
            r"\bmy fav(?:ou?rite)?\b|\bi(?:'m| am) (?:allergic|vegetarian|vegan|"
            r"a fan of|into|afraid of|scared of)\b",
            re.I,
        ),
    ),
    (
        "fact",
        re.compile(
            r"\bi(?:'m| am) (?:a|an|\d+|learning|studying|training|writing|building|married|engaged|single|retired)\b|"
            rf"\bi(?:'ve| have) been\b|\bi {_ADV}(?:work as|work for|speak|play|have|own|collect|teach|drive|ride|run|paint)\b|"
            rf"\bi {_ADV}(?:broke|lost|won|bought|sold|adopted|finished|graduated|got|started|quit|retired)\b|"
            r"\bmy (?:birthday|job|work|age|hobby|hobbies|car|phone|degree|major|team|club|band|project|company|"
            r"startup|class|course|gym|church|book|podcast|blog|garden|house|apartment|flat|boss|shift|commute)\b|"
            # past tense, habits, what they are doing these days, the tools and groups in their life
            rf"\bi {_ADV}{_PAST}\b|\bi {_HABIT} [a-z]+|\bi(?:'m| am) {_ADV}{_NOT_ACTIVITY}[a-z]{{3,}}ing\b|"
            rf"\bi {_ADV}(?:use|volunteer|coach|support|root for|follow|cook|bake|knit|sing|write|read|watch|"
            r"listen to|go to|attend|belong to|take|make|grow|build|swim|climb|surf|dance|meditate|journal)\b|"
            # "we" and "our": the user with people the message does not name
            rf"\bwe(?:'ve| have)? {_ADV}(?:{_PAST}|live|have|own|love|like|go|play|watch|visit|adopted)\b|"
            r"\bwe(?:'re| are) (?:[a-z]+ing|married|engaged|expecting|moving)\b|"
            rf"\bour (?:\w+ )?(?:{_PEOPLE}|house|home|flat|apartment|wedding|anniversary|trip|vacation|holiday|team|band|"
            r"garden|family|son|daughter|baby)\b",
            re.I,
        ),
    ),
]
# "I like that", "I love you": reactions to the conversation, not facts about the user.
_REACTION = re.compile(
    r"\bi (?:really )?(?:love|like|hate|enjoy|prefer|have) (?:it|that|this|those|these|you|your|yours|them|a question|no idea)\b"
    r"|\bi(?:'m| am) (?:a bit |so |very )?(?:sorry|not sure|fine|ok|okay|good|great|bored|tired|confused)\b"
    r"|\b(?:you|your)\b",
    re.I,
)
_PERSON_SWAP = [
    (re.compile(r"^i am\b|^i'm\b", re.I), "The user is"),
    (re.compile(r"^i've\b", re.I), "The user has"),
    (re.compile(r"^i'll\b", re.I), "The user will"),
    (re.compile(r"^i'd\b", re.I), "The user would"),
    (re.compile(r"^i\b", re.I), "The user"),
    (re.compile(r"^my\b", re.I), "The user's"),
    (re.compile(r"^call me\b", re.I), "The user wants to be called"),
    (re.compile(r"\bi am\b|\bi'm\b", re.I), "they are"),
    (re.compile(r"\bi was\b", re.I), "they were"),
    (re.compile(r"\bi wasn't\b", re.I), "they weren't"),
    (re.compile(r"\bi've\b", re.I), "they have"),
    (re.compile(r"\bi'll\b", re.I), "they will"),
    (re.compile(r"\bi'd\b", re.I), "they would"),
    (re.compile(r"\bi\b", re.I), "they"),
    (re.compile(r"\bmy\b", re.I), "their"),
    (re.compile(r"\bmine\b", re.I), "theirs"),
    (re.compile(r"\bme\b", re.I), "them"),
    (re.compile(r"\bmyself\b", re.I), "themselves"),
    # "we" is the user and people the message does not name ("We're driving up the coast").
    (re.compile(r"^we're\b|^we are\b", re.I), "The user and others are"),
    (re.compile(r"^we've\b", re.I), "The user and others have"),
    (re.compile(r"^we'll\b", re.I), "The user and others will"),
    (re.compile(r"^we'd\b", re.I), "The user and others would"),
    (re.compile(r"^we\b", re.I), "The user and others"),
    (re.compile(r"^our\b", re.I), "The user's"),
    (re.compile(r"\bwe're\b|\bwe are\b", re.I), "they are"),
    (re.compile(r"\bwe've\b", re.I), "they have"),
    (re.compile(r"\bwe'll\b", re.I), "they will"),
    (re.compile(r"\bwe'd\b", re.I), "they would"),
    (re.compile(r"\bwe\b", re.I), "they"),
    (re.compile(r"\bours\b", re.I), "theirs"),
    (re.compile(r"\bour\b", re.I), "their"),
    (re.compile(r"\bus\b", re.I), "them"),
    (re.compile(r"\bourselves\b", re.I), "themselves"),
]
# "My wife and I love hiking" -> "The user and their wife love hiking" (a plural subject).
_COMPOUND_SUBJECT = re.compile(rf"^(?:my ((?:\w+ )?(?:{_PEOPLE})) and (?:i|me)|me and my)\b", re.I)
# Third-person verbs after "the user": "The user live" -> "The user lives", also past an adverb
# ("The user really loves"). A contraction ("can't", "didn't") is left as it is.
_VERB_AFTER_USER = re.compile(
    r"\b([Tt]he user) ((?:really|truly|absolutely|just|also|usually|often|always|never|still|sometimes|"
    r"mostly|rarely|actually|totally|recently|finally|currently|already|now|themselves) )?"
    r"(?!is\b|has\b|will\b|would\b|wants\b|does\b|was\b|did\b|had\b|and\b|or\b)([a-z]+)\b(?!['\u2019])"
)
# Past tenses are left alone: regular ones end in -ed (but "need" is present), these do not.
_PRESENT_IN_ED = frozenset("need feed bleed breed speed succeed proceed exceed embed shred wed".split())
_IRREGULAR_PAST = frozenset(
    "ate became began bought broke brought built came caught chose drove fell felt flew forgot found gave got grew "
    "heard held kept knew left lost made meant met paid ran said sang sat saw sent slept sold spent spoke stood swam "
    "taught thought told took understood went woke won wore wrote quit cut put set hit let shut hurt spread".split()
)


def _third_person_verb(verb: str) -> str:
    if verb in {"can", "could", "should", "must", "might", "may", "was", "did", "had"} or verb in _IRREGULAR_PAST:
        return verb
    if verb.endswith("ed") and verb not in _PRESENT_IN_ED:
        return verb
    if verb == "have":
        return "has"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    return verb + "s"


def third_person(sentence: str) -> str:
    """Rewrite a first-person statement about the user in the third person."""
    text = _COMPOUND_SUBJECT.sub(lambda m: " ".join(["The user and their", *m.groups("")]).strip(), sentence.strip())
    if not re.match(r"^(?:i|i'm|i've|i'll|i'd|my|call me|the user|we|we're|we've|we'll|we'd|our)\b", text, re.I):
        # "Next month I'm flying to Tokyo": the first "I" names the user, later ones are "they".
        first = re.search(r"\b(?:i|we)\b", text, re.I)
        if first is not None and first.group(0).lower() == "we":
            text = re.sub(r"\bwe are\b|\bwe're\b", "the user and others are", text, count=1, flags=re.I)
            text = re.sub(r"\bwe\b", "the user and others", text, count=1, flags=re.I)
        text = re.sub(r"\bi am\b|\bi'm\b", "the user is", text, count=1, flags=re.I)
        text = re.sub(r"\bi was\b", "the user was", text, count=1, flags=re.I)
        text = re.sub(r"\bi've\b", "the user has", text, count=1, flags=re.I)
        text = re.sub(r"\bi\b", "the user", text, count=1, flags=re.I)
    for pattern, replacement in _PERSON_SWAP:
        text = pattern.sub(replacement, text)
    text = re.sub(r"\b([Tt]he user) (?:don't|do not)\b", r"\1 does not", text)
    text = re.sub(r"\b([Tt]he user) haven't\b", r"\1 hasn't", text)
    text = _VERB_AFTER_USER.sub(lambda m: f"{m.group(1)} {m.group(2) or ''}{_third_person_verb(m.group(3))}", text)
    text = text[0].upper() + text[1:] if text else text
    return text if text.endswith((".", "!", "?")) else text + "."


# Phones and word processors type curly apostrophes (U+2019): they must read as plain ones.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def clean(text: str) -> str:
    """`text` as it is stored: plain apostrophes, no control characters, single spaces."""
    return " ".join(_UNPRINTABLE.sub("", text.translate(_APOSTROPHES)).split())


def sentences(text: str) -> list[str]:
    text = text.translate(_APOSTROPHES)
    return [" ".join(_UNPRINTABLE.sub("", part).split()) for part in _SENTENCES.findall(text) if part.strip()]


# A rewrite that would read wrong is not attempted (the episode keeps what was said, verbatim):
# first person left over, broken agreement ("the user'm", "they was"), doubled end marks, or a
# demonstrative whose referent is in another sentence ("The user has done that for years.").
_READS_WRONG = re.compile(
    r"\b(?:i|me|my|mine|myself|we|us|our|ours)\b|\buser'(?!s\b)|\bthey (?:was|is|has|wasn't|isn't|hasn't)\b|"
    r"[?!.]\.$|\b(?:this|that|these|those|it)\s*(?:[.!?,;]|$)|"
    r"\b(?:this|that|these|those) (?:is|was|are|were|has|had|for|with|too|again|so|a lot)\b",
    re.I,
)


def reads_right(fact: str) -> bool:
    return not _READS_WRONG.search(fact)


def rule_facts(message: str) -> list[Fact]:
    """The sentences of `message` that state something durable about the user, in the third person;
    a sentence whose rewrite would not read right gives no fact."""
    found: list[Fact] = []
    for raw in sentences(message):
        sentence = _without_vocative(_LEAD.sub("", raw).strip())
        if sentence.endswith("?") or not (MIN_CHARS <= len(sentence) <= MAX_CHARS):
            continue
        if not re.search(r"\b(?:i|i'm|i've|my|me|call me|we|we're|we've|our|us)\b", sentence, re.I):
            continue
        kind = next((kind for kind, pattern in _KINDS if pattern.search(sentence)), None)
        if kind is None or _REACTION.search(sentence):
            continue
        fact = third_person(sentence.rstrip("!.") + ".")
        if len(fact) <= MAX_CHARS and reads_right(fact):  # the rewrite is longer than what the user wrote
            found.append(Fact(fact, kind))
    return found


EXTRACTION_PROMPT = (
    "You extract long-term memories. From the user's message, list the durable facts about the user "
    "(their name, people in their life, where they live, likes and dislikes, work, plans). Write each "
    'fact as a short sentence starting with "The user". Answer with a JSON array of strings and '
    "nothing else; answer [] if there is none."
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.+)$")
_JSON = json.JSONDecoder()


def _first_json_list(output: str) -> list[object]:
    """The first JSON array in `output` that holds a string ("[1]" or "[note]" in prose is skipped)."""
    start = output.find("[")
    while start != -1:
        try:
            # raw_decode parses in place and stops at the array's end: no slice and retry per "]".
            parsed, _ = _JSON.raw_decode(output, start)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's limit
            parsed = None
        if isinstance(parsed, list) and any(isinstance(item, str) for item in parsed):
            return parsed
        start = output.find("[", start + 1)
    return []


def parse_llm_facts(output: str, *, limit: int = 5) -> list[str]:
    """The facts in a model's answer: a JSON array (possibly fenced or wrapped in prose), or a
    bulleted list. Anything else yields nothing."""
    output = output[:MAX_ANSWER_CHARS]
    items = _first_json_list(output)
    if not items:
        items = [m.group(1) for line in output.splitlines() if (m := _BULLET.match(line))]
    facts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        text = " ".join(_UNPRINTABLE.sub("", item).split()).strip(" \"'")
        if not (MIN_CHARS <= len(text) <= MAX_CHARS) or text.endswith("?"):
            continue
        if not text.lower().startswith(("the user", "user")):
            continue
        text = text if text.endswith(".") else text + "."
        if len(text) <= MAX_CHARS:  # the period may be one too many
            facts.append(text)
    return facts[:limit]


async def llm_facts(provider: LLMProvider, message: str) -> list[Fact]:
    prompt = [ChatMessage("system", EXTRACTION_PROMPT), ChatMessage("user", message[:4000])]
    try:
        answer = await complete(provider, prompt, GenerationParams(max_tokens=160, temperature=0.0))
    except CompanionError:
        logger.warning("LLM memory extraction failed; keeping the rule-based facts only")
        return []
    return [Fact(text, "fact") for text in parse_llm_facts(answer)]
