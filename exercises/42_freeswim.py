r"""Lesson 42, FreeSwim, inward sliding windows and the cross-attention override: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=42

(which runs ``pytest tests/exercises/test_42_freeswim.py --against exercises``).
A failing check says what is wrong: a window cut at the border instead of shifted inward, a shift
one short at the end, a window that forgets the other frames, a scale without its square root, a
cross-attention that still reads the window branch's queries...

Rules: plain PyTorch and ``math``. The library's versions in :mod:`attnlib.sparse.freeswim` are the
answers; write yours without them (``attnlib.attention`` is allowed in the last exercise).
"""

from __future__ import annotations

import math  # noqa: F401  (you will want math.log and math.sqrt)

import torch

from attnlib import attention  # noqa: F401  (for cross_attention_override)


def inward_bounds(length: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and last key each query sees along one axis of FreeSwim's inward window: ``(lo, hi)``, each
    ``(length,)`` int64.

    Query $i$ of an axis of $L$ tokens with half size $d$ sees $j \in [i - d - \delta^{-},\ i + d + \delta^{+}]$,
    clipped to $[0, L-1]$, where $\delta^{+} = \max(d - i, 0)$ and $\delta^{-} = \max(i + d - L + 1, 0)$: near
    the start the box grows at its far end, near the end it grows at its near end, so that it always holds
    $2d + 1$ keys when $L \ge 2d + 1$ (and the whole axis otherwise).
    """
    raise NotImplementedError("i = torch.arange(length); grow the high end by (half - i).clamp(min=0) and the "
                              "low end by (i + half - length + 1).clamp(min=0); then clamp lo to >= 0, hi to <= L-1")


def freeswim_mask(grid: tuple[int, int, int], half_sizes: tuple[int, int]) -> torch.Tensor:
    r"""FreeSwim's window on a video grid ``(T, H, W)``: the ``(N, N)`` bool mask, $N = THW$, ``True`` = may attend.

    Token $n$ is frame $t = \lfloor n / HW \rfloor$, row $h = \lfloor (n \bmod HW)/W \rfloor$, column $w = n \bmod W$
    (row-major). Query $(t, h, w)$ sees key $(t', h', w')$ iff $h'$ lies in the inward bounds of row $h$
    (half size $d_h$, axis length $H$) and $w'$ in those of column $w$ ($d_w$, $W$), in **any** frame $t'$.
    """
    raise NotImplementedError("Compute the rows and columns of all tokens, the inward bounds of each axis, and "
                              "compare: (row_j >= lo_h[row_i]) & (row_j <= hi_h[row_i]) & the same for columns")


def extrapolation_scale(head_dim: int, train_tokens: int, test_tokens: int) -> float:
    r"""The softmax scale FreeSwim uses in both branches: $s = \sqrt{\log_{n_0} n \,/\, d}$.

    $n_0$ = ``train_tokens``, $n$ = ``test_tokens``, $d$ = ``head_dim``; at $n = n_0$ it is the usual $1/\sqrt d$.
    """
    raise NotImplementedError("log base n0 of n is math.log(n) / math.log(n0); divide by d, take the square root")


def cross_attention_override(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""The cross-attention override of the dual path: ``q (2B, H, N, D)`` stacked ``[window; full]``, context
    ``k, v (B, H, M, D)``; returns ``(2B, H, N, D)``.

    Compute $C = \operatorname{softmax}(Q_f K^\top / \sqrt D)\, V$ from the **full** branch's queries (the second
    half of ``q``) and give it to both branches: the result is $[C; C]$. The window branch's own
    cross-attention is never computed.
    """
    raise NotImplementedError("b = q.shape[0] // 2; full = attention(q[b:], k, v); return torch.cat([full, full])")
