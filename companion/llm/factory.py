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
    from companion.llm.local import DEFAULT_MODEL, LlamaCppProvider

    path = settings.llm_model_path
    # Another GGUF file is named after itself unless LLM_MODEL says otherwise.
    model = settings.llm_model if "llm_model" in settings.model_fields_set or path is None else path.stem
    return LlamaCppProvider(
        model_path=path,
        model=model or DEFAULT_MODEL,
        threads=settings.llm_threads,
        batch_threads=settings.llm_batch_threads,
        context_size=settings.llm_context_size,
        parallel=settings.llm_parallel or None,
        queue_size=settings.llm_queue_size,
        queue_wait_seconds=settings.llm_queue_wait_seconds,
        token_timeout_seconds=settings.llm_timeout_seconds,
    )
