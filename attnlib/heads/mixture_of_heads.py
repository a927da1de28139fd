r"""Lesson 12: mixture-of-head attention (MoH), P04.

Jin, Zhu, Yuan and Yan, *MoH: Multi-Head Attention as Mixture-of-Head Attention* (2024, arXiv:2410.11842).

**Multi-head attention is a sum over heads.** Split the output projection $W_O \in \mathbb{R}^{hd \times
d_\text{model}}$ into $h$ row blocks $W_O^i \in \mathbb{R}^{d \times d_\text{model}}$, one per head. Then

$$\operatorname{MHA}(x_t) = [H^1_t, \dots, H^h_t]\, W_O = \sum_{i=1}^{h} H^i_t W_O^i ,$$

where $H^i_t \in \mathbb{R}^{d}$ is the output of head $i$ at token $t$. Every head counts equally.

**MoH makes it a weighted sum, with a router.** Each token $x_t$ chooses its heads, like a token choosing
its experts in a mixture of experts:

$$\operatorname{MoH}(x_t) = \sum_{i=1}^{h} g_{t,i}\, H^i_t W_O^i .$$

The first $h_s$ heads are *shared* (always on), the other $h - h_s$ are *routed*: a token keeps only its
top-$k$ of them. With $[\alpha_1, \alpha_2] = \operatorname{softmax}(W_h x_t)$ (two-stage routing: how much
weight goes to each *type* of head), the paper's gates (Eq. 5-6) are

$$g_{t,i} = \begin{cases}
  \alpha_1\, \operatorname{softmax}(W_s x_t)_i & 1 \le i \le h_s \\
  \alpha_2\, \operatorname{softmax}(W_r x_t)_{i - h_s} & \text{if } (W_r x_t)_{i-h_s} \in \operatorname{Top-}k(W_r x_t) \\
  0 & \text{otherwise.}
\end{cases}$$

**The official code scales differently** (SkyworkAI/MoH, ``MoH-DiT/models.py`` and ``MoH-ViT/attention.py``).
It renormalises the kept routed probabilities to sum to one and multiplies them by $k$, multiplies the
shared softmax by $h_s$ and the head-type softmax by $2$:

$$g^\text{code}_{t,i} = \begin{cases}
  2\alpha_1 \cdot h_s\, \operatorname{softmax}(W_s x_t)_i & 1 \le i \le h_s \\
  2\alpha_2 \cdot k\, \dfrac{p_{t,i-h_s}\, m_{t,i-h_s}}{\sum_j p_{t,j} m_{t,j}} & h_s < i \le h
\end{cases}
\qquad p_t = \operatorname{softmax}(W_r x_t),\; m_t = \text{top-}k \text{ indicator}.$$

Each factor makes a uniform router give gates of exactly $1$: then MoH with every head active *is* MHA, and
a head keeps the scale it has in MHA whatever $h$ and $k$ are. The library follows the code by default
(``convention="code"``); ``convention="paper"`` gives Eq. 5-6. With only one type of head (no shared heads, or
$k = 0$) there is no head-type router and that type's weight is $1$ (as in the code). With $h_s = 1$ the
shared softmax is over one head, the constant $1$, so no $W_s$ is built.

**Load balance** (Eq. 7): over the $T$ tokens of a batch, with $f_i$ the fraction of tokens that select
routed head $i$ and $P_i$ its mean routing probability,

$$\mathcal{L}_b = \sum_{i=1}^{h - h_s} f_i P_i, \qquad f_i = \frac{1}{T}\sum_t m_{t,i}, \qquad
  P_i = \frac{1}{T}\sum_t p_{t,i},$$

added as $\beta \mathcal{L}_b$ with $\beta = 0.01$. The code's loss is $(h - h_s)$ times this (its
``mean(P * f) * E * E``), and its training script adds $0.01$ times the *mean* over layers; the module here
adds ``aux_weight`` times its own loss, so a model with $D$ MoH layers matching the code passes
``aux_weight=0.01 / D``.

Like the reference code, :class:`MixtureOfHeadsAttention` computes every head densely and gates afterwards:
it shows what the router learns, not the speed-up, which needs a kernel that skips inactive heads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._checks import check_tensor
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import WEIGHTS_CMAP, _as_numpy, _axes, _check_matrix, _label_ticks, plt

CONVENTIONS = ("code", "paper")


def _check_convention(convention) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")


def _check_count(name: str, value, low: int, high: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int from {low} to {high} ({why}), got {value!r}")


def _check_router(name: str, router, dim: int, outputs: int, why: str) -> None:
    """``router`` is an ``nn.Linear(dim, outputs)``: what a gate needs, named when it is missing or the wrong size."""
    if not isinstance(router, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear({dim}, {outputs}) ({why}), got {type(router).__name__}")
    if (router.in_features, router.out_features) != (dim, outputs):
        raise ValueError(f"{name}: expected an nn.Linear({dim}, {outputs}) ({why}), got "
                         f"nn.Linear({router.in_features}, {router.out_features})")


def top_k_mask(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    r"""$m_{t,i} = 1$ if $p_{t,i}$ is among the $k$ largest of $p_t$, else $0$: ``(..., E) -> (..., E)`` bool.

    Exactly ``top_k`` entries per row are ``True``; ties are broken by :func:`torch.topk` (its order is
    unspecified, so tests avoid ties).
    """
    mask = torch.zeros_like(probs, dtype=torch.bool)
    if top_k == 0:
        return mask
    return mask.scatter(-1, probs.topk(top_k, dim=-1).indices, True)


def routed_head_gates(logits: torch.Tensor, top_k: int, *, convention: str = "code"):
    r"""Gates of the routed heads from the router's logits $W_r x_t$ (before the head-type weight $\alpha_2$).

    paper: $p_{t,i} m_{t,i}$;  code: $k\, p_{t,i} m_{t,i} / \max(\sum_j p_{t,j} m_{t,j}, \varepsilon)$, with
    $p_t = \operatorname{softmax}(W_r x_t)$ and $m_t$ the top-$k$ indicator.

    Shapes: ``logits (..., E)`` with $E = h - h_s$ routed heads. Returns ``(gates, probs, mask)``, all
    ``(..., E)``; ``probs`` and ``mask`` feed :func:`load_balancing_loss`.
    """
    _check_convention(convention)
    check_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits: expected (..., E) with one logit per routed head, got a scalar")
    _check_count("top_k", top_k, 0, logits.shape[-1], f"at most the {logits.shape[-1]} routed heads")
    # p = softmax(W_r x)
    probs = torch.softmax(logits, dim=-1)
    mask = top_k_mask(probs, top_k)
    kept = probs * mask
    if convention == "paper":
        return kept, probs, mask
    # k p m / sum(p m): the kept probabilities renormalised, times k (uniform routing gives gates of 1)
    total = kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
    return top_k * kept / total, probs, mask


def mixture_of_heads_gates(x: torch.Tensor, *, num_heads: int, num_shared: int, top_k: int,
                           routed_router: nn.Linear | None = None, shared_router: nn.Linear | None = None,
                           type_router: nn.Linear | None = None, convention: str = "code"):
    r"""The gates $g_{t,i}$ of every head, shared heads first: ``x (B, L, dim) -> gates (B, L, h)``.

    $g_{t,i} = \alpha_1 s_{t,i}$ for shared heads and $\alpha_2 r_{t,i}$ for routed ones, where $s_t$ is
    $\operatorname{softmax}(W_s x_t)$ (times $h_s$ in the code convention), $r_t$ comes from
    :func:`routed_head_gates`, and $[\alpha_1, \alpha_2] = \operatorname{softmax}(W_h x_t)$ (times $2$ in
    the code convention). A missing router means a type with a single choice: $h_s \le 1$ needs no $W_s$
    ($s = 1$), one type of head needs no $W_h$ ($\alpha = 1$).

    Returns ``(gates, probs, mask)``: ``gates (B, L, h)``; the routing probabilities and the top-$k$
    indicator ``(B, L, h - h_s)`` (``None`` when $k = 0$).
    """
    check_tensor("x", x, ndim=3)
    _check_convention(convention)
    _check_count("num_heads", num_heads, 1, 2**31, "a positive number of heads")
    _check_count("num_shared", num_shared, 0, num_heads, f"at most the {num_heads} heads")
    num_routed = num_heads - num_shared
    _check_count("top_k", top_k, 0, num_routed, f"at most the {num_routed} routed heads")
    dim = x.shape[-1]
    if num_shared > 0 and top_k > 0:
        _check_router("type_router", type_router, dim, 2, "one logit per head type")
    if num_shared > 1:
        _check_router("shared_router", shared_router, dim, num_shared, "one logit per shared head")
    if num_routed > 0 and top_k > 0:
        _check_router("routed_router", routed_router, dim, num_routed, "one logit per routed head")
    shape = x.shape[:-1]
    parts, probs, mask = [], None, None
    shared_weight = routed_weight = None
    if num_shared > 0 and top_k > 0:
        # [alpha_1, alpha_2] = softmax(W_h x)  (x 2 in the code: uniform gives 1 each)
        alpha = torch.softmax(type_router(x), dim=-1)
        if convention == "code":
            alpha = 2 * alpha
        shared_weight, routed_weight = alpha[..., :1], alpha[..., 1:]
    if num_shared > 0:
        if num_shared > 1:
            # s = softmax(W_s x)  (x h_s in the code)
            shared = torch.softmax(shared_router(x), dim=-1)
            if convention == "code":
                shared = num_shared * shared
        else:
            shared = x.new_ones(*shape, 1)
        parts.append(shared if shared_weight is None else shared_weight * shared)
    if num_routed > 0:
        if top_k > 0:
            routed, probs, mask = routed_head_gates(routed_router(x), top_k, convention=convention)
            parts.append(routed if routed_weight is None else routed_weight * routed)
        else:
            parts.append(x.new_zeros(*shape, num_routed))
    return torch.cat(parts, dim=-1), probs, mask


def load_balancing_loss(probs: torch.Tensor, mask: torch.Tensor, *, convention: str = "code") -> torch.Tensor:
    r"""$\mathcal{L}_b = \sum_i f_i P_i$ (paper, Eq. 7), or $E \sum_i f_i P_i$ (code), over all tokens.

    $f_i = \frac1T \sum_t m_{t,i}$ (fraction of tokens selecting routed head $i$, not differentiable),
    $P_i = \frac1T \sum_t p_{t,i}$ (mean routing probability, carries the gradient).

    Shapes: ``probs (..., E)`` routing probabilities, ``mask (..., E)`` top-$k$ indicator; every leading
    index is a token. Returns a scalar. Uniform routing gives $k/E$ (paper) or $k$ (code).
    """
    _check_convention(convention)
    check_tensor("probs", probs)
    check_tensor("mask", mask, floating=False)
    if mask.shape != probs.shape:
        raise ValueError(f"mask: expected the shape of probs {tuple(probs.shape)} (one entry per token and routed "
                         f"head), got {tuple(mask.shape)}")
    num_routed = probs.shape[-1]
    probs, mask = probs.reshape(-1, num_routed), mask.reshape(-1, num_routed)
    # f_i: fraction of tokens whose top-k contains head i;  P_i: mean probability of head i
    fraction = mask.to(probs.dtype).mean(dim=0)
    mean_prob = probs.mean(dim=0)
    # L_b = sum_i f_i P_i
    loss = (fraction * mean_prob).sum()
    return loss if convention == "paper" else num_routed * loss


def default_head_split(num_heads: int) -> tuple[int, int]:
    r"""Default ``(num_shared, top_k)`` for $h$ heads: half shared, a quarter of all heads routed per token.

    $h_s = \lfloor h/2 \rfloor$, $k = \max(1, \lfloor (h - h_s)/2 \rfloor)$: 75% of the heads active for
    $h = 4, 8, 16$ (like MoH-ViT-B-75), and both heads for $h = 2$ (one shared, one routed).
    """
    num_shared = num_heads // 2
    return num_shared, max(1, (num_heads - num_shared) // 2)


class MixtureOfHeadsAttention(MultiHeadAttention):
    r"""Mixture-of-head attention, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    $$\operatorname{MoH}(x_t) = \sum_{i=1}^{h} g_{t,i}\, H^i_t W_O^i ,$$

    with heads $H^i$ as in :class:`attnlib.MultiHeadAttention` (same projections, so an MHA state dict loads
    with ``strict=False``) and gates from :func:`mixture_of_heads_gates`. In training mode the forward pass
    sets ``self.aux_loss = aux_weight * load_balancing_loss(...)``, which :func:`attnlib.train` adds to the
    loss; in eval mode ``aux_loss`` is ``None``. The last gates are kept in ``self.last_gates (B, L, h)``.

    Args:
        dim, num_heads, causal, backend, bias: as in :class:`attnlib.MultiHeadAttention`.
        num_shared: $h_s$, always-on heads (the first $h_s$); default :func:`default_head_split`.
        top_k: $k$, routed heads each token keeps, from 0 to $h - h_s$; default :func:`default_head_split`.
        convention: ``"code"`` (official code's scaling, default) or ``"paper"`` (Eq. 5-6).
        aux_weight: $\beta$, the weight of the load-balancing loss (0.01 as in the paper; 0 for none).

    Paper: Jin et al., *MoH: Multi-Head Attention as Mixture-of-Head Attention*, 2024, arXiv:2410.11842.
    """

    def __init__(self, dim: int, num_heads: int, *, num_shared: int | None = None, top_k: int | None = None,
                 convention: str = "code", aux_weight: float = 0.01, causal: bool = False,
                 backend: str = "reference", bias: bool = False):
        super().__init__(dim, num_heads, causal=causal, backend=backend, bias=bias)
        default_shared, default_k = default_head_split(num_heads)
        num_shared = default_shared if num_shared is None else num_shared
        _check_count("num_shared", num_shared, 0, num_heads, f"shared heads of num_heads={num_heads}")
        num_routed = num_heads - num_shared
        top_k = min(default_k, num_routed) if top_k is None else top_k
        _check_count("top_k", top_k, 0, num_routed,
                     f"routed heads kept per token, of num_heads - num_shared = {num_routed}")
        if num_shared + top_k == 0:
            raise ValueError("num_shared, top_k: expected at least one active head per token, got num_shared=0 "
                             "and top_k=0")
        _check_convention(convention)
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or aux_weight < 0:
            raise ValueError(f"aux_weight: expected a number >= 0, got {aux_weight!r}")
        self.num_shared, self.num_routed, self.top_k = num_shared, num_routed, top_k
        self.convention, self.aux_weight = convention, float(aux_weight)
        # W_r, W_s, W_h without bias, as in the official code; built only where there is a choice to make
        self.routed_router = nn.Linear(dim, num_routed, bias=False) if top_k > 0 else None
        self.shared_router = nn.Linear(dim, num_shared, bias=False) if num_shared > 1 else None
        self.type_router = nn.Linear(dim, 2, bias=False) if num_shared > 0 and top_k > 0 else None
        self.aux_loss: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    @property
    def active_heads(self) -> int:
        """Heads with a non-zero gate at each token, $h_s + k$."""
        return self.num_shared + self.top_k

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_shared={self.num_shared}, top_k={self.top_k}, "
                f"convention={self.convention!r}, causal={self.causal}")

    def gates(self, x: torch.Tensor):
        """``x (B, L, dim)`` -> ``(gates (B, L, h), probs, mask)``, see :func:`mixture_of_heads_gates`."""
        return mixture_of_heads_gates(x, num_heads=self.num_heads, num_shared=self.num_shared, top_k=self.top_k,
                                      routed_router=self.routed_router, shared_router=self.shared_router,
                                      type_router=self.type_router, convention=self.convention)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """Mix ``x (B, L, dim)``; ``mask`` and ``return_weights`` as in :class:`attnlib.MultiHeadAttention`."""
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        gates, probs, top = self.gates(x)
        self.last_gates = gates.detach()
        self.aux_loss = None
        if self.training and top is not None and self.aux_weight > 0:
            self.aux_loss = self.aux_weight * load_balancing_loss(probs, top, convention=self.convention)
        # every head densely, as in the reference code: heads (B, h, L, d) before W_O
        heads, weights = self.head_outputs(x, mask=mask)
        b, length = x.shape[:2]
        # MoH(x_t) = sum_i g_{t,i} H^i_t W_O^i = [g_1 H^1, ..., g_h H^h] W_O
        gated = heads * gates.transpose(1, 2)[..., None]
        out = self.out_proj(gated.transpose(1, 2).reshape(b, length, -1))
        if return_weights:
            if weights is None:
                raise ValueError(f"backend: {self.backend!r} returns no weights; use 'reference'")
            return out, weights
        return out

    def head_outputs(self, x: torch.Tensor, *, mask: torch.Tensor | None = None):
        """The heads $H^i$ before the output projection: ``x (B, L, dim) -> ((B, h, L, d), weights or None)``."""
        return self.attend(*self.project(x), mask=mask)


@register_mechanism("moh", paper="P04", lesson="12", supports_causal=True,
                    summary="mixture-of-head attention: shared heads plus top-k routed heads per token, "
                            "weighted sum of heads (Jin et al., 2024)")
def build_moh(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return MixtureOfHeadsAttention(dim, num_heads, causal=causal, **options)


def plot_head_gates(gates, *, token_labels=None, num_shared: int = 0, title: str | None = None, ax=None,
                    colorbar: bool = True, vmax: float | None = None):
    """Per-token head usage: a heat map of the gates ``(tokens, heads)``, white where a head is off (gate 0).

    A dashed line separates the ``num_shared`` shared heads (left) from the routed ones.
    """
    g = _as_numpy(gates)
    _check_matrix("gates", g)
    ax = _axes(ax, size=(3.6, 4.2))
    cmap = plt.get_cmap(WEIGHTS_CMAP).with_extremes(bad="white")  # heads that are off
    image = ax.imshow(np.ma.masked_equal(g, 0.0), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    _label_ticks(ax, token_labels, None, *g.shape)
    if 0 < num_shared < g.shape[1]:
        ax.axvline(num_shared - 0.5, color="black", linestyle="--", linewidth=1.2)
    ax.set_xlabel("head (shared | routed)" if num_shared else "head")
    ax.set_ylabel("token")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_head_load(gates, *, num_shared: int = 0, title: str | None = None, ax=None):
    """Load over heads: the fraction of tokens whose gate for each head is non-zero, from ``gates (..., heads)``.

    Shared heads (grey) are always at 1; the dashed line is the routed heads' balanced load $k / (h - h_s)$.
    """
    g = _as_numpy(gates)
    g = g.reshape(-1, g.shape[-1])
    load = (g != 0).mean(axis=0)
    heads = g.shape[1]
    ax = _axes(ax, size=(4.6, 3.2))
    colors = ["0.6"] * num_shared + ["C0"] * (heads - num_shared)
    ax.bar(range(heads), load, color=colors)
    if num_shared < heads:
        balanced = load[num_shared:].sum() / (heads - num_shared)
        ax.axhline(balanced, color="C1", linestyle="--", linewidth=1, label="balanced routed load")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(heads))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("head")
    ax.set_ylabel("fraction of tokens using it")
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return ax
