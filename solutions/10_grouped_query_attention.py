r"""Lesson 10, grouped-query attention and key-driven grouping: solutions.

The same functions as ``exercises/10_grouped_query_attention.py``, answered. Check them with

    python -m pytest tests/exercises/test_10_grouped_query_attention.py
"""

from __future__ import annotations

import math

import torch


def mean_pool_kv_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    r"""$W_j = \frac{G}{H} \sum_{h \in \mathcal G_j} W_h$: ``(H * d, dim) -> (G * d, dim)``, consecutive heads per group."""
    head_dim = weight.shape[0] // num_heads
    per_head = weight.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, weight.shape[1])
    # W_j = mean of the heads of group j
    return per_head.mean(dim=1).reshape(num_kv_heads * head_dim, weight.shape[1])


def kdgqa_allocation(norms: torch.Tensor, num_heads: int) -> torch.Tensor:
    r"""$n_j = \operatorname{round}(H\,\tilde m_j / \sum \tilde m)$ with min-max $\tilde m$, fixed up to sum to $H$: ``(G,) -> (G,)``."""
    # m~ = (m - min m) / (max m - min m)
    scaled = (norms - norms.min()) / (norms.max() - norms.min())
    # n = round(H m~ / sum m~)
    allocation = torch.round(num_heads * scaled / scaled.sum()).long()
    while allocation.sum() > num_heads:
        allocation[torch.argmax(allocation)] -= 1
    while allocation.sum() < num_heads:
        allocation[torch.argmin(allocation)] += 1
    return allocation


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allocation: torch.Tensor) -> torch.Tensor:
    r"""$O_h = \operatorname{softmax}(Q_h K_{g(h)}^\top/\sqrt d) V_{g(h)}$, $g$ in consecutive blocks: ``(B, H, L, d)``."""
    index = torch.repeat_interleave(torch.arange(k.shape[1]), allocation)  # g(h) for every query head
    keys, values = k[:, index], v[:, index]
    # S = Q K^T / sqrt(d)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ values
