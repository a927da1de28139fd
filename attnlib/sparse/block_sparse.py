r"""Block-sparse attention: block lists from masks, and what skipping tiles can save (part 4).

A flash kernel (lesson 01) cuts the score matrix $S \in \mathbb{R}^{L_q\times L_k}$ into tiles of
``BLOCK_M`` query rows by ``BLOCK_N`` keys. Given a boolean mask $M$ (``True`` = may attend), each tile
$(t, u)$ falls into one of three kinds:

$$\text{empty: } \neg\exists (i,j)\in t\times u:\ M_{ij},\qquad
  \text{full: } \forall (i,j)\in t\times u:\ M_{ij},\qquad \text{partial: otherwise.}$$

An empty tile contributes nothing to $O = \operatorname{softmax}(S)V$ and can be skipped; a full tile needs
no element mask; only a partial tile must read the mask. The *layout* lists, for every query block, the key
blocks to visit, full ones first (and the transposed lists for the backward pass). It is the kernel's own:
:class:`BlockLayout` and :func:`build_block_layout` live beside the kernel, in :mod:`kernels.block_layout`
(torch only, with the border rules), and this module re-exports them and adds what a lesson reasons with.

The cost model is the **tile-level bound**: a kernel that skips empty tiles and pays full price for every
visited tile can be at most

$$\text{bound} = \frac{T_q\,T_k}{\#\{\text{visited tiles}\}}$$

times faster than the same kernel on the dense problem ($T_q = \lceil L_q/\text{BLOCK\_M}\rceil$ query blocks,
$T_k = \lceil L_k/\text{BLOCK\_N}\rceil$ key blocks), which is smaller than $1/\text{density}$ whenever
partial tiles carry masked work (Hassani et al., 2025, "Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light", arXiv:2504.16922).
"""

from __future__ import annotations

import torch

from kernels.block_layout import BlockLayout, build_block_layout, full_block_layout, tile_classes  # noqa: F401

from .._checks import KERNEL, REFERENCE, check_backend, check_bool, check_mask, check_tensor
from ..core import attention, repeat_kv


def tile_counts(mask: torch.Tensor, block_m: int, block_n: int) -> dict[str, int]:
    """Tiles of the dense problem and how many are visited, full and partial (summed over the mask's batch and heads)."""
    if mask.dim() == 2:
        mask = mask[None, None]
    any_allowed, all_allowed = tile_classes(mask, block_m, block_n)
    visited = int(any_allowed.sum())
    full = int((any_allowed & all_allowed).sum())
    return dict(dense=any_allowed.numel(), visited=visited, full=full, partial=visited - full)


def tile_bound(mask: torch.Tensor, block_m: int, block_n: int) -> float:
    r"""The tile-level speed-up bound $T_qT_k / \#\text{visited}$ of ``mask`` (``inf`` if nothing is visited)."""
    counts = tile_counts(mask, block_m, block_n)
    return counts["dense"] / counts["visited"] if counts["visited"] else float("inf")


def density_bound(mask: torch.Tensor) -> float:
    r"""The element-level bound $1/\text{density}$ (what a kernel with 1x1 tiles could reach)."""
    check_tensor("mask", mask, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a boolean tensor (True = may attend), got {mask.dtype}")
    allowed = int(mask.sum())
    return mask.numel() / allowed if allowed else float("inf")


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                                     scale: float | None = None) -> torch.Tensor:
    r"""What the block-sparse kernel computes: $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)\,V$.

    Shapes: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``, ``mask`` boolean broadcastable to
    ``(B, Hq, Lq, Lk)``; returns ``(B, Hq, Lq, D)``. Rows with no visible key give zeros. This is
    :func:`attnlib.attention` with the mask: block sparsity changes the cost, never the result.
    """
    check_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return attention(q, k, v, mask=mask, scale=scale)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                     backend: str = REFERENCE, scale: float | None = None, key_bias: torch.Tensor | None = None,
                     block_m: int | None = None, block_n: int | None = None, return_weights: bool = False):
    r"""Masked attention $O = \operatorname{softmax}(s\,QK^\top + \mathbf 1 b^\top \text{ masked by } M)\,V$, by
    the readable reference or by the block-sparse kernel: the one step every lesson of part 4 ends with.

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)``.
        mask: boolean, broadcastable to ``(B, Hq, Lq, Lk)``, ``True`` = may attend.
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask: every score is computed, then
            masked) or ``"kernel"`` (:func:`kernels.block_sparse.block_sparse_attention`: only the tiles the
            mask does not empty are visited; ``16 <= D <= 128``). Both give the same result.
        scale: default $1/\sqrt D$.
        key_bias: optional per-key bias $b$ (lesson 45), broadcastable to ``(B, H, 1, Lk)`` with ``H`` in
            ``{1, Hkv, Hq}`` (query head ``h`` reads bias head ``h // (Hq / H)``, like its keys).
        block_m, block_n: the kernel's tiles (powers of two >= 16; default: the kernel's own).
        return_weights: also return the weights ``(B, Hq, Lq, Lk)`` (reference only: the kernel never forms them).

    Returns ``out (B, Hq, Lq, D)``, or ``(out, weights)`` with ``return_weights``.
    """
    check_backend(backend)
    check_bool("return_weights", return_weights)
    if backend == KERNEL:
        if return_weights:
            raise ValueError("return_weights: the 'kernel' backend never forms the weights; use backend='reference'")
        from kernels.block_sparse import block_sparse_attention  # imported here: the kernels need Triton

        return block_sparse_attention(q, k, v, mask, scale=scale, key_bias=key_bias, block_m=block_m, block_n=block_n)
    bias = key_bias
    if bias is not None and bias.dim() == 4 and bias.shape[1] not in (1, q.shape[1]):
        bias = repeat_kv(bias, q.shape[1] // bias.shape[1])  # per key/value head -> per query head
    return attention(q, k, v, mask=mask, bias=bias, scale=scale, return_weights=return_weights)
