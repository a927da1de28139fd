r"""Lesson 45, dynamic mask attention: solutions.

The answers to ``exercises/45_dynamic_mask_attention.py``. Try the exercises first; check them with

    make check LESSON=45
"""

from __future__ import annotations

import math

import torch


def value_bias(v: torch.Tensor, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    r"""$b_{hj} = A_h \operatorname{softplus}\big((W_\delta \operatorname{flat}(V)_j)_h\big)$.

    ``v (B, H_kv, L, D)``, ``weight (H_kv, H_kv * D)``, ``a (H_kv,)``; returns ``(B, H_kv, 1, L)``.
    """
    b, hkv, length, d = v.shape
    # flat(V)_j: token j's values of every head, side by side, (B, L, H_kv D)
    flat = v.transpose(1, 2).reshape(b, length, hkv * d)
    # delta = W_delta flat(V): (B, L, H_kv)
    delta = flat @ weight.T
    # b = A softplus(delta)
    bias = a * torch.nn.functional.softplus(delta)
    return bias.transpose(1, 2)[:, :, None, :]


def top_w_causal_mask(bias: torch.Tensor, window: int) -> torch.Tensor:
    r"""$M_{ij} = [j \le i]\,[b_j \text{ among the } w \text{ largest of } b_0..b_i]$.

    ``bias (B, H, 1, L)``; returns ``(B, H, L, L)`` bool.
    """
    b, h, _, length = bias.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    # the future is removed BEFORE choosing
    scores = bias.expand(b, h, length, length).masked_fill(~causal, -math.inf)
    values, indices = scores.topk(min(window, length), dim=-1)
    # keys picked only to fill the budget (at -inf) are not kept
    return torch.zeros(b, h, length, length, dtype=torch.bool).scatter_(-1, indices, values > -math.inf)


def masked_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    r"""$O = \operatorname{softmax}(QK^\top/\sqrt D + \mathbf 1 b^\top \text{ masked by } M)\,V$ (empty rows: zeros).

    ``q, k, v (B, H, L, D)``, ``bias (B, H, 1, L)``, ``mask (B, H, L, L)`` bool; returns ``(B, H, L, D)``.
    """
    # S = Q K^T / sqrt(D) + 1 b^T
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    # an empty row is 0/0 = NaN: it attends to nothing, so its output is 0
    weights = torch.where(mask.any(-1, keepdim=True), weights, torch.zeros_like(weights))
    return weights @ v
