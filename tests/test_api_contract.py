"""The API contract holds under fuzzing (issue 15, item 11): schemathesis runs over the whole
OpenAPI schema of a real `companion serve`, with a fixed seed and a bounded number of examples
(coverage, fuzzing and stateful phases, well under two minutes here), and every response must be a
documented status, in the documented shape, type and headers, and never a server error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "response_schema_conformance",
    "content_type_conformance",
    "response_headers_conformance",
)
SEED = 15
MAX_EXAMPLES = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`companion serve` on a fresh SQLite database, and an API key for it (the fuzzer may revoke
    that key on its way: the tests after it need none)."""
    tmp_path = tmp_path_factory.mktemp("contract")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COMPANION_", "REDIS_", "DATABASE_"))},
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}",
        "DATA_DIR": str(tmp_path),
        "LLM_PROVIDER": "scripted",
        "ENVIRONMENT": "test",
        "REDIS_ENABLED": "false",
        "AUTO_MIGRATE": "true",
        "RATE_LIMIT_ENABLED": "false",  # 429s are documented; with limits on, most answers would be one
    }
    created = subprocess.run(
        [str(BIN / "companion"), "users", "create", "fuzzer", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    api_key = json.loads(created.stdout)["api_key"]
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "companion"), "serve", "--port", str(port)],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "companion serve did not start"
            time.sleep(0.1)
        yield base_url, api_key
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("backend", ["sqlite"])  # one run: the contract does not depend on the database
def test_the_whole_schema_holds_under_fuzzing(backend: str, served: tuple[str, str], tmp_path: Path) -> None:
    base_url, api_key = served
    result = subprocess.run(
        [
            str(BIN / "st"), "run", f"{base_url}/openapi.json",
            "--header", f"Authorization: Bearer {api_key}",
            "--checks", ",".join(CHECKS),
            "--seed", str(SEED),
            "--max-examples", str(MAX_EXAMPLES),
            "--phases", "coverage,fuzzing,stateful",
            "--no-color",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = result.stdout + result.stderr
    print(report[-3000:])
    assert result.returncode == 0, report[-20_000:]
    assert "Tested: " in report


def test_a_405_names_every_method_the_path_serves(served: tuple[str, str]) -> None:
    base_url, api_key = served
    headers = {"Authorization": f"Bearer {api_key}"}
    refused = httpx.put(f"{base_url}/v1/conversations", headers=headers, timeout=10)
    assert refused.status_code == 405
    assert refused.json()["error"]["code"] == "method_not_allowed"
    assert set(refused.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert httpx.delete(f"{base_url}/health", timeout=10).headers["Allow"] == "GET"


def test_every_operation_documents_its_errors_in_the_one_shape(served: tuple[str, str]) -> None:
    base_url, _ = served
    schema = httpx.get(f"{base_url}/openapi.json", timeout=10).json()
    error_ref = "#/components/schemas/ErrorBody"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "503" in responses, (method, path)
            if operation.get("security"):
                assert {"401", "403", "429"} <= set(responses), (method, path)
            if "requestBody" in operation:
                assert {"413", "422"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {"$ref": error_ref}, (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
