"""The service container: every backend and domain service, built once per app from settings.

Only this module and the CLI choose concrete backends; everything else receives what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from companion.chat.service import ChatLimits, ChatService
from companion.config import Settings
from companion.conversations.service import ConversationService
from companion.llm.base import LLMProvider
from companion.llm.factory import build_provider
from companion.personalities.service import PersonalityService
from companion.preferences.service import PreferenceService
from companion.storage import migrate
from companion.storage.database import Database
from companion.types import Clock, utcnow
from companion.users.service import UserService


@dataclass
class Services:
    settings: Settings
    database: Database
    provider: LLMProvider
    users: UserService
    personalities: PersonalityService
    preferences: PreferenceService
    conversations: ConversationService
    chat: ChatService
    clock: Clock

    @classmethod
    def build(cls, settings: Settings, *, provider: LLMProvider | None = None, clock: Clock = utcnow) -> Services:
        database = Database(
            settings.resolved_database_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            pool_size=settings.database_pool_size,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        )
        provider = provider or build_provider(settings)
        conversations = ConversationService(database, clock)
        personalities = PersonalityService(database, clock)
        preferences = PreferenceService(database, clock)
        chat = ChatService(
            conversations=conversations,
            personalities=personalities,
            preferences=preferences,
            provider=provider,
            limits=ChatLimits(
                short_term_memory_size=settings.short_term_memory_size,
                max_message_chars=settings.max_message_chars,
                context_tokens=settings.llm_context_size,
                max_tokens=settings.llm_max_tokens,
                temperature=settings.llm_temperature,
                repeat_penalty=settings.llm_repeat_penalty,
                flush_interval_seconds=settings.stream_flush_interval_seconds,
            ),
        )
        return cls(
            settings=settings,
            database=database,
            provider=provider,
            users=UserService(database, clock),
            personalities=personalities,
            preferences=preferences,
            conversations=conversations,
            chat=chat,
            clock=clock,
        )

    async def start(self, *, load_model: bool = True) -> None:
        """Migrate (if AUTO_MIGRATE), seed the global personalities, recover interrupted replies,
        and load the model. Raises ServiceUnavailable if the database cannot be reached."""
        if self.settings.auto_migrate:
            await migrate.upgrade(self.database)
        await self.personalities.ensure_builtins()
        await self.conversations.recover_interrupted(older_than=self.clock() - timedelta(minutes=10))
        if load_model:
            await self.provider.start()

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.database.dispose()
