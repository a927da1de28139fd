r"""Lesson 12, mixture-of-head attention (MoH): exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=12

(which runs ``pytest tests/exercises/test_12_mixture_of_heads.py --against exercises``).
A failing check says what is wrong: the paper's gates where the code's were asked for, a loss averaged
token by token, heads flattened in the wrong order, ...

Rules: plain PyTorch (``torch.softmax``, ``topk``, ``scatter``, ``einsum``, indexing, ...). The library's
own versions (:func:`attnlib.heads.mixture_of_heads.routed_head_gates`,
:func:`attnlib.heads.mixture_of_heads.load_balancing_loss`, :class:`attnlib.heads.mixture_of_heads.MixtureOfHeadsAttention`)
are the answers; write yours without them.

Paper: Jin et al., *MoH: Multi-Head Attention as Mixture-of-Head Attention*, 2024, arXiv:2410.11842.
"""

from __future__ import annotations

import torch


def code_routed_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    r"""The routed heads' gates as the official MoH code computes them (before the head-type weight).

    With $p_t = \operatorname{softmax}(W_r x_t)$ over the $E$ routed heads and $m_t$ the indicator of the
    $k$ largest entries of $p_t$:

    $$r_{t,i} = k\,\frac{p_{t,i}\, m_{t,i}}{\sum_j p_{t,j}\, m_{t,j}} .$$

    (The paper's Eq. 5 uses $p_{t,i} m_{t,i}$ alone. The code renormalises the kept probabilities and
    multiplies by $k$, so that a uniform router gives gates of exactly 1 on the kept heads.)

    Args:
        logits: ``(..., E)`` router logits $W_r x_t$, one row per token.
        top_k: $k$, how many routed heads each token keeps ($1 \le k \le E$).

    Returns:
        ``(..., E)``: $r_t$, zero outside each token's top $k$; each row sums to $k$.
    """
    raise NotImplementedError(
        "p = torch.softmax(logits, dim=-1); keep the k largest per row with p.topk(top_k, dim=-1).indices and "
        "a zero tensor .scatter(-1, indices, 1.0) as the mask m; then top_k * p * m / (p * m).sum(-1, keepdim=True)"
    )


def balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""The load-balancing loss of the paper (Eq. 7) over all tokens of a batch.

    With $T$ tokens (every leading index of ``probs`` is a token), $E$ routed heads,

    $$\mathcal{L}_b = \sum_{i=1}^{E} f_i P_i, \qquad f_i = \frac{1}{T}\sum_t m_{t,i}, \qquad
      P_i = \frac{1}{T}\sum_t p_{t,i} :$$

    $f_i$ is the fraction of tokens that select head $i$, $P_i$ the mean probability the router gives it.
    Note the order: first average over tokens, then multiply, then sum over heads.

    Args:
        probs: ``(..., E)`` routing probabilities $p_t$ (rows sum to 1).
        mask: ``(..., E)`` bool, $m_t$, ``True`` for the heads in token $t$'s top $k$.

    Returns:
        a scalar tensor (0-d).
    """
    raise NotImplementedError(
        "Flatten to (T, E) with .reshape(-1, E); f = mask.float().mean(0) (same dtype as probs), "
        "P = probs.mean(0); return (f * P).sum()"
    )


def weighted_head_sum(heads: torch.Tensor, gates: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    r"""Mixture-of-head output: the gated sum of the heads, each through its block of $W_O$.

    $$\operatorname{MoH}(x_t) = \sum_{i=1}^{h} g_{t,i}\, H^i_t\, W_O^i ,$$

    where $W_O^i$ is rows $i d \dots (i+1) d - 1$ of $W_O$ (the rows that multiply head $i$ in
    $[H^1, \dots, H^h] W_O$). With all gates 1 it is multi-head attention.

    Args:
        heads: ``(B, h, L, d)``, the heads' outputs $H^i$ (after softmax-attention, before $W_O$).
        gates: ``(B, L, h)``, $g_{t,i}$ per token and head.
        w_o: ``(h * d, dim)``, the output projection, used as ``x @ w_o``.

    Returns:
        ``(B, L, dim)``.
    """
    raise NotImplementedError(
        "Scale each head by its token's gate: heads * gates.transpose(1, 2)[..., None] (B, h, L, d); then move "
        "the head axis next to d, .transpose(1, 2).reshape(B, L, h * d), and multiply by w_o"
    )
