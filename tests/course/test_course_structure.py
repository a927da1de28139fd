"""How the course is stored: notebooks without outputs, and every lesson complete.

Notebooks are committed *without outputs* (no outputs, no execution counts, no widget state), so that a
change to a lesson shows up in review as a change to its text and code only, and the notebooks under
``nbval`` check themselves through the ``assert``s in their cells. ``make strip`` cleans them.
"""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
README = (ROOT / "README.md").read_text()


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    assert "widgets" not in notebook["metadata"], "saved widget state: run `make strip`"
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"cell {index} has outputs: run `make strip`"
        assert cell.get("execution_count") is None, f"cell {index} has an execution count: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_is_complete(path):
    slug = path.stem
    assert re.fullmatch(r"\d\d_[a-z0-9_]+", slug), f"{path.name}: lesson files are named NN_slug"
    for part in (f"exercises/{slug}.py", f"solutions/{slug}.py", f"tests/exercises/test_{slug}.py"):
        assert (ROOT / part).exists(), f"lesson {slug} has no {part}"
    assert f"notebooks/{slug}.ipynb" in README, f"the README's course map has no link to lesson {slug}"


def widget_calls(source: str):
    """Each ``interactive_figure(...)`` call in a cell's code, and whether it is the cell's last expression."""
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    last = tree.body[-1] if tree.body else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "interactive_figure":
            yield isinstance(last, ast.Expr) and last.value is node


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_widgets_are_shown(path):
    """A lesson has a widget, and each one is its cell's last expression (else Jupyter never shows it)."""
    notebook = json.loads(path.read_text())
    calls = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            for shown in widget_calls("".join(cell["source"])):
                assert shown, (f"cell {index}: interactive_figure(...) must be the cell's last expression, not "
                               f"assigned or nested, or JupyterLab shows no widget")
                calls.append(index)
    assert calls, f"{path.stem} has no interactive_figure(...) widget"


def test_the_widget_check_sees_a_hidden_widget():
    assert list(widget_calls("x = 1\ninteractive_figure(draw, n=(1, 3))")) == [True]
    assert list(widget_calls("shown = interactive_figure(draw, n=(1, 3))")) == [False]
    assert list(widget_calls("interactive_figure(draw, n=(1, 3))\nprint('done')")) == [False]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
