r"""Lesson 46: rectified sparse attention, pooled compensation of the blocks a sparse mask drops (P18).

*Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation* (Liu, Li, Zhang, Chen and Gu,
2025, arXiv:2511.19835). The numerics follow the official code (BienLuky/Rectified-SpaAttn, commit 4b0aa10:
``rectified_spaattn/rectified_flux_attn.py`` and ``gapr_mask.py``); where this module departs from it, the
docstring of the function says so.

**Two biases of sparse attention.** Full attention gives query $i$ the weights $p_{ij} = e^{s_{ij}}/\sum_l e^{s_{il}}$.
A sparse mask keeps a set $K_i$ of keys and renormalises over it:

$$p^\text{sp}_{ij} = \frac{p_{ij}}{R_i}\ (j \in K_i), \qquad R_i = \sum_{j \in K_i} p_{ij} \le 1 .$$

(1) the kept (critical) weights are *amplified* by $1/R_i$, a bias $p^\text{sp}_{ij} - p_{ij} = (1 - R_i)\,p^\text{sp}_{ij}$
proportional to the sparse weight; (2) the dropped (non-critical) keys lose their mass $1 - R_i$ entirely. Exactly,

$$O_i = R_i\,O^\text{sp}_i + \sum_{j \notin K_i} p_{ij} v_j .$$

**Rectification.** Neither $R_i$ nor the dropped sum is known without full attention; both are estimated from
*pooled* queries and keys. The sequence is ``[visual tokens, text tokens]``; the $L_v$ visual tokens are cut
into blocks of $N_b$ tokens (block $j$ holds $n_j$ of them, $n_j = N_b$ except perhaps the last), and

1. **pooling**: $\bar q_i, \bar k_j, \bar v_j$ are the block means of the visual $q, k, v$; text keys stay unpooled;
2. **IPAR** (isolated-pooling attention reallocation): a pooled block stands for $n_j$ keys, so

   $$\hat p_{ij} = \frac{n_j\, e^{s\,\bar q_i\cdot\bar k_j}}{Z_i}, \qquad
     \hat p_{i,\text{text}} = \frac{\sum_t e^{s\,\bar q_i\cdot k_t}}{Z_i}, \qquad
     Z_i = \sum_j n_j e^{s\,\bar q_i\cdot\bar k_j} + \sum_t e^{s\,\bar q_i\cdot k_t},$$

   a softmax over $[s\,\bar q_i\cdot\bar k_j + \log n_j,\ s\,\bar q_i\cdot k_t]$ with the text entries summed;
3. **selection**: sort $\hat p_i$ in decreasing order and keep the first
   $n = \max(\#\{\text{cumsum} \le \tau\} + 1,\ \lfloor (1 - \text{drop})\,T_v\rfloor)$ entries, plus the curve-neighbour
   blocks and every text key (these are *computed*);
4. **GAPR** (gain-aware pooling rectification): with $\delta q = q - \bar q_i$ inside block $i$ and
   $\delta k = k - \bar k_j$ inside block $j$, the pooled logit is trusted only where

   $$\text{gain}_{ij} = M_i n_j\,|\bar q_i\cdot\bar k_j| \;>\;
     \text{err}_{ij} = M_i n_j\big(|\overline{|\delta q|}_i\cdot\bar k_j| + |\bar q_i\cdot\overline{|\delta k|}_j|\big);$$

5. **output**: with $C_i$ = computed $\cup$ untrusted blocks $\cup$ the text entry and $\hat R_i = \sum_{j\in C_i}\hat p_{ij}$,

   $$O_i = \hat R_i\,\operatorname{BlockSparseAttn}(Q_i; \text{computed}) + \sum_{j\notin C_i} \hat p_{ij}\,\bar v_j ,$$

   the same for every query row of block $i$; text queries use dense attention.

Tensors are ``(batch, heads, seq, head_dim)``. Visual tokens should come in an order where consecutive tokens
are spatial neighbours (:func:`gilbert_order`, a generalized Hilbert curve), so that a block is a compact patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .._checks import (
    check_backend,
    check_choice,
    check_int_tensor,
    check_non_negative_int,
    check_positive_int,
    check_qkv,
    check_scale,
    check_tensor,
)
from ..core import attention, compute_dtype, repeat_kv
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import plt
from .block_sparse import sparse_attention

MODES = ("sparse", "ipar", "ipar+pr", "rectified")


# --- argument checks --------------------------------------------------------------------------------


def _check_fraction(name: str, value, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return float(value)


def _check_pooling(q, k, block_size, num_text) -> int:
    """Check ``q, k (B, H, L, D)`` of one length and the block options; return the number of visual tokens."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if q.shape[:2] != k.shape[:2] or q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)} (self-attention, heads repeated), "
                         f"got {tuple(k.shape)}")
    check_positive_int("block_size", block_size)
    check_non_negative_int("num_text", num_text)
    if num_text >= q.shape[-2]:
        raise ValueError(f"num_text: expected fewer text tokens than the sequence length {q.shape[-2]}, got {num_text}")
    return q.shape[-2] - num_text


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= 3:
        raise ValueError(f"grid: expected (width,), (height, width) or (frames, height, width), got {shape!r}")
    for size in shape:
        check_positive_int("grid", size)
    return tuple(int(s) for s in shape)


# --- the generalized Hilbert curve ------------------------------------------------------------------


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def gilbert_order(height: int, width: int) -> torch.Tensor:
    r"""The cells of a ``height x width`` grid along a generalized Hilbert ("gilbert") curve.

    Returns ``(height * width,)`` long: entry $t$ is the raster index ``row * width + col`` of the $t$-th cell
    on the curve. Consecutive cells are always 8-neighbours (Chebyshev distance 1) and, except for at most one
    diagonal step on some grids with an odd side, 4-neighbours; aligned runs of the curve fill compact patches.

    The recursion (J. Červený's generalized Hilbert curve for rectangles of any size, the 2-D case of the
    3-D curve the official code uses) walks a rectangle given by a start corner, a major axis $a$ and a minor
    axis $b$: a strip one cell thick is walked straight; a rectangle much longer than wide is cut into two
    halves along $a$; otherwise it is cut into three parts, the classic Hilbert "up, across, down", with the
    cuts moved by one cell where needed so that each part has an even length and the walk stays connected.
    """
    check_positive_int("height", height)
    check_positive_int("width", width)
    cells: list[tuple[int, int]] = []

    def walk(x, y, ax, ay, bx, by):
        # (x, y) = (col, row) of the start corner; a = major axis, b = minor axis (vectors along the grid)
        length, thickness = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
        if thickness == 1:  # a single row along a
            cells.extend((x + t * dax, y + t * day) for t in range(length))
            return
        if length == 1:  # a single column along b
            cells.extend((x + t * dbx, y + t * dby) for t in range(thickness))
            return
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        if 2 * length > 3 * thickness:
            # long rectangle: two halves along a (the first half made even, so the walk can turn back)
            if abs(ax2 + ay2) % 2 and length > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            walk(x, y, ax2, ay2, bx, by)
            walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
        else:
            # up along b (half of it), across along a, back down: the Hilbert U
            if abs(bx2 + by2) % 2 and thickness > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            walk(x, y, bx2, by2, ax2, ay2)
            walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
            walk(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2), -(ay - ay2))

    if width >= height:
        walk(0, 0, width, 0, 0, height)
    else:
        walk(0, 0, 0, height, width, 0)
    return torch.tensor([row * width + col for col, row in cells], dtype=torch.long)


def raster_coordinates(shape: Sequence[int]) -> torch.Tensor:
    """``(prod(shape), len(shape))`` long: the grid coordinates of every token in raster order."""
    shape = _check_shape(shape)
    axes = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


def curve_order(shape: Sequence[int], *, curve: str = "gilbert") -> torch.Tensor:
    r"""The visual tokens of a ``(width,)``, ``(height, width)`` or ``(frames, height, width)`` grid in curve order.

    Returns ``(prod(shape),)`` long: entry $t$ is the raster index of the $t$-th token. ``curve="gilbert"``
    walks every frame along :func:`gilbert_order`, frame after frame (the official code uses one 3-D
    curve through the whole video; frame by frame keeps each 2-D block inside one frame, a simplification);
    ``curve="raster"`` is the identity (rows one after the other), for comparison.
    """
    shape = _check_shape(shape)
    check_choice("curve", curve, ("gilbert", "raster"))
    total = math.prod(shape)
    if curve == "raster" or len(shape) == 1:
        return torch.arange(total)
    height, width = shape[-2:]
    frames = shape[0] if len(shape) == 3 else 1
    frame = gilbert_order(height, width)
    return torch.cat([f * height * width + frame for f in range(frames)])


def block_neighbors(coords: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Which blocks touch in space: ``(T, T)`` bool, ``True`` where a token of block $i$ and a token of block $j$
    are neighbours on the grid (Chebyshev distance $\le 1$, the 8- or 26-neighbourhood), diagonal included.

    Args:
        coords: ``(L, ndim)`` long, the grid coordinates of the tokens *in sequence order* (e.g.
            ``raster_coordinates(shape)[curve_order(shape)]``); block $b$ holds tokens
            ``b * block_size ... (b + 1) * block_size - 1``.
        block_size: $N_b$.

    This is the official code's ``block_neighbor_list`` (``utils/jenga_gilbert.py``), vectorised.
    """
    check_int_tensor("coords", coords, ndim=2)
    check_positive_int("block_size", block_size)
    length, ndim = coords.shape
    num_blocks = -(-length // block_size)
    coords = coords.long()
    shape = tuple(int(c) + 1 for c in coords.max(0).values)
    # block id of every grid cell (-1 where no token sits)
    grid = torch.full(shape, -1, dtype=torch.long, device=coords.device)
    grid[tuple(coords.T)] = torch.arange(length, device=coords.device) // block_size
    adjacency = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=coords.device)
    for offset in torch.cartesian_prod(*[torch.tensor([-1, 0, 1])] * ndim).reshape(-1, ndim).tolist():
        # pairs (cell, cell + offset) that both lie in the grid
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(offset, shape))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(offset, shape))
        a, b = grid[src].reshape(-1), grid[dst].reshape(-1)
        both = (a >= 0) & (b >= 0)
        adjacency.view(-1).index_fill_(0, a[both] * num_blocks + b[both], True)
    return adjacency


def sequence_neighbors(num_blocks: int, *, device=None) -> torch.Tensor:
    """``(T, T)`` bool, ``|i - j| <= 1``: the curve neighbours of blocks of a 1-D sequence."""
    check_positive_int("num_blocks", num_blocks)
    i = torch.arange(num_blocks, device=device)
    return (i[:, None] - i[None, :]).abs() <= 1


# --- pooling, IPAR, selection, GAPR -----------------------------------------------------------------


def block_of_tokens(length: int, block_size: int, *, device=None) -> torch.Tensor:
    """``(length,)`` long: the block of every token, ``t // block_size``."""
    return torch.arange(length, device=device) // block_size


def block_counts(length: int, block_size: int, *, device=None) -> torch.Tensor:
    r"""``(T,)`` the number of tokens $n_j$ in each block, $T = \lceil L / N_b \rceil$ (only the last may be short)."""
    num_blocks = -(-length // block_size)
    counts = torch.full((num_blocks,), block_size, dtype=torch.long, device=device)
    counts[-1] = length - (num_blocks - 1) * block_size
    return counts


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Block means $\bar x_j = \frac{1}{n_j}\sum_{t \in j} x_t$: ``(..., L, D) -> (..., T, D)``.

    A short last block is averaged over the tokens it has. The official code pads the sequence with zeros to a
    multiple of $N_b$ and averages over $N_b$ (Wan) or assumes a multiple (Flux, Hunyuan); both agree when
    $N_b$ divides $L$.
    """
    length = x.shape[-2]
    counts = block_counts(length, block_size, device=x.device)
    blocks = block_of_tokens(length, block_size, device=x.device)
    sums = x.new_zeros(*x.shape[:-2], len(counts), x.shape[-1]).index_add(-2, blocks, x)
    return sums / counts.to(x.dtype)[:, None]


def min_blocks(num_blocks: int, drop_rate: float) -> int:
    r"""$\lfloor (1 - \text{drop})\,T_v \rfloor$, the floor of blocks the selection keeps.

    The scripts compute ``int((1 - drop) * T)``, which floating point can make one block short (drop 0.8 of
    100 blocks: ``int(19.999...) = 19``); this rounds the product to 9 digits first (20 there).
    """
    return math.floor(round((1.0 - drop_rate) * num_blocks, 9))


def ipar_weights(q: torch.Tensor, k: torch.Tensor, *, block_size: int, num_text: int = 0,
                 scale: float | None = None) -> torch.Tensor:
    r"""IPAR's implicit full attention of every visual query block, ``(B, H, T_v, T_v [+ 1])``.

    $$\hat p_{ij} = \operatorname{softmax}_j\big([\,s\,\bar q_i\cdot\bar k_j + \log n_j,\ s\,\bar q_i\cdot k_t\,]\big),$$

    then the text entries (if ``num_text > 0``) summed into one last column. Rows sum to 1. Written as in
    the code, $\hat p_{ij} = p_{ij} N_b / (\sum_l p_{il} N_b + \sum_t p_{it})$ with $p = \operatorname{softmax}(S)$ over
    [pooled blocks, text tokens]; the two forms are equal (a test checks it).

    Args:
        q, k: ``(B, H, L, D)``, the sequence ``[L_v visual tokens, num_text text tokens]``.
        block_size: $N_b$.
        num_text: text tokens at the end (0: a visual-only sequence, as Wan's self-attention; then, with
            $N_b \mid L_v$, $\hat p$ is the plain softmax of the pooled logits).
        scale: $s$, default $1/\sqrt{D}$.
    """
    num_visual = _check_pooling(q, k, block_size, num_text)
    check_scale(scale)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_pool = pool_blocks(q[..., :num_visual, :], block_size)
    k_pool = pool_blocks(k[..., :num_visual, :], block_size)
    counts = block_counts(num_visual, block_size, device=q.device)
    # pooled logits + log n_j: one pooled key stands for n_j keys
    logits = torch.matmul(q_pool, k_pool.transpose(-2, -1)) * s + counts.to(q_pool.dtype).log()
    if num_text == 0:
        return torch.softmax(logits, dim=-1)
    text_logits = torch.matmul(q_pool, k[..., num_visual:, :].transpose(-2, -1)) * s
    weights = torch.softmax(torch.cat([logits, text_logits], dim=-1), dim=-1)
    num_blocks = logits.shape[-1]
    return torch.cat([weights[..., :num_blocks], weights[..., num_blocks:].sum(-1, keepdim=True)], dim=-1)


def select_blocks(weights: torch.Tensor, *, drop_rate: float, tau: float, num_visual_blocks: int | None = None
                  ) -> torch.Tensor:
    r"""The selection rule: keep the largest entries of each row until their sum passes $\tau$, and at least
    $\lfloor (1-\text{drop})\,T_v \rfloor$ of them.

    Sort $\hat p_i$ decreasingly; keep the first $n = \min\big(E,\ \max(\#\{\text{cumsum} \le \tau\} + 1,\ \lfloor(1 - \text{drop})T_v\rfloor)\big)$
    entries ($E$ entries per row). The ``+ 1`` keeps the entry that crosses $\tau$. With text, the text entry
    is sorted with the blocks and uses a slot when it is among the first $n$ (as in the code).

    Args:
        weights: ``(..., E)`` rows of $\hat p$ (:func:`ipar_weights`).
        drop_rate: share of the visual blocks that may be dropped, in ``[0, 1)``.
        tau: the cumulative-mass threshold, in ``(0, 1]``. The official scripts pass 0.3; the function's own
            default in the code is 0.5, overridden by every script.
        num_visual_blocks: $T_v$ for the floor (default ``E``).

    Returns ``(..., E)`` bool. Ties keep the earlier entry (stable sort).
    """
    check_tensor("weights", weights)
    drop_rate = _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    tau = _check_fraction("tau", tau, low_open=True, high_open=False)
    entries = weights.shape[-1]
    floor = min_blocks(entries if num_visual_blocks is None else num_visual_blocks, drop_rate)
    sorted_weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    # n = max(#{cumsum <= tau} + 1, floor), at most E
    count = (sorted_weights.cumsum(-1) <= tau).sum(-1) + 1
    keep = count.clamp(min=floor, max=entries)
    in_sorted_order = torch.arange(entries, device=weights.device) < keep[..., None]
    return torch.zeros_like(in_sorted_order).scatter(-1, order, in_sorted_order)


def gapr_untrusted(q: torch.Tensor, k: torch.Tensor, *, block_size: int, num_text: int = 0) -> torch.Tensor:
    r"""GAPR: the block pairs whose pooled logit is not trusted, ``(B, H, T_v, T_v)`` bool (``gain <= err``).

    $$\text{err}_{ij} = |\overline{|\delta q|}_i\cdot\bar k_j| + |\bar q_i\cdot\overline{|\delta k|}_j|, \qquad
      \text{gain}_{ij} = |\bar q_i\cdot\bar k_j|,$$

    where $\overline{|\delta q|}_i = \frac{1}{M_i}\sum_{a\in i} |q_a - \bar q_i|$ (elementwise absolute value) and the same
    for keys. On unscaled dot products, as the code; the factor $M_i n_j$ both carry, and any scale $s$,
    cancel in the comparison. Only the visual tokens take part (text keys are never pooled).
    """
    num_visual = _check_pooling(q, k, block_size, num_text)
    qv, kv = q[..., :num_visual, :], k[..., :num_visual, :]
    blocks = block_of_tokens(num_visual, block_size, device=q.device)
    q_pool, k_pool = pool_blocks(qv, block_size), pool_blocks(kv, block_size)
    # mean |delta| per block: the spread of the tokens around their block mean
    q_spread = pool_blocks((qv - q_pool[..., blocks, :]).abs(), block_size)
    k_spread = pool_blocks((kv - k_pool[..., blocks, :]).abs(), block_size)
    err = (torch.matmul(q_spread, k_pool.transpose(-2, -1)).abs()
           + torch.matmul(q_pool, k_spread.transpose(-2, -1)).abs())
    gain = torch.matmul(q_pool, k_pool.transpose(-2, -1)).abs()
    return gain <= err


# --- the plan: which blocks are computed, compensated, folded ---------------------------------------


@dataclass
class RectifiedPlan:
    r"""What rectified sparse attention decided for every visual query block.

    Shapes (``E = T_v + 1`` with text, else ``T_v``): ``weights (B, H, T_v, E)`` $\hat p$; ``selected (B, H, T_v, E)``
    the selection rule's entries; ``computed (B, H, T_v, T_v)`` the visual blocks the sparse kernel visits
    (selected or neighbours); ``untrusted (B, H, T_v, T_v)`` GAPR's verdict; ``covered (B, H, T_v, T_v)`` the blocks
    of $C$ (those not compensated by pooling); ``factor (B, H, T_v)`` $\hat R$ (1 in mode ``"sparse"``);
    ``compensation (B, H, T_v, Dv)`` $\sum_{j\notin C}\hat p_{ij}\bar v_j$ (or ``None``).
    """

    mode: str
    block_size: int
    num_visual: int
    num_text: int
    weights: torch.Tensor
    selected: torch.Tensor
    computed: torch.Tensor
    untrusted: torch.Tensor
    covered: torch.Tensor
    factor: torch.Tensor
    compensation: torch.Tensor | None

    @property
    def num_blocks(self) -> int:
        return self.computed.shape[-1]

    def token_mask(self) -> torch.Tensor:
        """``(B, H, L, L)`` bool, the token-level mask of the sparse part: visual queries see the keys of their
        computed blocks and every text key; text queries see everything."""
        blocks = block_of_tokens(self.num_visual, self.block_size, device=self.computed.device)
        visual = self.computed[..., blocks, :][..., blocks]
        b, h = visual.shape[:2]
        length = self.num_visual + self.num_text
        mask = torch.ones(b, h, length, length, dtype=torch.bool, device=visual.device)
        mask[..., :self.num_visual, :self.num_visual] = visual
        return mask

    def density(self) -> float:
        """The share of visual-visual block pairs computed (what the drop rate controls)."""
        return self.computed.float().mean().item()


def rectified_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *, block_size: int = 128,
                   drop_rate: float = 0.75, tau: float = 0.3, num_text: int = 0, neighbors: torch.Tensor | None = None,
                   mode: str = "rectified", scale: float | None = None) -> RectifiedPlan:
    r"""Pool, reallocate (IPAR), select, check the gain (GAPR) and build $\hat R$ and the compensation.

    Args: as :func:`rectified_sparse_attention` (``v`` is needed for the compensation of modes
    ``"ipar+pr"`` and ``"rectified"``). ``k``, ``v`` must have as many heads as ``q`` here.

    Mode by mode ($K$ = computed blocks and the text entry):

    * ``"sparse"``: plain block-sparse attention, $\hat R = 1$, no compensation;
    * ``"ipar"``: $C = K$, $\hat R = \sum_{j \in K}\hat p_{ij}$, no compensation (only the critical bias rectified);
    * ``"ipar+pr"``: $C = K$ and every other block compensated by pooling (no gain check);
    * ``"rectified"``: $C = K \cup$ untrusted (the paper's method, as the code).
    """
    check_choice("mode", mode, MODES)
    num_visual = _check_pooling(q, k, block_size, num_text)
    num_blocks = -(-num_visual // block_size)
    if neighbors is not None:
        check_tensor("neighbors", neighbors, ndim=2, floating=False)
        if neighbors.dtype != torch.bool or tuple(neighbors.shape) != (num_blocks, num_blocks):
            raise ValueError(f"neighbors: expected a ({num_blocks}, {num_blocks}) bool tensor (one row per visual "
                             f"block of {block_size} tokens), got {neighbors.dtype} of shape {tuple(neighbors.shape)}")
    weights = ipar_weights(q, k, block_size=block_size, num_text=num_text, scale=scale)
    with torch.no_grad():
        selected = select_blocks(weights.detach(), drop_rate=drop_rate, tau=tau, num_visual_blocks=num_blocks)
        computed = selected[..., :num_blocks].clone()
        if neighbors is not None:
            computed |= neighbors.to(computed.device)
        untrusted = gapr_untrusted(q.detach(), k.detach(), block_size=block_size, num_text=num_text)
        covered = computed | untrusted if mode == "rectified" else computed
    factor, compensation = None, None
    if mode == "sparse":
        factor = weights.new_ones(weights.shape[:-1])
    else:
        block_weights = weights[..., :num_blocks]
        # R = sum over C of p_hat (the text entry is always in C)
        factor = (block_weights * covered).sum(-1) + (weights[..., num_blocks] if num_text else 0.0)
        if mode != "ipar":
            if v is None:
                raise ValueError(f"v: mode {mode!r} compensates the dropped blocks with pooled values; pass v")
            v_pool = pool_blocks(v[..., :num_visual, :], block_size)
            # sum over j not in C of p_hat_ij v_bar_j
            compensation = torch.matmul(block_weights * ~covered, v_pool.to(block_weights.dtype))
    return RectifiedPlan(mode, block_size, num_visual, num_text, weights, selected, computed, untrusted, covered,
                         factor, compensation)


def apply_rectification(sparse_out: torch.Tensor, plan: RectifiedPlan) -> torch.Tensor:
    r"""$O_i = \hat R_i\,O^\text{sp}_i + \sum_{j\notin C}\hat p_{ij}\bar v_j$ on the visual rows; text rows unchanged.

    ``sparse_out (B, H, L, Dv)`` is the block-sparse output, normalised over the computed keys.
    """
    if plan.mode == "sparse":
        return sparse_out
    blocks = block_of_tokens(plan.num_visual, plan.block_size, device=sparse_out.device)
    visual = sparse_out[..., :plan.num_visual, :]
    rows = plan.factor[..., blocks, None].to(visual.dtype)
    # O_i = R_i O_sparse_i (+ the pooled compensation, one row per query block)
    out = visual * rows
    if plan.compensation is not None:
        out = out + plan.compensation[..., blocks, :].to(visual.dtype)
    return torch.cat([out, sparse_out[..., plan.num_visual:, :]], dim=-2)


def rectified_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 128,
                               drop_rate: float = 0.75, tau: float = 0.3, num_text: int = 0,
                               neighbors: torch.Tensor | None = None, mode: str = "rectified",
                               backend: str = "reference", scale: float | None = None, return_plan: bool = False):
    r"""Rectified sparse attention (Rectified SpaAttn, arXiv:2511.19835), bidirectional.

    $$O_i = \hat R_i\,\operatorname{softmax}\big(s\,Q_iK_{\mathcal K_i}^\top\big)V_{\mathcal K_i} + \sum_{j\notin C_i}\hat p_{ij}\,\bar v_j$$

    for the visual query rows of block $i$ ($\mathcal K_i$: the tokens of its computed blocks and the text keys),
    and dense attention for the text rows. See the module docstring for $\hat p$, the selection, GAPR and $C$.

    Args:
        q: ``(B, H, L, D)``; ``k, v``: ``(B, Hkv, L, D|Dv)`` (``Hkv`` divides ``H``). The sequence is
            ``[L_v visual tokens in curve order, num_text text tokens]``.
        block_size: $N_b$ (the official code: 128).
        drop_rate: in ``[0, 1)``; the selection keeps at least $\lfloor(1-\text{drop})T_v\rfloor$ blocks
            (HunyuanVideo 0.8, Wan 2.1 0.75 in the official scripts).
        tau: cumulative-mass threshold of the selection (0.3 in the official scripts).
        num_text: text tokens at the end of the sequence (0: visual only).
        neighbors: optional ``(T_v, T_v)`` bool, blocks always computed (curve neighbours, :func:`block_neighbors`).
        mode: ``"rectified"`` (default), ``"ipar+pr"``, ``"ipar"`` or ``"sparse"`` (see :func:`rectified_plan`).
        backend: ``"reference"`` (:func:`attnlib.attention` with the token mask) or ``"kernel"`` (the block-sparse
            Triton kernel :func:`kernels.block_sparse.block_sparse_attention`; head dim 16 to 128).
        scale: $s$, default $1/\sqrt D$.
        return_plan: also return the :class:`RectifiedPlan`.

    Returns ``(B, H, L, Dv)`` (and the plan). Differentiable in ``q, k, v`` for a fixed selection (the block
    choices are discrete, made without gradient).
    """
    b, h, hkv, lq, lk, d = check_qkv(q, k, v)
    if lq != lk:
        raise ValueError(f"q, k: expected self-attention (as many queries as keys), got {lq} queries and {lk} keys")
    check_scale(scale)
    check_positive_int("block_size", block_size)
    check_non_negative_int("num_text", num_text)
    if num_text >= lq:
        raise ValueError(f"num_text: expected fewer text tokens than the sequence length {lq}, got {num_text}")
    check_choice("mode", mode, MODES)
    check_backend(backend)
    drop_rate = _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    tau = _check_fraction("tau", tau, low_open=True, high_open=False)
    work = compute_dtype(q.dtype)
    k_all, v_all = repeat_kv(k, h // hkv), repeat_kv(v, h // hkv)
    plan = rectified_plan(q.to(work), k_all.to(work), v_all.to(work), block_size=block_size, drop_rate=drop_rate,
                          tau=tau, num_text=num_text, neighbors=neighbors, mode=mode, scale=scale)
    sparse_out = sparse_attention(q, k, v, plan.token_mask(), backend=backend, scale=scale)
    out = apply_rectification(sparse_out.to(work), plan).to(q.dtype)
    return (out, plan) if return_plan else out


# --- what a mask does to full attention: the two biases ---------------------------------------------


def sparse_biases(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None) -> dict:
    r"""The two biases of renormalising over ``mask``, measured against full attention.

    Returns a dict of tensors: ``full`` $p$ and ``sparse`` $p^\text{sp}$ ``(B, H, L, L)``; ``kept`` $R_i$
    ``(B, H, L)``; ``amplification`` $p^\text{sp}_{ij}/p_{ij}$ on the kept entries (equal to $1/R_i$, ``nan``
    elsewhere); ``lost`` $1 - R_i$.
    """
    dummy = torch.zeros_like(k[..., :1])
    _, full = attention(q, k, dummy, scale=scale, return_weights=True)
    _, sparse = attention(q, k, dummy, mask=mask, scale=scale, return_weights=True)
    kept = (full * mask).sum(-1)
    amplification = torch.where(mask & (full > 0), sparse / full.clamp_min(1e-300), torch.full_like(full, math.nan))
    return dict(full=full, sparse=sparse, kept=kept, amplification=amplification, lost=1.0 - kept)


def exact_kept_mass(q: torch.Tensor, k: torch.Tensor, plan: RectifiedPlan, *,
                    scale: float | None = None) -> torch.Tensor:
    r"""The true $R$ that $\hat R$ estimates: full attention's mass on the covered keys, averaged over the
    rows of each visual query block, ``(B, H, T_v)``."""
    covered = replace(plan, computed=plan.covered).token_mask()
    dummy = torch.zeros_like(k[..., :1])
    _, full = attention(q, k, dummy, scale=scale, return_weights=True)
    kept = (full * covered)[..., :plan.num_visual, :].sum(-1)
    return pool_blocks(kept[..., None], plan.block_size)[..., 0]


def effective_weights(q: torch.Tensor, k: torch.Tensor, plan: RectifiedPlan, *, scale: float | None = None
                      ) -> torch.Tensor:
    r"""The attention map the rectified output implies for the visual query rows, ``(B, H, L_v, L)``.

    $A_{ij} = \hat R_i\,p^\text{sp}_{ij}$ on the computed keys, $\hat p_{i,b(j)}/n_{b(j)}$ on a key $j$ of a compensated
    block (the pooled weight spread evenly over the block's tokens), 0 elsewhere; so that
    $O_i = \sum_j A_{ij} v_j$ for the visual rows (a test checks it). ``q, k`` with as many heads as the plan.
    """
    dummy = torch.zeros_like(k[..., :1])
    _, sparse = attention(q, k, dummy, mask=plan.token_mask(), scale=scale, return_weights=True)
    blocks = block_of_tokens(plan.num_visual, plan.block_size, device=q.device)
    weights = sparse[..., :plan.num_visual, :] * plan.factor[..., blocks, None].to(sparse.dtype)
    if plan.compensation is not None:
        counts = block_counts(plan.num_visual, plan.block_size, device=q.device)
        spread = (plan.weights[..., :plan.num_blocks] * ~plan.covered / counts).to(sparse.dtype)
        weights[..., :plan.num_visual] += spread[..., blocks, :][..., blocks]
    return weights


def relative_error(out: torch.Tensor, reference: torch.Tensor, rows: slice | None = None) -> float:
    r"""$\lVert O - O_\text{ref} \rVert_F / \lVert O_\text{ref} \rVert_F$ (over the rows ``rows`` of the sequence)."""
    if rows is not None:
        out, reference = out[..., rows, :], reference[..., rows, :]
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


# --- synthetic video tokens -------------------------------------------------------------------------


def video_like_qkv(shape: Sequence[int] = (4, 16, 16), *, num_heads: int = 4, head_dim: int = 32, num_text: int = 0,
                   locality: Sequence[float] = (1.0, 2.0, 3.0, 6.0), sharpness: float = 4.0,
                   text_strength: float = 0.5, seed: int = 0, dtype=torch.float32, device=None):
    r"""Synthetic ``q, k, v (1, H, L, D)`` with the structure of a video DiT layer, visual tokens in raster order.

    Every visual token at grid position $x$ carries smooth content $f(x)$ (random low-frequency Fourier fields)
    and a position code $\phi(x)$ (random Fourier features with $\phi(x)\cdot\phi(x') \approx e^{-|x-x'|^2/2\ell_h^2}$):
    half of each head's dimensions are $\sqrt{\beta}\,\phi(x)$ in both $q$ and $k$ (locality of length $\ell_h$, one
    per head from ``locality``), the other half are projections of the content, correlated between $q$ and
    $k$; $v$ is a projection of the content plus a little noise. $\beta = $ ``sharpness`` $\cdot\sqrt{D}$ sets how peaked
    attention is. ``num_text`` text tokens follow, random, with keys tilted towards the visual queries' mean
    (``text_strength``) so that the visual queries give them a share of their attention, as in MM-DiTs.
    """
    shape = _check_shape(shape)
    check_positive_int("num_heads", num_heads)
    check_positive_int("head_dim", head_dim)
    check_non_negative_int("num_text", num_text)
    if head_dim % 4:
        raise ValueError(f"head_dim: expected a multiple of 4, got {head_dim}")
    g = torch.Generator().manual_seed(seed)
    coords = raster_coordinates(shape).double()
    if coords.shape[1] < 3:
        coords = torch.cat([coords.new_zeros(len(coords), 3 - coords.shape[1]), coords], dim=1)
    n = len(coords)
    half = head_dim // 2

    def fourier(num, length_scale):
        # random Fourier features: cos(Omega x + b), Omega ~ N(0, 1 / length_scale^2)
        omega = torch.randn(3, num, generator=g, dtype=torch.float64) / length_scale
        phase = 2 * math.pi * torch.rand(num, generator=g, dtype=torch.float64)
        return math.sqrt(2.0 / num) * torch.cos(coords @ omega + phase)

    content = fourier(4 * half, 3.0) * math.sqrt(2.0 * half)  # (n, 4 * half), smooth, unit-ish scale
    beta = sharpness * math.sqrt(head_dim)
    qs, ks, vs = [], [], []
    for h in range(num_heads):
        ell = locality[h % len(locality)]
        position = math.sqrt(beta) * fourier(half, ell)
        w_q = torch.randn(4 * half, half, generator=g, dtype=torch.float64) / math.sqrt(4 * half)
        w_k = w_q + 0.5 * torch.randn(4 * half, half, generator=g, dtype=torch.float64) / math.sqrt(4 * half)
        w_v = torch.randn(4 * half, head_dim, generator=g, dtype=torch.float64) / math.sqrt(4 * half)
        q_h = torch.cat([position, content @ w_q], dim=-1)
        k_h = torch.cat([position, content @ w_k], dim=-1)
        v_h = content @ w_v + 0.1 * torch.randn(n, head_dim, generator=g, dtype=torch.float64)
        if num_text:
            direction = q_h.mean(0) / q_h.mean(0).norm()
            q_t = torch.randn(num_text, head_dim, generator=g, dtype=torch.float64) * 2.0
            k_t = (torch.randn(num_text, head_dim, generator=g, dtype=torch.float64) * 2.0
                   + text_strength * beta / 2 * direction)
            v_t = torch.randn(num_text, head_dim, generator=g, dtype=torch.float64)
            q_h, k_h, v_h = torch.cat([q_h, q_t]), torch.cat([k_h, k_t]), torch.cat([v_h, v_t])
        qs.append(q_h)
        ks.append(k_h)
        vs.append(v_h)
    return [torch.stack(x)[None].to(dtype=dtype, device=device) for x in (qs, ks, vs)]


def reorder_visual(x: torch.Tensor, order: torch.Tensor, num_text: int = 0) -> torch.Tensor:
    """Put the visual tokens of ``x (..., L, D)`` in ``order`` (raster indices); text tokens stay last."""
    num_visual = x.shape[-2] - num_text
    return torch.cat([x[..., order.to(x.device), :], x[..., num_visual:, :]], dim=-2)


# --- the benchmark mask -----------------------------------------------------------------------------


def benchmark_mask(length: int, *, device="cpu", seed: int = 0) -> torch.Tensor:
    r"""A ``(length, length)`` bool mask typical of Rectified SpaAttn at ``length`` visual tokens.

    Mimics the official Wan 2.1 text-to-video setting (``scripts/main_wan21t2v.py``): blocks of 128 tokens,
    drop rate 0.75, $\tau = 0.3$, no text tokens in self-attention (Wan's text enters by cross-attention),
    curve-neighbour blocks always computed, and Wan's 720p latent frame of $45\times 80$ tokens. The tokens are
    a synthetic video (:func:`video_like_qkv`, one head, seeded by ``seed``) of as many such frames as
    ``length`` needs (the last one cut), each frame along the gilbert curve. The mask is what the sparse kernel
    computes; the rectification adds $O(T_v^2 D)$ pooled work and no tile.
    """
    check_positive_int("length", length)
    height, width, block = 45, 80, 128
    frames = -(-length // (height * width))
    q, k, _ = video_like_qkv((frames, height, width), num_heads=1, head_dim=64, locality=(3.0,), sharpness=4.0,
                             seed=seed)
    order = curve_order((frames, height, width))[:length]
    q, k = q[..., order, :].to(device), k[..., order, :].to(device)
    coords = raster_coordinates((frames, height, width))[order].to(device)
    neighbors = block_neighbors(coords, block)
    weights = ipar_weights(q, k, block_size=block)
    computed = select_blocks(weights, drop_rate=0.75, tau=0.3) | neighbors
    blocks = block_of_tokens(length, block, device=device)
    return computed[0, 0][blocks][:, blocks]


# --- pictures ---------------------------------------------------------------------------------------

PLAN_COLORS = ("#f4f4f4", "#9ecae1", "#fdae6b", "#08519c")  # one per kind of plan_map, in PLAN_LABELS' order
PLAN_LABELS = ("dropped, compensated by pooling", "dropped, not compensated (rectified: untrusted)",
               "neighbour (computed)", "selected (computed)")


def plan_map(plan: RectifiedPlan, batch: int = 0, head: int = 0) -> torch.Tensor:
    """``(T_v, T_v)`` int map of one head's plan: 0 dropped and compensated by pooling, 1 dropped and not
    compensated (GAPR's untrusted blocks; every dropped block in modes ``"sparse"`` and ``"ipar"``),
    2 computed neighbour, 3 selected."""
    t = plan.num_blocks
    kinds = torch.ones(t, t, dtype=torch.long)
    if plan.compensation is not None:
        kinds[~plan.covered[batch, head].cpu()] = 0
    kinds[plan.computed[batch, head].cpu()] = 2
    kinds[plan.selected[batch, head, :, :t].cpu()] = 3
    return kinds


def plot_plan(plan: RectifiedPlan, *, batch: int = 0, head: int = 0, ax=None, title: str | None = None,
              legend: bool = True):
    """Draw one head's block plan (query blocks down, key blocks across); returns the axes."""
    from matplotlib.colors import ListedColormap

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.8))
    kinds = plan_map(plan, batch, head).numpy()
    ax.imshow(kinds, cmap=ListedColormap(PLAN_COLORS), vmin=-0.5, vmax=3.5, interpolation="nearest", aspect="auto")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_title(title if title is not None else f"plan, head {head}")
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, color=PLAN_COLORS[i]) for i in range(4)]
        ax.legend(handles, PLAN_LABELS, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    return ax


def plot_curve(order: torch.Tensor, height: int, width: int, *, block_size: int | None = None, ax=None,
               title: str | None = None):
    """Draw the path of ``order`` (raster indices) through a ``height x width`` grid, coloured by block."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.8, 3.8))
    order = torch.as_tensor(order).cpu()
    rows, cols = (order // width).numpy(), (order % width).numpy()
    if block_size:
        blocks = np.zeros((height, width))
        blocks[rows, cols] = np.arange(len(order)) // block_size
        ax.imshow(blocks, cmap="tab20", interpolation="nearest", alpha=0.45)
    ax.plot(cols, rows, color="black", linewidth=1.0)
    ax.plot(cols[0], rows[0], "o", color="tab:green", markersize=4)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


# --- the token mixer --------------------------------------------------------------------------------


class RectifiedSparseAttention(MultiHeadAttention):
    r"""Multi-head rectified sparse attention, a bidirectional token mixer ``(B, L, dim) -> (B, L, dim)``.

    The projections are those of :class:`attnlib.MultiHeadAttention` (same parameter names), so a model
    trained with full attention runs with this one by ``load_state_dict``, the way the paper plugs it into a
    pretrained video model without training.

    Args:
        dim, num_heads, bias: as :class:`attnlib.MultiHeadAttention`.
        causal: must be False (the selection pools every query and key of a block; the method is for video
            diffusion, which attends both ways).
        block_size: $N_b$ (default 8, for the course's short sequences; the paper uses 128).
        drop_rate, tau, mode: as :func:`rectified_sparse_attention` (defaults 0.75, 0.3, ``"rectified"``).
        grid: ``None`` (the visual tokens are a 1-D sequence: neighbours are the adjacent blocks) or the grid
            ``(height, width)`` / ``(frames, height, width)`` of the visual tokens, given in raster order: they are
            reordered along :func:`curve_order` before attention and put back after, and the neighbours come
            from the grid (:func:`block_neighbors`).
        num_text_tokens: the last tokens of every input are text (dense queries, unpooled keys).
        backend: ``"reference"`` or ``"kernel"`` (head dim 16 to 128).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, block_size: int = 8,
                 drop_rate: float = 0.75, tau: float = 0.3, mode: str = "rectified", grid=None,
                 num_text_tokens: int = 0, backend: str = "reference", bias: bool = False):
        if causal is not False:
            raise ValueError(f"causal: rectified sparse attention has no causal form (a pooled block mixes every "
                             f"token of the block), expected False, got {causal!r}")
        super().__init__(dim, num_heads, causal=False, bias=bias)
        check_positive_int("block_size", block_size)
        _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
        _check_fraction("tau", tau, low_open=True, high_open=False)
        check_choice("mode", mode, MODES)
        check_backend(backend)
        check_non_negative_int("num_text_tokens", num_text_tokens)
        self.grid = None if grid is None else _check_shape(grid)
        if backend == "kernel" and not 16 <= self.head_dim <= 128:
            raise ValueError(f"backend: the kernel needs a head dim (dim / num_heads) from 16 to 128, "
                             f"got {dim} / {num_heads} = {self.head_dim}")
        self.block_size, self.drop_rate, self.tau, self.mode = block_size, drop_rate, tau, mode
        self.num_text_tokens, self.sparse_backend = num_text_tokens, backend
        self.last_plan: RectifiedPlan | None = None

    def layout_for(self, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order (L_v,), neighbours (T_v, T_v))`` for inputs of ``length`` tokens."""
        num_visual = length - self.num_text_tokens
        if num_visual < 1:
            raise ValueError(f"x: expected more than num_text_tokens={self.num_text_tokens} tokens, got {length}")
        if self.grid is None:
            order = torch.arange(num_visual, device=device)
            return order, sequence_neighbors(-(-num_visual // self.block_size), device=device)
        if math.prod(self.grid) != num_visual:
            raise ValueError(f"x: grid {self.grid} holds {math.prod(self.grid)} visual tokens, but the input has "
                             f"{num_visual} (length {length} minus {self.num_text_tokens} text tokens)")
        order = curve_order(self.grid)
        coords = raster_coordinates(self.grid)[order]
        return order.to(device), block_neighbors(coords, self.block_size).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        order, neighbors = self.layout_for(x.shape[1], x.device)
        num_text = self.num_text_tokens
        q, k, v = (reorder_visual(t, order, num_text) for t in (q, k, v))
        out, plan = rectified_sparse_attention(q, k, v, block_size=self.block_size, drop_rate=self.drop_rate,
                                               tau=self.tau, num_text=num_text, neighbors=neighbors, mode=self.mode,
                                               backend=self.sparse_backend, return_plan=True)
        self.last_plan = plan
        # put the visual tokens back in raster order
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order), device=order.device)
        out = reorder_visual(out, back, num_text)
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, drop_rate={self.drop_rate}, tau={self.tau}, mode={self.mode!r}, "
                f"grid={self.grid}, num_text_tokens={self.num_text_tokens}")


@register_mechanism("rectified-sparse", paper="P18", lesson="46", supports_causal=False,
                    summary="Rectified SpaAttn (Liu et al., 2025): block-sparse attention whose output is rescaled "
                            "by the pooled kept mass R and topped up with pooled values of the dropped blocks")
def build_rectified_sparse(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return RectifiedSparseAttention(dim, num_heads, causal=causal, **options)
