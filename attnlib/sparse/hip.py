r"""Lesson 44: HiP attention, hierarchical pruning of key blocks by tree search (P27).

Lee et al., *HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning*
(arXiv:2406.09827, 2024; the ICLR 2025 version is titled *A Training-Free Sub-quadratic Cost Transformer
Model Serving Framework with Hierarchically Pruned Attention*). Code: DeepAuto-AI/hip-attention, the numba
reference ``src/hip_attn/v1_1/attention2_draft_causal_batch.py`` and the Triton version
``src/hip_attn/v1_1/attention2_draft_prefetch.py``, read to understand the numerics; nothing is copied.

**The problem.** A query needs only its top-$k$ keys, but finding them exactly costs the whole row of
$QK^\top$, $O(T)$ per query. HiP *estimates* them with a tree search of $O(\log T)$ steps, assuming
*attention locality*: neighbouring keys get similar scores, so one key can stand for a chunk.

**The search** (per head and per query block of $b_q$ queries). Keys come in blocks of $b_k$ tokens. The
searched keys are the region $[s_0, s_1)$: after the sinks, before the local window,

$$s_0 = b_k\lfloor n_\text{sink}/b_k \rfloor,\qquad s_1 = p_\text{last} + 1 - w \ \text{(causal; } T_\text{src}
\text{ otherwise)},$$

with $p_\text{last}$ the position of the block's last query ($p_i = i + T_\text{src} - T_\text{dst}$: the
queries are the last $T_\text{dst}$ of $T_\text{src}$ keys). The region has $B = \lceil (s_1 - s_0)/b_k\rceil$
key blocks, and the search keeps $m = \lceil k/b_k \rceil$ *nodes* (intervals of key blocks).

1. If $s_1 - s_0 \le k$: keep every block (the mask is then dense).
2. Start with $m$ nodes $[\lfloor Bj/m \rfloor, \lfloor B(j+1)/m \rfloor)$, $j = 0..m-1$: a partition of the
   region.
3. Repeat $R = \lceil \log_2 (B/m) \rceil$ times: split every node of size $n$ into $[a, a + \lfloor n/2\rfloor)$
   and $[a + \lfloor n/2\rfloor, a + n)$ ($2m$ children; empty ones are dropped); score each child by its
   *representative* key block $r$, the centre $a + \lfloor n/2\rfloor$ (Triton, the paper) or the first
   $a$ (numba),

   $$\text{score} = \max_{i \in \mathcal{Q}}\ \max_{j \in \text{block } r}\ s\,q_i\cdot k_j ,$$

   over the block's *strided* queries $\mathcal{Q}$ (the last query, then every ``query_stride``-th one
   before it) and, causally, only keys $j \le p_i - w$; keep the best $m$ children.
4. Every node now has size 1: the $m$ selected key blocks, sorted.

**The mask** of query $i$ in block $t$: the selected blocks, the first $n_\text{sink}$ tokens and a local
window of $w$ keys (Triton's defaults), causally,

$$M_{ij} = [j \le p_i]\,\big([j < n_\text{sink}] \vee [p_i - j < w] \vee [\lfloor j/b_k \rfloor \in \text{selected}_t]\big),$$

and attention is masked attention, $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)V$ (lesson 00).

**Cost.** Each round scores at most $2m$ key blocks per query block, each $|\mathcal{Q}|\,b_k$ dot products:
$2m\lceil\log_2(T/k)\rceil$ block scores per query block, $O(T\log T)$ for all $T/b_q$ blocks, against $T^2$
for the dense scores. The attention then reads $k + w + n_\text{sink}$ keys per query: $O(T)$.

**Where paper and code differ** (see the lesson): the numba reference gives every initial node the size of
the first one (``node_sizes="numba"``; blocks between nodes then can never be found), samples the first
block, adds no sinks and no window to the attention; the Triton code samples the centre and masks each
strided query's own future. This module follows the Triton code, with exact integer node sizes.

**Causality.** A mask chosen with the queries of a whole block depends on the *later* queries of the block:
changing token $i+1$ can change the mask, hence the output, of token $i$. The registered token mixer
therefore uses $b_q = 1$ by default (what decoding does: the block is the new token), which is strictly
causal; ``block_q > 1`` in a causal module needs ``allow_leak=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import (
    KERNEL,
    check_backend,
    check_bool,
    check_choice,
    check_int_tensor,
    check_non_negative_int,
    check_positive_int,
    check_scale,
    check_tensor,
)
from ..core import compute_dtype, repeat_kv
from ..masks import causal_mask
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import _axes
from .block_sparse import sparse_attention

SAMPLES = ("center", "first")
NODE_SIZES = ("partition", "numba")
# the Triton defaults of the official code (HiPAttentionArgs in attention2_draft_prefetch.py)
PAPER_DEFAULTS = dict(top_k=512, block_q=64, query_stride=2, block_k=2, window=256, num_sinks=16, sample="center")


# --- argument checks --------------------------------------------------------------------------------


def _check_search_options(top_k, block_q, query_stride, block_k, window, num_sinks, sample, node_sizes, causal):
    for name, value in (("top_k", top_k), ("block_q", block_q), ("query_stride", query_stride),
                        ("block_k", block_k)):
        check_positive_int(name, value)
    check_non_negative_int("window", window)
    check_non_negative_int("num_sinks", num_sinks)
    check_choice("sample", sample, SAMPLES)
    check_choice("node_sizes", node_sizes, NODE_SIZES)
    check_bool("causal", causal)


def _check_qk(q, k) -> tuple[int, int, int, int, int, int]:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if q.dtype != k.dtype or q.device != k.device:
        raise TypeError(f"q, k: expected one dtype and device, got {q.dtype} on {q.device} and {k.dtype} on {k.device}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k: expected batch {b} and head_dim {d} (as q), got shape {tuple(k.shape)}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k: the number of key heads must divide the query heads {hq}, got {hkv}")
    if lq == 0 or lk == 0:
        raise ValueError(f"q, k: expected at least one query and one key, got lengths {lq} and {lk}")
    return b, hq, hkv, lq, lk, d


# --- the tree: nodes, splits, representatives ---------------------------------------------------------


def num_nodes(top_k: int, block_k: int) -> int:
    r"""$m = \lceil k / b_k \rceil$: the key blocks the search keeps."""
    check_positive_int("top_k", top_k)
    check_positive_int("block_k", block_k)
    return -(-top_k // block_k)


def num_rounds(num_blocks, nodes: int):
    r"""Rounds of the search, $R = \lceil \log_2(B/m) \rceil$ (0 when $B \le m$), in exact integers.

    The smallest $R \ge 0$ with $B \le m\,2^R$; the official loop halves a float $B/m$ while it exceeds 1,
    which gives the same count. ``num_blocks`` is an int or an integer tensor (then a tensor comes back).
    """
    blocks = torch.as_tensor(num_blocks, dtype=torch.int64)
    rounds = torch.zeros_like(blocks)
    reach = torch.full_like(blocks, nodes)
    while bool((blocks > reach).any()):
        rounds += (blocks > reach).long()
        reach = torch.where(blocks > reach, reach * 2, reach)
    return int(rounds) if not isinstance(num_blocks, torch.Tensor) else rounds


def initial_nodes(num_blocks, nodes: int, *, node_sizes: str = "partition") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The $m$ starting nodes over $B$ key blocks: starts $a_j = \lfloor Bj/m \rfloor$ and sizes.

    ``node_sizes="partition"``: $n_j = a_{j+1} - a_j$, so the nodes cover every block exactly once.
    ``node_sizes="numba"``: every node gets the first node's size $\lfloor B/m \rfloor$, as the numba
    reference computes it (its size formula uses the head-group index where the node index belongs); when
    $m \nmid B$ some blocks then lie between nodes and are never searched. Its starts are also the reference's,
    ``int(B / m * j)`` in float64, which can land one below $\lfloor Bj/m \rfloor$ ($B = 30$, $m = 22$,
    $j = 11$: $30/22 \cdot 11 = 14.999\ldots$, so 14, not 15).

    ``num_blocks`` is an int or an int64 tensor of any shape ``S``; returns ``(starts, sizes)`` each
    ``(*S, m)`` int64.
    """
    check_choice("node_sizes", node_sizes, NODE_SIZES)
    blocks = torch.as_tensor(num_blocks, dtype=torch.int64)[..., None]
    j = torch.arange(nodes + 1, device=blocks.device)
    if node_sizes == "partition":
        # a_j = floor(B j / m), exact in integers
        bounds = (blocks * j) // nodes
    else:
        # the numba reference: int(B / m * j), divided first, in float64 (truncation = floor for B, j >= 0)
        bounds = (blocks.to(torch.float64) / nodes * j).to(torch.int64)
    starts = bounds[..., :-1]
    if node_sizes == "partition":
        sizes = bounds[..., 1:] - starts
    else:
        sizes = (bounds[..., 1:2] - bounds[..., :1]).expand_as(starts)
    return starts, sizes.contiguous()


def split_nodes(starts: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Split every node $[a, a+n)$ in two: $[a, a + \lfloor n/2\rfloor)$ and $[a + \lfloor n/2\rfloor, a + n)$.

    Shapes: ``(..., m)`` in, ``(..., 2m)`` out, the two children of node $j$ at $2j$ and $2j+1$. A node of
    size 1 gives an empty left child (size 0), which the search never keeps.
    """
    half = sizes // 2
    child_starts = torch.stack([starts, starts + half], dim=-1).flatten(-2)
    child_sizes = torch.stack([half, sizes - half], dim=-1).flatten(-2)
    return child_starts, child_sizes


def representative_blocks(starts: torch.Tensor, sizes: torch.Tensor, sample: str = "center") -> torch.Tensor:
    r"""The key block that stands for a node: its centre $a + \lfloor n/2 \rfloor$ or its first block $a$."""
    check_choice("sample", sample, SAMPLES)
    return starts + sizes // 2 if sample == "center" else starts.clone()


# --- geometry: query blocks, strided queries, the searched region -----------------------------------


def query_positions(q_len: int, k_len: int) -> torch.Tensor:
    r"""$p_i = i + T_\text{src} - T_\text{dst}$: the queries are the last ``q_len`` of ``k_len`` tokens."""
    return torch.arange(q_len) + (k_len - q_len)


def strided_queries(q_len: int, block_q: int, query_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The queries that score each query block: its last query, then every ``query_stride``-th one before.

    For a full block with ``query_stride`` dividing ``block_q`` these are the offsets
    ``query_stride - 1, 2 query_stride - 1, ..., block_q - 1`` (Triton's choice; the numba code's
    ``q[1::2]`` for stride 2). Counting from the last *real* query keeps a short last block scored.

    Returns ``rows (T_q, n_q)`` int64 query indices and ``valid (T_q, n_q)`` bool, with
    $T_q = \lceil T_\text{dst}/b_q \rceil$ and $n_q = \lceil b_q/\text{stride} \rceil$.
    """
    blocks = -(-q_len // block_q)
    t = torch.arange(blocks)
    last = torch.clamp((t + 1) * block_q, max=q_len) - 1
    rows = last[:, None] - query_stride * torch.arange(-(-block_q // query_stride))[None, :]
    valid = rows >= (t * block_q)[:, None]
    return rows.clamp(min=0), valid


def search_region(q_len: int, k_len: int, *, block_q: int, block_k: int, window: int, num_sinks: int,
                  causal: bool) -> tuple[int, torch.Tensor]:
    r"""Where each query block searches: tokens $[s_0, s_1)$, $s_0 = b_k\lfloor n_\text{sink}/b_k\rfloor$ and
    $s_1 = p_\text{last} + 1 - w$ (causal) or $T_\text{src}$; returns ``(s0, s1 (T_q,))``.

    The region starts at the key block that holds the end of the sinks, so that key blocks are aligned to
    multiples of $b_k$ (Triton requires ``num_sinks`` to be a multiple of $b_k$; the block that straddles
    the end of the sinks is searched, never skipped).
    """
    start = (num_sinks // block_k) * block_k
    blocks = -(-q_len // block_q)
    last = torch.clamp((torch.arange(blocks) + 1) * block_q, max=q_len) - 1
    if causal:
        end = last + (k_len - q_len) + 1 - window
    else:
        end = torch.full((blocks,), k_len)
    return start, end.clamp(min=start, max=k_len)


# --- the search -------------------------------------------------------------------------------------


@dataclass
class HiPSelection:
    """What the search found, for ``(B, H)`` heads and ``T_q`` query blocks.

    Attributes:
        blocks: ``(B, H, T_q, m)`` int64, the selected key blocks (block $u$ = tokens
            ``[u b_k, (u+1) b_k)``) in ascending order, then ``-1`` for empty slots (only in dense blocks,
            whose region has fewer than $m$ blocks).
        scored: ``(B, H, T_q)`` int64, key-block scores the search evaluated (its cost).
        rounds: ``(T_q,)`` int64, rounds run per query block.
        dense: ``(T_q,)`` bool, blocks whose region held at most $k$ tokens (every block kept).
        region_start, region_end: $s_0$ (int) and $s_1$ ``(T_q,)``.
        trace: with ``trace=True``, one dict per round: ``starts``, ``sizes``, ``reps``, ``scores`` of the
            ``2m`` children ``(B, H, T_q, 2m)``, ``kept`` (bool, same shape) and ``active`` ``(T_q,)``.
    """

    blocks: torch.Tensor
    scored: torch.Tensor
    rounds: torch.Tensor
    dense: torch.Tensor
    region_start: int
    region_end: torch.Tensor
    q_len: int
    k_len: int
    block_q: int
    block_k: int
    trace: list | None = None


def _block_scores(picked, picked_ok, picked_pos, key_blocks, abs_blocks, valid, *, block_k, k_len, window, causal):
    r"""$\max_{i,j} s\,q_i\cdot k_j$ over the strided queries and the keys of each candidate's block.

    ``picked (B, H, T_q, n_q, D)`` (already scaled), ``key_blocks (B, H, NB, b_k D)``, ``abs_blocks,
    valid (B, H, T_q, C)``; returns ``(B, H, T_q, C)`` with ``-inf`` for empty children.
    """
    b, h, tq, c = abs_blocks.shape
    d = picked.shape[-1]
    index = abs_blocks.clamp(0, key_blocks.shape[2] - 1).reshape(b, h, tq * c, 1).expand(-1, -1, -1, key_blocks.shape[-1])
    keys = key_blocks.gather(2, index).view(b, h, tq, c, block_k, d)
    # s q_i . k_j for every strided query i and key j of the representative block
    dots = torch.einsum("bhtqd,bhtckd->bhtcqk", picked, keys)
    key_pos = abs_blocks[..., None] * block_k + torch.arange(block_k, device=abs_blocks.device)  # (B, H, T_q, C, b_k)
    ok = (key_pos < k_len)[..., None, :] & picked_ok[:, None, :, None]  # (B, H, T_q, C, n_q, b_k)
    if causal:
        # each strided query scores only keys outside its own window: j <= p_i - w
        ok = ok & (key_pos[..., None, :] <= (picked_pos - window)[:, None, :, None])
    scores = dots.masked_fill(~ok, float("-inf")).amax(dim=(-2, -1))
    return scores.masked_fill(~valid, float("-inf"))


def hip_search(q: torch.Tensor, k: torch.Tensor, *, top_k: int = 512, block_q: int = 64, query_stride: int = 2,
               block_k: int = 2, window: int = 256, num_sinks: int = 16, sample: str = "center",
               node_sizes: str = "partition", causal: bool = True, scale: float | None = None,
               trace: bool = False) -> HiPSelection:
    r"""HiP's tree search: the top-$m$ key blocks of every query block and head (see the module doc).

    Args:
        q: ``(B, Hq, T_dst, D)`` queries; k: ``(B, Hkv, T_src, D)`` keys, ``Hkv`` dividing ``Hq``.
        top_k: $k$, tokens to select; $m = \lceil k/b_k\rceil$ blocks are kept.
        block_q, query_stride: $b_q$ queries share one search, scored by every ``query_stride``-th.
        block_k: $b_k$, tokens per key block.
        window, num_sinks: the local window $w$ and the sinks, excluded from the search (always kept).
        sample: ``"center"`` (Triton, the paper) or ``"first"`` (numba) representative block.
        node_sizes: ``"partition"`` (exact) or ``"numba"`` (the reference's initial sizes).
        causal: queries at positions $p_i = i + T_\text{src} - T_\text{dst}$ see keys $j \le p_i$.
        scale: $s$, default $1/\sqrt{D}$ (the ranking does not depend on it; the trace's scores do).
        trace: keep every round's candidates, scores and survivors (for pictures).

    Ties between children are broken towards the earlier child (a stable sort). No gradient flows
    through the choice.
    """
    _check_search_options(top_k, block_q, query_stride, block_k, window, num_sinks, sample, node_sizes, causal)
    check_scale(scale)
    b, hq, hkv, lq, lk, d = _check_qk(q, k)
    if causal and lq > lk:
        raise ValueError(f"q: a causal search takes the queries as the last of the keys, so at most {lk} queries, got {lq}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    device = q.device
    m = num_nodes(top_k, block_k)

    rows, rows_ok = strided_queries(lq, block_q, query_stride)
    start, end = search_region(lq, lk, block_q=block_q, block_k=block_k, window=window, num_sinks=num_sinks,
                               causal=causal)
    region_blocks = -(-(end - start) // block_k)
    dense = (end - start) <= top_k
    rounds = torch.where(dense, 0, num_rounds(region_blocks, m))
    starts, sizes = initial_nodes(region_blocks, m, node_sizes=node_sizes)
    tq = rows.shape[0]
    starts, sizes = starts.to(device).expand(b, hq, tq, m), sizes.to(device).expand(b, hq, tq, m)

    with torch.no_grad():
        work = compute_dtype(q.dtype)
        picked = q.detach().to(work)[:, :, rows.to(device).flatten()].view(b, hq, tq, -1, d) * scale
        keys = repeat_kv(k.detach(), hq // hkv).to(work)
        total_blocks = -(-lk // block_k)
        keys = nn.functional.pad(keys, (0, 0, 0, total_blocks * block_k - lk))
        key_blocks = keys.reshape(b, hq, total_blocks, block_k * d)
        first_block = start // block_k
        picked_pos = (rows + (lk - lq)).to(device)
        rows_ok, rounds_d, dense_d = rows_ok.to(device), rounds.to(device), dense.to(device)
        scored = torch.zeros(b, hq, tq, dtype=torch.int64, device=device)
        history = [] if trace else None
        for r in range(int(rounds.max()) if tq else 0):
            active = rounds_d > r
            child_starts, child_sizes = split_nodes(starts, sizes)
            reps = representative_blocks(child_starts, child_sizes, sample)
            valid = child_sizes >= 1
            scores = _block_scores(picked, rows_ok, picked_pos, key_blocks, first_block + reps, valid,
                                   block_k=block_k, k_len=lk, window=window, causal=causal)
            # keep the m best children (stable: the earlier child wins a tie)
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]
            keep = active[:, None]
            starts = torch.where(keep, child_starts.gather(-1, order), starts)
            sizes = torch.where(keep, child_sizes.gather(-1, order), sizes)
            scored += torch.where(active, valid.sum(-1), 0)
            if trace:
                kept = torch.zeros_like(valid).scatter_(-1, order, True) & keep
                history.append(dict(starts=child_starts, sizes=child_sizes, reps=reps, scores=scores, kept=kept,
                                    active=active))
        blocks = torch.sort(starts, dim=-1).values + first_block
        # dense query blocks keep every block of their region
        slot = torch.arange(m, device=device)
        all_blocks = torch.where(slot < region_blocks.to(device)[:, None], slot + first_block, -1)
        blocks = torch.where(dense_d[:, None], all_blocks, blocks)
    return HiPSelection(blocks=blocks, scored=scored, rounds=rounds, dense=dense, region_start=start,
                        region_end=end, q_len=lq, k_len=lk, block_q=block_q, block_k=block_k, trace=history)


# --- masks ------------------------------------------------------------------------------------------


def blocks_to_mask(blocks: torch.Tensor, q_len: int, k_len: int, block_q: int, block_k: int) -> torch.Tensor:
    r"""Token mask of a block selection: $[\,\lfloor j/b_k\rfloor \in \text{blocks}_{\lfloor i/b_q\rfloor}]$.

    ``blocks (..., T_q, m)`` int (``-1`` = empty slot); returns ``(..., q_len, k_len)`` bool (no causality:
    :func:`hip_mask` adds it).
    """
    check_int_tensor("blocks", blocks)
    total = -(-k_len // block_k)
    valid = blocks >= 0
    index = torch.where(valid, blocks, 0).long()
    counts = torch.zeros(*blocks.shape[:-1], total, dtype=torch.int32, device=blocks.device)
    block_mask = counts.scatter_add_(-1, index, valid.int()) > 0
    tokens = block_mask.repeat_interleave(block_q, dim=-2)[..., :q_len, :]
    return tokens.repeat_interleave(block_k, dim=-1)[..., :k_len]


def local_mask(q_len: int, k_len: int, *, window: int, num_sinks: int, causal: bool = True, device=None) -> torch.Tensor:
    r"""The keys HiP always keeps, ``(q_len, k_len)`` bool: sinks and the local window.

    Causal: $[j \le p_i]\,([j < n_\text{sink}] \vee [p_i - j < w])$ (the window holds the query and the
    $w - 1$ keys before it). Not causal: $[j < n_\text{sink}] \vee [|p_i - j| < w]$.
    """
    check_non_negative_int("window", window)
    check_non_negative_int("num_sinks", num_sinks)
    p = query_positions(q_len, k_len).to(device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    sinks = j < num_sinks
    if causal:
        return (j <= p) & (sinks | (j > p - window))
    return sinks | ((j > p - window) & (j < p + window))


def hip_mask(q: torch.Tensor, k: torch.Tensor, *, top_k: int = 512, block_q: int = 64, query_stride: int = 2,
             block_k: int = 2, window: int = 256, num_sinks: int = 16, sample: str = "center",
             node_sizes: str = "partition", causal: bool = True, scale: float | None = None,
             return_selection: bool = False):
    r"""HiP's attention mask ``(B, Hq, T_dst, T_src)`` bool: selected blocks, sinks and window, causal.

    $M_{ij} = [j \le p_i]\,\big([j < n_\text{sink}] \vee [p_i - j < w] \vee [\lfloor j/b_k \rfloor \in \text{selected}_t]\big)$;
    the options are those of :func:`hip_search` (whose :class:`HiPSelection` comes back too with
    ``return_selection``).
    """
    selection = hip_search(q, k, top_k=top_k, block_q=block_q, query_stride=query_stride, block_k=block_k,
                           window=window, num_sinks=num_sinks, sample=sample, node_sizes=node_sizes, causal=causal,
                           scale=scale)
    lq, lk = q.shape[2], k.shape[2]
    mask = blocks_to_mask(selection.blocks, lq, lk, block_q, block_k)
    if causal:
        # j <= p_i, with p_i = i + T_src - T_dst
        mask = mask & causal_mask(lq, lk, device=q.device)
    mask = mask | local_mask(lq, lk, window=window, num_sinks=num_sinks, causal=causal, device=q.device)
    return (mask, selection) if return_selection else mask


def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "reference",
                  scale: float | None = None, return_mask: bool = False, block_m: int | None = None,
                  block_n: int | None = None, **options):
    r"""HiP attention: $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)V$ with $M$ = :func:`hip_mask`.

    Shapes: ``q (B, Hq, T_dst, D)``, ``k, v (B, Hkv, T_src, D)``; returns ``(B, Hq, T_dst, D)`` (and the
    mask with ``return_mask``). ``options`` go to :func:`hip_mask`. ``backend="reference"`` uses
    :func:`attnlib.attention`; ``"kernel"`` runs the same mask through the block-sparse Triton kernel
    (:func:`kernels.block_sparse.block_sparse_attention`, tiles ``block_m x block_n``, 64 x 64 by default),
    which visits only the tiles the mask does not empty. The mask is chosen without gradient; gradients
    flow to ``q``, ``k``, ``v`` through the attention.
    """
    check_backend(backend)
    mask = hip_mask(q, k, scale=scale, **options)
    out = sparse_attention(q, k, v, mask, backend=backend, scale=scale, block_m=block_m, block_n=block_n)
    return (out, mask) if return_mask else out


# --- what the search is compared with ---------------------------------------------------------------


def exact_block_selection(q: torch.Tensor, k: torch.Tensor, *, top_k: int = 512, block_q: int = 64,
                          query_stride: int = 2, block_k: int = 2, window: int = 256, num_sinks: int = 16,
                          causal: bool = True, scale: float | None = None) -> torch.Tensor:
    r"""The blocks the search tries to find: the $m$ region blocks with the largest *exact* block score
    $\max_{i\in\mathcal{Q}}\max_{j \in \text{block}} s\,q_i\cdot k_j$ (every key, not a representative).

    An $O(T^2)$ oracle with the same budget and block size as :func:`hip_search`; returns ``blocks
    (B, Hq, T_q, m)`` ascending (``-1`` = empty slot), as in :class:`HiPSelection`.
    """
    _check_search_options(top_k, block_q, query_stride, block_k, window, num_sinks, "center", "partition", causal)
    b, hq, hkv, lq, lk, d = _check_qk(q, k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    m = num_nodes(top_k, block_k)
    rows, rows_ok = strided_queries(lq, block_q, query_stride)
    start, end = search_region(lq, lk, block_q=block_q, block_k=block_k, window=window, num_sinks=num_sinks,
                               causal=causal)
    with torch.no_grad():
        work = compute_dtype(q.dtype)
        keys = repeat_kv(k.detach(), hq // hkv).to(work)
        dots = torch.matmul(q.detach().to(work)[:, :, rows.flatten().to(q.device)], keys.transpose(-2, -1)) * scale
        dots = dots.view(b, hq, rows.shape[0], rows.shape[1], lk)
        j = torch.arange(lk)
        ok = rows_ok[:, :, None] & (j >= start) & (j < end[:, None, None])
        if causal:
            ok = ok & (j <= (rows + lk - lq - window)[:, :, None])
        dots = dots.masked_fill(~ok.to(q.device), float("-inf")).amax(dim=-2)  # (B, H, T_q, T_src)
        total = -(-lk // block_k)
        dots = nn.functional.pad(dots, (0, total * block_k - lk), value=float("-inf"))
        block_scores = dots.view(b, hq, -1, total, block_k).amax(-1)
        count = torch.clamp(-(-(end - start) // block_k), max=m).to(q.device)
        best = torch.sort(block_scores, dim=-1, descending=True, stable=True).indices[..., :m]
        slot = torch.arange(m, device=q.device)
        best = torch.where(slot < count[:, None], best, total + 1)  # empty slots sort last
        best = torch.sort(best, dim=-1).values
        return torch.where(best > total, -1, best)


def true_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""The exact top-$k$ keys of each row, ``(..., L_q, L_k)`` bool; ``-inf`` scores are never chosen
    (a row with fewer than $k$ finite scores keeps all of them)."""
    check_tensor("scores", scores)
    check_positive_int("k", k)
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, True)
    return chosen & torch.isfinite(scores)


def topk_recall(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""Per query, the share of its exact top-$k$ keys that ``mask`` keeps: $|M_i \cap \text{top}_k(S_i)| /
    |\text{top}_k(S_i)|$, ``(..., L_q)`` (1 for a row with no visible key).

    ``scores (..., L_q, L_k)`` with ``-inf`` at keys the query cannot see; ``mask`` broadcastable to it.
    """
    check_tensor("mask", mask, floating=False)
    check_tensor("scores", scores)
    check_positive_int("k", k)
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    real = torch.isfinite(top.values)  # a row with fewer than k visible keys has -inf among its "top"
    hits = (mask.expand_as(scores).gather(-1, top.indices) & real).sum(-1)
    total = real.sum(-1)
    return torch.where(total > 0, hits / total.clamp(min=1), torch.ones_like(hits, dtype=torch.float32)).float()


def streaming_mask(q_len: int, k_len: int, *, budget: int, num_sinks: int, device=None) -> torch.Tensor:
    r"""A causal sink + sliding-window mask (StreamingLLM) of ``budget`` keys per query: ``num_sinks`` sinks
    and a window of ``budget - num_sinks`` keys, ``(q_len, k_len)`` bool."""
    check_positive_int("budget", budget)
    if num_sinks > budget:
        raise ValueError(f"num_sinks: expected at most the budget {budget}, got {num_sinks}")
    return local_mask(q_len, k_len, window=budget - num_sinks, num_sinks=num_sinks, causal=True, device=device)


def retrieval_qk(length: int, dim: int = 32, *, span: int = 16, spans_per_topic: int = 4, query_span: int = 64,
                 min_distance: int = 256, strength: float = 3.0, noise: float = 1.0, seed: int = 0):
    r"""Synthetic queries and keys with a few distant relevant keys per query, and attention locality.

    The keys come in spans of ``span`` tokens; each span has a topic, a random unit direction $u_c$, shared
    by about ``spans_per_topic`` spans: $k_j = a\,u_{c(j)} + \sigma\epsilon_j$. The queries change their
    target every ``query_span`` tokens: the queries of one stretch look for the topic of one span that ends
    at least ``min_distance`` tokens before the stretch, $q_i = a\,u_c + \sigma\eta_i$ (the first stretches,
    with no span that far back, are noise). $\epsilon, \eta \sim \mathcal{N}(0, I/d)$, $a$ = ``strength``,
    $\sigma$ = ``noise``. Both are multiplied by $d^{1/4}$, so that the attention logit
    $q\cdot k/\sqrt d$ is the plain dot product: about $a^2$ for a relevant key, $O(a^2/\sqrt d)$ otherwise.

    The relevant keys are far away, so a local window misses them, and contiguous: the *locality* HiP
    assumes. Returns ``q, k`` each ``(1, 1, length, dim)`` float32.
    """
    check_positive_int("length", length)
    check_positive_int("dim", dim)
    g = torch.Generator().manual_seed(seed)
    n_spans = -(-length // span)
    n_topics = max(1, n_spans // spans_per_topic)
    topics = nn.functional.normalize(torch.randn(n_topics, dim, generator=g), dim=-1)
    span_topic = torch.randint(0, n_topics, (n_spans,), generator=g)
    token_topic = span_topic.repeat_interleave(span)[:length]
    k = strength * topics[token_topic] + noise * torch.randn(length, dim, generator=g) / math.sqrt(dim)
    q = noise * torch.randn(length, dim, generator=g) / math.sqrt(dim)
    for first in range(0, length, query_span):
        usable = (first - min_distance) // span  # spans that end at least min_distance tokens back
        if usable < 1:
            continue
        target = int(torch.randint(0, usable, (1,), generator=g))
        q[first:first + query_span] += strength * topics[span_topic[target]]
    stretch = dim ** 0.25
    return (q * stretch)[None, None], (k * stretch)[None, None]


# --- pictures ---------------------------------------------------------------------------------------


def plot_search_rounds(selection: HiPSelection, *, query_block: int, batch: int = 0, head: int = 0,
                       true_topk: torch.Tensor | None = None, ax=None, title: str | None = None):
    """The tree search of one query block, round by round (rows), over the key blocks (x axis).

    Each child of a round is a bar over its key blocks: blue if it survived, grey if pruned, with a dot on
    its representative block. The last row shows the selected blocks; red ticks mark the key blocks that
    hold the exact top-k tokens of the block's last query (``true_topk``: token indices).
    """
    if selection.trace is None:
        raise ValueError("selection: expected a search run with trace=True")
    ax = _axes(ax, size=(9.0, 3.6))
    rounds = [r for r in selection.trace if bool(r["active"][query_block])]
    first = selection.region_start // selection.block_k
    for y, record in enumerate(rounds):
        starts = record["starts"][batch, head, query_block].tolist()
        sizes = record["sizes"][batch, head, query_block].tolist()
        reps = record["reps"][batch, head, query_block].tolist()
        kept = record["kept"][batch, head, query_block].tolist()
        for a, n, r, keep in zip(starts, sizes, reps, kept):
            if n < 1:
                continue
            color = "tab:blue" if keep else "0.8"
            ax.barh(y, n, left=first + a, height=0.7, color=color, edgecolor="white", linewidth=0.3)
            ax.plot(first + r + 0.5, y, ".", color="black" if keep else "0.55", markersize=3)
    y_final = len(rounds)
    for u in selection.blocks[batch, head, query_block].tolist():
        if u >= 0:
            ax.barh(y_final, 1, left=u, height=0.7, color="tab:blue")
    if true_topk is not None:
        for u in sorted({int(t) // selection.block_k for t in true_topk.tolist()}):
            ax.plot([u + 0.5, u + 0.5], [y_final + 0.45, y_final + 0.75], color="tab:red", linewidth=1.2)
    ax.set_yticks(range(y_final + 1))
    ax.set_yticklabels([f"round {i + 1}" for i in range(y_final)] + ["selected"])
    ax.invert_yaxis()
    end = int(selection.region_end[query_block])
    ax.set_xlim(first - 0.5, -(-end // selection.block_k) + 0.5)
    ax.set_xlabel(f"key block ({selection.block_k} tokens each)")
    ax.set_title(title or f"query block {query_block}: {len(rounds)} rounds, "
                 f"{int(selection.scored[batch, head, query_block])} key blocks scored")
    return ax


def plot_mask_vs_topk(mask: torch.Tensor, top: torch.Tensor, *, ax=None, title: str | None = None):
    """One picture of a mask ``(L_q, L_k)`` against the exact top-k ``(L_q, L_k)``: dark blue = a top-k key the
    mask keeps, light blue = kept but not top-k, red = a top-k key the mask misses, white = neither."""
    from matplotlib.colors import ListedColormap

    mask, top = torch.as_tensor(mask).bool().cpu(), torch.as_tensor(top).bool().cpu()
    kind = torch.where(top, torch.where(mask, 3, 2), torch.where(mask, 1, 0))
    ax = _axes(ax)
    cmap = ListedColormap(["white", "#b7d3ec", "tab:red", "#08306b"])
    ax.imshow(kind.numpy(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest", aspect="auto")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    found = int((top & mask).sum())
    ax.set_title(title or f"{found} of {int(top.sum())} top-k keys kept")
    return ax


# --- the token mixer --------------------------------------------------------------------------------


class HiPAttention(MultiHeadAttention):
    r"""Multi-head attention through HiP's mask, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    Same projections (and parameter names) as :class:`attnlib.MultiHeadAttention`, so a trained model can
    switch between dense attention and HiP, as HiP does with pretrained LLMs (it is training-free).

    Args:
        dim, num_heads, bias: as in :class:`attnlib.MultiHeadAttention`.
        causal: each token sees only itself and earlier tokens.
        top_k, block_q, query_stride, block_k, window, num_sinks, sample, node_sizes: as in
            :func:`hip_search`. The defaults are HiP's scaled down to toy lengths ($k = 8$, $b_k = 2$,
            $w = 4$, 2 sinks). A sequence whose region holds at most ``top_k`` tokens
            (``L <= top_k + window + num_sinks``) gets dense (causal) attention.
        block_q: 1 by default, the only strictly causal choice: a larger query block chooses its mask with
            its later queries too, which leaks the future into the earlier ones; ``causal=True`` with
            ``block_q > 1`` is refused unless ``allow_leak=True``.
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask) or ``"kernel"`` (the block-sparse
            Triton kernel; head dim 16 to 128).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, top_k: int = 8, block_q: int = 1,
                 query_stride: int = 1, block_k: int = 2, window: int = 4, num_sinks: int = 2,
                 sample: str = "center", node_sizes: str = "partition", allow_leak: bool = False,
                 backend: str = "reference", bias: bool = False):
        super().__init__(dim, num_heads, causal=False, bias=bias)
        _check_search_options(top_k, block_q, query_stride, block_k, window, num_sinks, sample, node_sizes, causal)
        check_backend(backend)
        check_bool("allow_leak", allow_leak)
        if causal and block_q > 1 and not allow_leak:
            raise ValueError(f"block_q: a query block of {block_q} chooses the mask of its first queries with its "
                             "later ones, so a future token changes a past output; use block_q=1 for a causal "
                             "model, or allow_leak=True to study the leak")
        if backend == "kernel" and not 16 <= self.head_dim <= 128:
            raise ValueError(f"dim: the kernel backend needs a head dim (dim / num_heads) from 16 to 128, "
                             f"got {dim} / {num_heads} = {self.head_dim}")
        self.pattern_causal, self.sparse_backend = causal, backend
        self.options = dict(top_k=top_k, block_q=block_q, query_stride=query_stride, block_k=block_k, window=window,
                            num_sinks=num_sinks, sample=sample, node_sizes=node_sizes, causal=causal)
        self.last_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        q, k, v = self.project(x)
        mask = hip_mask(q, k, **self.options)
        self.last_mask = mask
        if self.sparse_backend == "reference":
            out, weights = self.attend(q, k, v, mask=mask)
            out = self.merge_heads(out)
            return (out, weights) if return_weights else out
        self.last_weights = None
        return self.merge_heads(sparse_attention(q, k, v, mask, backend=KERNEL, return_weights=return_weights))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


@register_mechanism("hip", paper="P27", lesson="44", supports_causal=True,
                    summary="HiP: a tree search keeps the top-k key blocks per query (O(T log T)), plus sinks "
                            "and a local window")
def build_hip(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return HiPAttention(dim, num_heads, causal=causal, **options)


# --- the benchmark's mask ---------------------------------------------------------------------------


def benchmark_mask(length: int, *, device="cpu", seed: int = 0) -> torch.Tensor:
    r"""A causal HiP mask ``(length, length)`` bool for the block-sparse kernel's benchmark.

    It mimics HiP's Triton defaults at 8k-32k tokens ($k = 512$, query block 64 scored by every second
    query, 256-token window, 16 sinks, centre sampling) with one change: key blocks of 64 tokens instead of
    2, so that each selected block is exactly one $64\times64$ tile of the kernel ($m = 8$ blocks). With
    $b_k = 2$ the 256 selected blocks would scatter over up to 256 tiles per query block and the kernel
    could skip almost nothing. The content is random: ``q, k (1, 1, length, 64)`` drawn from ``seed``;
    the number of tiles hardly depends on it (always 8 blocks per query block, plus window and sinks).
    """
    check_positive_int("length", length)
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(1, 1, length, 64, device=device, generator=g) for _ in range(2))
    options = dict(PAPER_DEFAULTS, block_k=64)
    return hip_mask(q, k, **options)[0, 0]
