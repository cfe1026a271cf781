"""The OpenAPI schema tells the truth about errors: every operation documents each error status it
can answer, with the one error shape (companion.errors) and the headers that come with it.

Generic on purpose: `document_errors` runs over the generated schema when it is first built, over
every operation in it, so a router added later needs nothing of its own. Which statuses an operation
gets follows from what it is: every one can be refused by admission control or a database outage
(503) and, outside /health and /metrics, by a rate limit (429); one that authenticates can answer
401/403; one with path parameters 404; one that takes a body 400/413/422; one that creates or changes
409. A route that answers more (the chat routes: 502/504 from the model) lists those itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"
UNLIMITED_PATHS = ("/health", "/metrics")


class ErrorDetail(BaseModel):
    # Rate-limit refusals add `retry_after` and `limit`; other fields may join later.
    model_config = ConfigDict(extra="allow")

    message: str = Field(description="What went wrong, for the person reading it.")
    type: str = Field(description="The error's family (OpenAI's `type`).")
    code: str = Field(description="A stable machine-readable code, e.g. `conversation_not_found`.")
    param: str | None = Field(description="The request field at fault, if one is.")


class ErrorBody(BaseModel):
    """The one error shape every error answer has (also OpenAI's)."""

    error: ErrorDetail


_STRING = {"schema": {"type": "string"}}
ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("The body could not be read at all (not text in any encoding JSON allows).", {}),
    401: ("Missing, unknown or revoked API key, or an expired session.", {"WWW-Authenticate": _STRING}),
    403: ("Not allowed this way: a cookie change without its CSRF token, a session where a key is needed.", {}),
    404: ("Not found, or not yours (ids of other users' things are never confirmed).", {}),
    409: (
        "Conflicts with the user's state: a name taken, a per-user cap reached, a reply still streaming, "
        "a feature turned off.",
        {},
    ),
    413: ("The request body is larger than MAX_REQUEST_BYTES.", {}),
    422: ("The request is well-formed but its content is not acceptable.", {}),
    429: (
        "A rate limit or token quota is spent; retry after `Retry-After` seconds.",
        {"Retry-After": _STRING, "RateLimit": _STRING, "RateLimit-Policy": _STRING},
    ),
    502: ("The model provider failed.", {}),
    503: (
        "The database is unreachable or this instance is busy; retry after `Retry-After` seconds.",
        {"Retry-After": _STRING},
    ),
    504: ("The model provider did not answer in time.", {}),
}
CHANGES = {"post", "put", "patch", "delete"}


def error_statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer, from what the schema says it is (see above)."""
    statuses = {503}
    if not path.startswith(UNLIMITED_PATHS):
        statuses.add(429)
    authenticates = bool(operation.get("security")) or path.startswith("/web/")
    if authenticates:
        statuses |= {401, 403}
    places = {parameter.get("in") for parameter in operation.get("parameters", [])}
    if "path" in places:
        statuses |= {404, 422}
    if places & {"query", "header"}:
        statuses.add(422)
    if "requestBody" in operation:
        statuses |= {400, 413, 422}
    if authenticates:
        # A user's state can refuse any of their requests: a cap reached, a reply still streaming,
        # a feature the operator turned off (memory search answers 409 then).
        statuses.add(409)
    if method in CHANGES and authenticates:
        statuses |= {404, 422}
    return statuses


def error_response(status: int) -> dict[str, Any]:
    description, headers = ERRORS[status]
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}},
    }
    if headers:
        response["headers"] = headers
    return response


def document_errors(schema: dict[str, Any]) -> None:
    """Add each operation's error statuses to its responses, in the one error shape (FastAPI's own
    422 schema is replaced: our 422 has that shape too). What a route documents itself stays."""
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            listed = {int(status) for status in responses if status.isdigit() and int(status) in ERRORS}
            for status in sorted(error_statuses(path, method, operation) | listed):
                documented = responses.get(str(status), {})
                merged = error_response(status)
                if documented.get("description") not in (None, "Additional Response", "Validation Error"):
                    merged["description"] = documented["description"]
                responses[str(status)] = merged
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}))
    schemas["ErrorBody"] = body
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


def install(app: FastAPI) -> None:
    """Build the schema with every route's errors documented, once, when it is first asked for."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
