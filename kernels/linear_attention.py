r"""Chunked causal linear attention in Triton, forward and backward (lesson 30).

The kernel computes the *unnormalised* causal product of linear attention (Katharopoulos et al., 2020,
"Transformers are RNNs", arXiv 2006.16236), the part that costs $O(L\,d\,d_v)$:

$$Y = \operatorname{tril}(QK^\top)\,V,\qquad y_i = q_i\sum_{j\le i} k_j^\top v_j .$$

The feature map $\phi$, the normaliser $z_i = \phi(q_i)\cdot\sum_{j\le i}\phi(k_j)$ and Flowformer's flows
(Wu et al., 2022, arXiv 2202.06258) are applied outside, in PyTorch, where they cost $O(L\,d)$ and
autograd differentiates them: $q$ and $k$ passed here are already feature-mapped (and, for
Flowformer, $q$ scaled by its incoming flow and $v$ by the competition). One kernel therefore serves
both mechanisms of the lesson.

**Forward.** One program owns one (batch, head) and one block of ``BLOCK_DV`` value columns, and walks
over the sequence in chunks of $C$ tokens, carrying the state $S = \sum_{\text{earlier chunks}} K^\top V$
($d\times$``BLOCK_DV``, fp32) in registers:

$$Y_t = \underbrace{\operatorname{tril}(Q_tK_t^\top)V_t}_{\text{intra-chunk}} + \underbrace{Q_t S_{t-1}}_{\text{inter-chunk}},
  \qquad S_t = S_{t-1} + K_t^\top V_t .$$

**Backward.** With $P_t = \operatorname{tril}(Q_tK_t^\top)$ and $dP_t = \operatorname{tril}(dY_tV_t^\top)$:

$$dQ_t = dP_t K_t + dY_t S_{t-1}^\top\quad\text{(a forward scan, state } S\text{)},$$
$$dK_t = dP_t^\top Q_t + V_t\,dS_t^\top,\qquad dV_t = P_t^\top dY_t + K_t\,dS_t\quad
  \text{(a backward scan, } dS_t = \textstyle\sum_{u>t} Q_u^\top dY_u).$$

$dQ$ and $dK$ sum over the value blocks: each program writes an fp32 partial and the launcher adds
them (no atomics). Conventions as :mod:`kernels.flash`: plain pointer arithmetic with masks, fp32
accumulators and states, every ``tl.dot`` dimension at least 16 (head dims below 16 are zero-padded).
The state is multiplied in fp32 (TF32 on a GPU for 16-bit inputs): a sum of $L$ positive terms can
exceed float16's range at long lengths.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ._checks import check_qkv
from ._runtime import check_device
from .common import (
    TRITON_TYPES,
    Tiles,
    block_dim,
    check_blocks,
    check_kernel_dtype,
    interpreter_tiles,
    kernel_options,
    kernel_signature,
    precision,
    runs_compiled,
)

MAX_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _linear_fwd_kernel(Q, K, V, O, L, HEAD_DIM, V_DIM,
                       CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(CHUNK >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16, "blocks must be at least 16")
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    qk_base = pid_bh * L * HEAD_DIM
    v_base = pid_bh * L * V_DIM
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    v_ok = offs_v < V_DIM
    lower = offs_c[:, None] >= offs_c[None, :]  # tril, diagonal included
    state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, L, CHUNK):
        rows = start + offs_c
        row_ok = rows < L
        q = tl.load(Q + qk_base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(K + qk_base + rows[None, :] * HEAD_DIM + offs_d[:, None],
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + v_base + rows[:, None] * V_DIM + offs_v[None, :],
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # intra-chunk: tril(Q_t K_t^T) V_t
        p = tl.where(lower, tl.dot(q, kt, input_precision=PRECISION), 0.0)
        y = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        # inter-chunk: + Q_t S_{t-1}
        y = tl.dot(q.to(tl.float32), state, y, input_precision=PRECISION)
        tl.store(O + v_base + rows[:, None] * V_DIM + offs_v[None, :], y.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        # S_t = S_{t-1} + K_t^T V_t
        state = tl.dot(kt, v, state, input_precision=PRECISION)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _linear_bwd_dq_kernel(K, V, DO, DQ, L, HEAD_DIM, V_DIM,
                          CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(CHUNK >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16, "blocks must be at least 16")
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    qk_base = pid_bh * L * HEAD_DIM
    v_base = pid_bh * L * V_DIM
    # this value block's partial of dQ: DQ is (value blocks, B*H, L, D) in fp32
    dq_base = (pid_v.to(tl.int64) * tl.num_programs(1) + pid_bh) * L * HEAD_DIM
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    v_ok = offs_v < V_DIM
    lower = offs_c[:, None] >= offs_c[None, :]
    state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, L, CHUNK):
        rows = start + offs_c
        row_ok = rows < L
        k_mask = row_ok[:, None] & d_ok[None, :]
        k = tl.load(K + qk_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=k_mask, other=0.0)
        v = tl.load(V + v_base + rows[:, None] * V_DIM + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                    other=0.0)
        do = tl.load(DO + v_base + rows[:, None] * V_DIM + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                     other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        # dP_t = tril(dY_t V_t^T) ; dQ_t = dP_t K_t + dY_t S_{t-1}^T
        dp = tl.where(lower, tl.dot(do, tl.trans(v), input_precision=PRECISION), 0.0)
        dq = tl.dot(dp.to(k.dtype), k, input_precision=PRECISION)
        dq = tl.dot(do.to(tl.float32), tl.trans(state), dq, input_precision=PRECISION)
        tl.store(DQ + dq_base + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=k_mask)
        # S_t = S_{t-1} + K_t^T V_t
        state = tl.dot(tl.trans(k), v, state, input_precision=PRECISION)


@triton.jit
def _linear_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, HEAD_DIM, V_DIM,
                            CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(CHUNK >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16, "blocks must be at least 16")
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    qk_base = pid_bh * L * HEAD_DIM
    v_base = pid_bh * L * V_DIM
    dk_base = (pid_v.to(tl.int64) * tl.num_programs(1) + pid_bh) * L * HEAD_DIM
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    v_ok = offs_v < V_DIM
    upper = offs_c[:, None] <= offs_c[None, :]  # the transpose of tril: entry (j, i) kept when j <= i
    dstate = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)  # dS_t = sum over later chunks of Q^T dY
    num_chunks = tl.cdiv(L, CHUNK)
    for step in range(0, num_chunks):
        start = (num_chunks - 1 - step) * CHUNK  # last chunk first
        rows = start + offs_c
        row_ok = rows < L
        qk_mask = row_ok[:, None] & d_ok[None, :]
        v_mask = row_ok[:, None] & v_ok[None, :]
        q = tl.load(Q + qk_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=qk_mask, other=0.0)
        k = tl.load(K + qk_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + v_base + rows[:, None] * V_DIM + offs_v[None, :], mask=v_mask, other=0.0)
        do = tl.load(DO + v_base + rows[:, None] * V_DIM + offs_v[None, :], mask=v_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        # P_t^T = tril(Q_t K_t^T)^T ; dV_t = P_t^T dY_t + K_t dS_t
        pt = tl.where(upper, tl.dot(k, tl.trans(q), input_precision=PRECISION), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dv = tl.dot(k.to(tl.float32), dstate, dv, input_precision=PRECISION)
        # dP_t^T = tril(dY_t V_t^T)^T ; dK_t = dP_t^T Q_t + V_t dS_t^T
        dpt = tl.where(upper, tl.dot(v, tl.trans(do), input_precision=PRECISION), 0.0)
        dk = tl.dot(dpt.to(q.dtype), q, input_precision=PRECISION)
        dk = tl.dot(v.to(tl.float32), tl.trans(dstate), dk, input_precision=PRECISION)
        tl.store(DV + v_base + rows[:, None] * V_DIM + offs_v[None, :], dv.to(DV.dtype.element_ty), mask=v_mask)
        tl.store(DK + dk_base + rows[:, None] * HEAD_DIM + offs_d[None, :], dk, mask=qk_mask)
        # dS_{t-1} = dS_t + Q_t^T dY_t
        dstate = tl.dot(tl.trans(q), do, dstate, input_precision=PRECISION)


# ------------------------------------------------------------------------------------------------
# tiles, launchers and autograd
# ------------------------------------------------------------------------------------------------


def default_tiles(head_dim: int, value_dim: int, dtype: torch.dtype, *, compiled: bool | None = None) -> dict[str, Tiles]:
    """Tiles of the forward, dQ and dK/dV kernels: ``block_m`` is the chunk $C$, ``block_n`` the value block.

    Interpreted: few large steps (chunks of 64, all value columns in one block up to 128). On a GPU a
    program holds the $d\\times$``BLOCK_DV`` fp32 state plus $C\\times C$ and $C\\times d$ tiles; value
    blocks of 64 also give $d_v/64$ times more programs (parallelism over the value columns). Not tuned
    on a card yet: ``python -m benchmarks.linear`` times them. ``compiled``: as in
    :func:`kernels.flash.default_tiles`.
    """
    if not runs_compiled(compiled):
        return interpreter_tiles(64, 128)
    if dtype == torch.float32:
        return {"fwd": Tiles(32, 64, 4, 1), "dq": Tiles(32, 64, 4, 1), "dkdv": Tiles(32, 32, 4, 1)}
    wide = head_dim > 64
    return {"fwd": Tiles(64, 64, 4, 2), "dq": Tiles(64, 64, 4, 2), "dkdv": Tiles(64, 32 if wide else 64, 4, 2)}


def _block_dv(tiles: Tiles, value_dim: int) -> int:
    return min(tiles.block_n, block_dim(value_dim))


def _launch(tiles: Tiles, head_dim: int, value_dim: int) -> tuple[dict, int]:
    block_dv = _block_dv(tiles, value_dim)
    options = dict(CHUNK=tiles.block_m, BLOCK_D=block_dim(head_dim), BLOCK_DV=block_dv,
                   num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return options, triton.cdiv(value_dim, block_dv)


def linear_forward(q, k, v, *, tiles: Tiles, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch the forward kernel on contiguous inputs. Returns ``y (B, H, L, Dv)`` in ``out_dtype`` (default: the
    inputs' dtype; the kernel accumulates in float32 and rounds only when it stores)."""
    b, h, length, d = q.shape
    dv = v.shape[-1]
    out = torch.empty((b, h, length, dv), device=q.device, dtype=out_dtype or q.dtype)
    options, value_blocks = _launch(tiles, d, dv)
    _linear_fwd_kernel[(value_blocks, b * h)](q, k, v, out, length, d, dv, **options, **kernel_options(q))
    return out


def linear_backward(q, k, v, grad_out, *, dq_tiles: Tiles, dkdv_tiles: Tiles):
    """Launch the two backward kernels. Returns ``dq, dk, dv`` shaped like ``q, k, v``."""
    b, h, length, d = q.shape
    dv_dim = v.shape[-1]
    grad_out = grad_out.contiguous()
    options, blocks = _launch(dq_tiles, d, dv_dim)
    dq_parts = torch.empty((blocks, b, h, length, d), device=q.device, dtype=torch.float32)
    _linear_bwd_dq_kernel[(blocks, b * h)](k, v, grad_out, dq_parts, length, d, dv_dim, **options,
                                           **kernel_options(q))
    options, blocks = _launch(dkdv_tiles, d, dv_dim)
    dk_parts = torch.empty((blocks, b, h, length, d), device=q.device, dtype=torch.float32)
    dv = torch.empty_like(v)
    _linear_bwd_dkdv_kernel[(blocks, b * h)](q, k, v, grad_out, dk_parts, dv, length, d, dv_dim, **options,
                                             **kernel_options(q))
    # dQ and dK sum over the value blocks
    return dq_parts.sum(0).to(q.dtype), dk_parts.sum(0).to(k.dtype), dv


class ChunkedLinearAttentionFunction(torch.autograd.Function):
    """``torch.autograd`` glue: the forward saves ``q, k, v``; the backward rescans them (no state stored)."""

    @staticmethod
    def forward(ctx, q, k, v, tiles, out_dtype):
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = linear_forward(q, k, v, tiles=tiles["fwd"], out_dtype=out_dtype)
        ctx.save_for_backward(q, k, v)
        ctx.tiles = tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        # the backward kernels multiply dO with the inputs' tiles: give it the inputs' dtype
        grad_out = grad_out.to(q.dtype)
        dq, dk, dv = linear_backward(q, k, v, grad_out, dq_tiles=ctx.tiles["dq"], dkdv_tiles=ctx.tiles["dkdv"])
        return dq, dk, dv, None, None


def check_linear_kernel_inputs(q, k, v, chunk_size, out_dtype=None) -> None:
    """Every check the kernels need, done before any launch."""
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected the heads and length of q {tuple(q.shape[1:3])} (causal self-attention), "
                         f"got {tuple(k.shape[1:3])}")
    check_kernel_dtype("q", q)
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"q: the kernel supports head_dim 1 to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if v.shape[-1] == 0:
        raise ValueError("v: expected at least one value column, got 0")
    if q.shape[2] == 0:
        raise ValueError("q: expected at least one token, got length 0")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_device(name, x)
    check_blocks(chunk_size=chunk_size)
    if out_dtype not in (None, q.dtype, torch.float32):
        raise TypeError(f"out_dtype: expected None, {q.dtype} (as q) or torch.float32, got {out_dtype}")


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             chunk_size: int | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""The causal product $Y = \operatorname{tril}(QK^\top)V$, $y_i = q_i\sum_{j\le i}k_j^\top v_j$, in Triton.

    Unnormalised and without feature map: for linear attention pass $\phi(Q), \phi(K)$ and divide by
    $\phi(q_i)\cdot\sum_{j\le i}\phi(k_j)$ afterwards (:func:`attnlib.linear.linear_attention.linear_attention`
    with ``backend="kernel"`` does). Differentiable in ``q, k, v``. Compiled on CUDA tensors; Triton's
    interpreter on CPU tensors when no GPU is present (slow: small sizes).

    Args:
        q: ``(B, H, L, D)``, float16, bfloat16 or float32, ``D <= 128``.
        k: ``(B, H, L, D)``.
        v: ``(B, H, L, Dv)``, any ``Dv >= 1`` (split in blocks of ``block_n`` columns).
        chunk_size: the chunk $C$ (a power of two >= 16); default from :func:`default_tiles`.
        out_dtype: the dtype of ``y``: ``q``'s (default) or ``torch.float32``. $y_i$ is a sum over up to $L$
            keys: with 16-bit inputs it passes float16's largest value (65,504) long before the normalised
            output would, so a caller that divides afterwards asks for float32 (the library does).

    Returns:
        ``y (B, H, L, Dv)`` in ``out_dtype``.
    """
    check_linear_kernel_inputs(q, k, v, chunk_size, out_dtype)
    tiles = default_tiles(q.shape[-1], v.shape[-1], q.dtype)
    if chunk_size is not None:
        tiles = {name: replace(t, block_m=chunk_size) for name, t in tiles.items()}
    return ChunkedLinearAttentionFunction.apply(q, k, v, tiles, out_dtype)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation (see kernels.compile_check)
# ------------------------------------------------------------------------------------------------


def compile_targets(dtype, head_dim: int) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` for each kernel at its default GPU tiles.

    ``dtype`` is a torch dtype (or ``"fp16"``, ``"bf16"``, ``"fp32"``); values are as wide as the heads.
    ``signature`` gives every argument's Triton type, as ``triton.compiler.ASTSource`` wants it.
    """
    name = dtype if isinstance(dtype, str) else TRITON_TYPES[dtype]
    torch_dtype = {v: k for k, v in TRITON_TYPES.items()}[name]
    tiles = default_tiles(head_dim, head_dim, torch_dtype, compiled=True)
    targets = []
    for label, kernel, key in (("linear forward", _linear_fwd_kernel, "fwd"),
                               ("linear bwd dQ", _linear_bwd_dq_kernel, "dq"),
                               ("linear bwd dK dV", _linear_bwd_dkdv_kernel, "dkdv")):
        t = tiles[key]
        constexprs = dict(CHUNK=t.block_m, BLOCK_D=block_dim(head_dim),
                          BLOCK_DV=_block_dv(t, head_dim), UPCAST=False,
                          PRECISION=precision(torch_dtype))
        # dQ and dK are float32 partials
        signature = kernel_signature(kernel, name, constexprs, {"DQ": "*fp32", "DK": "*fp32"})
        targets.append((label, kernel, t, constexprs, signature))
        if key == "fwd" and name != "fp32":  # what the library runs: 16-bit inputs, float32 sums
            signature = kernel_signature(kernel, name, constexprs, {"O": "*fp32"})
            targets.append(("linear forward fp32 out", kernel, t, constexprs, signature))
    return targets
