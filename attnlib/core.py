r"""Scaled dot-product attention, the reference every lesson builds on.

For one head, with queries $Q \in \mathbb{R}^{L_q \times d}$, keys $K \in \mathbb{R}^{L_k \times d}$ and
values $V \in \mathbb{R}^{L_k \times d_v}$:

$$S = s\,QK^\top + B, \qquad P = \operatorname{softmax}_{\text{row}}(S \text{ masked}), \qquad O = PV,$$

with the scale $s = 1/\sqrt{d}$ by default (lesson 00 derives it from the variance of a dot product),
an optional additive bias $B$, and a mask that sets forbidden scores to $-\infty$ before the softmax.

Conventions (the whole course keeps them):

* tensors are ``(batch, heads, seq, head_dim)``, as in ``torch.nn.functional.scaled_dot_product_attention``;
* **grouped-query attention**: ``k`` and ``v`` may have fewer heads than ``q``; query head ``h`` reads
  key/value head ``h // (Hq // Hkv)`` (consecutive query heads share a key/value head);
* boolean masks: ``True`` means *may attend*;
* ``causal=True`` aligns the queries with the *last* ``Lq`` keys (see :mod:`attnlib.masks`);
* a query row whose every key is masked gets zero weights and a zero output, never NaN.

Two forms live here: :func:`attention_naive`, a loop over queries and keys written as the equation
reads (the oracle that tests trust), and :func:`attention`, the vectorised version every lesson uses.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bias, check_bool, check_mask, check_qkv, check_scale
from .masks import causal_mask


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each key/value head ``groups`` times: ``(B, Hkv, L, D) -> (B, Hkv * groups, L, D)``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax run in float32 for 16-bit inputs (as in a flash kernel), else in ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    r"""Softmax over the last dim that gives zeros (not NaN) on rows with nothing allowed.

    $$P_{ij} = \frac{\exp(S_{ij} - m_i)}{\sum_{j'} \exp(S_{ij'} - m_i)}, \qquad m_i = \max_j S_{ij}.$$

    Shapes: ``scores (..., Lk)``; ``allowed`` broadcastable to it (``True`` = keep). Scores that are
    already ``-inf`` count as masked too.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if scores.shape[-1] == 0:  # no key at all: every row is empty, and so are its weights
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    # a row of only -inf has max -inf; shift it by 0 instead so that exp gives 0, not NaN
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # p = exp(s - m)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    # rows with no allowed key: 0 / 1 = 0
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
):
    r"""Scaled dot-product attention $O = \operatorname{softmax}(s\,QK^\top + B)\,V$ (masked).

    Args:
        q: queries ``(B, Hq, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``, ``Hkv`` divides ``Hq``.
        v: values ``(B, Hkv, Lk, Dv)``.
        mask: boolean, broadcastable to ``(B, Hq, Lq, Lk)``; ``True`` = may attend.
        bias: additive float scores, broadcastable to ``(B, Hq, Lq, Lk)`` (``-inf`` entries mask).
        causal: also apply the causal mask (query row ``r`` sees keys ``j <= r + Lk - Lq``).
        scale: multiplies $QK^\top$; default $1/\sqrt{D}$.
        return_weights: also return the attention weights.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in the dtype of ``q``; with ``return_weights`` also
        ``weights (B, Hq, Lq, Lk)`` (float32 for 16-bit inputs), rows summing to 1 (or 0 where fully
        masked).

    Empty in, empty out: no query gives an empty output; no key (``Lk = 0``) gives zeros, as a row whose every
    key is masked does. A head dim of 0 is refused.
    """
    b, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_scale(scale)
    check_bool("causal", causal)
    check_bool("return_weights", return_weights)
    score_shape = (b, hq, lq, lk)
    if mask is not None:
        check_mask(mask, score_shape)
    if bias is not None:
        check_bias(bias, score_shape)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    work = compute_dtype(q.dtype)
    groups = hq // hkv
    k_all = repeat_kv(k, groups).to(work)
    v_all = repeat_kv(v, groups).to(work)

    # S = s Q K^T (+ B)
    scores = torch.matmul(q.to(work), k_all.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(work)

    allowed = mask
    if causal and lq > 0 and lk > 0:  # with no query or no key there is nothing to mask
        c = causal_mask(lq, lk, device=q.device)
        allowed = c if allowed is None else allowed & c

    # P = softmax(S) row-wise, O = P V
    weights = masked_softmax(scores, allowed)
    out = torch.matmul(weights, v_all).to(q.dtype)
    return (out, weights) if return_weights else out


def attention_naive(q, k, v, *, mask=None, bias=None, causal=False, scale=None):
    r"""The oracle: attention as loops over batch, head and query, exactly as the equation reads.

    For each query $i$: $s_j = \text{scale}\cdot q_i \cdot k_j + b_{ij}$ over the allowed keys $j$,
    $p = \operatorname{softmax}(s)$, $o_i = \sum_j p_j v_j$ (zero if no key is allowed).

    Computes in float64 and is slow on purpose: tests use it on small inputs to check every faster
    version. Shapes as in :func:`attention`; returns ``(B, Hq, Lq, Dv)`` in float64.
    """
    bsz, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_bool("causal", causal)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = q.double(), k.double(), v.double()
    if mask is not None:
        mask = mask.expand(bsz, hq, lq, lk)
    if bias is not None:
        bias = bias.double().expand(bsz, hq, lq, lk)
    out = torch.zeros(bsz, hq, lq, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            kv_head = h // (hq // hkv)
            for r in range(lq):
                position = r + lk - lq
                scores, values = [], []
                for j in range(lk):
                    if causal and j > position:
                        continue
                    if mask is not None and not mask[b, h, r, j]:
                        continue
                    s = scale * torch.dot(q[b, h, r], k[b, kv_head, j])
                    if bias is not None:
                        s = s + bias[b, h, r, j]
                    if s == float("-inf"):
                        continue
                    scores.append(s)
                    values.append(v[b, kv_head, j])
                if not scores:
                    continue  # nothing to attend to: the output stays zero
                weights = torch.softmax(torch.stack(scores), dim=0)
                out[b, h, r] = (weights[:, None] * torch.stack(values)).sum(0)
    return out
