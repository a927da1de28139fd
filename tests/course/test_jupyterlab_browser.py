"""The course as a learner meets it: every lesson opened in JupyterLab in a real (headless) Chromium.

nbval proves that a notebook's cells run; this test proves what a learner sees. For each lesson it
opens the notebook in JupyterLab, runs all cells, and checks in the page that

- every code cell finished (has an execution count) and none has an error output;
- the lesson's widgets rendered as live controls, not as "could not be displayed" or a picture;
- moving one control of the lesson's first widget changes the figure it draws.

Which lessons: all of them while there are at most ``MAX_LESSONS`` (one lesson takes about as long as its
notebook, 20-40 s on two cores). With more, lesson 00 plus a subset that rotates every ISO week, so
that within a week every run checks the same lessons and over a few weeks every lesson is checked.
``BROWSER_LESSONS=all`` checks every lesson; ``BROWSER_LESSONS=00,13`` checks those.

JupyterLab serves a temporary copy of the notebooks (so autosave never writes outputs into the
repository) on 127.0.0.1 with a random token. A screenshot of each checked lesson is kept in
``build/browser/`` (not committed). The browser is the system's Chromium, driven by Playwright; where
none is installed the test is skipped with the reason (install Debian's ``chromium`` package, or set
``CHROMIUM`` to a Chromium or Chrome executable), except under CI, where it must run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALL_LESSONS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_LESSONS = 8  # keeps the browser test under five minutes on two cores
SCREENSHOTS = ROOT / "build" / "browser"
CELL_TIMEOUT_S = 240  # one lesson's "run all"; the notebooks take well under a minute each
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
CANDIDATES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
              "/Applications/Chromium.app/Contents/MacOS/Chromium",
              "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"]


def lessons_to_check(lessons: list[str], choice: str = "", today: dt.date | None = None,
                     most: int = MAX_LESSONS) -> list[str]:
    """The lessons this run opens: ``choice`` ("all", or lesson numbers "00,13"), else all or a weekly rotation."""
    if choice == "all":
        return list(lessons)
    if choice:
        wanted = {number.strip() for number in choice.split(",")}
        unknown = wanted - {lesson[:2] for lesson in lessons}
        if unknown:
            raise ValueError(f"BROWSER_LESSONS: no lesson numbered {', '.join(sorted(unknown))}; "
                             f"expected 'all' or numbers among {', '.join(lesson[:2] for lesson in lessons)}")
        return [lesson for lesson in lessons if lesson[:2] in wanted]
    if len(lessons) <= most:
        return list(lessons)
    first, rest = lessons[0], lessons[1:]
    week = (today or dt.date.today()).isocalendar()[1]
    start = (week * (most - 1)) % len(rest)
    return [first] + sorted(rest[(start + i) % len(rest)] for i in range(most - 1))


LESSONS = lessons_to_check(ALL_LESSONS, os.environ.get("BROWSER_LESSONS", ""))


def test_the_rotation_covers_every_lesson_and_always_lesson_00():
    lessons = [f"{n:02d}_x.ipynb" for n in (0, 1, 2, 10, 11, 12, 13, 14, 30, 31, 32, 50)]
    seen = set()
    for week in range(1, 5):
        chosen = lessons_to_check(lessons, today=dt.date.fromisocalendar(2026, week, 1), most=5)
        assert chosen[0] == "00_x.ipynb" and len(chosen) == 5 == len(set(chosen))
        seen.update(chosen)
    assert seen == set(lessons)
    assert lessons_to_check(lessons[:4], most=5) == lessons[:4]
    assert lessons_to_check(lessons, "all") == lessons
    assert lessons_to_check(lessons, "13, 00") == ["00_x.ipynb", "13_x.ipynb"]
    with pytest.raises(ValueError, match="BROWSER_LESSONS: no lesson numbered 99"):
        lessons_to_check(lessons, "99")


def find_chromium() -> str | None:
    """The browser to drive: ``$CHROMIUM``, else the first Chromium or Chrome found."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for candidate in CANDIDATES:
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium_path():
    path = find_chromium()
    if path is None:
        message = ("no Chromium or Chrome found: install Debian's `chromium` package (apt-get install chromium) "
                   "or set CHROMIUM=/path/to/chrome to run the browser test")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("playwright", reason="the browser test needs playwright (pip install -r requirements.txt)")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory, chromium_path):
    """A JupyterLab server on loopback serving a temporary copy of the notebooks; yields (url, token)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for folder in ("config", "data", "runtime", "settings", "workspaces"):
        (root / f".{folder}").mkdir()
    # no "would you like news?" pop-up over the page (and no fetch of news: there is no network)
    notification = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
               "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # JupyterLab refuses root without it (containers, CI)
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as response:
                    json.load(response)
                break
            except OSError as error:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = (root / "lab.log").read_text()
                    raise RuntimeError(f"JupyterLab did not start; its log:\n{log}") from error
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright starts the browser with a fresh, temporary profile of its own
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


# JavaScript run in the page against JupyterLab's application object (exposed by the server flag above)
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.content || !panel.content.model) return null;
    const cells = [];
    for (const cell of panel.content.model.cells) {
        if (cell.type !== 'code') continue;
        const errors = [];
        for (let i = 0; i < cell.outputs.length; i++) {
            const output = cell.outputs.get(i).toJSON();
            if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
        }
        cells.push({count: cell.executionCount, errors: errors, source: cell.sharedModel.getSource().slice(0, 80)});
    }
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return {cells: cells, kernel: kernel ? kernel.status : 'none'};
}"""


def open_and_run(page, url: str, token: str, lesson: str) -> dict:
    """Open ``lesson``, wait for its kernel, run all cells, wait until done; returns the final state."""
    # a workspace of its own, reset: only this lesson is open (nothing restored from another page)
    page.goto(f"{url}/lab/workspaces/{Path(lesson).stem}/tree/notebooks/{lesson}?reset&token={token}")
    ready = """() => { const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const kernel = panel && panel.sessionContext && panel.sessionContext.session
                       && panel.sessionContext.session.kernel;
        return !!(panel && panel.context && panel.context.path.endsWith(LESSON) && kernel && kernel.status === 'idle'); }"""
    page.wait_for_function(ready.replace("LESSON", repr(lesson)), timeout=180_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + CELL_TIMEOUT_S
    time.sleep(1.0)
    while True:
        state = page.evaluate(NOTEBOOK_STATE)
        errors = [(c["source"], c["errors"]) for c in state["cells"] if c["errors"]]
        if errors:
            return state
        if state["kernel"] == "idle" and all(c["count"] is not None for c in state["cells"]):
            return state
        if time.monotonic() > deadline:
            pending = [c["source"] for c in state["cells"] if c["count"] is None]
            raise AssertionError(f"{lesson}: cells still pending after {CELL_TIMEOUT_S} s: {pending[:3]}")
        time.sleep(0.5)


def move_one_control(page, widget) -> str:
    """Change the first control of ``widget`` (slider, dropdown or checkbox); returns what was moved."""
    handle = widget.locator(".noUi-handle").first
    if handle.count():
        handle.focus()
        page.keyboard.press("ArrowRight")
        return "slider"
    select = widget.locator("select").first
    if select.count():
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("s => s.value")
        other = next(o for o in options if o != current)
        select.select_option(label=other)
        return f"dropdown -> {other}"
    box = widget.locator("input[type=checkbox]").first
    if box.count():
        box.click()
        return "checkbox"
    raise AssertionError("the widget has no slider, dropdown or checkbox to move")


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_runs_and_its_widgets_respond_in_jupyterlab(lab, browser, lesson):
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        state = open_and_run(page, url, token, lesson)
        errors = [(c["source"], c["errors"]) for c in state["cells"] if c["errors"]]
        assert not errors, f"{lesson}: cells with an error output: {errors}"

        notebook = page.locator(".jp-NotebookPanel:visible .jp-Notebook")
        text = notebook.inner_text()
        for failure in ("Error displaying widget", "could not be displayed", "Loading widget"):
            assert failure not in text, f"{lesson}: a widget shows {failure!r} instead of its controls"
        widgets = notebook.locator(".widget-interact")
        assert widgets.count() >= 1, f"{lesson}: no live interactive widget rendered"

        widget = widgets.first
        widget.scroll_into_view_if_needed()
        picture = widget.locator("img").first
        picture.wait_for(timeout=60_000)
        before = picture.get_attribute("src")
        moved = move_one_control(page, widget)
        page.wait_for_function("([el, old]) => { const img = el.querySelector('img'); "
                               "return img && img.getAttribute('src') !== old; }",
                               arg=[widget.element_handle(), before], timeout=60_000)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        widget.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / f"{Path(lesson).stem}.png"))
        print(f"{lesson}: {len(state['cells'])} code cells ran, {widgets.count()} widget(s), moved a {moved}")
    except BaseException:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{Path(lesson).stem}-failed.png"))
        raise
    finally:
        # stop the lesson's kernel so that the next lesson has the CPU to itself
        page.evaluate("() => { const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget; "
                      "return panel && panel.sessionContext ? panel.sessionContext.shutdown() : null; }")
        page.close()
