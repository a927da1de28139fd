r"""Lesson 42, FreeSwim, inward sliding windows and the cross-attention override: solutions."""

from __future__ import annotations

import math

import torch

from attnlib import attention


def inward_bounds(length: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(length)
    # the box grows at its far end near the start, at its near end near the end
    grow_high = (half - i).clamp(min=0)
    grow_low = (i + half - length + 1).clamp(min=0)
    return (i - half - grow_low).clamp(min=0), (i + half + grow_high).clamp(max=length - 1)


def freeswim_mask(grid: tuple[int, int, int], half_sizes: tuple[int, int]) -> torch.Tensor:
    t, h, w = grid
    n = torch.arange(t * h * w)
    row, col = (n % (h * w)) // w, n % w
    lo_h, hi_h = inward_bounds(h, half_sizes[0])
    lo_w, hi_w = inward_bounds(w, half_sizes[1])
    rows_ok = (row[None, :] >= lo_h[row][:, None]) & (row[None, :] <= hi_h[row][:, None])
    cols_ok = (col[None, :] >= lo_w[col][:, None]) & (col[None, :] <= hi_w[col][:, None])
    # the frame never matters: every frame is visible
    return rows_ok & cols_ok


def extrapolation_scale(head_dim: int, train_tokens: int, test_tokens: int) -> float:
    return math.sqrt(math.log(test_tokens) / math.log(train_tokens) / head_dim)


def cross_attention_override(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b = q.shape[0] // 2
    full = attention(q[b:], k, v)
    return torch.cat([full, full.clone()])
