"""The exception tree, and how each error maps to an HTTP status and a JSON body.

    CompanionError
    ├── SettingsError            bad configuration, at start (never HTTP)
    ├── InvalidInput             422  the request is well-formed but its content is not acceptable
    ├── Unauthorized             401  no or unknown API key
    ├── Forbidden                403  a cookie-authenticated change without its CSRF token
    ├── NotFound                 404  missing, or owned by another user (never 403: ids don't leak)
    ├── Conflict                 409  e.g. a personality name the user already has
    ├── ServiceUnavailable       503  the database cannot be reached; retry shortly
    │   └── Overloaded           503  this instance is busy (admission control, a full queue); retry after
    └── ProviderError            502  the LLM provider failed
        └── ProviderTimeout      504  the LLM provider did not answer in time

Every error body has one shape, which is also OpenAI's, so both APIs and their clients agree:
`{"error": {"message": str, "type": str, "code": str, "param": str | null}}`.
Messages are written for the person reading them and never carry secrets or stack traces.
"""

from __future__ import annotations

from typing import Any


class CompanionError(Exception):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


class SettingsError(CompanionError):
    code = "invalid_settings"


class InvalidInput(CompanionError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_input"


class Unauthorized(CompanionError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(CompanionError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(CompanionError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(CompanionError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class ServiceUnavailable(CompanionError):
    status_code = 503
    error_type = "service_unavailable"
    code = "database_unavailable"


class Overloaded(ServiceUnavailable):
    """The instance is healthy but busy: a bounded queue is full or its wait ran out. Nothing was stored.

    Answered as 503 with `Retry-After` (whole seconds), never confused with a dependency outage."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = max(1, int(retry_after))


class ProviderError(CompanionError):
    status_code = 502
    error_type = "upstream_error"
    code = "llm_provider_error"


class ProviderTimeout(ProviderError):
    status_code = 504
    code = "llm_provider_timeout"


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}
