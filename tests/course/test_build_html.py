"""The rendered course: a notebook executed and exported to HTML, widgets shown as their pictures."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("build_html", ROOT / "scripts" / "build_html.py")
build_html = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_html)


def small_lesson(path: Path) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# 99 A small lesson\n\nWith a figure and a widget."),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);"),
        nbformat.v4.new_code_cell(
            "from attnlib.tools.widgets import interactive_figure, slider\n"
            "def draw(n=3):\n    plt.figure(); plt.bar(range(n), range(n))\n"
            "interactive_figure(draw, n=slider(1, 5, 1, 3))"),
    ]
    nbformat.write(notebook, path)
    return path


def test_a_lesson_renders_with_its_figures_and_its_widget_as_a_picture(tmp_path):
    source = small_lesson(tmp_path / "99_small.ipynb")
    out = tmp_path / "html"
    out.mkdir()
    title, seconds = build_html.render_lesson(source, out)
    assert title == "99 A small lesson" and seconds > 0
    page = (out / "99_small.html").read_text()
    assert page.count("<img") == 2 and page.count("src=\"data:image/png") == 2  # the plot, and the widget's picture
    assert build_html.WIDGET_VIEW not in page.split("</head>", 1)[1]  # no live widget left to fail
    assert "widget-state" not in page  # nor the state of one
    assert "<html" not in source.read_text()  # the source notebook is untouched (executed from a copy)
    assert not nbformat.read(source, as_version=4).cells[1].outputs

    build_html.write_index(out, [("99_small", title)])
    index = (out / "index.html").read_text()
    assert '<a href="99_small.html">99 A small lesson</a>' in index
    build_html.write_index(out, [("98_other", "Another lesson")])
    assert '<a href="98_other.html">98 · Another lesson</a>' in (out / "index.html").read_text()


def test_outputs_without_a_picture_keep_their_widget():
    notebook = nbformat.v4.new_notebook()
    with_picture = nbformat.v4.new_output("display_data", {build_html.WIDGET_VIEW: {}, "image/png": "AA=="})
    without = nbformat.v4.new_output("display_data", {build_html.WIDGET_VIEW: {}, "text/plain": "x"})
    notebook.cells = [nbformat.v4.new_code_cell("", outputs=[with_picture, without])]
    assert build_html.widgets_as_pictures(notebook) == 1
    assert set(notebook.cells[0].outputs[0].data) == {"image/png"}
    assert build_html.WIDGET_VIEW in notebook.cells[0].outputs[1].data


def test_unknown_lessons_are_named(capsys):
    with pytest.raises(SystemExit):
        build_html.main(["--lessons", "98"])
    assert "--lessons: no lesson numbered 98" in capsys.readouterr().err
