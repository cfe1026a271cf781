"""The rule that a green run means every test ran (tests/support/strict_run.py), checked on small
pytest sessions of its own (pytester), so that the rule cannot quietly stop working: each way a test
can go missing fails the run, and a complete run passes."""

from __future__ import annotations

from pathlib import Path

import pytest

PLUGIN = ("-p", "tests.support.strict_run")
PASSING = "def test_one():\n    assert True\n"


@pytest.fixture(autouse=True)
def only_this_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner sessions load no installed plugin (asyncio, playwright...) but the one under test."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*PLUGIN, "-p", "no:cacheprovider", *args)


def test_a_complete_run_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=PASSING, test_b=PASSING)
    result = run(pytester, "--complete-run")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("import pytest\ndef test_s():\n    pytest.skip('no database')\n", "skipped: test_x.py::test_s"),
        ("import pytest\n@pytest.mark.skip\ndef test_s():\n    pass\n", "skipped: test_x.py::test_s"),
        (
            "import pytest\n@pytest.mark.skipif(True, reason='never here')\ndef test_s():\n    pass\n",
            "skipped: test_x.py::test_s",
        ),
        ("import pytest\n@pytest.mark.xfail\ndef test_x():\n    assert False\n", "xfail"),
        ("import pytest\n@pytest.mark.xfail\ndef test_x():\n    assert True\n", "xpass"),
        (
            "import pytest\npytest.skip('not here', allow_module_level=True)\ndef test_s():\n    pass\n",
            "skipped while collecting: test_x.py",
        ),
        (
            "import pytest\npytest.importorskip('a_module_that_is_not_installed')\ndef test_s():\n    pass\n",
            "skipped while collecting: test_x.py",
        ),
    ],
    ids=["skip-call", "skip-mark", "skipif", "xfail", "xpass", "module-skip", "importorskip"],
)
@pytest.mark.parametrize("complete", [False, True], ids=["local", "ci"])
def test_a_test_that_did_not_really_run_fails_the_run(
    pytester: pytest.Pytester, source: str, problem: str, complete: bool
) -> None:
    pytester.makepyfile(test_ok=PASSING, test_x=source)
    result = run(pytester, *(["--complete-run"] if complete else []))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*every test must run here*", f"*{problem}*"])


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["-m", "not slow"], "deselected: test_x.py::test_slow"),
        (["-k", "not test_slow"], "deselected: test_x.py::test_slow"),
        (["--deselect", "test_x.py::test_slow"], "deselected: test_x.py::test_slow"),
        (["--ignore", "test_x.py"], "never collected: test_x.py"),
        (["--ignore-glob", "*_x.py"], "never collected: test_x.py"),
    ],
    ids=["-m", "-k", "--deselect", "--ignore", "--ignore-glob"],
)
def test_under_complete_run_a_test_left_out_fails_the_run(
    pytester: pytest.Pytester, args: list[str], problem: str
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    slow: a slow test\n")
    pytester.makepyfile(
        test_ok=PASSING,
        test_x="import pytest\n@pytest.mark.slow\ndef test_slow():\n    pass\ndef test_fast():\n    pass\n",
    )
    result = run(pytester, "--complete-run", *args)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines([f"*{problem}*"])
    # Without --complete-run the same selection is a normal local run.
    assert run(pytester, *args).ret == pytest.ExitCode.OK


def test_under_complete_run_a_file_the_configuration_ignores_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("collect_ignore = ['test_x.py']\n")
    pytester.makepyfile(test_ok=PASSING, test_x=PASSING)
    result = run(pytester, "--complete-run")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*never collected: test_x.py*"])


def test_under_complete_run_tests_that_never_ran_fail_the_run(pytester: pytest.Pytester) -> None:
    """A plugin (or a stray hook) that stops the session early after a passing test."""
    pytester.makeconftest(
        "import pytest\n"
        "def pytest_runtest_logfinish(nodeid, location):\n"
        "    pytest.exit('stopping early', returncode=0)\n"
    )
    pytester.makepyfile(test_a=PASSING, test_b=PASSING)
    result = run(pytester, "--complete-run")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*never ran: test_b.py::test_one*"])


def test_no_tests_at_all_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_empty="X = 1\n")
    for args in ([], ["--complete-run"]):
        result = run(pytester, *args)
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        result.stdout.fnmatch_lines(["*no test was collected*"])


def test_a_collection_error_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ok=PASSING, test_broken="import a_module_that_is_not_installed\n")
    assert run(pytester, "--complete-run").ret == pytest.ExitCode.INTERRUPTED


def test_ci_runs_the_whole_suite_with_the_complete_run_option() -> None:
    """`.ci/run` is what CI runs: it must ask for the complete run and pass no selection of its own."""
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in script.splitlines() if line.startswith("exec "))
    assert command == "exec scripts/test -p no:cacheprovider --complete-run", command
