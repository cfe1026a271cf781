"""Settings: one pydantic-settings class read from the environment and `.env` (environment wins).

Nothing is built at import time; `load_settings()` is called by the app factory and the CLI, and turns
a validation failure into `SettingsError`, whose message names the variable but never its value.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from companion.errors import SettingsError

DEFAULT_DATA_DIR = Path("data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    data_dir: Path = DEFAULT_DATA_DIR
    # Empty means "a SQLite file in DATA_DIR"; resolved in `resolved_database_url`.
    database_url: SecretStr = SecretStr("")
    database_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # How long a request may wait for a pooled connection when all are in use: past it the answer
    # is 503 `overloaded` (busy), not "database unavailable". Longer than the connect timeout.
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)
    auto_migrate: bool = True

    redis_enabled: bool = False
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_socket_timeout_ms: int = Field(default=250, ge=1, le=60_000)
    redis_connect_timeout_ms: int = Field(default=250, ge=1, le=60_000)
    redis_retries: int = Field(default=1, ge=0, le=10)
    redis_max_connections: int = Field(default=64, ge=1, le=10_000)
    redis_health_check_interval_seconds: int = Field(default=15, ge=0, le=3600)
    redis_breaker_failures: int = Field(default=3, ge=1, le=1000)
    redis_breaker_reset_seconds: float = Field(default=2.0, gt=0, le=600)
    # Topology (companion/cache/topology.py): auto detects a cluster at start from REDIS_URL's server.
    redis_mode: Literal["auto", "standalone", "cluster", "sentinel"] = "auto"
    # Sentinel mode: "host:port,host:port,..." and the monitored primary's name. REDIS_URL then gives
    # only the credentials, TLS options and database for the primary (its host and port are ignored).
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None  # for sentinels with their own requirepass

    cache_personality_ttl_seconds: float = Field(default=3600, gt=0)
    cache_preferences_ttl_seconds: float = Field(default=300, gt=0)
    cache_local_ttl_seconds: float = Field(default=60, gt=0)
    cache_miss_ttl_seconds: float = Field(default=30, gt=0)
    cache_local_max_entries: int = Field(default=10_000, ge=1)
    session_ttl_seconds: float = Field(default=12 * 3600, gt=0)
    # The web page's session cookie is sent only over HTTPS when true; off for plain local http.
    session_cookie_secure: bool = False

    rate_limit_enabled: bool = True
    rate_limit_requests_per_minute: int = Field(default=30, ge=1, le=1_000_000)
    rate_limit_ip_requests_per_minute: int = Field(default=120, ge=1, le=1_000_000)
    rate_limit_auth_failures_per_minute: int = Field(default=10, ge=1, le=1_000_000)
    # JSON, e.g. {"POST /v1/chat/completions": 10}: per-user requests per minute for one route.
    rate_limit_route_overrides: dict[str, int] = Field(default_factory=dict)
    rate_limit_fail_closed: bool = False
    # Behind a reverse proxy, take the client address from X-Forwarded-For (only then!), and only
    # when the peer is one of TRUSTED_PROXIES (comma-separated addresses or networks).
    trust_forwarded_for: bool = False
    trusted_proxies: str = "127.0.0.1,::1"
    token_quota_daily: int = Field(default=0, ge=0, description="0: unlimited")
    token_quota_monthly: int = Field(default=0, ge=0, description="0: unlimited")

    conversation_buffer_ttl_seconds: float = Field(default=3600, gt=0)
    turn_wait_seconds: float = Field(default=30, gt=0, le=600)
    summary_mode: Literal["auto", "extractive", "llm"] = "auto"
    summary_batch: int = Field(default=4, ge=1, le=1000)

    llm_provider: Literal["local", "openai", "scripted"] = "local"
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None
    llm_model: str = "SmolLM2-135M-Instruct"
    llm_model_path: Path | None = None
    llm_threads: int = Field(default=2, ge=1, le=256)
    llm_batch_threads: int = Field(default=2, ge=1, le=256)
    llm_context_size: int = Field(default=2048, ge=256, le=131_072)
    llm_max_tokens: int = Field(default=256, ge=1, le=32_768)
    llm_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    llm_repeat_penalty: float = Field(default=1.1, ge=0.5, le=2.0)
    llm_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    llm_max_retries: int = Field(default=2, ge=0, le=10)
    # The local model: generation slots (0: two per core, 2 to 8) and the bounded queue before them.
    llm_parallel: int = Field(default=0, ge=0, le=64)
    llm_queue_size: int = Field(default=16, ge=0, le=10_000)
    llm_queue_wait_seconds: float = Field(default=15.0, gt=0, le=600)

    short_term_memory_size: int = Field(default=20, ge=1, le=500)
    max_message_chars: int = Field(default=8000, ge=1, le=200_000)
    max_request_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)
    stream_flush_interval_seconds: float = Field(default=0.25, gt=0, le=10)
    # Reply runs (companion/chat/runs.py): a streaming reply's heartbeat, how long without one
    # before another instance settles it `incomplete`, and how long its events stay in Redis.
    reply_heartbeat_seconds: float = Field(default=2.0, gt=0, le=60)
    reply_stale_seconds: float = Field(default=10.0, gt=0, le=3600)
    reply_events_ttl_seconds: float = Field(default=3600, gt=0, le=7 * 24 * 3600)
    reply_events_max_entries: int = Field(default=10_000, ge=10, le=1_000_000)

    # Admission control, per worker (docs/deployment.md: sizing): concurrent chat turns and other
    # requests, the queue in front of each, and the longest wait in it; past that, 503 `overloaded`.
    admission_max_turns: int = Field(default=16, ge=1, le=100_000)
    admission_turn_queue: int = Field(default=128, ge=0, le=100_000)
    admission_max_requests: int = Field(default=64, ge=1, le=100_000)
    admission_request_queue: int = Field(default=256, ge=0, le=100_000)
    admission_queue_timeout_seconds: float = Field(default=5.0, ge=0, le=600)

    # Per-user caps (docs/security.md): past them a create answers 409.
    api_keys_max_per_user: int = Field(default=20, ge=1, le=10_000)
    api_key_last_used_flush_seconds: float = Field(default=60, gt=0, le=86_400)
    sessions_max_per_user: int = Field(default=20, ge=1, le=10_000)
    personalities_max_per_user: int = Field(default=100, ge=1, le=100_000)
    conversations_max_per_user: int = Field(default=10_000, ge=1, le=10_000_000)

    memory_enabled: bool = True
    memory_extractor: Literal["auto", "rules", "llm", "both"] = "auto"
    memory_embedding_threads: int = Field(default=1, ge=1, le=64)
    memory_top_k: int = Field(default=5, ge=1, le=50)
    memory_recent: int = Field(default=2, ge=0, le=50)
    memory_min_score: float = Field(default=0.3, ge=-1.0, le=1.0)
    memory_dedupe_threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    memory_retrieval_deadline_ms: float = Field(default=50, gt=0, le=60_000)
    memory_token_budget: int = Field(default=200, ge=0, le=8192)
    memory_max_per_user: int = Field(default=10_000, ge=1, le=1_000_000)
    memory_vector_store: Literal["auto", "numpy", "pgvector"] = "auto"
    cache_memory_search_ttl_seconds: float = Field(default=300, gt=0)

    @field_validator("llm_base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and value != "" and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value or None

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                ipaddress.ip_network(item.strip(), strict=False)  # ValueError names the variable
        return value

    @field_validator("rate_limit_route_overrides")
    @classmethod
    def _routes_well_formed(cls, value: dict[str, int]) -> dict[str, int]:
        for route, per_minute in value.items():
            method, _, path = route.partition(" ")
            if method not in {"GET", "POST", "PUT", "PATCH", "DELETE"} or not path.startswith("/") or per_minute < 1:
                raise ValueError('entries look like {"POST /v1/chat/completions": 10}')
        return value

    @field_validator("llm_api_key")
    @classmethod
    def _api_key_not_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if value.get_secret_value().startswith("<"):
            raise ValueError("is still the placeholder from .env.example; set the real key or leave it empty")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_supported(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw and not raw.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://", "sqlite://", "postgresql://")):
            raise ValueError("must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_host_ports(cls, value: str) -> str:
        for entry in filter(None, (item.strip() for item in value.split(","))):
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("must be host:port[,host:port...]")
        return value

    @model_validator(mode="after")
    def _sentinel_mode_needs_sentinels(self) -> Settings:
        if self.redis_enabled and self.redis_mode == "sentinel" and not self.redis_sentinels.strip():
            raise ValueError("REDIS_MODE=sentinel needs REDIS_SENTINELS=host:port[,host:port...]")
        return self

    @model_validator(mode="after")
    def _provider_needs(self) -> Settings:
        if self.llm_provider == "openai" and not self.llm_base_url and self.llm_api_key is None:
            raise ValueError("LLM_PROVIDER=openai needs LLM_BASE_URL (a compatible server) or LLM_API_KEY (OpenAI)")
        return self

    @model_validator(mode="after")
    def _pool_wait_outlasts_connect(self) -> Settings:
        # A wait shorter than a connect would report a busy pool as an outage (or the reverse).
        if self.database_pool_timeout_seconds <= self.database_connect_timeout_seconds:
            raise ValueError("DATABASE_POOL_TIMEOUT_SECONDS must be longer than DATABASE_CONNECT_TIMEOUT_SECONDS")
        return self

    @property
    def resolved_database_url(self) -> str:
        raw = self.database_url.get_secret_value()
        if not raw:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'companion.db').resolve()}"
        if raw.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + raw[len("sqlite://") :]
        if raw.startswith("postgresql://"):
            return "postgresql+asyncpg://" + raw[len("postgresql://") :]
        return raw

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise `SettingsError` naming each bad variable, never echoing a value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            variable = "_".join(str(part) for part in error["loc"]).upper() or "settings"
            problems.append(f"{variable}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
