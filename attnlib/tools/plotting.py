"""Plotting helpers every lesson uses, so that all figures of the course look alike.

Each helper draws on a given matplotlib ``Axes`` (or makes one) and returns it, so figures compose:
``fig, axes = plt.subplots(1, 2); plot_attention(w, ax=axes[0]); plot_mask(m, ax=axes[1])``.

Matplotlib is imported on first use (:data:`plt`), so that a script that only computes attention never pays for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch


class _LazyModule:
    """A module imported on first attribute access (``plt.subplots`` imports ``matplotlib.pyplot`` then)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"


plt = _LazyModule("matplotlib.pyplot")

WEIGHTS_CMAP = "viridis"
MASK_CMAP = "Greys"


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _axes(ax, size=(4.2, 3.8)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _check_matrix(name: str, x: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d (queries, keys) matrix, got shape {x.shape}; "
                         "select one batch element and head first, e.g. weights[0, 0]")


def _label_ticks(ax, q_labels, k_labels, n_q, n_k) -> None:
    from matplotlib.ticker import MaxNLocator

    # token indices are integers: never put a tick at 2.5
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for labels, n, set_ticks, set_labels, name in (
        (k_labels, n_k, ax.set_xticks, ax.set_xticklabels, "k_labels"),
        (q_labels, n_q, ax.set_yticks, ax.set_yticklabels, "q_labels"),
    ):
        if labels is None:
            continue
        if len(labels) != n:
            raise ValueError(f"{name}: expected {n} labels, got {len(labels)}")
        set_ticks(range(n))
        set_labels([str(t) for t in labels], fontsize=8, rotation=90 if set_ticks == ax.set_xticks else 0)


def plot_attention(weights, *, q_labels: Sequence | None = None, k_labels: Sequence | None = None,
                   title: str | None = None, ax=None, colorbar: bool = True, vmax: float | None = None):
    """Heat map of attention weights ``(queries, keys)``: row ``i`` is where query ``i`` looks."""
    w = _as_numpy(weights)
    _check_matrix("weights", w)
    ax = _axes(ax)
    image = ax.imshow(w, cmap=WEIGHTS_CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    _label_ticks(ax, q_labels, k_labels, *w.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_mask(mask, *, title: str | None = None, ax=None, q_labels=None, k_labels=None):
    """Draw a boolean mask ``(queries, keys)``: dark = may attend, white = masked."""
    m = _as_numpy(mask).astype(float)
    _check_matrix("mask", m)
    ax = _axes(ax)
    ax.imshow(m, cmap=MASK_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    _label_ticks(ax, q_labels, k_labels, *m.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title if title is not None else f"mask ({int(m.sum())} of {m.size} allowed)")
    return ax


def plot_heads(weights, *, titles: Sequence[str] | None = None, q_labels=None, k_labels=None,
               suptitle: str | None = None, max_cols: int = 4):
    """One heat map per head for ``weights (heads, queries, keys)``; returns the figure."""
    w = _as_numpy(weights)
    if w.ndim != 3:
        raise ValueError(f"weights: expected (heads, queries, keys), got shape {w.shape}")
    heads = w.shape[0]
    cols = min(heads, max_cols)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        title = titles[h] if titles is not None else f"head {h}"
        plot_attention(w[h], ax=ax, title=title, colorbar=False, q_labels=q_labels, k_labels=k_labels)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_cost_curves(x, curves: Mapping[str, Sequence[float]], *, xlabel: str, ylabel: str,
                     title: str | None = None, logx: bool = True, logy: bool = True, ax=None):
    """Cost against size (time, memory, bytes moved), one line per method, log-log by default."""
    x = _as_numpy(x)
    ax = _axes(ax, size=(5.2, 3.8))
    for name, ys in curves.items():
        ys = _as_numpy(ys)
        if ys.shape != x.shape:
            raise ValueError(f"curves[{name!r}]: expected {x.shape[0]} values (one per x), got {ys.shape}")
        ax.plot(x, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax


def plot_learning_curve(history: Mapping[str, Sequence[float]], *, title: str | None = None, ax=None,
                        logy: bool = False):
    """Training curves: ``history`` maps a name (``"loss"``, ``"accuracy"``) to one value per step."""
    ax = _axes(ax, size=(5.2, 3.4))
    for name, ys in history.items():
        if name == "step":
            continue
        steps = history.get("step", range(1, len(ys) + 1))
        ax.plot(list(steps), list(ys), label=name)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax
