"""What every kernel of the course shares: tiles, launch options, input checks and the compile signature.

Each kernel module keeps its own tile table (:func:`default_tiles` there), its kernels and its launchers;
the plumbing around them lives here once (the shape of flash-linear-attention's ``ops/utils``):

* :class:`Tiles`: the ``BLOCK_M x BLOCK_N`` tile and the launch options of one kernel;
* :func:`kernel_options`: the precision of ``tl.dot`` and the interpreter's bf16 work-around;
* :func:`block_dim`: a head or value width rounded up to a power of two of at least 16 (``tl.dot`` needs 16);
* :func:`check_blocks`, :func:`check_flash_inputs`: the checks every flash-style kernel makes before a launch;
* :func:`kernel_signature`: the Triton type of every kernel argument, for :mod:`kernels.compile_check`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from ._checks import check_qkv, check_scale
from ._runtime import INTERPRETED, check_device

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one kernel: ``BLOCK_M`` query rows by ``BLOCK_N`` keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1


def runs_compiled(compiled: bool | None = None) -> bool:
    """``compiled`` if given, else whether this process compiles its kernels (a GPU) rather than interpreting them.

    Each kernel's ``default_tiles(..., compiled=)`` takes it, so that :mod:`kernels.compile_check` can ask for
    the GPU's tiles on a machine that runs the interpreter."""
    return (not INTERPRETED) if compiled is None else compiled


def interpreter_tiles(block_m: int = 64, block_n: int = 64) -> dict[str, Tiles]:
    """One tile for the forward, dK/dV and dQ kernels in the interpreter, where each block step costs
    milliseconds whatever its size, so few large steps win."""
    tiles = Tiles(block_m, block_n)
    return {"fwd": tiles, "dkdv": tiles, "dq": tiles}


def with_blocks(tiles: dict[str, Tiles], block_m: int | None, block_n: int | None) -> dict[str, Tiles]:
    """``tiles`` (one :class:`Tiles` per kernel) with the query and key tile sizes replaced where given."""
    if block_m is None and block_n is None:
        return tiles
    return {name: replace(t, block_m=block_m or t.block_m, block_n=block_n or t.block_n) for name, t in tiles.items()}


def block_dim(width: int) -> int:
    """``width`` (a head or value dimension) rounded up to a power of two, at least 16 (``tl.dot`` needs 16)."""
    return max(16, triton.next_power_of_2(width))


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: true fp32 products (``"ieee"``, not TF32) for fp32 inputs, so results
    match the library to ~1e-6; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_options(q: torch.Tensor) -> dict:
    """The ``UPCAST`` and ``PRECISION`` constexprs every kernel takes, for inputs like ``q``."""
    # bf16 arithmetic is wrong in Triton's interpreter: compute in fp32 there (exact on a GPU anyway)
    return dict(UPCAST=INTERPRETED and q.dtype == torch.bfloat16, PRECISION=precision(q.dtype))


def launch_options(tiles: Tiles, head_dim: int, **widths: int) -> dict:
    """``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D`` (and a ``BLOCK_<X>`` for each extra width, e.g. ``DV=value_dim``),
    ``num_warps`` and ``num_stages`` for one launch."""
    extra = {f"BLOCK_{name}": block_dim(width) for name, width in widths.items()}
    return dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_dim(head_dim), **extra,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def check_blocks(**blocks) -> None:
    """Each given tile size (``block_m=``, ``chunk_size=``, ...) is ``None`` or a power of two >= 16."""
    for name, block in blocks.items():
        if block is None:
            continue
        if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"{name}: expected a power of two >= 16 (a GPU's tl.dot needs 16), got {block!r}")


def check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the kernel computes in float16, bfloat16 or float32, got {x.dtype}")


def check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


def check_flash_inputs(q, k, v, causal, scale, block_m, block_n) -> None:
    """Every check a flash-style kernel (lesson 01's and those built on it) needs, done before any launch."""
    check_qkv(q, k, v, same_value_dim=True)
    check_scale(scale)
    check_causal(causal)
    check_kernel_dtype("q", q)
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: the kernel supports head_dim {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, got {d}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: expected at least one query and one key, got lengths {q.shape[2]} and {k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_device(name, x)
    check_blocks(block_m=block_m, block_n=block_n)


# the Triton types of the arguments the kernels share by name (see kernel_signature)
_STAT_ARGS = ("LSE", "DELTA", "LAM", "O2", "LSE1", "LSE2", "DELTA1", "DELTA2", "DQ2")
_DATA_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Q1", "K1", "Q2", "K2", "DQ1", "DK1", "DK2")


def kernel_signature(kernel, dtype: str, constexprs: dict, types: dict | None = None) -> dict:
    """Triton type strings for every argument of a kernel: ``"constexpr"`` for ``constexprs``, then ``types``
    (a kernel's own arguments, e.g. ``{"MASK": "*u8"}``), then the course's names: pointers to the data
    (``Q``, ``K``, ``V``, ``O`` and their gradients) in ``dtype``, statistics (``LSE``, ``DELTA``, ...) in
    float32, scales as float32 scalars, anything else a 32-bit integer."""
    types = types or {}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name in _STAT_ARGS:
            signature[name] = "*fp32"
        elif name in _DATA_ARGS:
            signature[name] = f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature
