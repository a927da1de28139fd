r"""Lesson 14: steering by heads, HeadHunter and SoftPAG, P08.

Paper: D. Ahn, J. Kang, S. Lee, M. Kim, W. Jang, J. Min, S. Lee, S. Paul, S. Kim, *Fine-Grained
Perturbation Guidance via Attention Head Selection* (2025, arXiv:2506.10978), retitled *Where and How to
Perturb: On the Design of Perturbation Guidance in Diffusion and Flow Models* (NeurIPS 2025).

**Guidance with a weak model.** A generative model gives a prediction $\epsilon_c$ (a diffusion model's
noise, or here an autoregressive model's next-token logits). A *weaker* version of the same model gives
$\epsilon_\text{ptb}$, and sampling follows

$$\hat\epsilon = \epsilon_c + s\,(\epsilon_c - \epsilon_\text{ptb}),$$

which moves away from what the weak model would do. Perturbed-attention guidance (PAG) makes the weak model
by replacing attention maps with the identity, $A \to I$, so that those heads copy each token's own value
and lose their context.

**Heads, not layers (HeadHunter).** Perturb only a set $S$ of (layer, head) pairs. Different heads give
different effects, and a greedy search picks the set: in each round every remaining head $c$ is tried
in $S \cup \{c\}$, scored by an objective, and the best ``per_round`` heads are added to $S$.

**SoftPAG.** Interpolate each selected head's map towards a target $T$ with a weight $u_h \in [0, 1]$:

$$A'_h = (1 - u_h)\,A_h + u_h\,T, \qquad
  \text{out}_h = A'_h V_h = (1 - u_h)\,\operatorname{softmax}(s\,Q_hK_h^\top)\,V_h + u_h\,T V_h .$$

For $T = I$, $T V_h = V_h$, and for the uniform map over the visible keys, $T V_h$ is the mean of the
visible values (the running mean under a causal mask, a cumulative sum in $O(Ld)$). Neither builds an $L \times L$
target matrix; only a mask other than the plain causal one makes the uniform target a masked $L \times L$ product.

Shapes follow the course: ``(batch, heads, seq, head_dim)`` inside, ``(batch, seq, dim)`` for the module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import nn

from .._checks import check_positive_int, check_qkv, check_scale, check_tensor
from ..core import attention, compute_dtype, repeat_kv
from ..masks import causal_mask
from ..modules import MultiHeadAttention
from ..registry import register_mechanism
from ..tools.progress import Progress

TARGETS = ("identity", "uniform")


# --- checks ------------------------------------------------------------------------------------------


def check_target(target) -> None:
    """``target`` is one of :data:`TARGETS`."""
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")


def as_head_weights(u, num_heads: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    r"""The per-head interpolation weights $u_h$ as a ``(num_heads,)`` tensor, each in $[0, 1]$.

    ``u`` may be a number (the same for every head), a sequence or a 1-d tensor of ``num_heads`` numbers.
    """
    if isinstance(u, bool):
        raise TypeError(f"u: expected a number or {num_heads} numbers in [0, 1], got a bool")
    if isinstance(u, (int, float)):
        u = torch.full((num_heads,), float(u), dtype=dtype, device=device)
    elif isinstance(u, torch.Tensor):
        if u.dim() != 1 or u.shape[0] != num_heads:
            raise ValueError(f"u: expected shape ({num_heads},) (one weight per head), got {tuple(u.shape)}")
        if not u.is_floating_point():
            raise TypeError(f"u: expected a floating-point tensor, got {u.dtype}")
        u = u.to(dtype=dtype, device=device)
    elif isinstance(u, (list, tuple)):
        if len(u) != num_heads:
            raise ValueError(f"u: expected {num_heads} weights (one per head), got {len(u)}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in u):
            raise TypeError(f"u: expected numbers, got {u!r}")
        u = torch.tensor([float(x) for x in u], dtype=dtype, device=device)
    else:
        raise TypeError(f"u: expected a number, a sequence or a tensor of {num_heads} numbers, got {type(u).__name__}")
    if not torch.isfinite(u).all() or (u < 0).any() or (u > 1).any():
        raise ValueError(f"u: expected every weight in [0, 1], got {u.tolist()}")
    return u


# --- the mechanism as functions -------------------------------------------------------------------------


def allowed_keys(lq: int, lk: int, *, mask: torch.Tensor | None, causal: bool, device=None) -> torch.Tensor | None:
    """The boolean ``(…, Lq, Lk)`` map of keys each query may see (``None`` when all are allowed)."""
    allowed = mask
    if causal:
        c = causal_mask(lq, lk, device=device)
        allowed = c if allowed is None else allowed & c
    return allowed


def target_times_values(v: torch.Tensor, target: str, *, allowed: torch.Tensor | None, lq: int,
                        causal_only: bool = False) -> torch.Tensor:
    r"""$T V$ for a target map $T$, without building $T$ (``v (B, H, Lk, Dv) -> (B, H, Lq, Dv)``).

    * ``"identity"``: $T = I$ (restricted to the allowed keys), so $(TV)_i = v_i$; query $i$ is key $i$
      (self-attention, ``Lq == Lk``). If the mask forbids the diagonal the row gets zero.
    * ``"uniform"``: $T_{ij} = 1/|\mathcal A_i|$ on the allowed keys $\mathcal A_i$, so $(TV)_i$ is the
      mean of the allowed values; a row with no allowed key gets zero. With only the causal mask it is the
      running mean $\frac{1}{i+1}\sum_{j \le i} v_j$, which ``causal_only=True`` (``allowed`` is just the causal
      mask) computes as a cumulative sum in $O(Ld)$; any other mask takes a masked $L \times L$ product.
    """
    lk = v.shape[-2]
    if target == "identity":
        if lq != lk:
            raise ValueError(f"target: the identity target needs self-attention (as many queries as keys), "
                             f"got {lq} queries and {lk} keys")
        if allowed is None:
            return v
        # keep v_i where query i may see key i
        diagonal = torch.diagonal(allowed.expand(*allowed.shape[:-2], lq, lk), dim1=-2, dim2=-1)
        return v * diagonal[..., None].to(v.dtype)
    if allowed is None:
        return v.mean(dim=-2, keepdim=True).expand(*v.shape[:-2], lq, v.shape[-1])
    if causal_only:
        # query i sees keys j <= i + Lk - Lq (bottom-right aligned): the running mean, a cumulative sum over a count
        last = torch.arange(lq, device=v.device) + (lk - lq)
        seen = last.clamp(min=-1) + 1  # keys each query sees; 0 for a query before the first key
        sums = v.cumsum(dim=-2)[..., last.clamp(min=0), :]
        counts = seen.to(v.dtype)[:, None]
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    # (T V)_i = sum_{j allowed} v_j / |allowed_i|, zero where nothing is allowed
    weights = allowed.to(v.dtype).expand(*v.shape[:-2], lq, lk)
    counts = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v) / torch.where(counts > 0, counts, torch.ones_like(counts))


def target_map(target: str, lq: int, lk: int, *, allowed: torch.Tensor | None = None,
               dtype=torch.float32, device=None) -> torch.Tensor:
    """The dense target map $T$ ``(…, Lq, Lk)``; for pictures and tests only (the mechanism never builds it)."""
    check_target(target)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device) if allowed is None else allowed
    keep = keep.to(device)
    if target == "identity":
        return (torch.eye(lq, lk, dtype=dtype, device=device) * keep).to(dtype)
    t = keep.to(dtype)
    counts = t.sum(dim=-1, keepdim=True)
    return t / torch.where(counts > 0, counts, torch.ones_like(counts))


def perturbed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u, *, target: str = "identity",
                        mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                        return_weights: bool = False):
    r"""Per-head perturbed attention (SoftPAG): $\text{out}_h = (1-u_h)\,\operatorname{softmax}(sQ_hK_h^\top)V_h + u_h\,TV_h$.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``; ``Hkv`` divides ``H`` (grouped-query attention).
        v: values ``(B, Hkv, Lk, Dv)``.
        u: per-head weights $u_h \in [0, 1]$: a number, or ``H`` numbers. ``u = 0`` is plain attention,
            ``u = 1`` with ``target="identity"`` is PAG's identity map (the head outputs ``V``).
        target: ``"identity"`` ($T = I$, PAG) or ``"uniform"`` (equal weight on every visible key).
        mask: boolean, broadcastable to ``(B, H, Lq, Lk)``; ``True`` = may attend. The targets respect it.
        causal: also apply the causal mask (the identity target is causal by itself).
        scale: multiplies $QK^\top$; default $1/\sqrt D$.
        return_weights: also return the effective map $A' = (1-u)A + uT$ ``(B, H, Lq, Lk)`` (built densely,
            for pictures; the output itself never builds $T$).

    Returns:
        ``out (B, H, Lq, Dv)`` (and the weights with ``return_weights``).
    """
    b, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_target(target)
    check_scale(scale)
    u = as_head_weights(u, hq, dtype=compute_dtype(q.dtype), device=q.device)
    plain, weights = attention(q, k, v, mask=mask, causal=causal, scale=scale, return_weights=True)
    allowed = allowed_keys(lq, lk, mask=mask, causal=causal, device=q.device)
    v_all = repeat_kv(v, hq // hkv).to(plain.dtype)
    u4 = u.view(1, hq, 1, 1)
    # out_h = (1 - u_h) softmax(s Q K^T) V + u_h T V
    perturbed = target_times_values(v_all, target, allowed=allowed, lq=lq, causal_only=mask is None and causal)
    out = (1 - u4) * plain.to(u4.dtype) + u4 * perturbed.to(u4.dtype)
    out = out.to(q.dtype)
    if not return_weights:
        return out
    t = target_map(target, lq, lk, allowed=allowed, dtype=weights.dtype, device=q.device)
    # A' = (1 - u) A + u T
    return out, (1 - u4.to(weights.dtype)) * weights + u4.to(weights.dtype) * t


def perturbed_attention_naive(q, k, v, u, *, target: str = "identity", causal: bool = False, scale=None):
    r"""The oracle: loops over batch, head and query, in float64, exactly as $A' = (1-u)A + uT$, $o = A'V$ reads.

    Builds the perturbed row $a'_j = (1-u_h)\,a_j + u_h\,t_j$ over the visible keys and sums $a'_j v_j$.
    Self-attention only (``Lq == Lk``), no extra mask. Shapes as in :func:`perturbed_attention`.
    """
    bsz, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    check_target(target)
    u = as_head_weights(u, hq, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(bsz, hq, lq, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(lq):
                visible = [j for j in range(lk) if not causal or j <= i + lk - lq]
                scores = torch.stack([scale * torch.dot(q[b, h, i], k[b, g, j]) for j in visible])
                a = torch.softmax(scores, dim=0)
                if target == "identity":
                    t = torch.tensor([1.0 if j == i else 0.0 for j in visible], dtype=torch.float64)
                else:
                    t = torch.full((len(visible),), 1.0 / len(visible), dtype=torch.float64)
                row = (1 - u[h]) * a + u[h] * t
                out[b, h, i] = sum(row[n] * v[b, g, j] for n, j in enumerate(visible))
    return out


# --- the module --------------------------------------------------------------------------------------------


class PerturbedMultiHeadAttention(MultiHeadAttention):
    r"""Multi-head attention whose heads can be perturbed towards a target map (SoftPAG, P08).

    A token mixer ``(B, L, dim) -> (B, L, dim)`` with the weights of :class:`~attnlib.MultiHeadAttention`
    and a per-head weight buffer ``perturbation`` $u \in [0,1]^H$ (all zero by default: plain attention).
    Head $h$ computes $(1-u_h)\operatorname{softmax}(sQ_hK_h^\top)V_h + u_h TV_h$, then the heads are
    concatenated and projected by $W^O$ as usual.

    Args:
        dim, num_heads, num_kv_heads, causal, backend, bias: as in :class:`~attnlib.MultiHeadAttention`.
        perturbation: initial $u$, a number or ``num_heads`` numbers (default 0: unperturbed).
        target: ``"identity"`` (PAG) or ``"uniform"``.

    With every $u_h = 0$ the forward pass is exactly the parent's (any backend). A perturbed pass uses the
    reference path; ``last_weights`` then keeps the *unperturbed* softmax map $A$.
    """

    def __init__(self, dim: int, num_heads: int, *, perturbation=0.0, target: str = "identity", **options):
        super().__init__(dim, num_heads, **options)
        check_target(target)
        self.target = target
        self.register_buffer("perturbation", as_head_weights(perturbation, num_heads), persistent=False)

    def set_perturbation(self, u, target: str | None = None) -> None:
        """Set the per-head weights $u$ (a number or ``num_heads`` numbers) and, optionally, the target."""
        if target is not None:
            check_target(target)
            self.target = target
        self.perturbation = as_head_weights(u, self.num_heads, device=self.perturbation.device)

    @contextlib.contextmanager
    def perturbed(self, u, target: str | None = None):
        """Temporarily perturb: ``with mixer.perturbed([0, 1, 0, 0]): ...``; restores the previous state."""
        saved = (self.perturbation.clone(), self.target)
        self.set_perturbation(u, target)
        try:
            yield self
        finally:
            self.perturbation, self.target = saved

    def extra_repr(self) -> str:
        return f"target={self.target!r}, perturbation={[round(x, 3) for x in self.perturbation.tolist()]}"

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        if not bool(self.perturbation.any()):
            return super().forward(x, mask=mask, return_weights=return_weights)
        q, k, v = self.project(x)
        out, plain_weights = self._perturbed_heads(q, k, v, mask)
        self.last_weights = plain_weights.detach()
        out = self.merge_heads(out)
        if return_weights:
            u4 = self.perturbation.view(1, -1, 1, 1).to(plain_weights.dtype)
            allowed = allowed_keys(x.shape[1], x.shape[1], mask=mask, causal=self.causal, device=x.device)
            t = target_map(self.target, x.shape[1], x.shape[1], allowed=allowed, dtype=plain_weights.dtype,
                           device=x.device)
            return out, (1 - u4) * plain_weights + u4 * t
        return out

    def _perturbed_heads(self, q, k, v, mask):
        # the same arithmetic as perturbed_attention, keeping the plain map for last_weights
        plain, weights = attention(q, k, v, mask=mask, causal=self.causal, return_weights=True)
        lq = q.shape[2]
        allowed = allowed_keys(lq, k.shape[2], mask=mask, causal=self.causal, device=q.device)
        v_all = repeat_kv(v, self.num_heads // self.num_kv_heads)
        u4 = self.perturbation.view(1, -1, 1, 1).to(plain.dtype)
        # out_h = (1 - u_h) A_h V_h + u_h T V_h
        perturbed = target_times_values(v_all, self.target, allowed=allowed, lq=lq,
                                        causal_only=mask is None and self.causal)
        out = (1 - u4) * plain + u4 * perturbed
        return out, weights


@register_mechanism("mha-perturbed", paper="P08", lesson="14", supports_causal=True,
                    summary="multi-head attention with per-head SoftPAG perturbation towards identity/uniform "
                            "maps (off by default)")
def build_perturbed_mha(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return PerturbedMultiHeadAttention(dim, num_heads, causal=causal, **options)


# --- heads of a whole model ------------------------------------------------------------------------------


def perturbable_layers(model: nn.Module) -> list[PerturbedMultiHeadAttention]:
    """The :class:`PerturbedMultiHeadAttention` mixers of ``model``, in order (layer 0 first)."""
    layers = [m for m in model.modules() if isinstance(m, PerturbedMultiHeadAttention)]
    if not layers:
        raise ValueError("model: expected at least one PerturbedMultiHeadAttention (build it with "
                         "mechanism='mha-perturbed'), found none")
    return layers


def all_heads(model: nn.Module) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` pair of ``model``'s perturbable mixers."""
    return [(layer, h) for layer, m in enumerate(perturbable_layers(model)) for h in range(m.num_heads)]


@contextlib.contextmanager
def perturb_heads(model: nn.Module, heads: Iterable[tuple[int, int]], u: float = 1.0, target: str = "identity"):
    r"""Temporarily perturb the ``(layer, head)`` pairs ``heads`` of ``model`` with weight ``u`` (SoftPAG).

    Every other head stays unperturbed; the previous state is restored on exit.
    """
    layers = perturbable_layers(model)
    check_target(target)
    weights = [torch.zeros(m.num_heads) for m in layers]
    for pair in heads:
        if not (isinstance(pair, tuple) and len(pair) == 2 and 0 <= pair[0] < len(layers)
                and 0 <= pair[1] < layers[pair[0]].num_heads):
            raise ValueError(f"heads: expected (layer, head) pairs with layer < {len(layers)} and head < "
                             f"{layers[0].num_heads}, got {pair!r}")
        weights[pair[0]][pair[1]] = 1.0
    u_checked = float(as_head_weights(u, 1)[0])
    with contextlib.ExitStack() as stack:
        for m, w in zip(layers, weights):
            stack.enter_context(m.perturbed(w * u_checked, target))
        yield model


# --- guidance ----------------------------------------------------------------------------------------------


def guided_prediction(cond: torch.Tensor, perturbed: torch.Tensor, scale: float, *,
                      uncond: torch.Tensor | None = None, cfg_scale: float | None = None) -> torch.Tensor:
    r"""Perturbation guidance: $\hat\epsilon = \epsilon_c + s\,(\epsilon_c - \epsilon_\text{ptb})$.

    With ``uncond`` and ``cfg_scale`` $w$ as well (classifier-free guidance on top, as in the paper's
    pipeline): $\hat\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u) + s(\epsilon_c - \epsilon_\text{ptb})$.

    Shapes: any, the same for every prediction (noise, velocity, or next-token logits).
    """
    check_tensor("cond", cond)
    check_tensor("perturbed", perturbed)
    if perturbed.shape != cond.shape:
        raise ValueError(f"perturbed: expected shape {tuple(cond.shape)} (as cond), got {tuple(perturbed.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite number, got {scale!r}")
    if (uncond is None) != (cfg_scale is None):
        raise ValueError("uncond, cfg_scale: expected both (classifier-free guidance on top) or neither, "
                         f"got uncond={'a tensor' if uncond is not None else None}, cfg_scale={cfg_scale!r}")
    # eps_c + s (eps_c - eps_ptb)
    guidance = scale * (cond - perturbed)
    if uncond is None:
        return cond + guidance
    check_tensor("uncond", uncond)
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond: expected shape {tuple(cond.shape)} (as cond), got {tuple(uncond.shape)}")
    # eps_u + w (eps_c - eps_u) + s (eps_c - eps_ptb)
    return uncond + cfg_scale * (cond - uncond) + guidance


# --- HeadHunter: greedy, iterative head selection ---------------------------------------------------------------


def greedy_head_search(candidates: Sequence[Hashable], objective: Callable[[list], float], *, rounds: int,
                       per_round: int, initial: Sequence[Hashable] = ()) -> tuple[list, list[dict]]:
    r"""HeadHunter's search (P08, Algorithm 1): greedy rounds of "try each remaining head, keep the best".

    Round $r$: for each remaining candidate $c$, score $O(S \cup \{c\})$; sort the scores in descending
    order (ties keep the candidates' order) and add the top ``per_round`` candidates to $S$, removing
    them from the pool. Higher ``objective`` is better.

    Args:
        candidates: the pool, e.g. ``(layer, head)`` pairs; distinct, hashable.
        objective: ``objective(heads: list) -> float`` for a candidate set (in selection order).
        rounds: number of rounds $R$.
        per_round: heads added per round $k$.
        initial: heads already selected (not in the pool).

    Returns:
        ``(selected, history)``: the selected heads in order, and one dict per round with
        ``"scores"`` (candidate -> score of $S \cup \{c\}$) and ``"added"`` (the heads added).
    """
    candidates = list(candidates)
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates: expected distinct candidates, got {candidates!r}")
    check_positive_int("rounds", rounds)
    check_positive_int("per_round", per_round)
    selected = list(initial)
    pool = [c for c in candidates if c not in selected]
    if rounds * per_round > len(pool):
        raise ValueError(f"rounds, per_round: {rounds} rounds of {per_round} need {rounds * per_round} heads, "
                         f"the pool has {len(pool)}")
    history = []
    for _ in range(rounds):
        scores = {}
        for c in pool:
            score = objective(selected + [c])
            if isinstance(score, torch.Tensor) and score.numel() == 1:
                score = score.item()
            if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
                raise TypeError(f"objective: expected a number for {selected + [c]}, got {score!r}")
            scores[c] = float(score)
        # sort descending; sorted() is stable, so ties keep the pool's order
        ranked = sorted(pool, key=lambda c: -scores[c])
        added = ranked[:per_round]
        selected += added
        pool = [c for c in pool if c not in added]
        history.append({"scores": scores, "added": added})
    return selected, history


# --- a toy generative model: autoregressive 8x8 digits ------------------------------------------------------


DIGIT_PIXELS = 64


def digit_tokens(levels: int = 4, pixels_per_token: int = 2):
    r"""scikit-learn's 8x8 digits as token sequences for an autoregressive model.

    Each image's 64 intensities $x \in \{0..16\}$ are quantised to ``levels`` grey levels,
    $g = \min(\lfloor x \cdot \text{levels} / 17 \rfloor, \text{levels} - 1)$; each run of
    ``pixels_per_token`` consecutive pixels (raster order) becomes one token
    $\sum_i g_i\,\text{levels}^{p-1-i}$, and the class $c$ is prepended as token ``levels**p + c``.

    Returns ``(sequences (N, 1 + 64 / p) long, labels (N,) long)``; the vocabulary has ``levels**p + 10``
    tokens, the first ``levels**p`` of them pixel tokens.
    """
    from sklearn.datasets import load_digits

    check_positive_int("levels", levels)
    check_positive_int("pixels_per_token", pixels_per_token)
    if DIGIT_PIXELS % pixels_per_token:
        raise ValueError(f"pixels_per_token: expected a divisor of {DIGIT_PIXELS}, got {pixels_per_token}")
    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    grey = torch.clamp((pixels * levels / 17).long(), max=levels - 1)
    place = levels ** torch.arange(pixels_per_token - 1, -1, -1)
    tokens = (grey.view(-1, DIGIT_PIXELS // pixels_per_token, pixels_per_token) * place).sum(-1)
    return torch.cat([(levels ** pixels_per_token + labels)[:, None], tokens], dim=1), labels


def tokens_to_images(tokens: torch.Tensor, levels: int = 4, pixels_per_token: int = 2) -> torch.Tensor:
    """Pixel tokens ``(N, 64 / p)`` (no class token) back to grey images ``(N, 8, 8)`` in ``[0, 1]``."""
    check_tensor("tokens", tokens, ndim=2, floating=False)
    if tokens.shape[1] * pixels_per_token != DIGIT_PIXELS:
        raise ValueError(f"tokens: expected {DIGIT_PIXELS // pixels_per_token} pixel tokens per row, "
                         f"got shape {tuple(tokens.shape)}")
    place = levels ** torch.arange(pixels_per_token - 1, -1, -1)
    grey = (tokens[..., None] // place) % levels
    return grey.reshape(-1, 8, 8).float() / (levels - 1)


def train_autoregressive(model: nn.Module, sequences: torch.Tensor, *, steps: int, batch_size: int = 64,
                         lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Next-token training on ``sequences (N, L)`` (every position after the first is a target); returns the losses."""
    check_positive_int("steps", steps)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    bar = Progress(steps, "training")  # a bar in Jupyter, nothing elsewhere
    for step in range(1, steps + 1):
        rows = torch.randint(0, sequences.shape[0], (batch_size,), generator=generator)
        batch = sequences[rows]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(step, loss=sum(losses[-20:]) / len(losses[-20:]))
    bar.close()
    model.eval()
    return losses


class CachedDecoder:
    r"""Token-by-token decoding of a causal :class:`~attnlib.TinyTransformer` built with ``"mha-perturbed"``.

    Sampling $L$ tokens by re-running the whole prefix costs $O(L^2)$ token passes; keeping each layer's
    keys and values (a *KV cache*) makes every step one token's pass. For a perturbed head the step is the
    same formula as the full pass, $(1-u_h)\,\operatorname{softmax}(q_t K_{\le t}^\top s)V_{\le t} + u_h (TV)_t$,
    with $(TV)_t = v_t$ (identity) or the mean of $v_{\le t}$ (uniform), so the cached decoder gives the same
    logits as ``model(x)`` (a test checks it). The perturbation in force when :meth:`step` runs is used.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = perturbable_layers(model)
        if len(self.layers) != len(getattr(model, "blocks", ())) or not all(m.causal for m in self.layers):
            raise ValueError("model: expected a causal TinyTransformer whose every mixer is 'mha-perturbed'")
        self.keys: list[torch.Tensor | None] = [None] * len(self.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.layers)
        self.position = 0

    def _attend(self, layer: int, mixer: PerturbedMultiHeadAttention, z: torch.Tensor) -> torch.Tensor:
        q = mixer.split_heads(mixer.q_proj(z), mixer.num_heads)  # (B, H, 1, d)
        k = mixer.split_heads(mixer.k_proj(z), mixer.num_kv_heads)
        v = mixer.split_heads(mixer.v_proj(z), mixer.num_kv_heads)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        # every cached key is at or before the new token: no mask needed
        out = attention(q, k, v)
        u = mixer.perturbation.view(1, -1, 1, 1).to(out.dtype)
        if bool(u.any()):
            v_all = repeat_kv(v, mixer.num_heads // mixer.num_kv_heads)
            target = v_all[:, :, -1:] if mixer.target == "identity" else v_all.mean(dim=2, keepdim=True)
            # (1 - u) A V + u T V, for the newest query only
            out = (1 - u) * out + u * target
        return mixer.out_proj(out.transpose(1, 2).reshape(z.shape[0], 1, -1))

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token (B,)`` at the next position; returns that position's outputs ``(B, output_dim)``."""
        model = self.model
        if self.position >= model.max_len:
            raise ValueError(f"token: the model has only max_len={model.max_len} positions")
        h = model.embed(token[:, None]) + model.pos[self.position]
        for layer, block in enumerate(model.blocks):
            h = h + self._attend(layer, block.mixer, block.norm1(h))
            h = h + block.mlp(block.norm2(h))
        self.position += 1
        return model.head(model.norm(h))[:, 0]


@torch.no_grad()
def sample_guided(model: nn.Module, prompts: torch.Tensor, length: int, *, heads: Sequence = (),
                  u: float = 1.0, target: str = "identity", scale: float = 0.0, allowed_tokens: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    r"""Sample ``length`` tokens after ``prompts (B, P)`` with perturbation guidance on the logits.

    At each step $z = z_c + s\,(z_c - z_\text{ptb})$, where $z_\text{ptb}$ comes from the same model with
    ``heads`` perturbed (weight ``u``, ``target``) and its own cache (the weak model's earlier positions are
    perturbed too); ``scale = 0`` or no heads is plain sampling. Only the first ``allowed_tokens`` ids can be
    drawn (the pixel tokens). Seeded: the same ``seed`` gives the same samples. Returns ``(B, P + length)``.
    """
    check_tensor("prompts", prompts, ndim=2, floating=False)
    check_positive_int("length", length)
    if prompts.shape[1] + length - 1 > model.max_len:
        raise ValueError(f"length: prompts of {prompts.shape[1]} tokens plus {length} new ones need "
                         f"{prompts.shape[1] + length - 1} positions, the model has {model.max_len}")
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    guide = len(heads) > 0 and scale != 0
    strong, weak = CachedDecoder(model), CachedDecoder(model)
    x = prompts.clone()
    for position in range(prompts.shape[1] + length - 1):
        token = x[:, position]
        logits = strong.step(token)
        if guide:
            with perturb_heads(model, heads, u=u, target=target):
                weak_logits = weak.step(token)
            # z = z_c + s (z_c - z_ptb)
            logits = guided_prediction(logits, weak_logits, scale)
        if position + 1 < prompts.shape[1]:
            continue  # still reading the prompt
        if allowed_tokens is not None:
            logits = logits[:, :allowed_tokens]
        new = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)
        x = torch.cat([x, new], dim=1)
    return x
