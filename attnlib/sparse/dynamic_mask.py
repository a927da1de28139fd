r"""Lesson 45: dynamic mask attention (DMA), content-aware key selection from the values, P15.

Shi, Wu, Wu, Peng, Wang, Liu and Luo, 2025, *Trainable Dynamic Mask Sparse Attention* (arXiv:2508.02124;
code: flash-algo/flash-sparse-attention, formerly SmallDoges/flash-dmattn). Each query attends to at most
$w$ keys, chosen by a score computed from the **values**, one score per key, and that score is also added to
the attention logits, so that it is trained end to end through the attention weights.

**1. A bias per key, from the values** (the official ``DogeAttention.forward``). For token $j$, concatenate
its values over the $H_{kv}$ key/value heads, $\operatorname{flat}(V)_j \in \mathbb R^{H_{kv} d}$, and map
them to one number per key/value head:

$$\delta_j = W_\delta \operatorname{flat}(V)_j \in \mathbb R^{H_{kv}}, \qquad
  b_{hj} = A_h \operatorname{softplus}(\delta_{jh}),$$

with $A \in \mathbb R^{H_{kv}}$ **initialised to zeros**: at the start of training every key of a head has the
same bias $b = 0$, so every key *ties* in the selection below. The bias has shape ``(B, H_kv, 1, L)``: one
value per key, shared by every query. The paper (and the code until October 2025) writes the mask value as
$\exp(A \operatorname{softplus}(\delta))$ and adds *that* to the logits; the current code adds its logarithm
$A \operatorname{softplus}(\delta)$, which multiplies the unnormalised weights by $\exp(A
\operatorname{softplus}(\delta))$. This module follows the code (``form="log"``, default) and offers the
paper's form (``form="exp"``); both select the same keys, since $\exp$ is increasing.

**2. Which keys each query keeps** (``flash_sparse_attn/utils/mask.py``, ``topk_mask``, ``block_smooth``). On
the *detached* bias, the keys a query may not see (the future, with ``causal=True``) are set to the dtype's
most negative finite value $m_\text{min}$; then, only when $L_k > w$, each query keeps its $w$ largest
entries, except those equal to $m_\text{min}$ (so a short prefix keeps all its $\le w$ keys, never a future
one):

$$M_{ij} = [\,j \in \mathcal V_i\,]\ \big[\,\#\{j' \in \mathcal V_i : b_{j'} > b_j\} < w\,\big]
  \qquad (\text{up to ties}),$$

$\mathcal V_i$ the keys visible to query $i$. Optional *block smoothing*: cut the keys into blocks of $\beta$ and
keep a block whole iff more than half of it is selected (the ragged last block against its own length); the
visibility mask is applied again afterwards (the official kernel applies causality itself).

**3. Attention**, as lesson 00 with a mask and a bias:

$$S = s\,QK^\top + \mathbf 1 b^\top, \qquad S_{ij} = -\infty \text{ where } \neg M_{ij}, \qquad
  O = \operatorname{softmax}(S)\,V .$$

$b$ is *not* detached in $S$, so $A$ and $W_\delta$ get gradients through the logits of the selected keys;
the selection $M$ is piecewise constant and passes no gradient. With grouped-query attention the query heads
of a group share their key/value head's bias and selection.

**Keys live, then die.** The bias is shared by all queries, so as $i$ grows a key only loses rank: key $j$ is
kept from query $j$ until $w$ stronger keys have appeared, $M_{ij} = [\,j \le i < e_j\,]$ with $e_j$ the
$w$-th smallest position among the keys stronger than $j$ (:func:`key_lifetimes`). At inference DMA is a KV
cache of $w$ entries that evicts its weakest key, an eviction rule learned end to end (compare H2O, lesson 43).
"""

from __future__ import annotations

import heapq

import torch
from torch import nn

from .._checks import check_backend, check_bool, check_positive_int, check_qkv, check_scale, check_tensor
from ..core import attention, repeat_kv
from ..masks import causal_mask
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import _axes, plt
from .block_sparse import sparse_attention

FORMS = ("log", "exp")
SELECTIONS = ("dynamic", "window")


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------


def _check_form(form) -> None:
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} ('log': the code's A softplus(delta); 'exp': the "
                         f"paper's exp(A softplus(delta))), got {form!r}")


def _check_block_size(block_size) -> None:
    if block_size is not None:
        check_positive_int("block_size", block_size)


def _check_key_bias(bias, *, name: str = "bias") -> None:
    check_tensor(name, bias, ndim=4)
    if bias.shape[2] != 1:
        raise ValueError(f"{name}: expected one value per key, shape (B, H, 1, Lk), got {tuple(bias.shape)}")
    if torch.isnan(bias).any():  # a NaN would rank arbitrarily in the top-w selection and poison the softmax
        raise ValueError(f"{name}: expected no NaN, got {int(torch.isnan(bias).sum())} NaN values")


# ------------------------------------------------------------------------------------------------
# 1. the bias from the values
# ------------------------------------------------------------------------------------------------


def dynamic_bias(v: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, *, delta_bias: torch.Tensor | None = None,
                 form: str = "log") -> torch.Tensor:
    r"""The per-key bias DMA derives from the values.

    $$\delta_j = W_\delta \operatorname{flat}(V)_j\ (+\,c), \qquad
      b_{hj} = A_h \operatorname{softplus}(\delta_{jh})\ \ (\texttt{"log"}) \quad\text{or}\quad
      \exp\!\big(A_h \operatorname{softplus}(\delta_{jh})\big)\ \ (\texttt{"exp"}).$$

    Args:
        v: values ``(B, H_kv, L, D)``.
        weight: $W_\delta$, ``(H_kv, H_kv * D)`` (an ``nn.Linear(H_kv * D, H_kv)``'s weight).
        a: $A$, ``(H_kv,)`` (zeros at initialisation).
        delta_bias: optional ``(H_kv,)`` bias $c$ of that linear map (the official code has none by default).
        form: ``"log"`` (the official code since October 2025) or ``"exp"`` (the paper).

    Returns:
        ``(B, H_kv, 1, L)``, one bias per key and key/value head, in the dtype of ``v``.
    """
    check_tensor("v", v, ndim=4)
    check_tensor("weight", weight, ndim=2)
    check_tensor("a", a, ndim=1)
    _check_form(form)
    b, hkv, length, d = v.shape
    if weight.shape != (hkv, hkv * d):
        raise ValueError(f"weight: expected W_delta of shape (H_kv, H_kv * D) = {(hkv, hkv * d)}, "
                         f"got {tuple(weight.shape)}")
    if a.shape != (hkv,):
        raise ValueError(f"a: expected one value per key/value head, shape ({hkv},), got {tuple(a.shape)}")
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, ndim=1)
        if delta_bias.shape != (hkv,):
            raise ValueError(f"delta_bias: expected shape ({hkv},), got {tuple(delta_bias.shape)}")
    # flat(V)_j: token j's values of every key/value head, (B, L, H_kv * D)
    flat = v.transpose(1, 2).reshape(b, length, hkv * d)
    # delta = W_delta flat(V) (+ c): (B, L, H_kv)
    delta = nn.functional.linear(flat, weight, delta_bias)
    # b = A softplus(delta), one per (key/value head, key)
    log_bias = a * nn.functional.softplus(delta)
    bias = log_bias if form == "log" else torch.exp(log_bias)
    return bias.transpose(1, 2)[:, :, None, :]


# ------------------------------------------------------------------------------------------------
# 2. the selection
# ------------------------------------------------------------------------------------------------


def visible_keys(q_len: int, k_len: int, *, causal: bool = True, device=None) -> torch.Tensor:
    """``(Lq, Lk)`` bool: the keys a query may see at all (causal: bottom-right aligned, as :mod:`attnlib.masks`)."""
    if causal:
        return causal_mask(q_len, k_len, device=device)
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device)


def block_smooth(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Keep a block of ``block_size`` consecutive keys whole iff *more than half* of it is selected.

    $$\tilde M_{ij} = \Big[\,2 \sum_{j' \in \text{blk}(j)} M_{ij'} > |\text{blk}(j)|\,\Big],$$

    per query row; the ragged last block is judged against its own length. Shapes: ``mask (..., Lk)`` bool,
    returns the same shape (a new tensor).
    """
    check_tensor("mask", mask, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a boolean tensor, got {mask.dtype}")
    check_positive_int("block_size", block_size)
    length = mask.shape[-1]
    starts = torch.arange(length, device=mask.device) // block_size
    # selected keys per block and block sizes, (..., num_blocks)
    counts = torch.zeros(*mask.shape[:-1], -(-length // block_size), dtype=torch.long, device=mask.device)
    counts.scatter_add_(-1, starts.expand(mask.shape), mask.long())
    sizes = torch.bincount(starts)
    keep = 2 * counts > sizes
    return keep.gather(-1, starts.expand(mask.shape))


def dynamic_mask(bias: torch.Tensor, window: int, *, q_len: int | None = None, causal: bool = True,
                 block_size: int | None = None) -> torch.Tensor:
    r"""DMA's selection: each query keeps the (at most) ``window`` visible keys with the largest bias.

    $$M_{ij} = [\,j \in \mathcal V_i\,]\ \big[\,b_j \text{ is among the } w \text{ largest of }
      \{b_{j'} : j' \in \mathcal V_i\}\,\big],$$

    computed on the detached bias with the invisible entries set to the dtype's most negative finite value,
    which is never kept (as the official ``topk_mask``); applied only when ``Lk > window`` (else every visible
    key is kept); then optionally :func:`block_smooth`, and visibility again. Ties are broken by
    ``torch.topk``, in no promised order.

    Args:
        bias: ``(B, H, 1, Lk)``, one value per key (:func:`dynamic_bias`).
        window: $w \ge 1$, keys kept per query.
        q_len: queries ``Lq`` (default ``Lk``, self-attention); causal queries are the last ``Lq`` positions.
        causal: query $i$ sees only keys $j \le i + L_k - L_q$.
        block_size: optional smoothing block $\beta$ along the keys.

    Returns:
        ``(B, H, Lq, Lk)`` bool, ``True`` = may attend.
    """
    _check_key_bias(bias)
    check_positive_int("window", window)
    check_bool("causal", causal)
    _check_block_size(block_size)
    b, h, _, k_len = bias.shape
    q_len = k_len if q_len is None else q_len
    check_positive_int("q_len", q_len)
    visible = visible_keys(q_len, k_len, causal=causal, device=bias.device)
    if k_len <= window:
        # top-k only when the keys outnumber the budget: every visible key is kept
        return visible.expand(b, h, q_len, k_len).clone()
    lowest = torch.finfo(bias.dtype).min
    # the detached bias of every (query, key), invisible keys at the dtype's minimum
    scores = bias.detach().expand(b, h, q_len, k_len).masked_fill(~visible, lowest)
    values, indices = scores.topk(window, dim=-1, largest=True, sorted=False)
    # entries at the minimum (invisible keys picked to fill the budget) are never kept
    mask = torch.zeros(b, h, q_len, k_len, dtype=torch.bool, device=bias.device)
    mask.scatter_(-1, indices, values != lowest)
    if block_size is not None and block_size > 1:
        mask = block_smooth(mask, block_size) & visible
    return mask


def key_lifetimes(bias: torch.Tensor, window: int) -> torch.Tensor:
    r"""When each key leaves the causal top-``window`` selection: $e_j$ such that $M_{ij} = [\,j \le i < e_j\,]$.

    Keys are ranked by bias (larger first; on a tie the earlier key first). Key $j$ is kept by query $i \ge j$
    while fewer than $w$ stronger keys lie in $[0, i]$, so $e_j$ is the $w$-th smallest position among the
    keys stronger than $j$ ($L$ if there are fewer than $w$ of them), and $e_j = j$ for a key never kept. Computed in one
    left-to-right scan with a min-heap of the $w$ strongest keys so far: when key $i$ arrives and the heap holds
    $w + 1$ keys, the weakest leaves for good and its end is $i$ (a key stronger than it can only come later).
    $O(L \log w)$ per row, no sort and no $L^2$ matrix.

    Args:
        bias: ``(..., L)`` one value per key (e.g. ``(B, H, 1, L)``), causal self-attention.
        window: $w \ge 1$.

    Returns:
        ``(..., L)`` int64 on the bias's device.
    """
    check_tensor("bias", bias)
    check_positive_int("window", window)
    rows = bias.detach().reshape(-1, bias.shape[-1]).double().cpu()
    length = rows.shape[-1]
    ends = torch.full(rows.shape, length, dtype=torch.long)
    for r, row in enumerate(rows.tolist()):
        # min-heap of (bias, -position): the weakest key on top (smaller bias; on a tie the later key)
        heap: list[tuple[float, int]] = []
        for i, b in enumerate(row):
            heapq.heappush(heap, (b, -i))
            if len(heap) > window:
                _, minus_j = heapq.heappop(heap)
                ends[r, -minus_j] = i  # evicted when key i arrives (i itself when it is the weakest)
    return ends.reshape(bias.shape).to(bias.device)


def lifetime_mask(ends: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    r"""The causal selection from the lifetimes: $M_{ij} = [\,j \le i < e_j\,]$, ``(..., L) -> (..., L, L)`` bool."""
    check_tensor("ends", ends, floating=False)
    length = ends.shape[-1]
    q_len = length if q_len is None else q_len
    i = torch.arange(length - q_len, length, device=ends.device)[:, None]
    j = torch.arange(length, device=ends.device)
    return (j <= i) & (i < ends[..., None, :])


def lifetime_tile_counts(ends: torch.Tensor, block_m: int, block_n: int) -> dict[str, int]:
    r"""Tiles of :func:`lifetime_mask` (causal self-attention) without forming the $L^2$ mask.

    Key $j$ is allowed for the rows $[j, e_j)$, so a tile of rows $[r_0, r_1)$ and keys $U$ is *visited* iff some
    $j \in U$ has $\max(j, r_0) < \min(e_j, r_1)$, and *full* iff every $j \in U$ has $j \le r_0$ and
    $e_j \ge r_1$ (and $U$ is not the ragged last key block), the rules of
    :func:`attnlib.sparse.block_sparse.tile_classes`. ``ends (L,)``; returns the dict of
    :func:`attnlib.sparse.block_sparse.tile_counts`; $O(L\,T_q)$ work.
    """
    check_tensor("ends", ends, ndim=1, floating=False)
    check_positive_int("block_m", block_m)
    check_positive_int("block_n", block_n)
    length = ends.shape[0]
    tq, tk = -(-length // block_m), -(-length // block_n)
    pad = tk * block_n - length
    # padded keys: position past the end, lifetime empty
    starts = torch.nn.functional.pad(torch.arange(length, device=ends.device), (0, pad), value=length)
    stops = torch.nn.functional.pad(ends.long(), (0, pad), value=0)
    starts, stops = starts.view(1, tk, block_n), stops.view(1, tk, block_n)
    r0 = (torch.arange(tq, device=ends.device) * block_m).view(tq, 1, 1)
    r1 = torch.clamp(r0 + block_m, max=length)
    visited = (torch.maximum(starts, r0) < torch.minimum(stops, r1)).any(-1)
    ragged = torch.zeros(tk, dtype=torch.bool, device=ends.device)
    ragged[-1] = pad > 0
    full = ((starts <= r0) & (stops >= r1)).all(-1) & ~ragged
    v, f = int(visited.sum()), int((visited & full).sum())
    return dict(dense=tq * tk, visited=v, full=f, partial=v - f)


def window_mask(q_len: int, k_len: int, window: int, *, causal: bool = True, device=None) -> torch.Tensor:
    """The sliding-window baseline with the same budget: each query sees its ``window`` most recent visible keys,
    ``(Lq, Lk)`` bool (lesson 40's causal window). Non-causal: ``window // 2`` keys on the left, the rest on the
    right (one fewer for an even window), cut at the ends."""
    check_positive_int("window", window)
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    if causal:
        return (j <= i) & (j > i - window)
    left, right = window // 2, window // 2 + window % 2 - 1
    return (j >= i - left) & (j <= i + right)


# ------------------------------------------------------------------------------------------------
# 3. attention
# ------------------------------------------------------------------------------------------------


def dynamic_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, window: int, *,
                           causal: bool = True, block_size: int | None = None, scale: float | None = None,
                           backend: str = "reference", return_weights: bool = False, return_mask: bool = False,
                           block_m: int | None = None, block_n: int | None = None):
    r"""Dynamic mask attention $O = \operatorname{softmax}(s\,QK^\top + \mathbf 1 b^\top \text{ masked by } M)\,V$.

    $M$ is :func:`dynamic_mask` of ``bias`` (per key/value head, shared by its query heads).

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)``.
        bias: ``(B, Hkv, 1, Lk)`` (:func:`dynamic_bias`); differentiable.
        window, causal, block_size: as in :func:`dynamic_mask`.
        scale: default $1/\sqrt D$.
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask and the bias) or ``"kernel"`` (the
            block-sparse Triton kernel with ``key_bias=``, which skips the tiles the mask empties;
            ``16 <= D <= 128``).
        return_weights: also return the weights ``(B, Hq, Lq, Lk)`` (reference backend).
        return_mask: also return the selection ``(B, Hkv, Lq, Lk)`` bool.
        block_m, block_n: the kernel's tiles (powers of two >= 16; default: the kernel's own).

    Returns:
        ``out (B, Hq, Lq, D)``; with ``return_weights`` and/or ``return_mask`` a tuple ``(out, weights, mask)``
        of those asked for, in that order.
    """
    b, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_scale(scale)
    _check_key_bias(bias)
    if bias.shape != (b, hkv, 1, lk):
        raise ValueError(f"bias: expected one value per key and key/value head, (B, Hkv, 1, Lk) = "
                         f"{(b, hkv, 1, lk)}, got {tuple(bias.shape)}")
    check_backend(backend)
    mask = dynamic_mask(bias, window, q_len=lq, causal=causal, block_size=block_size)
    # S = s Q K^T + 1 b^T, masked by M (query head h reads the selection and bias of head h // (Hq / Hkv)); softmax; V
    result = sparse_attention(q, k, v, repeat_kv(mask, hq // hkv), backend=backend, scale=scale, key_bias=bias,
                              block_m=block_m, block_n=block_n, return_weights=return_weights)
    out, weights = result if return_weights else (result, None)
    extra = ((weights,) if return_weights else ()) + ((mask,) if return_mask else ())
    return (out, *extra) if extra else out


# ------------------------------------------------------------------------------------------------
# the token mixer
# ------------------------------------------------------------------------------------------------


class DynamicMaskAttention(MultiHeadAttention):
    r"""Dynamic mask attention as a token mixer ``(B, L, dim) -> (B, L, dim)``.

    The projections of :class:`attnlib.MultiHeadAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``),
    plus DMA's $W_\delta$ (``delta_proj``, ``nn.Linear(H_kv d, H_kv)``) and $A$ (``A``, zeros), then
    :func:`dynamic_bias` and :func:`dynamic_mask_attention`. The official model also puts an RMSNorm and RoPE on
    $q, k$ (the Doge architecture); they are not part of DMA and are left out here.

    Args:
        dim, num_heads, num_kv_heads, bias: as in :class:`attnlib.MultiHeadAttention`.
        causal: each token sees only itself and earlier tokens.
        window: $w$, keys kept per query (default 8, toy scale; the paper uses 2048).
        block_size: optional block smoothing $\beta$.
        form: ``"log"`` (the code's additive $A\operatorname{softplus}(\delta)$, default) or ``"exp"`` (the paper's).
        selection: ``"dynamic"`` (DMA) or ``"window"`` (the last ``window`` keys, a sliding window with the
            same budget and the same bias, for comparisons).
        backend: ``"reference"`` or ``"kernel"`` (the block-sparse Triton kernel; head dim 16 to 128).

    After each forward pass ``last_bias (B, H_kv, 1, L)``, ``last_mask (B, H_kv, L, L)`` and (reference backend)
    ``last_weights (B, H, L, L)`` hold what it used, detached.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, causal: bool = True,
                 window: int = 8, block_size: int | None = None, form: str = "log", selection: str = "dynamic",
                 backend: str = "reference", bias: bool = False):
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, causal=False, bias=bias)
        check_bool("causal", causal)
        check_positive_int("window", window)
        _check_block_size(block_size)
        _check_form(form)
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
        check_backend(backend)
        if backend == "kernel" and not 16 <= self.head_dim <= 128:
            raise ValueError(f"dim: the kernel backend needs a head dim (dim / num_heads) from 16 to 128, "
                             f"got {dim} / {num_heads} = {self.head_dim}")
        self.pattern_causal, self.window, self.block_size = causal, window, block_size
        self.form, self.selection, self.sparse_backend = form, selection, backend
        hkv = self.num_kv_heads
        # W_delta: flat(V)_j (H_kv d) -> delta_j (H_kv)
        self.delta_proj = nn.Linear(hkv * self.head_dim, hkv, bias=bias)
        # A = 0 at initialisation: every key starts with the same bias
        self.A = nn.Parameter(torch.zeros(hkv))
        self.last_bias: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def key_bias(self, v: torch.Tensor) -> torch.Tensor:
        """:func:`dynamic_bias` of the values ``v (B, H_kv, L, d)`` with this module's parameters: ``(B, H_kv, 1, L)``.
        """
        return dynamic_bias(v, self.delta_proj.weight, self.A, delta_bias=self.delta_proj.bias, form=self.form)

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        """Mix the tokens of ``x (B, L, dim)``; with ``return_weights`` also the weights ``(B, H, L, L)``."""
        q, k, v = self.project(x)
        bias = self.key_bias(v)
        if self.selection == "window":
            length = x.shape[1]
            mask = window_mask(length, length, self.window, causal=self.pattern_causal, device=x.device)
            mask = mask.expand(x.shape[0], self.num_kv_heads, length, length)
            groups = self.num_heads // self.num_kv_heads
            out, weights = attention(q, k, v, mask=repeat_kv(mask, groups), bias=repeat_kv(bias, groups),
                                     return_weights=True)
        else:
            backend = self.sparse_backend
            if backend == "kernel" and return_weights:
                raise ValueError("return_weights: the 'kernel' backend never forms the weights; use backend='reference'")
            result = dynamic_mask_attention(q, k, v, bias, self.window, causal=self.pattern_causal,
                                            block_size=self.block_size, backend=backend,
                                            return_weights=backend == "reference", return_mask=True)
            out, weights, mask = result if backend == "reference" else (result[0], None, result[1])
        self.last_bias, self.last_mask = bias.detach(), mask.detach()
        self.last_weights = weights.detach() if weights is not None else None
        out = self.merge_heads(out)
        return (out, weights) if return_weights else out

    def extra_repr(self) -> str:
        return (f"window={self.window}, block_size={self.block_size}, form={self.form!r}, "
                f"selection={self.selection!r}, causal={self.pattern_causal}")


@register_mechanism("dma", paper="P15", lesson="45", supports_causal=True,
                    summary="dynamic mask attention (Shi et al., 2025): each query keeps the window= keys with the "
                            "largest value-derived bias A softplus(W_delta flat(V)), also added to the logits")
def build_dynamic_mask_attention(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return DynamicMaskAttention(dim, num_heads, causal=causal, **options)


# ------------------------------------------------------------------------------------------------
# the benchmark mask and the pictures
# ------------------------------------------------------------------------------------------------


def benchmark_mask(length: int, *, device="cpu", seed: int = 0, window: int = 2048,
                   block_size: int | None = None) -> torch.Tensor:
    r"""A DMA mask at ``length`` tokens for the block-sparse benchmark, ``(length, length)`` bool.

    Mimics the paper's kernel benchmark (``benchmarks/forward_performance.py`` of the official code): causal
    self-attention, a random per-key bias $b_j \sim \mathcal N(0, 1)$ (float32, seeded), each query keeping its
    top $w = 2048$ visible keys. **Not block-smoothed** by default: that is the selection DMA computes. (The
    official CUDA benchmark smooths with blocks of 64; with an independent random bias that empties the rows soon
    after $2w$, since a block is kept only if more than half of it is in the top $w$: pass
    ``block_size=64`` to see it.) Built from :func:`key_lifetimes` in $O(L \log w)$ plus one $L^2$ comparison,
    so 32k tokens take well under a second on a GPU.
    """
    check_positive_int("length", length)
    check_positive_int("window", window)
    _check_block_size(block_size)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(length, generator=g)
    ends = key_lifetimes(bias, window).to(device)
    mask = lifetime_mask(ends) if length > window else causal_mask(length, device=device)
    if block_size is not None and block_size > 1 and length > window:
        mask = block_smooth(mask, block_size) & causal_mask(length, device=device)
    return mask


def plot_selection(bias: torch.Tensor, mask_row: torch.Tensor, weights_row: torch.Tensor, *, query: int,
                   labels=None, axes=None, title: str | None = None):
    """Two panels for one query: the bias of every key (kept keys dark, the rest light, future keys hidden) and
    the attention row. ``bias (L,)``, ``mask_row (L,)`` bool, ``weights_row (L,)``; returns the axes."""
    bias, mask_row, weights_row = (torch.as_tensor(x).detach().float().cpu() for x in (bias, mask_row, weights_row))
    length = bias.shape[0]
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(7.5, 4.2), sharex=True)
    positions = torch.arange(length)
    visible = positions <= query
    colors = ["black" if m else ("silver" if vis else "white") for m, vis in zip(mask_row.tolist(), visible.tolist())]
    axes[0].bar(positions.numpy(), torch.where(visible, bias, torch.zeros(())).numpy(), color=colors,
                edgecolor="grey", linewidth=0.5)
    axes[0].axvline(query + 0.5, color="tab:red", linewidth=1)
    axes[0].set_ylabel("bias $b_j$")
    axes[0].set_title(title or f"query {query}: {int(mask_row.sum())} keys kept (dark)")
    axes[1].bar(positions.numpy(), weights_row.numpy(), color="tab:blue")
    axes[1].axvline(query + 0.5, color="tab:red", linewidth=1)
    axes[1].set_ylabel("weight $P_{ij}$")
    axes[1].set_xlabel("key position $j$")
    if labels is not None:
        axes[1].set_xticks(range(length))
        axes[1].set_xticklabels([str(t) for t in labels], rotation=90, fontsize=7)
    return axes


def plot_lifetimes(ends: torch.Tensor, *, ax=None, title: str | None = None):
    """Each key's life in the causal top-``w`` selection: a bar from its position $j$ to $e_j$ (``ends (L,)``)."""
    ends = torch.as_tensor(ends).detach().cpu()
    length = ends.shape[0]
    ax = _axes(ax, size=(5.2, 3.8))
    for j, e in enumerate(ends.tolist()):
        if e > j:
            ax.plot([j, j], [j, min(e, length) - 1], color="black", linewidth=2, solid_capstyle="butt")
    ax.set_xlabel("key position $j$")
    ax.set_ylabel("queries $i$ that keep it")
    ax.set_xlim(-0.5, length - 0.5)
    ax.set_ylim(length - 0.5, -0.5)
    ax.set_title(title or f"{int((ends > torch.arange(length)).sum())} of {length} keys are ever kept")
    return ax

