"""Interactive controls that also run headless.

``interactive_figure(draw, scale=(0.1, 4.0, 0.1))`` shows sliders in JupyterLab that re-draw a figure.
Every widget cell also shows a useful picture where no widget can live:

- in a Jupyter kernel, the widget is displayed together with a PNG of the figure at the default values,
  in the same output. JupyterLab shows the live widget; a viewer without widgets (a rendered HTML page,
  GitHub's notebook preview, a notebook executed by ``nbval`` or ``nbconvert``) shows the PNG instead
  of "widget could not be displayed";
- outside a kernel (a plain Python script) it draws the figure once for the default values.

Controls use ipywidgets' abbreviations: ``(min, max, step)`` for a slider, a list for a dropdown, a
``bool`` for a checkbox; :func:`slider` makes an explicit slider with a chosen default.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
from collections.abc import Callable

from .plotting import plt


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


class WidgetWithFallback:
    """A live widget that carries a static picture of its default state for viewers without widgets.

    Displaying it gives one output whose bundle holds the widget view *and* ``image/png``: a front end
    with a widget manager (JupyterLab) picks the widget, any other picks the picture. Attributes not
    defined here (``children``, ``kwargs``, ...) are those of the widget.
    """

    def __init__(self, widget, png: bytes):
        self.widget = widget
        self.png = png

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        data = {**data, "image/png": base64.b64encode(self.png).decode("ascii")}
        data["text/plain"] = "(an interactive figure: run the notebook in JupyterLab to move its controls)"
        return data, metadata

    def __getattr__(self, name):
        return getattr(self.widget, name)


def _figure_png(draw: Callable, values: dict) -> bytes:
    """PNG bytes of the figure that ``draw(**values)`` makes (closed afterwards, so it shows nowhere)."""
    before = set(plt.get_fignums())
    draw(**values)
    new = [n for n in plt.get_fignums() if n not in before] or plt.get_fignums()[-1:]
    if not new:
        raise ValueError(f"draw: {draw.__name__}() made no matplotlib figure")
    figure = plt.figure(new[-1])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=plt.rcParams["figure.dpi"])
    for number in new:
        plt.close(number)
    return buffer.getvalue()


def interactive_figure(draw: Callable, **controls):
    """Show ``draw(**values)`` with one control per keyword; re-draw when a control moves.

    ``draw`` makes a matplotlib figure (and may return anything). In a Jupyter kernel this returns a
    :class:`WidgetWithFallback`: the ``ipywidgets.interactive`` controls, shown by the notebook with a
    picture of the default figure for viewers that cannot run widgets. Elsewhere it calls ``draw`` once
    with the defaults and returns what ``draw`` returned.
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

    picture = _figure_png(draw, default_values(draw, controls))
    return WidgetWithFallback(widgets.interactive(redraw, **controls), picture)
