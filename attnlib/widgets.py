"""Interactive controls that also run headless.

``interactive_figure(draw, scale=(0.1, 4.0, 0.1))`` shows sliders in JupyterLab that re-draw a figure.
Without a widget front end (a plain Python script, or ``nbval`` running the notebook headless) it
still draws the figure once for the default values, so every widget cell shows a useful picture and
its code is exercised by the tests.

Controls use ipywidgets' abbreviations: ``(min, max, step)`` for a slider, a list for a dropdown, a
``bool`` for a checkbox; :func:`slider` makes an explicit slider with a chosen default.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import matplotlib.pyplot as plt


def slider(low, high, step, value):
    """An explicit slider abbreviation with a default ``value`` (ints give an int slider)."""
    import ipywidgets as widgets

    if all(isinstance(t, int) for t in (low, high, step, value)):
        return widgets.IntSlider(min=low, max=high, step=step, value=value, continuous_update=False)
    return widgets.FloatSlider(min=low, max=high, step=step, value=value, continuous_update=False)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def default_values(draw: Callable, controls: dict) -> dict:
    """The value each control starts at (what a headless run draws)."""
    values = {}
    params = inspect.signature(draw).parameters
    for name, control in controls.items():
        if hasattr(control, "value"):
            values[name] = control.value
        elif name in params and params[name].default is not inspect.Parameter.empty:
            values[name] = params[name].default
        elif isinstance(control, tuple):
            low, high = control[0], control[1]
            values[name] = type(low)((low + high) / 2) if isinstance(low, int) else (low + high) / 2
        elif isinstance(control, (list, tuple)):
            values[name] = control[0]
        else:
            values[name] = control
    return values


def interactive_figure(draw: Callable, **controls):
    """Show ``draw(**values)`` with one control per keyword; re-draw when a control moves.

    ``draw`` makes a matplotlib figure (and may return anything). In a Jupyter kernel this returns the
    ``ipywidgets.interactive`` object (shown by the notebook); elsewhere it calls ``draw`` once with the
    defaults and returns what ``draw`` returned.
    """
    unknown = set(controls) - set(inspect.signature(draw).parameters)
    if unknown:
        raise ValueError(f"controls: {sorted(unknown)} are not parameters of {draw.__name__}()")
    if not _in_kernel():
        result = draw(**default_values(draw, controls))
        plt.show()
        return result

    import ipywidgets as widgets

    @functools.wraps(draw)  # so that ipywidgets sees draw's signature and its defaults
    def redraw(**values):
        draw(**values)
        plt.show()

    return widgets.interactive(redraw, **controls)
