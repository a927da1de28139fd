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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the absolute error a kernel may add beyond plain PyTorch's, per dtype
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_kernel_within_tolerance(names, dtype, results, *, floor_scales_with_size: bool = True) -> None:
    """Each ``results["kernel"][i]`` (named ``names[i]``) is finite and its error against ``results["float64"][i]``
    is at most 3x that of plain PyTorch at ``dtype`` (``results["plain"][i]``) plus :data:`FLOOR`, scaled by the
    largest true value when it exceeds 1 (unless ``floor_scales_with_size=False``)."""
    for i, what in enumerate(names):
        got, truth, plain = (results[n][i] for n in ("kernel", "float64", "plain"))
        assert torch.isfinite(got).all(), f"{what}: not finite"
        size = max(1.0, truth.abs().max().item()) if floor_scales_with_size else 1.0
        err, budget = max_err(got, truth), 3 * max_err(plain, truth) + FLOOR[dtype] * size
        assert err <= budget, (f"{what}: error {err:.3g} > {budget:.3g} "
                               f"(plain torch at {dtype}: {max_err(plain, truth):.3g})")
