r"""Lesson 40, generalized neighborhood attention: solutions."""

from __future__ import annotations

import torch


def window_start(length: int, kernel_size: int, stride: int) -> torch.Tensor:
    i = torch.arange(length)
    left = kernel_size // 2
    right = kernel_size // 2 + kernel_size % 2 - 1
    # leader: the centre query of the stride group
    leader = torch.clamp(i // stride * stride + stride // 2, max=length - 1)
    # the window shifts inward at the borders: it is never cut
    centre = torch.clamp(leader, min=left, max=length - 1 - right)
    return centre - left


def tile_kinds(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    lq, lk = mask.shape
    tq, tk = -(-lq // block_m), -(-lk // block_n)
    kinds = torch.zeros(tq, tk, dtype=torch.int64)
    for t in range(tq):
        for u in range(tk):
            tile = mask[t * block_m:(t + 1) * block_m, u * block_n:(u + 1) * block_n]
            if tile.any():
                kinds[t, u] = 2 if tile.all() and (u + 1) * block_n <= lk else 1
    return kinds


def tile_bound(mask: torch.Tensor, block_m: int, block_n: int) -> float:
    kinds = tile_kinds(mask, block_m, block_n)
    return kinds.numel() / int((kinds > 0).sum())
