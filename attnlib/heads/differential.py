r"""Lesson 13: differential and grouped differential attention, P05.

**Differential attention** (Ye et al., 2024, "Differential Transformer", arXiv 2410.05258) computes two
softmax maps from two halves of each head's query and key, and subtracts them:

$$A_1 = \operatorname{softmax}(s\,Q_1K_1^\top),\quad A_2 = \operatorname{softmax}(s\,Q_2K_2^\top),\qquad
  O = (A_1 - \lambda A_2)\,V,$$

with $Q_1, Q_2, K_1, K_2$ of width $d$, $V$ of width $2d$ and $s = d^{-1/2}$. Both maps put some weight
on every key (a softmax cannot say zero); what they share, the *common-mode noise*, cancels in the
difference, and what only $A_1$ has, the signal, survives. The scalar $\lambda$ is learned through

$$\lambda = e^{\lambda_{q1}\cdot\lambda_{k1}} - e^{\lambda_{q2}\cdot\lambda_{k2}} + \lambda_\text{init},
  \qquad \lambda_\text{init} = 0.8 - 0.6\,e^{-0.3\,\ell},$$

where $\ell$ is the **0-based** layer index and the four vectors in $\mathbb R^d$ start from
$\mathcal N(0, 0.1^2)$; they and $\lambda$ are shared by all heads of a layer. Each head's output is
normalised, $\operatorname{RMSNorm}_{2d}(O_h)\,(1-\lambda_\text{init})$ (eps $10^{-5}$, affine, one
weight shared by the heads). With $H$ differential heads the layer has $2H$ maps of width $d = E/(2H)$:
the parameter count of a transformer with $2H$ heads.

**Grouped differential attention** (GDA; Lim et al., 2025, "Grouped Differential Attention",
arXiv 2510.06949) keeps the subtraction but lets $H_1$ *signal* heads share $H_2$ *noise* heads,
$r = H_1/H_2$: signal head $i$ subtracts noise head $\lfloor i/r\rfloor$, as grouped-query attention
shares a key/value head. The query heads come in $H_2$ groups of $r+1$ (``r`` signal heads, then one
noise head); the key/value heads are interleaved (even heads give $k_1, v_1$, odd heads $k_2, v_2$) and
$V = [v_1 \| v_2]$ has width $2d$. The head dim is *not* halved. With $r=1$ GDA is differential
attention. The paper's *group-differentiated growth* widens a trained model by replicating only the
signal heads (:func:`grow_signal_heads`).

Layouts follow the official code: microsoft/unilm ``Diff-Transformer/multihead_diffattn.py`` and the
authors' vLLM backend ``vllm/v1/attention/backends/grouped_diff_attn.py`` with
``vllm/model_executor/models/motif.py`` (MotifTechnologies/vllm). Motif's port computes
$\lambda_\text{init}$ with ``layer - 1`` on a 0-based index (layer 0 gets $\approx -0.0099$); we follow
the Differential Transformer paper and unilm (``convention="unilm"``) and keep Motif's form as
``convention="motif"`` to show the difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels._checks import check_differential_inputs

from .._checks import (
    check_backend,
    check_choice,
    check_mask,
    check_positive_int,
    check_scale,
    check_tokens,
)
from ..core import compute_dtype, masked_softmax, repeat_kv
from ..masks import causal_mask
from ..registry import register_mechanism

LAMBDA_CONVENTIONS = ("unilm", "motif")


# ------------------------------------------------------------------------------------------------
# lambda
# ------------------------------------------------------------------------------------------------


def lambda_init_for_layer(layer_index: int, *, convention: str = "unilm") -> float:
    r"""$\lambda_\text{init} = 0.8 - 0.6\,e^{-0.3\,\ell}$ for the 0-based layer index $\ell$.

    ``convention="motif"`` gives Motif's port, $0.8 - 0.6\,e^{-0.3(\ell - 1)}$ on the same 0-based
    index (off by one against the paper: layer 0 gets a slightly negative value).
    """
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise ValueError(f"layer_index: expected an int >= 0 (0-based layer index), got {layer_index!r}")
    if convention not in LAMBDA_CONVENTIONS:
        raise ValueError(f"convention: expected one of {LAMBDA_CONVENTIONS}, got {convention!r}")
    depth = layer_index if convention == "unilm" else layer_index - 1
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def reparameterized_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init: float) -> torch.Tensor:
    r"""$\lambda = e^{\lambda_{q1}\cdot\lambda_{k1}} - e^{\lambda_{q2}\cdot\lambda_{k2}} + \lambda_\text{init}$ (a 0-d tensor, float32 or wider)."""
    work = torch.promote_types(lambda_q1.dtype, torch.float32)
    dot1 = (lambda_q1.to(work) * lambda_k1.to(work)).sum()
    dot2 = (lambda_q2.to(work) * lambda_k2.to(work)).sum()
    return torch.exp(dot1) - torch.exp(dot2) + lambda_init


# ------------------------------------------------------------------------------------------------
# the differential map
# ------------------------------------------------------------------------------------------------


def differential_attention(q1, k1, q2, k2, v, lam, *, causal: bool = False, mask=None, scale: float | None = None,
                           return_weights: bool = False):
    r"""$O = (A_1 - \lambda A_2)V$ with $A_i = \operatorname{softmax}(s\,Q_iK_i^\top)$ (masked).

    Args:
        q1: signal queries ``(B, H1, Lq, D)``.
        k1: signal keys ``(B, Hkv, Lk, D)``, ``Hkv`` dividing ``H2``.
        q2: noise queries ``(B, H2, Lq, D)``, ``H2`` dividing ``H1``: signal head ``i`` subtracts the map of
            noise head ``i // (H1 // H2)`` (``H2 == H1`` is differential attention, fewer is GDA).
        k2: noise keys ``(B, Hkv, Lk, D)``.
        v: values ``(B, Hkv, Lk, Dv)`` (``Dv = 2D`` in the papers); query heads read key/value head
            ``i // (H1 // Hkv)`` as in grouped-query attention.
        lam: $\lambda$, a float or a 0-d tensor (differentiable).
        causal: bottom-right aligned causal mask, as :func:`attnlib.attention`.
        mask: boolean ``True`` = may attend, broadcastable to ``(B, H1, Lq, Lk)``.
        scale: default $1/\sqrt{D}$.
        return_weights: also return ``(A_1, A_2, A_1 - \lambda A_2)``, each ``(B, H1, Lq, Lk)`` ($A_2$
            repeated to line up with the signal heads).

    Returns:
        ``out (B, H1, Lq, Dv)`` in the dtype of ``q1`` (the maps in float32 for 16-bit inputs).
    """
    b, h1, h2, hkv, lq, lk, d = check_differential_inputs(q1, k1, q2, k2, v, lam)
    check_scale(scale)
    if mask is not None:
        check_mask(mask, (b, h1, lq, lk))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = compute_dtype(q1.dtype)
    allowed = causal_mask(lq, lk, device=q1.device) if causal else None
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed
    k1_all, k2_all, v_all = (x.repeat_interleave(h1 // hkv, dim=1).to(work) for x in (k1, k2, v))
    # noise head i // r serves signal heads i: repeat each noise query r times, consecutively
    q2_all = q2.repeat_interleave(h1 // h2, dim=1).to(work)
    # A_1 = softmax(s Q_1 K_1^T),  A_2 = softmax(s Q_2 K_2^T)
    a1 = masked_softmax(torch.matmul(q1.to(work), k1_all.transpose(-2, -1)) * scale, allowed)
    a2 = masked_softmax(torch.matmul(q2_all, k2_all.transpose(-2, -1)) * scale, allowed)
    lam = lam.to(work) if isinstance(lam, torch.Tensor) else lam
    # D = A_1 - lambda A_2,  O = D V
    diff = a1 - lam * a2
    out = torch.matmul(diff, v_all).to(q1.dtype)
    return (out, (a1, a2, diff)) if return_weights else out


def differential_attention_naive(q1, k1, q2, k2, v, lam, *, causal: bool = False, scale: float | None = None):
    r"""The oracle: loops over batch, signal head and query, in float64, as the equation reads.

    For query $t$ of signal head $i$ (noise head $\lfloor i/r \rfloor$, key/value head $g$):
    $o_t = \sum_j \big(a^{(1)}_{j} - \lambda\, a^{(2)}_{j}\big) v_j$ over the visible keys $j$.
    Shapes as in :func:`differential_attention`; returns ``(B, H1, Lq, Dv)`` float64.
    """
    b_, h1, h2, hkv, lq, lk, d = check_differential_inputs(q1, k1, q2, k2, v, lam)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q1, k1, q2, k2, v = (x.double() for x in (q1, k1, q2, k2, v))
    lam = float(lam)
    out = torch.zeros(b_, h1, lq, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for i in range(h1):
            noise, g = i // (h1 // h2), i // (h1 // hkv)
            for t in range(lq):
                keys = [j for j in range(lk) if not causal or j <= t + lk - lq]
                if not keys:
                    continue
                s1 = torch.stack([scale * q1[b, i, t] @ k1[b, g, j] for j in keys])
                s2 = torch.stack([scale * q2[b, noise, t] @ k2[b, g, j] for j in keys])
                weights = torch.softmax(s1, 0) - lam * torch.softmax(s2, 0)
                out[b, i, t] = sum(w * v[b, g, j] for w, j in zip(weights, keys))
    return out


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


class _DifferentialBase(nn.Module):
    """What differential attention and GDA share: lambda, the per-head norm, the output projection."""

    def _init_common(self, dim: int, head_dim: int, num_signal_heads: int, *, causal: bool, layer_index: int,
                     lambda_init: float | None, lambda_convention: str, norm: bool, backend: str) -> None:
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        if not isinstance(norm, bool):
            raise TypeError(f"norm: expected a bool, got {type(norm).__name__}")
        check_backend(backend)
        computed = lambda_init_for_layer(layer_index, convention=lambda_convention)
        if lambda_init is not None and (isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float))):
            raise TypeError(f"lambda_init: expected a float or None, got {type(lambda_init).__name__}")
        self.dim, self.head_dim, self.num_signal_heads = dim, head_dim, num_signal_heads
        self.causal, self.backend, self.layer_index = causal, backend, layer_index
        self.lambda_init = computed if lambda_init is None else float(lambda_init)
        # lambda's four vectors, N(0, 0.1^2), shared by every head of the layer
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(head_dim) * 0.1) for _ in range(4))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5, elementwise_affine=True) if norm else None
        self.out_proj = nn.Linear(2 * head_dim * num_signal_heads, dim, bias=False)
        self.last_weights: torch.Tensor | None = None
        self.last_maps: dict[str, torch.Tensor] | None = None

    def lam(self) -> torch.Tensor:
        r"""This layer's $\lambda$ (0-d float32 tensor)."""
        return reparameterized_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)

    def _check_x(self, x) -> None:
        check_tokens(x, self.dim)

    def _split(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``(B, L, heads * width) -> (B, heads, L, width)``."""
        b, length, _ = x.shape
        return x.view(b, length, -1, width).transpose(1, 2)

    def _mix(self, x, q1, k1, q2, k2, v, *, mask=None, return_weights=False):
        lam = self.lam()
        if self.backend == "kernel":
            if mask is not None or return_weights:
                raise ValueError("backend: 'kernel' takes no mask and returns no weights; use 'reference'")
            from kernels import differential_flash_attention  # imported here: the kernels need Triton

            out = differential_flash_attention(q1, k1, q2, k2, v, lam, causal=self.causal)
            self.last_weights = self.last_maps = None
        else:
            out, (a1, a2, diff) = differential_attention(q1, k1, q2, k2, v, lam, causal=self.causal, mask=mask,
                                                         return_weights=True)
            self.last_weights = diff.detach()
            self.last_maps = {"signal": a1.detach(), "noise": a2.detach(), "differential": diff.detach()}
        # O_h <- RMSNorm(O_h) (1 - lambda_init), per head over its 2d features
        if self.subln is not None:
            out = self.subln(out.to(torch.promote_types(out.dtype, torch.float32))).to(out.dtype) * (1.0 - self.lambda_init)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        out = self.out_proj(out)
        return (out, self.last_weights) if return_weights else out


class DifferentialAttention(_DifferentialBase):
    r"""Differential attention (Ye et al., 2024), a token mixer ``(B, L, dim) -> (B, L, dim)``.

    ``num_heads`` $H$ differential heads, each with two maps of width $d = \text{dim}/(2H)$ and values of
    width $2d$ (a transformer with $2H$ heads has the same parameters). The query and key projections
    give $2H$ (and $2H_{kv}$) heads of width $d$ where heads $2h, 2h+1$ are head $h$'s $Q_1, Q_2$
    (its $K_1, K_2$), as in unilm's ``multihead_diffattn.py``; the values give $H_{kv}$ heads of width $2d$.

    With fewer key/value heads than heads ($n = H/H_{kv} > 1$) the two official modules differ, and
    ``kv_layout`` picks one:

    * ``"grouped"`` (default; unilm's ``multihead_flashdiff_{1,2}.py``): head $h$ reads $K_1, K_2$ of key/value
      head $\lfloor h/n \rfloor$, as grouped-query attention would;
    * ``"repeat"`` (unilm's ``multihead_diffattn.py``): the $2H_{kv}$ interleaved key heads are repeated $n$
      times each (``repeat_kv``) and query head $m$ of the $2H$ reads key head $\lfloor m/n \rfloor$, so head
      $h$'s $Q_1$ (query head $2h$) and $Q_2$ (query head $2h+1$) can read two components of one key/value
      head, or the same component: with $n = 2$, head $h$ reads key head $h$ of the $2H_{kv}$ for both maps.

    Both read the values of key/value head $\lfloor h/n \rfloor$, and both agree when $H_{kv} = H$.

    Args:
        dim: model width, a multiple of ``2 * num_heads``.
        num_heads: differential heads $H$ (half the heads of the transformer it replaces).
        num_kv_heads: key/value heads (default ``num_heads``), dividing ``num_heads``.
        causal: each token sees itself and earlier tokens.
        layer_index: 0-based layer index, sets $\lambda_\text{init}$.
        lambda_init: override $\lambda_\text{init}$ (a float).
        lambda_convention: ``"unilm"`` (the paper) or ``"motif"`` (the off-by-one port).
        norm: the per-head RMSNorm times $(1-\lambda_\text{init})$ (on in the paper).
        backend: ``"reference"`` (:func:`differential_attention`, keeps the maps) or ``"kernel"``
            (the Triton kernel :func:`kernels.differential_flash_attention`).
        kv_layout: ``"grouped"`` or ``"repeat"``, with fewer key/value heads than heads (see above).
    """

    KV_LAYOUTS = ("grouped", "repeat")

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, causal: bool = False,
                 layer_index: int = 0, lambda_init: float | None = None, lambda_convention: str = "unilm",
                 norm: bool = True, backend: str = "reference", kv_layout: str = "grouped"):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if dim % (2 * num_heads):
            raise ValueError(f"dim: expected a multiple of 2 * num_heads = {2 * num_heads} (two maps per head), got {dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        head_dim = dim // (2 * num_heads)
        self._init_common(dim, head_dim, num_heads, causal=causal, layer_index=layer_index, lambda_init=lambda_init,
                          lambda_convention=lambda_convention, norm=norm, backend=backend)
        check_choice("kv_layout", kv_layout, self.KV_LAYOUTS)
        self.num_heads, self.num_kv_heads, self.kv_layout = num_heads, num_kv_heads, kv_layout
        self.q_proj = nn.Linear(dim, 2 * num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, 2 * num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * 2 * head_dim, bias=False)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x (B, L, dim) -> (B, L, dim)``; with ``return_weights`` also the differential maps ``(B, H, L, L)``."""
        self._check_x(x)
        q = self._split(self.q_proj(x), self.head_dim)  # (B, 2H, L, d)
        k = self._split(self.k_proj(x), self.head_dim)  # (B, 2Hkv, L, d)
        v = self._split(self.v_proj(x), 2 * self.head_dim)  # (B, Hkv, L, 2d)
        if self.kv_layout == "repeat":
            # multihead_diffattn.py: query head m of the 2H reads key head m // n of the 2Hkv interleaved ones
            n = self.num_heads // self.num_kv_heads
            k, v = repeat_kv(k, n), repeat_kv(v, n)
        return self._mix(x, q[:, 0::2], k[:, 0::2], q[:, 1::2], k[:, 1::2], v, mask=mask,
                         return_weights=return_weights)


class GroupedDifferentialAttention(_DifferentialBase):
    r"""Grouped differential attention (Lim et al., 2025), a token mixer ``(B, L, dim) -> (B, L, dim)``.

    ``num_heads`` $= H_1 + H_2$ query heads of width $d$ (default ``dim // num_heads``), in $H_2$ groups of
    ``ratio + 1``: ``ratio`` signal heads then one noise head. ``num_kv_heads`` (even) key/value heads of
    width $d$, interleaved: even heads are $(k_1, v_1)$, odd heads $(k_2, v_2)$, and $V = [v_1 \| v_2]$.
    Signal head $i$ computes $(A_1^{(i)} - \lambda A_2^{(\lfloor i/r\rfloor)})V$; the output projection reads
    $2H_1 d$ features. The layout is the one of the authors' vLLM backend.

    Args:
        dim: model width.
        num_heads: query heads $H_1 + H_2$, a multiple of ``ratio + 1``.
        ratio: $r = H_1/H_2$ signal heads per noise head (1 is differential attention).
        num_kv_heads: key/value heads, even; ``num_kv_heads // 2`` must divide $H_2$ (default $2H_2$).
        head_dim: width $d$ of a query head (default ``dim // num_heads``).
        causal, layer_index, lambda_init, lambda_convention, norm, backend: as :class:`DifferentialAttention`.
    """

    def __init__(self, dim: int, num_heads: int, *, ratio: int = 1, num_kv_heads: int | None = None,
                 head_dim: int | None = None, causal: bool = False, layer_index: int = 0,
                 lambda_init: float | None = None, lambda_convention: str = "unilm", norm: bool = True,
                 backend: str = "reference"):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_positive_int("ratio", ratio)
        if num_heads % (ratio + 1):
            raise ValueError(f"num_heads: expected a multiple of ratio + 1 = {ratio + 1} (groups of {ratio} signal "
                             f"heads and one noise head), got {num_heads}")
        num_noise = num_heads // (ratio + 1)
        num_kv_heads = 2 * num_noise if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_kv_heads % 2 or num_noise % (num_kv_heads // 2):
            raise ValueError(f"num_kv_heads: expected an even number whose half divides the {num_noise} noise heads, "
                             f"got {num_kv_heads}")
        head_dim = dim // num_heads if head_dim is None else head_dim
        check_positive_int("head_dim", head_dim)
        self._init_common(dim, head_dim, ratio * num_noise, causal=causal, layer_index=layer_index,
                          lambda_init=lambda_init, lambda_convention=lambda_convention, norm=norm, backend=backend)
        self.num_heads, self.ratio, self.num_noise_heads, self.num_kv_heads = num_heads, ratio, num_noise, num_kv_heads
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)

    def split_query_heads(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H1 + H2, L, d)`` -> signal ``(B, H1, L, d)`` and noise ``(B, H2, L, d)`` queries."""
        b, _, length, d = q.shape
        groups = q.view(b, self.num_noise_heads, self.ratio + 1, length, d)
        return groups[:, :, :-1].flatten(1, 2), groups[:, :, -1]

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x (B, L, dim) -> (B, L, dim)``; with ``return_weights`` also the differential maps ``(B, H1, L, L)``."""
        self._check_x(x)
        q1, q2 = self.split_query_heads(self._split(self.q_proj(x), self.head_dim))
        k = self._split(self.k_proj(x), self.head_dim)
        v = self._split(self.v_proj(x), self.head_dim)
        # interleaved key/value heads; V = [v_1 || v_2] of width 2d
        values = torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)
        return self._mix(x, q1, k[:, 0::2], q2, k[:, 1::2], values, mask=mask, return_weights=return_weights)


@torch.no_grad()
def grow_signal_heads(module: GroupedDifferentialAttention, factor: int) -> GroupedDifferentialAttention:
    r"""Group-differentiated growth: a GDA layer with ``factor`` times the signal heads, same function.

    Each signal head is replicated ``factor`` times (ratio $r \to r \cdot$ ``factor``); the noise heads,
    keys, values, $\lambda$ and norm are kept. Each copy computes the same head output, so dividing the
    copies' output-projection columns by ``factor`` makes the grown layer compute exactly what the
    original did; training then lets the copies drift apart. (The paper replicates only the signal heads;
    how it scales the copies' output weights is not stated in what we could check, so this
    function-preserving split is our choice.)
    """
    if not isinstance(module, GroupedDifferentialAttention):
        raise TypeError(f"module: expected a GroupedDifferentialAttention, got {type(module).__name__}")
    check_positive_int("factor", factor)
    r, h2, d = module.ratio, module.num_noise_heads, module.head_dim
    grown = GroupedDifferentialAttention(
        module.dim, h2 * (r * factor + 1), ratio=r * factor, num_kv_heads=module.num_kv_heads, head_dim=d,
        causal=module.causal, lambda_init=module.lambda_init, norm=module.subln is not None, backend=module.backend)
    grown.layer_index = module.layer_index
    # query rows: per group, each signal head `factor` times, then the noise head
    wq = module.q_proj.weight.view(h2, r + 1, d, module.dim)
    signal = wq[:, :r].repeat_interleave(factor, dim=1)
    grown.q_proj.weight.copy_(torch.cat([signal, wq[:, r:]], dim=1).reshape(-1, module.dim))
    # output columns: 2d per signal head, each copy gets 1/factor
    wo = module.out_proj.weight.view(module.dim, h2 * r, 2 * d)
    grown.out_proj.weight.copy_((wo.repeat_interleave(factor, dim=1) / factor).reshape(module.dim, -1))
    for name in ("k_proj", "v_proj"):
        getattr(grown, name).load_state_dict(getattr(module, name).state_dict())
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        getattr(grown, name).copy_(getattr(module, name))
    if module.subln is not None:
        grown.subln.load_state_dict(module.subln.state_dict())
    return grown


@register_mechanism("diff", paper="P05", lesson="13", supports_causal=True,
                    summary="differential attention (Ye et al., 2024): softmax minus lambda softmax, num_heads differential heads")
def build_diff(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return DifferentialAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("gda", paper="P05", lesson="13", supports_causal=True,
                    summary="grouped differential attention (Lim et al., 2025): ratio= signal heads per noise head")
def build_gda(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return GroupedDifferentialAttention(dim, num_heads, causal=causal, **options)
