r"""Lesson 47: Flux attention, routing layers between full and sparse attention, P26.

Qiu, Hong, Yang, Wang, Liu, Dang, Li and Zhang, *Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs
Inference* (2026, arXiv:2604.07394). Official code: qqtang-code/FluxAttention (``fluxattn/training/modeling_flash_qwen.py``,
``AttentionRouter``; the penalty in ``Qwen3Model.forward``; schedules in ``fluxattn/training/lh_trainer.py``).

**Two branches per layer.** Every attention layer $\ell$ can run full attention (FA, lesson 00) or a sparse
attention (SA). Here SA is *streaming attention*: each query sees the first $s$ tokens (the *sinks*) and the
last $w$ tokens up to itself (a local window),

$$M^\text{SA}_{ij} = [\,j \le i\,]\;\big([\,j < s\,] \lor [\,i - j < w\,]\big),$$

so a row costs at most $s + w$ keys instead of $i + 1$.

**A router per layer decides from the context.** It reads the layer's queries $q \in \mathbb{R}^{B\times
H\times L\times d}$ (RMS-normalised per head, before any position encoding), pools the first $P$ and the last
$P$ tokens and the heads,

$$\bar q_b = \frac{1}{H}\sum_h \frac{1}{2P}\Big(\sum_{t < P} q_{b,h,t} + \sum_{t \ge L-P} q_{b,h,t}\Big),$$

and maps it through two MLPs with SiLU, $d \to 8d \to 2d$ then $2d \to 4d \to d \to 2$, to two logits
$a_b = (a_{\text{sparse}}, a_{\text{full}})$. The last linear layer starts with zero weights and bias $(0, 4.5)$,
so every router starts at $p_\text{full} = \sigma(4.5) \approx 0.989$: the model starts as the full-attention
model it was trained as.

**Training: Gumbel-softmax with a hard straight-through estimator.** With $g = -\log(-\log(u + 10^{-8}) +
10^{-8})$, $u \sim U(0,1)$, and temperature $\tau$,

$$y = \operatorname{softmax}\big((a + g)/\tau\big), \qquad h = \operatorname{onehot}(\arg\max y), \qquad
  z = h_\text{full} + y_\text{full} - \operatorname{sg}(y_\text{full}),$$

so the forward pass sees an exact 0 or 1 and the backward pass the gradient of the soft $y_\text{full}$.
$\tau$ falls from 1.5 to 1.0 along a cosine over the first 60% of the steps. At inference $z = [a_\text{full}
> a_\text{sparse}]$ (no noise).

**The layer output** is $\text{out} = z\,\mathrm{FA} + (1 - z)\,\mathrm{SA}$, one $z$ per sample and layer
(the same for every head and token). Training computes both branches, so it saves nothing; inference runs
only the chosen one.

**The sparsity constraint.** With $N$ routed layers, the sparsity of sample $b$ is
$\rho_b = 1 - \frac1N\sum_\ell z_{\ell,b}$, and the penalty for a target $t$ is

$$\mathcal{R} = \lambda_1 |\rho - t| + \lambda_2 (\rho - t)^2 ,$$

with $\lambda_1, \lambda_2 \ge 0$ per task, initialised $U(0, 0.5)$ and **maximised** while everything else
minimises $\mathcal{L}_\text{LM} + \mathcal{R}$ (a Lagrangian min-max: while the constraint is violated the
multipliers keep growing). The code averages the per-sample penalty within each task, then over tasks.

Where this library differs from the paper's setting, and why:

* *Causality.* The paper decides once per prompt at prefill, from the whole prompt (context and question),
  so a prompt token's output depends, through $z$, on later prompt tokens. That is fine for the generated
  answer but breaks the course's causality rule (changing a future token changes no past output). With
  ``routing="prefix"`` (the default when ``causal=True``) position $t$ uses the decision the router makes for
  the prompt that ends at $t$; at the last position it *is* the paper's decision. ``routing="sample"`` is the
  paper's per-prompt decision; use it when only the last position is scored (the experiment of lesson 47).
* *The sparse kernel.* The real system runs SA with a block-sparse FlashAttention kernel (128 sink tokens and a
  2048-token window in blocks of 128); here SA is a boolean mask for :func:`attnlib.attention`, at token
  granularity.
* *The min-max.* The code gives $\lambda$ its own AdamW group with ``maximize=True``. Here $\lambda$ enters the
  penalty through :func:`reverse_gradient` (identity forward, negated gradient backward), so one ordinary
  minimiser, and the course's ``aux_loss`` convention (:func:`attnlib.tools.training.auxiliary_loss`), ascend on
  $\lambda$ and descend on everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_bool, check_non_negative_int, check_positive_int, check_tensor
from ..core import attention
from ..masks import and_masks, causal, make_mask
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.plotting import _axes
from ..tools.tasks import AssociativeRecall, Batch, Task, _check_generator

GUMBEL_EPS = 1e-8
FULL_BIAS = 4.5
ROUTINGS = ("sample", "prefix")
MODES = ("route", "full", "sparse")


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                  strict_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if low is not None and (value <= low if strict_low else value < low):
        raise ValueError(f"{name}: expected a number {'>' if strict_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected a number <= {high}, got {value!r}")


# --- the sparse branch: streaming attention -------------------------------------------------------------


def streaming(sink: int, window: int):
    r"""Mask function of streaming attention: $[j < s] \lor [i - j < w]$ (combine with :func:`attnlib.masks.causal`)."""
    check_non_negative_int("sink", sink)
    check_positive_int("window", window)

    def mask_fn(b, h, i, j):
        return (j < sink) | (i - j < window)

    mask_fn.__name__ = f"streaming(sink={sink}, window={window})"
    return mask_fn


def streaming_mask(q_len: int, k_len: int | None = None, *, sink: int, window: int, device=None) -> torch.Tensor:
    r"""Causal streaming mask ``(q_len, k_len)``: $M_{ij} = [j \le i]\,([j < s] \lor [i - j < w])$.

    ``True`` = may attend; query row ``r`` sits at position ``r + k_len - q_len`` (see :mod:`attnlib.masks`).
    """
    return make_mask(and_masks(causal(), streaming(sink, window)), q_len, k_len, device=device)[0, 0]


def streaming_attention(q, k, v, *, sink: int, window: int, scale: float | None = None) -> torch.Tensor:
    r"""Streaming attention: softmax attention restricted to $s$ sink tokens and a window of $w$ recent tokens.

    Shapes: ``q (B, H, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, H, Lq, Dv)``. Always causal.
    (The real system uses a block-sparse kernel that skips the masked blocks; the mask here computes them.)
    """
    mask = streaming_mask(q.shape[-2], k.shape[-2], sink=sink, window=window, device=q.device)
    return attention(q, k, v, mask=mask, causal=True, scale=scale)


def attention_flops(mask: torch.Tensor, head_dim: int, num_heads: int = 1) -> int:
    r"""Multiply-add FLOPs of attention restricted to ``mask (Lq, Lk)``: $4\,d\,H\,|M|$ ($QK^\top$ and $PV$).

    A kernel that skips masked entries (block-sparse at token granularity) pays only for the allowed pairs.
    """
    return int(4 * head_dim * num_heads * int(mask.sum()))


# --- the router's pieces -----------------------------------------------------------------------------------


def gumbel_noise(shape, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None):
    r"""Gumbel(0, 1) noise as the official code draws it: $g = -\log(-\log(u + 10^{-8}) + 10^{-8})$, $u \sim U(0, 1)$."""
    if generator is not None:
        _check_generator(generator)
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    # g = -log(-log(u + eps) + eps)
    return -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)


def straight_through_gumbel(logits: torch.Tensor, tau: float, *, noise: torch.Tensor | None = None):
    r"""Hard Gumbel-softmax with a straight-through estimator over two choices (sparse, full).

    $y = \operatorname{softmax}((a + g)/\tau)$, $h = \operatorname{onehot}(\arg\max y)$,
    $z = h + y - \operatorname{sg}(y)$: the forward value is exactly one-hot, the gradient that of $y$.

    Args:
        logits: ``(..., 2)``, $a = (a_\text{sparse}, a_\text{full})$.
        tau: temperature $\tau > 0$.
        noise: ``(..., 2)`` Gumbel noise $g$ (``None``: no noise, as at inference).

    Returns:
        ``(z, soft)``, both ``(..., 2)``; ``z[..., 1]`` is the full-attention indicator.
    """
    check_tensor("logits", logits)
    if logits.shape[-1] != 2:
        raise ValueError(f"logits: expected a last dim of 2 (sparse, full), got shape {tuple(logits.shape)}")
    _check_number("tau", tau, low=0.0, strict_low=True)
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise: expected shape {tuple(logits.shape)} (as logits), got {tuple(noise.shape)}")
    perturbed = logits if noise is None else logits + noise
    # y = softmax((a + g) / tau)
    soft = torch.softmax(perturbed / tau, dim=-1)
    hard = torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0)
    # z = h + (y - sg(y)): the bracket is exactly 0 in the forward pass (h + y - y may round off h)
    return hard + (soft - soft.detach()), soft


def pool_first_last(q: torch.Tensor, pool_size: int) -> torch.Tensor:
    r"""The router's context summary: mean of the first $P$ and last $P$ tokens, then over heads.

    $\bar q = \frac1H\sum_h \operatorname{mean}\big(q_{h,0:P} \,\|\, q_{h,L-P:L}\big)$. As in the code, the two
    slices are concatenated before the mean, so when $L < 2P$ the tokens in both are counted twice.

    Shapes: ``q (B, H, L, d)`` -> ``(B, d)``.
    """
    check_tensor("q", q, ndim=4)
    check_positive_int("pool_size", pool_size)
    first, last = q[:, :, :pool_size], q[:, :, -pool_size:]
    return torch.cat([first, last], dim=2).mean(dim=2).mean(dim=1)


def pool_first_last_prefixes(q: torch.Tensor, pool_size: int) -> torch.Tensor:
    r""":func:`pool_first_last` of every prefix $q_{:, :, 0:t+1}$: ``q (B, H, L, d)`` -> ``(B, L, d)``.

    Row $t$ depends only on tokens $\le t$; row $L-1$ equals :func:`pool_first_last` of the whole sequence.
    """
    check_tensor("q", q, ndim=4)
    check_positive_int("pool_size", pool_size)
    length = q.shape[2]
    x = q.mean(dim=1)  # (B, L, d): the head mean commutes with the token mean
    zero = x.new_zeros(x.shape[0], 1, x.shape[2])
    cum = torch.cat([zero, x.cumsum(dim=1)], dim=1)  # cum[:, n] = sum of the first n tokens
    n = torch.arange(1, length + 1, device=q.device)
    count = torch.clamp(n, max=pool_size)  # tokens in each slice
    first = cum[:, count]  # sum of tokens 0 .. count-1
    last = cum[:, n] - cum[:, n - count]  # sum of tokens n-count .. n-1
    return (first + last) / (2 * count).to(x.dtype)[None, :, None]


def rms_normalise(q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""$q / \sqrt{\operatorname{mean}(q^2) + \epsilon}$ over the head dim (the router reads normalised queries)."""
    return q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps)


class LayerRouter(nn.Module):
    r"""One layer's router: pooled queries -> two logits (sparse, full).

    features $= W_2\,\operatorname{SiLU}(W_1 \bar q)$ ($d \to 8d \to 2d$), logits $= W_5\,\operatorname{SiLU}(W_4\,
    \operatorname{SiLU}(W_3 f))$ ($2d \to 4d \to d \to 2$), with $W_5 = 0$ and $b_5 = (0, 4.5)$ at
    initialisation, so $p_\text{full} = e^{4.5}/(1 + e^{4.5}) \approx 0.989$ for every input.

    Args:
        head_dim: $d$, the size of a pooled query.
        full_bias: initial logit of full attention (4.5 in the code).
    """

    def __init__(self, head_dim: int, *, full_bias: float = FULL_BIAS):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        _check_number("full_bias", full_bias)
        d = head_dim
        self.features = nn.Sequential(nn.Linear(d, 8 * d), nn.SiLU(), nn.Linear(8 * d, 2 * d))
        self.head = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU(),
                                  nn.Linear(d, 2))
        self.reset_last_layer(full_bias)

    def reset_last_layer(self, full_bias: float = FULL_BIAS) -> None:
        """Zero weights and bias ``(0, full_bias)`` in the last layer: $p_\\text{full} = \\sigma(\\text{full\\_bias})$."""
        last = self.head[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0.0, float(full_bias)]))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled (..., d)`` -> logits ``(..., 2)`` = (sparse, full)."""
        return self.head(self.features(pooled))


# --- the mechanism ---------------------------------------------------------------------------------------


class FluxAttention(MultiHeadAttention):
    r"""One Flux attention layer: a router choosing full or streaming attention, a token mixer ``(B, L, dim)``.

    $$\text{out} = z\,\mathrm{FA}(x) + (1 - z)\,\mathrm{SA}(x), \qquad z \in \{0, 1\},$$

    with FA and SA sharing the projections of :class:`attnlib.MultiHeadAttention` (an MHA state dict loads with
    ``strict=False``), SA the streaming attention of :func:`streaming_attention`, and $z$ from a
    :class:`LayerRouter`: hard Gumbel-softmax with a straight-through gradient in training, the argmax in
    eval mode. In eval mode with ``routing="sample"`` only the chosen branch is computed for each sample.

    After each forward pass: ``last_z (B, L)`` (the decision each position used, a straight-through tensor
    in training), ``last_p_full (B, L)`` (the router's probability of full attention, without noise).

    Args:
        dim, num_heads, causal, bias: as in :class:`attnlib.MultiHeadAttention`.
        sink: $s$, sink tokens of the sparse branch.
        window: $w$, recent tokens (the query included) of the sparse branch.
        pool_size: $P$, tokens pooled at each end of the context.
        routing: ``"sample"`` (one decision per sample, the paper) or ``"prefix"`` (position $t$ decides
            from tokens $\le t$, exactly causal); default ``"prefix"`` if ``causal`` else ``"sample"``.
        allow_leak: with ``causal=True``, ``routing="sample"`` lets every position's output depend on later
            tokens (through the one decision made from the whole prompt), so it is refused unless
            ``allow_leak=True``: the paper's setting, where only the last position is scored.
        mode: ``"route"``, or ``"full"`` / ``"sparse"`` to force a branch (for baselines).
        tau: Gumbel-softmax temperature (a training loop sets it each step).

    The sparse branch is causal, so the layer is causal too. ``causal=False`` is accepted for plugging
    into non-causal models, but then the full branch sees the future while the sparse one does not.

    Paper: Qiu et al., *Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs Inference*, 2026,
    arXiv:2604.07394.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, sink: int = 1, window: int = 4,
                 pool_size: int = 4, routing: str | None = None, mode: str = "route", tau: float = 1.0,
                 full_bias: float = FULL_BIAS, bias: bool = False, allow_leak: bool = False):
        super().__init__(dim, num_heads, causal=causal, bias=bias)
        check_bool("allow_leak", allow_leak)
        check_non_negative_int("sink", sink)
        check_positive_int("window", window)
        check_positive_int("pool_size", pool_size)
        routing = ("prefix" if causal else "sample") if routing is None else routing
        if routing not in ROUTINGS:
            raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
        if causal and routing == "sample" and not allow_leak:
            raise ValueError("routing: 'sample' makes one decision per sample from the whole prompt, so an earlier "
                             "position's output depends on later tokens (not causal); use routing='prefix', or "
                             "allow_leak=True for the paper's per-prompt decision when only the last position counts")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        _check_number("tau", tau, low=0.0, strict_low=True)
        self.sink, self.window, self.pool_size = sink, window, pool_size
        self.routing, self.mode, self.tau = routing, mode, float(tau)
        self.router = LayerRouter(self.head_dim, full_bias=full_bias)
        self.generator: torch.Generator | None = None  # seeds the Gumbel noise when set
        self.last_z: torch.Tensor | None = None
        self.last_p_full: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sink={self.sink}, window={self.window}, "
                f"pool_size={self.pool_size}, routing={self.routing!r}, mode={self.mode!r}, causal={self.causal}")

    def router_logits(self, q: torch.Tensor) -> torch.Tensor:
        """Queries ``(B, H, L, d)`` -> logits ``(B, 2)`` (``"sample"``) or ``(B, L, 2)`` (``"prefix"``)."""
        q = rms_normalise(q)
        pooled = pool_first_last(q, self.pool_size) if self.routing == "sample" \
            else pool_first_last_prefixes(q, self.pool_size)
        return self.router(pooled)

    def decide(self, logits: torch.Tensor):
        """Logits ``(..., 2)`` -> ``(z, p_full)``, both ``(...)``: noisy straight-through in training, argmax in eval."""
        p_full = torch.softmax(logits.detach() / self.tau, dim=-1)[..., 1]
        if self.mode != "route":
            z = torch.full_like(p_full, 1.0 if self.mode == "full" else 0.0)
            return z, p_full
        noise = None
        if self.training:
            noise = gumbel_noise(logits.shape, generator=self.generator, dtype=logits.dtype).to(logits.device)
        z, _ = straight_through_gumbel(logits, self.tau, noise=noise)
        return z[..., 1], p_full

    def branches(self, q, k, v):
        """Both branches ``(B, H, L, d)``: full (causal if the layer is) and streaming attention."""
        full = attention(q, k, v, causal=self.causal)
        sparse = streaming_attention(q, k, v, sink=self.sink, window=self.window)
        return full, sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x (B, L, dim)`` -> ``(B, L, dim)``."""
        q, k, v = self.project(x)
        b, length = x.shape[:2]
        z, p_full = self.decide(self.router_logits(q))
        if self.routing == "sample":
            z, p_full = z[:, None].expand(b, length), p_full[:, None].expand(b, length)
        self.last_z, self.last_p_full = z, p_full
        if self.mode != "route" or (not self.training and self.routing == "sample"):
            out = self._chosen_branch_only(q, k, v, z[:, 0] > 0.5)
        else:
            full, sparse = self.branches(q, k, v)
            gate = z[:, None, :, None].to(full.dtype)  # (B, 1, L, 1): the same for every head
            # out = z FA + (1 - z) SA
            out = gate * full + (1 - gate) * sparse
        return self.merge_heads(out)

    def _chosen_branch_only(self, q, k, v, use_full: torch.Tensor) -> torch.Tensor:
        """Full attention for the samples routed to it, streaming attention for the others (inference, forced modes)."""
        out = torch.empty_like(q[..., :v.shape[-1]])
        if use_full.any():
            out[use_full] = attention(q[use_full], k[use_full], v[use_full], causal=self.causal)
        if (~use_full).any():
            out[~use_full] = streaming_attention(q[~use_full], k[~use_full], v[~use_full], sink=self.sink,
                                                 window=self.window)
        return out


@register_mechanism("flux", paper="P26", lesson="47", supports_causal=True,
                    summary="Flux attention: a per-layer router picks full or streaming (sink + window) attention")
def build_flux(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return FluxAttention(dim, num_heads, causal=causal, **options)


def flux_layers(model: nn.Module) -> list[FluxAttention]:
    """The :class:`FluxAttention` layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, FluxAttention)]


# --- the sparsity constraint and its Lagrange multipliers -----------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass, negated gradient in the backward pass (a minimiser then ascends on ``x``)."""
    return _ReverseGradient.apply(x)


def sparsity(z: torch.Tensor) -> torch.Tensor:
    r"""$\rho_b = 1 - \frac{1}{N}\sum_\ell z_{\ell, b}$: ``z (N, B)`` or ``(N, B, L)`` -> ``(B,)``.

    With per-position decisions ``(N, B, L)`` it is the share of (layer, position) rows that run sparse; for
    per-sample routing every position has the same $z$ and it is the paper's formula.
    """
    check_tensor("z", z)
    if z.dim() not in (2, 3):
        raise ValueError(f"z: expected (layers, batch) or (layers, batch, seq), got shape {tuple(z.shape)}")
    per_layer = z if z.dim() == 2 else z.mean(dim=2)
    return 1 - per_layer.mean(dim=0)


def lagrangian_penalty(rho: torch.Tensor, target, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    r"""$\lambda_1 |\rho - t| + \lambda_2 (\rho - t)^2$, per sample: all broadcast to ``rho (B,)`` -> ``(B,)``."""
    # R = lambda1 |rho - t| + lambda2 (rho - t)^2
    gap = rho - target
    return lambda1 * gap.abs() + lambda2 * gap.pow(2)


def mean_over_tasks(per_sample: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """The code's reduction: the mean within each task present in the batch, then the mean over those tasks."""
    means = [per_sample[task_ids == task].mean() for task in task_ids.unique()]
    return torch.stack(means).mean()


class SparsityConstraint(nn.Module):
    r"""The Lagrange multipliers $\lambda_1, \lambda_2$ (one pair per task) and the penalty they weigh.

    ``forward(z, task_ids)`` returns $\operatorname{mean}_\text{tasks}\operatorname{mean}_{b \in \text{task}}
    [\lambda_1 |\rho_b - t| + \lambda_2(\rho_b - t)^2]$ with $\lambda$ passed through :func:`reverse_gradient`:
    minimising it moves $\lambda$ *up* by the gradient, maximising over $\lambda$ as in the paper.

    Args:
        num_tasks: how many tasks (multiplier pairs).
        target: $t$, the target sparsity (a training loop updates ``self.target``).
        generator: seeds the $U(0, 0.5)$ initialisation of the multipliers.
    """

    def __init__(self, num_tasks: int = 1, *, target: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        check_positive_int("num_tasks", num_tasks)
        _check_number("target", target, low=0.0, high=1.0)
        init = torch.rand(2, num_tasks, generator=generator) * 0.5
        self.lambda1 = nn.Parameter(init[0].clone())
        self.lambda2 = nn.Parameter(init[1].clone())
        self.target = float(target)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, z: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``z (N, B)`` or ``(N, B, L)``, ``task_ids (B,)`` long (default all 0) -> scalar penalty."""
        rho = sparsity(z)
        if task_ids is None:
            task_ids = torch.zeros(rho.shape[0], dtype=torch.long, device=rho.device)
        if task_ids.shape != rho.shape:
            raise ValueError(f"task_ids: expected shape {tuple(rho.shape)} (one per sample), got {tuple(task_ids.shape)}")
        lambda1 = reverse_gradient(self.lambda1)[task_ids]
        lambda2 = reverse_gradient(self.lambda2)[task_ids]
        return mean_over_tasks(lagrangian_penalty(rho, self.target, lambda1, lambda2), task_ids)


class FluxModel(nn.Module):
    """A model with Flux layers plus its :class:`SparsityConstraint`, whose penalty becomes ``aux_loss``.

    ``forward(x, task_ids=None)`` runs ``model(x)``; in training it stacks every layer's ``last_z`` and sets
    ``self.constraint.aux_loss`` to the penalty, which :func:`attnlib.tools.training.train` (or
    :func:`train_flux_router`) adds to the loss.
    """

    def __init__(self, model: nn.Module, num_tasks: int = 1, *, target: float = 0.0, seed: int = 0):
        super().__init__()
        self.model = model
        if not flux_layers(model):
            raise ValueError("model: expected at least one FluxAttention layer (mechanism='flux'), got none")
        self.constraint = SparsityConstraint(num_tasks, target=target, generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x)
        self.constraint.aux_loss = None
        if self.training:
            z = torch.stack([layer.last_z for layer in flux_layers(self.model)])
            self.constraint.aux_loss = self.constraint(z, task_ids)
        return out

    def decisions(self) -> torch.Tensor:
        """The last forward pass's decisions, ``(layers, B, L)``."""
        return torch.stack([layer.last_z.detach() for layer in flux_layers(self.model)])


# --- schedules --------------------------------------------------------------------------------------------------


def temperature(step: int, total_steps: int, *, tau_max: float = 1.5, tau_min: float = 1.0,
                decay_fraction: float = 0.6) -> float:
    r"""The code's cosine schedule: $\tau = \tau_\min + \tfrac12(\tau_\max - \tau_\min)(1 + \cos(\pi s / T))$ for
    $s < T = \lceil 0.6 \cdot \text{total} \rceil$, then $\tau_\min$."""
    check_non_negative_int("step", step)
    check_positive_int("total_steps", total_steps)
    decay = math.ceil(total_steps * decay_fraction)
    if step >= decay:
        return float(tau_min)
    return tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(math.pi * step / decay))


def target_schedule(step: int, total_steps: int, *, target: float, warmup_fraction: float = 0.0,
                    start: float = 0.0) -> float:
    r"""Linear warm-up of the target from ``start`` to ``target`` over $\lceil f \cdot \text{total}\rceil$ steps.

    The code supports it; its training script sets the fraction $f$ to 0 (the target is the final one from the
    first step). Returns $t$ at ``step``.
    """
    check_non_negative_int("step", step)
    check_positive_int("total_steps", total_steps)
    _check_number("target", target, low=0.0, high=1.0)
    _check_number("warmup_fraction", warmup_fraction, low=0.0, high=1.0)
    warmup = math.ceil(warmup_fraction * total_steps)
    if step >= warmup:
        return float(target)
    return start + (target - start) * step / max(warmup, 1)


# --- the toy task mix: far retrieval against local copying ---------------------------------------------------------


class FarRecall(AssociativeRecall):
    r"""Associative recall whose (single, last) query asks for one of the first ``far_pairs`` pairs.

    The answer sits at least $2(n - \text{far\_pairs}) + 1$ tokens before the query, outside a short local window:
    a sparse branch that sees only sinks and the window cannot read it.
    """

    def __init__(self, num_pairs: int = 6, num_keys: int = 8, num_values: int = 8, far_pairs: int = 2):
        super().__init__(num_pairs, num_keys, num_values, num_queries=1)
        check_positive_int("far_pairs", far_pairs)
        if far_pairs > num_pairs:
            raise ValueError(f"far_pairs: expected at most num_pairs={num_pairs}, got {far_pairs}")
        self.far_pairs = far_pairs

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        batch = super().sample(batch_size, generator)
        picked = torch.randint(0, self.far_pairs, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        inputs, targets = batch.inputs.clone(), batch.targets.clone()
        # the query is the last input; its answer the last target
        inputs[:, -1] = inputs[rows, 2 * picked]
        targets[:, -1] = inputs[rows, 2 * picked + 1]
        targets[:, -2] = inputs[:, -1]
        return Batch(inputs, targets, batch.loss_mask)


class LocalCopy(Task):
    r"""Local copying: a string of value tokens; at the last position, repeat the token ``offset`` positions back.

    Same vocabulary and length as a :class:`FarRecall` (so the two mix in one batch), but only value tokens:
    ``inputs`` $x_0 \dots x_{L-1}$, target at the last position $x_{L-1-\text{offset}}$, within a local window.
    """

    def __init__(self, seq_len: int = 13, num_keys: int = 8, num_values: int = 8, offset: int = 2):
        for name, value in (("seq_len", seq_len), ("num_keys", num_keys), ("num_values", num_values),
                            ("offset", offset)):
            check_positive_int(name, value)
        if offset >= seq_len:
            raise ValueError(f"offset: expected less than seq_len={seq_len}, got {offset}")
        self.seq_len, self.num_keys, self.num_values, self.offset = seq_len, num_keys, num_values, offset
        self.vocab_size = self.output_dim = num_keys + num_values

    def __repr__(self) -> str:
        return f"LocalCopy(seq_len={self.seq_len}, offset={self.offset})"

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch_size(batch_size)
        _check_generator(generator)
        inputs = self.num_keys + torch.randint(0, self.num_values, (batch_size, self.seq_len), generator=generator)
        targets = torch.zeros_like(inputs)
        targets[:, -1] = inputs[:, -1 - self.offset]
        loss_mask = torch.zeros_like(inputs, dtype=torch.bool)
        loss_mask[:, -1] = True
        return Batch(inputs, targets, loss_mask)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        answer = torch.full_like(inputs, -1)
        answer[:, self.offset:] = inputs[:, :inputs.shape[1] - self.offset]
        return answer

    def token_labels(self, inputs: torch.Tensor) -> list[str]:
        return [f"v{int(t) - self.num_keys}" for t in inputs]


def sample_mix(tasks: list[Task], batch_size: int, generator: torch.Generator):
    """A batch with ``batch_size`` sequences of *each* task, stacked: ``(Batch, task_ids (len(tasks) * B,))``."""
    if len({(t.seq_len, t.vocab_size) for t in tasks}) != 1:
        raise ValueError("tasks: expected one sequence length and vocabulary for every task, got "
                         f"{[(t.seq_len, t.vocab_size) for t in tasks]}")
    batches = [task.sample(batch_size, generator) for task in tasks]
    ids = torch.cat([torch.full((batch_size,), i, dtype=torch.long) for i in range(len(tasks))])
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("inputs", "targets", "loss_mask"))), ids


# --- training and evaluation ----------------------------------------------------------------------------------------


def set_mode(model: nn.Module, mode: str) -> None:
    """Force every Flux layer of ``model`` to ``"full"``, ``"sparse"`` or back to ``"route"``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    for layer in flux_layers(model):
        layer.mode = mode


def train_flux_router(flux: FluxModel, tasks: list[Task], *, steps: int, target: float, batch_size: int = 32,
                      router_lr: float = 5e-3, qkv_lr: float = 0.0, lambda_lr: float = 1e-3,
                      warmup_fraction: float = 0.0, seed: int = 0) -> dict[str, list]:
    r"""Train the routers (and the multipliers) of a frozen model on a task mix, as the paper's second stage.

    Each step: $\tau$ from :func:`temperature`, $t$ from :func:`target_schedule`, a mixed batch
    (:func:`sample_mix`), loss $= \operatorname{mean}_\text{tasks}\mathcal{L}_\text{task} + \mathcal{R}$ where
    $\mathcal{R}$ is the :class:`SparsityConstraint` penalty (ascent on $\lambda$ through the reversed gradient).
    Parameters outside the routers, the multipliers and (if ``qkv_lr > 0``) the q/k/v projections are frozen.
    Gumbel noise and batches come from generators seeded with ``seed``.

    Returns ``{"step", "loss", "penalty", "sparsity", "tau", "target", "lambda1"}``, one entry per step.
    """
    check_positive_int("steps", steps)
    _check_number("target", target, low=0.0, high=1.0)
    from ..tools.training import masked_loss

    layers = flux_layers(flux.model)
    noise = torch.Generator().manual_seed(seed + 1)
    for layer in layers:
        layer.generator = noise
    routers = [p for layer in layers for p in layer.router.parameters()]
    qkv = [p for layer in layers for proj in (layer.q_proj, layer.k_proj, layer.v_proj) for p in proj.parameters()]
    for p in flux.parameters():
        p.requires_grad_(False)
    groups = [{"params": routers, "lr": router_lr},
              {"params": list(flux.constraint.parameters()), "lr": lambda_lr}]
    if qkv_lr > 0:
        groups.append({"params": qkv, "lr": qkv_lr})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = {k: [] for k in ("step", "loss", "penalty", "sparsity", "tau", "target", "lambda1")}
    flux.train()
    for step in range(steps):
        tau, t = temperature(step, steps), target_schedule(step, steps, target=target, warmup_fraction=warmup_fraction)
        for layer in layers:
            layer.tau = tau
        flux.constraint.target = t
        batch, ids = sample_mix(tasks, batch_size, generator)
        outputs = flux(batch.inputs, ids)
        losses = [masked_loss(outputs[ids == i], Batch(batch.inputs[ids == i], batch.targets[ids == i],
                                                        batch.loss_mask[ids == i]), task.kind)
                  for i, task in enumerate(tasks)]
        loss = torch.stack(losses).mean()
        penalty = flux.constraint.aux_loss
        optimizer.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        optimizer.step()
        with torch.no_grad():
            flux.constraint.lambda1.clamp_(min=0.0)
            flux.constraint.lambda2.clamp_(min=0.0)
        history["step"].append(step + 1)
        history["loss"].append(loss.item())
        history["penalty"].append(penalty.item())
        history["sparsity"].append(sparsity(flux.decisions()).mean().item())
        history["tau"].append(tau)
        history["target"].append(t)
        history["lambda1"].append(flux.constraint.lambda1.detach().clone().tolist())
    for layer in layers:
        layer.generator = None
    for p in flux.parameters():
        p.requires_grad_(True)
    flux.eval()
    return history


@dataclass
class RoutingReport:
    """What :func:`routing_report` measures for each task.

    Attributes:
        full_fraction: ``(tasks, layers)``, the share of samples whose layer runs full attention.
        accuracy: ``{task_index: accuracy}`` with the routers' decisions.
        flops: ``{task_index: (routed FLOPs, all-full FLOPs)}``, attention FLOPs per sequence at inference.
    """

    full_fraction: np.ndarray
    accuracy: dict
    flops: dict

    def saving(self, task: int) -> float:
        """The share of attention FLOPs the routing saves for ``task`` against all-full attention."""
        routed, full = self.flops[task]
        return 1 - routed / full


@torch.no_grad()
def routing_report(flux: FluxModel, tasks: list[Task], *, num_sequences: int = 512, seed: int = 12345) -> RoutingReport:
    """Evaluate the routed model on fresh sequences of each task: decisions per layer, accuracy, attention FLOPs.

    FLOPs count, per layer and sequence, the (query, key) pairs of the branch that runs: the causal triangle for
    full attention, the streaming mask for sparse attention (a kernel skipping masked entries).
    """
    flux.eval()
    generator = torch.Generator().manual_seed(seed)
    layers = flux_layers(flux.model)
    fractions, accuracy, flops = [], {}, {}
    for index, task in enumerate(tasks):
        batch = task.sample(num_sequences, generator)
        outputs = flux(batch.inputs)
        accuracy[index] = task.score(task.predictions_from_outputs(outputs), batch)
        z = flux.decisions()[:, :, -1]  # (layers, B): the decision at the last position
        fractions.append(z.mean(dim=1).numpy())
        length = batch.inputs.shape[1]
        full_cost = [attention_flops(streaming_mask(length, sink=length, window=length), l.head_dim, l.num_heads)
                     for l in layers]
        sparse_cost = [attention_flops(streaming_mask(length, sink=l.sink, window=l.window), l.head_dim, l.num_heads)
                       for l in layers]
        # per sequence: each layer pays for the branch it runs
        routed = sum(z[i] * full_cost[i] + (1 - z[i]) * sparse_cost[i] for i in range(len(layers)))
        routed = float(routed.mean())
        flops[index] = (routed, float(sum(full_cost)))
    return RoutingReport(np.stack(fractions), accuracy, flops)


# --- pictures ----------------------------------------------------------------------------------------------------


def plot_routing(full_fraction, *, task_names: list[str], title: str | None = None, ax=None):
    """Bar chart of the share of samples routed to full attention, per layer (x) and task (bars)."""
    fractions = np.asarray(full_fraction, dtype=float)
    if fractions.ndim != 2 or fractions.shape[0] != len(task_names):
        raise ValueError(f"full_fraction: expected (tasks, layers) with {len(task_names)} tasks, got shape "
                         f"{fractions.shape}")
    ax = _axes(ax, size=(5.2, 3.4))
    layers = np.arange(fractions.shape[1])
    width = 0.8 / len(task_names)
    for i, name in enumerate(task_names):
        ax.bar(layers + (i - (len(task_names) - 1) / 2) * width, fractions[i], width, label=name)
    ax.set_xticks(layers)
    ax.set_xticklabels([f"layer {l}" for l in layers])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share routed to full attention")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax
