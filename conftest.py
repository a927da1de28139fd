"""pytest options shared by the whole test suite.

``--against`` chooses whose answers the exercise tests in ``tests/exercises`` check:
``solutions`` (the default, what CI runs) or ``exercises`` (your own work).
"""

import pytest
import torch

# Small tensors are faster on one thread: two threads pay a synchronisation cost on every tiny op.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--against",
        choices=("solutions", "exercises"),
        default="solutions",
        help="whose answers the exercise tests check: solutions/ (default) or exercises/ (yours)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "checker: tests of the exercise checkers themselves (they run only with --against solutions)",
    )


def pytest_collection_modifyitems(config, items):
    # The checker's own tests (does it reject the stubs and the usual mistakes?) are about the course,
    # not about a learner's answers: deselect them when a learner checks their work.
    if config.getoption("--against") != "exercises":
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("checker") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def exercise_name(nodeid: str) -> str:
    """``tests/exercises/test_50_flash_bias.py::test_concat_inputs`` -> ``lesson 50, concat_inputs``."""
    path, _, test = nodeid.partition("::")
    lesson = path.rsplit("/", 1)[-1].removeprefix("test_")[:2]
    return f"lesson {lesson}, {test.removeprefix('test_').split('[')[0]}"


def failure_message(report) -> str:
    """The checker's message in plain words: its first line, without the exception's class name."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
    return message.removeprefix("AssertionError: ")


@pytest.hookimpl(trylast=True)  # after pytest's own summary, so that it is the last thing a learner reads
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # When a learner checks their own work, end with one line per exercise in plain words.
    if config.getoption("--against") != "exercises":
        return
    results = {}
    for status in ("passed", "failed"):
        for report in terminalreporter.stats.get(status, []):
            if getattr(report, "when", None) == "call" and "tests/exercises/" in report.nodeid:
                results.setdefault(exercise_name(report.nodeid), []).append((status, report))
    if not results:
        return
    terminalreporter.section("your exercises")
    done = 0
    for name, outcomes in results.items():
        failures = [report for status, report in outcomes if status == "failed"]
        if failures:
            terminalreporter.write_line(f"[TODO] {name}: {failure_message(failures[0])}")
        else:
            done += 1
            terminalreporter.write_line(f"[OK]   {name}")
    terminalreporter.write_line(f"{done} of {len(results)} exercises pass."
                                + ("" if done == len(results) else " Add --tb=short to see where a check failed."))
