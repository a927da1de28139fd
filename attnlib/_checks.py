"""Input checks shared by every attention function and kernel in the course.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument, says what was expected and
what was given, so that a mistake is found before any arithmetic (or any kernel launch) happens.
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


def check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
