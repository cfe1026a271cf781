"""Episodes, facts and hybrid search on both databases: words that a small embedding model blurs
(names, titles, rare words) are found by the full-text index; the index follows every change; each
user searches only their own; a conversation's or a message's memories can be forgotten; at the cap
the oldest episodes make room."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import httpx

from companion.memory.fulltext import fuse, terms
from companion.memory.store import NewMemory
from companion.services import Services
from tests.support.api import chat, create_conversation

T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
FILLER = [
    "I went for a long walk by the river this morning.",
    "My neighbour plays loud music on Sundays.",
    "I had pasta for dinner with friends.",
    "Work has been stressful because of a deadline.",
    "I bought new running shoes last week.",
    "My cousin is visiting from Lisbon in the spring.",
    "I finally finished painting the kitchen.",
    "The train was late again today.",
]


def test_terms_drop_stopwords_and_keep_order() -> None:
    assert terms("Where am I going this weekend?") == ["going", "weekend"]
    assert terms("What's \"Xiomara\" doing; DROP TABLE -- *") == ["xiomara", "drop", "table"]
    assert terms("what do I ...") == []


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    ids = [uuid.UUID(int=i) for i in range(4)]
    fused = fuse([[ids[0], ids[1], ids[2]], [ids[2], ids[3]]])
    assert fused[0] == ids[2]  # second and first: beats a lone first place
    assert set(fused) == set(ids)


async def test_a_rare_name_is_found_by_its_words(services: Services) -> None:
    user = (await services.users.create("u")).id
    other = (await services.users.create("other")).id
    for i, text in enumerate(FILLER, start=1):
        await services.memories.extract(user, None, i, text, said_at=T0)
    await services.memories.extract(user, None, 99, "Xiomara from the choir lent me her bicycle.", said_at=T0)
    await services.memories.extract(other, None, 1, "Xiomara is my landlady and she is strict.", said_at=T0)

    found = await services.memories.search(user, "Xiomara", limit=3)
    assert found[0].source_message_id == 99 and found[0].kind == "episode"
    assert all(m.source_message_id != 1 or m.text.startswith("I went") for m in found)  # never the other user's
    (vector,) = await services.memories.embedder.embed(["Xiomara"])
    by_words = await services.memories.store.text_search(user, ["xiomara"], vector, 10)
    assert [m.source_message_id for m in by_words] == [99]
    assert by_words[0].score is not None and -1 <= by_words[0].score <= 1
    # Stemmed: "bicycles" finds "bicycle".
    assert [m.source_message_id for m in await services.memories.store.text_search(user, ["bicycles"], vector, 10)] == [99]


async def test_the_word_index_follows_updates_and_deletions(services: Services) -> None:
    user = (await services.users.create("u")).id
    note = await services.memories.add(user, "My favourite film is Stalker by Tarkovsky.")
    assert note is not None
    (vector,) = await services.memories.embedder.embed(["film"])
    store = services.memories.store
    assert [m.id for m in await store.text_search(user, ["tarkovsky"], vector, 5)] == [note.id]
    text = "My favourite film is Solaris by Tarkovsky."
    (new_vector,) = await services.memories.embedder.embed([text])
    updated = await store.replace(user, note.id, NewMemory(text, "note", new_vector), T0)  # as a dedupe does
    assert updated.id == note.id
    assert await store.text_search(user, ["stalker"], vector, 5) == []
    assert [m.id for m in await store.text_search(user, ["solaris"], vector, 5)] == [note.id]
    await services.memories.delete(user, note.id)
    assert await store.text_search(user, ["solaris"], vector, 5) == []


async def test_episodes_and_facts_are_kept_with_their_source_time_and_dates(services: Services) -> None:
    user = (await services.users.create("u")).id
    conversation = await services.conversations.create(user, "elara")
    message = await services.conversations.add_message(
        conversation.id, "user", "Hey! We're driving up the coast next weekend for our anniversary. My sister Ana lives in Berlin."
    )
    facts = await services.memories.extract(user, conversation.id, message.id, message.content, said_at=T0)
    episodes = await services.memories.list(user, scope="episodes")
    assert [e.text for e in episodes] == [
        "Hey! We're driving up the coast next weekend for our anniversary. My sister Ana lives in Berlin."
    ]
    (episode,) = episodes
    assert (episode.conversation_id, episode.source_message_id, episode.said_at) == (conversation.id, message.id, T0)
    assert [(d.phrase, d.start.isoformat(), d.end.isoformat()) for d in episode.dates] == [
        ("next weekend", "2026-11-07", "2026-11-08")
    ]
    assert facts and all(f.episode_id == episode.id and f.said_at == T0 for f in facts)
    assert {m.id for m in await services.memories.list(user, scope="facts")} == {f.id for f in facts}

    # Deleting the episode forgets the facts drawn from it.
    await services.memories.delete(user, episode.id)
    assert await services.memories.list(user) == []


async def test_forgetting_a_conversation_or_a_message(services: Services) -> None:
    user = (await services.users.create("u")).id
    first = await services.conversations.create(user, "elara")
    second = await services.conversations.create(user, "elara")
    a1 = await services.conversations.add_message(first.id, "user", "My sister Ana lives in Berlin.")
    a2 = await services.conversations.add_message(first.id, "user", "I play the cello in an orchestra.")
    b1 = await services.conversations.add_message(second.id, "user", "I'm allergic to peanuts.")
    for conversation, message in ((first, a1), (first, a2), (second, b1)):
        await services.memories.extract(user, conversation.id, message.id, message.content)
    assert await services.memories.store.count(user) == 6
    other = (await services.users.create("other")).id
    assert await services.memories.forget(other, conversation_id=first.id) == 0  # not theirs

    assert await services.memories.forget(user, message_id=a2.id) == 2
    assert {m.source_message_id for m in await services.memories.list(user)} == {a1.id, b1.id}
    assert await services.memories.forget(user, conversation_id=first.id) == 2
    assert {m.source_message_id for m in await services.memories.list(user)} == {b1.id}
    found = await services.memories.search(user, "Where does my sister live?")
    assert all(m.source_message_id == b1.id for m in found)


async def test_at_the_cap_the_oldest_episodes_make_room(services: Services) -> None:
    memories = services.memories
    memories.config = dataclasses.replace(memories.config, max_per_user=4)
    user = (await services.users.create("u")).id
    note = await memories.add(user, "I am vegetarian.")
    for i, text in enumerate(FILLER[:5], start=1):
        await memories.extract(user, None, i, text, said_at=T0 + timedelta(minutes=i))
    kept = await memories.list(user, limit=10)
    assert len(kept) == 4
    assert note is not None and note.id in {m.id for m in kept}  # a note is never pushed out by episodes
    episodes = {m.source_message_id for m in kept if m.kind == "episode"}
    assert episodes and episodes == set(range(6 - len(episodes), 6))  # the newest ones
    assert {m.episode_id for m in kept if m.kind not in ("episode", "note")} <= {m.id for m in kept}
    assert memories.stats.evicted >= 2


async def test_deleting_a_conversation_can_forget_its_memories(
    app_services: Services, client: httpx.AsyncClient
) -> None:
    kept = await create_conversation(client)
    gone = await create_conversation(client)
    await chat(client, kept["id"], "I'm allergic to peanuts.")
    await chat(client, gone["id"], "My sister Ana lives in Berlin.")
    await app_services.memories.wait_idle()
    app = client
    assert len(await _memories(app)) == 4

    assert (await app.delete(f"/v1/conversations/{kept['id']}")).status_code == 204  # memories stay by default
    assert len(await _memories(app)) == 4
    response = await app.delete(f"/v1/conversations/{gone['id']}", params={"forget_memories": "true"})
    assert response.status_code == 204, response.text
    assert {m["text"] for m in await _memories(app)} == {"I'm allergic to peanuts.", "The user is allergic to peanuts."}
    response = await app.delete(f"/v1/conversations/{gone['id']}", params={"forget_memories": "true"})
    assert response.status_code == 404
    response = await app.delete("/v1/memories", params={"conversation_id": "not-a-uuid"})
    assert response.status_code == 422


async def _memories(client: httpx.AsyncClient) -> list[dict[str, object]]:
    response = await client.get("/v1/memories")
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]
