r"""Lesson 43, shifted sparse attention, sink tokens and H2O: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=43

(which runs ``pytest tests/exercises/test_43_shifted_sparse_attention.py --against exercises``).
A failing check says what is wrong: every head shifted, a mask that wraps around, outputs not rolled
back, a recent window that is not protected, ...

Rules: plain PyTorch (``torch.arange``, ``roll``, ``reshape``, ``softmax``, ``masked_fill``). The
library's own versions (:func:`attnlib.sparse.shifted_sparse.s2_mask`, :func:`attnlib.sparse.shifted_sparse.h2o_mask`)
are the answers; write yours without them.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want math.sqrt and math.inf)

import torch


def s2_segment_mask(seq_len: int, num_heads: int, group_size: int) -> torch.Tensor:
    r"""The causal S²-Attn mask of every head, segment version, ``(num_heads, N, N)`` bool.

    With $s = \lfloor G/2 \rfloor$: heads $h < \lfloor H/2 \rfloor$ allow $[\lfloor i/G \rfloor = \lfloor j/G \rfloor]
    \wedge [j \le i]$; the others allow $[\sigma(i) = \sigma(j)] \wedge [j \le i]$ with
    $\sigma(i) = \lfloor (i + G - s)/G \rfloor$ (segments $[0,s), [s, s+G), \dots, [N-G+s, N)$).

    Args:
        seq_len: $N$.
        num_heads: $H$; heads ``num_heads // 2`` and after are the shifted ones.
        group_size: $G$, a divisor of $N$.

    Returns:
        ``(num_heads, seq_len, seq_len)`` bool, ``True`` = may attend.
    """
    raise NotImplementedError(
        "Build i = arange(N)[:, None], j = arange(N)[None, :] and causal = j <= i. Unshifted heads: "
        "i // G == j // G; shifted heads: (i + G - s) // G == (j + G - s) // G with s = G // 2. "
        "Stack one (N, N) mask per head: heads >= H // 2 get the shifted one"
    )


def s2_roll_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""S²-Attn as LongLoRA's Algorithm 1: roll, causal attention inside groups, roll back.

    1. roll $q, k, v$ of the heads $h \ge \lfloor H/2 \rfloor$ by $-s$ along the sequence ($s = \lfloor G/2 \rfloor$);
    2. cut the sequence into $N/G$ groups of $G$ and, in every head and group, compute causal attention
       $\operatorname{softmax}(q k^\top / \sqrt d)\, v$;
    3. roll the outputs of the shifted heads back by $+s$.

    Args:
        q, k, v: ``(B, H, N, D)``.
        group_size: $G$, a divisor of $N$.

    Returns:
        ``(B, H, N, D)``.
    """
    raise NotImplementedError(
        "x[:, H // 2:].roll(-s, dims=2) for q, k and v; reshape to (B, H, N // G, G, D); scores = "
        "q @ k.transpose(-2, -1) / sqrt(D) with a lower-triangular (G, G) mask; softmax; times v; "
        "reshape to (B, H, N, D) and roll the shifted heads back with .roll(+s, dims=2)"
    )


def h2o_cache_mask(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    r"""H2O's cache at every decoding step of one head, ``(N, N)`` bool (row $t$ = keys kept at step $t$).

    Step $t = 0, 1, \dots$: add key $t$ to the cache; if it now holds more than $k$ (``budget``) keys,
    evict the one with the smallest *accumulated* score $A_j$ among those outside the recent window
    ($j \le t - r$; the earliest on ties); record the cache as row $t$; then attend over the cache,
    $p = \operatorname{softmax}(S_{t, \text{cache}})$, and add: $A_j \mathrel{+}= p_j$.

    Args:
        scores: ``(N, N)`` attention logits $S$ of one head (only $j \le t$ is ever used in row $t$).
        budget: $k \ge$ ``recent``.
        recent: $r \ge 1$, the last positions that are never evicted.

    Returns:
        ``(N, N)`` bool; row $t$ has $\min(t + 1, k)$ entries ``True``.
    """
    raise NotImplementedError(
        "Keep a bool cache (N,) and float64 scores A (N,). For t in range(N): cache[t] = True; if "
        "cache.sum() > budget, among cache & (arange(N) <= t - recent) evict the argmin of A (fill the "
        "others with +inf); out[t] = cache; A += softmax of scores[t] with the keys outside the cache at -inf"
    )
