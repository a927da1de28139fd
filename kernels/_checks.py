"""Input checks of the kernels, also used by the library (``attnlib`` imports them from here).

Each check raises a ``ValueError`` or ``TypeError`` that names the argument, says what was expected and
what was given, so that a mistake is found before any arithmetic (or any kernel launch) happens.
Torch only: importing this module does not import Triton.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | None = None, floating: bool = True) -> None:
    """Check that ``x`` is a tensor, of rank ``ndim`` (if given) and of a floating dtype (if asked)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)} ({x.dim()}-d)"
        )
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")


def check_qkv(q, k, v, *, same_value_dim: bool = False) -> tuple[int, int, int, int, int, int]:
    """Check the usual ``(batch, heads, seq, head_dim)`` triple and return its sizes.

    Shapes: q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` with ``Hkv`` dividing
    ``Hq`` (grouped-query attention; ``Hkv == Hq`` is plain multi-head attention).

    Returns ``(B, Hq, Hkv, Lq, Lk, D)``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"k, v: expected batch size {b} (as q), got {k.shape[0]} and {v.shape[0]}"
        )
    if d == 0:
        raise ValueError(f"q: expected a head_dim of at least 1, got shape {tuple(q.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} (as q), got {k.shape[3]} (shape {tuple(k.shape)})")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v: expected heads and length {tuple(k.shape[1:3])} (as k), got {tuple(v.shape[1:3])}"
        )
    if same_value_dim and v.shape[3] != d:
        raise ValueError(f"v: expected head_dim {d} (as q), got {v.shape[3]}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"k, v: the number of key/value heads must divide the number of query heads "
            f"(grouped-query attention); got {hkv} key/value heads for {hq} query heads"
        )
    return b, hq, hkv, lq, lk, d


def check_broadcastable(name: str, x, target: tuple[int, ...], *, kind: str) -> None:
    """Check that ``x`` (a mask or a bias) broadcasts to the score shape ``target``."""
    if x.dim() > len(target):
        raise ValueError(
            f"{name}: expected at most {len(target)} dims broadcastable to {target}, "
            f"got shape {tuple(x.shape)}"
        )
    for got, want in zip(reversed(x.shape), reversed(target)):
        if got not in (1, want):
            raise ValueError(
                f"{name}: a {kind} of shape {tuple(x.shape)} does not broadcast to the scores' "
                f"shape (batch, heads, q_len, k_len) = {target}"
            )


def check_mask(mask, target: tuple[int, ...]) -> None:
    """A boolean mask, ``True`` = may attend, broadcastable to ``(B, H, Lq, Lk)``."""
    check_tensor("mask", mask, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask: expected a boolean tensor (True = may attend), got {mask.dtype}; "
            "pass additive float scores as bias= instead"
        )
    check_broadcastable("mask", mask, target, kind="mask")


def check_bias(bias, target: tuple[int, ...]) -> None:
    """A floating additive bias broadcastable to ``(B, H, Lq, Lk)``."""
    check_tensor("bias", bias)
    check_broadcastable("bias", bias, target, kind="bias")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale: expected a positive number, got {scale}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_differential_inputs(q1, k1, q2, k2, v, lam) -> tuple[int, int, int, int, int, int, int]:
    """Shapes, dtypes and devices of a differential attention call; returns ``(B, H1, H2, Hkv, Lq, Lk, D)``."""
    for name, x in (("q1", q1), ("k1", k1), ("q2", q2), ("k2", k2), ("v", v)):
        check_tensor(name, x, ndim=4)
    if len({x.dtype for x in (q1, k1, q2, k2, v)}) != 1:
        raise TypeError(f"q1, k1, q2, k2, v: expected one dtype, got "
                        f"{q1.dtype}, {k1.dtype}, {q2.dtype}, {k2.dtype}, {v.dtype}")
    if len({x.device for x in (q1, k1, q2, k2, v)}) != 1:
        raise ValueError("q1, k1, q2, k2, v: expected one device, got "
                         f"{q1.device}, {k1.device}, {q2.device}, {k2.device}, {v.device}")
    b, h1, lq, d = q1.shape
    if q2.shape[0] != b or q2.shape[2] != lq or q2.shape[3] != d:
        raise ValueError(f"q2: expected (batch, heads, seq, head_dim) = ({b}, *, {lq}, {d}) as q1, got {tuple(q2.shape)}")
    h2 = q2.shape[1]
    if h2 == 0 or h1 % h2:
        raise ValueError(f"q2: its heads (noise heads) must divide the {h1} heads of q1 (signal heads), got {h2}")
    hkv, lk = k1.shape[1], k1.shape[2]
    if k1.shape[0] != b or k1.shape[3] != d:
        raise ValueError(f"k1: expected batch {b} and head_dim {d} (as q1), got shape {tuple(k1.shape)}")
    if k2.shape != k1.shape:
        raise ValueError(f"k2: expected the shape of k1 {tuple(k1.shape)}, got {tuple(k2.shape)}")
    if v.shape[0] != b or v.shape[1] != hkv or v.shape[2] != lk:
        raise ValueError(f"v: expected (batch, heads, seq) = ({b}, {hkv}, {lk}) as k1, got {tuple(v.shape)}")
    if hkv == 0 or h2 % hkv:
        raise ValueError(f"k1, k2, v: the number of key/value heads must divide the {h2} noise heads "
                         f"(and so the {h1} signal heads), got {hkv}")
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam: expected a scalar (one lambda per layer), got shape {tuple(lam.shape)}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam: expected a float or a 0-d tensor, got {type(lam).__name__}")
    return b, h1, h2, hkv, lq, lk, d


def check_factors(q: torch.Tensor, k: torch.Tensor, u, w) -> int:
    """Check ``u (B|1, H|1, Lq, r)`` and ``w (B|1, H|1, Lk, r)`` against ``q (B, H, Lq, D)``, ``k (B, Hkv, Lk, D)``.

    Returns the rank ``r``.
    """
    check_tensor("u", u, ndim=4)
    check_tensor("w", w, ndim=4)
    b, h, lq = q.shape[:3]
    lk = k.shape[2]
    if u.shape[-1] != w.shape[-1]:
        raise ValueError(f"u, w: expected the same rank (last dim), got u rank {u.shape[-1]} and w rank {w.shape[-1]}")
    if u.shape[-1] == 0:
        raise ValueError(f"u, w: expected a rank of at least 1, got shape {tuple(u.shape)}")
    for name, x, length, what in (("u", u, lq, "queries"), ("w", w, lk, "keys")):
        if x.shape[2] != length:
            raise ValueError(f"{name}: expected {length} rows (one per {what[:-1]}, the length of the {what}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] not in (1, b) or x.shape[1] not in (1, h):
            raise ValueError(f"{name}: expected batch 1 or {b} and heads 1 or {h} (as q), got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (as q), got one on {x.device}")
    return u.shape[-1]
