r"""Lesson 41: radial attention, a static mask whose band shrinks with temporal distance (P39).

Li et al., 2025, *Radial Attention: $O(n\log n)$ Sparse Attention with Energy Decay for Long Video
Generation* (arXiv:2506.19852; code: mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``).

**Setting.** A video diffusion transformer attends over $n = f s$ tokens: $f$ frames of $s$ tokens each,
flattened frame by frame (token $q$ sits in frame $i = \lfloor q/s \rfloor$ at in-frame index
$r = q \bmod s$). Attention is bidirectional. The paper observes *spatiotemporal energy decay*: the
post-softmax weight a query gives a key falls roughly exponentially with their temporal distance
$|i - j|$ and their spatial distance. Radial attention turns that decay into a **static** mask whose
compute density halves each time the temporal distance doubles.

**The mask as the official code builds it** (what this module follows). With $\Delta = |i - j|$ the
frame distance, $b = \operatorname{bitlen}(s)$, $g = \operatorname{bitlen}(\Delta)$
($=\lfloor\log_2\Delta\rfloor + 1$, and $0$ for $\Delta = 0$), $B$ the block size and $\delta$ the decay
factor, the undecayed length of frame pair $(i, j)$ is $\ell(\Delta) = 2^{b}/2^{g}$ and

$$w(\Delta) = \begin{cases} s & \Delta \le 1\\ \max(\ell(\Delta)\,\delta,\ B) & \Delta \ge 2\end{cases}
\qquad \kappa(\Delta) = \begin{cases} 1 & \ell(\Delta) \ge B\\
[\,\Delta \bmod \lfloor B/\ell(\Delta)\rfloor = 0\,] & \ell(\Delta) < B \end{cases}$$

$$M_{qk} = \big(\kappa(\Delta)\ \wedge\ |c - r| \le w(\Delta)\big)\ \vee\ \big(\text{sink} \wedge j = 0\big),$$

a diagonal band on the **flattened in-frame index** ($r$, $c$ the in-frame indices of query and key),
whose half-width halves per octave of $\Delta$ (*temporal decay*) until it reaches one block; from there
on whole frame pairs are dropped except every $\lfloor B/\ell\rfloor$-th (*temporal thinning*), so the
amortised density keeps halving. ``sink`` (Wan2.1 in the code) lets every query see all of frame 0.

**The paper's Eq. 4** (:func:`paper_radial_mask`): with $\rho = \lfloor\log_2\max(\Delta,1)\rfloor$, keys are
allowed iff ($2^\rho \le s$ and $|k - l| + 1 \le s/2^\rho$) or ($\Delta \bmod \lceil 2^\rho/s\rceil = 0$ and
$k = l$), plus a frame-0 sink. Where the code differs: (1) it rounds $s$ up to $2^{\operatorname{bitlen}(s)}$,
so $\ell(\Delta) = 2^{\operatorname{bitlen}(s)}/2^{\rho+1}$ equals the paper's $s/2^\rho$ (one token wider on each side,
$\le$ against $+1 \le$) when $s$ is a power of two and is down to half of it otherwise (1024 against 1919 at
$\Delta = 2$ for $s = 3840$); (2) it scales the band by $\delta$ and floors it at $B$; (3) it thins frame
pairs once $\ell < B$ and keeps a $B$-wide band in the pairs it keeps, where the paper thins only once
$s/2^\rho < 1$ and keeps the diagonal $k = l$; (4) its sink is for Wan2.1 only. Both put the band on the
flat in-frame index, which is not a 2-D neighbourhood: a half-width $w$ covers $\approx 2w/W$ whole rows
of an $H \times W$ frame (the prose's "spatially nearby tokens" suggests a box).

**Blocks.** The kernel runs a $B \times B$ block mask (:func:`radial_block_mask`). For each frame pair
the code places the pair's token mask on a canvas at offset $(is \bmod B,\ js \bmod B)$, cuts it into
$B\times B$ blocks and keeps a block iff **more than 60 %** of its non-empty columns have **more than
$B/3$** allowed rows; the kept blocks of all pairs are OR-ed. Two details of the code, followed here:
the canvas is cut to $\lceil s/B\rceil$ blocks, so a frame's trailing partial block (when
$(is \bmod B) + s$ passes that) takes no part in its own pairs (``cut_canvas=False`` keeps it), and every
block from $\lfloor n/B\rfloor$ on is dense (where the code's text tokens begin; here the ragged last
block, if any).

**Cost.** At a fixed $s$ the number of allowed pairs grows as $O(s\,n\log_2(n/s))$ with $n = fs$:
$O(n\log n)$ in the number of frames (the paper's Appendix bound is $4sn(\log_2 n - \log_2 s)$).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import KERNEL, check_backend, check_bool, check_positive_int, check_qkv, check_scale, check_tensor
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import MASK_CMAP, _axes, plot_mask, plt
from .block_sparse import sparse_attention

GRANULARITIES = ("block", "token")

# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _check_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0 or math.isinf(decay):
        raise ValueError(f"decay: expected a positive finite number, got {decay!r}")
    return float(decay)


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width >= 0:
        raise ValueError(f"adjacent_width: expected a non-negative number (a half-width in tokens) or None, "
                         f"got {width!r}")
    return float(width)


def _check_distance(distance) -> int:
    if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
        raise ValueError(f"distance: expected a non-negative int (a frame distance |i - j|), got {distance!r}")
    return distance


def _check_frames(seq_len, tokens_per_frame) -> None:
    check_positive_int("seq_len", seq_len)
    check_positive_int("tokens_per_frame", tokens_per_frame)


# --------------------------------------------------------------------------------------------------
# one frame pair
# --------------------------------------------------------------------------------------------------


def undecayed_length(distance: int, tokens_per_frame: int) -> float:
    r"""$\ell(\Delta) = 2^{\operatorname{bitlen}(s)} / 2^{\operatorname{bitlen}(\Delta)}$, a power of two (maybe < 1)."""
    distance = _check_distance(distance)
    check_positive_int("tokens_per_frame", tokens_per_frame)
    return 2.0 ** (tokens_per_frame.bit_length() - distance.bit_length())


def band_half_width(distance: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                    adjacent_width: float | None = None) -> float:
    r"""The band's half-width $w(\Delta)$ for frames $\Delta$ apart: key $c$ is in query $r$'s band iff $|c - r| \le w$.

    $w = s$ for $\Delta \le 1$ (the whole frame), else $\max(\ell(\Delta)\,\delta,\ B)$ with
    $\ell(\Delta) = 2^{\operatorname{bitlen}(s)}/2^{\operatorname{bitlen}(\Delta)}$ (the code's
    ``get_window_width``). A float: $\delta$ need not be a power of two. It is rounded to float32, because the
    official code compares the integer distances with it as ``torch.abs(c - r) <= w``, which PyTorch evaluates in
    its default float32: a width within float32 rounding below an integer (say 128.999999998) admits that integer
    there, and here too.

    ``adjacent_width`` replaces $w(1)$: the code for Wan2.1 used $\lfloor s/2\rfloor$ from its release with the
    paper until November 2025 (sparsities printed by that version need it).
    """
    decay = _check_decay(decay)
    check_positive_int("block_size", block_size)
    distance = _check_distance(distance)
    check_positive_int("tokens_per_frame", tokens_per_frame)
    if distance == 1 and adjacent_width is not None:
        return _check_width(adjacent_width)
    if distance <= 1:
        return float(tokens_per_frame)
    # w = max(l * decay, B): the band never gets narrower than one block; compared in float32, as the code does
    width = max(undecayed_length(distance, tokens_per_frame) * decay, float(block_size))
    return torch.tensor(width, dtype=torch.float32).item()


def frame_pair_kept(distance: int, tokens_per_frame: int, *, block_size: int = 128) -> bool:
    r"""Temporal thinning $\kappa(\Delta)$: whether frames $\Delta$ apart interact at all.

    Kept when $\ell(\Delta) \ge B$; below one block of undecayed length only every
    $\lfloor B/\ell(\Delta)\rfloor$-th distance is kept, so that the band of width $B$ costs on average
    what a band of width $\ell$ would (the code's ``get_diagonal_split_mask``, whose threshold is written
    as 128, the block size the code always uses). The decay factor plays no part here.
    """
    check_positive_int("block_size", block_size)
    length = undecayed_length(distance, tokens_per_frame)
    if length >= block_size:
        return True
    # keep one distance in floor(B / l)
    return distance % int(block_size / length) == 0


def frame_pair_mask(query_frame: int, key_frame: int, tokens_per_frame: int, *, decay: float = 1.0,
                    block_size: int = 128, sink: bool = False, adjacent_width: float | None = None,
                    device=None) -> torch.Tensor:
    r"""The ``(s, s)`` token mask between frame ``query_frame`` (rows $r$) and ``key_frame`` (columns $c$).

    $\kappa(\Delta) \wedge |c - r| \le w(\Delta)$, or all ``True`` when ``sink`` and ``key_frame == 0``.
    """
    check_bool("sink", sink)
    for name, frame in (("query_frame", query_frame), ("key_frame", key_frame)):
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {frame!r}")
    s = tokens_per_frame
    distance = abs(query_frame - key_frame)
    width = band_half_width(distance, s, decay=decay, block_size=block_size, adjacent_width=adjacent_width)
    kept = frame_pair_kept(distance, s, block_size=block_size)
    if sink and key_frame == 0:
        return torch.ones(s, s, dtype=torch.bool, device=device)
    r = torch.arange(s, device=device)
    # |c - r| <= w on the in-frame index, AND the pair's thinning flag
    return ((r[None, :] - r[:, None]).abs() <= width) & kept


# --------------------------------------------------------------------------------------------------
# the token mask of a whole video
# --------------------------------------------------------------------------------------------------


def num_frames_for(seq_len: int, tokens_per_frame: int) -> int:
    r"""$\lceil n / s \rceil$: the last frame may be partial (shorter than $s$)."""
    _check_frames(seq_len, tokens_per_frame)
    return -(-seq_len // tokens_per_frame)


def frame_tables(num_frames: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                 adjacent_width: float | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(width, kept)``, each ``(num_frames,)`` indexed by $\Delta$: $w(\Delta)$ (float64), $\kappa(\Delta)$ (bool)."""
    check_positive_int("num_frames", num_frames)
    width = [band_half_width(d, tokens_per_frame, decay=decay, block_size=block_size, adjacent_width=adjacent_width)
             for d in range(num_frames)]
    kept = [frame_pair_kept(d, tokens_per_frame, block_size=block_size) for d in range(num_frames)]
    return (torch.tensor(width, dtype=torch.float64, device=device),
            torch.tensor(kept, dtype=torch.bool, device=device))


def radial_token_mask(seq_len: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                      sink: bool = False, adjacent_width: float | None = None, device=None) -> torch.Tensor:
    r"""The radial mask of $n$ = ``seq_len`` tokens in frames of $s$ = ``tokens_per_frame``, ``(n, n)`` bool.

    $$M_{qk} = \big(\kappa(|i-j|) \wedge |c - r| \le w(|i-j|)\big) \vee (\text{sink} \wedge j = 0),$$

    $i = \lfloor q/s\rfloor, r = q \bmod s$ (query), $j, c$ likewise (key). Symmetric. The last frame may
    be partial. This is the token-level pattern; what the code runs is :func:`radial_block_mask`.
    """
    _check_frames(seq_len, tokens_per_frame)
    check_bool("sink", sink)
    frames = num_frames_for(seq_len, tokens_per_frame)
    width, kept = frame_tables(frames, tokens_per_frame, decay=decay, block_size=block_size,
                               adjacent_width=adjacent_width, device=device)
    token = torch.arange(seq_len, device=device)
    frame, index = token // tokens_per_frame, token % tokens_per_frame
    distance = (frame[:, None] - frame[None, :]).abs()
    # kappa(Delta) and |c - r| <= w(Delta)
    allowed = kept[distance] & ((index[None, :] - index[:, None]).abs() <= width[distance])
    if sink:
        allowed = allowed | (frame == 0)[None, :]
    return allowed


def paper_radial_mask(seq_len: int, tokens_per_frame: int, *, sink: bool = True, device=None) -> torch.Tensor:
    r"""The mask of the paper's Eq. 4, ``(n, n)`` bool, for comparison with the code's.

    With $\rho = \lfloor\log_2\max(\Delta, 1)\rfloor$: allowed iff
    ($2^\rho \le s$ and $|k - l| + 1 \le s/2^\rho$) or ($\Delta \bmod \lceil 2^\rho/s\rceil = 0$ and
    $k = l$); with ``sink``, every key of frame 0 as well (the paper's attention sink).
    """
    _check_frames(seq_len, tokens_per_frame)
    check_bool("sink", sink)
    s = tokens_per_frame
    token = torch.arange(seq_len, device=device)
    frame, index = token // s, token % s
    distance = (frame[:, None] - frame[None, :]).abs()
    # 2^rho with rho = floor(log2 max(Delta, 1)): the highest power of two <= max(Delta, 1)
    power = torch.ones_like(distance)
    while bool((power * 2 <= distance).any()):
        power = torch.where(power * 2 <= distance, power * 2, power)
    gap = (index[None, :] - index[:, None]).abs()
    band = (power <= s) & ((gap + 1) * power <= s)
    stride = -(-power // s)  # ceil(2^rho / s)
    diagonal = (distance % stride == 0) & (gap == 0)
    allowed = band | diagonal
    if sink:
        allowed = allowed | (frame == 0)[None, :]
    return allowed


# --------------------------------------------------------------------------------------------------
# the block mask the kernel runs
# --------------------------------------------------------------------------------------------------


def keep_block(column_counts: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""The code's block rule on the allowed-row counts of a block's columns, ``(..., B) -> (...)`` bool.

    Column density $d_c = \text{count}_c / B$ (divided by $B$ even when fewer rows are real); keep iff
    $\#\{c: d_c > 1/3\} > 0.6\,\#\{c: d_c > 0\}$. Written in integers ($3\,\text{count} > B$ and
    $5\,\#\text{high} > 3\,\#\text{non-empty}$): the same decisions as the code's float32 arithmetic.
    """
    high = (3 * column_counts > block_size).sum(-1)
    nonempty = (column_counts > 0).sum(-1)
    return 5 * high > 3 * nonempty


def shrink_canvas(canvas: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""The code's ``shrinkMaskStrict``: a ``(R, C)`` bool canvas to ``(R // B, R // B)`` kept blocks.

    Both sides are cut to $\lfloor R/B\rfloor B$ (the number of rows decides, as in the code); each block
    is kept by :func:`keep_block` on its column counts.
    """
    check_tensor("canvas", canvas, ndim=2, floating=False)
    check_positive_int("block_size", block_size)
    blocks = canvas.shape[0] // block_size
    cut = canvas[:blocks * block_size, :blocks * block_size].reshape(blocks, block_size, blocks, block_size)
    # count_c: allowed rows of each column inside each block, (blocks, blocks, B)
    counts = cut.sum(dim=1)
    return keep_block(counts, block_size)


def _columns_above(lo, hi, width, first, stop, threshold):
    """How many columns c in [first, stop) have more than ``threshold`` rows r in [lo, hi) with |c - r| <= width.

    The overlap of [lo, hi - 1] and [c - w, c + w] is at least m = threshold + 1 iff hi - lo >= m, 2w + 1 >= m
    and lo + m - 1 - w <= c <= hi - m + w: an interval of columns, intersected here with [first, stop).
    """
    m = threshold + 1
    c_lo = torch.maximum(lo + m - 1 - width, first)
    c_hi = torch.minimum(hi - m + width, stop - 1)
    possible = (hi - lo >= m) & (2 * width + 1 >= m)
    return torch.where(possible, (c_hi - c_lo + 1).clamp(min=0), torch.zeros_like(c_lo))


def _canvas_keep(keys: torch.Tensor, block_size: int, cut_canvas: bool, rows: int, cols: int) -> torch.Tensor:
    """Kept canvas blocks ``(K, rows, cols)`` for frame pairs described by ``keys (K, 5)``:
    (row offset, query frame length, column offset, key frame length, integer half-width; -1 = no token)."""
    bs = block_size
    off_i, len_i, off_j, len_j, half = (keys[:, n, None, None] for n in range(5))
    span_i = -(-len_i // bs) if cut_canvas else -(-(off_i + len_i) // bs)
    span_j = -(-len_j // bs) if cut_canvas else -(-(off_j + len_j) // bs)
    a = torch.arange(rows, device=keys.device)[None, :, None]
    b = torch.arange(cols, device=keys.device)[None, None, :]
    # query-frame rows (in-frame index) of canvas block a: [aB - off_i, aB + B - off_i) within [0, len_i)
    lo = torch.minimum((a * bs - off_i).clamp(min=0), len_i)
    hi = torch.minimum((a * bs + bs - off_i).clamp(min=0), len_i)
    hi = torch.where(a < span_i, hi, lo)  # canvas rows past the cut hold nothing
    # key-frame columns of canvas block b that are real tokens inside the (cut) canvas
    first = (b * bs - off_j).clamp(min=0)
    stop = torch.minimum(torch.minimum(b * bs + bs - off_j, len_j), span_j * bs - off_j)
    # column counts > B/3 (3 count > B) and > 0, counted per block without listing the columns
    high = _columns_above(lo, hi, half, first, stop, bs // 3)
    nonempty = _columns_above(lo, hi, half, first, stop, 0)
    return 5 * high > 3 * nonempty


def radial_block_mask(seq_len: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                      sink: bool = False, adjacent_width: float | None = None, cut_canvas: bool = True,
                      device=None) -> torch.Tensor:
    r"""The block mask the code hands to its block-sparse kernel, ``(T, T)`` bool with $T = \lceil n/B\rceil$.

    For every frame pair $(i, j)$: the pair's token mask (:func:`frame_pair_mask`) sits on a canvas at
    offset $(is \bmod B,\ js \bmod B)$; each $B\times B$ canvas block is kept by :func:`keep_block`; kept
    blocks land at block $(\lfloor is/B\rfloor + a,\ \lfloor js/B\rfloor + b)$ and are OR-ed over pairs.

    ``cut_canvas=True`` (the code) keeps $\lceil s/B\rceil$ blocks per side of each canvas, so the tokens
    of a frame that spill into one more block are ignored in its own pairs; ``False`` keeps that block.
    The cut can leave a block row with no kept block at all (e.g. $s = 30$, $B = 16$: its queries then get
    a zero output); the code's sizes (3840 and 3600 tokens per frame, $B = 128$) never meet that case.
    Blocks from $\lfloor n/B\rfloor$ on (the ragged last block) are dense, as the code makes every block
    from the end of the video on.

    How many columns of a block pass each threshold follows from interval arithmetic (a band meets a range
    of rows in an interval of columns), never from an $s \times s$ mask, and pairs with the same offsets,
    lengths and width are computed once: real sizes (30 frames of 3840 tokens) build in milliseconds.
    """
    _check_frames(seq_len, tokens_per_frame)
    check_positive_int("block_size", block_size)
    check_bool("sink", sink)
    check_bool("cut_canvas", cut_canvas)
    s, bs = tokens_per_frame, block_size
    frames = num_frames_for(seq_len, s)
    width, kept = frame_tables(frames, s, decay=decay, block_size=bs, adjacent_width=adjacent_width, device=device)
    # integer half-widths: |c - r| <= w  <=>  |c - r| <= floor(w); a dropped pair gets -1 (no row)
    big = seq_len + bs
    half = torch.where(kept, width.floor(), torch.full_like(width, -1.0)).long().clamp(max=big)
    start = torch.arange(frames, device=device) * s
    length = torch.clamp(seq_len - start, max=s)
    offset = start % bs
    i = torch.arange(frames, device=device).repeat_interleave(frames)
    j = torch.arange(frames, device=device).repeat(frames)
    pair_half = half[(i - j).abs()]
    if sink:
        pair_half = torch.where(j == 0, torch.full_like(pair_half, big), pair_half)
    keys = torch.stack([offset[i], length[i], offset[j], length[j], pair_half], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    rows = int((-(-(offset + length) // bs)).max())  # canvas blocks per side, enough for every pair
    keep = _canvas_keep(unique, bs, cut_canvas, rows, rows)[inverse]  # (F * F, rows, rows)
    tiles = -(-seq_len // bs)
    block = torch.zeros(tiles, tiles, dtype=torch.bool, device=device)
    p, a, b = keep.nonzero(as_tuple=True)
    r, c = start[i[p]] // bs + a, start[j[p]] // bs + b
    inside = (r < tiles) & (c < tiles)
    block[r[inside], c[inside]] = True
    # the code: every block from the end of the video (floor(n / B)) on is dense
    border = seq_len // bs
    block[border:, :] = True
    block[:, border:] = True
    return block


def expand_block_mask(block: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    r"""The token mask of a ``(T, T)`` block mask, ``(n, n)`` bool:
    $M_{qk} = \text{block}_{\lfloor q/B\rfloor, \lfloor k/B\rfloor}$."""
    check_tensor("block", block, ndim=2, floating=False)
    check_positive_int("seq_len", seq_len)
    check_positive_int("block_size", block_size)
    tiles = -(-seq_len // block_size)
    if tuple(block.shape) != (tiles, tiles):
        raise ValueError(f"block: expected shape {(tiles, tiles)} for {seq_len} tokens in blocks of {block_size}, "
                         f"got {tuple(block.shape)}")
    index = torch.arange(seq_len, device=block.device) // block_size
    return block[index[:, None], index[None, :]]


def radial_mask(seq_len: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                sink: bool = False, adjacent_width: float | None = None, granularity: str = "block",
                cut_canvas: bool = True, device=None) -> torch.Tensor:
    r"""The ``(n, n)`` mask radial attention applies: the expanded block mask (``"block"``, what the code
    runs) or the token mask (``"token"``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "token":
        return radial_token_mask(seq_len, tokens_per_frame, decay=decay, block_size=block_size, sink=sink,
                                 adjacent_width=adjacent_width, device=device)
    block = radial_block_mask(seq_len, tokens_per_frame, decay=decay, block_size=block_size, sink=sink,
                              adjacent_width=adjacent_width, cut_canvas=cut_canvas, device=device)
    return expand_block_mask(block, seq_len, block_size)


# --------------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------------


def band_pairs(tokens_per_frame: int, half_width: float) -> int:
    r"""Pairs $(r, c) \in [0, s)^2$ with $|c - r| \le w$: $s + 2\sum_{d=1}^{\min(\lfloor w\rfloor, s-1)} (s - d)$."""
    check_positive_int("tokens_per_frame", tokens_per_frame)
    s, w = tokens_per_frame, min(int(math.floor(half_width)), tokens_per_frame - 1)
    if w < 0:
        return 0
    return s + w * (2 * s - w - 1)


def radial_pair_count(num_frames: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                      sink: bool = False, adjacent_width: float | None = None) -> int:
    r"""Allowed (query, key) pairs of :func:`radial_token_mask` for ``num_frames`` whole frames, counted per
    frame distance without building the mask:

    $$|M| = s\,c(0) + \sum_{\Delta \ge 1} 2 (f - \Delta)\,\kappa(\Delta)\,c(w(\Delta)) \;(+\text{sink}),\qquad
      c(w) = \#\{(r, c): |c - r| \le w\}.$$
    """
    check_positive_int("num_frames", num_frames)
    check_bool("sink", sink)
    s, f = tokens_per_frame, num_frames
    per_pair = [band_pairs(s, band_half_width(d, s, decay=decay, block_size=block_size, adjacent_width=adjacent_width))
                if frame_pair_kept(d, s, block_size=block_size) else 0 for d in range(f)]
    total = f * per_pair[0] + sum(2 * (f - d) * per_pair[d] for d in range(1, f))
    if sink:
        # column frame 0 becomes full for the f - 1 other query frames
        total += sum(s * s - per_pair[i] for i in range(1, f))
    return total


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def radial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tokens_per_frame: int,
                     decay: float = 1.0, block_size: int = 128, sink: bool = False,
                     adjacent_width: float | None = None, granularity: str = "block", cut_canvas: bool = True,
                     scale: float | None = None, backend: str = "reference") -> torch.Tensor:
    r"""Radial attention $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)\,V$, $M$ = :func:`radial_mask`.

    Shapes: ``q (B, Hq, n, D)``, ``k, v (B, Hkv, n, D)``, the $n$ tokens frame-major; returns
    ``(B, Hq, n, D)``. ``backend="kernel"`` runs the block-sparse Triton kernel of lesson 40
    (:func:`kernels.block_sparse.block_sparse_attention`); with ``granularity="block"`` and a block size
    that is a power of two of at least 16, its tiles (the block size, at most 64) tile the radial blocks
    exactly, so no tile is partial but those of the ragged last key block.
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: radial attention is self-attention, expected {q.shape[2]} keys, got {k.shape[2]}")
    check_scale(scale)
    check_backend(backend)
    mask = radial_mask(q.shape[2], tokens_per_frame, decay=decay, block_size=block_size, sink=sink,
                       adjacent_width=adjacent_width, granularity=granularity, cut_canvas=cut_canvas, device=q.device)
    tile = _tile_for(block_size if granularity == "block" else None)
    return sparse_attention(q, k, v, mask, backend=backend, scale=scale, block_m=tile, block_n=tile)


def _tile_for(block_size: int | None) -> int | None:
    """Kernel tiles that divide the radial blocks, so that every visited tile is full: the block size when it is a
    power of two of at least 16, at most 64 (the kernel's GPU default); else the kernel's default."""
    if block_size is None or block_size < 16 or block_size & (block_size - 1):
        return None
    return min(block_size, 64)


# --------------------------------------------------------------------------------------------------
# a toy video: where does attention go?
# --------------------------------------------------------------------------------------------------


def video_positions(num_frames: int, height: int, width: int, *, device=None) -> torch.Tensor:
    """``(f * h * w, 3)`` int64 coordinates ``(t, y, x)`` of the tokens, frame-major then row-major."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        check_positive_int(name, value)
    t, y, x = torch.meshgrid(torch.arange(num_frames, device=device), torch.arange(height, device=device),
                             torch.arange(width, device=device), indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def smooth_video(num_frames: int, height: int, width: int, channels: int = 32, *, temporal_corr: float,
                 spatial_corr: float, seed: int = 0) -> torch.Tensor:
    r"""Tokens of a smooth random video, ``(f h w, channels)`` float64, frame-major then row-major.

    Each channel is a stationary Gaussian field with unit variance and separable exponential correlation

    $$\operatorname{corr}\big(x_{t,y,x}, x_{t',y',x'}\big) = \rho_t^{|t-t'|}\,\rho_s^{|y-y'| + |x-x'|},$$

    made by running an AR(1) recursion $z_k = \rho z_{k-1} + \sqrt{1-\rho^2}\,\varepsilon_k$ along each axis
    of i.i.d. noise: consecutive frames look alike (a slow $\rho_t$ near 1) and so do neighbouring patches.
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("channels", channels)):
        check_positive_int(name, value)
    for name, rho in (("temporal_corr", temporal_corr), ("spatial_corr", spatial_corr)):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise ValueError(f"{name}: expected a correlation in [0, 1), got {rho!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_frames, height, width, channels, generator=g, dtype=torch.float64)
    for axis, rho in ((0, temporal_corr), (1, spatial_corr), (2, spatial_corr)):
        x = x.movedim(axis, 0)
        out = x.clone()
        for step in range(1, x.shape[0]):
            # z_k = rho z_(k-1) + sqrt(1 - rho^2) eps_k keeps unit variance and corr rho^|k - k'|
            out[step] = rho * out[step - 1] + math.sqrt(1 - rho ** 2) * x[step]
        x = out.movedim(0, axis)
    return x.reshape(-1, channels)


def similarity_attention(tokens: torch.Tensor, *, sharpness: float = 10.0) -> torch.Tensor:
    r"""One head whose queries and keys are the tokens themselves: $P = \operatorname{softmax}(\beta\,XX^\top/C)$.

    ``tokens (n, C)``; returns ``(n, n)``. With unit-variance channels $XX^\top/C$ estimates the
    correlation, so a token attends to the tokens that look like it; $\beta$ = ``sharpness``.
    """
    check_tensor("tokens", tokens, ndim=2)
    return torch.softmax(sharpness * tokens @ tokens.T / tokens.shape[1], dim=-1)


def decay_table(weights: torch.Tensor, frame_shape: tuple[int, int]) -> torch.Tensor:
    r"""Mean weight a query gives one key at frame distance $\Delta t$ and in-frame distance $d$, ``(f, h + w - 1)``.

    $d = |y - y'| + |x - x'|$ (Manhattan, on the frame grid). ``weights (..., n, n)``, the $n$ tokens
    frames of ``frame_shape = (h, w)``; averaged over the leading dims, the queries, and the keys at
    that distance. Entry $(\Delta t, d)$ is what the paper's decay law bounds,
    $p \le C e^{-\alpha\Delta t - \beta d}$.
    """
    check_tensor("weights", weights)
    h, w = frame_shape
    n = weights.shape[-1]
    if n % (h * w):
        raise ValueError(f"frame_shape: expected frames of h * w tokens dividing the {n} tokens, got {frame_shape}")
    frames = n // (h * w)
    t, y, x = video_positions(frames, h, w, device=weights.device).T
    in_frame = (y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()
    cell = (t[:, None] - t[None, :]).abs() * (h + w - 1) + in_frame
    mean = weights.reshape(-1, n, n).double().mean(0)
    total = torch.zeros(frames * (h + w - 1), dtype=torch.float64, device=weights.device)
    count = torch.zeros_like(total)
    total.index_add_(0, cell.flatten(), mean.flatten())
    count.index_add_(0, cell.flatten(), torch.ones_like(mean).flatten())
    return (total / count.clamp(min=1)).view(frames, h + w - 1)


def fit_exponential(values: torch.Tensor) -> tuple[float, float, float]:
    r"""Least-squares fit of $\log y_d = \log C - \lambda d$ for $d = 0, 1, \dots$: ``(C, rate, r2)``.

    ``r2`` is the coefficient of determination of the fit in log space (1 = a perfect exponential).
    """
    check_tensor("values", values, ndim=1)
    if len(values) < 3 or not bool((values > 0).all()):
        raise ValueError(f"values: expected at least 3 positive numbers, got {values.tolist()}")
    d = torch.arange(len(values), dtype=torch.float64)
    log_y = values.double().log()
    design = torch.stack([torch.ones_like(d), d], dim=1)
    intercept, slope = torch.linalg.lstsq(design, log_y[:, None]).solution.flatten().tolist()
    residual = log_y - (intercept + slope * d)
    r2 = 1 - float((residual ** 2).sum() / ((log_y - log_y.mean()) ** 2).sum())
    return math.exp(intercept), -slope, r2


def kept_mass(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""The share of dense attention's weight inside ``mask``, per query: $\sum_k P_{qk} M_{qk}$, ``(..., n)``."""
    check_tensor("weights", weights)
    check_tensor("mask", mask, floating=False)
    return (weights * mask.to(weights.dtype)).sum(-1)


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------


def _frame_grid(ax, seq_len, tokens_per_frame, scale=1):
    for edge in range(tokens_per_frame, seq_len, tokens_per_frame):
        ax.axhline(edge / scale - 0.5, color="tab:blue", linewidth=0.4, alpha=0.5)
        ax.axvline(edge / scale - 0.5, color="tab:blue", linewidth=0.4, alpha=0.5)


def plot_radial_masks(seq_len: int, tokens_per_frame: int, *, decay: float = 1.0, block_size: int = 128,
                      sink: bool = False, cut_canvas: bool = True, axes=None):
    """Two panels: the token mask and the block mask (drawn at token scale), frame borders in blue, with
    their densities. Returns the figure."""
    token = radial_token_mask(seq_len, tokens_per_frame, decay=decay, block_size=block_size, sink=sink)
    block = radial_mask(seq_len, tokens_per_frame, decay=decay, block_size=block_size, sink=sink,
                        cut_canvas=cut_canvas)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    plot_mask(token, ax=axes[0], title=f"token mask, density {token.float().mean():.3f}")
    plot_mask(block, ax=axes[1], title=f"{block_size}x{block_size} block mask, density {block.float().mean():.3f}")
    for ax in axes:
        _frame_grid(ax, seq_len, tokens_per_frame)
    axes[0].figure.tight_layout()
    return axes[0].figure


def plot_in_frame_band(frame_shape: tuple[int, int], query: tuple[int, int], half_width: float, *, ax=None,
                       title: str | None = None):
    """The keys of one frame a query ``(y, x)`` sees through a band $|c - r| \\le w$ on the flat index
    (dark), drawn on the ``(h, w)`` grid, the query in red: a horizontal strip, not a box."""
    from matplotlib.patches import Rectangle

    h, w = frame_shape
    r = query[0] * w + query[1]
    c = torch.arange(h * w)
    band = ((c - r).abs() <= half_width).view(h, w).float()
    ax = _axes(ax, size=(3.6, 3.6))
    ax.imshow(band.numpy(), cmap=MASK_CMAP, vmin=0, vmax=1.6, interpolation="nearest")
    ax.add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, color="tab:red"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"|c - r| <= {half_width:g} on a {h}x{w} frame")
    return ax


# --------------------------------------------------------------------------------------------------
# the token mixer
# --------------------------------------------------------------------------------------------------


class RadialAttention(MultiHeadAttention):
    r"""Multi-head radial attention, a bidirectional token mixer ``(B, L, dim) -> (B, L, dim)``.

    The sequence is read as frames of ``tokens_per_frame`` tokens (or cut into ``num_frames`` frames of
    $\lceil L/f\rceil$ tokens), the last one possibly partial, and every head uses :func:`radial_mask`.
    Same projections as :class:`attnlib.MultiHeadAttention`.

    Args:
        dim, num_heads, bias: as in :class:`attnlib.MultiHeadAttention`.
        tokens_per_frame: $s$ (default 16); give this or ``num_frames``, not both.
        num_frames: $f$: the frame length becomes $\lceil L/f\rceil$ for each input.
        decay: $\delta$, the code's decay factor (HunyuanVideo 0.95, Wan2.1 0.2).
        block_size: $B$ (default 16, a toy size; the code uses 128): the band's floor, the thinning
            threshold and the block size.
        sink: every query also sees frame 0 (the code does it for Wan2.1).
        adjacent_width: replaces the half-width of adjacent frames (see :func:`band_half_width`).
        granularity: ``"block"`` (the block mask the code runs) or ``"token"`` (the token mask).
        cut_canvas: the code's canvas cut (see :func:`radial_block_mask`).
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask, returns weights) or ``"kernel"``
            (the block-sparse Triton kernel; head dim 16 to 128).
        causal: must be ``False``: radial attention is the bidirectional attention of video diffusion.
    """

    def __init__(self, dim: int, num_heads: int, *, tokens_per_frame: int | None = None,
                 num_frames: int | None = None, decay: float = 1.0, block_size: int = 16, sink: bool = False,
                 adjacent_width: float | None = None, granularity: str = "block", cut_canvas: bool = True,
                 backend: str = "reference", causal: bool = False, bias: bool = False):
        if causal is not False:
            raise ValueError(f"causal: radial attention is bidirectional (video diffusion); it has no causal form, "
                             f"got causal={causal!r}")
        super().__init__(dim, num_heads, causal=False, bias=bias)
        if tokens_per_frame is not None and num_frames is not None:
            raise ValueError(f"num_frames: give tokens_per_frame or num_frames, not both "
                             f"(got {tokens_per_frame} and {num_frames})")
        if num_frames is None:
            tokens_per_frame = 16 if tokens_per_frame is None else tokens_per_frame
            check_positive_int("tokens_per_frame", tokens_per_frame)
        else:
            check_positive_int("num_frames", num_frames)
        check_positive_int("block_size", block_size)
        check_bool("sink", sink)
        check_bool("cut_canvas", cut_canvas)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
        check_backend(backend)
        self.tokens_per_frame, self.num_frames = tokens_per_frame, num_frames
        self.decay, self.block_size, self.sink = _check_decay(decay), block_size, sink
        self.adjacent_width = None if adjacent_width is None else _check_width(adjacent_width)
        self.granularity, self.cut_canvas, self.sparse_backend = granularity, cut_canvas, backend
        self._masks: dict = {}

    def frame_length(self, seq_len: int) -> int:
        """$s$ for an input of ``seq_len`` tokens."""
        return self.tokens_per_frame if self.num_frames is None else -(-seq_len // self.num_frames)

    def pattern(self, seq_len: int, device=None) -> torch.Tensor:
        """The ``(seq_len, seq_len)`` mask this module applies (built once per length and device)."""
        key = (seq_len, str(device))
        if key not in self._masks:
            self._masks[key] = radial_mask(seq_len, self.frame_length(seq_len), decay=self.decay,
                                           block_size=self.block_size, sink=self.sink,
                                           adjacent_width=self.adjacent_width, granularity=self.granularity,
                                           cut_canvas=self.cut_canvas, device=device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        check_tensor("x", x, ndim=3)
        mask = self.pattern(x.shape[1], x.device)
        if self.sparse_backend == "reference":
            return super().forward(x, mask=mask, return_weights=return_weights)
        tile = _tile_for(self.block_size if self.granularity == "block" else None)
        out = sparse_attention(*self.project(x), mask, backend=KERNEL, block_m=tile, block_n=tile,
                               return_weights=return_weights)
        self.last_weights = None
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        frames = (f"tokens_per_frame={self.tokens_per_frame}" if self.num_frames is None
                  else f"num_frames={self.num_frames}")
        return (f"{frames}, decay={self.decay}, block_size={self.block_size}, sink={self.sink}, "
                f"granularity={self.granularity!r}")


@register_mechanism("radial", paper="P39", lesson="41", supports_causal=False,
                    summary="radial attention (Li et al., 2025): frames of tokens_per_frame=, a band on the in-frame "
                            "index that halves per octave of frame distance (decay=), block mask (block_size=)")
def build_radial(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return RadialAttention(dim, num_heads, causal=causal, **options)


# --------------------------------------------------------------------------------------------------
# the benchmark's mask
# --------------------------------------------------------------------------------------------------


def benchmark_mask(length: int, *, device="cpu", seed: int = 0) -> torch.Tensor:
    r"""A radial mask typical of the paper at ``length`` tokens, ``(length, length)`` bool.

    It mimics HunyuanVideo at its default length in the official code (117 video frames, i.e. 30 latent
    frames, decay 0.95, no sink, $128\times128$ blocks), scaled to ``length`` tokens: 30 frames of
    $\lceil \text{length}/30\rceil$ tokens (the last one shorter), or fewer frames when that would make a
    frame shorter than two blocks (under 7680 tokens). It returns the expanded block mask, what the
    code's kernel runs. The mask is static: ``seed`` is unused (kept for the common signature).
    """
    check_positive_int("length", length)
    frames = max(1, min(30, length // 256))
    return radial_mask(length, -(-length // frames), decay=0.95, block_size=128, sink=False, granularity="block",
                       device=device)
