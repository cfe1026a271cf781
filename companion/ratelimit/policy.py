"""Which limits apply to a request, from settings, and the service that enforces them.

Policies: each authenticated user gets RATE_LIMIT_REQUESTS_PER_MINUTE on /v1 routes (a route may
override it, RATE_LIMIT_ROUTE_OVERRIDES = {"POST /v1/chat/completions": 10}); each client IP gets
RATE_LIMIT_IP_REQUESTS_PER_MINUTE on unauthenticated routes and RATE_LIMIT_AUTH_FAILURES_PER_MINUTE
failed authentications (brute-force protection). When Redis is unreachable the in-process limiter
takes over (or, with RATE_LIMIT_FAIL_CLOSED, requests are refused with 503); never a 500.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

from companion.cache import keys
from companion.cache.backend import CacheUnavailable
from companion.errors import CompanionError, ServiceUnavailable
from companion.ratelimit.limiter import Decision, Limit, MemoryRateLimiter, RateLimiter, retry_after_header

logger = logging.getLogger(__name__)


class RateLimited(CompanionError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, decision: Decision | None = None, retry_after: float = 1.0, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.decision = decision
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["retry_after"] = max(round(self.retry_after, 3), 0.001)
        if self.decision is not None:
            limit = self.decision.limit
            body["error"]["limit"] = {
                "policy": limit.name,
                "limit": limit.limit,
                "window_seconds": limit.period_seconds,
            }
        return body

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": retry_after_header(self.retry_after)}
        if self.decision is not None:
            headers.update(rate_limit_headers(self.decision))
        return headers


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """IETF draft-ietf-httpapi-ratelimit-headers-09: `RateLimit-Policy` and `RateLimit`."""
    limit = decision.limit
    name = limit.name.replace('"', "")
    return {
        "RateLimit-Policy": f'"{name}";q={limit.limit};w={int(limit.period_seconds)}',
        "RateLimit": f'"{name}";r={decision.remaining};t={max(int(decision.reset_seconds + 0.999), 0)}',
    }


@dataclass
class PolicyCounts:
    allowed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    limited: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fallbacks: int = 0
    refused_unavailable: int = 0


class RateLimitService:
    def __init__(
        self,
        limiter: RateLimiter,
        *,
        fallback: MemoryRateLimiter | None = None,
        per_user_per_minute: int = 30,
        per_ip_per_minute: int = 120,
        auth_failures_per_minute: int = 10,
        route_overrides: dict[str, int] | None = None,
        fail_closed: bool = False,
        enabled: bool = True,
    ) -> None:
        self._limiter = limiter
        self._fallback = fallback
        self.enabled = enabled
        self.fail_closed = fail_closed
        self.user_limit = Limit("user", per_user_per_minute, 60)
        self.ip_limit = Limit("ip", per_ip_per_minute, 60)
        self.auth_failure_limit = Limit("auth-failures", auth_failures_per_minute, 60)
        self.route_limits = {route: Limit(route, n, 60) for route, n in (route_overrides or {}).items()}
        self.counts = PolicyCounts()
        # Addresses known to be over their failed-authentication limit, until when (monotonic): refused
        # before anything else, without a round trip. Bounded; the shared limiter stays the truth.
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def limit_for(self, route: str) -> Limit:
        return self.route_limits.get(route, self.user_limit)

    async def _hit(self, key: str, limit: Limit) -> Decision:
        try:
            decision = await self._limiter.hit(key, limit)
        except CacheUnavailable:
            if self.fail_closed or self._fallback is None:
                self.counts.refused_unavailable += 1
                raise ServiceUnavailable(
                    "Rate limiting is unavailable right now; retry in a few seconds.", code="rate_limiter_unavailable"
                ) from None
            self.counts.fallbacks += 1
            logger.warning("rate limiter falling back to this instance: Redis unreachable")
            decision = await self._fallback.hit(key, limit)
        (self.counts.allowed if decision.allowed else self.counts.limited)[limit.name] += 1
        return decision

    async def check_user(self, user_id: str, route: str) -> Decision:
        """Spend one request of the user's budget for `route`. Raises RateLimited (429)."""
        limit = self.limit_for(route)
        decision = await self._hit(keys.rate_limit(limit.name, user_id), limit)
        if not decision.allowed:
            raise RateLimited(
                f"Too many requests: {limit.limit} per minute allowed. Retry in {retry_after_header(decision.retry_after_seconds)} s.",
                decision=decision,
                retry_after=decision.retry_after_seconds,
            )
        return decision

    async def check_ip(self, ip: str) -> Decision:
        decision = await self._hit(keys.rate_limit(self.ip_limit.name, ip), self.ip_limit)
        if not decision.allowed:
            raise RateLimited(
                f"Too many requests from your address: {self.ip_limit.limit} per minute allowed.",
                decision=decision,
                retry_after=decision.retry_after_seconds,
            )
        return decision

    async def auth_failed(self, ip: str) -> None:
        """Count a failed authentication; raises RateLimited once the address has failed too often."""
        decision = await self._hit(keys.rate_limit(self.auth_failure_limit.name, ip), self.auth_failure_limit)
        if not decision.allowed:
            self._block(ip, decision.retry_after_seconds)
            raise self._too_many_failures(decision, decision.retry_after_seconds)

    def refuse_blocked(self, ip: str) -> None:
        """Raise RateLimited if this instance already knows `ip` is over its failed-authentication
        limit: no round trip, so it can run before anything else on every request."""
        until = self._blocked.get(ip)
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[ip]
            return
        raise self._too_many_failures(None, left)

    async def refuse_over_auth_limit(self, ip: str) -> None:
        """Raise RateLimited if `ip` is over its failed-authentication limit on the shared limiter
        (another instance may have counted its failures). Called before a key lookup that would
        reach the database; spends nothing."""
        self.refuse_blocked(ip)
        limit = self.auth_failure_limit
        try:
            decision = await self._limiter.peek(keys.rate_limit(limit.name, ip), limit)
        except CacheUnavailable:
            if self._fallback is None:
                return  # nothing to consult; the failure itself is still counted (or refused)
            decision = await self._fallback.peek(keys.rate_limit(limit.name, ip), limit)
        if decision.remaining >= 1:
            return
        # The next hit is refused until one emission interval of the bucket has drained.
        retry_after = max(decision.reset_seconds - (limit.limit - 1) * limit.period_seconds / limit.limit, 0.001)
        self._block(ip, retry_after)
        raise self._too_many_failures(None, retry_after)

    def _block(self, ip: str, seconds: float) -> None:
        self._blocked[ip] = time.monotonic() + seconds
        self._blocked.move_to_end(ip)
        while len(self._blocked) > 10_000:
            self._blocked.popitem(last=False)

    def _too_many_failures(self, decision: Decision | None, retry_after: float) -> RateLimited:
        if decision is None:  # refused before a hit (a hit counts itself): the same answer a hit gives
            self.counts.limited[self.auth_failure_limit.name] += 1
            decision = Decision(False, self.auth_failure_limit, 0, retry_after, retry_after)
        return RateLimited(
            "Too many failed authentication attempts from your address; wait before trying again.",
            decision=decision,
            retry_after=retry_after,
            code="too_many_auth_failures",
        )

    async def state(self, subject: str) -> list[Decision]:
        limits = [self.user_limit, *self.route_limits.values()]
        return [await self._limiter.peek(keys.rate_limit(limit.name, subject), limit) for limit in limits]

    async def reset(self, subject: str) -> None:
        self._blocked.pop(subject, None)
        for limit in [self.user_limit, *self.route_limits.values(), self.ip_limit, self.auth_failure_limit]:
            await self._limiter.reset(keys.rate_limit(limit.name, subject))
            if self._fallback is not None:
                await self._fallback.reset(keys.rate_limit(limit.name, subject))
