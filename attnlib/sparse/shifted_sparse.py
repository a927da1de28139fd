r"""Lesson 43: shifted sparse attention, sink tokens and heavy-hitter eviction, P37.

*SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models* (Zhang, 2024,
arXiv:2406.05678) builds on two earlier methods, and this module implements all three as boolean masks
for :func:`attnlib.attention` (``True`` = may attend):

**S²-Attn** (LongLoRA, Chen et al., 2023, arXiv:2309.12307). Split the $N$ tokens into groups of $G$
(LongLoRA: $G = N/4$) and let every token attend only inside its group, causally. Half of the heads
(heads $h \ge \lfloor H/2 \rfloor$, as in LongLoRA's code) use groups shifted by $s = \lfloor G/2 \rfloor$,
so that information crosses the group borders from one layer to the next. Two versions exist:

* ``version="roll"`` (the paper's Algorithm 1, LongLoRA's ``forward_noflashattn``): roll the shifted
  heads' $q, k, v$ by $-s$, attend causally inside the groups, roll the outputs back by $+s$. In token
  positions, shifted head rows use the groups of $r(i) = (i - s) \bmod N$,

  $$M^\text{roll}_{ij} = [\lfloor r(i)/G \rfloor = \lfloor r(j)/G \rfloor] \wedge [r(j) \le r(i)],$$

  and the last group *wraps*: it holds tokens $[N - G + s, N)$ followed by tokens $[0, s)$, so the first
  $s$ tokens see the last $G - s$ tokens of the sequence. **Future leakage**: a token later in the text
  changes an earlier output.
* ``version="segment"`` (LongLoRA's flash path, ``forward_flashattn``): no roll; the shifted heads attend
  causally inside the segments $[0, s), [s, s + G), \dots, [N - G + s, N)$,

  $$M^\text{seg}_{ij} = [\sigma(i) = \sigma(j)] \wedge [j \le i], \qquad \sigma(i) = \lfloor (i + G - s)/G \rfloor.$$

  It is causal. The two versions agree on every row except the first $s$ rows of the shifted heads.

Unshifted heads use $M_{ij} = [\lfloor i/G \rfloor = \lfloor j/G \rfloor] \wedge [j \le i]$ in both.

**SF-Attn** (SinkLoRA). The paper describes a "segmentation and reassembly" step that returns the
cyclically shifted groups to their unshifted positions, together with global attention to "sink
tokens", the first tokens of the sequence. The official repository has no SF-Attn code, so this module
implements *our reading* of it: the shifted groups do not wrap (the segment version above) and every
query also sees the first ``num_sinks`` tokens (causally: a sink later than the query stays hidden):

$$M^\text{SF}_{ij} = M^\text{seg}_{ij} \vee \big([j < n_\text{sink}] \wedge [j \le i]\big).$$

**H2O** (Zhang et al., 2023, arXiv:2306.14048), the KV-cache eviction SinkLoRA uses at inference. Decoding
token $t$ keeps at most $k$ (``budget``) cached keys: the ``recent`` last positions, and the keys with the
largest attention accumulated over the earlier steps (the *heavy hitters*). Each step adds key $t$; when
the cache holds $k + 1$ keys, the one outside the recent window with the smallest accumulated score
$A_j = \sum_{t' < t} p_{t'j}$ is evicted, for good. $p_{t'}$ is the attention actually computed at step
$t'$, over the cache of that step.

Every mask here is ``(heads, N, N)`` (or ``(B, H, N, N)`` for H2O, which depends on the data).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import (
    KERNEL,
    check_bool,
    check_non_negative_int,
    check_positive_int,
    check_qkv,
    check_scale,
    check_tensor,
)
from ..core import attention, masked_softmax
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import plot_mask, plt
from .block_sparse import sparse_attention

VERSIONS = ("segment", "roll")


# --- argument checks --------------------------------------------------------------------------------


def _check_version(version) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version: expected one of {VERSIONS}, got {version!r}")


def resolve_group_size(seq_len: int, group_size: int | None) -> int:
    r"""The group size $G$ to use for ``seq_len`` tokens; ``None`` picks :func:`default_group_size`.

    A given ``group_size`` must divide ``seq_len`` (as in LongLoRA, which raises otherwise).
    """
    check_positive_int("seq_len", seq_len)
    if group_size is None:
        return default_group_size(seq_len)
    check_positive_int("group_size", group_size)
    if seq_len % group_size:
        raise ValueError(f"group_size: expected a divisor of the sequence length {seq_len}, got {group_size} "
                         f"(leave it None for the default rule, {default_group_size(seq_len)} here)")
    return group_size


def default_group_size(seq_len: int) -> int:
    r"""LongLoRA's $G = N/4$, made to work for every length.

    The largest divisor of $N$ in $[2, \max(2, \lfloor N/4 \rfloor)]$ ($N/4$ itself whenever $4 \mid N$); when
    there is none ($N$ prime, or $N \le 3$ odd), one group of all $N$ tokens: the unshifted heads then
    see everything before them and the shifted heads see two causal halves.
    """
    check_positive_int("seq_len", seq_len)
    for g in range(max(2, seq_len // 4), 1, -1):
        if seq_len % g == 0:
            return g
    return seq_len


def shifted_head_flags(num_heads: int) -> torch.Tensor:
    r"""``(num_heads,)`` bool: which heads use shifted groups, $h \ge \lfloor H/2 \rfloor$ (LongLoRA's split)."""
    check_positive_int("num_heads", num_heads)
    return torch.arange(num_heads) >= num_heads // 2


# --- masks ------------------------------------------------------------------------------------------


def _positions(seq_len: int, device=None):
    i = torch.arange(seq_len, device=device)
    return i[:, None], i[None, :]


def group_mask(seq_len: int, group_size: int, *, causal: bool = True, device=None) -> torch.Tensor:
    r"""Unshifted heads: $[\lfloor i/G \rfloor = \lfloor j/G \rfloor] \wedge [j \le i]$, ``(N, N)`` bool."""
    i, j = _positions(seq_len, device)
    allowed = (i // group_size) == (j // group_size)
    return allowed & (j <= i) if causal else allowed


def segment_mask(seq_len: int, group_size: int, *, causal: bool = True, device=None) -> torch.Tensor:
    r"""Shifted heads, segment version: segments $[0,s), [s, s+G), \dots, [N-G+s, N)$, ``(N, N)`` bool."""
    shift = group_size // 2
    i, j = _positions(seq_len, device)
    # sigma(i) = floor((i + G - s) / G): 0 on [0, s), 1 on [s, s + G), ...
    allowed = (i + group_size - shift) // group_size == (j + group_size - shift) // group_size
    return allowed & (j <= i) if causal else allowed


def roll_mask(seq_len: int, group_size: int, *, causal: bool = True, device=None) -> torch.Tensor:
    r"""Shifted heads, roll version: groups of $r(i) = (i - s) \bmod N$, ``(N, N)`` bool (not causal in $i$)."""
    shift = group_size // 2
    i, j = _positions(seq_len, device)
    # r(i) = (i - s) mod N: the position token i takes after rolling by -s
    ri, rj = (i - shift) % seq_len, (j - shift) % seq_len
    allowed = (ri // group_size) == (rj // group_size)
    return allowed & (rj <= ri) if causal else allowed


def sink_mask(seq_len: int, num_sinks: int, *, causal: bool = True, device=None) -> torch.Tensor:
    r"""Sink columns: every query sees the first ``num_sinks`` tokens, $[j < n_\text{sink}] \wedge [j \le i]$."""
    check_positive_int("seq_len", seq_len)
    check_non_negative_int("num_sinks", num_sinks)
    i, j = _positions(seq_len, device)
    allowed = (j < num_sinks) & torch.ones_like(i, dtype=torch.bool)
    return allowed & (j <= i) if causal else allowed


def s2_mask(seq_len: int, num_heads: int, group_size: int | None = None, *, version: str = "segment",
            causal: bool = True, num_sinks: int = 0, device=None) -> torch.Tensor:
    r"""The S²-Attn mask of every head, ``(num_heads, N, N)`` bool; with ``num_sinks > 0``, plus sink columns.

    Heads $h < \lfloor H/2 \rfloor$ use :func:`group_mask`; the others :func:`segment_mask` or
    :func:`roll_mask` (``version``). ``num_sinks`` ORs :func:`sink_mask` into every head (SF-Attn, our
    reading, is ``version="segment"`` with sinks: :func:`sf_mask`).
    """
    check_positive_int("num_heads", num_heads)
    _check_version(version)
    check_bool("causal", causal)
    check_non_negative_int("num_sinks", num_sinks)
    g = resolve_group_size(seq_len, group_size)
    plain = group_mask(seq_len, g, causal=causal, device=device)
    shifted = (segment_mask if version == "segment" else roll_mask)(seq_len, g, causal=causal, device=device)
    flags = shifted_head_flags(num_heads).to(plain.device)
    masks = torch.where(flags[:, None, None], shifted, plain)
    if num_sinks:
        masks = masks | sink_mask(seq_len, num_sinks, causal=causal, device=device)
    return masks


def sf_mask(seq_len: int, num_heads: int, group_size: int | None = None, *, num_sinks: int = 4,
            causal: bool = True, device=None) -> torch.Tensor:
    r"""SF-Attn as we read it: the segment S²-Attn mask OR the sink columns, ``(num_heads, N, N)`` bool."""
    return s2_mask(seq_len, num_heads, group_size, version="segment", causal=causal, num_sinks=num_sinks,
                   device=device)


# --- attention with these masks ---------------------------------------------------------------------


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int | None = None,
                 version: str = "segment", causal: bool = True, num_sinks: int = 0, scale: float | None = None,
                 return_weights: bool = False):
    r"""S²-Attn (or SF-Attn with ``num_sinks``) as masked attention, the library reference.

    $$O_h = \operatorname{softmax}\big(s\,Q_h K_h^\top \text{ masked by } M_h\big) V_h, \qquad M_h = $$
    :func:`s2_mask` of head $h$.

    Shapes: ``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``; returns ``(B, H, N, Dv)``
    (and the weights ``(B, H, N, N)`` with ``return_weights``). Self-attention only (``Lq == Lk``).
    """
    b, h, hkv, lq, lk, d = check_qkv(q, k, v)
    if lq != lk:
        raise ValueError(f"q, k: expected self-attention (as many queries as keys), got {lq} queries and {lk} keys")
    mask = s2_mask(lq, h, group_size, version=version, causal=causal, num_sinks=num_sinks, device=q.device)
    return attention(q, k, v, mask=mask[None], scale=scale, return_weights=return_weights)


def s2_attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int | None = None,
                         version: str = "segment", causal: bool = True, scale: float | None = None) -> torch.Tensor:
    r"""S²-Attn computed group by group, in $O(N G)$ instead of $O(N^2)$: what a training run executes.

    * unshifted heads: reshape ``(B, H/2, N, D)`` into ``N/G`` groups and attend inside each;
    * ``version="roll"`` (Algorithm 1): roll the shifted heads by $-s$, the same, roll back by $+s$;
    * ``version="segment"``: pad the shifted heads with $G - s$ empty tokens in front and $s$ behind,
      so that the segments become whole groups of the padded sequence; the pads are masked as keys.

    Shapes as in :func:`s2_attention` (``Hkv == H``); returns ``(B, H, N, Dv)``.
    """
    b, h, hkv, n, lk, d = check_qkv(q, k, v)
    if hkv != h or lk != n:
        raise ValueError(f"k, v: expected {h} heads and {n} tokens (as q), got {hkv} heads and {lk} tokens")
    _check_version(version)
    g = resolve_group_size(n, group_size)
    shift, split = g // 2, h // 2
    plain = _grouped(q[:, :split], k[:, :split], v[:, :split], g, causal, scale, valid=None)
    qs, ks, vs = q[:, split:], k[:, split:], v[:, split:]
    if version == "roll":
        # roll by -s, attend in groups, roll back by +s
        rolled = _grouped(*(x.roll(-shift, dims=2) for x in (qs, ks, vs)), g, causal, scale, valid=None)
        shifted = rolled.roll(shift, dims=2)
    else:
        front, back = g - shift, shift
        padded = [nn.functional.pad(x, (0, 0, front, back)) for x in (qs, ks, vs)]
        valid = torch.zeros(n + g, dtype=torch.bool, device=q.device)
        valid[front:front + n] = True
        shifted = _grouped(*padded, g, causal, scale, valid=valid)[:, :, front:front + n]
    return torch.cat([plain, shifted], dim=1)


def _grouped(q, k, v, g, causal, scale, valid):
    """Attention inside consecutive groups of ``g`` tokens: ``(B, H, N, D) -> (B, H, N, Dv)``; ``valid (N,)`` masks keys."""
    b, h, n, d = q.shape
    if h == 0:
        return q.new_zeros(b, 0, n, v.shape[-1])

    def split(x):  # (B, H, N, D) -> (B * N/G, H, G, D)
        return x.reshape(b, h, n // g, g, x.shape[-1]).permute(0, 2, 1, 3, 4).reshape(b * (n // g), h, g, x.shape[-1])

    mask = None if valid is None else valid.reshape(n // g, 1, 1, g).repeat(b, 1, 1, 1)
    out = attention(split(q), split(k), split(v), mask=mask, causal=causal, scale=scale)
    return out.reshape(b, n // g, h, g, -1).permute(0, 2, 1, 3, 4).reshape(b, h, n, -1)


# --- H2O: heavy-hitter KV-cache eviction ------------------------------------------------------------


def h2o_mask(scores: torch.Tensor, budget: int, recent: int | None = None) -> torch.Tensor:
    r"""Which cached keys each decoding step keeps under H2O, ``(B, H, N, N)`` bool (row $t$ = cache at step $t$).

    Step $t$: add key $t$ to the cache $C$; if $|C| > k$, evict
    $\arg\min_{j \in C,\ j \le t - r} A_j$ (the earliest on ties); attend,
    $p_t = \operatorname{softmax}(S_{t, C})$; accumulate $A_j \mathrel{+}= p_{tj}$.

    Args:
        scores: causal attention logits $S = s\,QK^\top$, ``(B, H, N, N)`` (entries above the diagonal are
            ignored). The logarithm of full attention's weights works too: a softmax over a subset of a
            row is the same for $S$ and for $\log \operatorname{softmax}(S)$.
        budget: $k$, keys kept per step (the query's own key included).
        recent: $r$, the last positions never evicted, $1 \le r \le k$; default $\lceil k/2 \rceil$ (H2O
            splits the cache evenly between recent tokens and heavy hitters).

    Returns ``(B, H, N, N)`` bool; row $t$ holds exactly $\min(t + 1, k)$ keys.
    """
    check_tensor("scores", scores, ndim=4)
    b, h, n, n_keys = scores.shape
    if n != n_keys:
        raise ValueError(f"scores: expected square (B, H, N, N) self-attention logits, got shape {tuple(scores.shape)}")
    recent = _check_budget(budget, recent)
    scores = scores.detach().to(torch.float64)
    positions = torch.arange(n, device=scores.device)
    cache = torch.zeros(b, h, n, dtype=torch.bool, device=scores.device)
    accumulated = torch.zeros(b, h, n, dtype=torch.float64, device=scores.device)
    rows = []
    for t in range(n):
        cache[..., t] = True
        if t + 1 > budget:
            # evict the cached key outside the recent window with the smallest accumulated attention
            candidates = cache & (positions <= t - recent)
            victim = accumulated.masked_fill(~candidates, math.inf).argmin(dim=-1, keepdim=True)
            cache.scatter_(-1, victim, False)
        rows.append(cache.clone())
        # A_j += p_tj, with p_t the attention of step t over its cache
        accumulated += masked_softmax(scores[..., t, :], cache)
    return torch.stack(rows, dim=-2)


def _check_budget(budget, recent) -> int:
    check_positive_int("budget", budget)
    recent = -(-budget // 2) if recent is None else recent
    if isinstance(recent, bool) or not isinstance(recent, int) or not 1 <= recent <= budget:
        raise ValueError(f"recent: expected an int from 1 to budget={budget}, got {recent!r}")
    return recent


def h2o_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, budget: int, recent: int | None = None,
                  scale: float | None = None, return_weights: bool = False):
    r"""Causal attention where step $t$ sees only its H2O cache: $O = \operatorname{softmax}(S \text{ masked by } $
    :func:`h2o_mask`$)\,V$. Equal to decoding token by token with the evicted cache.

    Shapes: ``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``; returns ``(B, H, N, Dv)``.
    The cache choice is discrete: gradients flow through the kept keys only.
    """
    b, h, hkv, lq, lk, d = check_qkv(q, k, v)
    if lq != lk:
        raise ValueError(f"q, k: expected self-attention (as many queries as keys), got {lq} queries and {lk} keys")
    check_scale(scale)
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    with torch.no_grad():
        keys = k.repeat_interleave(h // hkv, dim=1)
        scores = torch.matmul(q.double(), keys.double().transpose(-2, -1)) * s
        mask = h2o_mask(scores, budget, recent)
    return attention(q, k, v, mask=mask, scale=scale, return_weights=return_weights)


# --- what a pattern keeps of full attention ---------------------------------------------------------


def kept_mass(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""The share of full attention's weight that falls inside ``mask``, per query: $\sum_j P_{ij} M_{ij}$.

    Shapes: ``weights (..., N, N)`` rows summing to 1 (full causal attention), ``mask`` broadcastable
    to it; returns ``(..., N)``.
    """
    check_tensor("weights", weights)
    check_tensor("mask", mask, floating=False)
    return (weights * mask.to(weights.dtype)).sum(-1)


def plot_pattern_masks(masks: dict, *, suptitle: str | None = None):
    """One :func:`attnlib.tools.plotting.plot_mask` panel per ``name -> (N, N)`` mask, in a row; returns the figure."""
    fig, axes = plt.subplots(1, len(masks), figsize=(2.9 * len(masks), 2.9), squeeze=False)
    for ax, (name, mask) in zip(axes[0], masks.items()):
        m = torch.as_tensor(mask)
        plot_mask(m, ax=ax, title=f"{name}\n{int(m.sum())} of {m.numel()} kept")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# --- modules and registry ---------------------------------------------------------------------------


class ShiftedSparseAttention(MultiHeadAttention):
    r"""Multi-head attention restricted to the S²-Attn (or SF-Attn) pattern, a token mixer ``(B, L, dim)``.

    The projections are those of :class:`attnlib.MultiHeadAttention` (same parameter names), so a
    model trained with full attention can be evaluated with this pattern and back (LongLoRA trains with
    S²-Attn and runs full attention at inference).

    Args:
        dim, num_heads, causal, bias: as in :class:`attnlib.MultiHeadAttention`.
        group_size: $G$, a divisor of every sequence length it will see; ``None`` applies
            :func:`default_group_size` to each input's length.
        version: ``"segment"`` (causal; default) or ``"roll"`` (Algorithm 1; leaks the future in its
            wrap group, so it is refused with ``causal=True``, where the model's promise is causality,
            unless ``allow_leak=True``).
        num_sinks: sink tokens every query sees (``0``: plain S²-Attn).
        allow_leak: accept ``version="roll"`` in a causal model (to measure the leak).
        backend: ``"reference"`` (:func:`attnlib.attention` with the mask) or ``"kernel"`` (the Triton
            block-sparse kernel, :func:`kernels.block_sparse.block_sparse_attention`, which visits only the
            tiles the pattern does not empty; head dim 16 to 128).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, group_size: int | None = None,
                 version: str = "segment", num_sinks: int = 0, allow_leak: bool = False, bias: bool = False,
                 backend: str = "reference"):
        super().__init__(dim, num_heads, causal=False, bias=bias)
        if backend not in ("reference", "kernel"):
            raise ValueError(f"backend: expected 'reference' or 'kernel', got {backend!r}")
        self.sparse_backend = backend
        _check_version(version)
        check_bool("causal", causal)
        check_non_negative_int("num_sinks", num_sinks)
        if group_size is not None:
            check_positive_int("group_size", group_size)
        if version == "roll" and causal and not allow_leak:
            raise ValueError("version: 'roll' lets the first tokens see the last ones (its wrap group), so it is "
                             "not causal; use version='segment', or allow_leak=True to study the leak")
        self.pattern_causal, self.group_size, self.version, self.num_sinks = causal, group_size, version, num_sinks

    def pattern(self, seq_len: int, device=None) -> torch.Tensor:
        """The ``(num_heads, seq_len, seq_len)`` mask this module applies."""
        return s2_mask(seq_len, self.num_heads, self.group_size, version=self.version, causal=self.pattern_causal,
                       num_sinks=self.num_sinks, device=device)

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        check_tensor("x", x, ndim=3)
        mask = self.pattern(x.shape[1], x.device)[None]  # (1, H, L, L)
        if self.sparse_backend == "reference":
            return super().forward(x, mask=mask, return_weights=return_weights)
        out = sparse_attention(*self.project(x), mask, backend=KERNEL, return_weights=return_weights)
        self.last_weights = None
        return self.merge_heads(out)

    def extra_repr(self) -> str:
        return (f"group_size={self.group_size}, version={self.version!r}, num_sinks={self.num_sinks}, "
                f"causal={self.pattern_causal}")


class HeavyHitterAttention(MultiHeadAttention):
    r"""Causal multi-head attention through an H2O cache of ``budget`` keys per head (:func:`h2o_mask`).

    An inference-time pattern: the cache is chosen from the scores, without gradient. Same parameters as
    :class:`attnlib.MultiHeadAttention`.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, budget: int = 4, recent: int | None = None,
                 bias: bool = False):
        if causal is not True:
            raise ValueError(f"causal: H2O evicts keys while decoding left to right, so it needs causal=True, got {causal!r}")
        super().__init__(dim, num_heads, causal=True, bias=bias)
        self.recent = _check_budget(budget, recent)
        self.budget = budget

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        q, k, v = self.project(x)
        out, weights = h2o_attention(q, k, v, budget=self.budget, recent=self.recent, return_weights=True)
        self.last_weights = weights.detach()
        out = self.merge_heads(out)
        return (out, weights) if return_weights else out

    def extra_repr(self) -> str:
        return f"budget={self.budget}, recent={self.recent}"


@register_mechanism("s2-attn", paper="P37", lesson="43", supports_causal=True,
                    summary="LongLoRA's shifted sparse attention: groups of G, half the heads shifted by G/2 "
                            "(version='segment' or 'roll')")
def build_s2_attention(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return ShiftedSparseAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("sink-attn", paper="P37", lesson="43", supports_causal=True,
                    summary="SinkLoRA's SF-Attn (our reading): unwrapped shifted groups plus global sink tokens")
def build_sink_attention(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    options.setdefault("num_sinks", 4)
    if options.get("version", "segment") != "segment":
        raise ValueError(f"version: SF-Attn returns the shifted groups to their place, so only 'segment' applies, "
                         f"got {options['version']!r}")
    return ShiftedSparseAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("h2o-attn", paper="P37", lesson="43", supports_causal=True,
                    summary="H2O heavy-hitter KV cache: attend to the recent keys and the most attended ones "
                            "(budget keys)")
def build_h2o_attention(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return HeavyHitterAttention(dim, num_heads, causal=causal, **options)
