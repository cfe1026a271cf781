"""CSRF tokens for requests authenticated by the session cookie.

The token is an HMAC keyed by the session token itself, so every instance can check it without a
shared secret to configure, it dies with the session, and it reveals nothing about the session
token. A page on another site can make the browser send the (HttpOnly) cookie but can neither read
the cookie nor this token, so it cannot forge the `X-CSRF-Token` header."""

from __future__ import annotations

import hashlib
import hmac

CSRF_HEADER = "X-CSRF-Token"
_PURPOSE = b"companion:v1:csrf"


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), _PURPOSE, hashlib.sha256).hexdigest()


def csrf_matches(session_token: str, candidate: str | None) -> bool:
    """Whether `candidate` is this session's CSRF token (constant time)."""
    if not candidate:
        return False
    return hmac.compare_digest(csrf_token(session_token).encode(), candidate.encode())
