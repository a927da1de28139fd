"""`make check`'s report: one plain line per exercise, [OK] or [TODO] with the checker's message."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check(lesson_file: str, against: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--tb=no", "-rN", "-p", "no:cacheprovider",
                             f"tests/exercises/{lesson_file}", "--against", against],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result.stdout


def test_untouched_exercises_are_listed_with_their_hints():
    out = check("test_13_differential_attention.py", "exercises")
    lines = out.splitlines()
    assert "0 of 3 exercises pass. Add --tb=short to see where a check failed." in lines, out
    todo = [line for line in lines if line.startswith("[TODO] lesson 13, ")]
    assert len(todo) == 3 and all("is not implemented yet. Hint:" in line for line in todo), out
    assert not any("AssertionError" in line for line in todo)


def test_the_report_is_only_for_a_learners_own_work():
    # against the model solutions (what CI runs) there is no exercise report
    assert "your exercises" not in check("test_13_differential_attention.py", "solutions")
