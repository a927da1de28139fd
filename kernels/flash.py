r"""FlashAttention in Triton: exact attention in tiles, forward and backward.

The forward kernel gives each program one block of ``BLOCK_M`` query rows of one (batch, head) and walks
over the keys in blocks of ``BLOCK_N``, keeping the online-softmax state in registers (lesson 01,
:mod:`attnlib.online`):

$$m' = \max(m, \operatorname{rowmax} S_t),\quad \ell' = e^{m-m'}\ell + \operatorname{rowsum} e^{S_t - m'},\quad
  A' = e^{m-m'}A + e^{S_t - m'} V_t,\qquad O = A/\ell,\quad \mathrm{lse} = m + \log\ell .$$

The scores never leave the chip: the kernel reads $Q, K, V$ once per tile and writes $O$ and the
row log-sum-exp; the $L_q\times L_k$ matrix is never stored (Dao et al., 2022, "FlashAttention: Fast
and Memory-Efficient Exact Attention with IO-Awareness"; the loop order of Dao, 2023, FlashAttention-2).

Two details make it fast and exact: scores live in base 2 (``exp2`` is one instruction; the scale
absorbs $\log_2 e$), and the key blocks are split in two phases, blocks every query of the tile may see
(no mask work at all) and the few blocks at the causal diagonal or the ragged end (masked).

The backward pass recomputes $P = \exp(S - \mathrm{lse})$ tile by tile instead of storing it. With
$\delta_i = \sum_d dO_{id} O_{id}$:

$$dV = P^\top dO,\qquad dP = dO\,V^\top,\qquad dS = P \odot (dP - \delta),\qquad
  dQ = s\,dS\,K,\qquad dK = s\,dS^\top Q .$$

One kernel owns a block of keys and accumulates its $dK, dV$ over all query blocks (and over the query
heads that share the key/value head, for grouped-query attention); another owns a block of queries and
accumulates $dQ$. No two programs write the same output, so no atomics are needed.

Conventions as in :func:`attnlib.attention`: ``(batch, heads, seq, head_dim)``; fewer key/value heads
than query heads allowed; causal masks aligned bottom-right (query row ``r`` sees keys
``j <= r + Lk - Lq``); a query row with no visible key gives zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    TRITON_TYPES,
    Tiles,
    check_flash_inputs,
    interpreter_tiles,
    kernel_options,
    kernel_signature,
    launch_options,
    precision,
    runs_compiled,
    with_blocks,
)

# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               start, stop, rows, offs_n, offs_d, LK, HEAD_DIM, offset, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold the key blocks ``start, start + BLOCK_N, ... < stop`` into the online-softmax state."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_D)
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # S = s Q K^T, in base 2 (qk_scale = s * log2 e)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            allowed = col_ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
            s = tl.where(allowed, s, float("-inf"))
        # m' = max(m, rowmax S)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row that has seen only masked keys keeps m = -inf; shift it by 0 to avoid -inf - -inf
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        # alpha = 2^(m - m'), P = 2^(S - m')
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        # l' = alpha l + rowsum P ;  A' = alpha A + P V
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                H, GROUPS, LQ, LK, HEAD_DIM, qk_scale,
                CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # every tl.dot needs all three sizes >= 16 on a GPU (the interpreter would accept less)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUPS  # grouped-query attention: consecutive query heads share a key/value head

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # query row r sits at key position r + offset (queries are the last LQ positions)
    offset = LK - LQ
    lk_full = (LK // BLOCK_N) * BLOCK_N  # end of the key blocks with no ragged tail
    if CAUSAL:
        # keys visible to the tile's last row: j < (pid_m + 1) * BLOCK_M + offset
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + offset, 0), LK)
        # blocks visible to the tile's *first* row need no mask: j <= pid_m * BLOCK_M + offset
        full = tl.maximum(pid_m * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N
        full = tl.minimum(full, lk_full)
    else:
        hi = LK
        full = lk_full

    # phase 1: blocks every row of the tile may see entirely
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               0, full, rows, offs_n, offs_d, LK, HEAD_DIM, offset, qk_scale,
                               False, CAUSAL, BLOCK_N, UPCAST, PRECISION)
    # phase 2: the diagonal blocks and the ragged end, with the mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               full, hi, rows, offs_n, offs_d, LK, HEAD_DIM, offset, qk_scale,
                               True, CAUSAL, BLOCK_N, UPCAST, PRECISION)

    # O = A / l ; a row that saw no key has l = 0 and A = 0: its output is 0
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    # lse (base 2) = m + log2 l ; +inf marks an empty row, so that the backward's 2^(S - lse) is 0
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     H, H_KV, GROUPS, LQ, LK, HEAD_DIM, sm_scale, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "blocks must be at least 16")
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h_kv = (pid_bh % H_KV).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * stride_kb + h_kv * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    offset = LK - LQ
    lo = 0
    if CAUSAL:
        # the first query row that may see key pid_n * BLOCK_N is r = pid_n * BLOCK_N - offset
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M

    for g in range(GROUPS):  # the query heads that share this key/value head
        h = h_kv * GROUPS + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stat_base = (b * H + h) * LQ
        for start_m in range(lo, LQ, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < LQ
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # padded rows get lse = +inf, hence P = 0
            lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
            # P^T = 2^(s K Q^T log2e - lse)   (BLOCK_N, BLOCK_M)
            pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
            if CAUSAL:
                pt = tl.where(cols[:, None] <= rows[None, :] + offset, pt, 0.0)
            # dV += P^T dO
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            # dP^T = V dO^T ;  dS^T = P^T (dP^T - delta)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            # dK += dS^T Q   (times s at the end)
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)

    dk = dk * sm_scale
    # dK and dV are laid out like K and V (made contiguous by the caller)
    out_offsets = (b * H_KV + h_kv) * LK * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   H, GROUPS, LQ, LK, HEAD_DIM, sm_scale, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat_base = pid_bh.to(tl.int64) * LQ
    lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    offset = LK - LQ
    hi = LK
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + offset, 0), LK)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # P = 2^(s Q K^T log2e - lse)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        allowed = col_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
        p = tl.where(allowed, p, 0.0)
        # dP = dO V^T ;  dS = P (dP - delta) ;  dQ += dS K
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------------
# block sizes
# ------------------------------------------------------------------------------------------------


def default_tiles(head_dim: int, dtype: torch.dtype, *, compiled: bool | None = None) -> dict[str, Tiles]:
    """Tiles for the forward, the dK/dV and the dQ kernel, by device, head dim and dtype.

    In the interpreter each block step costs milliseconds whatever its size, so few large steps win.
    On a GPU the tiles must fit in shared memory and registers: the forward uses wide query tiles, the
    dK/dV kernel narrow query tiles against wide key tiles (it holds two key-sized accumulators), the dQ
    kernel the reverse (the shapes of the Triton tutorial's fused attention); fp32 halves the budget.
    ``compiled``: the GPU's tiles (``True``) or the interpreter's (``False``); default: what this process runs.
    """
    if not runs_compiled(compiled):
        return interpreter_tiles()
    if dtype == torch.float32:
        return {"fwd": Tiles(64, 32, 4, 2), "dkdv": Tiles(32, 64, 4, 2), "dq": Tiles(64, 32, 4, 2)}
    return {
        "fwd": Tiles(128, 64, 8 if head_dim > 64 else 4, 3),
        "dkdv": Tiles(32, 128, 4, 4),
        "dq": Tiles(128, 32, 4, 4),
    }


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


# ------------------------------------------------------------------------------------------------
# launchers and autograd
# ------------------------------------------------------------------------------------------------


def flash_forward(q, k, v, *, causal: bool, scale: float, tiles: Tiles):
    """Launch the forward kernel. Returns ``out (B, Hq, Lq, D)`` and ``lse2 (B, Hq, Lq)`` (base-2 lse)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(lq, tiles.block_m), b * hq)
    _fwd_kernel[grid](
        q, k, v, out, lse2, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        hq, hq // hkv, lq, lk, d, scale * LOG2E,
        CAUSAL=causal, **launch_options(tiles, d), **kernel_options(q),
    )
    return out, lse2


def flash_backward(q, k, v, out, lse2, grad_out, *, causal: bool, scale: float, dkdv_tiles: Tiles,
                   dq_tiles: Tiles):
    """Launch the two backward kernels. Returns ``dq, dk, dv`` shaped like ``q, k, v``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grad_out = grad_out.contiguous()
    # delta_i = sum_d dO_id O_id  (the row-wise <dO, O> that appears in the softmax's gradient)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, lk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, d), device=q.device, dtype=v.dtype)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _bwd_dkdv_kernel[(triton.cdiv(lk, dkdv_tiles.block_n), b * hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, *strides,
        hq, hkv, hq // hkv, lq, lk, d, scale, scale * LOG2E,
        CAUSAL=causal, **launch_options(dkdv_tiles, d), **kernel_options(q),
    )
    _bwd_dq_kernel[(triton.cdiv(lq, dq_tiles.block_m), b * hq)](
        q, k, v, grad_out, lse2, delta, dq, *strides,
        hq, hq // hkv, lq, lk, d, scale, scale * LOG2E,
        CAUSAL=causal, **launch_options(dq_tiles, d), **kernel_options(q),
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """``torch.autograd`` glue: the forward saves ``q, k, v, out, lse``; the backward recomputes ``P``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, tiles):
        out, lse2 = flash_forward(q, k, v, causal=causal, scale=scale, tiles=tiles["fwd"])
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.causal, ctx.scale, ctx.tiles = causal, scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse2 = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, out, lse2, grad_out, causal=ctx.causal, scale=ctx.scale,
                                    dkdv_tiles=ctx.tiles["dkdv"], dq_tiles=ctx.tiles["dq"])
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, block_m: int | None = None, block_n: int | None = None):
    r"""Exact attention $\operatorname{softmax}(s\,QK^\top)V$ with the Triton FlashAttention kernel.

    Differentiable (``q``, ``k``, ``v`` all get gradients). Runs compiled on CUDA tensors, and in
    Triton's interpreter on CPU tensors when no GPU is present (slow: use small sizes).

    Args:
        q: ``(B, Hq, Lq, D)``, float16, bfloat16 or float32, ``16 <= D <= 128``.
        k: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq`` (grouped-query attention).
        v: ``(B, Hkv, Lk, D)``.
        causal: bottom-right aligned causal mask (query row ``r`` sees keys ``j <= r + Lk - Lq``).
        scale: default $1/\sqrt{D}$.
        block_m, block_n: query and key tile sizes (powers of two >= 16) for all three kernels;
            default chosen per device, head dim and dtype (:func:`default_tiles`).

    Returns:
        ``out (B, Hq, Lq, D)`` in the dtype of ``q``.
    """
    check_flash_inputs(q, k, v, causal, scale, block_m, block_n)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tiles = with_blocks(default_tiles(d, q.dtype), block_m, block_n)
    return FlashAttentionFunction.apply(q, k, v, causal, scale, tiles)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation targets (see kernels.compile_check)
# ------------------------------------------------------------------------------------------------


def compile_targets(dtype: torch.dtype, head_dim: int, *, causal: bool = True) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` for the three kernels at their default GPU tiles.

    ``signature`` maps every kernel argument to its Triton type string, as ``triton.compile`` wants; the
    tiles are the compiled path's (what a GPU would run), whatever device this runs on.
    """
    tiles = default_tiles(head_dim, dtype, compiled=True)
    targets = []
    for name, kernel, key in (("forward", _fwd_kernel, "fwd"), ("backward dK dV", _bwd_dkdv_kernel, "dkdv"),
                              ("backward dQ", _bwd_dq_kernel, "dq")):
        t = tiles[key]
        options = launch_options(t, head_dim)
        constexprs = dict(CAUSAL=causal, BLOCK_M=options["BLOCK_M"], BLOCK_N=options["BLOCK_N"],
                          BLOCK_D=options["BLOCK_D"], UPCAST=False, PRECISION=precision(dtype))
        targets.append((name, kernel, t, constexprs, kernel_signature(kernel, TRITON_TYPES[dtype], constexprs)))
    return targets
