r"""Block-sparse FlashAttention in Triton: follow a list of key blocks per query block, forward and backward.

The forward kernel is lesson 01's flash forward with one change: instead of walking over *every* key
block, the program of query block $t$ (of one batch and head) reads its list from the layout
(:func:`kernels.block_layout.build_block_layout`) and visits only those key blocks $u$, in two phases:

1. the *full* blocks, where every query of the tile may see every key: no mask is read at all;
2. the *partial* blocks, where the boolean mask tile $M_{tu}$ is loaded and forbidden scores become
   $-\infty$ before the online softmax

$$m' = \max(m, \operatorname{rowmax} S_u),\quad \ell' = e^{m-m'}\ell + \operatorname{rowsum} e^{S_u - m'},\quad
  A' = e^{m-m'}A + e^{S_u - m'} V_u,\qquad O = A/\ell .$$

Skipped blocks would contribute $e^{-\infty}=0$, so the result is exactly masked attention
(:func:`attnlib.attention` with the mask); a row with no visible key keeps $\ell = 0$ and gives zeros.

The backward pass recomputes $P = \exp(S - \mathrm{lse})$ on the same tiles (lesson 01):
$dV = P^\top dO$, $dS = P\odot(dP - \delta)$, $dQ = s\,dS\,K$, $dK = s\,dS^\top Q$. The $dK, dV$ program
of key block $u$ follows the *transposed* list (the query blocks that visit $u$); the $dQ$ program of
query block $t$ follows the forward list. No two programs write the same output: no atomics.

**Optional per-key bias** (``key_bias=``, lesson 45's dynamic mask attention): one additive logit per key,
shared by every query of a head, $S = s\,QK^\top + \mathbf 1\,b^\top$. The forward adds $b_j$ (times
$\log_2 e$, as the kernel works in base 2) to every visited tile's scores; the backward recomputes $P$ with
it, and since $\partial S_{ij}/\partial b_j = 1$, $db_j = \sum_i dS_{ij}$: the $dK, dV$ program of key block
$u$ already loops over every query block that sees $u$, so it sums $dS^\top$ over queries without atomics.
A constexpr ``HAS_BIAS`` compiles the bias code out when no bias is given.

Reference for the tiling argument and the tile-level bound: Hassani et al., 2025, "Generalized
Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light", arXiv:2504.16922.

Conventions: ``(batch, heads, seq, head_dim)``; fewer key/value heads than query heads allowed; the mask
is ``(Bm, Hm, Lq, Lk)`` with ``Bm`` in ``{1, B}`` and ``Hm`` in ``{1, Hq}`` (it broadcasts over the rest).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import check_mask, check_tensor
from ._runtime import check_device
from .block_layout import BlockLayout, build_block_layout
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
)

# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_visit(acc, l_i, m_i, q, k_base, v_base, mask_base, list_base, first, last,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
               rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """Fold the key blocks of list entries ``first .. last - 1`` into the online-softmax state."""
    d_ok = offs_d < HEAD_DIM
    for e in range(first, last):
        cols = tl.load(list_base + e) * BLOCK_N + offs_n
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # S = s Q K^T, in base 2 (qk_scale = s * log2 e)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            # S += 1 b^T: one bias per key (stored times log2 e), the same for every query row
            s = s + tl.load(bias_base + cols * stride_bk, mask=col_ok, other=0.0)[None, :]
        if MASKED:
            # M_tu: the element mask, read only in partial blocks (keys past Lk read as "masked")
            allowed = tl.load(mask_base + rows[:, None].to(tl.int64) * stride_mq + cols[None, :] * stride_mk,
                              mask=row_ok[:, None] & col_ok[None, :], other=0) != 0
            s = tl.where(allowed, s, float("-inf"))
        # m' = max(m, rowmax S)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:
            # a row that has seen only masked keys (or -inf biases) keeps m = -inf; shift it by 0 to avoid -inf - -inf
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
def _bs_fwd_kernel(Q, K, V, O, LSE, MASK, KV_INDEX, KV_COUNT, KV_FULL, KEY_BIAS,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_mb, stride_mh, stride_mq, stride_mk,
                   stride_bb, stride_bh, stride_bk,
                   H, GROUPS, LQ, LK, HEAD_DIM, MB, MH, NUM_BLOCKS, MAX_VISITS, BIAS_GROUPS, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False):
    # every tl.dot needs all three sizes >= 16 on a GPU (the interpreter would accept less)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUPS
    # the mask and its lists broadcast over batch and heads when their size there is 1
    lay = (b % MB) * MH + (h % MH)

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
    mask_base = MASK + (b % MB) * stride_mb + (h % MH) * stride_mh
    list_base = KV_INDEX + (lay * NUM_BLOCKS + pid_m) * MAX_VISITS
    count = tl.load(KV_COUNT + lay * NUM_BLOCKS + pid_m)
    full = tl.load(KV_FULL + lay * NUM_BLOCKS + pid_m)
    # query head h reads bias head h // BIAS_GROUPS (a size-1 batch or head dim has stride 0)
    bias_base = KEY_BIAS + b * stride_bb + (h // BIAS_GROUPS) * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # phase 1: full blocks, no mask read
    acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, q, k_base, v_base, mask_base, list_base, 0, full,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                               rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
                               False, BLOCK_N, UPCAST, PRECISION, HAS_BIAS)
    # phase 2: partial blocks, with the element mask
    acc, l_i, m_i = _fwd_visit(acc, l_i, m_i, q, k_base, v_base, mask_base, list_base, full, count,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                               rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
                               True, BLOCK_N, UPCAST, PRECISION, HAS_BIAS)

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
def _dkdv_visit(dk, dv, db, k, v, bias_k, q_base, do_base, stat_base, LSE, DELTA, mask_base, list_base, first, last,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mq, stride_mk,
                cols, col_ok, offs_m, offs_d, LQ, HEAD_DIM, qk_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Accumulate this key block's dK, dV (and db, the key bias's gradient) over the query blocks of list
    entries ``first .. last - 1``."""
    d_ok = offs_d < HEAD_DIM
    for e in range(first, last):
        rows = tl.load(list_base + e) * BLOCK_M + offs_m
        row_ok = rows < LQ
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # padded and empty rows have lse = +inf, hence P = 0
        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        # P^T = 2^(s K Q^T log2e (+ b log2e) - lse)   (BLOCK_N, BLOCK_M)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            st = st + bias_k[:, None]
        pt = tl.exp2(st - lse[None, :])
        if MASKED:
            allowed = tl.load(mask_base + rows[None, :].to(tl.int64) * stride_mq + cols[:, None] * stride_mk,
                              mask=col_ok[:, None] & row_ok[None, :], other=0) != 0
            pt = tl.where(allowed, pt, 0.0)
        # dV += P^T dO
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        # dP^T = V dO^T ;  dS^T = P^T (dP^T - delta) ;  dK += dS^T Q (times s at the end)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
        if HAS_BIAS:
            # db_j += sum_i dS_ij: every query that sees key j, in this query block
            db = db + tl.sum(dst, 1)
    return dk, dv, db


@triton.jit
def _bs_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, Q_INDEX, Q_COUNT, Q_FULL, KEY_BIAS, DBIAS,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_mb, stride_mh, stride_mq, stride_mk,
                        stride_bb, stride_bh, stride_bk,
                        H, H_KV, GROUPS, LQ, LK, HEAD_DIM, MB, MH, NUM_BLOCKS, MAX_VISITS, BIAS_GROUPS,
                        sm_scale, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False):
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

    for g in range(GROUPS):  # the query heads that share this key/value head
        h = h_kv * GROUPS + g
        lay = (b % MB) * MH + (h % MH)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stat_base = (b * H + h) * LQ
        mask_base = MASK + (b % MB) * stride_mb + (h % MH) * stride_mh
        list_base = Q_INDEX + (lay * NUM_BLOCKS + pid_n) * MAX_VISITS
        count = tl.load(Q_COUNT + lay * NUM_BLOCKS + pid_n)
        full = tl.load(Q_FULL + lay * NUM_BLOCKS + pid_n)
        if HAS_BIAS:
            # this key block's biases for query head h (times log2 e)
            bias_k = tl.load(KEY_BIAS + b * stride_bb + (h // BIAS_GROUPS) * stride_bh + cols * stride_bk,
                             mask=col_ok, other=0.0)
        else:
            bias_k = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, db = _dkdv_visit(dk, dv, db, k, v, bias_k, q_base, do_base, stat_base, LSE, DELTA, mask_base,
                                 list_base, 0, full,
                                 stride_qm, stride_qd, stride_dom, stride_dod, stride_mq, stride_mk,
                                 cols, col_ok, offs_m, offs_d, LQ, HEAD_DIM, qk_scale,
                                 False, BLOCK_M, UPCAST, PRECISION, HAS_BIAS)
        dk, dv, db = _dkdv_visit(dk, dv, db, k, v, bias_k, q_base, do_base, stat_base, LSE, DELTA, mask_base,
                                 list_base, full, count,
                                 stride_qm, stride_qd, stride_dom, stride_dod, stride_mq, stride_mk,
                                 cols, col_ok, offs_m, offs_d, LQ, HEAD_DIM, qk_scale,
                                 True, BLOCK_M, UPCAST, PRECISION, HAS_BIAS)
        if HAS_BIAS:
            # db (B, H, LK) per query head; the host sums it over what the bias broadcast
            tl.store(DBIAS + (b * H + h) * LK + cols, db, mask=col_ok)

    dk = dk * sm_scale
    # dK and dV are laid out like K and V (contiguous)
    out_offsets = (b * H_KV + h_kv) * LK * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_visit(dq, q, do, lse, delta, k_base, v_base, mask_base, list_base, first, last,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
              rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """Accumulate this query block's dQ over the key blocks of list entries ``first .. last - 1``."""
    d_ok = offs_d < HEAD_DIM
    for e in range(first, last):
        cols = tl.load(list_base + e) * BLOCK_N + offs_n
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        # P = 2^(s Q K^T log2e (+ b log2e) - lse)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s = s + tl.load(bias_base + cols * stride_bk, mask=col_ok, other=0.0)[None, :]
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            allowed = tl.load(mask_base + rows[:, None].to(tl.int64) * stride_mq + cols[None, :] * stride_mk,
                              mask=row_ok[:, None] & col_ok[None, :], other=0) != 0
            p = tl.where(allowed, p, 0.0)
        # dP = dO V^T ;  dS = P (dP - delta) ;  dQ += dS K
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bs_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, MASK, KV_INDEX, KV_COUNT, KV_FULL, KEY_BIAS,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_dob, stride_doh, stride_dom, stride_dod,
                      stride_mb, stride_mh, stride_mq, stride_mk,
                      stride_bb, stride_bh, stride_bk,
                      H, GROUPS, LQ, LK, HEAD_DIM, MB, MH, NUM_BLOCKS, MAX_VISITS, BIAS_GROUPS, sm_scale, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "blocks must be at least 16")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUPS
    lay = (b % MB) * MH + (h % MH)

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
    mask_base = MASK + (b % MB) * stride_mb + (h % MH) * stride_mh
    list_base = KV_INDEX + (lay * NUM_BLOCKS + pid_m) * MAX_VISITS
    count = tl.load(KV_COUNT + lay * NUM_BLOCKS + pid_m)
    full = tl.load(KV_FULL + lay * NUM_BLOCKS + pid_m)
    bias_base = KEY_BIAS + b * stride_bb + (h // BIAS_GROUPS) * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_visit(dq, q, do, lse, delta, k_base, v_base, mask_base, list_base, 0, full,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                   rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
                   False, BLOCK_N, UPCAST, PRECISION, HAS_BIAS)
    dq = _dq_visit(dq, q, do, lse, delta, k_base, v_base, mask_base, list_base, full, count,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                   rows, row_ok, offs_n, offs_d, LK, HEAD_DIM, qk_scale, bias_base, stride_bk,
                   True, BLOCK_N, UPCAST, PRECISION, HAS_BIAS)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * LQ * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------------
# block sizes
# ------------------------------------------------------------------------------------------------


def default_tiles(head_dim: int, dtype: torch.dtype, *, compiled: bool | None = None) -> dict[str, Tiles]:
    """Tiles for the forward, the dK/dV and the dQ kernel, by device, head dim and dtype.

    All three kernels follow the same layout, so they share ``BLOCK_M x BLOCK_N``; only the launch
    options differ. 64 x 64 keeps the partial border tiles of a sliding window small (the tile-level
    bound grows as the tiles shrink) and fits the backward's two key-sized accumulators at head dim 128.
    In the interpreter each block step costs milliseconds whatever its size, so few large steps win.
    ``compiled``: as in :func:`kernels.flash.default_tiles`.
    """
    if not runs_compiled(compiled):
        return interpreter_tiles()
    if dtype == torch.float32:
        return {"fwd": Tiles(64, 64, 4, 2), "dkdv": Tiles(64, 64, 4, 1), "dq": Tiles(64, 64, 4, 1)}
    return {"fwd": Tiles(64, 64, 4, 3), "dkdv": Tiles(64, 64, 4, 2), "dq": Tiles(64, 64, 4, 2)}


def _mask_strides(mask: torch.Tensor) -> tuple[int, int, int, int]:
    # a broadcast (size-1) batch or head dim is never indexed past 0: stride 0 keeps the offsets simple
    return tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))


def _layout_sizes(layout: BlockLayout, transposed: bool) -> tuple[int, int]:
    index = layout.q_index if transposed else layout.kv_index
    return index.shape[-2], index.shape[-1]


# ------------------------------------------------------------------------------------------------
# launchers and autograd
# ------------------------------------------------------------------------------------------------


def _bias_args(key_bias, q) -> tuple:
    """Kernel arguments of the key bias: ``(pointer, stride_bb, stride_bh, stride_bk, bias_groups, has_bias)``.

    ``key_bias`` is ``None`` or a checked ``(Bb, Hb, 1, Lk)`` tensor (:func:`_key_bias_4d`); the kernel reads it
    in float32, times $\\log_2 e$. Without a bias a placeholder pointer is passed and never read.
    """
    if key_bias is None:
        return (q, 0, 0, 0, 1, False)
    bias2 = (key_bias.float() * LOG2E)[:, :, 0, :]
    stride_bb, stride_bh, stride_bk = (0 if size == 1 else stride for size, stride in zip(bias2.shape, bias2.stride()))
    return (bias2, stride_bb, stride_bh, stride_bk, q.shape[1] // bias2.shape[1], True)


def block_sparse_forward(q, k, v, mask_u8, layout: BlockLayout, *, scale: float, tiles: Tiles, key_bias=None):
    """Launch the forward kernel. Returns ``out (B, Hq, Lq, D)`` and ``lse2 (B, Hq, Lq)`` (base-2 lse).

    ``key_bias``: ``None`` or a checked ``(Bb, Hb, 1, Lk)`` per-key bias (:func:`block_sparse_attention`).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse2 = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    num_blocks, max_visits = _layout_sizes(layout, transposed=False)
    bias_ptr, *bias_strides, bias_groups, has_bias = _bias_args(key_bias, q)
    _bs_fwd_kernel[(layout.num_q_blocks, b * hq)](
        q, k, v, out, lse2, mask_u8, layout.kv_index, layout.kv_count, layout.kv_full, bias_ptr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_mask_strides(mask_u8), *bias_strides,
        hq, hq // hkv, lq, lk, d, mask_u8.shape[0], mask_u8.shape[1], num_blocks, max_visits, bias_groups,
        scale * LOG2E,
        **launch_options(tiles, d), **kernel_options(q), HAS_BIAS=has_bias,
    )
    return out, lse2


def block_sparse_backward(q, k, v, out, lse2, grad_out, mask_u8, layout: BlockLayout, *, scale: float,
                          dkdv_tiles: Tiles, dq_tiles: Tiles, key_bias=None):
    """Launch the two backward kernels. Returns ``dq, dk, dv`` shaped like ``q, k, v``; with a ``key_bias``
    also ``dbias (B, Hq, Lk)`` float32, $\\sum_i dS_{ij}$ per query head (not yet summed over what the bias
    broadcast)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grad_out = grad_out.contiguous()
    # delta_i = sum_d dO_id O_id
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, lk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, d), device=q.device, dtype=v.dtype)
    bias_ptr, *bias_strides, bias_groups, has_bias = _bias_args(key_bias, q)
    dbias = torch.empty((b, hq, lk), device=q.device, dtype=torch.float32) if has_bias else q
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_mask_strides(mask_u8), *bias_strides)
    mb, mh = mask_u8.shape[0], mask_u8.shape[1]
    num_kb, max_q = _layout_sizes(layout, transposed=True)
    _bs_bwd_dkdv_kernel[(layout.num_k_blocks, b * hkv)](
        q, k, v, grad_out, lse2, delta, dk, dv, mask_u8, layout.q_index, layout.q_count, layout.q_full,
        bias_ptr, dbias, *strides,
        hq, hkv, hq // hkv, lq, lk, d, mb, mh, num_kb, max_q, bias_groups, scale, scale * LOG2E,
        **launch_options(dkdv_tiles, d), **kernel_options(q), HAS_BIAS=has_bias,
    )
    num_qb, max_kv = _layout_sizes(layout, transposed=False)
    _bs_bwd_dq_kernel[(layout.num_q_blocks, b * hq)](
        q, k, v, grad_out, lse2, delta, dq, mask_u8, layout.kv_index, layout.kv_count, layout.kv_full,
        bias_ptr, *strides,
        hq, hq // hkv, lq, lk, d, mb, mh, num_qb, max_kv, bias_groups, scale, scale * LOG2E,
        **launch_options(dq_tiles, d), **kernel_options(q), HAS_BIAS=has_bias,
    )
    return (dq, dk, dv, dbias) if has_bias else (dq, dk, dv)


def _reduce_bias_grad(dbias: torch.Tensor, bias4: torch.Tensor) -> torch.Tensor:
    """``dbias (B, Hq, Lk)`` per query head -> the shape ``(Bb, Hb, 1, Lk)`` of the bias it came from."""
    b, hq, lk = dbias.shape
    bb, hb = bias4.shape[0], bias4.shape[1]
    # query heads h with the same h // (Hq / Hb) share one bias head: sum them
    grad = dbias.view(b, hb, hq // hb, lk).sum(2)
    if bb == 1 and b > 1:
        grad = grad.sum(0, keepdim=True)
    return grad[:, :, None, :]


class BlockSparseAttentionFunction(torch.autograd.Function):
    """``torch.autograd`` glue: the forward saves ``q, k, v, out, lse``; the backward recomputes ``P``.

    ``key_bias`` (optional, last) is the caller's tensor, broadcastable to ``(B, H, 1, Lk)``; its gradient
    comes back in its own shape and dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask_u8, layout, scale, tiles, key_bias=None):
        bias4 = None if key_bias is None else _key_bias_4d(key_bias, q, k)
        out, lse2 = block_sparse_forward(q, k, v, mask_u8, layout, scale=scale, tiles=tiles["fwd"], key_bias=bias4)
        ctx.save_for_backward(q, k, v, out, lse2, mask_u8, *(() if bias4 is None else (bias4,)))
        ctx.layout, ctx.scale, ctx.tiles = layout, scale, tiles
        ctx.bias_shape = None if key_bias is None else key_bias.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse2, mask_u8, *bias = ctx.saved_tensors
        bias4 = bias[0] if bias else None
        grads = block_sparse_backward(q, k, v, out, lse2, grad_out, mask_u8, ctx.layout, scale=ctx.scale,
                                      dkdv_tiles=ctx.tiles["dkdv"], dq_tiles=ctx.tiles["dq"], key_bias=bias4)
        dbias = None
        if bias4 is not None:
            dbias = _reduce_bias_grad(grads[3], bias4).reshape(ctx.bias_shape).to(bias4.dtype)
        return grads[0], grads[1], grads[2], None, None, None, None, dbias


def _mask_4d(mask, q, k) -> torch.Tensor:
    """``mask`` as ``(Bm, Hm, Lq, Lk)`` (``Bm`` in {1, B}, ``Hm`` in {1, Hq}), checked."""
    b, hq, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    check_mask(mask, (b, hq, lq, lk))
    check_device("mask", mask)
    while mask.dim() < 4:
        mask = mask[None]
    return mask.expand(mask.shape[0], mask.shape[1], lq, lk)


def _key_bias_4d(key_bias, q, k) -> torch.Tensor:
    """``key_bias`` as ``(Bb, Hb, 1, Lk)`` with ``Bb`` in {1, B} and ``Hb`` in {1, Hkv, Hq}, checked."""
    b, hq, hkv, lk = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    check_tensor("key_bias", key_bias)
    check_device("key_bias", key_bias)
    shape = (1,) * (4 - key_bias.dim()) + tuple(key_bias.shape)
    if (key_bias.dim() > 4 or shape[0] not in (1, b) or shape[1] not in (1, hkv, hq) or shape[2] != 1
            or shape[3] != lk):
        raise ValueError(f"key_bias: expected one value per key, shared by all queries: a shape broadcastable "
                         f"to (B, H, 1, Lk) = ({b}, {hq}, 1, {lk}) with H in {{1, Hkv={hkv}, Hq={hq}}}, "
                         f"got {tuple(key_bias.shape)}")
    return key_bias.reshape(shape)


def _check_layout(layout, mask4: torch.Tensor) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout (kernels.block_layout.build_block_layout), "
                        f"got {type(layout).__name__}")
    want = (mask4.shape[0], mask4.shape[1], mask4.shape[2], mask4.shape[3])
    got = (*layout.kv_count.shape[:2], layout.q_len, layout.k_len)
    if got != want:
        raise ValueError(f"layout: built for a mask (Bm, Hm, Lq, Lk) = {got}, but the mask is {want}")
    if layout.kv_index.device != mask4.device:
        raise ValueError(f"layout: its lists are on {layout.kv_index.device}, the tensors on {mask4.device}")
    for name, block in (("block_m", layout.block_m), ("block_n", layout.block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"layout: {name} must be a power of two >= 16 (a GPU's tl.dot needs 16), got {block}")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                           layout: BlockLayout | None = None, scale: float | None = None,
                           block_m: int | None = None, block_n: int | None = None,
                           key_bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""Masked attention $\operatorname{softmax}(s\,QK^\top + \mathbf 1\,b^\top \text{ masked by } M)\,V$ that
    visits only the tiles the mask does not empty, with the Triton block-sparse kernel.

    Differentiable in ``q``, ``k``, ``v`` (and ``key_bias``). Runs compiled on CUDA tensors, and in Triton's
    interpreter on CPU tensors when no GPU is present (slow: use small sizes). Equals
    :func:`attnlib.sparse.block_sparse.block_sparse_attention_reference` (rows with no visible key give zeros).

    Args:
        q: ``(B, Hq, Lq, D)``, float16, bfloat16 or float32, ``16 <= D <= 128``.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq``.
        mask: boolean, broadcastable to ``(B, Hq, Lq, Lk)``, ``True`` = may attend. It is read only in
            partial tiles.
        layout: the block lists of ``mask`` (:func:`kernels.block_layout.build_block_layout`); build it
            once and pass it to every call with the same mask. Its blocks are the kernel's tiles.
        scale: default $1/\sqrt{D}$.
        block_m, block_n: tile sizes when ``layout`` is not given (powers of two >= 16); default
            :func:`default_tiles`.
        key_bias: optional additive bias $b$ with one value per key, shared by every query (lesson 45's
            dynamic mask attention): shape broadcastable to ``(B, H, 1, Lk)`` with ``H`` in ``{1, Hkv, Hq}``
            (``Hkv``: query head ``h`` uses bias head ``h // (Hq / Hkv)``, like its keys). Equals
            :func:`attnlib.attention` with ``bias=`` that tensor (repeated to ``Hq`` heads). ``None``: no
            bias, and the kernels run exactly as without this argument.

    Returns:
        ``out (B, Hq, Lq, D)`` in the dtype of ``q``.
    """
    check_flash_inputs(q, k, v, False, scale, block_m, block_n)
    mask4 = _mask_4d(mask, q, k)
    if key_bias is not None:
        _key_bias_4d(key_bias, q, k)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tiles = default_tiles(d, q.dtype)
    if layout is None:
        first = tiles["fwd"]
        layout = build_block_layout(mask4, block_m or first.block_m, block_n or first.block_n)
    _check_layout(layout, mask4)
    tiles = {name: Tiles(layout.block_m, layout.block_n, t.num_warps, t.num_stages) for name, t in tiles.items()}
    if key_bias is None:
        return BlockSparseAttentionFunction.apply(q, k, v, mask4.view(torch.uint8), layout, scale, tiles)
    return BlockSparseAttentionFunction.apply(q, k, v, mask4.view(torch.uint8), layout, scale, tiles, key_bias)


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation targets (see kernels.compile_check)
# ------------------------------------------------------------------------------------------------


# the kernels' own argument types (the rest follow kernels.common.kernel_signature's names)
_ARG_TYPES = {"MASK": "*u8", "KEY_BIAS": "*fp32", "DBIAS": "*fp32",
              **dict.fromkeys(("KV_INDEX", "KV_COUNT", "KV_FULL", "Q_INDEX", "Q_COUNT", "Q_FULL"), "*i32")}


def compile_targets(dtype: torch.dtype, head_dim: int, *, key_bias: tuple[bool, ...] = (False, True)) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` for the three kernels at their default GPU tiles, once
    without and once with the per-key bias (``HAS_BIAS``; names ending in ``+ bias``): six targets.

    ``signature`` maps every kernel argument to its Triton type string, as ``triton.compile`` wants.
    The tiles are the compiled-path defaults (what a GPU would run), whatever device this runs on.
    ``key_bias`` picks the variants (``(True,)``: the three bias kernels only).
    """
    tiles = default_tiles(head_dim, dtype, compiled=True)
    targets = []
    for has_bias in key_bias:
        for name, kernel, key in (("block-sparse forward", _bs_fwd_kernel, "fwd"),
                                  ("block-sparse bwd dK dV", _bs_bwd_dkdv_kernel, "dkdv"),
                                  ("block-sparse bwd dQ", _bs_bwd_dq_kernel, "dq")):
            t = tiles[key]
            options = launch_options(t, head_dim)
            constexprs = dict(BLOCK_M=options["BLOCK_M"], BLOCK_N=options["BLOCK_N"], BLOCK_D=options["BLOCK_D"],
                              UPCAST=False, PRECISION=precision(dtype), HAS_BIAS=has_bias)
            targets.append((name + (" + bias" if has_bias else ""), kernel, t, constexprs,
                            kernel_signature(kernel, TRITON_TYPES[dtype], constexprs, _ARG_TYPES)))
    return targets
