"""Failover under load: closed-loop chat traffic over several app instances while a Redis primary is
SIGKILLed, and what it cost: requests sent and failed, messages lost (acknowledged replies missing
from the database afterwards), seconds any instance's /health said Redis was not `ok`, and seconds
from the kill until every instance reports Redis `ok` again (it uses Redis again, by itself).

Used by tests/test_redis_failover.py (which asserts no failure and no loss) and by `python -m bench
--only redis` (which reports the figures). Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

MAX_REQUESTS_PER_WORKER = 5000


@dataclass
class FailoverReport:
    topology: str
    requests_sent: int = 0
    requests_failed: int = 0
    messages_lost: int = 0
    degraded_seconds: float = 0.0
    seconds_until_redis_used: float | None = None  # None: not within the deadline
    failures: list[str] = field(default_factory=list)
    health_states: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "requests sent": self.requests_sent,
            "requests failed": self.requests_failed,
            "messages lost": self.messages_lost,
            "seconds degraded": round(self.degraded_seconds, 2),
            "seconds until Redis used again": None
            if self.seconds_until_redis_used is None
            else round(self.seconds_until_redis_used, 2),
        }


@dataclass
class Worker:
    """One user and conversation; sends one message at a time, alternating instances."""

    clients: list[httpx.AsyncClient]
    conversation_id: str
    acknowledged: int = 0


async def _redis_states(health_clients: list[httpx.AsyncClient]) -> list[str]:
    states = []
    for http in health_clients:
        try:
            response = await http.get("/health", timeout=5)
            states.append(str(response.json()["checks"]["redis"]["status"]))
        except (httpx.HTTPError, KeyError, ValueError):
            states.append("unreachable")
    return states


async def run_failover(
    topology: str,
    workers: list[Worker],
    health_clients: list[httpx.AsyncClient],
    kill: Callable[[], None],
    *,
    traffic_before: float = 2.0,
    traffic_after: float = 2.0,
    recovery_deadline: float = 60.0,
    sample_every: float = 0.1,
) -> FailoverReport:
    """Run the traffic, kill at `traffic_before` seconds, keep going until every instance reports
    Redis `ok` again (or `recovery_deadline`) and `traffic_after` more seconds, then count."""
    report = FailoverReport(topology)
    stop = asyncio.Event()

    async def work(worker: Worker) -> None:
        for index in range(MAX_REQUESTS_PER_WORKER):
            if stop.is_set():
                return
            http = worker.clients[index % len(worker.clients)]
            report.requests_sent += 1
            try:
                response = await http.post(
                    f"/v1/conversations/{worker.conversation_id}/messages",
                    json={"content": f"message {index}", "stream": False},
                    timeout=30,
                )
            except httpx.HTTPError as error:
                report.requests_failed += 1
                report.failures.append(f"{type(error).__name__}: {error}")
                continue
            if response.status_code == 200:
                worker.acknowledged += 1
            else:
                report.requests_failed += 1
                report.failures.append(f"{response.status_code}: {response.text[:300]}")

    tasks = [asyncio.create_task(work(worker)) for worker in workers]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(traffic_before)  # steady traffic before the kill (a duration, not a wait for a result)
        killed_at = loop.time()
        await asyncio.to_thread(kill)
        first_bad: float | None = None
        recovered_at: float | None = None
        deadline = killed_at + recovery_deadline
        while loop.time() < deadline:
            states = await _redis_states(health_clients)
            now = loop.time()
            report.health_states.append(f"{now - killed_at:.2f}s {states}")
            if any(state != "ok" for state in states):
                first_bad = first_bad if first_bad is not None else now
                recovered_at = None
            elif first_bad is not None or now - killed_at > 15:
                # All ok again after having been degraded (or never degraded at all for 15 s).
                recovered_at = now
                break
            await asyncio.sleep(sample_every)  # the sampling period of /health
        if first_bad is not None:
            report.degraded_seconds = (recovered_at or loop.time()) - first_bad
        if recovered_at is not None:
            report.seconds_until_redis_used = recovered_at - killed_at
            await asyncio.sleep(traffic_after)  # traffic on the recovered topology, then stop
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Messages lost: every acknowledged turn stored a user message and a reply.
    for worker in workers:
        stored = await _stored_messages(worker.clients[0], worker.conversation_id)
        report.messages_lost += max(2 * worker.acknowledged - stored, 0)
    return report


async def _stored_messages(http: httpx.AsyncClient, conversation_id: str) -> int:
    count, before = 0, None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": 200} | ({"before": before} if before else {})
        response = await http.get(f"/v1/conversations/{conversation_id}/messages", params=params, timeout=30)
        response.raise_for_status()
        page = response.json()
        count += len(page["data"])
        if not page["has_more"] or not page["data"]:
            return count
        before = min(message["id"] for message in page["data"])
    return count
