r"""Lesson 10, grouped-query attention and key-driven grouping: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=10

(which runs ``pytest tests/exercises/test_10_grouped_query_attention.py --against exercises``).
A failing check says what is wrong: heads grouped with a stride instead of in consecutive blocks, a sum
instead of a mean, fix-ups applied to the wrong group, a missing scale, ...

Rules: plain PyTorch (``reshape``, ``mean``, ``torch.round``, ``argmax``, ``repeat_interleave``,
``torch.softmax``, ...). The library's own versions (:func:`attnlib.heads.grouped_query.mean_pool_heads`,
:func:`attnlib.heads.grouped_query.kdgqa_allocation`, :func:`attnlib.heads.grouped_query.grouped_attention`) are
the answers; write yours without them.
"""

from __future__ import annotations

import torch


def mean_pool_kv_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    r"""Turn an MHA key (or value) projection into a GQA one by mean-pooling the heads of each group.

    The rows of ``weight`` are ordered head by head: rows $h d \dots (h+1) d - 1$ belong to head $h$
    ($d$ = ``weight.shape[0] // num_heads``). Group $j$ holds the $H/G$ *consecutive* heads
    $jH/G, \dots, (j+1)H/G - 1$, and its new head is their mean:

    $$W_j = \frac{G}{H} \sum_{h = jH/G}^{(j+1)H/G - 1} W_h .$$

    Args:
        weight: ``(H * d, dim)``.
        num_heads: $H$.
        num_kv_heads: $G$, a divisor of $H$.

    Returns:
        ``(G * d, dim)``.
    """
    raise NotImplementedError(
        "Reshape to (G, H // G, d, dim) so that consecutive heads share a group, take .mean(dim=1), and "
        "reshape back to (G * d, dim)"
    )


def kdgqa_allocation(norms: torch.Tensor, num_heads: int) -> torch.Tensor:
    r"""How many query heads each key/value head gets in KDGQA, from the key norms $m_j$.

    $$\tilde m_j = \frac{m_j - \min m}{\max m - \min m}, \qquad
      n_j = \operatorname{round}\Big(H\,\frac{\tilde m_j}{\sum_i \tilde m_i}\Big),$$

    with ``torch.round`` (half to even). Then fix the sum: while $\sum n > H$, subtract 1 from the
    largest $n_j$ (``torch.argmax``, the first one on ties); while $\sum n < H$, add 1 to the smallest
    (``torch.argmin``). Assume the norms are not all equal.

    Args:
        norms: ``(G,)`` floats, one per key/value head.
        num_heads: $H$, the number of query heads.

    Returns:
        ``(G,)`` long counts $n_j \ge 0$ summing to $H$.
    """
    raise NotImplementedError(
        "w = (norms - norms.min()) / (norms.max() - norms.min()); n = torch.round(num_heads * w / w.sum()).long(); "
        "then two while loops on n.sum(): n[torch.argmax(n)] -= 1 while too many, n[torch.argmin(n)] += 1 "
        "while too few"
    )


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allocation: torch.Tensor) -> torch.Tensor:
    r"""Attention where the first $n_0$ query heads read key/value head 0, the next $n_1$ head 1, ...

    $$O_h = \operatorname{softmax}\!\Big(\frac{Q_h K_{g(h)}^\top}{\sqrt d}\Big) V_{g(h)}, \qquad
      g(h) = j \text{ for } n_0 + \dots + n_{j-1} \le h < n_0 + \dots + n_j .$$

    With $n_j = H/G$ for all $j$ this is grouped-query attention; a group may also get $n_j = 0$
    query heads (KDGQA). No mask.

    Args:
        q: ``(B, H, L, d)``.
        k, v: ``(B, G, L, d)``.
        allocation: ``(G,)`` long counts summing to $H$.

    Returns:
        ``(B, H, L, d)``.
    """
    raise NotImplementedError(
        "index = torch.repeat_interleave(torch.arange(G), allocation) gives g(h) for every query head; "
        "k[:, index] and v[:, index] are (B, H, L, d); then softmax(q @ k^T / sqrt(d)) @ v"
    )
