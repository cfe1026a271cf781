"""The service container: every backend and domain service, built once per app from settings.

Only this module and the CLI choose concrete backends; everything else receives what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from companion.cache.backend import CacheBackend
from companion.cache.breaker import CircuitBreaker
from companion.cache.invalidation import InvalidationListener
from companion.cache.local import LocalCache
from companion.cache.memory import MemoryBackend
from companion.cache.memory_search import MemorySearchCache
from companion.cache.redis import RedisBackend
from companion.cache.tiered import TieredCache
from companion.cache.topology import RedisOptions, distrust_after_failover, make_topology
from companion.chat.context import ContextAssembler
from companion.chat.runs import ReplyRuns
from companion.chat.service import ChatLimits, ChatService
from companion.chat.summary import Summarizer
from companion.config import Settings
from companion.conversations.buffer import ConversationBuffer, MemoryConversationBuffer, RedisConversationBuffer
from companion.conversations.service import ConversationService
from companion.conversations.turns import LocalTurnLock, RedisTurnLock, TurnLock
from companion.errors import SettingsError
from companion.llm.base import LLMProvider
from companion.llm.factory import build_provider
from companion.memory.embedder import Embedder, OnnxEmbedder
from companion.memory.pgvector import PgVectorStore, pgvector_ready
from companion.memory.service import MemoryConfig, MemoryService
from companion.memory.store import SqlVectorStore
from companion.overload.admission import Admission
from companion.overload.loop import LoopMonitor
from companion.personalities.cached import CachedPersonalityService
from companion.preferences.cached import CachedPreferenceService
from companion.ratelimit.limiter import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from companion.ratelimit.policy import RateLimitService
from companion.ratelimit.quotas import TokenQuotas
from companion.runs.log import RunLog
from companion.runs.memory import MemoryRunLog
from companion.runs.redis import RedisRunLog
from companion.sessions.service import SessionService
from companion.storage import migrate
from companion.storage.database import Database
from companion.types import Clock, utcnow
from companion.users.cached import CachedUserService


@dataclass
class Services:
    settings: Settings
    database: Database
    provider: LLMProvider
    users: CachedUserService
    personalities: CachedPersonalityService
    preferences: CachedPreferenceService
    conversations: ConversationService
    chat: ChatService
    clock: Clock
    cache: TieredCache
    sessions: SessionService
    memories: MemoryService
    summarizer: Summarizer
    buffer: ConversationBuffer
    rate_limits: RateLimitService
    quotas: TokenQuotas
    runs: ReplyRuns
    redis: RedisBackend | None = None
    listener: InvalidationListener | None = None
    admission: Admission | None = None
    loop: LoopMonitor | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        provider: LLMProvider | None = None,
        clock: Clock = utcnow,
        embedder: Embedder | None = None,
    ) -> Services:
        # Overload (docs/deployment.md): how late our own loop runs, so that no timeout blames a
        # dependency for it, and admission control in front of the work.
        loop = LoopMonitor()
        admission = Admission.build(
            max_turns=settings.admission_max_turns,
            turn_queue=settings.admission_turn_queue,
            max_requests=settings.admission_max_requests,
            request_queue=settings.admission_request_queue,
            queue_timeout=settings.admission_queue_timeout_seconds,
        )
        database = Database(
            settings.resolved_database_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            pool_size=settings.database_pool_size,
            pool_timeout=settings.database_pool_timeout_seconds,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            loop=loop,
            hide_parameters=settings.log_level != "DEBUG",
        )
        provider = provider or build_provider(settings)
        redis_backend: RedisBackend | None = None
        listener: InvalidationListener | None = None
        backend: CacheBackend
        local = LocalCache(max_entries=settings.cache_local_max_entries)
        if settings.redis_enabled:
            # Standalone, cluster or sentinel (REDIS_MODE): nothing below this line knows which.
            topology = make_topology(RedisOptions.from_settings(settings))
            breaker = CircuitBreaker(
                failure_threshold=settings.redis_breaker_failures, reset_seconds=settings.redis_breaker_reset_seconds
            )
            backend = redis_backend = RedisBackend(
                topology.client,
                breaker=breaker,
                topology=topology,
                loop=loop,
                timeout=settings.redis_socket_timeout_ms / 1000,
            )
            cache = TieredCache(backend, local=local)
            listener = InvalidationListener(topology, cache)
            if topology.mode != "standalone":
                redis_backend.on_recovery.append(distrust_after_failover(redis_backend, cache))
            redis_backend.on_recovery.append(cache.replay_pending)
            sessions = SessionService(
                backend,
                fallback=MemoryBackend(),
                ttl_seconds=settings.session_ttl_seconds,
                max_per_user=settings.sessions_max_per_user,
                clock=clock,
            )
            # Revocations made while Redis was unreachable are replayed as soon as it answers again.
            redis_backend.on_recovery.append(sessions.replay_pending)
            listener.on_connect.append(sessions.replay_pending)
        else:
            backend = MemoryBackend(max_entries=max(settings.cache_local_max_entries * 10, 10_000))
            cache = TieredCache(backend, local=local)
            # Sessions get their own store, not the shared cache's LRU: no amount of caching (or of one
            # user's sign-ins, capped per user) can evict another user's session.
            sessions = SessionService(
                MemoryBackend(max_entries=10_000_000),
                ttl_seconds=settings.session_ttl_seconds,
                max_per_user=settings.sessions_max_per_user,
                clock=clock,
            )
        limiter: RateLimiter
        if redis_backend is not None:
            limiter, limiter_fallback = RedisRateLimiter(redis_backend), MemoryRateLimiter()
        else:
            limiter, limiter_fallback = MemoryRateLimiter(), None
        rate_limits = RateLimitService(
            limiter,
            fallback=limiter_fallback,
            per_user_per_minute=settings.rate_limit_requests_per_minute,
            per_ip_per_minute=settings.rate_limit_ip_requests_per_minute,
            auth_failures_per_minute=settings.rate_limit_auth_failures_per_minute,
            route_overrides=settings.rate_limit_route_overrides,
            fail_closed=settings.rate_limit_fail_closed,
            enabled=settings.rate_limit_enabled,
        )
        quotas = TokenQuotas(
            database,
            backend,
            daily=settings.token_quota_daily,
            monthly=settings.token_quota_monthly,
            fallback=MemoryBackend() if redis_backend is not None else None,
            clock=clock,
        )
        conversations = ConversationService(database, clock, max_per_user=settings.conversations_max_per_user)
        personalities = CachedPersonalityService(
            database,
            cache,
            clock,
            ttl=settings.cache_personality_ttl_seconds,
            local_ttl=settings.cache_local_ttl_seconds,
            miss_ttl=settings.cache_miss_ttl_seconds,
            max_per_user=settings.personalities_max_per_user,
        )
        preferences = CachedPreferenceService(
            database,
            cache,
            clock,
            ttl=settings.cache_preferences_ttl_seconds,
            local_ttl=settings.cache_local_ttl_seconds,
        )
        buffer: ConversationBuffer
        turns: TurnLock
        if redis_backend is not None:
            buffer = RedisConversationBuffer(
                redis_backend,
                max_messages=settings.short_term_memory_size,
                ttl_seconds=settings.conversation_buffer_ttl_seconds,
            )
            turns = RedisTurnLock(redis_backend, wait_seconds=settings.turn_wait_seconds)
        else:
            buffer = MemoryConversationBuffer(
                max_messages=settings.short_term_memory_size, ttl_seconds=settings.conversation_buffer_ttl_seconds
            )
            turns = LocalTurnLock(wait_seconds=settings.turn_wait_seconds)
        summary_mode = settings.summary_mode
        if summary_mode == "auto":
            summary_mode = "llm" if settings.llm_provider == "openai" else "extractive"
        summarizer = Summarizer(
            database,
            cache,
            provider=provider,
            mode=summary_mode,
            window=settings.short_term_memory_size,
            batch=settings.summary_batch,
            clock=clock,
        )
        extractor = settings.memory_extractor
        if extractor == "auto":
            # A 135M local model extracts facts poorly and would hold the model between turns.
            extractor = "both" if settings.llm_provider == "openai" else "rules"
        embedder = embedder or OnnxEmbedder(threads=settings.memory_embedding_threads)
        memories = MemoryService(
            SqlVectorStore(database, model_id=embedder.model_id, dimensions=embedder.dimensions),
            embedder,
            MemorySearchCache(backend, stats=cache.stats, ttl_seconds=settings.cache_memory_search_ttl_seconds),
            provider=provider,
            config=MemoryConfig(
                enabled=settings.memory_enabled,
                extractor=extractor,
                top_k=settings.memory_top_k,
                recent=settings.memory_recent,
                min_score=settings.memory_min_score,
                dedupe_threshold=settings.memory_dedupe_threshold,
                deadline_seconds=settings.memory_retrieval_deadline_ms / 1000,
                max_per_user=settings.memory_max_per_user,
            ),
            clock=clock,
        )
        context = ContextAssembler(
            conversations=conversations,
            personalities=personalities,
            preferences=preferences,
            buffer=buffer,
            summarizer=summarizer,
            memories=memories,
            cache=cache,
            window=settings.short_term_memory_size,
        )
        chat = ChatService(
            conversations=conversations,
            context=context,
            provider=provider,
            turns=turns,
            quotas=quotas,
            limits=ChatLimits(
                max_message_chars=settings.max_message_chars,
                context_tokens=settings.llm_context_size,
                max_tokens=settings.llm_max_tokens,
                temperature=settings.llm_temperature,
                repeat_penalty=settings.llm_repeat_penalty,
                flush_interval_seconds=settings.stream_flush_interval_seconds,
                memory_tokens=settings.memory_token_budget,
                heartbeat_seconds=settings.reply_heartbeat_seconds,
            ),
        )
        shared_runs: RunLog | None = None
        if redis_backend is not None:
            shared_runs = RedisRunLog(
                redis_backend,
                ttl_seconds=settings.reply_events_ttl_seconds,
                max_entries=settings.reply_events_max_entries,
            )
        runs = ReplyRuns(
            chat,
            conversations,
            local=MemoryRunLog(ttl_seconds=min(settings.reply_events_ttl_seconds, 300.0)),
            shared=shared_runs,
            flush_seconds=settings.stream_flush_interval_seconds,
            heartbeat_seconds=settings.reply_heartbeat_seconds,
            stale_seconds=settings.reply_stale_seconds,
            clock=clock,
        )
        return cls(
            settings=settings,
            database=database,
            provider=provider,
            users=CachedUserService(
                database,
                cache,
                clock,
                local_ttl=settings.cache_local_ttl_seconds,
                max_keys_per_user=settings.api_keys_max_per_user,
                last_used_flush_seconds=settings.api_key_last_used_flush_seconds,
            ),
            personalities=personalities,
            preferences=preferences,
            conversations=conversations,
            chat=chat,
            clock=clock,
            cache=cache,
            sessions=sessions,
            memories=memories,
            rate_limits=rate_limits,
            quotas=quotas,
            runs=runs,
            summarizer=summarizer,
            buffer=buffer,
            redis=redis_backend,
            listener=listener,
            admission=admission,
            loop=loop,
        )

    async def start(self, *, load_model: bool = True) -> None:
        """Migrate (if AUTO_MIGRATE), seed the global personalities, settle the replies whose server
        died and start watching for more, and load the model. Raises ServiceUnavailable if the
        database cannot be reached."""
        if self.loop is not None:
            self.loop.start()
        if self.settings.auto_migrate:
            await migrate.upgrade(self.database)
        await self._choose_vector_store()
        await self.personalities.ensure_builtins()
        await self.runs.open()
        if self.listener is not None:
            self.listener.start()
        self.users.start()
        if load_model:
            await self.provider.start()
            await self.memories.start()

    async def _choose_vector_store(self) -> None:
        """pgvector where the database has it (MEMORY_VECTOR_STORE=auto), else exact numpy search."""
        wanted = self.settings.memory_vector_store
        if wanted == "numpy":
            return
        if await pgvector_ready(self.database):
            embedder = self.memories.embedder
            self.memories.store = PgVectorStore(
                self.database, model_id=embedder.model_id, dimensions=embedder.dimensions
            )
        elif wanted == "pgvector":
            raise SettingsError(
                "MEMORY_VECTOR_STORE=pgvector needs PostgreSQL with the pgvector extension installed and "
                "`companion db upgrade` run after it; set MEMORY_VECTOR_STORE=auto to fall back to numpy."
            )

    async def aclose(self) -> None:
        await self.users.aclose()
        await self.runs.aclose()
        await self.summarizer.wait_idle()
        await self.memories.aclose()
        if self.listener is not None:
            await self.listener.aclose()
        await self.cache.backend.aclose()
        await self.provider.aclose()
        await self.database.dispose()
        if self.loop is not None:
            self.loop.stop()
