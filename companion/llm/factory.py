"""Choose the provider named by the settings (only the app factory and the CLI call this)."""

from __future__ import annotations

from companion.config import Settings
from companion.llm.base import LLMProvider


def build_provider(settings: Settings) -> LLMProvider:
    if settings.llm_provider == "scripted":
        from companion.llm.scripted import ScriptedProvider

        return ScriptedProvider(model=settings.llm_model)
    if settings.llm_provider == "openai":
        from companion.llm.openai_compat import OpenAICompatibleProvider

        return OpenAICompatibleProvider(
            model=settings.llm_model,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
        )
    from companion.llm.local import LlamaCppProvider

    return LlamaCppProvider(
        model_path=settings.llm_model_path,
        threads=settings.llm_threads,
        batch_threads=settings.llm_batch_threads,
        context_size=settings.llm_context_size,
    )
