r"""Lesson 40: generalized neighborhood attention, sliding, strided and blocked windows, P21.

Hassani et al., 2025, "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the
Speed of Light" (arXiv:2504.16922; code: the NATTEN library). One family with three knobs per dimension,
window $K$, stride $s$ and dilation $\delta$, contains sliding-window attention ($s=1$, neighborhood
attention), blocked attention ($s=K$, Swin-style windows) and everything between (strided).

**One dimension of length $L$** (NATTEN's mask, ``backends/flex.py`` and the CUDA reference
``reference/mask.hpp``):

1. *dilation*: token $x$ belongs to group $g = x \bmod \delta$ at coordinate $x' = \lfloor x/\delta\rfloor$;
   the group has $L_g = \lceil (L-g)/\delta \rceil$ tokens and only tokens of the same group interact;
2. *window*: $\text{left} = \lfloor K/2 \rfloor$, $\text{right} = \lfloor K/2 \rfloor + (K \bmod 2) - 1$
   (an even $K$ puts one more key on the left);
3. *stride groups* (non-causal): the queries $\lfloor i'/s\rfloor s, \dots$ share the window of their
   leader $\ell = \min(\lfloor i'/s\rfloor s + \lfloor s/2\rfloor,\ L_g-1)$, centred at
   $c = \operatorname{clamp}(\ell,\ \text{left},\ L_g - 1 - \text{right})$:

$$M_{ij} = [\,g_i = g_j\,]\ [\,c_i - \text{left} \le j' \le c_i + \text{right}\,];$$

   the clamp *shifts* the window inward at the borders instead of cutting it, so every query sees
   exactly $K$ keys;
4. *causal*: the leader is the last query of the group, $\ell = \min(\lfloor i'/s\rfloor s + s - 1,\ L_g-1)$,
   and $M_{ij} = [g_i=g_j]\,[\,j' \le i'\,]\,[\,\ell - j' < K\,]$ (the first queries of a group see fewer
   than $K$ keys).

In 2-D (or more) the mask is the AND of one such mask per dimension, on row-major flattened tokens,
so a non-causal query sees $\prod_d K_d$ keys. Attention itself is unchanged:
$O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)V$ (lesson 00).

Speed comes from the tiles a flash kernel can skip (:mod:`attnlib.sparse.block_sparse`): a stride that is a
multiple of the query tile gives every query of a tile the *same* window, hence no partial tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .._checks import check_backend, check_positive_int, check_qkv, check_scale, check_tensor
from ..registry import register_mechanism
from ..tools.plotting import MASK_CMAP, _axes
from .block_sparse import BlockLayout, build_block_layout, sparse_attention

# ------------------------------------------------------------------------------------------------
# the mask
# ------------------------------------------------------------------------------------------------


def check_window(length: int, kernel_size: int, stride: int = 1, dilation: int = 1, *, dim: str = "") -> None:
    """NATTEN's constraints for one dimension: positive ints, ``kernel_size * dilation <= length``, ``stride <= kernel_size``."""
    suffix = f" (dimension {dim})" if dim else ""
    for name, value in (("length", length), ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        check_positive_int(name, value)
    if kernel_size * dilation > length:
        raise ValueError(f"kernel_size: expected kernel_size * dilation <= length{suffix}, got "
                         f"{kernel_size} * {dilation} > {length}")
    if stride > kernel_size:
        raise ValueError(f"stride: expected stride <= kernel_size = {kernel_size}{suffix}, got {stride}")


def window_bounds_1d(length: int, kernel_size: int, *, stride: int = 1, dilation: int = 1, causal: bool = False,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and last group coordinate $j'$ each query may see: ``(lo, hi)``, each ``(length,)`` int64.

    Query $i$ sees key $j$ iff $j \equiv i \pmod\delta$ and ``lo[i] <= j // dilation <= hi[i]``.
    """
    check_window(length, kernel_size, stride, dilation)
    i = torch.arange(length, device=device)
    group, coord = i % dilation, i // dilation
    # L_g = ceil((L - g) / delta): tokens in this query's dilation group
    group_len = torch.div(length - group + dilation - 1, dilation, rounding_mode="floor")
    if causal:
        # leader: last query of the stride group; the window ends at the query itself
        leader = torch.minimum(coord // stride * stride + stride - 1, group_len - 1)
        return (leader - kernel_size + 1).clamp(min=0), coord
    left = kernel_size // 2
    right = kernel_size // 2 + kernel_size % 2 - 1
    # leader: centre query of the stride group (right-hand centre for even s)
    leader = torch.minimum(coord // stride * stride + stride // 2, group_len - 1)
    # c = clamp(leader, left, L_g - 1 - right): the window shifts inward, it is never cut
    centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
    return centre - left, centre + right


def neighborhood_mask_1d(length: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
                         causal: bool = False, device=None) -> torch.Tensor:
    """The ``(length, length)`` boolean mask of 1-D generalized neighborhood attention (``True`` = may attend)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    lo, hi = window_bounds_1d(length, kernel_size, stride=stride, dilation=dilation, causal=causal, device=device)
    j = torch.arange(length, device=device)
    same_group = (j % dilation)[None, :] == (torch.arange(length, device=device) % dilation)[:, None]
    jc = (j // dilation)[None, :]
    # M_ij = [g_i = g_j] [lo_i <= j' <= hi_i]
    return same_group & (jc >= lo[:, None]) & (jc <= hi[:, None])


def _per_dim(name: str, value, dims: int) -> tuple:
    if isinstance(value, (int, bool)):
        return (value,) * dims
    value = tuple(value)
    if len(value) != dims:
        raise ValueError(f"{name}: expected one value per dimension ({dims}), got {value}")
    return value


def neighborhood_mask(shape: int | Sequence[int], kernel_size: int | Sequence[int], *,
                      stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                      causal: bool | Sequence[bool] = False, device=None) -> torch.Tensor:
    r"""The mask of generalized neighborhood attention on a token grid of ``shape`` (1-D, 2-D, 3-D).

    Tokens are flattened row-major (the last dimension fastest). Returns ``(N, N)`` bool with
    $N = \prod_d \text{shape}_d$: $M = \bigwedge_d M^{(d)}$, one :func:`neighborhood_mask_1d` per dimension.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"shape: expected a grid of 1 to 3 dimensions (as NATTEN), got {shape}")
    dims = len(shape)
    kernel_size, stride, dilation = (_per_dim(n, x, dims) for n, x in
                                     (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)))
    causal = _per_dim("causal", causal, dims)
    mask = torch.ones(1, 1, dtype=torch.bool, device=device)
    for length, k, s, dl, c in zip(shape, kernel_size, stride, dilation, causal):
        one = neighborhood_mask_1d(length, k, stride=s, dilation=dl, causal=c, device=device)
        # row-major: (i_1..i_d, j_1..j_d) -> AND of the per-dimension masks, a Kronecker product
        mask = (mask[:, None, :, None] & one[None, :, None, :]).reshape(mask.shape[0] * length, -1)
    return mask


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int | Sequence[int], *,
                           shape: Sequence[int] | None = None, stride: int | Sequence[int] = 1,
                           dilation: int | Sequence[int] = 1, causal: bool | Sequence[bool] = False,
                           scale: float | None = None, backend: str = "reference") -> torch.Tensor:
    r"""Generalized neighborhood attention $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)\,V$.

    Shapes: ``q (B, Hq, N, D)``, ``k, v (B, Hkv, N, D)``; the ``N`` tokens are a grid of ``shape``
    (default ``(N,)``, a sequence) flattened row-major. Returns ``(B, Hq, N, D)``. ``backend="kernel"``
    runs the block-sparse Triton kernel (:func:`kernels.block_sparse.block_sparse_attention`).
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: neighborhood attention is self-attention, expected {q.shape[2]} keys, got {k.shape[2]}")
    check_scale(scale)
    check_backend(backend)
    shape = (q.shape[2],) if shape is None else tuple(shape)
    if math.prod(shape) != q.shape[2]:
        raise ValueError(f"shape: expected a grid with {q.shape[2]} tokens (q's length), got {shape}")
    mask = neighborhood_mask(shape, kernel_size, stride=stride, dilation=dilation, causal=causal, device=q.device)
    return sparse_attention(q, k, v, mask, backend=backend, scale=scale)


# ------------------------------------------------------------------------------------------------
# tiles: what the kernel visits
# ------------------------------------------------------------------------------------------------


def neighborhood_layout(shape, kernel_size, *, block_m: int, block_n: int, stride=1, dilation=1, causal=False,
                        device=None) -> BlockLayout:
    """The block lists the block-sparse kernel follows for this neighborhood mask."""
    mask = neighborhood_mask(shape, kernel_size, stride=stride, dilation=dilation, causal=causal, device=device)
    return build_block_layout(mask, block_m, block_n)


def tile_counts_1d(length: int, kernel_size: int, *, stride: int = 1, causal: bool = False, block_m: int,
                   block_n: int) -> dict[str, int]:
    """Dense, visited, full and partial tiles of a 1-D window (dilation 1) in $O(L)$, no $L^2$ mask.

    With dilation 1 each query sees one interval of keys and, as $s \\le K$, the intervals of a query
    tile overlap: the tile's keys are their union (visited) and its full key tiles lie inside their
    intersection. Equal to :func:`attnlib.sparse.block_sparse.tile_counts` of :func:`neighborhood_mask_1d`.
    """
    check_positive_int("block_m", block_m)
    check_positive_int("block_n", block_n)
    lo, hi = window_bounds_1d(length, kernel_size, stride=stride, causal=causal)
    tq, tk = -(-length // block_m), -(-length // block_n)
    pad = tq * block_m - length
    # rows past the end repeat the last row (they are never stored and never change a tile's kind)
    lo = torch.cat([lo, lo[-1:].expand(pad)]).view(tq, block_m)
    hi = torch.cat([hi, hi[-1:].expand(pad)]).view(tq, block_m)
    union_lo, union_hi = lo.min(1).values, hi.max(1).values
    inter_lo, inter_hi = lo.max(1).values, hi.min(1).values
    u = torch.arange(tk)
    first, last = u * block_n, torch.clamp((u + 1) * block_n, max=length) - 1
    visited = (first[None, :] <= union_hi[:, None]) & (last[None, :] >= union_lo[:, None])
    full = ((first[None, :] >= inter_lo[:, None]) & (last[None, :] <= inter_hi[:, None])
            & ((u + 1) * block_n <= length)[None, :])
    v, f = int(visited.sum()), int((visited & full).sum())
    return dict(dense=tq * tk, visited=v, full=f, partial=v - f)


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------


def plot_window_2d(shape, kernel_size, query, *, stride=1, dilation=1, causal=False, ax=None, title=None):
    """The ``shape = (rows, cols)`` token grid: the keys query ``query = (r, c)`` sees (dark), the query (red),
    and the other members of its stride group (outlined)."""
    rows, cols = shape
    mask = neighborhood_mask(shape, kernel_size, stride=stride, dilation=dilation, causal=causal)
    flat = query[0] * cols + query[1]
    ax = _axes(ax, size=(3.8, 3.8))
    ax.imshow(mask[flat].view(rows, cols).float().numpy(), cmap=MASK_CMAP, vmin=0, vmax=1.6, interpolation="nearest")
    # queries whose window is the same as this one: the stride group (they share the leader)
    same = (mask == mask[flat]).all(dim=1).view(rows, cols)
    for r, c in same.nonzero().tolist():
        ax.add_patch(_square(c, r, edge="tab:orange"))
    ax.add_patch(_square(query[1], query[0], edge="tab:red", face="tab:red"))
    ax.set_xticks([])
    ax.set_yticks([])
    seen = int(mask[flat].sum())
    ax.set_title(title or f"query {tuple(query)} sees {seen} keys")
    return ax


def _square(x, y, *, edge, face="none"):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=face != "none", facecolor=face, edgecolor=edge, linewidth=1.5)


def plot_tile_map(layout: BlockLayout, *, ax=None, title=None, batch: int = 0, head: int = 0):
    """The kernel's tiles, query blocks (rows) by key blocks (columns): white skipped, grey partial
    (element mask read), black full."""
    kinds = layout.tile_kinds()[batch, head].float().numpy()
    ax = _axes(ax)
    ax.imshow(kinds, cmap=MASK_CMAP, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"key block ({layout.block_n} keys)")
    ax.set_ylabel(f"query block ({layout.block_m} queries)")
    visited, full = int((kinds > 0).sum()), int((kinds == 2).sum())
    ax.set_title(title or f"{visited} of {kinds.size} tiles visited, {full} full")
    return ax


# ------------------------------------------------------------------------------------------------
# the token mixer
# ------------------------------------------------------------------------------------------------


class NeighborhoodAttention(nn.Module):
    r"""Multi-head 1-D generalized neighborhood attention, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    Args:
        dim: model width, divisible by ``num_heads``.
        num_heads: heads $h$.
        kernel_size: window $K$ (keys per query).
        stride: stride $s \le K$ (1 sliding window, $K$ blocked).
        dilation: dilation $\delta$.
        causal: NATTEN's causal window (each query sees at most $K$ keys, none in the future).
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask) or ``"kernel"`` (the
            block-sparse Triton kernel).

    A sequence shorter than $K\delta$ uses the largest window that fits ($K' = \min(K, L)$,
    $\delta' = \min(\delta, \lfloor L/K' \rfloor)$, $s' = \min(s, K')$); with $K' = L$ that is full (or
    causal) attention, what NATTEN itself does when the window covers the input.
    """

    def __init__(self, dim: int, num_heads: int, *, kernel_size: int = 5, stride: int = 1, dilation: int = 1,
                 causal: bool = False, backend: str = "reference", bias: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("kernel_size", kernel_size),
                            ("stride", stride), ("dilation", dilation)):
            check_positive_int(name, value)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if stride > kernel_size:
            raise ValueError(f"stride: expected stride <= kernel_size = {kernel_size}, got {stride}")
        check_backend(backend)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def window_for(self, length: int) -> tuple[int, int, int]:
        """``(kernel_size, stride, dilation)`` used for a sequence of ``length`` tokens."""
        k = min(self.kernel_size, length)
        return k, min(self.stride, k), max(1, min(self.dilation, length // k))

    def mask(self, length: int, device=None) -> torch.Tensor:
        k, s, d = self.window_for(length)
        return neighborhood_mask_1d(length, k, stride=s, dilation=d, causal=self.causal, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        b, length, _ = x.shape
        # (B, L, 3 dim) -> 3 x (B, h, L, d)
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = sparse_attention(q, k, v, self.mask(length, device=x.device), backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.dim))


@register_mechanism("neighborhood", paper="P21", lesson="40", supports_causal=True,
                    summary="generalized neighborhood attention (Hassani et al., 2025): 1-D window kernel_size=, "
                            "stride= (1 sliding, K blocked), dilation=")
def build_neighborhood(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return NeighborhoodAttention(dim, num_heads, causal=causal, **options)
