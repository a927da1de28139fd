r"""Differential attention in Triton: both softmax maps in one pass over the keys, forward and backward.

Differential attention (Ye et al., 2024, "Differential Transformer", arXiv 2410.05258) and its grouped
form (Lim et al., 2025, "Grouped Differential Attention", arXiv 2510.06949) compute, per signal head,

$$O = \underbrace{\operatorname{softmax}(s\,Q_1K_1^\top)V}_{O_1} - \lambda\,
      \underbrace{\operatorname{softmax}(s\,Q_2K_2^\top)V}_{O_2}.$$

Two calls of a flash kernel (lesson 01) would read $V$ twice. The forward kernel here keeps **two**
online-softmax states in registers, $(m_1, \ell_1, A_1)$ and $(m_2, \ell_2, A_2)$, and updates both from
the same key block: each loaded $V$ tile is used by both maps. At the end
$O = A_1/\ell_1 - \lambda A_2/\ell_2$. In GDA a noise head serves $r$ signal heads; each program owns
one signal head and recomputes its noise head's map (the simple choice: no program waits for another).

The backward pass has its own two kernels, the flash backward of lesson 01 run for both maps at once.
With $dO_1 = dO$, $dO_2 = -\lambda\,dO$, $\delta_1 = \operatorname{rowsum}(dO \odot O_1)$,
$\delta_2 = \operatorname{rowsum}(dO \odot O_2)$ and $dP = dO\,V^\top$ (the same for both maps):

$$dS_1 = P_1 \odot (dP - \delta_1),\qquad dS_2 = -\lambda\,P_2 \odot (dP - \delta_2),\qquad
  dV = (P_1 - \lambda P_2)^\top dO,$$
$$dQ_i = s\,dS_i K_i,\qquad dK_i = s\,dS_i^\top Q_i,\qquad
  \frac{\partial L}{\partial\lambda} = -\sum dO \odot O_2 .$$

Why not reuse lesson 01's backward kernels once per map? They assume values as wide as the queries
($V$ is $2d$ wide here), would load $V$ and $dO$ twice, and know nothing of noise heads shared by
several signal heads. Sharing $dP$ and the $V$, $dO$ tiles between the maps is the point of the fused
kernel, backward as forward. A noise head's $dQ_2$ is the sum over the signal heads it serves: the dQ
kernel writes one partial per signal head and the sum is taken outside (no atomics).

Conventions as :mod:`kernels.flash`: ``(batch, heads, seq, head_dim)``, plain pointer arithmetic with
masks, fp32 accumulators, every ``tl.dot`` dimension at least 16, causal masks aligned bottom-right, a
row with no visible key gives zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import check_differential_inputs, check_scale
from ._runtime import check_device
from .common import (
    LOG2E,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    TRITON_TYPES,
    Tiles,
    check_blocks,
    check_causal,
    check_kernel_dtype,
    interpreter_tiles,
    kernel_options,
    kernel_signature,
    launch_options,
    precision,
    runs_compiled,
    with_blocks,
)

MAX_VALUE_DIM = 256


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _online_update(acc, l_i, m_i, s, v, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of one map: fold the scores ``s`` (base 2) and the values ``v`` in."""
    # m' = max(m, rowmax S)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row that has seen only masked keys keeps m = -inf; shift it by 0 to avoid -inf - -inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    # alpha = 2^(m - m'), P = 2^(S - m'); l' = alpha l + rowsum P; A' = alpha A + P V
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _diff_fwd_inner(acc1, l1, m1, acc2, l2, m2, q1, q2, k1_base, k2_base, v_base,
                    stride_k1n, stride_k1d, stride_k2n, stride_k2d, stride_vn, stride_vd,
                    start, stop, rows, offs_n, offs_d, offs_dv, LK, HEAD_DIM, V_DIM, offset, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold the key blocks ``start, start + BLOCK_N, ... < stop`` into both maps' states."""
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt_mask = col_ok[None, :] & d_ok[:, None]
        k1t = tl.load(k1_base + cols[None, :] * stride_k1n + offs_d[:, None] * stride_k1d, mask=kt_mask, other=0.0)
        k2t = tl.load(k2_base + cols[None, :] * stride_k2n + offs_d[:, None] * stride_k2d, mask=kt_mask, other=0.0)
        # one V tile (BLOCK_N, BLOCK_DV), used by both maps
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            k1t = k1t.to(tl.float32)
            k2t = k2t.to(tl.float32)
            v = v.to(tl.float32)
        # S_i = s Q_i K_i^T, in base 2 (qk_scale = s log2 e)
        s1 = tl.dot(q1, k1t, input_precision=PRECISION) * qk_scale
        s2 = tl.dot(q2, k2t, input_precision=PRECISION) * qk_scale
        if MASKED:
            allowed = col_ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
            s1 = tl.where(allowed, s1, float("-inf"))
            s2 = tl.where(allowed, s2, float("-inf"))
        acc1, l1, m1 = _online_update(acc1, l1, m1, s1, v, MASKED, PRECISION)
        acc2, l2, m2 = _online_update(acc2, l2, m2, s2, v, MASKED, PRECISION)
    return acc1, l1, m1, acc2, l2, m2


@triton.jit
def _diff_fwd_kernel(Q1, K1, Q2, K2, V, LAM, O, O2, LSE1, LSE2,
                     stride_q1b, stride_q1h, stride_q1m, stride_q1d,
                     stride_k1b, stride_k1h, stride_k1n, stride_k1d,
                     stride_q2b, stride_q2h, stride_q2m, stride_q2d,
                     stride_k2b, stride_k2h, stride_k2n, stride_k2d,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     H1, RATIO, GROUPS, LQ, LK, HEAD_DIM, V_DIM, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, STORE_AUX: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16,
                     "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H1).to(tl.int64)
    h = (pid_bh % H1).to(tl.int64)
    h_noise = h // RATIO  # GDA: noise head h // r serves signal head h
    h_kv = h // GROUPS  # grouped-query attention over the key/value heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < LQ
    q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q1 = tl.load(Q1 + b * stride_q1b + h * stride_q1h + rows[:, None] * stride_q1m + offs_d[None, :] * stride_q1d,
                 mask=q_mask, other=0.0)
    q2 = tl.load(Q2 + b * stride_q2b + h_noise * stride_q2h + rows[:, None] * stride_q2m
                 + offs_d[None, :] * stride_q2d, mask=q_mask, other=0.0)
    if UPCAST:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
    k1_base = K1 + b * stride_k1b + h_kv * stride_k1h
    k2_base = K2 + b * stride_k2b + h_kv * stride_k2h
    v_base = V + b * stride_vb + h_kv * stride_vh

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

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
    acc1, l1, m1, acc2, l2, m2 = _diff_fwd_inner(
        acc1, l1, m1, acc2, l2, m2, q1, q2, k1_base, k2_base, v_base,
        stride_k1n, stride_k1d, stride_k2n, stride_k2d, stride_vn, stride_vd,
        0, full, rows, offs_n, offs_d, offs_dv, LK, HEAD_DIM, V_DIM, offset, qk_scale,
        False, CAUSAL, BLOCK_N, UPCAST, PRECISION)
    acc1, l1, m1, acc2, l2, m2 = _diff_fwd_inner(
        acc1, l1, m1, acc2, l2, m2, q1, q2, k1_base, k2_base, v_base,
        stride_k1n, stride_k1d, stride_k2n, stride_k2d, stride_vn, stride_vd,
        full, hi, rows, offs_n, offs_d, offs_dv, LK, HEAD_DIM, V_DIM, offset, qk_scale,
        True, CAUSAL, BLOCK_N, UPCAST, PRECISION)

    # O_i = A_i / l_i (zero on a row that saw no key; both maps see the same keys)
    empty = l1 == 0.0
    o1 = acc1 / tl.where(empty, 1.0, l1)[:, None]
    o2 = acc2 / tl.where(empty, 1.0, l2)[:, None]
    lam = tl.load(LAM)
    # O = O_1 - lambda O_2
    out_offsets = pid_bh.to(tl.int64) * LQ * V_DIM + rows[:, None] * V_DIM + offs_dv[None, :]
    out_mask = row_ok[:, None] & (offs_dv < V_DIM)[None, :]
    tl.store(O + out_offsets, (o1 - lam * o2).to(O.dtype.element_ty), mask=out_mask)
    if STORE_AUX:  # what the backward needs: O_2 and both log-sum-exps (base 2; +inf on an empty row)
        tl.store(O2 + out_offsets, o2, mask=out_mask)
        lse1 = tl.where(empty, float("inf"), m1 + tl.log2(tl.where(empty, 1.0, l1)))
        lse2 = tl.where(empty, float("inf"), m2 + tl.log2(tl.where(empty, 1.0, l2)))
        tl.store(LSE1 + pid_bh.to(tl.int64) * LQ + rows, lse1, mask=row_ok)
        tl.store(LSE2 + pid_bh.to(tl.int64) * LQ + rows, lse2, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# backward (inputs made contiguous by the launcher: q1 (B, H1, LQ, D), q2 (B, H2, LQ, D),
# k1, k2 (B, HKV, LK, D), v (B, HKV, LK, DV), dO (B, H1, LQ, DV))
# ------------------------------------------------------------------------------------------------


@triton.jit
def _diff_bwd_dkdv_kernel(Q1, K1, Q2, K2, V, DO, LAM, LSE1, LSE2, DELTA1, DELTA2, DK1, DK2, DV,
                          H1, H2, HKV, RATIO, GROUPS, LQ, LK, HEAD_DIM, V_DIM, sm_scale, qk_scale,
                          CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16,
                     "blocks must be at least 16")
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h_kv = (pid_bh % HKV).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < LK
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    k_mask = col_ok[:, None] & d_ok[None, :]
    v_mask = col_ok[:, None] & dv_ok[None, :]
    k_offsets = pid_bh.to(tl.int64) * LK * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    v_offsets = pid_bh.to(tl.int64) * LK * V_DIM + cols[:, None] * V_DIM + offs_dv[None, :]
    k1 = tl.load(K1 + k_offsets, mask=k_mask, other=0.0)
    k2 = tl.load(K2 + k_offsets, mask=k_mask, other=0.0)
    v = tl.load(V + v_offsets, mask=v_mask, other=0.0)
    if UPCAST:
        k1 = k1.to(tl.float32)
        k2 = k2.to(tl.float32)
        v = v.to(tl.float32)
    lam = tl.load(LAM)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    offset = LK - LQ
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M

    for g in range(GROUPS):  # the signal heads that read this key/value head
        h = h_kv * GROUPS + g
        h_noise = h // RATIO
        q1_base = Q1 + (b * H1 + h) * LQ * HEAD_DIM
        q2_base = Q2 + (b * H2 + h_noise) * LQ * HEAD_DIM
        do_base = DO + (b * H1 + h) * LQ * V_DIM
        stat_base = (b * H1 + h) * LQ
        for start_m in range(lo, LQ, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < LQ
            q_mask = row_ok[:, None] & d_ok[None, :]
            q1 = tl.load(q1_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
            q2 = tl.load(q2_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * V_DIM + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            if UPCAST:
                q1 = q1.to(tl.float32)
                q2 = q2.to(tl.float32)
                do = do.to(tl.float32)
            lse1 = tl.load(LSE1 + stat_base + rows, mask=row_ok, other=float("inf"))
            lse2 = tl.load(LSE2 + stat_base + rows, mask=row_ok, other=float("inf"))
            delta1 = tl.load(DELTA1 + stat_base + rows, mask=row_ok, other=0.0)
            delta2 = tl.load(DELTA2 + stat_base + rows, mask=row_ok, other=0.0)
            # P_i^T = 2^(s K_i Q_i^T log2e - lse_i)   (BLOCK_N, BLOCK_M)
            p1t = tl.exp2(tl.dot(k1, tl.trans(q1), input_precision=PRECISION) * qk_scale - lse1[None, :])
            p2t = tl.exp2(tl.dot(k2, tl.trans(q2), input_precision=PRECISION) * qk_scale - lse2[None, :])
            if CAUSAL:
                visible = cols[:, None] <= rows[None, :] + offset
                p1t = tl.where(visible, p1t, 0.0)
                p2t = tl.where(visible, p2t, 0.0)
            # dV += (P_1 - lambda P_2)^T dO
            dv = tl.dot((p1t - lam * p2t).to(do.dtype), do, dv, input_precision=PRECISION)
            # dP^T = V dO^T, shared by both maps
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            # dS_1^T = P_1^T (dP^T - delta_1);  dS_2^T = -lambda P_2^T (dP^T - delta_2)
            ds1t = p1t * (dpt - delta1[None, :])
            ds2t = -lam * p2t * (dpt - delta2[None, :])
            dk1 = tl.dot(ds1t.to(q1.dtype), q1, dk1, input_precision=PRECISION)
            dk2 = tl.dot(ds2t.to(q2.dtype), q2, dk2, input_precision=PRECISION)

    tl.store(DK1 + k_offsets, (dk1 * sm_scale).to(DK1.dtype.element_ty), mask=k_mask)
    tl.store(DK2 + k_offsets, (dk2 * sm_scale).to(DK2.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_offsets, dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _diff_bwd_dq_kernel(Q1, K1, Q2, K2, V, DO, LAM, LSE1, LSE2, DELTA1, DELTA2, DQ1, DQ2,
                        H1, H2, HKV, RATIO, GROUPS, LQ, LK, HEAD_DIM, V_DIM, sm_scale, qk_scale,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16 and BLOCK_DV >= 16,
                     "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H1).to(tl.int64)
    h = (pid_bh % H1).to(tl.int64)
    h_noise = h // RATIO
    h_kv = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < LQ
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_offsets = rows[:, None] * HEAD_DIM + offs_d[None, :]
    q1 = tl.load(Q1 + (b * H1 + h) * LQ * HEAD_DIM + q_offsets, mask=q_mask, other=0.0)
    q2 = tl.load(Q2 + (b * H2 + h_noise) * LQ * HEAD_DIM + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(DO + pid_bh.to(tl.int64) * LQ * V_DIM + rows[:, None] * V_DIM + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
        do = do.to(tl.float32)
    stat_base = pid_bh.to(tl.int64) * LQ
    lse1 = tl.load(LSE1 + stat_base + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.load(LSE2 + stat_base + rows, mask=row_ok, other=float("inf"))
    delta1 = tl.load(DELTA1 + stat_base + rows, mask=row_ok, other=0.0)
    delta2 = tl.load(DELTA2 + stat_base + rows, mask=row_ok, other=0.0)
    lam = tl.load(LAM)
    kv_base = (b * HKV + h_kv) * LK
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    offset = LK - LQ
    hi = LK
    if CAUSAL:
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + offset, 0), LK)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt_mask = col_ok[None, :] & d_ok[:, None]
        kt_offsets = (kv_base + cols[None, :]) * HEAD_DIM + offs_d[:, None]
        k1t = tl.load(K1 + kt_offsets, mask=kt_mask, other=0.0)
        k2t = tl.load(K2 + kt_offsets, mask=kt_mask, other=0.0)
        vt = tl.load(V + (kv_base + cols[None, :]) * V_DIM + offs_dv[:, None], mask=col_ok[None, :] & dv_ok[:, None],
                     other=0.0)
        if UPCAST:
            k1t = k1t.to(tl.float32)
            k2t = k2t.to(tl.float32)
            vt = vt.to(tl.float32)
        allowed = col_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + offset)
        # P_i = 2^(s Q_i K_i^T log2e - lse_i)
        p1 = tl.where(allowed, tl.exp2(tl.dot(q1, k1t, input_precision=PRECISION) * qk_scale - lse1[:, None]), 0.0)
        p2 = tl.where(allowed, tl.exp2(tl.dot(q2, k2t, input_precision=PRECISION) * qk_scale - lse2[:, None]), 0.0)
        # dP = dO V^T ; dS_1 = P_1 (dP - delta_1) ; dS_2 = -lambda P_2 (dP - delta_2) ; dQ_i += dS_i K_i
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds1 = p1 * (dp - delta1[:, None])
        ds2 = -lam * p2 * (dp - delta2[:, None])
        dq1 = tl.dot(ds1.to(k1t.dtype), tl.trans(k1t), dq1, input_precision=PRECISION)
        dq2 = tl.dot(ds2.to(k2t.dtype), tl.trans(k2t), dq2, input_precision=PRECISION)

    out_offsets = pid_bh.to(tl.int64) * LQ * HEAD_DIM + q_offsets
    tl.store(DQ1 + out_offsets, (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=q_mask)
    # this signal head's share of its noise head's gradient (summed over the group by the launcher)
    tl.store(DQ2 + out_offsets, dq2 * sm_scale, mask=q_mask)


# ------------------------------------------------------------------------------------------------
# tiles, launchers and autograd
# ------------------------------------------------------------------------------------------------


def default_tiles(head_dim: int, value_dim: int, dtype: torch.dtype, *, compiled: bool | None = None) -> dict[str, Tiles]:
    """Tiles for the forward, dK/dV and dQ kernels.

    Interpreted: few large steps. On a GPU every kernel holds two maps' state (two $BLOCK\\_M \\times D_v$
    accumulators forward; $dK_1, dK_2, dV$ backward), about twice lesson 01's registers, so the tiles are
    narrower than :func:`kernels.flash.default_tiles`. Not tuned on a card yet: ``python -m benchmarks.flash
    --differential`` times them. ``compiled``: as in :func:`kernels.flash.default_tiles`.
    """
    if not runs_compiled(compiled):
        return interpreter_tiles()
    wide = value_dim > 128
    if dtype == torch.float32:
        return {"fwd": Tiles(32 if wide else 64, 32, 4, 1), "dkdv": Tiles(16, 32, 4, 1), "dq": Tiles(32, 16, 4, 1)}
    return {
        "fwd": Tiles(64, 32 if wide else 64, 8 if wide else 4, 2),
        "dkdv": Tiles(16 if wide else 32, 64, 4, 2),
        "dq": Tiles(64 if not wide else 32, 32, 4, 2),
    }


def _as_lambda_tensor(lam, device) -> torch.Tensor:
    value = lam.detach() if isinstance(lam, torch.Tensor) else torch.tensor(float(lam))
    return value.reshape(1).to(device=device, dtype=torch.float32).contiguous()


def differential_forward(q1, k1, q2, k2, v, lam, *, causal: bool, scale: float, tiles: Tiles, store_aux: bool):
    """Launch the forward kernel. Returns ``out (B, H1, Lq, Dv)``, and with ``store_aux`` also ``o2``
    (the noise output, float32) and ``lse1, lse2 (B, H1, Lq)`` (base 2); else ``None`` for those."""
    b, h1, lq, d = q1.shape
    h2, hkv, lk, dv = q2.shape[1], k1.shape[1], k1.shape[2], v.shape[3]
    lam_t = _as_lambda_tensor(lam, q1.device)
    out = torch.empty((b, h1, lq, dv), device=q1.device, dtype=q1.dtype)
    if store_aux:
        o2 = torch.empty((b, h1, lq, dv), device=q1.device, dtype=torch.float32)
        lse1, lse2 = (torch.empty((b, h1, lq), device=q1.device, dtype=torch.float32) for _ in range(2))
    else:
        o2 = lse1 = lse2 = out  # never written (STORE_AUX is off)
    grid = (triton.cdiv(lq, tiles.block_m), b * h1)
    _diff_fwd_kernel[grid](
        q1, k1, q2, k2, v, lam_t, out, o2, lse1, lse2,
        *q1.stride(), *k1.stride(), *q2.stride(), *k2.stride(), *v.stride(),
        h1, h1 // h2, h1 // hkv, lq, lk, d, dv, scale * LOG2E,
        CAUSAL=causal, STORE_AUX=store_aux, **launch_options(tiles, d, DV=dv), **kernel_options(q1),
    )
    return (out, o2, lse1, lse2) if store_aux else (out, None, None, None)


def differential_backward(q1, k1, q2, k2, v, lam, out, o2, lse1, lse2, grad_out, *, causal: bool, scale: float,
                          dkdv_tiles: Tiles, dq_tiles: Tiles):
    """Launch the two backward kernels. Returns ``dq1, dk1, dq2, dk2, dv, dlam``."""
    b, h1, lq, d = q1.shape
    h2, hkv, lk, dv_dim = q2.shape[1], k1.shape[1], k1.shape[2], v.shape[3]
    q1, k1, q2, k2, v, grad_out = (x.contiguous() for x in (q1, k1, q2, k2, v, grad_out))
    lam_t = _as_lambda_tensor(lam, q1.device)
    g = grad_out.float()
    # O_1 = O + lambda O_2 ; delta_i = rowsum(dO * O_i) ; dlambda = -sum(dO * O_2)
    o1 = out.float() + lam_t * o2
    delta1 = (g * o1).sum(-1).contiguous()
    delta2 = (g * o2).sum(-1).contiguous()
    dlam = -(g * o2).sum()
    dq1 = torch.empty_like(q1)
    dq2_parts = torch.empty((b, h1, lq, d), device=q1.device, dtype=torch.float32)
    dk1, dk2 = torch.empty_like(k1), torch.empty_like(k2)
    dv = torch.empty_like(v)
    sizes = (h1, h2, hkv, h1 // h2, h1 // hkv, lq, lk, d, dv_dim, scale, scale * LOG2E)
    _diff_bwd_dkdv_kernel[(triton.cdiv(lk, dkdv_tiles.block_n), b * hkv)](
        q1, k1, q2, k2, v, grad_out, lam_t, lse1, lse2, delta1, delta2, dk1, dk2, dv, *sizes,
        CAUSAL=causal, **launch_options(dkdv_tiles, d, DV=dv_dim), **kernel_options(q1),
    )
    _diff_bwd_dq_kernel[(triton.cdiv(lq, dq_tiles.block_m), b * h1)](
        q1, k1, q2, k2, v, grad_out, lam_t, lse1, lse2, delta1, delta2, dq1, dq2_parts, *sizes,
        CAUSAL=causal, **launch_options(dq_tiles, d, DV=dv_dim), **kernel_options(q1),
    )
    # a noise head's gradient is the sum of the shares of the r signal heads it serves
    dq2 = dq2_parts.view(b, h2, h1 // h2, lq, d).sum(2).to(q2.dtype)
    return dq1, dk1, dq2, dk2, dv, dlam


class DifferentialFlashFunction(torch.autograd.Function):
    """``torch.autograd`` glue: the forward saves the inputs, ``out``, ``O_2`` and both lse's."""

    @staticmethod
    def forward(ctx, q1, k1, q2, k2, v, lam, causal, scale, tiles):
        store_aux = any(ctx.needs_input_grad[:6])  # O_2 and the lse's only when a backward will come
        out, o2, lse1, lse2 = differential_forward(q1, k1, q2, k2, v, lam, causal=causal, scale=scale,
                                                   tiles=tiles["fwd"], store_aux=store_aux)
        if store_aux:
            ctx.save_for_backward(q1, k1, q2, k2, v, _as_lambda_tensor(lam, q1.device), out, o2, lse1, lse2)
        ctx.causal, ctx.scale, ctx.tiles = causal, scale, tiles
        ctx.lam_shape = lam.shape if isinstance(lam, torch.Tensor) else None
        ctx.lam_dtype = lam.dtype if isinstance(lam, torch.Tensor) else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q1, k1, q2, k2, v, lam, out, o2, lse1, lse2 = ctx.saved_tensors
        dq1, dk1, dq2, dk2, dv, dlam = differential_backward(
            q1, k1, q2, k2, v, lam, out, o2, lse1, lse2, grad_out, causal=ctx.causal, scale=ctx.scale,
            dkdv_tiles=ctx.tiles["dkdv"], dq_tiles=ctx.tiles["dq"])
        dlam = dlam.reshape(ctx.lam_shape).to(ctx.lam_dtype) if ctx.lam_shape is not None else None
        return dq1, dk1, dq2, dk2, dv, dlam, None, None, None


def check_differential_kernel_inputs(q1, k1, q2, k2, v, lam, causal, scale, block_m, block_n) -> None:
    """Every check the kernels need, done before any launch."""
    check_differential_inputs(q1, k1, q2, k2, v, lam)
    check_scale(scale)
    check_causal(causal)
    check_kernel_dtype("q1", q1)
    d, dv = q1.shape[-1], v.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q1: the kernel supports head_dim {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, got {d}")
    if not MIN_HEAD_DIM <= dv <= MAX_VALUE_DIM:
        raise ValueError(f"v: the kernel supports a value width of {MIN_HEAD_DIM} to {MAX_VALUE_DIM}, got {dv}")
    if q1.shape[2] == 0 or k1.shape[2] == 0:
        raise ValueError(f"q1, k1: expected at least one query and one key, got lengths {q1.shape[2]} and {k1.shape[2]}")
    for name, x in (("q1", q1), ("k1", k1), ("q2", q2), ("k2", k2), ("v", v)):
        check_device(name, x)
    if isinstance(lam, torch.Tensor):
        check_device("lam", lam)
    check_blocks(block_m=block_m, block_n=block_n)


def differential_flash_attention(q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                                 v: torch.Tensor, lam, *, causal: bool = False, scale: float | None = None,
                                 block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    r"""$O = \operatorname{softmax}(s\,Q_1K_1^\top)V - \lambda\operatorname{softmax}(s\,Q_2K_2^\top)V$, fused.

    The same function as :func:`attnlib.heads.differential.differential_attention`, differentiable in
    ``q1, k1, q2, k2, v`` and ``lam``. Compiled on CUDA tensors; Triton's interpreter on CPU tensors when
    no GPU is present (slow: small sizes).

    Args:
        q1: signal queries ``(B, H1, Lq, D)``, float16, bfloat16 or float32, ``16 <= D <= 128``.
        k1: signal keys ``(B, Hkv, Lk, D)``.
        q2: noise queries ``(B, H2, Lq, D)``, ``H2`` dividing ``H1`` (GDA; ``H2 == H1`` is differential
            attention); signal head ``i`` uses noise head ``i // (H1 // H2)``.
        k2: noise keys ``(B, Hkv, Lk, D)``, ``Hkv`` dividing ``H2``.
        v: values ``(B, Hkv, Lk, Dv)``, ``16 <= Dv <= 256`` (``2D`` in the papers).
        lam: $\lambda$, a float or a one-element tensor (gets a gradient if it requires one).
        causal: bottom-right aligned causal mask.
        scale: default $1/\sqrt{D}$.
        block_m, block_n: query and key tiles (powers of two >= 16) for all three kernels.

    Returns:
        ``out (B, H1, Lq, Dv)`` in the dtype of ``q1``.
    """
    check_differential_kernel_inputs(q1, k1, q2, k2, v, lam, causal, scale, block_m, block_n)
    d = q1.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tiles = with_blocks(default_tiles(d, v.shape[-1], q1.dtype), block_m, block_n)
    return DifferentialFlashFunction.apply(q1, k1, q2, k2, v, lam, causal, scale, tiles)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation targets (see kernels.compile_check)
# ------------------------------------------------------------------------------------------------


def compile_targets(dtype: torch.dtype, head_dim: int, *, causal: bool = True) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` for the three kernels at their default GPU tiles, with
    values twice as wide as the queries (as in the papers)."""
    value_dim = 2 * head_dim
    tiles = default_tiles(head_dim, value_dim, dtype, compiled=True)
    targets = []
    for name, kernel, key in (("diff forward", _diff_fwd_kernel, "fwd"), ("diff bwd dK dV", _diff_bwd_dkdv_kernel, "dkdv"),
                              ("diff bwd dQ", _diff_bwd_dq_kernel, "dq")):
        t = tiles[key]
        options = launch_options(t, head_dim, DV=value_dim)
        constexprs = {c: options[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")}
        constexprs.update(CAUSAL=causal, UPCAST=False, PRECISION=precision(dtype))
        if key == "fwd":
            constexprs["STORE_AUX"] = True
        targets.append((name, kernel, t, constexprs, kernel_signature(kernel, TRITON_TYPES[dtype], constexprs)))
    return targets
