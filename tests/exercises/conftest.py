"""The ``impl`` fixture: the module whose answers a test file checks.

Each test file names its lesson, ``LESSON = "00_attention_from_scratch"``, and receives
``exercises/00_attention_from_scratch.py`` or ``solutions/00_attention_from_scratch.py`` depending on
``--against``.
"""

import pytest

from .harness import load_lesson


@pytest.fixture
def impl(request):
    lesson = getattr(request.module, "LESSON", None)
    if lesson is None:
        raise RuntimeError(f"{request.module.__name__} must define LESSON = 'NN_slug'")
    return load_lesson(request.config.getoption("--against"), lesson)
