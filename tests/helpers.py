"""Shared helpers for the tests: seeded inputs and the low-precision PyTorch baseline."""

from __future__ import annotations

import math

import torch

from attnlib.core import masked_softmax
from attnlib.masks import causal_mask


def make_qkv(b=1, hq=2, hkv=None, lq=16, lk=None, d=16, dv=None, *, dtype=torch.float32, seed=0,
             requires_grad=False, scale=1.0):
    """Seeded random ``q (b, hq, lq, d)``, ``k, v (b, hkv, lk, d|dv)``."""
    hkv = hq if hkv is None else hkv
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=g) * scale).to(dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) * scale).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def plain_torch_attention(q, k, v, *, causal=False, scale=None):
    """Attention computed entirely in the inputs' dtype with ordinary PyTorch ops.

    This is the baseline for tolerances: a kernel at a given precision may be off from the float64
    truth by a small multiple of what this plain computation is off by (as FlashAttention's tests do).
    """
    hq, hkv, lq, lk, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    allowed = causal_mask(lq, lk) if causal else None
    return torch.matmul(masked_softmax(scores, allowed), v)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()
