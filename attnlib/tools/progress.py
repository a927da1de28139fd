"""Progress bars for long cells that work in JupyterLab and degrade to plain lines everywhere else.

In a Jupyter kernel, :class:`Progress` shows one output that is updated in place: an HTML progress bar
with the step, the latest numbers and the time so far, and the same as one plain line of text. A front
end that renders HTML (JupyterLab, a rendered page) shows the bar; one that keeps only text (a notebook
executed by ``nbval``, a terminal) shows the line. No widget is involved, so the bar also works where
widgets do not. Outside a kernel (a script, a test) nothing is displayed; callers print their own lines.

::

    for size in track([64, 128, 256], "timing"):
        ...

    bar = Progress(total=steps, description="training")
    for step in range(1, steps + 1):
        ...
        bar.update(step, loss=loss.item())
    bar.close()
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .._checks import check_positive_int
from .widgets import _in_kernel

T = TypeVar("T")


class Progress:
    """A bar for ``total`` steps, shown and updated in place when running in a Jupyter kernel.

    Args:
        total: number of steps.
        description: a few words saying what is running.
        min_interval: seconds between two redraws (the last step is always drawn).
        enabled: ``None`` shows the bar in a kernel only; ``False`` never; ``True`` always (in a
            kernel).
    """

    def __init__(self, total: int, description: str = "", *, min_interval: float = 0.2,
                 enabled: bool | None = None):
        check_positive_int("total", total)
        self.total, self.description, self.min_interval = total, description, min_interval
        self.start = time.perf_counter()
        self.step, self.metrics = 0, {}
        self._last_draw = float("-inf")
        self._handle = None
        if enabled is None or enabled:
            if _in_kernel():
                from IPython.display import display

                self._handle = display(self._bundle(), raw=True, display_id=True)

    @property
    def shown(self) -> bool:
        """Whether a bar is on screen (in a kernel, enabled)."""
        return self._handle is not None

    def text(self) -> str:
        """The plain line: ``description  step/total  name value ...  (seconds)``."""
        numbers = "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                            for name, value in self.metrics.items())
        parts = [self.description, f"{self.step}/{self.total}", numbers,
                 f"({time.perf_counter() - self.start:.1f} s)"]
        return "  ".join(part for part in parts if part)

    def _bundle(self) -> dict:
        line = html.escape(self.text())
        bar = (f'<progress value="{self.step}" max="{self.total}" style="width: 16em; vertical-align: middle">'
               f"</progress> <code>{line}</code>")
        return {"text/html": bar, "text/plain": self.text()}

    def update(self, step: int, **metrics) -> None:
        """Move to ``step`` (1-based) and show the latest ``metrics`` (numbers by name)."""
        self.step, self.metrics = step, metrics
        now = time.perf_counter()
        if self._handle is not None and (step >= self.total or now - self._last_draw >= self.min_interval):
            self._last_draw = now
            self._handle.update(self._bundle(), raw=True)

    def close(self) -> None:
        """Draw the final state (whatever step was reached)."""
        if self._handle is not None:
            self._handle.update(self._bundle(), raw=True)


def track(items: Iterable[T], description: str = "", *, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` one by one while a :class:`Progress` bar counts them (in a kernel)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError as error:
            raise TypeError(f"total: expected the number of items for an iterable without len(), "
                            f"got total=None for {type(items).__name__}") from error
    bar = Progress(max(total, 1), description)
    for index, item in enumerate(items, start=1):
        yield item
        bar.update(index)
    bar.close()
