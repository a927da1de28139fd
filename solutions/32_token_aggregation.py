r"""Lesson 32, content-aware token aggregation (CATANet): solutions.

Paper: Liu, Liu, Tang and Wu, *CATANet: Efficient Content-Aware Token Aggregation for Lightweight Image
Super-Resolution*, CVPR 2025, arXiv:2503.06896.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_kmeans_step(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    r"""One cosine k-means step over all tokens: ``x (B, N, C)``, ``centres (M, C)`` -> ``(M, C)``."""
    x_unit = F.normalize(x, dim=-1).flatten(0, 1)
    old = F.normalize(centres, dim=-1)
    groups = (x_unit @ old.T).argmax(-1)
    sums = torch.zeros_like(old).index_add(0, groups, x_unit)
    counts = torch.bincount(groups, minlength=old.shape[0])
    return torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), old)


def subgroup_key_positions(num_tokens: int, group_size: int) -> torch.Tensor:
    r"""Sorted key positions of each sub-group (own plus next, reflection padding): ``(n_g, 2g)`` int64."""
    g = min(num_tokens, group_size)
    groups = -(-num_tokens // g)
    pad = groups * g - num_tokens
    keys = list(range(num_tokens)) + [num_tokens - 1 - (i % num_tokens) for i in range(pad + g)]
    return torch.tensor([keys[i * g:i * g + 2 * g] for i in range(groups)], dtype=torch.long)


def aggregate_attention(q, k, v, groups, group_size, k_centres, v_centres):
    r"""Sort by group (stably), IASA + IRCA, scatter back: ``q, k, v (B, H, N, D)`` -> ``(B, H, N, D)``."""
    b, h, n, d = q.shape
    g = min(n, group_size)
    order = torch.sort(groups, dim=-1, stable=True).indices
    index = order[:, None, :, None].expand(b, h, n, d)
    qs, ks, vs = q.gather(2, index), k.gather(2, index), v.gather(2, index)
    keys = subgroup_key_positions(n, group_size)
    out = torch.empty_like(qs)
    for i in range(n):
        window = keys[i // g]
        w = torch.softmax(qs[:, :, i:i + 1] @ ks[:, :, window].transpose(-2, -1) / math.sqrt(d), -1)
        out[:, :, i] = (w @ vs[:, :, window])[:, :, 0]
    w_c = torch.softmax(qs @ k_centres.transpose(-2, -1) / math.sqrt(d), -1)
    out = out + w_c @ v_centres
    return torch.empty_like(out).scatter(2, index, out)
