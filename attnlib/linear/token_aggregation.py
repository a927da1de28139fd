r"""Lesson 32: content-aware token aggregation (CATANet), P13.

Liu, Liu, Tang and Wu, *CATANet: Efficient Content-Aware Token Aggregation for Lightweight Image
Super-Resolution* (CVPR 2025, arXiv:2503.06896). Official code: ``EquationWalker/CATANet``
(``basicsr/archs/catanet_arch.py``: ``TAB``, ``IRCA``, ``IASA``, ``center_iter``).

**The problem.** Full attention over the $N = HW$ tokens of an image costs $O(N^2)$. Windows make it
$O(Nw)$, but a window is *content-agnostic*: two similar patches far apart never see each other.

**Token centres.** CATANet keeps $M$ centres $C \in \mathbb{R}^{M \times d}$, shared by all images, and
groups each token by its nearest centre in cosine similarity,

$$a_t = \arg\max_m \frac{x_t \cdot c_m}{\lVert x_t\rVert\, \lVert c_m\rVert}.$$

In training the centres are refined on the batch by cosine k-means (every token normalised, each centre
becomes the normalised sum of its tokens, an empty centre keeps its old value),

$$\hat c_m \leftarrow \operatorname{normalize}\Big(\sum_{t:\,a_t = m} \hat x_t\Big),$$

and the stored centres follow them with an exponential moving average, only in training:

$$C \leftarrow \lambda\, C + (1 - \lambda)\, \hat C, \qquad \lambda = 0.999 .$$

At inference the stored $C$ is used as is: no clustering cost.

**Intra-group self-attention (IASA).** Sort the tokens by group (a *stable* sort: inside a group the tokens
keep their image order), cut the sorted sequence into sub-groups of $g$ tokens, and let sub-group $i$ attend
to the sorted keys of its own sub-group and of the next one, $[ig, ig + 2g)$ (the official code; the end
is padded by reflection). Cost $O(N \cdot 2g)$.

**Inter-group cross-attention (IRCA).** Every token also attends to the $M$ centres,
$K_c = C W_K^c$, $V_c = C W_V^c$. The two outputs are *added*, each with its own softmax:

$$y_t = \operatorname{softmax}\!\Big(\frac{q_t K_{W(t)}^\top}{\sqrt{d_h}}\Big) V_{W(t)}
      + \operatorname{softmax}\!\Big(\frac{q_t K_c^\top}{\sqrt{d_h}}\Big) V_c ,
\qquad \text{out}_t = y_t W_O ,$$

where $W(t)$ is the key window of $t$'s sub-group, and the result is scattered back to image order.

**Where this module follows the code rather than the paper's prose** (each is tested):

* the sub-group window includes the *next* sub-group (``window="next"``); ``window="own"`` keeps each
  sub-group to itself;
* the sort is stable here (the code's ``torch.argsort`` is not, so ties may shuffle sub-groups);
* the scale is the per-head $1/\sqrt{d_h}$ (the code defines $qk_\text{dim}^{-1/2}$ but never uses it);
* in training, the centres used by IRCA are the batch's k-means result, a differentiable function of the
  tokens; in evaluation they are the stored EMA buffer (not re-normalised);
* before the first training step the centres are the means of $M$ contiguous chunks of the reflect-padded
  sequence (the code pads $M - N \bmod M$ tokens, $M$ of them when $M$ divides $N$).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..core import attention, compute_dtype, masked_softmax
from ..registry import register_mechanism
from ..tools.plotting import _as_numpy, _axes, plt

WINDOWS = ("next", "own")
GROUP_CMAP = "tab20"


# --- centres: assignment, k-means, EMA ------------------------------------------------------------------


def _check_tokens_and_centres(x, centres) -> None:
    check_tensor("x", x, ndim=3)
    check_tensor("centres", centres, ndim=2)
    if centres.shape[1] != x.shape[2]:
        raise ValueError(f"centres: expected {x.shape[2]} features per centre (as x), "
                         f"got shape {tuple(centres.shape)}")
    if centres.shape[0] == 0:
        raise ValueError("centres: expected at least one centre, got 0")


def cosine_assign(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    r"""Group of each token: $a_t = \arg\max_m \cos(x_t, c_m)$ (the first centre on ties).

    Shapes: ``x (B, N, C)``, ``centres (M, C)``; returns ``(B, N)`` int64 in ``[0, M)``.
    """
    _check_tokens_and_centres(x, centres)
    # cos(x_t, c_m) = x_t . c_m / (|x_t| |c_m|)
    similarity = F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).T
    return similarity.argmax(dim=-1)


def kmeans_step(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    r"""One cosine k-means step over all tokens of the batch (the code's ``center_iter``).

    $$\hat c_m = \operatorname{normalize}\Big(\sum_{b,t:\ a_{bt} = m} \hat x_{bt}\Big),\qquad
      \hat x = x / \lVert x \rVert,$$

    and a centre no token chose keeps its old (normalised) value. Differentiable in ``x``.

    Shapes: ``x (B, N, C)``, ``centres (M, C)``; returns ``(M, C)``, every row of unit norm.
    """
    _check_tokens_and_centres(x, centres)
    x_unit = F.normalize(x, dim=-1)
    old = F.normalize(centres, dim=-1)
    groups = (x_unit @ old.T).argmax(dim=-1).flatten()
    sums = torch.zeros_like(old).index_add(0, groups, x_unit.flatten(0, 1))
    counts = torch.bincount(groups, minlength=old.shape[0])
    # c_m = normalize(sum of its unit tokens); empty centres stay where they were
    return torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), old)


def initial_centres(x: torch.Tensor, num_centres: int) -> torch.Tensor:
    r"""Centres before any training: the means of ``num_centres`` contiguous chunks of the sequence.

    As in the code, the sequence is first padded by reflection with $p = M - (N \bmod M)$ tokens
    ($x_{N-1}, x_{N-2}, \dots$; the reflection repeats if $p > N$, where the code would fail); chunk $m$
    then averages positions $[m n, (m+1) n)$, $n = (N + p)/M$, over the whole batch.

    Shapes: ``x (B, N, C)``; returns ``(M, C)``.
    """
    check_tensor("x", x, ndim=3)
    check_positive_int("num_centres", num_centres)
    b, n, c = x.shape
    pad = num_centres - n % num_centres
    reflected = torch.tensor(_reflect_tail(n, pad), dtype=torch.long, device=x.device)
    padded = torch.cat([x, x[:, reflected]], dim=1)
    chunks = padded.reshape(b, num_centres, -1, c)
    return chunks.mean(dim=(0, 2))


def ema_update(stored: torch.Tensor, new: torch.Tensor, decay: float) -> torch.Tensor:
    r"""$C \leftarrow \lambda C + (1-\lambda)\hat C$, in place on ``stored (M, C)``; returns it."""
    return stored.mul_(decay).add_(new, alpha=1.0 - decay)


# --- sorting, sub-groups, scatter back ------------------------------------------------------------------


def sort_by_group(groups: torch.Tensor) -> torch.Tensor:
    """Order that sorts tokens by group, stably (inside a group tokens keep their order).

    Shapes: ``groups (B, N)`` int; returns ``order (B, N)``: sorted position ``i`` holds token ``order[:, i]``.
    """
    return torch.sort(groups, dim=-1, stable=True).indices


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x (B, ..., N, D)`` in sorted order: ``out[..., i, :] = x[..., order[i], :]`` (order ``(B, N)``)."""
    index = order.reshape(order.shape[0], *([1] * (x.dim() - 3)), order.shape[1], 1)
    return x.gather(-2, index.expand(*x.shape[:-2], -1, x.shape[-1]))


def scatter_back(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``out[..., order[i], :] = y[..., i, :]``."""
    index = order.reshape(order.shape[0], *([1] * (y.dim() - 3)), order.shape[1], 1)
    return torch.empty_like(y).scatter(-2, index.expand(*y.shape[:-2], -1, y.shape[-1]), y)


def _reflect_tail(n: int, count: int) -> list[int]:
    # the code's torch.flip(seq[n - count:n]): n-1, n-2, ...; it repeats if count > n (the code fails there)
    return [n - 1 - (i % n) for i in range(count)]


def subgroup_indices(num_tokens: int, group_size: int, window: str = "next", device=None):
    r"""Which sorted positions each sub-group's queries and keys are, as in the code's IASA.

    With $g = \min(N, \text{group\_size})$ and $n_g = \lceil N/g \rceil$ sub-groups, the sorted sequence is
    padded to $n_g g$ queries by reflection ($x_{N-1}, x_{N-2}, \dots$). ``window="next"``: sub-group $i$'s
    keys are positions $[ig, ig + 2g)$ of the sequence padded with the reflection of its last $p + g$
    tokens ($p = n_g g - N$), so the last sub-group sees reflected copies of earlier tokens.
    ``window="own"``: the keys are the sub-group's own queries.

    Returns ``(queries (n_g, g), keys (n_g, W))`` int64, ``W = 2g`` or ``g``; padded queries are dropped
    from the output later. Duplicated keys count twice in the softmax (as in the code).
    """
    check_positive_int("num_tokens", num_tokens)
    check_positive_int("group_size", group_size)
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {WINDOWS}, got {window!r}")
    g = min(num_tokens, group_size)
    num_groups = -(-num_tokens // g)
    pad = num_groups * g - num_tokens
    query_order = list(range(num_tokens)) + _reflect_tail(num_tokens, pad)
    queries = torch.tensor(query_order, dtype=torch.long, device=device).reshape(num_groups, g)
    if window == "own":
        return queries, queries.clone()
    if pad + g > num_tokens:
        # the code pads the keys with the flipped slice k[N - p - g : N]: past N its start turns negative (Python
        # counts it from the end), the padding comes out too short and the windows no longer fit; it fails there,
        # where a reflection of the reflection would count some keys three times. So does the library.
        raise ValueError(f"group_size: with {num_tokens} tokens in sub-groups of {g}, the keys' padding "
                         f"({pad + g} entries) must not be longer than the sequence, as in the official code; use a "
                         f"group size of at most {(2 * num_tokens) // 3} or at least {num_tokens}")
    key_order = list(range(num_tokens)) + _reflect_tail(num_tokens, pad + g)
    keys = torch.tensor(key_order, dtype=torch.long, device=device)
    windows = torch.stack([keys[i * g:i * g + 2 * g] for i in range(num_groups)])
    return queries, windows


def intra_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, *,
                          window: str = "next", scale: float | None = None, return_weights: bool = False):
    r"""IASA on tokens already sorted by group: sub-group $i$ attends to its key window $W_i$.

    $$o_t = \operatorname{softmax}\big(s\, q_t K_{W_i}^\top\big) V_{W_i} \quad \text{for } t \text{ in sub-group } i,$$

    $s = 1/\sqrt{D}$ by default. With ``group_size >= N`` this is full softmax attention (the window of
    ``"next"`` then holds every key twice, which leaves the softmax unchanged).

    Shapes: ``q, k (B, H, N, D)``, ``v (B, H, N, Dv)``; returns ``(B, H, N, Dv)``, and with
    ``return_weights`` also the weights ``(B, H, n_g, g, W)`` and the index pair of
    :func:`subgroup_indices`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"k, v: expected shapes {tuple(q.shape)} and {tuple(q.shape[:3])} + (Dv,) (as q), "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    n, d = q.shape[2], q.shape[3]
    queries, keys = subgroup_indices(n, group_size, window, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # (B, H, n_g, g, D) queries and (B, H, n_g, W, D) keys of every sub-group; scores and softmax in float32 for
    # 16-bit inputs (a raw dot product past 65,504 is inf in float16), as attention() does
    work = compute_dtype(q.dtype)
    q_groups, k_groups, v_groups = q[:, :, queries].to(work), k[:, :, keys].to(work), v[:, :, keys].to(work)
    # P_i = softmax(s Q_i K_{W_i}^T)
    weights = masked_softmax(q_groups @ k_groups.transpose(-2, -1) * scale)
    # O_i = P_i V_{W_i}, then drop the padded queries
    out = (weights @ v_groups).flatten(2, 3)[:, :, :n].to(q.dtype)
    return (out, weights, (queries, keys)) if return_weights else out


def centre_cross_attention(q: torch.Tensor, k_centres: torch.Tensor, v_centres: torch.Tensor, *,
                           scale: float | None = None) -> torch.Tensor:
    r"""IRCA: every token attends to the $M$ centres, $\operatorname{softmax}(s\, q_t K_c^\top) V_c$.

    Shapes: ``q (B, H, N, D)``, ``k_centres (H, M, D)``, ``v_centres (H, M, Dv)``; returns ``(B, H, N, Dv)``.
    """
    check_tensor("k_centres", k_centres, ndim=3)
    check_tensor("v_centres", v_centres, ndim=3)
    b = q.shape[0]
    k_c = k_centres.unsqueeze(0).expand(b, -1, -1, -1)
    v_c = v_centres.unsqueeze(0).expand(b, -1, -1, -1)
    return attention(q, k_c, v_c, scale=scale)


# --- the token mixer --------------------------------------------------------------------------------


class ContentAwareTokenAggregation(nn.Module):
    r"""CATANet's token aggregation attention (IRCA + IASA), a token mixer ``(B, N, dim) -> (B, N, dim)``.

    Args:
        dim: model width.
        num_heads: heads $h$; must divide ``dim`` and ``qk_dim``.
        num_centres: $M$, the shared token centres (the paper: 16 to 128 by block).
        group_size: $g$, tokens per sub-group (the paper: 256 to 32 by block).
        kmeans_iters: k-means steps per training forward (the code: 5 per block; the last one is
            differentiable and feeds IRCA).
        ema_decay: $\lambda$ of the centres' moving average (the code: 0.999).
        window: ``"next"`` (own plus next sub-group, the code) or ``"own"``.
        qk_dim: width of queries and keys (default ``dim``; the code uses 36 for ``dim = 40``).
        causal: must be ``False``; sorting by content mixes past and future.

    Buffers: ``centres (M, dim)`` and ``initialised`` (set by the first training forward). After each
    forward, ``last_groups (B, N)`` and ``last_order (B, N)`` hold the assignment and the sort.
    """

    def __init__(self, dim: int, num_heads: int, *, num_centres: int = 4, group_size: int = 4,
                 kmeans_iters: int = 3, ema_decay: float = 0.999, window: str = "next",
                 qk_dim: int | None = None, causal: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_centres", num_centres),
                            ("group_size", group_size), ("kmeans_iters", kmeans_iters)):
            check_positive_int(name, value)
        qk_dim = dim if qk_dim is None else qk_dim
        check_positive_int("qk_dim", qk_dim)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim} and qk_dim={qk_dim}, got {num_heads}")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay <= 1:
            raise ValueError(f"ema_decay: expected a number from 0 to 1, got {ema_decay!r}")
        if window not in WINDOWS:
            raise ValueError(f"window: expected one of {WINDOWS}, got {window!r}")
        if causal:
            raise ValueError("causal: content-aware token aggregation cannot run causally (sorting by "
                             "content mixes past and future tokens); got causal=True")
        self.dim, self.num_heads, self.qk_dim = dim, num_heads, qk_dim
        self.num_centres, self.group_size, self.kmeans_iters = num_centres, group_size, kmeans_iters
        self.ema_decay, self.window = float(ema_decay), window
        self.q_proj = nn.Linear(dim, qk_dim, bias=False)
        self.k_proj = nn.Linear(dim, qk_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.centre_k_proj = nn.Linear(dim, qk_dim, bias=False)
        self.centre_v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("centres", torch.zeros(num_centres, dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.last_groups: torch.Tensor | None = None
        self.last_order: torch.Tensor | None = None
        self.last_weights = None  # the output is a sum of two softmaxes: no single attention map

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., N, h * d) -> (..., h, N, d)``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def current_centres(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The centres this forward uses: ``(for IRCA, with gradient; for grouping, detached)``, both ``(M, dim)``."""
        start = self.centres if bool(self.initialised) else initial_centres(x.detach(), self.num_centres)
        if not self.training:
            return start, start
        with torch.no_grad():
            centres = start
            for _ in range(self.kmeans_iters - 1):
                centres = kmeans_step(x, centres)
        # the last step keeps its gradient: IRCA's keys and values depend on the tokens
        centres = kmeans_step(x, centres)
        return centres, centres.detach()

    @torch.no_grad()
    def update_centres(self, new: torch.Tensor) -> None:
        """Training only: store ``new`` on the first call, else $C \\leftarrow \\lambda C + (1-\\lambda)$ ``new``."""
        if not bool(self.initialised):
            self.centres.copy_(new)
            self.initialised.fill_(True)
        else:
            ema_update(self.centres, new, self.ema_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of ``x (B, N, dim)``; returns ``(B, N, dim)``."""
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"x: expected at least one token, got shape {tuple(x.shape)}")
        centres_attn, centres_group = self.current_centres(x)
        with torch.no_grad():
            groups = cosine_assign(x, centres_group)
            order = sort_by_group(groups)
        # IRCA: K_c = C W_K^c, V_c = C W_V^c, (h, M, d)
        k_c = self.split_heads(self.centre_k_proj(centres_attn.to(x.dtype)))
        v_c = self.split_heads(self.centre_v_proj(centres_attn.to(x.dtype)))
        # queries, keys, values in sorted order, (B, h, N, d)
        q, k, v = (self.split_heads(gather_tokens(p(x), order)) for p in (self.q_proj, self.k_proj, self.v_proj))
        # y = IASA + IRCA: two softmaxes, added
        y = intra_group_attention(q, k, v, self.group_size, window=self.window) + centre_cross_attention(q, k_c, v_c)
        y = scatter_back(y.transpose(1, 2).flatten(2), order)
        if self.training:
            self.update_centres(centres_group)
        self.last_groups, self.last_order = groups, order
        return self.out_proj(y)


@register_mechanism("catanet", paper="P13", lesson="32", supports_causal=False,
                    summary="content-aware token aggregation: cosine k-means centres (EMA), attention "
                            "inside sorted sub-groups plus cross-attention to the centres (Liu et al., 2025)")
def build_catanet(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return ContentAwareTokenAggregation(dim, num_heads, causal=causal, **options)


# --- cost -------------------------------------------------------------------------------------------


def attention_cost(num_tokens: int, head_dim: int, kind: str, *, window: int = 64, num_centres: int = 16,
                   group_size: int = 64, kmeans_iters: int = 0) -> dict[str, float]:
    r"""Multiply-adds counted as 2 FLOPs, for one head: scores $QK^\top$ plus $PV$.

    * ``"full"``: $4N^2 d$ FLOPs, $N^2$ scores held.
    * ``"window"``: $4 N w d$, $N w$ scores (non-overlapping windows of $w$ tokens).
    * ``"catanet"``: IASA $4 N (2g) d$ + IRCA $4 N M d$ + assignment $2 N M d$ (+ $2NMd$ per k-means step in
      training), scores $N(2g + M)$; the sort adds $O(N \log N)$ comparisons, not counted.

    Returns ``{"flops": ..., "scores": ...}``.
    """
    n, d = num_tokens, head_dim
    if kind == "full":
        return {"flops": 4.0 * n * n * d, "scores": float(n * n)}
    if kind == "window":
        return {"flops": 4.0 * n * window * d, "scores": float(n * window)}
    if kind == "catanet":
        g = min(n, group_size)
        flops = 4.0 * n * 2 * g * d + 4.0 * n * num_centres * d + 2.0 * n * num_centres * d * (1 + kmeans_iters)
        return {"flops": flops, "scores": float(n * (2 * g + num_centres))}
    raise ValueError(f"kind: expected 'full', 'window' or 'catanet', got {kind!r}")


# --- pictures ---------------------------------------------------------------------------------------


def plot_token_groups(groups, *, num_groups: int | None = None, title: str | None = None, ax=None):
    """Draw a ``(H, W)`` map of group ids, one colour per centre (the tokens of an image by their centre)."""
    g = _as_numpy(groups)
    if g.ndim != 2:
        raise ValueError(f"groups: expected a 2-d (height, width) map of group ids, got shape {g.shape}")
    num_groups = int(g.max()) + 1 if num_groups is None else num_groups
    ax = _axes(ax, size=(4.6, 3.6))
    ax.imshow(g, cmap=plt.get_cmap(GROUP_CMAP, max(num_groups, 2)), vmin=-0.5, vmax=max(num_groups, 2) - 0.5,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def plot_subgroup(image, order, group_size: int, subgroup: int, *, width: int, window: str = "next",
                  title: str | None = None, ax=None):
    """Show on ``image (H, W[, 3])`` the tokens of one sub-group (red) and the rest of its key window (yellow).

    ``order (N,)`` is the sorted order of one image's ``N = H W`` tokens (row-major), ``width`` is ``W``.
    Everything else is dimmed: a sub-group of similar tokens is scattered over the whole image.
    """
    img = _as_numpy(image).astype(float)
    img = img / max(img.max(), 1e-12)
    order = _as_numpy(order).astype(int)
    queries, keys = subgroup_indices(len(order), group_size, window)
    if not 0 <= subgroup < queries.shape[0]:
        raise ValueError(f"subgroup: expected an index from 0 to {queries.shape[0] - 1}, got {subgroup}")
    shown = img * 0.25 if img.ndim == 3 else np.stack([img * 0.25] * 3, -1)
    for positions, colour in ((keys[subgroup], (1.0, 0.85, 0.0)), (queries[subgroup], (1.0, 0.1, 0.1))):
        tokens = order[positions.numpy()]
        shown[tokens // width, tokens % width] = colour
    ax = _axes(ax, size=(4.6, 3.6))
    ax.imshow(shown, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"sub-group {subgroup}: queries (red), keys (yellow)")
    return ax
