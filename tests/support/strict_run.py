"""A pytest plugin that makes a green run mean "every test ran and passed".

Always: a skipped test, an expected failure (xfail) and an unexpected pass (XPASS) fail the run, and
so does a skip while collecting (a module-level `pytest.skip`, `pytest.importorskip`), which no test
report would show. A run that collected no test at all (pytest's exit code 5) fails too.

With `--complete-run` (what `.ci/run` passes): also a deselected test (`-m "not localmodel"`, `-k`,
`--deselect`), a test file under the test paths that was never collected (`--ignore`,
`collect_ignore`, `norecursedirs`), and a collected test that never reported (`-x`, `--maxfail`).
Locally, `scripts/test -k openai` still runs just a part of the suite.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

OPTION = "--complete-run"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        action="store_true",
        default=False,
        help="Fail unless every test under the test paths was collected, selected and run (CI).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(StrictRun(config), "companion-strict-run")


class StrictRun:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.complete = bool(config.getoption(OPTION))
        self.problems: list[str] = []
        self.modules: set[Path] = set()
        self.items: list[str] = []
        self.reported: set[str] = set()

    # --- collection --------------------------------------------------------------------------

    def pytest_collectstart(self, collector: pytest.Collector) -> None:
        if isinstance(collector, pytest.Module):
            self.modules.add(Path(collector.path).resolve())

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.problems.append(f"skipped while collecting: {report.nodeid or '<session>'} ({_reason(report)})")

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        if self.complete:
            self.problems.extend(f"deselected: {item.nodeid}" for item in items)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = [item.nodeid for item in session.items]
        if self.complete:
            for path in self._test_files(session):
                if path not in self.modules:
                    self.problems.append(f"never collected: {path.relative_to(session.config.rootpath)}")

    def _test_files(self, session: pytest.Session) -> list[Path]:
        """Files under the test paths that pytest's own rules name as test modules."""
        patterns = session.config.getini("python_files")
        roots = [session.config.rootpath / p for p in session.config.getini("testpaths")] or [session.config.rootpath]
        found = []
        for root in roots:
            for path in sorted(Path(root).rglob("*.py")):
                if any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                    found.append(path.resolve())
        return found

    # --- running -----------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reported.add(report.nodeid)
        if hasattr(report, "wasxfail"):
            if report.skipped:
                self.problems.append(f"xfail (a skip in disguise): {report.nodeid}")
            elif report.passed and report.when == "call":
                self.problems.append(f"xpass (marked xfail, but passed): {report.nodeid}")
        elif report.skipped:
            self.problems.append(f"skipped: {report.nodeid} ({_reason(report)})")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            self.problems.append("no test was collected")
        elif self.complete and exitstatus == pytest.ExitCode.OK and not self.config.option.collectonly:
            self.problems.extend(f"never ran: {nodeid}" for nodeid in self.items if nodeid not in self.reported)
        if self.problems and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.problems:
            terminalreporter.section("every test must run here", sep="=", red=True, bold=True)
            for problem in self.problems:
                terminalreporter.line(problem, red=True)
            terminalreporter.line(f"{len(self.problems)} problem(s): the run fails (tests/support/strict_run.py)")


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)
