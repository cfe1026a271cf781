"""The goals the report is read against (issue 8), judged from one run's figures. Not asserted in
tests: a miss is explained in the report's notes, from a profile."""

from __future__ import annotations

import math

from bench.harness import format_us
from bench.report import Verdict


def _get(figures: dict[str, float], key: str) -> float | None:
    value = figures.get(key)
    return None if value is None or math.isnan(value) else value


def verdicts(figures: dict[str, float]) -> list[Verdict]:
    found: list[Verdict] = []

    l1 = _get(figures, "personality.l1.p50_us")
    found.append(Verdict("L1 personality hit p50 ≤ 5 µs", format_us(l1), _judge(l1 is not None and l1 <= 5, l1)))

    for label, suffix in (
        ("long-term memory off", ".off"),
        ("memory on, nothing remembered yet", ""),
        ("100 memories, a new message", ".recall"),
    ):
        target = f"context assembly with Redis ({label}): p50 ≤ 0.5 ms and ≥ 5x the database-only path"
        redis = _get(figures, f"context{suffix}.redis.p50_us")
        ratio = _get(figures, f"context{suffix}.speedup")
        if redis is None or ratio is None:
            found.append(Verdict(target, "n/a", "not measured"))
            continue
        found.append(
            Verdict(target, f"{format_us(redis)}, {ratio:.1f}x faster", _judge(redis <= 500 and ratio >= 5, redis))
        )

    ours = _get(figures, "ratelimit.ours.p50_us")
    ratio = _get(figures, "ratelimit.ratio")
    if ours is None or ratio is None:
        found.append(Verdict("rate-limit check p50 ≤ 0.15 ms", "n/a", "not measured"))
        found.append(Verdict("rate-limit check not slower than `limits` (moving window)", "n/a", "not measured"))
    else:
        found.append(Verdict("rate-limit check (Redis) p50 ≤ 0.15 ms", format_us(ours), _judge(ours <= 150, ours)))
        found.append(
            Verdict(
                "rate-limit check not slower than `limits` (moving window, Redis)",
                f"ours / limits p50 = {ratio:.2f}",
                # Rounds of one run differ by a few per cent on this machine: 1.05 is "the same".
                "met" if ratio <= 1.0 else "met (within noise)" if ratio <= 1.05 else "missed",
            )
        )

    for workers_key, workers_label in (("w1", "1 worker"), ("wn", "several workers")):
        ttfb = _get(figures, f"http.ttft.{workers_key}.c10.p50_us")
        found.append(
            Verdict(
                f"service overhead to the first streamed byte (scripted LLM), 10 streams, {workers_label}: p50 ≤ 3 ms",
                format_us(ttfb),
                _judge(ttfb is not None and ttfb <= 3000, ttfb),
            )
        )

    resume = _get(figures, "http.resume.other.p50_us")
    found.append(
        Verdict(
            "resume request to its first replayed event, through another server (Redis): p50 < 20 ms",
            format_us(resume),
            _judge(resume is not None and resume < 20_000, resume),
        )
    )
    for key, label, goal, at_least in (
        ("memory_eval.recall@10", "memory evaluation, evidence recall@10 ≥ 0.85", 0.85, True),
        ("memory_eval.recall@5", "memory evaluation, evidence recall@5 ≥ 0.75", 0.75, True),
        ("memory_eval.disclosures@3", "everyday self-disclosures recall@3 ≥ 0.95", 0.95, True),
        ("memory_eval.false_memory_rate", "false memories from small talk ≤ 10%", 0.10, False),
    ):
        value = _get(figures, key)
        met = value is not None and (value >= goal if at_least else value <= goal)
        found.append(Verdict(label, "n/a" if value is None else f"{value:.3f}", _judge(met, value)))
    recall = _get(figures, "memory_eval.recall_10k.p50_ms")
    found.append(
        Verdict(
            "memory recall at 10,000 memories, a new message: p50 < 15 ms",
            "n/a" if recall is None else f"{recall:.1f} ms",
            _judge(recall is not None and recall < 15, recall),
        )
    )
    return found


def _judge(met: bool, value: float | None) -> str:
    if value is None:
        return "not measured"
    return "met" if met else "missed"
