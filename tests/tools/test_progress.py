"""Progress bars: a bar updated in place in a kernel, nothing outside one, and a plain line that says it all."""

import pytest

from attnlib.tools import progress
from attnlib.tools.tasks import Copying
from attnlib.tools.training import train
from attnlib.tools.transformer import TinyTransformer


class FakeHandle:
    """Stands in for IPython's display handle: records every bundle shown."""

    def __init__(self, shown):
        self.shown = shown

    def update(self, bundle, raw):
        assert raw
        self.shown.append(bundle)


@pytest.fixture
def kernel(monkeypatch):
    """Pretend to run in a Jupyter kernel; returns the list of bundles displayed."""
    import IPython.display

    shown = []

    def display(bundle, raw, display_id):
        assert raw and display_id
        shown.append(bundle)
        return FakeHandle(shown)

    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", display)
    return shown


def test_outside_a_kernel_nothing_is_displayed():
    bar = progress.Progress(10, "work")
    bar.update(3, loss=0.5)
    assert not bar.shown
    assert bar.text().startswith("work  3/10  loss 0.5  (")


def test_in_a_kernel_one_output_is_updated_in_place(kernel):
    bar = progress.Progress(4, "training", min_interval=0.0)
    for step in range(1, 5):
        bar.update(step, loss=1.0 / step, accuracy=0.25 * step)
    bar.close()
    assert len(kernel) == 1 + 4 + 1  # shown once, then updated (no new outputs)
    final = kernel[-1]
    assert '<progress value="4" max="4"' in final["text/html"]
    # the plain line is what a text-only viewer (nbval, a terminal) keeps
    assert final["text/plain"].startswith("training  4/4  loss 0.25  accuracy 1  (")


def test_updates_are_throttled_but_the_last_step_is_drawn(kernel):
    bar = progress.Progress(100, "fast", min_interval=3600.0)
    for step in range(1, 101):
        bar.update(step)
    assert [b["text/plain"].split()[1] for b in kernel] == ["0/100", "1/100", "100/100"]


def test_html_is_escaped(kernel):
    bar = progress.Progress(1, "<b>x</b>")
    bar.close()
    assert "<b>" not in kernel[-1]["text/html"] and "&lt;b&gt;" in kernel[-1]["text/html"]


def test_track_counts_items_and_needs_a_length(kernel):
    assert list(progress.track(["a", "b", "c"], "items")) == ["a", "b", "c"]
    assert kernel[-1]["text/plain"].startswith("items  3/3")
    with pytest.raises(TypeError, match="total"):
        list(progress.track(iter([1, 2]), "no length"))
    assert list(progress.track(iter([1, 2]), "given", total=2)) == [1, 2]


def test_training_shows_a_bar_in_a_kernel_unless_told_not_to(kernel):
    task = Copying(length=3, num_tokens=3)
    model = TinyTransformer.for_task(task, dim=16, depth=1, num_heads=2)
    train(model, task, steps=3, batch_size=4, log_every=None)
    assert kernel and kernel[-1]["text/plain"].startswith("training  3/3  loss ")
    kernel.clear()
    train(model, task, steps=3, batch_size=4, log_every=None, progress=False)
    assert kernel == []


def test_bad_total_is_named():
    with pytest.raises(ValueError, match="total"):
        progress.Progress(0)
