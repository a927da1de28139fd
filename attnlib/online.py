r"""Exact attention without the $L_q \times L_k$ score matrix: the online softmax.

Split the keys into blocks $K_1, K_2, \dots$ (and the values alike). Walking over the blocks, each query
row keeps three running quantities: the largest score seen so far $m$, the softmax denominator $\ell$
relative to $m$, and the un-normalised output $a$. For a new block with scores $S_t$:

$$m' = \max(m, \max_j S_{t,j}), \qquad
  \ell' = e^{m - m'}\,\ell + \sum_j e^{S_{t,j} - m'}, \qquad
  a' = e^{m - m'}\,a + \sum_j e^{S_{t,j} - m'}\,v_j.$$

After the last block $O = a / \ell$, exactly the softmax-weighted average, and $\mathrm{lse} = m + \log \ell$
is the log-sum-exp of the row (what a backward pass or a merge of two partial results needs). The factor
$e^{m - m'}$ rescales what was accumulated against the old maximum; it is the whole trick of
FlashAttention (lesson 01). Memory is $O(L_q \cdot \text{block})$ instead of $O(L_q L_k)$.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bool, check_positive_int, check_qkv, check_scale
from .core import compute_dtype, repeat_kv


def online_softmax_step(m, l, acc, scores, values):
    r"""One step of the online softmax: fold a block of scores and values into the running state.

    $m' = \max(m, \max_j s_j)$, $\ell' = e^{m-m'}\ell + \sum_j e^{s_j - m'}$,
    $a' = e^{m-m'} a + \sum_j e^{s_j-m'} v_j$.

    Shapes: ``m, l (..., Lq, 1)``, ``acc (..., Lq, Dv)``, ``scores (..., Lq, Bk)`` (masked entries are
    ``-inf``), ``values (..., Bk, Dv)``. Returns the new ``(m, l, acc)``.
    """
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
    # while a row has seen only -inf, use 0 as its reference so that exp() gives 0 instead of NaN
    m_ref = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    # alpha = exp(m - m'): how much the old accumulators shrink
    alpha = torch.exp(m - m_ref)
    # p = exp(s - m')
    p = torch.exp(scores - m_ref)
    l_new = alpha * l + p.sum(dim=-1, keepdim=True)
    acc_new = alpha * acc + torch.matmul(p, values)
    return m_new, l_new, acc_new


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 256,
    return_lse: bool = False,
):
    r"""Exact softmax attention computed one key block at a time (online softmax).

    Same result as :func:`attnlib.attention` (``mask``/``bias`` aside), but the largest temporary is a
    ``(B, Hq, Lq, block_size)`` tile, so memory grows linearly with the key length.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``.
        causal: bottom-right aligned causal mask, as in :func:`attnlib.attention`.
        scale: default $1/\sqrt{D}$.
        block_size: keys per block.
        return_lse: also return the row log-sum-exp ``(B, Hq, Lq)`` ($-\infty$ on empty rows).

    Returns:
        ``out (B, Hq, Lq, Dv)`` in the dtype of ``q`` (and ``lse`` in float32/float64).
    """
    b, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_scale(scale)
    check_positive_int("block_size", block_size)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = compute_dtype(q.dtype)
    groups = hq // hkv

    qw = q.to(work) * scale
    m = torch.full((b, hq, lq, 1), float("-inf"), dtype=work, device=q.device)
    l = torch.zeros((b, hq, lq, 1), dtype=work, device=q.device)
    acc = torch.zeros((b, hq, lq, v.shape[-1]), dtype=work, device=q.device)
    # position of each query row (queries are the last lq positions of the key sequence)
    q_pos = torch.arange(lq, device=q.device) + (lk - lq)

    for start in range(0, lk, block_size):
        stop = min(start + block_size, lk)
        k_blk = repeat_kv(k[:, :, start:stop], groups).to(work)
        v_blk = repeat_kv(v[:, :, start:stop], groups).to(work)
        # S_t = s Q K_t^T
        scores = torch.matmul(qw, k_blk.transpose(-2, -1))
        if causal:
            k_pos = torch.arange(start, stop, device=q.device)
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, scores, v_blk)

    # O = a / l (rows that saw no key keep a = 0)
    out = (acc / torch.where(l > 0, l, torch.ones_like(l))).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(l > 0, m + torch.log(l), torch.full_like(m, float("-inf"))).squeeze(-1)
    return out, lse
