"""pytest options shared by the whole test suite.

``--against`` chooses whose answers the exercise tests in ``tests/exercises`` check:
``solutions`` (the default, what CI runs) or ``exercises`` (your own work).
"""

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
