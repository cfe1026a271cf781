"""The pgvector store, on a private PostgreSQL 16 with the pgvector extension (tests/support/pg_proc.py):
the migration adds the native vector column (and fills it for memories written before), the service
picks the pgvector store where it can, and the store keeps the contract: exact cosine ranking equal to
the numpy store's on the same data, one user's memories only, a generation bump per change, and a
deleted memory gone from the very next recall."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from companion.errors import NotFound, SettingsError
from companion.llm.scripted import ScriptedProvider
from companion.memory.pgvector import PgVectorStore, pgvector_ready
from companion.memory.store import NewMemory, SqlVectorStore, to_bytes
from companion.services import Services
from companion.storage import migrate
from companion.storage.database import Database
from tests.conftest import make_settings
from tests.support.pg_proc import pgvector_server

DIMS = 384
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def memory(text: str, seed: int) -> NewMemory:
    return NewMemory(text=text, kind="fact", vector=unit(seed))


@pytest.fixture(scope="module")
def pgvector_admin() -> Iterator[str]:
    with pgvector_server() as url:
        yield url


@pytest.fixture
async def empty_url(pgvector_admin: str) -> AsyncIterator[str]:
    """A new, empty database on the pgvector server, dropped afterwards."""
    name = f"companion_pgv_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pgvector_admin, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield pgvector_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    admin = await asyncpg.connect(pgvector_admin, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def services(empty_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    built = Services.build(make_settings(empty_url, tmp_path, auto_migrate=True), provider=ScriptedProvider())
    await built.start()
    yield built
    await built.aclose()


@pytest.fixture
async def store(services: Services) -> PgVectorStore:
    assert isinstance(services.memories.store, PgVectorStore)
    return PgVectorStore(services.database, model_id="test-model", dimensions=DIMS)


async def test_the_service_picks_pgvector_where_the_database_has_it(services: Services) -> None:
    assert await pgvector_ready(services.database)
    assert isinstance(services.memories.store, PgVectorStore)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_without_the_extension_the_numpy_store_is_used_and_insisting_fails_clearly(
    database_url: str, tmp_path: Path
) -> None:
    plain = Services.build(make_settings(database_url, tmp_path), provider=ScriptedProvider())
    await plain.start()
    try:
        assert not await pgvector_ready(plain.database)
        assert type(plain.memories.store) is SqlVectorStore
    finally:
        await plain.aclose()
    insisting = Services.build(
        make_settings(database_url, tmp_path, memory_vector_store="pgvector"), provider=ScriptedProvider()
    )
    try:
        with pytest.raises(SettingsError, match="MEMORY_VECTOR_STORE=pgvector needs PostgreSQL with the pgvector"):
            await insisting.start()
    finally:
        await insisting.aclose()


async def test_numpy_can_be_chosen_even_where_pgvector_exists(empty_url: str, tmp_path: Path) -> None:
    built = Services.build(
        make_settings(empty_url, tmp_path, auto_migrate=True, memory_vector_store="numpy"), provider=ScriptedProvider()
    )
    await built.start()
    try:
        assert type(built.memories.store) is SqlVectorStore
    finally:
        await built.aclose()


async def test_ranking_and_scores_equal_the_numpy_store_on_the_same_data(
    services: Services, store: PgVectorStore
) -> None:
    user = (await services.users.create("u")).id
    for i in range(60):
        await store.add(user, memory(f"m{i}", i), T0 + timedelta(seconds=i))
    numpy_store = SqlVectorStore(services.database, model_id="test-model", dimensions=DIMS)
    for seed in (1000, 1001, 5):
        query = unit(seed)
        in_database = await store.search(user, query, 7)
        in_numpy = await numpy_store.search(user, query, 7)
        assert [m.id for m in in_database] == [m.id for m in in_numpy]
        assert np.allclose([m.score for m in in_database], [m.score for m in in_numpy], atol=2e-4)
    assert [m.text for m in await store.search(user, unit(1), 5, min_score=0.99)] == ["m1"]
    assert await store.search(user, unit(1), 0) == []


async def test_one_users_memories_are_invisible_to_another_and_changes_bump_the_generation(
    services: Services, store: PgVectorStore
) -> None:
    alice = (await services.users.create("alice")).id
    bob = (await services.users.create("bob")).id
    before = await store.generation(alice)
    secret = await store.add(alice, memory("alice's secret", 1), T0)
    assert await store.generation(alice) == before + 1
    assert await store.search(bob, unit(1), 5) == []
    with pytest.raises(NotFound):
        await store.delete(bob, secret.id)
    with pytest.raises(NotFound):
        await store.replace(bob, secret.id, memory("overwritten", 2), T0)
    await store.replace(alice, secret.id, memory("alice's new secret", 2), T0 + timedelta(days=1))
    (found,) = await store.search(alice, unit(2), 1)
    assert (found.id, found.text, found.score) == (secret.id, "alice's new secret", 1.0)
    await store.delete(alice, secret.id)
    assert await store.search(alice, unit(2), 5) == []
    assert await store.generation(alice) == before + 3


async def test_memories_written_before_the_migration_are_filled_in(empty_url: str) -> None:
    database = Database(empty_url)
    try:
        await migrate.upgrade(database, "0003")  # the schema before pgvector's column
        admin = await asyncpg.connect(empty_url.replace("+asyncpg", ""), timeout=5)
        try:
            user, kept_id = uuid.uuid4(), uuid.uuid4()
            await admin.execute("INSERT INTO users (id, name, created_at) VALUES ($1, 'old', now())", user)
            # Written as the code of that time wrote it (today's store needs today's columns).
            await admin.execute(
                "INSERT INTO memories (id, user_id, text, kind, embedding, model, created_at, updated_at) "
                "VALUES ($1, $2, 'from before pgvector', 'fact', $3, 'test-model', $4, $4)",
                kept_id,
                user,
                to_bytes(unit(7)),
                T0,
            )
        finally:
            await admin.close()
        await migrate.upgrade(database)
        assert await pgvector_ready(database)
        store = PgVectorStore(database, model_id="test-model", dimensions=DIMS)
        (found,) = await store.search(user, unit(7), 1)
        assert (found.id, found.score) == (kept_id, 1.0)
        assert found.said_at == T0  # a memory from before 0005 was said when it was stored
    finally:
        await database.dispose()


async def test_a_fact_is_recalled_through_pgvector_and_gone_from_the_next_recall_once_deleted(
    services: Services,
) -> None:
    user = (await services.users.create("u")).id
    kept = await services.memories.add(user, "My sister Ana lives in Berlin.")
    assert kept is not None
    await services.memories.add(user, "I play the cello in an orchestra.")
    found = await services.memories.recall(user, "Where does my sister live?")
    assert found[0].text == "My sister Ana lives in Berlin."  # a note, as written
    await services.memories.delete(user, kept.id)
    assert "The user's sister Ana lives in Berlin." not in [
        m.text for m in await services.memories.recall(user, "Where does my sister live?")
    ]
