"""Server-side sessions on both backends: tokens that authenticate (and only those), a sliding
expiry, per-user listing and revocation, and sign-ins that keep working while Redis is down."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.cache.breaker import CircuitBreaker
from companion.cache.memory import MemoryBackend
from companion.errors import Conflict, NotFound
from companion.sessions.service import RevocationDeferred, SessionService, parse_token
from tests.cache.helpers import BackendCase, FakeClock
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import contract_backend

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
TTL = 10.0  # seconds: fake ones on the memory backend; on Redis only PTTL is looked at


def _sessions(case: BackendCase, **options: object) -> SessionService:
    return SessionService(case.backend, ttl_seconds=TTL, **options)  # type: ignore[arg-type]


def _with_secret(token: str, secret: str) -> str:
    head, _, _ = token.rpartition(".")
    return f"{head}.{secret}"


async def test_a_created_session_authenticates(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend, clock=lambda: datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    token, info = await sessions.create(ALICE, user_agent="Firefox/128")
    assert token.startswith("cms_" + ALICE.hex + ".")
    found = await sessions.authenticate(token)
    assert found == info
    assert (found.user_id, found.user_agent) == (ALICE, "Firefox/128")
    assert found.created_at == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


async def test_the_secret_is_not_stored(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, info = await sessions.create(ALICE)
    secret = token.rsplit(".", 1)[1]
    stored = await cache_backend.backend.get(keys.session(ALICE, info.id))
    assert stored is not None and secret.encode() not in stored


async def test_a_wrong_secret_is_refused(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, _ = await sessions.create(ALICE)
    assert await sessions.authenticate(_with_secret(token, "wrong")) is None
    assert await sessions.authenticate(_with_secret(token, "")) is None
    assert await sessions.authenticate(token + "x") is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "cms_",
        "cms_x",
        "cms_a.b",
        "cms_a.b.c.d",
        "cms_nothex.0123456789abcdef.secret",
        "cms_" + "0" * 31 + ".0123456789abcdef.secret",
        "sk-" + "0" * 40,
        "CMS_" + ALICE.hex + ".0123456789abcdef.secret",
        "cms_" + ALICE.hex + ".0123456789abcdef." + "s" * 200,
        "cms_" + ALICE.hex + ".*.secret",
        "cms_" + ALICE.hex + "..secret",
    ],
)
async def test_a_malformed_token_is_refused(cache_backend: BackendCase, token: str) -> None:
    sessions = _sessions(cache_backend)
    await sessions.create(ALICE)
    assert await sessions.authenticate(token) is None


async def test_a_token_naming_another_user_is_refused(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, info = await sessions.create(ALICE)
    parsed = parse_token(token)
    assert parsed is not None
    _, session_id, secret = parsed
    assert await sessions.authenticate(f"cms_{BOB.hex}.{session_id}.{secret}") is None
    assert await sessions.authenticate(token) == info


async def test_authenticate_slides_the_expiry(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, info = await sessions.create(ALICE)
    session_key, index_key = keys.session(ALICE, info.id), keys.session_index(ALICE)
    if cache_backend.redis is not None:
        redis = cache_backend.redis
        assert 0 < await redis.pttl(session_key) <= TTL * 1000
        await redis.pexpire(session_key, 1000)  # as if most of its life had passed
        await redis.pexpire(index_key, 1000)
        assert await sessions.authenticate(token) == info
        assert await redis.pttl(session_key) > 1000
        assert await redis.pttl(index_key) > 1000
    else:
        clock = cache_backend.clock
        assert clock is not None
        clock.advance(TTL * 0.8)
        assert await sessions.authenticate(token) == info
        clock.advance(TTL * 0.8)  # past the first expiry: alive only because it slid
        assert await sessions.authenticate(token) == info
        assert [s.id for s in await sessions.list(ALICE)] == [info.id]


async def test_an_unused_session_expires(cache_backend: BackendCase) -> None:
    sessions = SessionService(cache_backend.backend, ttl_seconds=cache_backend.short_ttl)
    token, info = await sessions.create(ALICE)

    async def expired() -> bool:  # looks without authenticating, which would slide the expiry
        return await cache_backend.backend.get(keys.session(ALICE, info.id)) is None

    await cache_backend.after_ttl(expired, key=keys.session(ALICE, info.id))
    assert await sessions.authenticate(token) is None
    assert await sessions.list(ALICE) == []


async def test_list_shows_only_the_users_own_sessions_oldest_first(cache_backend: BackendCase) -> None:
    ticks = iter(range(1, 100))
    sessions = _sessions(cache_backend, clock=lambda: datetime(2024, 1, 1, 0, 0, next(ticks), tzinfo=UTC))
    _, first = await sessions.create(ALICE, user_agent="one")
    _, theirs = await sessions.create(BOB)
    _, second = await sessions.create(ALICE, user_agent="two")
    listed = await sessions.list(ALICE)
    assert listed == [first, second]
    assert [s.id for s in await sessions.list(BOB)] == [theirs.id]
    assert await sessions.list(uuid.uuid4()) == []
    assert all("secret" not in s.model_dump_json() for s in listed)


async def test_a_revoked_session_no_longer_authenticates_nor_is_listed(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, info = await sessions.create(ALICE)
    other_token, other = await sessions.create(ALICE)
    await sessions.revoke(ALICE, info.id)
    assert await sessions.authenticate(token) is None
    assert await sessions.list(ALICE) == [other]
    assert await sessions.authenticate(other_token) == other


async def test_revoking_an_unknown_session_is_not_found(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    with pytest.raises(NotFound):
        await sessions.revoke(ALICE, "0123456789abcdef")
    _, info = await sessions.create(ALICE)
    await sessions.revoke(ALICE, info.id)
    with pytest.raises(NotFound):
        await sessions.revoke(ALICE, info.id)  # twice


async def test_a_user_cannot_revoke_another_users_session(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    token, info = await sessions.create(ALICE)
    with pytest.raises(NotFound):
        await sessions.revoke(BOB, info.id)
    assert await sessions.authenticate(token) == info


async def test_list_tidies_expired_sessions_out_of_the_index(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend)
    _, gone = await sessions.create(ALICE)
    _, kept = await sessions.create(ALICE)
    await cache_backend.backend.delete(keys.session(ALICE, gone.id))  # as an expiry would
    assert await sessions.list(ALICE) == [kept]
    assert await cache_backend.backend.smembers(keys.session_index(ALICE)) == {kept.id}


# --- Redis down, in-process fallback -------------------------------------------------------------------


def _redis_sessions(url: str, fallback: MemoryBackend) -> SessionService:
    backend = contract_backend(url, breaker=CircuitBreaker(clock=FakeClock()))
    return SessionService(backend, fallback=fallback, ttl_seconds=TTL)


async def test_with_redis_down_sessions_live_in_the_fallback(redis_server: RedisServer, redis_url: str) -> None:
    sessions = _redis_sessions(redis_url, MemoryBackend())
    try:
        redis_server.stop()
        token, info = await sessions.create(ALICE)
        assert await sessions.authenticate(token) == info
        assert await sessions.authenticate(_with_secret(token, "wrong")) is None
        assert await sessions.list(ALICE) == [info]
        await sessions.revoke(ALICE, info.id)
        assert await sessions.authenticate(token) is None
    finally:
        await sessions._backend.aclose()


async def test_a_session_made_while_redis_was_down_keeps_working_after_it_is_back(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    sessions = _redis_sessions(redis_url, MemoryBackend(clock=clock))
    try:
        redis_server.stop()
        token, info = await sessions.create(ALICE)
        redis_server.start()
        _, later = await sessions.create(ALICE)  # in Redis
        assert await sessions.authenticate(token) == info
        assert {s.id for s in await sessions.list(ALICE)} == {info.id, later.id}
        clock.advance(TTL * 0.8)
        assert await sessions.authenticate(token) == info  # slides in the fallback too
        clock.advance(TTL * 0.8)
        assert await sessions.authenticate(token) == info
        await sessions.revoke(ALICE, info.id)
        assert await sessions.authenticate(token) is None
        assert [s.id for s in await sessions.list(ALICE)] == [later.id]
    finally:
        await sessions._backend.aclose()


async def test_without_a_fallback_an_unreachable_redis_is_reported(redis_server: RedisServer, redis_url: str) -> None:
    backend = contract_backend(redis_url, breaker=CircuitBreaker(clock=FakeClock()))
    sessions = SessionService(backend, ttl_seconds=TTL)
    try:
        redis_server.stop()
        with pytest.raises(CacheUnavailable):
            await sessions.create(ALICE)
    finally:
        await backend.aclose()


# --- sign-out during a Redis outage (issue 15, item 2) ---------------------------------------------


async def test_a_sign_out_while_redis_is_down_says_so_is_refused_here_and_replayed_when_it_is_back(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    here = SessionService(
        contract_backend(redis_url, breaker=CircuitBreaker(clock=clock)),
        fallback=MemoryBackend(),
        ttl_seconds=TTL,
    )
    elsewhere = _redis_sessions(redis_url, MemoryBackend())  # another instance
    try:
        token, info = await here.create(ALICE)
        assert await elsewhere.authenticate(token) == info
        redis_server.stop(keep_data=True)  # Redis comes back with the session still in it
        with pytest.raises(RevocationDeferred) as deferred:
            await here.sign_out(token)
        assert deferred.value.status_code == 503
        assert here.pending_revocations == 1
        assert await here.authenticate(token) is None  # refused here at once

        redis_server.start()
        clock.advance(60)  # the breaker lets a trial through again
        await here.replay_pending()  # what the breaker's recovery and the channel's reconnect call
        assert here.pending_revocations == 0
        assert await elsewhere.authenticate(token) is None
        assert await here.authenticate(token) is None
        assert await here.list(ALICE) == []
    finally:
        await here._backend.aclose()  # type: ignore[attr-defined]
        await elsewhere._backend.aclose()  # type: ignore[attr-defined]


async def test_a_deferred_revocation_is_replayed_by_the_next_session_operation(
    redis_server: RedisServer, redis_url: str
) -> None:
    clock = FakeClock()
    here = SessionService(
        contract_backend(redis_url, breaker=CircuitBreaker(clock=clock)),
        fallback=MemoryBackend(),
        ttl_seconds=TTL,
    )
    try:
        token, info = await here.create(ALICE)
        _, kept = await here.create(ALICE)
        redis_server.stop(keep_data=True)
        with pytest.raises(RevocationDeferred):
            await here.revoke(ALICE, info.id)
        redis_server.start()
        clock.advance(60)
        assert [s.id for s in await here.list(ALICE)] == [kept.id]
        assert await here.authenticate(token) is None
        assert here.pending_revocations == 0
    finally:
        await here._backend.aclose()  # type: ignore[attr-defined]


async def test_one_user_cannot_hold_more_than_the_session_cap(cache_backend: BackendCase) -> None:
    sessions = _sessions(cache_backend, max_per_user=3)
    for _ in range(3):
        await sessions.create(ALICE)
    with pytest.raises(Conflict) as refused:
        await sessions.create(ALICE)
    assert refused.value.code == "too_many_sessions"
    await sessions.create(BOB)  # others are not affected


async def test_concurrent_sign_ins_on_two_instances_stop_exactly_at_the_cap(cache_backend: BackendCase) -> None:
    """Counting the sessions and then writing one let every sign-in in flight see room under the
    cap; the count and the write are now one step, so exactly the cap is stored."""
    cap, attempts = 3, 12
    instances = [_sessions(cache_backend, max_per_user=cap) for _ in range(2)]
    # One sign-in first, which also loads the script: on the test cluster, a burst of first calls
    # (NOSCRIPT, then SCRIPT LOAD on every primary at once) sometimes has a connection closed.
    await instances[0].create(ALICE)
    results = await asyncio.gather(
        *(instances[index % 2].create(ALICE) for index in range(attempts)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, Conflict) and r.code == "too_many_sessions" for r in refused), refused
    assert (attempts - len(refused), len(refused)) == (cap - 1, attempts - cap + 1)
    assert len(await instances[1].list(ALICE)) == cap
    assert len(await cache_backend.backend.smembers(keys.session_index(ALICE))) == cap
