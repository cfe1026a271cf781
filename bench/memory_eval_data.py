"""The memory evaluation's conversations, written for it: fourteen people, six sessions each on
dates weeks apart, telling a companion about their lives in passing, among small talk, in their own
styles; then asked about it. `python -m bench.memory_eval_data` writes bench/data/memory_eval.json
once (seeded); the evaluation reads that frozen file and checks its hash (bench/memory_eval.py).

Each item is a thing said and a question that needs it, with the answer's words. Kinds:
- `fact`: said once, asked later;
- `temporal`: said with a relative date ("yesterday", "next weekend"); the answer is the date;
- `update`: said, then replaced sessions later ("I switched jobs"); only the newer one is evidence;
- `pair`: two things said in different sessions, both needed.
People 0-3 are the development part (for tuning), 4-13 the test part (reported, never tuned on).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

PATH = Path(__file__).parent / "data" / "memory_eval.json"
PEOPLE, DEV_PEOPLE, SESSIONS, ITEMS_PER_PERSON = 14, 4, 6, 26


@dataclass(frozen=True)
class Item:
    key: str
    says: tuple[str, ...]  # what is said (one per message), with {slots}
    ask: str
    answer: tuple[str, ...]  # the answer's words (any one suffices), with {slots}; "@0" = a date
    kind: str = "fact"
    offset: int | None = None  # temporal: the answer date is the session date + offset days ("@weekend": Saturday)


SLOTS: dict[str, list[str]] = {
    "sister": ["Ana", "Beatriz", "Chloe", "Dana", "Elif", "Farah", "Greta", "Hana", "Ines", "Jade", "Kira", "Lena", "Mira", "Noor"],
    "brother": ["Jonas", "Karim", "Luca", "Mateo", "Nikos", "Omar", "Pavel", "Quentin", "Rafael", "Sami", "Tomas", "Umar", "Viktor", "Wes"],
    "friend": ["Xiomara", "Yusuf", "Zofia", "Bram", "Cyrus", "Delphine", "Eero", "Fumiko", "Gideon", "Halla", "Ivo", "Jorunn", "Kwame", "Liesel"],
    "city": ["Berlin", "Lisbon", "Montreal", "Osaka", "Valparaiso", "Tbilisi", "Ghent", "Porto", "Krakow", "Hobart", "Bergen", "Cusco", "Leeds", "Tucson"],
    "city2": ["Nairobi", "Oslo", "Seville", "Hanoi", "Dublin", "Quebec", "Tallinn", "Lyon", "Adelaide", "Bologna", "Denver", "Riga", "Cork", "Izmir"],
    "pet": ["Biscuit", "Pepper", "Mochi", "Rufus", "Olive", "Ziggy", "Nacho", "Luna", "Tofu", "Waffles", "Juniper", "Bean", "Pickles", "Sprocket"],
    "animal": ["dog", "cat", "rabbit", "parrot", "tortoise", "ferret", "hamster", "dog", "cat", "gecko", "cat", "dog", "guinea pig", "cat"],
    "job": ["nurse", "architect", "baker", "paramedic", "librarian", "welder", "pharmacist", "translator", "carpenter", "data analyst", "teacher", "electrician", "dentist", "chef"],
    "job2": ["project manager", "florist", "UX designer", "physiotherapist", "journalist", "mechanic", "accountant", "gardener", "pilot", "social worker", "barista", "vet", "plumber", "lawyer"],
    "company": ["Acme Logistics", "Brightwave", "Corvid Labs", "Dunmore Bank", "Elkhorn Foods", "Fenwick & Co", "Glasshouse Media", "Halden Energy", "Ironleaf", "Juniper Health", "Kestrel Air", "Lumen Tools", "Marlowe Press", "Northvale"],
    "band": ["Radiohead", "Khruangbin", "Fleetwood Mac", "Bonobo", "Björk", "Tame Impala", "Nina Simone", "Daft Punk", "The Cure", "Portishead", "Rosalía", "Sigur Rós", "Talking Heads", "Massive Attack"],
    "book": ["Dune", "Piranesi", "Middlemarch", "The Overstory", "Kindred", "Stoner", "Solaris", "Beloved", "The Dispossessed", "Rebecca", "Circe", "Hyperion", "Lonesome Dove", "Pachinko"],
    "sport": ["climbing", "rowing", "fencing", "badminton", "trail running", "water polo", "judo", "curling", "handball", "squash", "kayaking", "ultimate frisbee", "archery", "roller derby"],
    "instrument": ["cello", "banjo", "trumpet", "harp", "accordion", "oboe", "ukulele", "drums", "viola", "saxophone", "piano", "flute", "bass guitar", "mandolin"],
    "language": ["Japanese", "Portuguese", "Korean", "Italian", "Swahili", "Greek", "Dutch", "Arabic", "Polish", "Turkish", "Finnish", "Hindi", "Welsh", "Czech"],
    "food": ["ramen", "pierogi", "pho", "tacos al pastor", "paella", "dumplings", "shakshuka", "biryani", "pad thai", "lasagne", "laksa", "jollof rice", "moussaka", "ceviche"],
    "allergy": ["peanuts", "shellfish", "sesame", "kiwi", "gluten", "walnuts", "eggs", "soy", "mustard", "celery", "lupin", "cashews", "strawberries", "penicillin"],
    "car": ["an old red Volvo", "a blue Fiat Panda", "a white Prius", "a green Land Rover", "a silver Golf", "a black Mini", "a yellow Beetle", "a grey Outback", "a red Mazda", "a white Tesla", "an orange Jeep", "a brown Saab", "a blue Corolla", "a green Kia"],
    "show": ["Severance", "The Bear", "Slow Horses", "Succession", "Fleabag", "Dark", "Shogun", "Bluey", "Reservation Dogs", "The Wire", "Mad Men", "Ted Lasso", "Taskmaster", "Arcane"],
    "team": ["the Celtics", "Arsenal", "the Packers", "Boca Juniors", "the Yankees", "Ajax", "the Raptors", "Celtic", "the Seahawks", "Napoli", "the Cubs", "Benfica", "the Lakers", "Galatasaray"],
    "app": ["Notion", "Figma", "Obsidian", "Excel", "Blender", "Trello", "Anki", "Lightroom", "Duolingo", "Strava", "Procreate", "Ableton", "Todoist", "GarageBand"],
    "charity": ["the food bank", "an animal shelter", "a literacy program", "the hospice", "a refugee center", "the river cleanup", "a youth football club", "the library", "a soup kitchen", "a wildlife rescue", "the community garden", "a homeless shelter", "a hospital radio", "a repair café"],
    "kid": ["Mia", "Leo", "Zoe", "Noah", "Ava", "Eli", "Isla", "Theo", "Maya", "Finn", "Nora", "Kai", "Ruby", "Ezra"],
    "plant": ["tomatoes", "basil", "chillies", "orchids", "succulents", "strawberries", "roses", "lavender", "courgettes", "bonsai", "ferns", "sunflowers", "mint", "peppers"],
    "trip": ["Iceland", "Vietnam", "Morocco", "Patagonia", "Japan", "Norway", "Peru", "Sicily", "New Zealand", "Georgia", "Scotland", "Namibia", "Portugal", "Canada"],
}

ITEMS: list[Item] = [
    Item("sister-city", ("My sister {sister} lives in {city}.", "my sister {sister} moved to {city} a while ago, still can't believe it"), "Where does my sister live?", ("{city}",)),
    Item("brother-job", ("My brother {brother} works as a {job}.", "{brother}, my little brother, is a {job} now"), "What does my brother do for work?", ("{job}",)),
    Item("pet-name", ("My {animal} is called {pet}.", "our {animal} {pet} knocked over a plant again"), "What's my pet's name?", ("{pet}",)),
    Item("job", ("I work as a {job}.", "been a {job} for about six years now"), "What is my job?", ("{job}",)),
    Item("band", ("My favourite band is {band}.", "{band} is on repeat at my place, always"), "Which music do I like most?", ("{band}",)),
    Item("book-reading", ("I'm currently reading {book}.", "halfway through {book} and it's so good"), "What book am I reading at the moment?", ("{book}",)),
    Item("sport", ("I do {sport} twice a week.", "I joined a {sport} club last year and I love it"), "Which sport do I do?", ("{sport}",)),
    Item("instrument", ("I play the {instrument} in a community orchestra.", "I've been learning the {instrument}, my neighbours hate it"), "What instrument do I play?", ("{instrument}",)),
    Item("language", ("I'm learning {language} on weekends.", "my {language} lessons are going slowly but surely"), "Which language am I learning?", ("{language}",)),
    Item("food", ("My favourite food is {food}.", "I could eat {food} every single day"), "What is my favourite dish?", ("{food}",)),
    Item("allergy", ("I'm allergic to {allergy}.", "had a reaction to {allergy} once, never again"), "Is there anything I'm allergic to?", ("{allergy}",)),
    Item("car", ("I drive {car}.", "my car is {car} and it's falling apart"), "What car do I drive?", ("{car}",)),
    Item("show", ("We've been binge-watching {show}.", "I finally started {show}, no spoilers please"), "Which TV show have I been watching?", ("{show}",)),
    Item("team", ("I support {team}.", "{team} lost again last night, I'm devastated"), "Which team do I support?", ("{team}",)),
    Item("app", ("I usually use {app} for work.", "I do everything in {app}, honestly"), "Which software do I use for work?", ("{app}",)),
    Item("volunteer", ("I volunteer at {charity} on Saturdays.", "Saturdays I help out at {charity}"), "Where do I volunteer?", ("{charity}",)),
    Item("kid", ("My daughter {kid} just turned seven.", "{kid}, my youngest, starts school soon"), "What's my child's name?", ("{kid}",)),
    Item("garden", ("I grow {plant} on my balcony.", "my {plant} finally came up this year"), "What do I grow at home?", ("{plant}",)),
    Item("friend-city", ("My best friend {friend} moved to {city2}.", "{friend} and I used to be neighbours until they left for {city2}"), "Where did my best friend move to?", ("{city2}",)),
    Item("friend-name", ("My oldest friend is {friend}.", "known {friend} since we were five"), "Who is my oldest friend?", ("{friend}",)),
    Item("hometown", ("I grew up in {city2}.", "back home in {city2} it's probably raining"), "Where did I grow up?", ("{city2}",)),
    Item("company", ("I work at {company}.", "things at {company} are chaotic this quarter"), "Which company do I work for?", ("{company}",)),
    Item("dream-trip", ("I've always wanted to visit {trip}.", "one day I'll make it to {trip}, it's the dream"), "Which place do I dream of visiting?", ("{trip}",)),
    Item("vegetarian", ("I stopped eating meat two years ago.", "been vegetarian for a couple of years now"), "Do I eat meat?", ("vegetarian", "meat")),
    Item("fear", ("I'm terrified of flying.", "planes make me super anxious, I hate flying"), "How do I feel about flying?", ("flying", "anxious", "terrified")),
    Item("wake", ("I usually wake up at 5 to go running.", "up at 5am most days for a run"), "What time do I get up?", ("5",)),
    Item("coffee", ("I drink my coffee black, no sugar.", "black coffee, no sugar, that's my fuel"), "How do I take my coffee?", ("black",)),
    Item("bake", ("I bake sourdough every Sunday.", "sunday is sourdough day in my kitchen"), "What do I bake on Sundays?", ("sourdough",)),
    Item("mom-health", ("My mom is recovering from knee surgery.", "mum had her knee operated on, she's healing slowly"), "How is my mother's health?", ("knee",)),
    Item("commute", ("I cycle to work every day.", "I bike to the office, rain or shine"), "How do I get to work?", ("cycle", "bike")),
    Item("anniversary-trip", ("We're driving up the coast next weekend for our anniversary.",), "Where am I going for my anniversary?", ("coast",)),
    Item("marathon", ("I'm training for the {city} marathon.", "marathon training is killing me, the {city} race is in the autumn"), "What race am I training for?", ("{city}", "marathon")),
    Item("wedding", ("My brother {brother} is getting married in {city2}.", "{brother}'s wedding is going to be in {city2}"), "Where is my brother's wedding?", ("{city2}",)),
    Item("degree", ("I studied architecture at university.", "back in uni I did architecture, not that I use it"), "What did I study?", ("architecture",)),
    Item("move-plan", ("We're planning to move to {city2} next year.", "the plan is {city2}, we're moving there next year"), "Where am I planning to move?", ("{city2}",)),
    Item("podcast", ("I listen to a history podcast on my commute.", "history podcasts are how I survive the commute"), "What do I listen to while commuting?", ("history podcast", "podcast")),
    Item("knit", ("I knit scarves for my whole family.", "knitting a scarf for my dad right now"), "What is my craft hobby?", ("knit",)),
    Item("boardgame", ("We have a board game night every Thursday.", "thursday is board game night with the gang"), "What do I do on Thursday evenings?", ("board game",)),
    Item("injury", ("I broke my wrist snowboarding.", "wrist is still sore from the snowboarding crash"), "Have I had any injuries?", ("wrist",)),
    Item("grandpa", ("My grandfather was a fisherman in {city2}.", "grandpa fished out of {city2} his whole life"), "What did my grandfather do?", ("fisherman", "fish")),
    # temporal: the answer is the date the phrase resolves to
    Item("pottery", ("I went to a pottery class yesterday.",), "When did I go to the pottery class?", ("@",), "temporal", -1),
    Item("dentist", ("I have a dentist appointment tomorrow.",), "When is my dentist appointment?", ("@",), "temporal", 1),
    Item("concert", ("I saw {band} live last night!",), "When did I see {band} live?", ("@",), "temporal", -1),
    Item("interview", ("I've got a job interview the day after tomorrow.",), "When is my job interview?", ("@",), "temporal", 2),
    Item("hike-weekend", ("Next weekend I'm hiking with {friend}.",), "When am I going hiking with {friend}?", ("@",), "temporal", 100),
    Item("flight", ("I fly to {trip} in 3 days.",), "When is my flight to {trip}?", ("@",), "temporal", 3),
    Item("exam", ("My {language} exam was two days ago.",), "When was my {language} exam?", ("@",), "temporal", -2),
    Item("party", ("Tomorrow is {kid}'s birthday party.",), "When is the birthday party?", ("@",), "temporal", 1),
    # updates: only the newer statement answers
    Item("job-change", ("I work at {company}.", "I just switched jobs, I'm at Northwind now."), "Where do I work now?", ("Northwind",), "update"),
    Item("moved", ("I live in {city}.", "Big news: we moved to {city2} last month!"), "Which city do I live in now?", ("{city2}",), "update"),
    Item("diet", ("I love steak.", "I've gone vegan since last time we talked."), "What's my diet now?", ("vegan",), "update"),
    Item("relationship", ("My boyfriend {brother} is a {job}.", "{brother} and I broke up, I'm single again."), "Am I in a relationship?", ("single", "broke up"), "update"),
    Item("phone", ("I have an old iPhone.", "Finally replaced my phone with a Pixel."), "What phone do I have now?", ("Pixel",), "update"),
    Item("hobby-switch", ("I do {sport} twice a week.", "I gave up {sport}, I do pottery now instead."), "What hobby do I do these days?", ("pottery",), "update"),
    # pairs: two statements, both needed
    Item("sister-job-city", ("My sister {sister} is a {job2}.", "{sister} just moved to {city} for work."), "What does my sister do and where does she live now?", ("{job2}", "{city}"), "pair"),
    Item("pet-vet", ("My {animal} {pet} has been limping.", "The vet said {pet} needs surgery next month."), "What's wrong with my pet?", ("surgery", "limping"), "pair"),
    Item("friend-visit", ("My friend {friend} lives in {city2}.", "I'm visiting {friend} in the spring."), "Which city am I visiting in the spring?", ("{city2}",), "pair"),
    Item("kid-school", ("My son is called {kid}.", "{kid} started learning the {instrument} at school."), "What instrument is my son learning?", ("{instrument}",), "pair"),
    Item("brother-trip", ("My brother {brother} loves {trip}.", "{brother} and I are going to {trip} together in June."), "Who am I travelling with in June?", ("{brother}",), "pair"),
]

CHITCHAT = [
    "hey!", "Hi, how are you today?", "good morning :)", "lol that's hilarious", "Thanks, that helps a lot.", "ok cool",
    "What do you think about Paris?", "Can you recommend a good book?", "Tell me a joke.", "Do you like jazz?",
    "I'm so tired lol", "That makes sense.", "Haha yes, same here.", "I'm not sure about that.", "What's the capital of Peru?",
    "The weather is awful today.", "I wonder if aliens exist.", "Interesting, tell me more.", "How does photosynthesis work?",
    "Can you help me write an email?", "ugh mondays", "You're funny.", "What should I cook tonight?", "I guess so.",
    "Good night!", "wait what", "hmm ok", "Is it going to rain tomorrow?", "Why is the sky blue?", "nice!!",
    "I love that idea.", "What's your favourite colour?", "Could you explain that again?", "I'm fine, thanks.",
    "brb", "Sounds good to me.", "Do you ever get bored?", "What time is it in Tokyo?", "I think you're right.", "omg really?",
]
OPENERS = ["Long day today.", "So anyway,", "Quick update:", "Ugh, where do I start.", "You won't believe this.", "Random thought:", "", "", ""]
CLOSERS = ["How's your day going?", "Anyway, what were we talking about?", "lol", "Just wanted to share.", "", "", "", "What do you think?"]
STYLES = ["plain", "casual", "emoji", "rambling", "terse", "formal"]


def styled(text: str, style: str, rng: random.Random) -> str:
    if style == "casual":
        text = text[0].lower() + text[1:]
        return text.rstrip(".") + rng.choice(["", " lol", " haha", " tbh"])
    if style == "emoji":
        return text + " " + rng.choice(["😅", "🎉", "🙂", "😭", "✨"])
    if style == "rambling":
        return " ".join(part for part in (rng.choice(OPENERS), text, rng.choice(CLOSERS)) if part)
    if style == "formal":
        return rng.choice(["Good evening. ", "Hello. ", "If I may share something: "]) + text
    return text


def date_answer(said: date, offset: int) -> str:
    if offset == 100:  # next weekend: the coming Saturday (the following one when said on a weekend)
        monday = said - timedelta(days=said.weekday())
        return (monday + timedelta(days=5 + (7 if said.weekday() >= 5 else 0))).isoformat()
    return (said + timedelta(days=offset)).isoformat()


@dataclass
class Person:
    index: int
    style: str
    slots: dict[str, str]
    dates: list[date]
    sessions: list[list[dict[str, object]]] = field(default_factory=list)
    questions: list[dict[str, object]] = field(default_factory=list)


def build(seed: int = 12) -> dict[str, object]:
    rng = random.Random(seed)
    people = []
    message_id = 0
    for index in range(PEOPLE):
        slots = {name: values[(index * 5 + 3) % len(values)] for name, values in SLOTS.items()}
        start = date(2026, 1, 5) + timedelta(days=rng.randrange(0, 200))
        dates = [start]
        for _ in range(SESSIONS - 1):
            dates.append(dates[-1] + timedelta(days=rng.randrange(3, 25)))
        person = Person(index, STYLES[index % len(STYLES)], slots, dates, [[] for _ in range(SESSIONS)])
        items = rng.sample(ITEMS, ITEMS_PER_PERSON)
        planned: list[tuple[int, str, str | None, int]] = []  # session, text, item key (None: chit-chat), part
        for item in items:
            if len(item.says) == 2 and item.kind in ("update", "pair"):
                first = rng.randrange(0, SESSIONS - 2)
                second = rng.randrange(first + 1, SESSIONS)
                planned += [(first, item.says[0], item.key, 0), (second, item.says[1], item.key, 1)]
            else:
                planned.append((rng.randrange(0, SESSIONS), rng.choice(item.says), item.key, 0))
        for session in range(SESSIONS):
            planned += [(session, rng.choice(CHITCHAT), None, 0) for _ in range(rng.randrange(8, 15))]
        rng.shuffle(planned)
        planned.sort(key=lambda p: p[0])
        said: dict[tuple[str, int], tuple[int, date]] = {}
        for session, text, key, part in planned:
            message_id += 1
            content = text.format(**slots)
            if key is not None:
                content = styled(content, person.style if rng.random() < 0.7 else rng.choice(STYLES), rng)
                said[(key, part)] = (message_id, dates[session])
            person.sessions[session].append({"id": message_id, "text": content, "chitchat": key is None})
        for item in items:
            if item.kind == "update":
                evidence = [said[(item.key, 1)][0]]
            elif item.kind == "pair":
                evidence = [said[(item.key, 0)][0], said[(item.key, 1)][0]]
            else:
                evidence = [said[(item.key, 0)][0]]
            if item.kind == "temporal":
                assert item.offset is not None
                answer = [date_answer(said[(item.key, 0)][1], item.offset)]
            else:
                answer = [a.format(**slots) for a in item.answer]
            person.questions.append(
                {"item": item.key, "kind": item.kind, "question": item.ask.format(**slots), "answer": answer, "evidence": evidence}
            )
        people.append(
            {
                "person": index,
                "split": "dev" if index < DEV_PEOPLE else "test",
                "style": person.style,
                "sessions": [{"date": d.isoformat(), "messages": m} for d, m in zip(dates, person.sessions, strict=True)],
                "questions": person.questions,
            }
        )
    return {"seed": seed, "people": people}


# Everyday self-disclosures written for this evaluation, beside the project's 36 pairs
# (tests/memory/test_recall_quality.py): one fact each, one later question.
DISCLOSURES: list[tuple[str, str]] = [
    ("I've been a night-shift nurse for ten years.", "How long have I worked nights?"),
    ("We adopted a greyhound called Pixel last month.", "What kind of dog do we have?"),
    ("I'm currently reading The Left Hand of Darkness.", "What am I reading these days?"),
    ("I usually use a Kindle for reading.", "What device do I read on?"),
    ("I volunteer with the mountain rescue team.", "What volunteering do I do?"),
    ("My team at work ships the billing service.", "What does my team at work do?"),
    ("I went to Lisbon for my fortieth birthday.", "Where did I celebrate turning forty?"),
    ("I loved the Hokusai exhibition at the British Museum.", "Which exhibition did I enjoy?"),
    ("I took up bouldering after my divorce.", "When did I start climbing?"),
    ("Our twins start kindergarten in September.", "When do my kids start kindergarten?"),
    ("I play five-a-side football on Tuesday nights.", "What do I do on Tuesday evenings?"),
    ("My landlord is raising the rent again.", "What's going on with my rent?"),
    ("I'm saving up for a sailing boat.", "What am I saving money for?"),
    ("I can't eat gluten because of coeliac disease.", "Do I have any dietary restrictions?"),
    ("My dad taught me to fix bikes when I was a kid.", "Who taught me bike repair?"),
    ("I work from a co-working space in Ghent.", "Where do I work from?"),
    ("We're expecting our first baby in March.", "When is the baby due?"),
    ("I run a small Etsy shop selling ceramic mugs.", "What do I sell online?"),
    ("I've been learning to code in Rust.", "Which programming language am I learning?"),
    ("I sing tenor in a barbershop quartet.", "What voice do I sing?"),
    ("My partner Sam is a firefighter.", "What does Sam do?"),
    ("I failed my driving test twice before passing.", "How many times did I fail my driving test?"),
    ("I always take the night train to Vienna.", "How do I usually travel to Vienna?"),
    ("I meditate for twenty minutes every morning.", "What's my morning routine?"),
    ("I finished my first half marathon in two hours.", "What was my half marathon time?"),
    ("I'm the treasurer of our neighbourhood association.", "What role do I have in the neighbourhood association?"),
    ("I keep bees on the roof of our building.", "What unusual hobby do I have on the roof?"),
    ("I switched from Android to an iPhone last year.", "What phone do I use?"),
    ("My grandmother taught me to make pierogi.", "Who taught me to cook pierogi?"),
    ("I'm colour-blind, red and green look the same to me.", "Do I have any problems with my eyesight?"),
    ("We spent our honeymoon in the Azores.", "Where did we go on our honeymoon?"),
    ("I coach my daughter's under-10 hockey team.", "Which team do I coach?"),
    ("I used to live in a van for two years.", "Have I ever lived in a van?"),
    ("I'm on the waiting list for a council allotment.", "What am I on a waiting list for?"),
]


def main() -> None:
    from tests.memory.test_recall_quality import PAIRS  # the project's 36, copied into the frozen file

    data = build()
    data["disclosures"] = [{"fact": f, "question": q, "source": "project"} for f, q in PAIRS] + [
        {"fact": f, "question": q, "source": "new"} for f, q in DISCLOSURES
    ]
    PATH.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    questions = sum(len(p["questions"]) for p in data["people"])  # type: ignore[index, union-attr]
    print(f"wrote {PATH}: {questions} questions")


if __name__ == "__main__":
    main()
