r"""Lesson 45, dynamic mask attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=45

(which runs ``pytest tests/exercises/test_45_dynamic_mask_attention.py --against exercises``).
A failing check says what is wrong: the values flattened across tokens, the softplus missing, the causal
mask applied after the top-w, future keys kept to fill the budget, the bias left out of the logits, ...

Rules: plain PyTorch (``transpose``, ``reshape``, ``softplus``, ``topk``, ``scatter_``, ``masked_fill``,
``softmax``). The library's own versions (:func:`attnlib.sparse.dynamic_mask.dynamic_bias`,
:func:`attnlib.sparse.dynamic_mask.dynamic_mask`, :func:`attnlib.sparse.dynamic_mask.dynamic_mask_attention`) are the
answers; write yours without them.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want math.sqrt and math.inf)

import torch


def value_bias(v: torch.Tensor, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    r"""DMA's bias per key, from the values (the official code's form).

    $$\delta_j = W_\delta \operatorname{flat}(V)_j, \qquad b_{hj} = A_h \operatorname{softplus}(\delta_{jh}),$$

    where $\operatorname{flat}(V)_j \in \mathbb R^{H_{kv} D}$ concatenates token $j$'s values over the key/value
    heads (head 0's $D$ features first, then head 1's, ...).

    Args:
        v: values ``(B, H_kv, L, D)``.
        weight: $W_\delta$, ``(H_kv, H_kv * D)``.
        a: $A$, ``(H_kv,)``.

    Returns:
        ``(B, H_kv, 1, L)``: one bias per key and key/value head.
    """
    raise NotImplementedError(
        "flat = v.transpose(1, 2).reshape(B, L, H_kv * D) (token j's values of every head, side by side); "
        "delta = flat @ weight.T, shape (B, L, H_kv); b = a * softplus(delta); then move the heads in front and "
        "add the query axis: b.transpose(1, 2)[:, :, None, :]"
    )


def top_w_causal_mask(bias: torch.Tensor, window: int) -> torch.Tensor:
    r"""Which keys each query keeps: the (at most) ``window`` keys $j \le i$ with the largest bias.

    $$M_{ij} = [\,j \le i\,]\ \big[\,b_j \text{ is among the } w \text{ largest of } b_0, \dots, b_i\,\big].$$

    Query $i$ sees $i + 1$ keys: when $i + 1 \le w$ it keeps all of them, and never a future one. (The biases
    of a test have no ties.)

    Args:
        bias: ``(B, H, 1, L)``.
        window: $w \ge 1$.

    Returns:
        ``(B, H, L, L)`` bool, ``True`` = may attend.
    """
    raise NotImplementedError(
        "Expand the bias to (B, H, L, L), set the future keys (j > i) to -inf BEFORE choosing, take "
        "topk(min(window, L), dim=-1), and mark only the chosen entries whose value is not -inf (a short "
        "prefix picks some -inf keys to fill its budget: they must stay False)"
    )


def masked_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    r"""Attention with the per-key bias in the logits and the selection as a mask.

    $$S = \frac{QK^\top}{\sqrt D} + \mathbf 1 b^\top, \qquad S_{ij} = -\infty \text{ where } \neg M_{ij}, \qquad
      O = \operatorname{softmax}(S)\,V,$$

    and a query whose every key is masked gets a zero output (not NaN).

    Args:
        q, k, v: ``(B, H, L, D)``.
        bias: ``(B, H, 1, L)``.
        mask: ``(B, H, L, L)`` bool.

    Returns:
        ``(B, H, L, D)``.
    """
    raise NotImplementedError(
        "scores = q @ k.transpose(-2, -1) / sqrt(D) + bias; scores.masked_fill(~mask, -inf); softmax over the "
        "keys; rows that were all -inf come out NaN: replace them by 0 (torch.nan_to_num, or a where on "
        "mask.any(-1)); then weights @ v"
    )
