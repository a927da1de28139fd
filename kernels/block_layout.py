r"""The block layout: which tiles the block-sparse kernel visits, built from a boolean mask (part 4).

A flash kernel (lesson 01) cuts the score matrix $S \in \mathbb{R}^{L_q\times L_k}$ into tiles of
``BLOCK_M`` query rows by ``BLOCK_N`` keys. Given a boolean mask $M$ (``True`` = may attend), each tile
$(t, u)$ falls into one of three kinds:

$$\text{empty: } \neg\exists (i,j)\in t\times u:\ M_{ij},\qquad
  \text{full: } \forall (i,j)\in t\times u:\ M_{ij},\qquad \text{partial: otherwise.}$$

An empty tile contributes nothing to $O = \operatorname{softmax}(S)V$ and can be skipped; a full tile needs
no element mask; only a partial tile must read the mask. The *layout* is, for every (batch, head, query
block), the list of key blocks to visit, full ones first, then partial ones:

* ``kv_index (Bm, Hm, T_q, max_visits)`` int32, padded with 0 past ``kv_count``;
* ``kv_count (Bm, Hm, T_q)`` blocks to visit, ``kv_full (Bm, Hm, T_q)`` how many of them (the first ones)
  are full;

and the *transposed* lists (for each key block, the query blocks that visit it) that the backward pass
uses to accumulate $dK, dV$ without atomics: ``q_index (Bm, Hm, T_k, max)``, ``q_count``, ``q_full``.
``Bm`` and ``Hm`` are the mask's own batch and head sizes (1 when it broadcasts), $T_q=\lceil L_q/\text{BLOCK\_M}\rceil$,
$T_k=\lceil L_k/\text{BLOCK\_N}\rceil$.

Border rule: the ragged last key block (when ``BLOCK_N`` does not divide $L_k$) is never *full* (the kernel
must mask the keys past the end); padded query rows past $L_q$ count as allowed when deciding fullness
(they are never stored).

Torch only (no Triton): the library builds layouts from this module too (:mod:`attnlib.sparse.block_sparse`
adds the cost model on top). Reference: Hassani et al., 2025, "Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light", arXiv:2504.16922.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_positive_int, check_tensor


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block visits (and the reverse), for tiles ``block_m x block_n``.

    Shapes: ``kv_index (Bm, Hm, T_q, max_kv)``, ``kv_count, kv_full (Bm, Hm, T_q)``;
    ``q_index (Bm, Hm, T_k, max_q)``, ``q_count, q_full (Bm, Hm, T_k)``; all int32. In each list the full
    blocks come first: entries ``[0, full)`` need no element mask, entries ``[full, count)`` do.
    """

    block_m: int
    block_n: int
    q_len: int
    k_len: int
    kv_index: torch.Tensor
    kv_count: torch.Tensor
    kv_full: torch.Tensor
    q_index: torch.Tensor
    q_count: torch.Tensor
    q_full: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        return self.q_count.shape[-1]

    def is_full(self) -> torch.Tensor:
        """``(Bm, Hm, T_q, max_kv)`` bool: list entry ``e`` is a full block (``e < kv_full``)."""
        e = torch.arange(self.kv_index.shape[-1], device=self.kv_index.device)
        return e < self.kv_full[..., None].long()

    def tile_kinds(self) -> torch.Tensor:
        """``(Bm, Hm, T_q, T_k)`` int8 map of the tiles: 0 skipped, 1 partial (masked), 2 full."""
        kinds = torch.zeros(*self.kv_count.shape, self.num_k_blocks, dtype=torch.int8, device=self.kv_index.device)
        e = torch.arange(self.kv_index.shape[-1], device=self.kv_index.device)
        visited = e < self.kv_count[..., None].long()
        value = torch.where(self.is_full(), 2, 1).to(torch.int8) * visited
        # each real block appears once per list; padding entries carry 0, so the max keeps the real kind
        return kinds.scatter_reduce_(-1, self.kv_index.long(), value, reduce="amax")


def _check_blocks(block_m, block_n) -> None:
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        check_positive_int(name, block)


def tile_classes(mask: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any_allowed, all_allowed)`` per tile, each ``(Bm, Hm, T_q, T_k)`` bool, for ``mask (Bm, Hm, Lq, Lk)``."""
    check_tensor("mask", mask, ndim=4, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a boolean tensor (True = may attend), got {mask.dtype}")
    _check_blocks(block_m, block_n)
    bm, hm, lq, lk = mask.shape
    tq, tk = -(-lq // block_m), -(-lk // block_n)
    pad_q, pad_k = tq * block_m - lq, tk * block_n - lk

    def tiles(fill_rows: bool, fill_cols: bool) -> torch.Tensor:
        padded = torch.nn.functional.pad(mask, (0, pad_k), value=fill_cols)
        padded = torch.nn.functional.pad(padded, (0, 0, 0, pad_q), value=fill_rows)
        return padded.reshape(bm, hm, tq, block_m, tk, block_n)

    any_allowed = tiles(False, False).any(dim=5).any(dim=3)
    # rows past Lq are never stored (count them allowed); keys past Lk must be masked (never "full")
    all_allowed = tiles(True, False).all(dim=5).all(dim=3)
    return any_allowed, all_allowed


def _lists(any_allowed: torch.Tensor, all_allowed: torch.Tensor):
    """Per row of the tile map: visited column indices, full ones first; padded index, count, full count."""
    # sort key: 0 full, 1 partial, 2 skipped; stable, so blocks keep ascending order within a kind
    kind = torch.where(all_allowed, 0, torch.where(any_allowed, 1, 2))
    order = torch.argsort(kind, dim=-1, stable=True)
    count = any_allowed.sum(-1)
    full = (all_allowed & any_allowed).sum(-1)
    width = max(int(count.max().item()) if count.numel() else 0, 1)
    index = order[..., :width]
    valid = torch.arange(width, device=index.device) < count[..., None]
    index = torch.where(valid, index, torch.zeros_like(index))
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(), full.to(torch.int32).contiguous()


def build_block_layout(mask: torch.Tensor, block_m: int, block_n: int) -> BlockLayout:
    r"""The block lists of ``mask (Bm, Hm, Lq, Lk)`` (``True`` = may attend) for tiles ``block_m x block_n``.

    A 2-d ``(Lq, Lk)`` mask is taken as ``(1, 1, Lq, Lk)``. Returns a :class:`BlockLayout` whose lists
    are on the mask's device.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask[None, None]
    any_allowed, all_allowed = tile_classes(mask, block_m, block_n)
    kv_index, kv_count, kv_full = _lists(any_allowed, all_allowed)
    q_index, q_count, q_full = _lists(any_allowed.transpose(-2, -1), all_allowed.transpose(-2, -1))
    return BlockLayout(block_m, block_n, mask.shape[-2], mask.shape[-1],
                       kv_index, kv_count, kv_full, q_index, q_count, q_full)


def full_block_layout(q_len: int, k_len: int, block_m: int, block_n: int, *, device=None) -> BlockLayout:
    """The layout of an all-``True`` mask (every tile visited): the dense problem, for comparisons."""
    return build_block_layout(torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device), block_m, block_n)


