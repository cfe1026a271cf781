"""The vector store contract, on SQLite and PostgreSQL: exact cosine search (checked against a
brute-force numpy ranking), one user's memories only, every change bumping the user's generation in
the same transaction, and the in-memory matrix reused until a change and never after one."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from companion.errors import NotFound
from companion.memory.store import NewMemory, SqlVectorStore
from companion.services import Services

DIMS = 384
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def memory(text: str, seed: int, **fields: object) -> NewMemory:
    return NewMemory(text=text, kind="fact", vector=unit(seed), **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(services: Services) -> SqlVectorStore:
    return SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS)


@pytest.fixture
async def alice(services: Services) -> uuid.UUID:
    return (await services.users.create("alice")).id


@pytest.fixture
async def bob(services: Services) -> uuid.UUID:
    return (await services.users.create("bob")).id


async def test_search_is_exact_cosine_ranking(store: SqlVectorStore, alice: uuid.UUID) -> None:
    vectors = [unit(i) for i in range(60)]
    for i, vector in enumerate(vectors):
        await store.add(alice, NewMemory(f"m{i}", "fact", vector), T0 + timedelta(seconds=i))
    query = unit(1000)
    expected = sorted(range(60), key=lambda i: -float(vectors[i] @ query))[:7]
    found = await store.search(alice, query, 7)
    assert [m.text for m in found] == [f"m{i}" for i in expected]
    assert [m.score for m in found] == [round(float(vectors[i] @ query), 4) for i in expected]
    assert (await store.search(alice, vectors[5], 1))[0].text == "m5"


async def test_min_score_and_k_bound_the_results(store: SqlVectorStore, alice: uuid.UUID) -> None:
    await store.add(alice, memory("close", 1), T0)
    await store.add(alice, memory("far", 2), T0)
    assert [m.text for m in await store.search(alice, unit(1), 5, min_score=0.99)] == ["close"]
    assert len(await store.search(alice, unit(1), 1)) == 1
    assert await store.search(alice, unit(1), 0) == []


async def test_one_users_memories_are_invisible_to_another(
    store: SqlVectorStore, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    mine = await store.add(alice, memory("alice's secret", 1), T0)
    await store.add(bob, memory("bob's note", 2), T0)
    assert [m.text for m in await store.search(bob, unit(1), 10)] == ["bob's note"]
    assert [m.text for m in await store.list(bob, limit=10)] == ["bob's note"]
    assert [m.text for m in await store.recent(bob, 10)] == ["bob's note"]
    with pytest.raises(NotFound):
        await store.delete(bob, mine.id)
    with pytest.raises(NotFound):
        await store.replace(bob, mine.id, memory("overwritten", 3), T0)
    assert await store.delete_all(bob) == 1
    assert [m.text for m in await store.list(alice, limit=10)] == ["alice's secret"]


async def test_every_change_bumps_the_generation(store: SqlVectorStore, alice: uuid.UUID, bob: uuid.UUID) -> None:
    seen = [await store.generation(alice)]
    first = await store.add(alice, memory("a", 1), T0)
    seen.append(await store.generation(alice))
    await store.replace(alice, first.id, memory("a, restated", 1), T0 + timedelta(hours=1))
    seen.append(await store.generation(alice))
    second = await store.add(alice, memory("b", 2), T0)
    await store.delete(alice, second.id)
    seen.append(await store.generation(alice))
    await store.delete_all(alice)
    seen.append(await store.generation(alice))
    assert seen == sorted(set(seen)), seen  # strictly increasing
    assert await store.generation(bob) == 0
    assert await store.generation(uuid.uuid4()) == 0  # unknown user: nothing, not an error


async def test_the_matrix_is_loaded_once_per_generation(store: SqlVectorStore, alice: uuid.UUID) -> None:
    await store.add(alice, memory("a", 1), T0)
    generation = await store.generation(alice)
    for _ in range(5):
        await store.search(alice, unit(1), 3, generation=generation)
    assert store.loads == 1
    await store.add(alice, memory("b", 2), T0)
    found = await store.search(alice, unit(2), 1, generation=await store.generation(alice))
    assert found[0].text == "b" and store.loads == 1  # the change made here was applied, not reloaded


async def test_a_change_made_through_another_store_is_seen_at_once(
    services: Services, store: SqlVectorStore, alice: uuid.UUID
) -> None:
    """Two instances: each has its own matrix; the generation in the database keeps them honest."""
    other = SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS)
    kept = await store.add(alice, memory("forget me", 1), T0)
    assert [m.text for m in await other.search(alice, unit(1), 1, generation=await other.generation(alice))] == [
        "forget me"
    ]
    await store.delete(alice, kept.id)
    assert await other.search(alice, unit(1), 1, generation=await other.generation(alice)) == []
    assert await other.search(alice, unit(1), 1) == []  # without a generation: reads the current one


async def test_fields_round_trip(store: SqlVectorStore, alice: uuid.UUID, services: Services) -> None:
    conversation = await services.conversations.create(alice, "elara")
    kept = await store.add(
        alice, memory("likes tea", 1, conversation_id=conversation.id, source_message_id=42), T0
    )
    (listed,) = await store.list(alice, limit=5)
    assert listed == kept
    assert (listed.conversation_id, listed.source_message_id, listed.created_at) == (conversation.id, 42, T0)
    replaced = await store.replace(alice, kept.id, memory("likes green tea", 1), T0 + timedelta(days=1))
    assert (replaced.id, replaced.created_at, replaced.updated_at) == (kept.id, T0, T0 + timedelta(days=1))
    assert (await store.search(alice, unit(1), 1))[0].text == "likes green tea"


async def test_list_and_recent_are_newest_first_and_paged(store: SqlVectorStore, alice: uuid.UUID) -> None:
    for i in range(5):
        await store.add(alice, memory(f"m{i}", i), T0 + timedelta(minutes=i))
    assert [m.text for m in await store.list(alice, limit=2)] == ["m4", "m3"]
    assert [m.text for m in await store.list(alice, limit=2, offset=2)] == ["m2", "m1"]
    assert [m.text for m in await store.recent(alice, 3)] == ["m4", "m3", "m2"]
    assert await store.count(alice) == 5


async def test_vectors_of_another_model_are_not_searched(services: Services, alice: uuid.UUID) -> None:
    old = SqlVectorStore(services.database, model_id="old-model", dimensions=DIMS)
    new = SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS)
    await old.add(alice, memory("embedded by the old model", 1), T0)
    assert await new.search(alice, unit(1), 5) == []
    assert [m.text for m in await new.list(alice, limit=5)] == ["embedded by the old model"]  # still the user's


async def test_changes_made_here_update_the_cached_matrix_without_a_reload(
    store: SqlVectorStore, alice: uuid.UUID
) -> None:
    first = await store.add(alice, memory("a", 1), T0)
    await store.search(alice, unit(1), 1)  # loads the matrix
    assert store.loads == 1
    second = await store.add(alice, memory("b", 2), T0 + timedelta(seconds=1))
    await store.replace(alice, first.id, memory("a, restated", 3), T0 + timedelta(seconds=2))
    found = await store.search(alice, unit(3), 2, generation=await store.generation(alice))
    assert [m.text for m in found] == ["a, restated", "b"]
    await store.delete(alice, second.id)
    assert [m.text for m in await store.search(alice, unit(2), 5, generation=await store.generation(alice))] == [
        "a, restated"
    ]
    await store.delete_all(alice)
    assert await store.search(alice, unit(3), 5, generation=await store.generation(alice)) == []
    assert store.loads == 1  # every state above came from applying the change, never from a reload
    fresh = SqlVectorStore(store._db, model_id="test-model", dimensions=DIMS)
    assert await fresh.search(alice, unit(3), 5) == []  # and the database agrees


async def test_a_change_from_elsewhere_is_not_patched_in_but_reloaded(
    services: Services, store: SqlVectorStore, alice: uuid.UUID
) -> None:
    other = SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS)
    await store.add(alice, memory("a", 1), T0)
    await store.search(alice, unit(1), 1)
    await other.add(alice, memory("b", 2), T0)  # another instance: this one's matrix is now behind
    await store.add(alice, memory("c", 3), T0)  # two generations ahead of the cached matrix: dropped
    found = await store.search(alice, unit(2), 3, generation=await store.generation(alice))
    assert sorted(m.text for m in found) == ["a", "b", "c"]
    assert store.loads == 2


async def test_concurrent_searches_on_a_cold_cache_load_the_matrix_once(store: SqlVectorStore, alice: uuid.UUID) -> None:
    for i in range(20):
        await store.add(alice, memory(f"m{i}", i), T0)
    cold = SqlVectorStore(store._db, model_id="test-model", dimensions=DIMS)
    generation = await cold.generation(alice)
    results = await asyncio.gather(*(cold.search(alice, unit(i), 1, generation=generation) for i in range(10)))
    assert [r[0].text for r in results] == [f"m{i}" for i in range(10)]
    assert cold.loads == 1


async def test_the_cached_matrices_stay_within_a_budget_of_memories(
    services: Services, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    store = SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS, max_cached_memories=4)
    await store.add_many(alice, [memory(f"a{i}", i) for i in range(3)], T0)
    await store.add_many(bob, [memory(f"b{i}", 10 + i) for i in range(3)], T0)
    alice_at, bob_at = await store.generation(alice), await store.generation(bob)
    await store.search(alice, unit(1), 1, generation=alice_at)
    await store.search(bob, unit(11), 1, generation=bob_at)  # 6 memories: alice's matrix makes room
    assert store.loads == 2
    await store.search(bob, unit(11), 1, generation=bob_at)
    assert store.loads == 2
    await store.search(alice, unit(1), 1, generation=alice_at)
    assert store.loads == 3  # loaded again
    # A single user above the budget is still kept (a search needs its matrix).
    assert [m.text for m in await store.search(alice, unit(1), 1, generation=alice_at)] == ["a1"] and store.loads == 3
