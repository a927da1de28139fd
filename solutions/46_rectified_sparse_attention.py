r"""Lesson 46, rectified sparse attention: solutions.

The answers to ``exercises/46_rectified_sparse_attention.py``. Try the exercises first; check them with

    make check LESSON=46
"""

from __future__ import annotations

import math

import torch


def ipar_reallocation(block_scores: torch.Tensor, text_scores: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""$\hat p_j = N_b e^{S_j}/Z$, $\hat p_\text{text} = \sum_t e^{S^\text{text}_t}/Z$, $Z = N_b\sum_j e^{S_j} + \sum_t e^{S^\text{text}_t}$.

    ``block_scores (..., T)``, ``text_scores (..., L_t)``; returns ``(..., T + 1)``.
    """
    num_blocks = block_scores.shape[-1]
    # a pooled key stands for N_b keys: its logit gains log N_b
    logits = torch.cat([block_scores + math.log(block_size), text_scores], dim=-1)
    weights = torch.softmax(logits, dim=-1)
    return torch.cat([weights[..., :num_blocks], weights[..., num_blocks:].sum(-1, keepdim=True)], dim=-1)


def select_blocks(weights: torch.Tensor, min_blocks: int, tau: float) -> torch.Tensor:
    r"""Keep the first $\min(E, \max(\#\{\text{cumsum} \le \tau\} + 1, \text{min\_blocks}))$ entries of each sorted row.

    ``weights (..., E)``; returns ``(..., E)`` bool.
    """
    entries = weights.shape[-1]
    sorted_weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    count = (sorted_weights.cumsum(-1) <= tau).sum(-1) + 1
    keep = count.clamp(min=min_blocks, max=entries)
    in_sorted_order = torch.arange(entries, device=weights.device) < keep[..., None]
    return torch.zeros_like(in_sorted_order).scatter(-1, order, in_sorted_order)


def rectified_output(sparse_out: torch.Tensor, weights: torch.Tensor, covered: torch.Tensor,
                     v_pooled: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""$O_a = R_i O^\text{sp}_a + \sum_{j\notin C_i}\hat p_{ij}\bar v_j$ for the rows $a$ of block $i$.

    ``sparse_out (B, H, L_v, D)``, ``weights (B, H, T, E)``, ``covered (B, H, T, T)``, ``v_pooled (B, H, T, D)``;
    returns ``(B, H, L_v, D)``.
    """
    num_blocks = covered.shape[-1]
    block_weights = weights[..., :num_blocks]
    factor = (block_weights * covered).sum(-1)
    if weights.shape[-1] == num_blocks + 1:  # the text entry is always computed
        factor = factor + weights[..., num_blocks]
    compensation = torch.matmul(block_weights * ~covered, v_pooled)
    rows = torch.arange(sparse_out.shape[-2], device=sparse_out.device) // block_size
    return sparse_out * factor[..., rows, None] + compensation[..., rows, :]
