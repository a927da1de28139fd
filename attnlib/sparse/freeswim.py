r"""Lesson 42: FreeSwim, inward sliding windows and the cross-attention override, P33.

Wu, Song, Tan, He and Liu, 2025, "FreeSwim: Revisiting Sliding-Window Attention Mechanisms for
Training-Free Ultra-High-Resolution Video Generation" (arXiv:2511.14712; code: WillWu111/FreeSwim, read at
commit 9f35a72, ``nocache/attention_processor_.py`` and ``nocache/pipeline_wan_video2video.py``). A video
diffusion transformer trained at one resolution is run, without training, at a higher one.

**Tokens.** A video latent is a grid of $T \times H \times W$ tokens, flattened row-major,
$n = (tH + h)W + w$. Full self-attention lets every query see all $N = THW$ keys.

**Inward sliding window** (``init_mask_flex`` in the code). A model trained on $H_0 \times W_0$ tokens per
frame gets half sizes $d_h = \lfloor H_0/2 \rfloor$, $d_w = \lfloor W_0/2 \rfloor$. Query $(t, h, w)$ sees
the keys of *every* frame inside a spatial box that is shifted inward at the borders instead of cut:

$$\delta^{+}_h = \max(d_h - h, 0),\qquad \delta^{-}_h = \max(h + d_h - H + 1, 0),$$
$$M_{(t,h,w),(t',h',w')} = [\,h - d_h - \delta^{-}_h \le h' \le h + d_h + \delta^{+}_h\,] \wedge
  [\,w - d_w - \delta^{-}_w \le w' \le w + d_w + \delta^{+}_w\,]$$

($\delta^{\pm}_w$ likewise with $w, d_w, W$; any $t'$). Every query then sees exactly
$T(2d_h+1)(2d_w+1)$ keys, the training-scale receptive field, whenever $H \ge 2d_h+1$ and
$W \ge 2d_w+1$. This is lesson 40's NATTEN window (:mod:`attnlib.sparse.neighborhood`) with kernel sizes
$(T, \min(2d_h+1, H), \min(2d_w+1, W))$: the clamp $c = \operatorname{clamp}(h, d_h, H-1-d_h)$ and the
shifts $\delta^{\pm}$ put the box at the same place, so :func:`inward_window_mask` reuses
:func:`attnlib.sparse.neighborhood.neighborhood_mask`. Without the shifts (``inward=False``) the box is
truncated at the borders and border queries see fewer keys.

**Scale.** Both branches use $s = \sqrt{\log_{n_0} n \,/\, d}$ instead of $1/\sqrt d$, the
length-extrapolation scale of Jin et al., 2023 ("Training-free Diffusion Model Adaptation for
Variable-Sized Text-to-Image Synthesis", arXiv:2306.08645): $n_0$ tokens at training, $n$ at test. The
code hard-codes $n_0 = 30 \cdot 52 = 1560$ (one frame of Wan2.1-T2V-1.3B at 480x832) and $n = 2n_0$.

**Dual path** (``WanFlexAttnProcessor_``, ``WanCrossAttnProcessor`` and the pipeline). The latent batch
is duplicated, $[x_w; x_f]$ (window branch first). In every block, the window branch's self-attention
uses $M$ and the full branch's is dense; the cross-attention to the text is computed from the **full
branch's queries only** and its output is given to both branches (the *override*: the window branch's
own cross-attention is never computed). After each denoising step only $x_w$ is kept and duplicated
again.

Shapes follow the course: ``(batch, heads, tokens, head_dim)`` for attention, ``(batch, tokens, dim)``
for token mixers, boolean masks ``True`` = may attend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._checks import check_backend, check_non_negative_int, check_positive_int, check_qkv, check_scale, check_tensor
from ..core import attention
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import MASK_CMAP, _axes
from .block_sparse import sparse_attention
from .neighborhood import neighborhood_mask

# Wan2.1-T2V-1.3B in the official code: trained at 480x832 pixels, 16 pixels per token side
WAN_TRAIN_GRID = (30, 52)
WAN_TRAIN_TOKENS = 30 * 52
# 1088x1920 (the largest size the code allows for this model), 81 frames -> 21 latent frames
WAN_TARGET_GRID = (21, 68, 120)
WAN_HALF_SIZES = (15, 26)
WAN_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------


def as_grid3(grid) -> tuple[int, int, int]:
    """``(T, H, W)`` from a grid given as ``(H, W)`` (one frame) or ``(T, H, W)``."""
    if isinstance(grid, int) or not isinstance(grid, (tuple, list, torch.Size)) or len(grid) not in (2, 3):
        raise ValueError(f"grid: expected (H, W) or (T, H, W), got {grid!r}")
    grid = tuple(grid)
    for name, value in zip(("T", "H", "W")[-len(grid):], grid):
        check_positive_int(f"grid ({name})", value)
    return (1, *grid) if len(grid) == 2 else grid


def _half_pair(half_sizes) -> tuple[int, int]:
    if isinstance(half_sizes, int) and not isinstance(half_sizes, bool):
        half_sizes = (half_sizes, half_sizes)
    if not isinstance(half_sizes, (tuple, list)) or len(half_sizes) != 2:
        raise ValueError(f"half_sizes: expected (d_h, d_w) or one int, got {half_sizes!r}")
    for name, value in zip(("d_h", "d_w"), half_sizes):
        check_non_negative_int(f"half_sizes ({name})", value)
    return tuple(half_sizes)


def half_sizes_for(train_grid: Sequence[int]) -> tuple[int, int]:
    r"""The code's rule $d = \lfloor \text{training tokens per side} / 2 \rfloor$ for a training grid ``(H0, W0)``.

    Wan2.1-1.3B at 480x832 pixels is a $30 \times 52$ grid: ``(15, 26)``, a box of $31 \times 53$.
    """
    _, h0, w0 = as_grid3(train_grid)
    return h0 // 2, w0 // 2


# ------------------------------------------------------------------------------------------------
# the window
# ------------------------------------------------------------------------------------------------


def window_bounds(length: int, half: int, *, inward: bool = True, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First and last key coordinate each query sees along one spatial axis: ``(lo, hi)``, each ``(length,)`` int64.

    FreeSwim's shifts, written as in the official mask: with $\delta^{+} = \max(d - i, 0)$ and
    $\delta^{-} = \max(i + d - L + 1, 0)$, query $i$ sees $j \in [i - d - \delta^{-},\ i + d + \delta^{+}]$,
    clipped to $[0, L-1]$. ``inward=False`` drops the shifts (the truncated window $[i-d, i+d]$).
    """
    check_positive_int("length", length)
    check_non_negative_int("half", half)
    if not isinstance(inward, bool):
        raise TypeError(f"inward: expected a bool, got {type(inward).__name__}")
    i = torch.arange(length, device=device)
    # delta+ pushes the far end out when the box sticks out at 0; delta- pushes the near end at L - 1
    grow_high = (half - i).clamp(min=0) if inward else torch.zeros_like(i)
    grow_low = (i + half - length + 1).clamp(min=0) if inward else torch.zeros_like(i)
    # [i - d - delta-, i + d + delta+], clipped to the axis
    lo = (i - half - grow_low).clamp(min=0)
    hi = (i + half + grow_high).clamp(max=length - 1)
    return lo, hi


def _axis_mask(length: int, half: int, inward: bool, device) -> torch.Tensor:
    lo, hi = window_bounds(length, half, inward=inward, device=device)
    j = torch.arange(length, device=device)
    return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])


def natten_kernel_sizes(grid, half_sizes) -> tuple[int, int, int]:
    r"""Lesson 40's kernel sizes that give the same window: $(T, \min(2d_h+1, H), \min(2d_w+1, W))$."""
    t, h, w = as_grid3(grid)
    dh, dw = _half_pair(half_sizes)
    return t, min(2 * dh + 1, h), min(2 * dw + 1, w)


def inward_window_mask(grid, half_sizes, *, inward: bool = True, device=None) -> torch.Tensor:
    r"""The ``(N, N)`` boolean mask of FreeSwim's window on a ``grid`` of $N = THW$ tokens (row-major).

    Every frame is visible (full along time); in space, the inward box of half sizes ``(d_h, d_w)``
    (``inward=True``, lesson 40's NATTEN window with kernel :func:`natten_kernel_sizes`) or the box
    truncated at the borders (``inward=False``). ``grid`` is ``(H, W)`` or ``(T, H, W)``.
    """
    t, h, w = as_grid3(grid)
    dh, dw = _half_pair(half_sizes)
    if not isinstance(inward, bool):
        raise TypeError(f"inward: expected a bool, got {type(inward).__name__}")
    if inward:
        # the same box as the shifts delta+-: NATTEN clamps the window centre into [d, L - 1 - d]
        return neighborhood_mask((t, h, w), natten_kernel_sizes((t, h, w), (dh, dw)), device=device)
    mask = torch.ones(t, t, dtype=torch.bool, device=device)
    for one in (_axis_mask(h, dh, False, device), _axis_mask(w, dw, False, device)):
        # row-major flattening: the AND over axes is a Kronecker product
        mask = (mask[:, None, :, None] & one[None, :, None, :]).reshape(mask.shape[0] * one.shape[0], -1)
    return mask


def keys_per_query(grid, half_sizes, *, inward: bool = True) -> torch.Tensor:
    r"""How many keys each query sees, ``(N,)`` int64, in closed form: $T\,(hi_h-lo_h+1)(hi_w-lo_w+1)$.

    With the inward window and $H \ge 2d_h+1$, $W \ge 2d_w+1$ this is $T(2d_h+1)(2d_w+1)$ for every query.
    """
    t, h, w = as_grid3(grid)
    dh, dw = _half_pair(half_sizes)
    lo_h, hi_h = window_bounds(h, dh, inward=inward)
    lo_w, hi_w = window_bounds(w, dw, inward=inward)
    per_frame = (hi_h - lo_h + 1)[:, None] * (hi_w - lo_w + 1)[None, :]
    return (t * per_frame).reshape(-1).repeat(t)


# ------------------------------------------------------------------------------------------------
# attention with the window
# ------------------------------------------------------------------------------------------------


def extrapolation_scale(head_dim: int, train_tokens: int, test_tokens: int) -> float:
    r"""The length-extrapolation softmax scale $s = \sqrt{\log_{n_0} n \,/\, d}$ (Jin et al., 2023).

    ``train_tokens`` $= n_0$, ``test_tokens`` $= n$; $n = n_0$ gives the usual $1/\sqrt d$. Softmax over
    $n$ keys has an entropy that grows like $\log n$; multiplying the logits by $\sqrt{\log_{n_0} n}$
    sharpens them back toward the training entropy.
    """
    for name, value in (("head_dim", head_dim), ("test_tokens", test_tokens)):
        check_positive_int(name, value)
    check_positive_int("train_tokens", train_tokens)
    if train_tokens < 2:
        raise ValueError(f"train_tokens: expected at least 2 (the base of a logarithm), got {train_tokens}")
    # s = sqrt(log_{n0} n / d)
    return math.sqrt(math.log(test_tokens) / math.log(train_tokens) / head_dim)


def freeswim_code_scale(head_dim: int = WAN_HEAD_DIM) -> float:
    r"""The scale the official code hard-codes: $\sqrt{\log_{1560} 3120 / d}$ ($\approx \sqrt{1.0944/d}$).

    $1560 = 30 \cdot 52$ is one 480x832 frame of Wan2.1-T2V-1.3B (head dim 128); the test count is fixed
    at twice that, whatever the target resolution or the number of frames.
    """
    return extrapolation_scale(head_dim, WAN_TRAIN_TOKENS, 2 * WAN_TRAIN_TOKENS)


def _check_grid_matches(grid, length: int) -> tuple[int, int, int]:
    t, h, w = as_grid3(grid)
    if t * h * w != length:
        raise ValueError(f"grid: expected T * H * W = {length} (the number of tokens), got {grid!r} "
                         f"({t * h * w} tokens)")
    return t, h, w


def freeswim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, half_sizes, *,
                       inward: bool = True, scale: float | None = None, backend: str = "reference") -> torch.Tensor:
    r"""Window-branch self-attention $O = \operatorname{softmax}(s\,QK^\top \text{ masked by } M)\,V$.

    Shapes: ``q (B, Hq, N, D)``, ``k, v (B, Hkv, N, D)`` with $N = THW$ tokens of ``grid`` flattened
    row-major; returns ``(B, Hq, N, D)``. ``M`` is :func:`inward_window_mask`; ``scale`` defaults to
    $1/\sqrt D$ (FreeSwim passes :func:`extrapolation_scale`). ``backend="kernel"`` runs the block-sparse
    Triton kernel of lesson 40 (:func:`kernels.block_sparse.block_sparse_attention`), which visits only
    the tiles the window does not empty.
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: FreeSwim's window is self-attention, expected {q.shape[2]} keys, got {k.shape[2]}")
    check_scale(scale)
    check_backend(backend)
    grid = _check_grid_matches(grid, q.shape[2])
    mask = inward_window_mask(grid, half_sizes, inward=inward, device=q.device)
    return sparse_attention(q, k, v, mask, backend=backend, scale=scale)


# ------------------------------------------------------------------------------------------------
# the dual path
# ------------------------------------------------------------------------------------------------


def duplicate_branches(latents: torch.Tensor) -> torch.Tensor:
    r"""$[x; x]$: the window branch (first half) and the full branch (second half), ``(B, ...) -> (2B, ...)``."""
    check_tensor("latents", latents)
    return torch.cat([latents, latents.clone()], dim=0)


def _split_branches(name: str, x: torch.Tensor) -> int:
    if x.shape[0] % 2:
        raise ValueError(f"{name}: expected an even batch [window branch; full branch], got batch {x.shape[0]}")
    return x.shape[0] // 2


def keep_window_branch(latents: torch.Tensor) -> torch.Tensor:
    """The window branch's half of a dual batch, ``(2B, ...) -> (B, ...)``: what FreeSwim keeps after each step."""
    check_tensor("latents", latents)
    return latents[:_split_branches("latents", latents)]


def dual_path_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                             scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""Self-attention of both branches: window $\operatorname{softmax}(s\,Q_wK_w^\top + B \text{ masked by } M)V_w$,
    full $\operatorname{softmax}(s\,Q_fK_f^\top + B)V_f$, with the same scale $s$ (and bias $B$, if any).

    Shapes: ``q, k, v (2B, H, N, D)`` stacked ``[window; full]``, ``mask (N, N)``, ``bias`` broadcastable
    to ``(B, H, N, N)``; returns ``(2B, H, N, Dv)``.
    """
    check_qkv(q, k, v)
    b = _split_branches("q", q)
    # the window branch (first half) is masked, the full branch (second half) is dense
    window = attention(q[:b], k[:b], v[:b], mask=mask, bias=bias, scale=scale)
    full = attention(q[b:], k[b:], v[b:], bias=bias, scale=scale)
    return torch.cat([window, full], dim=0)


def cross_attention_override(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             scale: float | None = None) -> torch.Tensor:
    r"""FreeSwim's cross-attention override: $C = \operatorname{softmax}(s\,Q_fK_c^\top)V_c$ from the full
    branch's queries only, given to both branches, $[C; C]$.

    Shapes: ``q (2B, H, N, D)`` stacked ``[window; full]`` (the window half is never read), context
    ``k, v (B, H, M, D)`` or ``(2B, H, M, D)`` (then the full half is used); returns ``(2B, H, N, Dv)``.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    b = _split_branches("q", q)
    if k.shape[0] == 2 * b:
        k, v = k[b:], v[b:]
    # C = softmax(s Q_f K_c^T) V_c, given to both branches
    full = attention(q[b:], k, v, scale=scale)
    return torch.cat([full, full.clone()], dim=0)


def dual_path_denoise(step: Callable[[torch.Tensor, int], torch.Tensor], latents: torch.Tensor,
                      num_steps: int) -> torch.Tensor:
    r"""The dual-path sampling loop: each step runs on $[x; x]$ and keeps only the window branch.

    ``step(dual_latents (2B, ...), i) -> (2B, ...)`` is one denoising step of the model (with the dual
    self-attention and the override inside); returns the window branch after ``num_steps`` steps.
    """
    check_positive_int("num_steps", num_steps)
    for i in range(num_steps):
        dual = step(duplicate_branches(latents), i)
        if not isinstance(dual, torch.Tensor) or dual.shape != (2 * latents.shape[0], *latents.shape[1:]):
            raise ValueError(f"step: expected a tensor of shape {(2 * latents.shape[0], *latents.shape[1:])}, "
                             f"got {getattr(dual, 'shape', type(dual).__name__)}")
        latents = keep_window_branch(dual)
    return latents


# ------------------------------------------------------------------------------------------------
# the benchmark mask
# ------------------------------------------------------------------------------------------------


def benchmark_grid(length: int) -> tuple[int, int, int, int, int]:
    r"""``(frames, H, W, d_h, d_w)`` of :func:`benchmark_mask`: Wan's $68 \times 120$ frame with the $31 \times 53$
    box, as many whole frames as fit (the rest of the tokens start one more, partial frame); below one
    frame (8160 tokens) the frame and the box shrink by $\sqrt{\text{length}/8160}$ per side."""
    check_positive_int("length", length)
    _, h0, w0 = WAN_TARGET_GRID
    shrink = min(1.0, math.sqrt(length / (h0 * w0)))
    h, w = max(1, round(h0 * shrink)), max(1, round(w0 * shrink))
    while h * w > length:
        h, w = max(1, h - 1), max(1, w - 1)
    dh, dw = (round(d * shrink) for d in WAN_HALF_SIZES)
    return length // (h * w), h, w, dh, dw


def benchmark_mask(length: int, *, device="cpu", seed: int = 0) -> torch.Tensor:
    r"""A ``(length, length)`` FreeSwim window mask typical of the paper's setting, for the kernel benchmark.

    It mimics Wan2.1-T2V-1.3B generating 1088x1920 from a 480x832 model (the official example): a latent
    frame is $68 \times 120$ tokens and the inward box is $31 \times 53$ ($d = 15, 26$), about 20 % of a frame.
    Wan's 21 latent frames would be 171,360 tokens, so the benchmark keeps the frame and the box and
    takes as many frames as ``length`` holds (8k: one frame, 16k: two, 32k: four; the last
    ``length mod 8160`` tokens are the first rows of one more frame and follow the same rule); see
    :func:`benchmark_grid`. Every frame is visible (full along time), as in the paper. ``seed`` is
    unused: the mask does not depend on content.
    """
    frames, h, w, dh, dw = benchmark_grid(length)
    n = torch.arange(length, device=device)
    row, col = (n % (h * w)) // w, n % w
    lo_h, hi_h = window_bounds(h, dh, device=device)
    lo_w, hi_w = window_bounds(w, dw, device=device)
    # M_ij = [lo_h(h_i) <= h_j <= hi_h(h_i)] [lo_w(w_i) <= w_j <= hi_w(w_i)], any frame
    mask = row[None, :] >= lo_h[row][:, None]
    mask &= row[None, :] <= hi_h[row][:, None]
    mask &= col[None, :] >= lo_w[col][:, None]
    mask &= col[None, :] <= hi_w[col][:, None]
    return mask


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------


def plot_window_boxes(grid_hw: Sequence[int], half_sizes, query: Sequence[int], *, ax=None, title=None):
    """One frame of ``grid_hw = (H, W)`` tokens: the inward box of ``query = (h, w)`` (grey), the truncated
    box (outlined in blue) and the query (red), with the number of keys each sees in one frame."""
    from matplotlib.patches import Rectangle

    (_, h, w), (dh, dw) = as_grid3(grid_hw), _half_pair(half_sizes)
    qh, qw = query
    inward = inward_window_mask((h, w), (dh, dw))[qh * w + qw].view(h, w)
    ax = _axes(ax, size=(4.6, 4.6 * h / max(w, 1) + 0.6))
    ax.imshow(inward.float().numpy(), cmap=MASK_CMAP, vmin=0, vmax=2.2, interpolation="nearest")
    lo_h, hi_h = window_bounds(h, dh, inward=False)
    lo_w, hi_w = window_bounds(w, dw, inward=False)
    top, bottom, left, right = (int(x) for x in (lo_h[qh], hi_h[qh], lo_w[qw], hi_w[qw]))
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False,
                           edgecolor="tab:blue", linewidth=2.0, linestyle="--"))
    ax.add_patch(Rectangle((qw - 0.5, qh - 0.5), 1, 1, color="tab:red"))
    ax.set_xticks([])
    ax.set_yticks([])
    truncated = (bottom - top + 1) * (right - left + 1)
    ax.set_title(title or f"query {tuple(query)}: inward {int(inward.sum())} keys, truncated {truncated}")
    return ax


def plot_images(images, titles: Sequence[str], *, suptitle: str | None = None, vmax: float = 1.0):
    """A row of 2-D images ``(H, W)`` (values 0..``vmax``, dark = high) with one title each; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(2.5 * len(images), 2.8), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        image = torch.as_tensor(image).detach().float()
        ax.imshow(image.numpy(), cmap=MASK_CMAP, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# the token mixer
# ------------------------------------------------------------------------------------------------


def default_grid(length: int) -> tuple[int, int, int]:
    """One frame ``(1, h, w)`` with ``h`` the largest divisor of ``length`` not above its square root."""
    check_positive_int("length", length)
    h = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
    return 1, h, length // h


class FreeSwimWindowAttention(MultiHeadAttention):
    r"""Multi-head self-attention through FreeSwim's inward window, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    The projections are those of :class:`attnlib.MultiHeadAttention` (same parameter names), so a model
    trained with full attention can be run with the window, training-free, as FreeSwim does.

    Args:
        dim, num_heads, bias: as in :class:`attnlib.MultiHeadAttention`.
        grid: ``(H, W)`` or ``(T, H, W)`` with ``T * H * W = L``; ``None`` takes one near-square frame per
            input (:func:`default_grid`), so that any length works.
        half_sizes: ``(d_h, d_w)`` (an int for both); a box of $(2d_h+1) \times (2d_w+1)$ tokens.
        inward: shift the box inward at the borders (FreeSwim) or truncate it (``False``).
        scale: softmax scale; ``None`` is $1/\sqrt d$ (pass :func:`extrapolation_scale` for FreeSwim's).
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask) or ``"kernel"`` (the block-sparse
            Triton kernel; head dim 16 to 128).

    Not causal: the window looks both ways, like the video DiTs FreeSwim targets.
    """

    def __init__(self, dim: int, num_heads: int, *, grid=None, half_sizes=(2, 2), inward: bool = True,
                 scale: float | None = None, backend: str = "reference", bias: bool = False):
        super().__init__(dim, num_heads, bias=bias)
        check_backend(backend)
        if not isinstance(inward, bool):
            raise TypeError(f"inward: expected a bool, got {type(inward).__name__}")
        check_scale(scale)
        self.grid = None if grid is None else as_grid3(grid)
        self.half_sizes, self.inward, self.scale, self.window_backend = _half_pair(half_sizes), inward, scale, backend

    def grid_for(self, length: int) -> tuple[int, int, int]:
        """The ``(T, H, W)`` grid used for ``length`` tokens."""
        return default_grid(length) if self.grid is None else _check_grid_matches(self.grid, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        out = freeswim_attention(q, k, v, self.grid_for(x.shape[1]), self.half_sizes, inward=self.inward,
                                 scale=self.scale, backend=self.window_backend)
        self.last_weights = None
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        return (f"grid={self.grid}, half_sizes={self.half_sizes}, inward={self.inward}, scale={self.scale}, "
                f"backend={self.window_backend!r}")


@register_mechanism("freeswim-window", paper="P33", lesson="42", supports_causal=False,
                    summary="FreeSwim's inward sliding window (Wu et al., 2025): every frame, a 2-D box of "
                            "half sizes half_sizes= shifted inward at the borders, on grid=(T, H, W)")
def build_freeswim_window(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    if causal:
        raise ValueError("causal: FreeSwim's window looks both ways; it has no causal form")
    return FreeSwimWindowAttention(dim, num_heads, **options)
