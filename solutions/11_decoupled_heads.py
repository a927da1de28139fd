r"""Lesson 11, decoupled-head attention and the fusion of heads (DHA, P36): solutions.

The same functions as ``exercises/11_decoupled_heads.py``, answered. Check them with

    python -m pytest tests/exercises/test_11_decoupled_heads.py
"""

from __future__ import annotations

import math

import torch


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_map: list[int],
                        value_map: list[int]) -> torch.Tensor:
    r"""$O_i = \operatorname{softmax}(Q_i K_{g_k(i)}^\top/\sqrt d + \text{causal})\, V_{g_v(i)}$.

    Shapes: ``q (B, H, L, d)``, ``k (B, Hk, L, d)``, ``v (B, Hv, L, d)`` -> ``(B, H, L, d)``.
    """
    # K_{g_k(i)}, V_{g_v(i)} for every query head i: (B, H, L, d)
    k_per_query = k[:, list(key_map)]
    v_per_query = v[:, list(value_map)]
    length = q.shape[2]
    scores = q @ k_per_query.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return weights @ v_per_query


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""$\lVert Y^\top X\rVert_F^2 / (\lVert X^\top X\rVert_F \lVert Y^\top Y\rVert_F)$ after centring the columns.

    Shapes: ``x (n, p)``, ``y (n, q)`` -> a 0-d tensor.
    """
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    return (y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def fusion_loss(fused: torch.Tensor, groups: list[int]) -> torch.Tensor:
    r"""$\sum_g\sum_{i\in G_g}\lVert \widetilde W^{(i)} - \overline W_g\rVert_F^2 / \sum_i \lVert \widetilde W^{(i)}\rVert_F^2$.

    Shapes: ``fused (H, d, dim)``, ``groups`` H ints -> a 0-d tensor.
    """
    groups_t = torch.tensor(list(groups))
    spread = fused.new_zeros(())
    for g in range(int(groups_t.max()) + 1):
        members = fused[groups_t == g]
        spread = spread + (members - members.mean(0, keepdim=True)).pow(2).sum()
    return spread / fused.pow(2).sum()
