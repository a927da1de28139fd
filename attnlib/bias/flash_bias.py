r"""Lesson 50: FlashBias, attention with a low-rank bias, P07.

**Attention with bias** adds a matrix $B$ to the scores (lesson 00):

$$O = \operatorname{softmax}(s\,QK^\top + B)\,V,\qquad Q \in \mathbb R^{N\times d},\ K, V \in \mathbb R^{M\times d},
  \ B \in \mathbb R^{N\times M}.$$

A flash kernel (lesson 01) never stores the $N\times M$ scores, but a *dense* bias is an $N\times M$ matrix
that it must read from memory, tile by tile: $2NM$ bytes in 16-bit against $2(N+M)d$ for $Q, K$ (and as much
for $V, O$). Per byte read, the kernel does $4NMd / 2NM = 2d$ FLOPs, far below an H100's ridge of about
$295$ FLOP/byte for $d \le 128$: the bias makes FlashAttention memory bound.

**FlashBias** (Haixu Wu, Minghao Guo, Yuezhou Ma, Yuanxu Sun, Jianmin Wang, Wojciech Matusik, Mingsheng Long,
2025, "FlashBias: Fast Computation of Attention with Bias", arXiv 2505.12044) observes that most biases in use
have low rank $r$, $B = UW^\top$ with $U \in \mathbb R^{N\times r}$, $W \in \mathbb R^{M\times r}$, and reads the
$(N+M)r$ numbers of the factors instead of the $NM$ of the matrix:

$$S = s\,QK^\top + UW^\top = [\,sQ \,\|\, U\,]\,[\,K \,\|\, W\,]^\top .$$

The second form is the *concatenation trick*: ordinary attention with scale 1 on inputs that are $r$ columns
wider computes attention with the bias exactly (the bias term is **not** scaled: the official code multiplies
$QK^\top$ by $s$ and then adds $q_b k_b^\top$). Factors come from

* an exact formula: ALiBi $-m_h(i-j) = [-m_h i,\ m_h]\cdot[1,\ j]$ has rank 2 (:func:`alibi_factors`); a
  negative squared distance $-\lVert x_i - y_j\rVert^2$ between points in $\mathbb R^p$ has rank $\le p+2$
  (:func:`squared_distance_factors`);
* a truncated SVD of a learned table, offline (:func:`svd_factors`; the best rank-$r$ approximation in the
  Frobenius norm, Eckart-Young);
* a small network (the paper's AlphaFold 3 pair bias; not built here).

Official code: thuml/FlashBias (``flash_bias_triton.py``, ``attention_with_alibi_bias.py``). Its ALiBi
example uses $q_b = m[1, i]$, $k_b = [-j, 1]$, i.e. $+m(i-j)$, the opposite sign of ALiBi (Press et al., 2022);
this module follows the ALiBi paper, $-m(i-j)$ (a penalty that grows with distance), and
:func:`alibi_factors` has ``sign=`` to reproduce the code's version.

Shapes: tensors ``(batch, heads, seq, head_dim)``; factors ``U (B, H, N, r)``, ``W (B, H, M, r)``, which may
have size 1 in the batch and head dimensions (broadcast).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels._checks import check_factors

from .._checks import check_backend, check_positive_int, check_scale, check_tensor
from ..core import attention, compute_dtype, repeat_kv
from ..modules import MultiHeadAttention
from ..registry import register_mechanism

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM5 HBM3
H100_FLOPS = 989.4e12  # dense bf16/fp16 FLOP/s
H100_RIDGE = H100_FLOPS / H100_BANDWIDTH  # ~295 FLOP/byte: below it a kernel is memory bound


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# biases and their factors
# ------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> torch.Tensor:
    r"""ALiBi's head slopes $m_h = 2^{-8(h+1)/H}$, $h = 0..H-1$ (a geometric sequence ending at $2^{-8}$), float64."""
    check_positive_int("num_heads", num_heads)
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float64)


def alibi_bias(num_heads: int, q_len: int, k_len: int | None = None) -> torch.Tensor:
    r"""The dense ALiBi bias $B_{hij} = -m_h\,(p_i - j)$ with $p_i = i + L_k - L_q$, shape ``(1, H, Lq, Lk)``, float64.

    Query row $i$ sits at key position $p_i$ (the course's bottom-right alignment). With a causal mask only
    $j \le p_i$ is seen and the bias is $\le 0$: a linear penalty on distance.
    """
    k_len = q_len if k_len is None else k_len
    check_positive_int("q_len", q_len)
    check_positive_int("k_len", k_len)
    pos_q = torch.arange(q_len, dtype=torch.float64) + (k_len - q_len)
    pos_k = torch.arange(k_len, dtype=torch.float64)
    slopes = alibi_slopes(num_heads)
    return (-slopes[:, None, None] * (pos_q[:, None] - pos_k[None, :]))[None]


def alibi_factors(num_heads: int, q_len: int, k_len: int | None = None, *, sign: float = -1.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact rank-2 factors of ALiBi: $U_{hi} = m_h\,[\sigma p_i,\ -\sigma]$, $W_j = [1,\ j]$.

    $U W^\top = \sigma m_h (p_i - j)$: with $\sigma = -1$ (default) the ALiBi bias of :func:`alibi_bias`;
    $\sigma = +1$ is the official FlashBias example's $+m(i-j)$. Returns ``U (1, H, Lq, 2)``,
    ``W (1, 1, Lk, 2)`` (the key factor is the same for every head). Keep them in float32: positions above
    2048 are not exact in float16.
    """
    k_len = q_len if k_len is None else k_len
    check_positive_int("q_len", q_len)
    check_positive_int("k_len", k_len)
    if sign not in (-1.0, 1.0, -1, 1):
        raise ValueError(f"sign: expected -1 (ALiBi) or +1 (the official example), got {sign!r}")
    pos_q = torch.arange(q_len, dtype=torch.float64) + (k_len - q_len)
    pos_k = torch.arange(k_len, dtype=torch.float64)
    slopes = alibi_slopes(num_heads)[:, None, None]
    # U = m [sigma p_i, -sigma],  W = [1, j]
    u = slopes * torch.stack([sign * pos_q, torch.full_like(pos_q, -sign)], dim=-1)
    w = torch.stack([torch.ones_like(pos_k), pos_k], dim=-1)
    return u[None].to(dtype), w[None, None].to(dtype)


def squared_distance_bias(x: torch.Tensor, y: torch.Tensor | None = None, *, weight: float = 1.0) -> torch.Tensor:
    r"""$B_{ij} = -\alpha\,\lVert x_i - y_j\rVert^2$ for points ``x (..., N, p)``, ``y (..., M, p)``; returns ``(..., N, M)``."""
    check_tensor("x", x)
    y = x if y is None else y
    check_tensor("y", y)
    return -weight * ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)


def squared_distance_factors(x: torch.Tensor, y: torch.Tensor | None = None, *,
                             weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact factors of $-\alpha\lVert x_i - y_j\rVert^2$, rank $p + 2$ for points in $\mathbb R^p$.

    $-\alpha\lVert x_i - y_j\rVert^2 = -\alpha\lVert x_i\rVert^2 - \alpha\lVert y_j\rVert^2 + 2\alpha\,x_i\cdot y_j$, so
    $U_i = [-\alpha\lVert x_i\rVert^2,\ 1,\ 2\alpha x_i]$ and $W_j = [1,\ -\alpha\lVert y_j\rVert^2,\ y_j]$.

    Shapes: ``x (..., N, p)``, ``y (..., M, p)`` -> ``U (..., N, p + 2)``, ``W (..., M, p + 2)``.
    """
    check_tensor("x", x)
    y = x if y is None else y
    check_tensor("y", y)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"y: expected points of dimension {x.shape[-1]} (as x), got shape {tuple(y.shape)}")
    sq_x = (x * x).sum(-1, keepdim=True)
    sq_y = (y * y).sum(-1, keepdim=True)
    u = torch.cat([-weight * sq_x, torch.ones_like(sq_x), 2 * weight * x], dim=-1)
    w = torch.cat([torch.ones_like(sq_y), -weight * sq_y, y], dim=-1)
    return u, w


def grid_points(height: int, width: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The pixel centres of a ``height x width`` image in raster order, ``(height * width, 2)``."""
    check_positive_int("height", height)
    check_positive_int("width", width)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def relative_position_bias(table: torch.Tensor, q_len: int, k_len: int | None = None) -> torch.Tensor:
    r"""A Toeplitz bias $B_{ij} = t[\,p_i - j + L_q - 1\,]$ from a table of $L_q + L_k - 1$ offsets per head.

    Query row $i$ sits at key position $p_i = i + L_k - L_q$, so the offset $p_i - j$ runs from $1 - L_q$ to
    $L_k - 1$: ``table (..., Lq + Lk - 1)`` (entry ``c`` is offset ``c - (Lq - 1)``) -> ``(..., Lq, Lk)``.
    """
    k_len = q_len if k_len is None else k_len
    check_tensor("table", table)
    if table.shape[-1] != q_len + k_len - 1:
        raise ValueError(f"table: expected {q_len + k_len - 1} offsets (q_len + k_len - 1) in the last dim, "
                         f"got shape {tuple(table.shape)}")
    pos_q = torch.arange(q_len) + (k_len - q_len)
    index = pos_q[:, None] - torch.arange(k_len)[None, :] + q_len - 1
    return table[..., index]


def svd_factors(bias: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The best rank-$r$ factors of a bias (Eckart-Young): $B \approx U_r\Sigma_r V_r^\top = (U_r\Sigma_r^{1/2})(V_r\Sigma_r^{1/2})^\top$.

    ``bias (..., N, M)`` -> ``U (..., N, r)``, ``W (..., M, r)``, computed in float64 (at least) and returned
    in ``bias``'s dtype. A rank above ``min(N, M)`` raises.
    """
    check_tensor("bias", bias)
    if bias.dim() < 2:
        raise ValueError(f"bias: expected at least 2 dims (..., N, M), got shape {tuple(bias.shape)}")
    check_positive_int("rank", rank)
    if rank > min(bias.shape[-2:]):
        raise ValueError(f"rank: expected at most min(N, M) = {min(bias.shape[-2:])}, got {rank}")
    left, values, right_t = torch.linalg.svd(bias.to(torch.promote_types(bias.dtype, torch.float64)),
                                             full_matrices=False)
    root = values[..., :rank].sqrt()
    u = left[..., :, :rank] * root[..., None, :]
    w = right_t[..., :rank, :].transpose(-2, -1) * root[..., None, :]
    return u.to(bias.dtype), w.to(bias.dtype)


def truncation_error(bias: torch.Tensor, rank: int) -> float:
    r"""Relative Frobenius error $\lVert B - U_rW_r^\top\rVert_F / \lVert B\rVert_F$ of :func:`svd_factors`."""
    u, w = svd_factors(bias, rank)
    b = bias.double()
    return ((b - u.double() @ w.double().transpose(-2, -1)).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# attention with a low-rank bias
# ------------------------------------------------------------------------------------------------


def lowrank_bias_attention(q, k, v, u, w, *, causal: bool = False, mask=None, scale: float | None = None):
    r"""$O = \operatorname{softmax}(s\,QK^\top + UW^\top)\,V$, the reference (it materialises $UW^\top$).

    Args:
        q: ``(B, H, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``.
        u: ``(B|1, H|1, Lq, r)``; w: ``(B|1, H|1, Lk, r)``; the bias term is not scaled.
        causal, mask, scale: as :func:`attnlib.attention`.

    Returns ``(B, H, Lq, Dv)``.
    """
    check_factors(q, k, u, w)
    work = torch.promote_types(torch.promote_types(u.dtype, w.dtype), torch.float32)
    # B = U W^T, in float32 at least
    bias = torch.matmul(u.to(work), w.to(work).transpose(-2, -1))
    return attention(q, k, v, bias=bias, causal=causal, mask=mask, scale=scale)


def concat_bias_inputs(q, k, u, w, *, scale: float | None = None, multiple: int = 1):
    r"""The concatenation trick: $Q' = [\,sQ \,\|\, U\,]$, $K' = [\,K \,\|\, W\,]$, so that $Q'K'^\top = s\,QK^\top + UW^\top$.

    Run any attention on ``(q', k', v)`` with **scale 1**. ``multiple`` zero-pads the width $D + r$ up to a
    multiple (8 lets PyTorch's flash backend take it). Grouped key/value heads are repeated (the key factor
    differs per query head). Returns ``q' (B, H, Lq, D')``, ``k' (B, H, Lk, D')`` in ``q``'s dtype.
    """
    check_factors(q, k, u, w)
    check_scale(scale)
    check_positive_int("multiple", multiple)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k = repeat_kv(k, h // k.shape[1])
    rank = u.shape[-1]
    pad = (-(d + rank)) % multiple
    u = u.to(q.dtype).expand(b, h, lq, rank)
    w = w.to(q.dtype).expand(b, h, lk, rank)
    q_cat = torch.cat([q * scale, u, q.new_zeros(b, h, lq, pad)], dim=-1)
    k_cat = torch.cat([k, w, k.new_zeros(b, h, lk, pad)], dim=-1)
    return q_cat, k_cat


def concat_bias_attention(q, k, v, u, w, *, causal: bool = False, scale: float | None = None):
    r"""$\operatorname{softmax}(s\,QK^\top + UW^\top)V$ as plain attention (scale 1) on :func:`concat_bias_inputs`."""
    q_cat, k_cat = concat_bias_inputs(q, k, u, w, scale=scale)
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    return attention(q_cat, k_cat, v, causal=causal, scale=1.0)


# ------------------------------------------------------------------------------------------------
# bytes and FLOPs
# ------------------------------------------------------------------------------------------------


def attention_bytes(n: int, m: int, head_dim: int, *, rank: int = 0, dense_bias: bool = False,
                    element_bytes: int = 2, bias_bytes: int | None = None) -> int:
    r"""HBM bytes one head's flash forward reads and writes: $Q, O$ ($2Nd$), $K, V$ ($2Md$) and the bias.

    The bias costs $NM$ elements when dense, $(N+M)r$ as factors. ``bias_bytes`` is its element size
    (default ``element_bytes``). The kernel streams $K, V$ once per query tile; with tiles as large as the
    chip allows those re-reads hit the L2 cache, so this is the minimum traffic, as in the paper's analysis.
    """
    bias_bytes = element_bytes if bias_bytes is None else bias_bytes
    qkvo = (2 * n + 2 * m) * head_dim * element_bytes
    bias = n * m * bias_bytes if dense_bias else (n + m) * rank * bias_bytes
    return qkvo + bias


def attention_flops(n: int, m: int, head_dim: int, *, rank: int = 0) -> int:
    r"""Forward FLOPs of one head: $4NMd$ for $QK^\top$ and $PV$, plus $2NMr$ for $UW^\top$."""
    return 4 * n * m * head_dim + 2 * n * m * rank


def arithmetic_intensity(n: int, m: int, head_dim: int, *, rank: int = 0, dense_bias: bool = False,
                         element_bytes: int = 2) -> float:
    """FLOPs per byte of HBM traffic (compare with the H100 ridge, :data:`H100_RIDGE`)."""
    flops = attention_flops(n, m, head_dim, rank=0 if dense_bias else rank)
    return flops / attention_bytes(n, m, head_dim, rank=rank, dense_bias=dense_bias, element_bytes=element_bytes)


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------

BACKENDS = ("reference", "dense", "concat", "kernel")


class ALiBiLowRankAttention(MultiHeadAttention):
    r"""Multi-head self-attention with ALiBi given as rank-2 factors, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    Head $h$ computes $\operatorname{softmax}(s\,Q_hK_h^\top + U_hW^\top)V_h$ with :func:`alibi_factors`
    ($U_hW^\top = -m_h(i-j)$, no learned parameters in the bias). Backends compute the same function:
    ``"reference"`` (:func:`lowrank_bias_attention`), ``"dense"`` (the $H\times L\times L$ bias materialised),
    ``"concat"`` (:func:`concat_bias_attention`) and ``"kernel"`` (:func:`kernels.flash_bias.flash_bias_attention`).

    Args:
        dim: model width, a multiple of ``num_heads``.
        num_heads: heads $H$ (each its own slope).
        causal: must be ``True`` (ALiBi's setting). The factors give $-m_h(i - j)$, which equals ALiBi's
            $-m_h|i - j|$ only for $j \le i$: without the causal mask it would *favour* far-future keys, and
            $-m_h|i - j|$ has no low-rank form, so ``causal=False`` is refused.
        backend: one of ``"reference"``, ``"dense"``, ``"concat"``, ``"kernel"``.

    The factors and the dense bias are built in the inputs' compute dtype (float32 for 16-bit inputs, float64
    for float64 ones), so a float64 module matches a float64 reference.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, backend: str = "reference"):
        super().__init__(dim, num_heads, causal=causal)  # the projections of lesson 00's module
        check_backend(backend, BACKENDS)
        if not causal:
            raise ValueError("causal: ALiBi's rank-2 factors give -m (i - j), which favours far-future keys "
                             "without the causal mask (and -m |i - j| has no low-rank form); use causal=True")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L, dim) -> (B, L, dim)``."""
        q, k, v = self.project(x)
        work = compute_dtype(q.dtype)  # float32 for 16-bit inputs (ALiBi's positions need more than 11 bits)
        u, w = alibi_factors(self.num_heads, x.shape[1], dtype=work)
        u, w = u.to(x.device), w.to(x.device)
        if self.backend == "reference":
            out = lowrank_bias_attention(q, k, v, u, w, causal=self.causal)
        elif self.backend == "dense":
            out = attention(q, k, v, bias=alibi_bias(self.num_heads, x.shape[1]).to(x.device, work),
                            causal=self.causal)
        elif self.backend == "concat":
            out = concat_bias_attention(q, k, v, u, w, causal=self.causal)
        else:
            from kernels.flash_bias import flash_bias_attention  # imported here: the kernels need Triton

            out = flash_bias_attention(q, k, v, u, w, causal=self.causal)
        return self.merge_heads(out)


@register_mechanism("alibi-lowrank", paper="P07", lesson="50", supports_causal=True,
                    summary="multi-head attention with ALiBi as rank-2 bias factors (FlashBias, Wu et al., 2025)")
def build_alibi_lowrank(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return ALiBiLowRankAttention(dim, num_heads, causal=causal, **options)
