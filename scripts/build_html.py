"""Render the course as static HTML pages, one per lesson with its outputs, plus an index.

    python scripts/build_html.py [--out build/html] [--lessons 00 13 ...]

(``make html`` runs it.) Each notebook is executed from a temporary copy, top to bottom, in this
environment's Python kernel, then exported with nbconvert's JupyterLab template. Figures are embedded
in the pages; each interactive widget appears as the picture of its default state (see
``attnlib.tools.widgets``), since a static page cannot run Python. Open ``build/html/index.html`` in a browser.
"""

from __future__ import annotations

import argparse
import html
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def lesson_title(notebook) -> str:
    """The first Markdown heading of the notebook, without the leading #'s."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return "(untitled)"


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widgets_as_pictures(notebook) -> int:
    """Drop the live-widget part of every output that also carries a picture; returns how many.

    A static page cannot run the kernel behind a widget, so it shows the widget's picture of its
    default state instead (``attnlib.tools.widgets.interactive_figure`` puts both in one output).
    """
    replaced = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data and "image/png" in data:
                del data[WIDGET_VIEW]
                replaced += 1
    notebook.metadata.pop("widgets", None)  # the saved widget state: nothing left to use it
    return replaced


def render_lesson(path: Path, out_dir: Path, timeout_s: int = 600) -> tuple[str, float]:
    """Execute ``path`` from a temporary copy and write ``out_dir/<name>.html``; returns (title, seconds)."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        copy = Path(work) / path.name
        shutil.copy(path, copy)
        client = NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                                resources={"metadata": {"path": work}})
        client.execute()
    widgets_as_pictures(notebook)
    seconds = time.perf_counter() - start
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(notebook)
    (out_dir / f"{path.stem}.html").write_text(body, encoding="utf-8")
    return lesson_title(notebook), seconds


def write_index(out_dir: Path, lessons: list[tuple[str, str]]) -> None:
    """``index.html``: one link per rendered lesson, in course order."""
    def label(stem: str, title: str) -> str:  # the notebooks' titles already start with their number
        return title if title.startswith(stem[:2]) else f"{stem[:2]} · {title}"

    items = "\n".join(f'    <li><a href="{html.escape(stem)}.html">{html.escape(label(stem, title))}</a></li>'
                      for stem, title in lessons)
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Attention mechanisms, the course</title>
<style>body {{ font-family: sans-serif; max-width: 50em; margin: 3em auto; line-height: 1.5 }}</style></head>
<body>
  <h1>Attention mechanisms, from first principles to fast GPU kernels</h1>
  <p>The lessons as rendered pages, with every output. To run them, move the controls and do the
  exercises, open the course in JupyterLab (<code>make lab</code>).</p>
  <ol style="list-style: none; padding: 0">
{items}
  </ol>
</body>
</html>
"""
    (out_dir / "index.html").write_text(page, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "html", help="output folder")
    parser.add_argument("--lessons", nargs="*", default=None, help="lesson numbers to render (default: all)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.lessons:
        wanted = set(args.lessons)
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            parser.error(f"--lessons: no lesson numbered {', '.join(sorted(unknown))}; "
                         f"the lessons are {', '.join(p.name[:2] for p in paths)}")
        paths = [p for p in paths if p.name[:2] in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    rendered = []
    for path in paths:
        title, seconds = render_lesson(path, args.out)
        rendered.append((path.stem, title))
        print(f"{path.stem}.html  ({seconds:.0f} s)", flush=True)
    write_index(args.out, rendered)
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
