"""Plotting helpers and the headless widget helper."""

import base64

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from attnlib.tools import plotting, widgets  # noqa: E402


def teardown_function():
    plt.close("all")


def test_plot_attention_labels_and_values():
    w = torch.softmax(torch.randn(3, 4), -1)
    ax = plotting.plot_attention(w, q_labels=list("abc"), k_labels=list("wxyz"), title="t")
    assert [t.get_text() for t in ax.get_xticklabels()] == list("wxyz")
    assert ax.get_images()[0].get_array().shape == (3, 4)


def test_plot_mask_and_heads_and_curves():
    plotting.plot_mask(torch.ones(4, 4, dtype=torch.bool).tril())
    fig = plotting.plot_heads(torch.rand(5, 3, 3))
    assert len([ax for ax in fig.axes if ax.get_images()]) == 5
    ax = plotting.plot_cost_curves([1, 2, 4], {"a": [1, 2, 3], "b": [2, 4, 8]}, xlabel="n", ylabel="s")
    assert len(ax.get_lines()) == 2
    plotting.plot_learning_curve({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]})


@pytest.mark.parametrize("call, words", [
    pytest.param(lambda: plotting.plot_attention(torch.rand(2, 3, 3)), "2-d", id="weights-rank"),
    pytest.param(lambda: plotting.plot_attention(torch.rand(3, 3), q_labels=["a"]), "q_labels", id="labels"),
    pytest.param(lambda: plotting.plot_heads(torch.rand(3, 3)), "heads", id="heads-rank"),
    pytest.param(lambda: plotting.plot_cost_curves([1, 2], {"a": [1]}, xlabel="", ylabel=""), "curves", id="curve-len"),
])
def test_plotting_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_interactive_figure_draws_defaults_headless():
    calls = []

    def draw(scale=2.0, n=3, mode="a"):
        calls.append((scale, n, mode))
        plt.figure()
        return "drawn"

    assert widgets.interactive_figure(draw, scale=(0.5, 4.0, 0.5), n=widgets.slider(1, 9, 1, 5),
                                      mode=["a", "b"]) == "drawn"
    assert calls == [(2.0, 5, "a")]


def test_interactive_figure_rejects_unknown_controls():
    with pytest.raises(ValueError, match="controls"):
        widgets.interactive_figure(lambda scale=1.0: None, temperature=(0.1, 1.0))


def test_in_a_kernel_the_widget_carries_a_picture_of_its_default_figure(monkeypatch):
    calls = []

    def draw(scale=2.0, n=3):
        calls.append((scale, n))
        figure, ax = plt.subplots()
        ax.plot(range(n), [scale * i for i in range(n)])

    monkeypatch.setattr(widgets, "_in_kernel", lambda: True)
    shown = widgets.interactive_figure(draw, scale=(0.5, 4.0, 0.5), n=widgets.slider(1, 9, 1, 5))
    assert isinstance(shown, widgets.WidgetWithFallback)
    assert (2.0, 5) in calls  # the picture is drawn at the defaults
    data, _ = shown._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data  # JupyterLab shows the live controls
    assert base64.b64decode(data["image/png"]).startswith(b"\x89PNG")  # other viewers the picture
    assert "JupyterLab" in data["text/plain"]
    # the controls are the widget's: moving one re-draws with the new value
    shown.children[1].value = 7
    assert calls[-1] == (2.0, 7)


def test_a_draw_function_that_makes_no_figure_is_named(monkeypatch):
    monkeypatch.setattr(widgets, "_in_kernel", lambda: True)
    plt.close("all")
    with pytest.raises(ValueError, match="lazy.*no matplotlib figure"):
        def lazy(scale=1.0):
            return scale
        widgets.interactive_figure(lazy, scale=(0.5, 2.0, 0.5))
