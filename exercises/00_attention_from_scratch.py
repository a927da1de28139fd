r"""Lesson 00, attention from scratch: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=00

(which runs ``pytest tests/exercises/test_00_attention_from_scratch.py --against exercises``).
A failing check says what is wrong: a shape, a missing scale, an inverted mask, a NaN.

Rules: plain PyTorch tensor operations only (``torch.exp``, ``amax``, ``sum``, ``@``, ``masked_fill``,
``reshape``, ``transpose``, ...); no ``torch.softmax`` and no ``scaled_dot_product_attention`` from
``torch`` or ``attnlib``, since writing them is the point. Do not modify the inputs in place.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want math.sqrt)

import torch


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Numerically stable softmax along ``dim``.

    $$\operatorname{softmax}(x)_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \qquad m = \max_k x_k,$$

    where $j$ and $k$ run along ``dim``. Subtracting $m$ changes nothing mathematically (the factor
    $e^{-m}$ cancels) but keeps every exponent $\le 0$, so ``exp`` cannot overflow, not even in float16.

    Args:
        x: any shape, a floating dtype; every slice along ``dim`` has at least one finite entry.
        dim: the dimension to normalise over (negative values count from the end).

    Returns:
        a tensor of the shape and dtype of ``x``, non-negative, summing to 1 along ``dim``.
    """
    raise NotImplementedError(
        "Subtract the max along dim (x.amax(dim=dim, keepdim=True)) before torch.exp, "
        "then divide by the sum along the same dim (keepdim=True)"
    )


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Scaled dot-product attention with an optional boolean mask.

    $$S = \frac{Q K^\top}{\sqrt{d}}, \qquad
      P_{ij} = \frac{[M_{ij}]\, e^{S_{ij}}}{\sum_{j'} [M_{ij'}]\, e^{S_{ij'}}}, \qquad O = P V,$$

    where $[M_{ij}]$ is 1 where the mask allows key $j$ for query $i$ and 0 where it forbids it. A query
    row with no allowed key at all gets $P_{i\cdot} = 0$, hence a zero output row (never NaN).

    Args:
        q: queries ``(..., Lq, d)``; any leading dims (batch, heads) are kept.
        k: keys ``(..., Lk, d)``.
        v: values ``(..., Lk, dv)``.
        mask: ``None`` (every key allowed) or a boolean tensor broadcastable to the scores
            ``(..., Lq, Lk)``; ``True`` means *may attend*.

    Returns:
        ``(..., Lq, dv)``.
    """
    raise NotImplementedError(
        "Compute scores = q @ k.transpose(-2, -1) / math.sqrt(d) with d = q.shape[-1]; "
        "with a mask, set the scores where mask is False to float('-inf') (scores.masked_fill(~mask, ...)); "
        "softmax over the keys (dim=-1); set the weights of rows where mask.any(-1) is False to 0; return weights @ v"
    )


def causal_mask(length: int) -> torch.Tensor:
    r"""The causal mask of a sequence of ``length`` tokens: query $i$ may see key $j$ iff $j \le i$.

    $$M_{ij} = [\, j \le i \,], \qquad 0 \le i, j < \text{length}.$$

    Returns:
        a boolean tensor ``(length, length)``: ``True`` on and below the diagonal.
    """
    raise NotImplementedError(
        "Start from torch.ones(length, length, dtype=torch.bool) and keep the lower "
        "triangle, diagonal included (torch.tril)"
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    r"""Split the width of ``x`` into ``heads`` heads of size $d = \text{width} / \text{heads}$.

    $$Y_{b,h,l,i} = X_{b,\,l,\,h d + i}, \qquad 0 \le i < d,$$

    so head $h$ gets the consecutive features $hd, \dots, hd + d - 1$ of every token.

    Args:
        x: ``(B, L, width)``.
        heads: a divisor of ``width``; otherwise raise ``ValueError`` naming ``heads``.

    Returns:
        ``(B, heads, L, d)``. The inverse is ``y.transpose(1, 2).reshape(B, L, width)``.
    """
    raise NotImplementedError(
        "Reshape x to (B, L, heads, d) first (heads before d, so each head gets "
        "consecutive features), then transpose(1, 2) to (B, heads, L, d); "
        "raise ValueError if width % heads != 0"
    )
