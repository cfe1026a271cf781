"""Settings: invalid values name the variable and never echo a secret, the environment wins over
`.env`, the embedded defaults, and a `.env.example` free of real secrets. No database needed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from companion.config import Settings, load_settings
from companion.errors import SettingsError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No companion variable from the outer environment, and no `.env` but the test's own."""
    monkeypatch.chdir(tmp_path)
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)
        monkeypatch.delenv(field, raising=False)
    return tmp_path


def _settings_error(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    error = raised.value
    # The pydantic error (which carries the input) is not chained into tracebacks either.
    assert error.__cause__ is None and error.__suppress_context__
    return str(error)


INVALID: list[tuple[str, str]] = [
    ("SHORT_TERM_MEMORY_SIZE", "0"),
    ("SHORT_TERM_MEMORY_SIZE", "501"),
    ("SHORT_TERM_MEMORY_SIZE", "twenty"),
    ("LLM_PROVIDER", "gpt-super"),
    ("REDIS_URL", "http://default:s3cr3t-redis-pass@cache.internal:6379/0"),
    ("DATABASE_URL", "mysql://admin:hunter2-db-pass@db.internal:3306/app"),
    ("LLM_BASE_URL", "ftp://user:llm-pass-7731@models.internal/v1"),
    ("LLM_API_KEY", "<llm-api-key>"),
    ("MAX_REQUEST_BYTES", "17"),
    ("MAX_MESSAGE_CHARS", "0"),
    ("DATABASE_CONNECT_TIMEOUT_SECONDS", "-1"),
    ("AUTO_MIGRATE", "perhaps"),
    ("LOG_LEVEL", "LOUD"),
]


def test_invalid_value_raises_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, subtests: pytest.Subtests
):
    for variable, value in INVALID:
        with subtests.test(variable, value=value), monkeypatch.context() as patch:
            message = _settings_error(patch, {variable: value})
            assert variable in message
            assert value not in message


def test_secret_parts_of_values_never_appear_in_the_message(monkeypatch: pytest.MonkeyPatch):
    secrets = ["s3cr3t-redis-pass", "hunter2-db-pass", "llm-pass-7731"]
    message = _settings_error(
        monkeypatch,
        {
            "REDIS_URL": f"http://default:{secrets[0]}@cache.internal:6379/0",
            "DATABASE_URL": f"mysql://admin:{secrets[1]}@db.internal/app",
            "LLM_BASE_URL": f"ftp://user:{secrets[2]}@models.internal/v1",
        },
    )
    for variable in ("REDIS_URL", "DATABASE_URL", "LLM_BASE_URL"):
        assert variable in message  # every problem is reported at once
    for secret in secrets:
        assert secret not in message
    assert "internal" not in message and "admin" not in message


def test_overrides_are_validated_like_the_environment():
    with pytest.raises(SettingsError, match="SHORT_TERM_MEMORY_SIZE") as raised:
        load_settings(short_term_memory_size=-3, database_url="postgresql://app:pw-overrides-99@db/app")
    assert "pw-overrides-99" not in str(raised.value)


def test_valid_secrets_are_masked_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://app:db-pass-4242@db.internal/app")
    # Built at run time so that no credential-shaped URL sits in the repository.
    monkeypatch.setenv("REDIS_URL", "redis://default:" + "redis-pass-4242" + "@cache.internal:6379/0")
    monkeypatch.setenv("LLM_API_KEY", "sk-test-key-4242")
    settings = load_settings()
    assert settings.resolved_database_url == "postgresql+asyncpg://app:db-pass-4242@db.internal/app"
    for shown in (repr(settings), str(settings)):
        assert "4242" not in shown


def test_environment_wins_over_dotenv_file(monkeypatch: pytest.MonkeyPatch, clean_env: Path):
    (clean_env / ".env").write_text(
        "SHORT_TERM_MEMORY_SIZE=7\nLLM_MODEL=from-dotenv\nMAX_MESSAGE_CHARS=123\n", encoding="utf-8"
    )
    monkeypatch.setenv("SHORT_TERM_MEMORY_SIZE", "9")
    monkeypatch.setenv("MAX_MESSAGE_CHARS", "456")
    settings = load_settings()
    assert settings.short_term_memory_size == 9
    assert settings.max_message_chars == 456
    assert settings.llm_model == "from-dotenv"  # not set in the environment: the file's value


def test_invalid_value_in_dotenv_names_the_variable(clean_env: Path):
    (clean_env / ".env").write_text("DATABASE_URL=mysql://root:dotenv-pass-31@db/app\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="DATABASE_URL") as raised:
        load_settings()
    assert "dotenv-pass-31" not in str(raised.value)


def test_default_database_is_a_sqlite_file_inside_data_dir(monkeypatch: pytest.MonkeyPatch, clean_env: Path):
    settings = load_settings()
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{(clean_env / 'data' / 'companion.db').resolve()}"
    assert settings.is_sqlite

    monkeypatch.setenv("DATA_DIR", str(clean_env / "elsewhere"))
    settings = load_settings()
    assert settings.data_dir == clean_env / "elsewhere"
    expected = (clean_env / "elsewhere" / "companion.db").resolve()
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{expected}"

    monkeypatch.setenv("DATABASE_URL", "")  # empty, as in .env.example, means the same default
    assert load_settings().resolved_database_url == f"sqlite+aiosqlite:///{expected}"


def test_plain_driver_urls_get_the_async_drivers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.internal:5432/app")
    settings = load_settings()
    assert settings.resolved_database_url == "postgresql+asyncpg://app@db.internal:5432/app"
    assert not settings.is_sqlite
    monkeypatch.setenv("DATABASE_URL", "sqlite:////var/lib/companion/db.sqlite")
    assert load_settings().resolved_database_url == "sqlite+aiosqlite:////var/lib/companion/db.sqlite"


def test_openai_provider_needs_a_base_url_or_an_api_key(monkeypatch: pytest.MonkeyPatch, subtests: pytest.Subtests):
    monkeypatch.setenv("LLM_PROVIDER", "openai")
    for case, env in (
        ("neither", {}),
        ("both-empty", {"LLM_BASE_URL": "", "LLM_API_KEY": ""}),
        ("blank-key", {"LLM_API_KEY": "   "}),
    ):
        with subtests.test(case), monkeypatch.context() as patch:
            assert "LLM_PROVIDER" in _settings_error(patch, env)

    with monkeypatch.context() as patch:
        patch.setenv("LLM_BASE_URL", "http://127.0.0.1:11434/v1")
        assert load_settings().llm_base_url == "http://127.0.0.1:11434/v1"
    with monkeypatch.context() as patch:
        patch.setenv("LLM_API_KEY", "sk-test-not-real")
        key = load_settings().llm_api_key
        assert key is not None and key.get_secret_value() == "sk-test-not-real"


# --- .env.example -------------------------------------------------------------------------------------

_SECRET_PATTERNS = {
    "an OpenAI-style key": re.compile(r"sk-[A-Za-z0-9_-]{16,}"),
    "a companion API key": re.compile(r"cmp_[A-Za-z0-9_-]{16,}"),
    "an AWS access key": re.compile(r"AKIA[0-9A-Z]{16}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a GitHub token": re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}"),
}
_URL_PASSWORD = re.compile(r"://[^\s/:@]+:([^\s@/]+)@")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{24,}")
_SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)$")


def _secret_problems(text: str) -> list[str]:
    """What in an env file looks like a real secret rather than a placeholder."""
    problems = [f"contains {what}" for what, pattern in _SECRET_PATTERNS.items() if pattern.search(text)]
    for password in _URL_PASSWORD.findall(text):
        if not (password.startswith("<") and password.endswith(">")):
            problems.append(f"URL password {password!r} is not a <placeholder>")
    for token in _LONG_TOKEN.findall(text):
        if all(any(test(c) for c in token) for test in (str.isdigit, str.isupper, str.islower)):
            problems.append(f"random-looking token {token!r}")
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#") and _SECRET_NAME.search(name):
            if value and not re.fullmatch(r"<[^>]*>", value):
                problems.append(f"{name} has a value")
    return problems


def _env_example() -> str:
    """The shipped .env.example: it documents every setting (README), so it must be there."""
    path = REPO_ROOT / ".env.example"
    assert path.is_file(), ".env.example is missing"
    return path.read_text(encoding="utf-8")


def test_secret_check_flags_real_looking_secrets():
    assert _secret_problems("LLM_API_KEY=\nDATABASE_URL=postgresql://u:<db-password>@h/db\n# LLM_API_KEY=<key>\n") == []
    for leaked in (
        "LLM_API_KEY=sk-proj-abcdefghijklmnop1234",
        "DATABASE_URL=postgresql://app:hunter2@db/app",
        "# REDIS_URL=redis://default:" + "Xk29fLq0PzR7tWm3" + "@cache:6379",
        "LLM_API_KEY=whatever",
        "SESSION_TOKEN=Zq8rT2mN5vB7xK1pL4wY6cH9",
    ):
        assert _secret_problems(leaked), leaked


def test_env_example_holds_no_real_looking_secrets():
    assert _secret_problems(_env_example()) == []


def test_env_example_loads_as_a_dotenv_file(clean_env: Path):
    _env_example()
    shutil.copyfile(REPO_ROOT / ".env.example", clean_env / ".env")
    settings = load_settings()
    assert settings.llm_api_key is None
    assert settings.is_sqlite
