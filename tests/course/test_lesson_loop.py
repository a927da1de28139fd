"""The contributors' fast loop (``make lesson LESSON=NN``) finds each lesson's tests from its notebook."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("lesson", ROOT / "scripts" / "lesson.py")
lesson = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lesson)

LESSONS = sorted(path.name[:2] for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_a_lesson_gets_its_notebook_exercises_library_and_kernel_tests():
    paths = lesson.lesson_paths("41")
    assert paths[0] == "notebooks/41_radial_attention.ipynb"
    for expected in ("tests/exercises/test_41_radial_attention.py", "tests/sparse/test_radial.py",
                     "tests/kernels/test_block_sparse_kernel.py"):
        assert expected in paths, paths


def test_every_mechanism_and_kernel_test_belongs_to_some_lesson():
    reached = {path for number in LESSONS for path in lesson.lesson_paths(number)}
    # the environment check, the progress bar and the compile check belong to no single lesson
    unreached = {"tests/kernels/test_kernel_compile.py", "tests/tools/test_doctor.py", "tests/tools/test_progress.py"}
    for path in (ROOT / "tests").rglob("test_*.py"):
        relative = str(path.relative_to(ROOT))
        if path.parent.name not in ("course", "exercises", "benchmarks") and relative not in unreached:
            assert relative in reached, f"{relative} is run by no `make lesson`"


def test_an_unknown_lesson_names_the_known_ones():
    with pytest.raises(SystemExit, match="lesson: no notebook notebooks/99_.*lessons: 00, 01"):
        lesson.lesson_paths("99")
