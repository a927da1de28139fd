r"""Lesson 01, online softmax and FlashAttention in Triton: answers to the exercises.

The docstrings in ``exercises/01_flash_attention.py`` give the equations, the shapes and the rules.
Check a version with ``pytest tests/exercises/test_01_flash_attention.py --against solutions``.
"""

from __future__ import annotations

import kernels  # noqa: F401  (imported first: it switches on Triton's interpreter when no GPU is visible)

# isort: split
import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------
# 1. the online softmax, in PyTorch
# ------------------------------------------------------------------------------------------------


def online_softmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Softmax along the last dim, reading ``x`` one block of ``block_size`` entries at a time."""
    shape = x.shape[:-1] + (1,)
    m = torch.full(shape, float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(shape, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start:start + block_size]  # the last block may be shorter
        # m' = max(m, max_j x_j)
        m_new = torch.maximum(m, block.amax(dim=-1, keepdim=True))
        # while a row has seen only -inf, shift by 0 so that exp gives 0 instead of exp(-inf + inf) = NaN
        m_ref = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        # l' = e^{m - m'} l + sum_j e^{x_j - m'}
        l = torch.exp(m - m_ref) * l + torch.exp(block - m_ref).sum(dim=-1, keepdim=True)
        m = m_new
    # softmax(x)_j = e^{x_j - m} / l, with the final m and l
    return torch.exp(x - m) / l


# ------------------------------------------------------------------------------------------------
# 2. merging two partial attention results, in PyTorch
# ------------------------------------------------------------------------------------------------


def merge_partial_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    r"""Combine attention over two disjoint key sets: $O = w_1 O_1 + w_2 O_2$, $w_i = e^{\mathrm{lse}_i - \mathrm{lse}}$."""
    # lse = log(e^{lse1} + e^{lse2}), computed without overflow
    lse = torch.logaddexp(lse1, lse2)
    # a row where both partials are empty has lse = -inf: use 0 as its reference so that w = e^{-inf} = 0
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - ref).unsqueeze(-1)
    w2 = torch.exp(lse2 - ref).unsqueeze(-1)
    return w1 * o1 + w2 * o2, lse


# ------------------------------------------------------------------------------------------------
# 3. a row-wise softmax kernel, in Triton
# ------------------------------------------------------------------------------------------------


@triton.jit
def softmax_rows_kernel(x_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, BLOCK: tl.constexpr):
    """One program per row: the stable softmax of ``n_cols`` entries held in one block of ``BLOCK`` lanes."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    # lanes past the end of the row read -inf, so they add e^{-inf} = 0 to the sum and never win the max
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
    # e_j = e^{x_j - m}, m = max_j x_j
    e = tl.exp(x - tl.max(x, axis=0))
    # p_j = e_j / sum_j e_j
    p = e / tl.sum(e, axis=0)
    tl.store(out_ptr + row * out_row_stride + cols, p.to(out_ptr.dtype.element_ty), mask=inside)


def softmax_rows(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch :func:`softmax_rows_kernel` on a 2-d ``x (rows, n_cols)``; returns ``out`` (same shape)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x: expected a 2-d tensor with contiguous rows, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"out: expected shape {tuple(x.shape)} with contiguous rows, got {tuple(out.shape)}")
    n_rows, n_cols = x.shape
    block = max(16, triton.next_power_of_2(n_cols))
    softmax_rows_kernel[(n_rows,)](x, out, n_cols, x.stride(0), out.stride(0), BLOCK=block)
    return out


# ------------------------------------------------------------------------------------------------
# 4. the FlashAttention forward pass for one query block, in Triton
# ------------------------------------------------------------------------------------------------


@triton.jit
def attention_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lq, lk, stride_q, stride_k, stride_v, stride_o, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per block of ``BLOCK_M`` queries; a loop over the keys in blocks of ``BLOCK_N``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < lq
    q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, lk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < lk
        k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_v + dims[None, :], mask=col_ok[:, None], other=0.0)
        # S = s Q K^T; keys past the end get -inf (every block has at least one real key, so m' is finite)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # m' = max(m, rowmax S);  alpha = e^{m - m'};  P = e^{S - m'}
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        # l' = alpha l + rowsum P;  A' = alpha A + P V
        l = alpha * l + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    # O = A / l
    out = acc / l[:, None]
    tl.store(o_ptr + rows[:, None] * stride_o + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      block_m: int = 16, block_n: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch :func:`attention_forward_kernel`: ``q (Lq, d)``, ``k, v (Lk, d)`` -> ``out (Lq, d)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 2 or t.stride(-1) != 1 or t.dtype != torch.float32:
            raise ValueError(f"{name}: expected a 2-d float32 tensor with contiguous rows, got shape "
                             f"{tuple(t.shape)}, strides {t.stride()}, dtype {t.dtype}")
    (lq, d), lk = q.shape, k.shape[0]
    if k.shape != (lk, d) or v.shape != (lk, d) or lk == 0 or lq == 0:
        raise ValueError(f"k, v: expected shape (Lk, {d}) with Lk >= 1, got {tuple(k.shape)} and {tuple(v.shape)}")
    if d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"q: the head dim must be a power of two from 16 to 128, got {d}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {block}")
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out: expected shape {tuple(q.shape)} with contiguous rows, got {tuple(out.shape)}")
    scale = d ** -0.5 if scale is None else float(scale)
    attention_forward_kernel[(triton.cdiv(lq, block_m),)](
        q, k, v, out, lq, lk, q.stride(0), k.stride(0), v.stride(0), out.stride(0), scale,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
    )
    return out
