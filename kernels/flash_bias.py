r"""FlashBias in Triton: a flash kernel whose bias is two thin factors, and the dense-bias kernel it replaces.

Attention with a bias (lesson 50; Wu et al., 2025, "FlashBias: Fast Computation of Attention with Bias",
arXiv 2505.12044):

$$O = \operatorname{softmax}(s\,QK^\top + B)\,V .$$

Both kernels here are lesson 01's flash kernel (:mod:`kernels.flash`) with one more term in the scores of each
$(\text{BLOCK\_M}\times\text{BLOCK\_N})$ tile; they differ only in where that term comes from:

* **low rank** (``LOWRANK=True``): $B = UW^\top$ with $U$ ``(B, H, N, r)`` and $W$ ``(B, H, M, r)``. The query tile
  keeps its $U$ rows in registers next to $Q$, each key step loads $r$ columns of $W$ next to $K$, and the tile's
  bias is one more small matrix product, $S_t = s\,Q_tK_t^\top + U_tW_t^\top$. The kernel reads $(N+M)r$ bias
  numbers in all.
* **dense** (``LOWRANK=False``): each key step loads the $(\text{BLOCK\_M}\times\text{BLOCK\_N})$ tile of $B$. The
  kernel reads all $NM$ bias numbers, which for $d \le 128$ costs more bytes than $Q, K, V$ together: the
  baseline FlashBias is measured against.

The bias is **not** scaled by $s$ (as in the official code, thuml/FlashBias ``flash_bias_triton.py``). Scores are
kept in base 2 as in lesson 01: $S^{(2)} = \log_2 e\,(s\,QK^\top + B)$.

The backward pass recomputes $P = 2^{S^{(2)} - \mathrm{lse}}$ tile by tile. With $\delta_i = \sum_d dO_{id}O_{id}$:

$$dS = P\odot(dO\,V^\top - \delta),\quad dQ = s\,dS\,K,\quad dK = s\,dS^\top Q,\quad dV = P^\top dO,$$
$$dU = dS\,W,\qquad dW = dS^\top U,\qquad dB = dS .$$

The dK/dV kernel owns a key block and also accumulates $dW$; the dQ kernel owns a query block and also
accumulates $dU$ and, for a dense bias that requires a gradient, writes each tile of $dS$ to $dB$ (an
$N\times M$ float32 write: the dense bias is expensive backward too). No atomics.

Conventions as :mod:`kernels.flash` (plain pointer arithmetic, fp32 accumulators, every ``tl.dot`` dimension
$\ge 16$: the rank is zero-padded to ``BLOCK_R`` $\ge 16$ in registers, bottom-right causal alignment, a row with
no visible key gives zeros), except that ``q``, ``k``, ``v`` have the same number of heads (the factors are per
query head). The factors and the dense bias may broadcast over batch and heads (size 1), as in the official
code; their gradients are summed back to the size given.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import check_factors, check_tensor
from ._runtime import check_device
from .common import (
    LOG2E,
    TRITON_TYPES,
    Tiles,
    block_dim,
    check_flash_inputs,
    interpreter_tiles,
    kernel_options,
    kernel_signature,
    launch_options,
    precision,
    runs_compiled,
    with_blocks,
)

MAX_RANK = 64


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _bias_tile(u, W, B, stride_wn, stride_wr, stride_bm, stride_bn, rows, cols, row_ok, col_ok, offs_r, RANK,
               LOWRANK: tl.constexpr, UPCAST: tl.constexpr, BIAS_PRECISION: tl.constexpr):
    """The tile's bias times log2(e), ``(BLOCK_M, BLOCK_N)`` fp32: $U_tW_t^\\top$, or the tile of $B$."""
    if LOWRANK:
        # W^T tile (BLOCK_R, BLOCK_N): r columns of W next to the keys
        wt = tl.load(W + cols[None, :] * stride_wn + offs_r[:, None] * stride_wr,
                     mask=col_ok[None, :] & (offs_r < RANK)[:, None], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
        # B_t = U_t W_t^T
        bias = tl.dot(u, wt, input_precision=BIAS_PRECISION)
    else:
        bias = tl.load(B + rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return bias * 1.4426950408889634


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, u, k_base, v_base, w_base, b_base, stride_kn, stride_vn, stride_wn, stride_wr,
               stride_bm, stride_bn, start, stop, rows, row_ok, offs_n, offs_d, offs_r, LK, HEAD_DIM, RANK, offset,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOWRANK: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BIAS_PRECISION: tl.constexpr):
    """Fold the key blocks ``start, start + BLOCK_N, ... < stop`` into the online-softmax state."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                     other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # S = log2(e) (s Q K^T + B)   (qk_scale = s log2 e)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s += _bias_tile(u, w_base, b_base, stride_wn, stride_wr, stride_bm, stride_bn, rows, cols, row_ok, col_ok,
                        offs_r, RANK, LOWRANK, UPCAST, BIAS_PRECISION)
        if MASKED:
            allowed = col_ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
            s = tl.where(allowed, s, float("-inf"))
        # m' = max(m, rowmax S); a dense bias may hold -inf, so a row can stay at -inf: shift it by 0 then
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # alpha = 2^(m - m'), P = 2^(S - m'); l' = alpha l + rowsum P; A' = alpha A + P V
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, U, W, BIAS, O, LSE,
                stride_ub, stride_uh, stride_un, stride_ur,
                stride_wb, stride_wh, stride_wn, stride_wr,
                stride_bb, stride_bh, stride_bm, stride_bn,
                H, LQ, LK, HEAD_DIM, RANK, qk_scale,
                CAUSAL: tl.constexpr, LOWRANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BIAS_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_R >= 16,
                     "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < LQ
    d_ok = offs_d < HEAD_DIM
    # q, k, v, o are contiguous (B, H, L, D)
    q = tl.load(Q + bh * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if LOWRANK:
        # U tile (BLOCK_M, BLOCK_R), kept in registers next to Q
        u = tl.load(U + b * stride_ub + h * stride_uh + rows[:, None] * stride_un + offs_r[None, :] * stride_ur,
                    mask=row_ok[:, None] & (offs_r < RANK)[None, :], other=0.0)
        if UPCAST:
            u = u.to(tl.float32)
    k_base = K + bh * LK * HEAD_DIM
    v_base = V + bh * LK * HEAD_DIM
    w_base = W + b * stride_wb + h * stride_wh
    b_base = BIAS + b * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # query row r sits at key position r + offset; the same two phases as kernels.flash
    offset = LK - LQ
    lk_full = (LK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + offset, 0), LK)
        full = tl.maximum(pid_m * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N
        full = tl.minimum(full, lk_full)
    else:
        hi = LK
        full = lk_full
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, u, k_base, v_base, w_base, b_base, HEAD_DIM, HEAD_DIM,
                               stride_wn, stride_wr, stride_bm, stride_bn, 0, full, rows, row_ok, offs_n, offs_d,
                               offs_r, LK, HEAD_DIM, RANK, offset, qk_scale,
                               False, CAUSAL, LOWRANK, BLOCK_N, UPCAST, PRECISION, BIAS_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, u, k_base, v_base, w_base, b_base, HEAD_DIM, HEAD_DIM,
                               stride_wn, stride_wr, stride_bm, stride_bn, full, hi, rows, row_ok, offs_n, offs_d,
                               offs_r, LK, HEAD_DIM, RANK, offset, qk_scale,
                               True, CAUSAL, LOWRANK, BLOCK_N, UPCAST, PRECISION, BIAS_PRECISION)

    # O = A / l (zero on an empty row); lse (base 2) = m + log2 l, +inf on an empty row
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + bh * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * LQ + rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, U, W, BIAS, DO, LSE, DELTA, DK, DV, DW,
                     stride_ub, stride_uh, stride_un, stride_ur,
                     stride_wb, stride_wh, stride_wn, stride_wr,
                     stride_bb, stride_bh, stride_bm, stride_bn,
                     H, LQ, LK, HEAD_DIM, RANK, sm_scale, qk_scale,
                     CAUSAL: tl.constexpr, LOWRANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BIAS_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_R >= 16,
                     "blocks must be at least 16")
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    col_ok = cols < LK
    d_ok = offs_d < HEAD_DIM
    r_ok = offs_r < RANK
    kv_mask = col_ok[:, None] & d_ok[None, :]
    kv_offsets = bh * LK * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    if LOWRANK:
        w = tl.load(W + b * stride_wb + h * stride_wh + cols[:, None] * stride_wn + offs_r[None, :] * stride_wr,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)

    offset = LK - LQ
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    u_base = U + b * stride_ub + h * stride_uh
    b_base = BIAS + b * stride_bb + h * stride_bh
    for start_m in range(lo, LQ, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < LQ
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_offsets = bh * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
        do = tl.load(DO + q_offsets, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
        # S^T = log2(e) (s K Q^T + B^T)   (BLOCK_N, BLOCK_M)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if LOWRANK:
            u = tl.load(u_base + rows[:, None] * stride_un + offs_r[None, :] * stride_ur,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            st += tl.dot(w, tl.trans(u), input_precision=BIAS_PRECISION) * 1.4426950408889634
        else:
            bias_t = tl.load(b_base + rows[None, :] * stride_bm + cols[:, None] * stride_bn,
                             mask=row_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
            st += bias_t * 1.4426950408889634
        # P^T = 2^(S^T - lse)  (padded rows have lse = +inf, hence P = 0)
        pt = tl.exp2(st - lse[None, :])
        if CAUSAL:
            pt = tl.where(cols[:, None] <= rows[None, :] + offset, pt, 0.0)
        # dV += P^T dO ;  dS^T = P^T (V dO^T - delta)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        # dK += dS^T Q (times s at the end) ;  dW += dS^T U
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
        if LOWRANK:
            dw = tl.dot(dst.to(u.dtype), u, dw, input_precision=BIAS_PRECISION)

    tl.store(DK + kv_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if LOWRANK:  # dW is a float32 (B, H, LK, RANK) buffer
        tl.store(DW + bh * LK * RANK + cols[:, None] * RANK + offs_r[None, :], dw,
                 mask=col_ok[:, None] & r_ok[None, :])


@triton.jit
def _bwd_dq_kernel(Q, K, V, U, W, BIAS, DO, LSE, DELTA, DQ, DU, DB,
                   stride_ub, stride_uh, stride_un, stride_ur,
                   stride_wb, stride_wh, stride_wn, stride_wr,
                   stride_bb, stride_bh, stride_bm, stride_bn,
                   H, LQ, LK, HEAD_DIM, RANK, sm_scale, qk_scale,
                   CAUSAL: tl.constexpr, LOWRANK: tl.constexpr, STORE_DB: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BIAS_PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_R >= 16,
                     "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = rows < LQ
    d_ok = offs_d < HEAD_DIM
    r_ok = offs_r < RANK
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_offsets = bh * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offsets, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if LOWRANK:
        u = tl.load(U + b * stride_ub + h * stride_uh + rows[:, None] * stride_un + offs_r[None, :] * stride_ur,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            u = u.to(tl.float32)
    lse = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
    k_base = K + bh * LK * HEAD_DIM
    v_base = V + bh * LK * HEAD_DIM
    w_base = W + b * stride_wb + h * stride_wh
    b_base = BIAS + b * stride_bb + h * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    du = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)

    offset = LK - LQ
    hi = LK
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + offset, 0), LK)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                     other=0.0)
        vt = tl.load(v_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # P = 2^(log2(e) (s Q K^T + B) - lse)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s += _bias_tile(u, w_base, b_base, stride_wn, stride_wr, stride_bm, stride_bn, rows, cols, row_ok, col_ok,
                        offs_r, RANK, LOWRANK, UPCAST, BIAS_PRECISION)
        allowed = col_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        # dP = dO V^T ;  dS = P (dP - delta) ;  dQ += dS K
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
        if LOWRANK:
            # dU += dS W
            wt = tl.load(w_base + cols[None, :] * stride_wn + offs_r[:, None] * stride_wr,
                         mask=col_ok[None, :] & r_ok[:, None], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            du = tl.dot(ds.to(wt.dtype), tl.trans(wt), du, input_precision=BIAS_PRECISION)
        if STORE_DB:
            # dB = dS, a float32 (B, H, LQ, LK) buffer
            tl.store(DB + bh * LQ * LK + rows[:, None] * LK + cols[None, :], ds,
                     mask=row_ok[:, None] & col_ok[None, :])

    tl.store(DQ + q_offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
    if LOWRANK:
        tl.store(DU + bh * LQ * RANK + rows[:, None] * RANK + offs_r[None, :], du,
                 mask=row_ok[:, None] & r_ok[None, :])


# ------------------------------------------------------------------------------------------------
# tiles, launchers and autograd
# ------------------------------------------------------------------------------------------------


def default_tiles(head_dim: int, dtype: torch.dtype, *, compiled: bool | None = None) -> dict[str, Tiles]:
    """Tiles for the forward, dK/dV and dQ kernels (both bias kinds).

    Interpreted: few large steps. On a GPU the shapes of :func:`kernels.flash.default_tiles`, a little
    narrower because each kernel holds the factor tiles too. Not tuned on a card yet. ``compiled``: as in
    :func:`kernels.flash.default_tiles`.
    """
    if not runs_compiled(compiled):
        return interpreter_tiles()
    if dtype == torch.float32:
        return {"fwd": Tiles(64, 32, 4, 2), "dkdv": Tiles(32, 64, 4, 2), "dq": Tiles(64, 32, 4, 2)}
    return {
        "fwd": Tiles(128, 64, 8 if head_dim > 64 else 4, 3),
        "dkdv": Tiles(32, 128, 4, 3),
        "dq": Tiles(64, 64, 4, 3),
    }


def bias_precision(q_dtype: torch.dtype, factor_dtype: torch.dtype) -> str:
    """Precision of the $UW^\\top$ products: exact fp32 for fp32 inputs; 3xTF32 (fp32 accuracy on tensor cores)
    for float32 factors next to 16-bit q, k, v (ALiBi's positions need more than TF32's 11 bits); else TF32."""
    if q_dtype == torch.float32:
        return "ieee"
    return "tf32x3" if factor_dtype == torch.float32 else "tf32"


def _expanded(x, shape) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``x`` made contiguous and broadcast to ``shape`` (stride 0 where it had size 1), and its strides."""
    x = x.contiguous().expand(shape)
    return x, tuple(x.stride())


def _operands(q, k, u, w, bias):
    """The bias operands of a launch: ``(U, W, BIAS, strides..., rank, lowrank)``; unused ones point at ``q``."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if bias is None:
        rank = u.shape[-1]
        u, su = _expanded(u, (b, h, lq, rank))
        w, sw = _expanded(w, (b, h, lk, rank))
        return u, w, q, (*su, *sw, 0, 0, 0, 0), rank, True
    bias, sb = _expanded(bias, (b, h, lq, lk))
    return q, q, bias, (0,) * 8 + sb, 1, False


def bias_forward(q, k, v, u, w, bias, *, causal: bool, scale: float, tiles: Tiles):
    """Launch the forward kernel (``bias is None``: low rank ``u, w``; else the dense ``bias``).

    Returns ``out (B, H, Lq, D)`` and ``lse2 (B, H, Lq)`` (base-2 log-sum-exp, +inf on empty rows)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    u_, w_, bias_, strides, rank, lowrank = _operands(q, k, u, w, bias)
    out = torch.empty_like(q)
    lse2 = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(lq, tiles.block_m), b * h)](
        q, k, v, u_, w_, bias_, out, lse2, *strides, h, lq, lk, d, rank, scale * LOG2E,
        CAUSAL=causal, LOWRANK=lowrank, BIAS_PRECISION=bias_precision(q.dtype, u_.dtype if lowrank else q.dtype),
        **launch_options(tiles, d, R=rank), **kernel_options(q))
    return out, lse2


def bias_backward(q, k, v, u, w, bias, out, lse2, grad_out, *, causal: bool, scale: float, want_bias_grad: bool,
                  dkdv_tiles: Tiles, dq_tiles: Tiles):
    """Launch the two backward kernels. Returns ``dq, dk, dv`` and ``(du, dw)`` (float32, full
    ``(B, H, L, r)``) for low rank, or ``dbias`` (float32 ``(B, H, Lq, Lk)`` or ``None``) for a dense bias."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    grad_out = grad_out.contiguous()
    u_, w_, bias_, strides, rank, lowrank = _operands(q, k, u, w, bias)
    # delta_i = sum_d dO_id O_id
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fp32 = dict(device=q.device, dtype=torch.float32)
    du = torch.empty((b, h, lq, rank), **fp32) if lowrank else lse2
    dw = torch.empty((b, h, lk, rank), **fp32) if lowrank else lse2
    store_db = not lowrank and want_bias_grad
    db = torch.zeros((b, h, lq, lk), **fp32) if store_db else lse2
    sizes = (h, lq, lk, d, rank, scale, scale * LOG2E)
    options = dict(CAUSAL=causal, LOWRANK=lowrank, **kernel_options(q),
                   BIAS_PRECISION=bias_precision(q.dtype, u_.dtype if lowrank else q.dtype))
    _bwd_dkdv_kernel[(triton.cdiv(lk, dkdv_tiles.block_n), b * h)](
        q, k, v, u_, w_, bias_, grad_out, lse2, delta, dk, dv, dw, *strides, *sizes,
        **options, **launch_options(dkdv_tiles, d, R=rank))
    _bwd_dq_kernel[(triton.cdiv(lq, dq_tiles.block_m), b * h)](
        q, k, v, u_, w_, bias_, grad_out, lse2, delta, dq, du, db, *strides, *sizes, STORE_DB=store_db,
        **options, **launch_options(dq_tiles, d, R=rank))
    if lowrank:
        return dq, dk, dv, (du, dw)
    return dq, dk, dv, db if store_db else None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a full-size gradient back over the dims ``like`` broadcast (size 1), in ``like``'s dtype."""
    return grad.sum_to_size(like.shape).to(like.dtype)


class FlashBiasFunction(torch.autograd.Function):
    """Autograd for the low-rank kernel: gradients for ``q, k, v, u, w``."""

    @staticmethod
    def forward(ctx, q, k, v, u, w, causal, scale, tiles):
        out, lse2 = bias_forward(q, k, v, u, w, None, causal=causal, scale=scale, tiles=tiles["fwd"])
        ctx.save_for_backward(q, k, v, u, w, out, lse2)
        ctx.causal, ctx.scale, ctx.tiles = causal, scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, u, w, out, lse2 = ctx.saved_tensors
        dq, dk, dv, (du, dw) = bias_backward(q, k, v, u, w, None, out, lse2, grad_out, causal=ctx.causal,
                                             scale=ctx.scale, want_bias_grad=False,
                                             dkdv_tiles=ctx.tiles["dkdv"], dq_tiles=ctx.tiles["dq"])
        return dq, dk, dv, _sum_to(du, u), _sum_to(dw, w), None, None, None


class DenseBiasFlashFunction(torch.autograd.Function):
    """Autograd for the dense-bias kernel: gradients for ``q, k, v`` and, if it requires one, ``bias``."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal, scale, tiles):
        out, lse2 = bias_forward(q, k, v, None, None, bias, causal=causal, scale=scale, tiles=tiles["fwd"])
        ctx.save_for_backward(q, k, v, bias, out, lse2)
        ctx.causal, ctx.scale, ctx.tiles = causal, scale, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse2 = ctx.saved_tensors
        dq, dk, dv, db = bias_backward(q, k, v, None, None, bias, out, lse2, grad_out, causal=ctx.causal,
                                       scale=ctx.scale, want_bias_grad=ctx.needs_input_grad[3],
                                       dkdv_tiles=ctx.tiles["dkdv"], dq_tiles=ctx.tiles["dq"])
        return dq, dk, dv, None if db is None else _sum_to(db, bias), None, None, None


# ------------------------------------------------------------------------------------------------
# checks and public functions
# ------------------------------------------------------------------------------------------------


def _check_common(q, k, v, causal, scale, block_m, block_n) -> None:
    check_flash_inputs(q, k, v, causal, scale, block_m, block_n)  # lesson 01's kernel takes the same inputs
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: expected {q.shape[1]} heads (as q; the bias kernels take no grouped key/value heads), "
                         f"got {k.shape[1]}")


def check_flash_bias_inputs(q, k, v, u, w, causal, scale, block_m, block_n) -> None:
    """Every check the low-rank kernel needs, done before any launch."""
    _check_common(q, k, v, causal, scale, block_m, block_n)
    rank = check_factors(q, k, u, w)
    if u.dtype != w.dtype:
        raise TypeError(f"u, w: expected one dtype, got {u.dtype} and {w.dtype}")
    if u.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"u: expected float32 or {q.dtype} (as q), got {u.dtype}")
    if rank > MAX_RANK:
        raise ValueError(f"u: the kernel supports a rank up to {MAX_RANK}, got {rank}; use the dense-bias kernel")


def check_dense_bias_inputs(q, k, v, bias, causal, scale, block_m, block_n) -> None:
    """Every check the dense-bias kernel needs, done before any launch."""
    _check_common(q, k, v, causal, scale, block_m, block_n)
    check_tensor("bias", bias, ndim=4)
    b, h, lq = q.shape[:3]
    lk = k.shape[2]
    if bias.shape[2:] != (lq, lk) or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h):
        raise ValueError(f"bias: expected shape (1 or {b}, 1 or {h}, {lq}, {lk}) (batch, heads, q_len, k_len), "
                         f"got {tuple(bias.shape)}")
    check_device("bias", bias)


def flash_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, w: torch.Tensor, *,
                         causal: bool = False, scale: float | None = None, block_m: int | None = None,
                         block_n: int | None = None) -> torch.Tensor:
    r"""FlashBias: $O = \operatorname{softmax}(s\,QK^\top + UW^\top)\,V$ with the factors inside the tile loop.

    Differentiable in ``q, k, v, u, w``. Compiled on CUDA tensors; Triton's interpreter on CPU tensors when no
    GPU is present (slow: small sizes).

    Args:
        q: ``(B, H, Lq, D)``, float16, bfloat16 or float32, ``16 <= D <= 128``.
        k, v: ``(B, H, Lk, D)`` (as many heads as ``q``).
        u: query factor ``(B|1, H|1, Lq, r)``, ``r <= 64``, float32 or ``q``'s dtype.
        w: key factor ``(B|1, H|1, Lk, r)``, ``u``'s dtype. The bias $UW^\top$ is not scaled.
        causal: bottom-right aligned causal mask.
        scale: $s$, default $1/\sqrt{D}$.
        block_m, block_n: query and key tiles (powers of two >= 16) for all three kernels.

    Returns:
        ``out (B, H, Lq, D)`` in ``q``'s dtype.
    """
    check_flash_bias_inputs(q, k, v, u, w, causal, scale, block_m, block_n)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return FlashBiasFunction.apply(q, k, v, u, w, causal, scale, with_blocks(default_tiles(d, q.dtype), block_m, block_n))


def dense_bias_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                               causal: bool = False, scale: float | None = None, block_m: int | None = None,
                               block_n: int | None = None) -> torch.Tensor:
    r"""The baseline: $O = \operatorname{softmax}(s\,QK^\top + B)\,V$, the bias read tile by tile from memory.

    Differentiable in ``q, k, v`` and in ``bias`` when it requires a gradient (then the backward writes a
    float32 $N\times M$ gradient per batch element and head, summed over broadcast dims).

    Args:
        q, k, v: as :func:`flash_bias_attention`.
        bias: ``(B|1, H|1, Lq, Lk)``, any float dtype (read and upcast to float32 tile by tile); ``-inf``
            entries mask.
        causal, scale, block_m, block_n: as :func:`flash_bias_attention`.

    Returns:
        ``out (B, H, Lq, D)`` in ``q``'s dtype.
    """
    check_dense_bias_inputs(q, k, v, bias, causal, scale, block_m, block_n)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return DenseBiasFlashFunction.apply(q, k, v, bias, causal, scale, with_blocks(default_tiles(d, q.dtype), block_m, block_n))


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation targets (see kernels.compile_check)
# ------------------------------------------------------------------------------------------------


def compile_targets(dtype: torch.dtype, head_dim: int, *, rank: int = 8, causal: bool = True,
                    factor_dtype: torch.dtype | None = None) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` for the six kernels (low rank and dense; forward, dK/dV, dQ)
    at their default tiles, for 16-bit or float32 ``dtype``; the factors ``U, W`` in ``factor_dtype`` (default
    ``dtype``; float32 factors next to 16-bit inputs use 3xTF32 products)."""
    if dtype not in TRITON_TYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    data = f"*{TRITON_TYPES[dtype]}"
    factor_dtype = dtype if factor_dtype is None else factor_dtype
    if factor_dtype not in (dtype, torch.float32):
        raise TypeError(f"factor_dtype: expected float32 or {dtype}, got {factor_dtype}")
    tiles = default_tiles(head_dim, dtype, compiled=True)
    targets = []
    for lowrank in (True, False):
        for part, kernel in (("forward", _fwd_kernel), ("bwd dK dV", _bwd_dkdv_kernel), ("bwd dQ", _bwd_dq_kernel)):
            part_tiles = tiles[{"forward": "fwd", "bwd dK dV": "dkdv", "bwd dQ": "dq"}[part]]
            constexprs = dict(CAUSAL=causal, LOWRANK=lowrank, BLOCK_M=part_tiles.block_m,
                              BLOCK_N=part_tiles.block_n, BLOCK_D=block_dim(head_dim), BLOCK_R=block_dim(rank),
                              UPCAST=False, PRECISION=precision(dtype),
                              BIAS_PRECISION=bias_precision(dtype, factor_dtype if lowrank else dtype))
            if kernel is _bwd_dq_kernel:
                constexprs["STORE_DB"] = not lowrank
            factors = f"*{TRITON_TYPES[factor_dtype]}" if lowrank else data
            # the gradients of U, W and the bias accumulate in float32
            types = {"U": factors, "W": factors, "BIAS": data, "DU": "*fp32", "DW": "*fp32", "DB": "*fp32"}
            signature = kernel_signature(kernel, TRITON_TYPES[dtype], constexprs, types)
            targets.append((f"{'lowrank' if lowrank else 'dense'} {part}", kernel, part_tiles, constexprs, signature))
    return targets
