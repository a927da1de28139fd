r"""Lesson 01, online softmax and FlashAttention in Triton: exercises.

Replace each stub with your code, then check your work from the repository root with

    make check LESSON=01

(which runs ``pytest tests/exercises/test_01_flash_attention.py --against exercises``).
A failing check says what is wrong: a sum that is not rescaled, a missing mask, a write past the end.

Exercises 1 and 2 are plain PyTorch: replace ``raise NotImplementedError(...)``. Exercises 3 and 4 are
Triton kernels: you write only the **kernel body**, replacing the ``tl.static_assert(False, ...)`` line
(a kernel cannot ``raise``, so a stub kernel fails at its static assertion instead); the Python function
that launches it is given, complete. Without a GPU the kernels run in Triton's interpreter on CPU
tensors (importing ``kernels`` switches it on), so ``print`` works inside a kernel while you debug.
Keep every ``tl.arange`` a power of two and every block at least 16, so the code compiles on a GPU too.

Rules: no ``torch.softmax``, ``torch.logsumexp`` or ``attnlib``'s softmax helpers in exercise 1,
since writing the softmax is the point.
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
    r"""Softmax along the last dim, reading ``x`` one block of ``block_size`` entries at a time.

    Keep two running numbers per row, the largest entry seen so far $m$ and the sum $\ell$ of
    $e^{x_j - m}$ over the entries seen so far (Milakov & Gimelshein, 2018). Start from
    $m = -\infty$, $\ell = 0$; for each block $x_B$:

    $$m' = \max\big(m, \max_{j \in B} x_j\big), \qquad
      \ell' = e^{m - m'}\,\ell + \sum_{j \in B} e^{x_j - m'} .$$

    After the last block, $m = \max_j x_j$ and $\ell = \sum_j e^{x_j - m}$, so
    $\operatorname{softmax}(x)_j = e^{x_j - m} / \ell$.

    Args:
        x: ``(..., n)``, a floating dtype. Entries may be ``-inf`` (masked); every row has at least one
            finite entry, but a whole block may be ``-inf``.
        block_size: entries per block, ``>= 1``; the last block is shorter when it does not divide ``n``.

    Returns:
        ``(..., n)``, the softmax of each row along the last dim.
    """
    raise NotImplementedError(
        "Start with m = full(x.shape[:-1] + (1,), -inf) and l = zeros of the same shape; for start in "
        "range(0, n, block_size) take block = x[..., start:start + block_size], compute m_new = maximum(m, "
        "block.amax(-1, keepdim=True)), l = exp(m - m_new) * l + exp(block - m_new).sum(-1, keepdim=True), "
        "m = m_new (while m_new is -inf, use 0 in its place inside the two exp); finally return exp(x - m) / l"
    )


# ------------------------------------------------------------------------------------------------
# 2. merging two partial attention results, in PyTorch
# ------------------------------------------------------------------------------------------------


def merge_partial_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    r"""Combine the attention of the same queries over two disjoint sets of keys.

    For one query row, attention over the key set $\mathcal{K}_i$ alone gives the output
    $O_i = \sum_{j \in \mathcal{K}_i} e^{s_j - \mathrm{lse}_i} v_j$ and the log-sum-exp
    $\mathrm{lse}_i = \log \sum_{j \in \mathcal{K}_i} e^{s_j}$. Over $\mathcal{K}_1 \cup \mathcal{K}_2$:

    $$\mathrm{lse} = \log\big(e^{\mathrm{lse}_1} + e^{\mathrm{lse}_2}\big), \qquad
      O = e^{\mathrm{lse}_1 - \mathrm{lse}}\, O_1 + e^{\mathrm{lse}_2 - \mathrm{lse}}\, O_2 ,$$

    each partial weighted by its share of the softmax's denominator. This is how a kernel splits the
    keys between programs, and how ring attention (lesson 81) combines the blocks of several devices.

    A partial that saw no key (every key masked) has $\mathrm{lse}_i = -\infty$ and $O_i = 0$: it must
    get weight 0. If both are empty, return $O = 0$ and $\mathrm{lse} = -\infty$, never NaN.

    Args:
        o1, o2: ``(..., L, dv)`` partial outputs (each already normalised over its own keys).
        lse1, lse2: ``(..., L)`` their natural-log log-sum-exps (``-inf`` for an empty partial).

    Returns:
        ``(o, lse)`` with shapes ``(..., L, dv)`` and ``(..., L)``.
    """
    raise NotImplementedError(
        "lse = torch.logaddexp(lse1, lse2) (stable, and -inf only if both are -inf); the weights are "
        "exp(lse1 - lse) and exp(lse2 - lse) with unsqueeze(-1) to broadcast over dv; where lse is -inf "
        "use 0 in its place, or -inf - (-inf) gives NaN"
    )


# ------------------------------------------------------------------------------------------------
# 3. a row-wise softmax kernel, in Triton (write the kernel body; the launcher is given)
# ------------------------------------------------------------------------------------------------


@triton.jit
def softmax_rows_kernel(x_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, BLOCK: tl.constexpr):
    r"""The stable softmax of one row per program: ``out[row, :] = softmax(x[row, :n_cols])``.

    The program with id ``row = tl.program_id(0)`` handles row ``row``. Its entries sit at
    ``x_ptr + row * x_row_stride + j`` for ``0 <= j < n_cols`` (rows are ``x_row_stride`` elements
    apart, which may be more than ``n_cols``), and its outputs go to
    ``out_ptr + row * out_row_stride + j``. ``BLOCK`` is the power of two ``>= max(16, n_cols)``: load
    the row into ``BLOCK`` lanes, ``cols = tl.arange(0, BLOCK)``, and use the mask ``cols < n_cols`` on
    both the load and the store. Lanes past the end must not change the result: load them as
    ``-inf`` (``other=float("-inf")``), since $e^{-\infty} = 0$. Then
    $p_j = e^{x_j - m} / \sum_k e^{x_k - m}$ with $m = \max_k x_k$ (``tl.max``, ``tl.exp``,
    ``tl.sum`` over ``axis=0``); compute in float32 and store in the output's dtype
    (``p.to(out_ptr.dtype.element_ty)``).
    """
    tl.static_assert(False, "not implemented yet: row = tl.program_id(0); cols = tl.arange(0, BLOCK); "
                            "load x_ptr + row * x_row_stride + cols with mask=cols < n_cols and "
                            "other=float('-inf'); subtract tl.max, tl.exp, divide by tl.sum; "
                            "tl.store with the same mask")


def softmax_rows(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch :func:`softmax_rows_kernel` on a 2-d ``x (rows, n_cols)``; returns ``out`` (same shape).

    Given complete: one program per row, ``BLOCK`` the next power of two of ``n_cols`` (at least 16).
    """
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
# 4. the FlashAttention forward pass for one query block, in Triton (write the kernel body)
# ------------------------------------------------------------------------------------------------


@triton.jit
def attention_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lq, lk, stride_q, stride_k, stride_v, stride_o, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    r"""Exact attention for one block of ``BLOCK_M`` queries, walking over the keys in blocks of ``BLOCK_N``.

    One head, no mask: ``q (lq, HEAD_DIM)``, ``k, v (lk, HEAD_DIM)``, row ``i`` of a tensor at
    ``ptr + i * stride`` and its entries contiguous. Program ``tl.program_id(0)`` owns the query rows
    ``rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)`` (rows ``>= lq`` do not exist: mask them on the
    load and on the store). Keep, per row, the running max ``m`` (start ``-inf``), the running sum
    ``l`` (start 0) and the accumulator ``acc (BLOCK_M, HEAD_DIM)`` (start 0), all float32. For each
    key block ``cols = start + tl.arange(0, BLOCK_N)``, ``start`` in ``range(0, lk, BLOCK_N)``:

    $$S = s\,Q K_B^\top,\quad m' = \max(m, \operatorname{rowmax} S),\quad \alpha = e^{m - m'},\quad
      P = e^{S - m'},\quad \ell' = \alpha\,\ell + \operatorname{rowsum} P,\quad
      A' = \alpha A + P V_B ,$$

    where keys ``cols >= lk`` of the last, partial block get the score ``-inf`` (load their K and V
    rows with a mask and ``other=0.0``, then ``tl.where(cols < lk, S, float("-inf"))``). At the end
    store $O = A / \ell$. Use ``tl.dot(a, b, input_precision="ieee")`` for exact float32 products on a
    GPU too, and ``tl.trans(k)`` for $K^\top$.
    """
    tl.static_assert(False, "not implemented yet: load the Q tile once; loop over the key blocks with "
                            "the online softmax (m, l, acc), giving scores of keys cols >= lk the value "
                            "-inf; rescale l and acc by alpha = exp(m - m_new) at every step; store "
                            "acc / l[:, None] with mask rows < lq")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                      block_m: int = 16, block_n: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""Launch :func:`attention_forward_kernel`: ``q (Lq, d)``, ``k, v (Lk, d)`` -> ``out (Lq, d)``.

    Given complete: float32 inputs with contiguous rows, ``d`` a power of two from 16 to 128, blocks
    powers of two ``>= 16``; the grid has one program per block of ``block_m`` queries. The default
    scale is $1/\sqrt{d}$.
    """
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
