"""Input checks shared by every attention function in the library.

The tensor checks (:func:`check_tensor`, :func:`check_qkv`, masks, biases, the scale) are the kernels' own
(:mod:`kernels._checks`, torch only), so that the library and the kernels refuse the same inputs with the same
words; the checks of plain options (ints, bools, choices, backends) live here. Each raises a ``ValueError`` or
``TypeError`` that names the argument, says what was expected and what was given.
"""

from __future__ import annotations

import torch

from kernels._checks import (  # noqa: F401
    FLOAT_DTYPES,
    check_bias,
    check_broadcastable,
    check_mask,
    check_positive_int,
    check_qkv,
    check_scale,
    check_tensor,
)


def check_int_tensor(name: str, x, *, ndim: int | None = None) -> None:
    """``x`` is a tensor of an integer dtype (indices, counts, coordinates), of rank ``ndim`` when given."""
    check_tensor(name, x, ndim=ndim, floating=False)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got {x.dtype}")


def check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


# The one vocabulary for choosing an implementation (``backend=``) across the library: "reference" is the readable
# PyTorch form a lesson derives (it can return the weights), "kernel" the Triton kernel of ``kernels`` (fast on a
# GPU, Triton's interpreter on a CPU). A module with a genuine third form names it (e.g. "blockwise") and says so.
REFERENCE, KERNEL = "reference", "kernel"
BACKENDS = (REFERENCE, KERNEL)


def check_backend(backend, choices: tuple[str, ...] = BACKENDS) -> None:
    """``backend`` is one of ``choices`` (by default ``"reference"`` or ``"kernel"``)."""
    check_choice("backend", backend, choices)


def check_tokens(x, dim: int, dtype: torch.dtype | None = None) -> None:
    """``x`` is a floating ``(B, L, dim)`` tensor with ``L >= 1`` (and of ``dtype`` when given)."""
    check_tensor("x", x, ndim=3)
    if x.shape[-1] != dim:
        raise ValueError(f"x: expected last dim {dim} (the model width), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one token, got shape {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"x: expected {dtype} (the dtype of the mixer's parameters), got {x.dtype}; convert one "
                        f"of them (module.to({x.dtype}) or x.to({dtype}))")
