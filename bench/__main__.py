"""`python -m bench`: every benchmark group in one run, written to docs/benchmarks.md with its plots.

    python -m bench                      # the full run (several minutes), docs/benchmarks.md
    python -m bench --quick              # under a minute, fewer and shorter rounds, .bench/quick.md
    python -m bench --only cache,context # some groups (the report then holds only those)
    python -m bench --profile            # also write profiles of the target rows to .bench/profiles/
    python -m bench --only memory-eval   # the long-term memory evaluation (bench/memory_eval.py)
    python -m bench --only cost          # what a chat turn costs, counted (bench/cost.py)

Needs PostgreSQL (a database `companion_bench_*` is created and dropped) and redis-server (a private
one is started on a free port); installs: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

GROUPS = ("cache", "context", "cost", "http", "model", "growth", "overload", "redis", "memory-eval")
REQUIRED = {"matplotlib": "matplotlib", "limits": "limits"}


def missing_extras() -> list[str]:
    return [name for module, name in REQUIRED.items() if importlib.util.find_spec(module) is None]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute): fewer, shorter rounds")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of: {', '.join(GROUPS)}")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file to write (default docs/benchmarks.md; .bench/quick.md with --quick); "
        "PNGs go to a folder beside it named after it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(os.cpu_count() or 2, 2),
        help="server worker processes for the multi-worker HTTP rows (default: CPU count)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the target rows (pyinstrument, py-spy)")
    parser.add_argument(
        "--pg-dsn",
        default=None,
        help="PostgreSQL admin DSN (default $COMPANION_BENCH_PG_DSN or postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    args = parser.parse_args(argv)
    args.groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if args.output is None:
        args.output = Path(".bench/quick.md") if args.quick else Path("docs/benchmarks.md")
    if args.output.is_dir():  # found before the run, not after minutes of it
        parser.error(f"--output {args.output} is a folder; give the markdown file to write, e.g. {args.output / 'bench.md'}")
    return args


async def run(args: argparse.Namespace) -> int:
    from bench import cache, context, cost, growth, http, memory_eval, model, overload, redis_scaling
    from bench.env import DEFAULT_PG_ADMIN_DSN, BenchEnv, machine, versions
    from bench.harness import Budget, progress
    from bench.report import Outcome, Report, write_report
    from bench.targets import verdicts

    budget = (
        Budget(rounds=3, seconds=0.04, min_iterations=20, warmup_seconds=0.03)
        if args.quick
        else Budget(rounds=5, seconds=0.4, min_iterations=100, warmup_seconds=0.2)
    )
    started = time.monotonic()
    runners: dict[str, Callable[..., Awaitable[Outcome]]] = {
        "cache": lambda env: cache.run(env, budget),
        "context": lambda env: context.run(env, budget, profile=args.profile),
        "cost": lambda env: cost.run(env, quick=args.quick),
        "http": lambda env: http.run(env, quick=args.quick, workers=args.workers, profile=args.profile),
        "model": lambda env: model.run(env, quick=args.quick),
        "growth": lambda env: growth.run(env, budget, quick=args.quick),
        "overload": lambda env: overload.run(env, quick=args.quick),
        "redis": lambda env: redis_scaling.run(env, budget, quick=args.quick),
        "memory-eval": memory_eval.run,
    }
    outcome = Outcome()
    async with BenchEnv(pg_admin_dsn=args.pg_dsn or DEFAULT_PG_ADMIN_DSN) as env:
        progress(
            f"PostgreSQL {env.postgres_version} database {env.database_name}; "
            f"private Redis {env.redis_version} on port {env.redis.port if env.redis else '?'}"
        )
        for group in args.groups:
            progress(f"== {group}")
            result = await runners[group](env)
            outcome.sections += result.sections
            outcome.figures.update(result.figures)
        found_versions = versions(env)
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    report = Report(
        command=command,
        mode="quick" if args.quick else "full",
        duration_seconds=time.monotonic() - started,
        machine=machine(),
        versions=found_versions,
        sections=outcome.sections,
        verdicts=verdicts(outcome.figures),
    )
    for path in write_report(report, args.output):
        progress(f"wrote {path}")
    for verdict in report.verdicts:
        progress(f"target: {verdict.target}: {verdict.verdict} ({verdict.measured})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    missing = missing_extras()
    if missing:
        print(
            f"error: the benchmarks need {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed. Install the bench extra: .venv/bin/pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    try:
        import uvloop
    except ImportError:  # the service runs on uvloop where it can; measure on what it would use
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
