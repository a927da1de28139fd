r"""Lesson 43, shifted sparse attention, sink tokens and H2O: solutions.

The answers to ``exercises/43_shifted_sparse_attention.py``. Try the exercises first; check them with

    make check LESSON=43
"""

from __future__ import annotations

import math

import torch


def s2_segment_mask(seq_len: int, num_heads: int, group_size: int) -> torch.Tensor:
    r"""The causal S²-Attn mask of every head, segment version, ``(num_heads, N, N)`` bool.

    With $s = \lfloor G/2 \rfloor$: heads $h < \lfloor H/2 \rfloor$ allow $[\lfloor i/G \rfloor = \lfloor j/G \rfloor]
    \wedge [j \le i]$; the others allow $[\sigma(i) = \sigma(j)] \wedge [j \le i]$ with
    $\sigma(i) = \lfloor (i + G - s)/G \rfloor$ (segments $[0,s), [s, s+G), \dots, [N-G+s, N)$).
    """
    shift = group_size // 2
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    causal = j <= i
    plain = (i // group_size == j // group_size) & causal
    shifted = ((i + group_size - shift) // group_size == (j + group_size - shift) // group_size) & causal
    masks = plain.repeat(num_heads, 1, 1)
    masks[num_heads // 2:] = shifted
    return masks


def s2_roll_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""S²-Attn as LongLoRA's Algorithm 1: roll, causal attention inside groups, roll back.

    ``q, k, v (B, H, N, D)``; returns ``(B, H, N, D)``.
    """
    b, h, n, d = q.shape
    shift, half = group_size // 2, h // 2

    def roll_half(x, amount):  # roll the heads h >= H/2 along the sequence
        return torch.cat([x[:, :half], x[:, half:].roll(amount, dims=2)], dim=1)

    def groups(x):  # (B, H, N, D) -> (B, H, N/G, G, D)
        return x.reshape(b, h, n // group_size, group_size, x.shape[-1])

    qg, kg, vg = (groups(roll_half(x, -shift)) for x in (q, k, v))
    scores = qg @ kg.transpose(-2, -1) / math.sqrt(d)
    causal = torch.ones(group_size, group_size, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = (weights @ vg).reshape(b, h, n, -1)
    return roll_half(out, shift)


def h2o_cache_mask(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    r"""H2O's cache at every decoding step of one head, ``(N, N)`` bool (row $t$ = keys kept at step $t$).

    Step $t$: add key $t$; if more than ``budget`` keys are cached, evict the one with the smallest
    accumulated score among those outside the recent window ($j \le t - r$; the earliest on ties); then
    attend, $p = \operatorname{softmax}(S_{t, \text{cache}})$, and add $p$ to the accumulated scores.
    """
    n = scores.shape[0]
    cache = torch.zeros(n, dtype=torch.bool)
    accumulated = torch.zeros(n, dtype=torch.float64)
    out = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        cache[t] = True
        if int(cache.sum()) > budget:
            candidates = cache & (torch.arange(n) <= t - recent)
            cache[int(accumulated.masked_fill(~candidates, math.inf).argmin())] = False
        out[t] = cache
        logits = scores[t].double().masked_fill(~cache, float("-inf"))
        accumulated += torch.softmax(logits, dim=0)
    return out
