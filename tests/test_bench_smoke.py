"""The benchmark harness's statistics and the report writer, on synthetic data: no timing, no
servers. The benchmarks themselves run on demand (`python -m bench`), never as tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import Measured, Stats, format_us, percentile, summarize
from bench.overload import Level, peak_level, round_ratios
from bench.report import (
    NOTES_BEGIN,
    NOTES_END,
    Bars,
    Lines,
    Report,
    Row,
    Section,
    Verdict,
    latency_table,
    write_report,
)
from bench.targets import verdicts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_summarize_reports_microseconds_and_throughput() -> None:
    # 99 fast samples of 1 µs and one slow one of 1 ms: the p50 ignores it, the p99 sees its pull.
    samples = [1_000] * 99 + [1_000_000]
    stats = summarize(samples, wall_ns=2_000_000)  # 100 ops in 2 ms
    assert stats.p50_us == pytest.approx(1.0)
    assert stats.p99_us == pytest.approx(1.0 + 0.01 * 999.0)
    assert stats.ops_per_s == pytest.approx(50_000)
    assert stats.samples == 100
    # Without a wall time, throughput comes from the samples' sum.
    assert summarize([2_000, 2_000]).ops_per_s == pytest.approx(500_000)


def test_rounds_are_combined_by_median_and_compared_round_by_round() -> None:
    fast = Measured("fast", "fast")
    slow = Measured("slow", "slow")
    # A noisy third round slows both down: the per-round ratio stays 0.5 throughout.
    for p50_fast, p50_slow in ((10.0, 20.0), (11.0, 22.0), (40.0, 80.0)):
        fast.rounds.append(Stats(p50_fast, p50_fast * 2, 1e6 / p50_fast, 10))
        slow.rounds.append(Stats(p50_slow, p50_slow * 2, 1e6 / p50_slow, 10))
    fast.samples_ns = [10_000] * 95 + [100_000] * 5
    assert fast.stats.p50_us == 11.0  # median of the rounds' p50s, not their mean
    assert fast.stats.ops_per_s == pytest.approx(1e6 / 11.0)
    assert fast.stats.p99_us == pytest.approx(100.0)  # from the pooled samples
    assert fast.stats.rounds == 3
    assert fast.ratio(slow) == pytest.approx(0.5)
    assert slow.ratio(fast) == pytest.approx(2.0)


def test_latencies_are_printed_in_a_readable_unit() -> None:
    assert format_us(0.25) == "250 ns"
    assert format_us(2.5) == "2.50 µs"
    assert format_us(42.0) == "42.0 µs"
    assert format_us(420.0) == "420 µs"
    assert format_us(4200.0) == "4.20 ms"
    assert format_us(2_500_000.0) == "2.50 s"
    assert format_us(None) == "n/a"


def _report(sections: list[Section]) -> Report:
    return Report(
        command="python -m bench --quick",
        mode="quick",
        duration_seconds=1.0,
        machine={"CPU": "test CPU", "cores": "2"},
        versions={"Redis server": "7.0"},
        sections=sections,
        verdicts=[Verdict("a goal", "1 µs", "met")],
    )


def test_the_report_has_its_tables_and_plots(tmp_path: Path) -> None:
    rows = [Row("L1 hit", Stats(1.5, 3.0, 600_000, 100)), Row("Redis", Stats(90.0, 400.0, 11_000, 100), "60x")]
    section = Section(
        title="Lookups",
        intro="Synthetic numbers.",
        tables=[latency_table([*rows, Row("memory", None, "not measured: memory retrieval not built yet")])],
        charts=[
            Bars("lookups.png", "Lookups", [r.label for r in rows], [1.5, 90.0], [3.0, 400.0]),
            Lines(
                "growth.png",
                "Growth",
                [10.0, 100.0, 1000.0],
                {"redis": [0.1, 0.1, None], "db": [1.0, 1.1, 1.3]},
                "messages",
                "ms",
            ),
        ],
    )
    output = tmp_path / "docs" / "benchmarks.md"
    written = write_report(_report([section]), output)

    text = output.read_text()
    assert "| operation | p50 | p99 | ops/s | side by side |" in text
    assert "| L1 hit | 1.50 µs | 3.00 µs | 600,000 |  |" in text
    assert "| memory | — | — | — | not measured: memory retrieval not built yet |" in text
    assert "| a goal | 1 µs | met |" in text
    assert "`python -m bench --quick`" in text and "test CPU" in text
    assert "![Lookups](benchmarks/lookups.png)" in text and "![Growth](benchmarks/growth.png)" in text
    for name in ("lookups.png", "growth.png"):
        path = tmp_path / "docs" / "benchmarks" / name
        assert path in written
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 2000


def test_regenerating_keeps_the_hand_written_notes(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    write_report(_report([Section(title="Empty")]), output)
    text = output.read_text()
    assert NOTES_BEGIN in text and NOTES_END in text
    output.write_text(text.replace("(none yet)", "The rate limit is one loopback round trip (profile)."))
    write_report(_report([Section(title="Again")]), output)
    regenerated = output.read_text()
    assert "The rate limit is one loopback round trip (profile)." in regenerated
    assert "## Again" in regenerated and "## Empty" not in regenerated


def test_targets_are_judged_from_the_figures() -> None:
    judged = {
        v.target: v.verdict
        for v in verdicts(
            {
                "personality.l1.p50_us": 2.0,
                "context.off.redis.p50_us": 400.0,
                "context.off.speedup": 12.0,
                "context.redis.p50_us": 2000.0,
                "context.speedup": 4.0,
                "context.recall.redis.p50_us": 9000.0,
                "context.recall.speedup": 1.5,
                "ratelimit.ours.p50_us": 300.0,
                "ratelimit.ratio": 0.98,
                "http.ttft.w1.c10.p50_us": 2500.0,
            }
        )
    }
    assert judged["L1 personality hit p50 ≤ 5 µs"] == "met"
    assert judged["rate-limit check (Redis) p50 ≤ 0.15 ms"] == "missed"
    assert judged["rate-limit check not slower than `limits` (moving window, Redis)"] == "met"
    assert [v for t, v in judged.items() if t.startswith("context assembly")] == ["met", "missed", "missed"]
    overhead = [v for t, v in judged.items() if t.startswith("service overhead")]
    assert overhead == ["met", "not measured"]


def _overload_run(completed: int, elapsed: float, server_cpu: float) -> dict[str, object]:
    # 3 s windows; `elapsed` runs on to the end of the queue's drain, as the load generator reports it.
    return {
        "ttft_ns": [1_000_000] * completed,
        "total_ns": [2_000_000] * completed,
        "outcomes": {"200": completed},
        "elapsed": elapsed,
        "completed": completed,
        "window": 3.0,
        "server_cpu": server_cpu,
    }


def test_overload_levels_are_the_median_of_their_rounds_over_the_window() -> None:
    rounds = [_overload_run(300, 3.3, 2.7), _overload_run(150, 3.3, 1.5), _overload_run(270, 3.2, 2.4)]
    levels = [Level("10x", 40, run, hits=9, misses=1) for run in rounds]
    merged = levels[0].merged(levels[1]).merged(levels[2])
    # Replies that ended in the window over the window (not over the drain), median of the rounds.
    assert merged.rates == [100.0, 50.0, 90.0]
    assert merged.rate == pytest.approx(90.0)
    assert merged.server_cpu == pytest.approx(0.8)
    assert merged.per_cpu_second == pytest.approx(300 / 2.7)
    assert merged.hit_rate == pytest.approx(0.9)


def test_overload_10x_is_judged_round_by_round_against_the_peak_level() -> None:
    # The second round ran while other work held the CPU: every level slowed down alike, and the
    # per-round ratio of 10x to the peak level (2x: the best median, though 5x has the best figure)
    # does not move.
    rounds = [
        {1: 95.0, 2: 100.0, 5: 101.0, 10: 92.0},
        {1: 50.0, 2: 50.0, 5: 52.0, 10: 46.0},
        {1: 90.0, 2: 96.0, 5: 91.0, 10: 88.32},
    ]
    assert peak_level(rounds) == 2
    assert round_ratios(rounds, 10, peak_level(rounds)) == pytest.approx([0.92, 0.92, 0.92])


def test_an_output_folder_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import parse

    with pytest.raises(SystemExit) as exit_:
        parse(["--quick", "--output", str(tmp_path)])
    assert exit_.value.code == 2
    assert "is a folder" in capsys.readouterr().err
    assert parse(["--quick", "--output", str(tmp_path / "bench.md")]).output == tmp_path / "bench.md"
