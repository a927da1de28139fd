r"""Lesson 00, attention from scratch: answers to the exercises.

Each function is a few lines of plain PyTorch; the docstrings in ``exercises/00_attention_from_scratch.py``
give the equations and shapes. Check a version with
``pytest tests/exercises/test_00_attention_from_scratch.py --against solutions``.
"""

from __future__ import annotations

import math

import torch


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Numerically stable softmax along ``dim``: $\operatorname{softmax}(x)_j = e^{x_j - m} / \sum_k e^{x_k - m}$."""
    # m = max_k x_k: after the shift the largest exponent is e^0 = 1, so nothing overflows
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(shifted)
    # divide by the sum along the same dim
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""$O = \operatorname{softmax}(QK^\top/\sqrt{d}\ \text{masked})\,V$; rows with no allowed key give zeros."""
    d = q.shape[-1]
    # S = Q K^T / sqrt(d), shape (..., Lq, Lk)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        # forbidden keys get -inf, so that e^{-inf} = 0
        scores = scores.masked_fill(~mask, float("-inf"))
        # a row with no allowed key would be all -inf (softmax 0/0 = NaN): give it finite scores, zero it below
        empty = ~mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(empty, 0.0)
    # P = softmax over the keys (the last dim)
    weights = softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(empty, 0.0)
    # O = P V
    return weights @ v


def causal_mask(length: int) -> torch.Tensor:
    r"""``(length, length)`` boolean mask, ``True`` where key $j$ may be seen by query $i$: $j \le i$."""
    return torch.ones(length, length, dtype=torch.bool).tril()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    r"""``(B, L, heads * d) -> (B, heads, L, d)``: head $h$ gets features $h d, \dots, h d + d - 1$."""
    b, length, width = x.shape
    if width % heads:
        raise ValueError(f"heads: expected a divisor of the width {width}, got {heads}")
    # (B, L, H*d) -> (B, L, H, d): the last dim splits into consecutive blocks of d
    # -> (B, H, L, d): move heads before the sequence
    return x.reshape(b, length, heads, width // heads).transpose(1, 2)
