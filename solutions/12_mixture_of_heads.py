r"""Lesson 12, mixture-of-head attention (MoH): solutions.

The same functions as ``exercises/12_mixture_of_heads.py``, answered. Check them with

    python -m pytest tests/exercises/test_12_mixture_of_heads.py
"""

from __future__ import annotations

import torch


def code_routed_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    r"""$r_{t,i} = k\, p_{t,i} m_{t,i} / \sum_j p_{t,j} m_{t,j}$, $p_t = \operatorname{softmax}(W_r x_t)$, $m_t$ = top-$k$.

    Shapes: ``logits (..., E) -> (..., E)``.
    """
    # p = softmax(W_r x)
    probs = torch.softmax(logits, dim=-1)
    # m = 1 on the k largest probabilities of each token
    mask = torch.zeros_like(probs).scatter(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    kept = probs * mask
    # renormalise the kept probabilities, then scale by k
    return top_k * kept / kept.sum(dim=-1, keepdim=True)


def balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""$\sum_i f_i P_i$ with $f_i$, $P_i$ token averages of $m_{t,i}$ and $p_{t,i}$.

    Shapes: ``probs (..., E)``, ``mask (..., E)`` bool -> a scalar.
    """
    num_routed = probs.shape[-1]
    probs = probs.reshape(-1, num_routed)
    # f_i: fraction of tokens selecting head i;  P_i: mean routing probability of head i
    fraction = mask.reshape(-1, num_routed).to(probs.dtype).mean(dim=0)
    mean_prob = probs.mean(dim=0)
    return (fraction * mean_prob).sum()


def weighted_head_sum(heads: torch.Tensor, gates: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    r"""$\sum_i g_{t,i} H^i_t W_O^i = [g_{t,1} H^1_t, \dots, g_{t,h} H^h_t]\, W_O$.

    Shapes: ``heads (B, h, L, d)``, ``gates (B, L, h)``, ``w_o (h d, dim)`` -> ``(B, L, dim)``.
    """
    b, h, length, d = heads.shape
    # g_{t,i} H^i_t
    gated = heads * gates.transpose(1, 2)[..., None]
    # concatenate heads per token, then one matmul does the sum over i of (g H^i) W_O^i
    return gated.transpose(1, 2).reshape(b, length, h * d) @ w_o
