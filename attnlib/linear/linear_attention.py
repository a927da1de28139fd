r"""Lesson 30: linear attention and Flowformer, P29.

**Linear attention** (Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", arXiv 2006.16236) replaces the softmax similarity
$\exp(q_i \cdot k_j)$ by a product of non-negative features $\phi(q_i)\cdot\phi(k_j)$. Then, by
associativity of the matrix product,

$$O = \frac{\big(\phi(Q)\phi(K)^\top\big)V}{\phi(Q)\phi(K)^\top\mathbf 1}
    = \frac{\phi(Q)\big(\phi(K)^\top V\big)}{\phi(Q)\big(\phi(K)^\top\mathbf 1\big)},$$

and the $L\times S$ matrix is never formed: $O(L\,d\,d_v)$ work instead of $O(L\,S\,d)$. Causally the
sums run over $j\le i$, which is a recurrence (an RNN) with a $d\times d_v$ state:

$$S_i = S_{i-1} + \phi(k_i)^\top v_i,\qquad z_i = z_{i-1} + \phi(k_i),\qquad
  o_i = \frac{\phi(q_i) S_i}{\phi(q_i)\cdot z_i + \varepsilon}.$$

The **chunked** form cuts the sequence into chunks of $C$ tokens: inside a chunk the quadratic causal
form, between chunks the running state: $O_t = Q_t S_{t-1} + \operatorname{tril}(Q_tK_t^\top)V_t$.

**Flow-Attention** (Wu et al., 2022, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022, arXiv 2202.06258) reads attention as a flow network from sources (keys/values) to sinks
(queries/results), with $\phi=\sigma$ (sigmoid). With $\tilde q_i = \phi(q_i)$, $\tilde k_j=\phi(k_j)$:

$$I_i = \tilde q_i\cdot\textstyle\sum_j \tilde k_j \ \text{(incoming flow of sink } i),\qquad
  O_j = \tilde k_j\cdot\sum_i \tilde q_i \ \text{(outgoing flow of source } j),$$
$$\hat I_i = \tilde q_i\cdot\textstyle\sum_j \tilde k_j / O_j,\qquad
  \hat O_j = \tilde k_j\cdot\sum_i \tilde q_i / I_i \quad\text{(conserved flows)},$$
$$\hat V = \operatorname{softmax}(\hat O)\odot V \ \text{(competition)},\qquad
  A = \frac{\tilde Q}{I}\big(\tilde K^\top \hat V\big),\qquad
  R = \sigma(\hat I)\odot A \ \text{(allocation)}.$$

The numerics follow the official code (thuml/Flowformer, ``Flow_Attention.py``): $\varepsilon=10^{-6}$ is
added to each factor of every dot product, the competition is $S\cdot\operatorname{softmax}(\hat O)$ (mean
weight one), the allocation $\sigma(\hat I\,L/S)$, and $\hat O$ is clipped to $[-1, 1]$ "for stability".
``variant="paper"`` drops those three changes (the equations as the paper writes them). The causal
version turns every sum into a prefix sum and rescales by the number of terms $i$; see
:func:`flow_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_backend, check_bool, check_positive_int, check_qkv
from ..core import compute_dtype
from ..modules import MultiHeadAttention
from ..registry import register_mechanism

FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020
    "sigmoid": torch.sigmoid,  # Flowformer
    "relu": torch.relu,
}
VARIANTS = ("code", "paper")
DEFAULT_CHUNK = 64


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def check_feature_map(feature_map):
    """Return the callable for ``feature_map`` (a name of :data:`FEATURE_MAPS` or a callable)."""
    if callable(feature_map):
        return feature_map
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
    return FEATURE_MAPS[feature_map]


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")


def _normalise(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0: with non-negative features a zero
    normaliser means every weight of the row is 0 (the course's rule: a row that sees nothing gives zeros, never
    NaN; it can happen with ``eps=0`` and the ``relu`` map)."""
    empty = denominator == 0
    return torch.where(empty, torch.zeros_like(numerator), numerator / torch.where(empty, 1.0, denominator))


def _check_causal_qkv(q, k, v, causal: bool) -> None:
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"k: expected as many heads as q ({q.shape[1]}), got {k.shape[1]}")
    check_bool("causal", causal)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"k: causal attention needs as many keys as queries ({q.shape[2]}), got {k.shape[2]}")


def _check_product_inputs(q, k, v) -> None:
    """The causal products take ``q, k (B, H, L, D)`` and ``v (B, H, L, Dv)``: one length, one number of heads."""
    _check_causal_qkv(q, k, v, True)


# ------------------------------------------------------------------------------------------------
# causal products: three forms of the same numbers
# ------------------------------------------------------------------------------------------------


def causal_product_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""$y_i = q_i S_i$ with the running state $S_i = S_{i-1} + k_i^\top v_i$ (the RNN view; a loop).

    Shapes: q, k ``(B, H, L, D)``, v ``(B, H, L, Dv)``; returns ``(B, H, L, Dv)``. No feature map, no
    normalisation: $y_i = \sum_{j\le i} (q_i\cdot k_j)\, v_j$.
    """
    _check_product_inputs(q, k, v)
    b, h, length, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    outputs = []
    for i in range(length):
        # S_i = S_{i-1} + k_i^T v_i
        state = state + k[:, :, i, :, None] * v[:, :, i, None, :]
        # y_i = q_i S_i
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, :, i], state))
    return torch.stack(outputs, dim=2) if outputs else v.new_zeros(b, h, 0, v.shape[-1])


def causal_product_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""$Y = \operatorname{tril}(QK^\top)\,V$: the $L\times L$ form. Shapes as :func:`causal_product_recurrent`."""
    _check_product_inputs(q, k, v)
    length = q.shape[2]
    keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return (q @ k.transpose(-1, -2)).masked_fill(~keep, 0.0) @ v


def causal_product_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
                           ) -> torch.Tensor:
    r"""The chunked form: $Y_t = Q_t S_{t-1} + \operatorname{tril}(Q_tK_t^\top)V_t$, $S_t = S_{t-1} + K_t^\top V_t$.

    $L/C$ steps of $O(C^2 d + C d d_v)$: linear in $L$, with $C\times C$ and $d\times d_v$ matrix products
    (what a GPU is good at). Shapes as :func:`causal_product_recurrent`; any ``chunk_size >= 1``.
    """
    _check_product_inputs(q, k, v)
    check_positive_int("chunk_size", chunk_size)
    b, h, length, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    keep = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for start in range(0, length, chunk_size):
        qt, kt, vt = (x[:, :, start:start + chunk_size] for x in (q, k, v))
        c = qt.shape[2]
        # intra-chunk: tril(Q_t K_t^T) V_t ; inter-chunk: Q_t S_{t-1}
        local = (qt @ kt.transpose(-1, -2)).masked_fill(~keep[:c, :c], 0.0) @ vt
        outputs.append(local + qt @ state)
        # S_t = S_{t-1} + K_t^T V_t
        state = state + kt.transpose(-1, -2) @ vt
    return torch.cat(outputs, dim=2) if outputs else v.new_zeros(b, h, 0, v.shape[-1])


def causal_product(q, k, v, *, backend: str = "reference", chunk_size: int | None = None) -> torch.Tensor:
    r"""$\operatorname{tril}(QK^\top)V$ in linear time: the PyTorch chunked form or the Triton kernel.

    A sum over up to $L$ keys, so it is returned in float32 for 16-bit inputs (float16 overflows at 65,504): the
    reference computes in float32, the kernel takes the 16-bit inputs and writes float32. ``chunk_size`` is the
    chunk of either (default: 64 for the reference, the kernel's tuned tile for the kernel, whose chunk must be a
    power of two >= 16).
    """
    check_backend(backend)
    work = compute_dtype(q.dtype)
    if backend == "kernel":
        from kernels.linear_attention import chunked_linear_attention  # needs Triton

        return chunked_linear_attention(q, k, v, chunk_size=chunk_size, out_dtype=work)
    return causal_product_chunked(q.to(work), k.to(work), v.to(work),
                                  DEFAULT_CHUNK if chunk_size is None else chunk_size)


# ------------------------------------------------------------------------------------------------
# linear attention
# ------------------------------------------------------------------------------------------------


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     feature_map="elu+1", eps: float = 1e-6, chunk_size: int | None = None,
                     backend: str = "reference") -> torch.Tensor:
    r"""Linear attention (Katharopoulos et al., 2020):

    $$o_i = \frac{\phi(q_i)\sum_{j} \phi(k_j)^\top v_j}{\phi(q_i)\cdot\sum_{j}\phi(k_j) + \varepsilon},$$

    sums over all $j$, or $j\le i$ when ``causal`` (computed chunk by chunk, or by the Triton kernel
    with ``backend="kernel"``; the normaliser $\phi(q_i)\cdot\sum_{j\le i}\phi(k_j)$ is a prefix sum
    outside it).

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, Dv)`` (``S == L`` when causal).
        feature_map: ``"elu+1"``, ``"sigmoid"``, ``"relu"`` or a callable giving non-negative features.
        eps: added to the normaliser (the reference code's 1e-6).
        chunk_size, backend: as in :func:`causal_product` (causal only).

    16-bit inputs are computed in float32 and the result returned in their dtype.

    Returns:
        ``(B, H, L, Dv)``.
    """
    _check_causal_qkv(q, k, v, causal)
    phi = check_feature_map(feature_map)
    _check_eps(eps)
    check_backend(backend)
    # sums over up to S keys: float32 for 16-bit inputs (float16 overflows at 65,504), as attention() does
    work = compute_dtype(q.dtype)
    fq, fk = phi(q.to(work)), phi(k.to(work))
    if causal:
        if backend == "kernel":  # the kernel reads the features in the inputs' dtype and writes float32 sums
            numerator = causal_product(fq.to(q.dtype), fk.to(q.dtype), v, backend=backend, chunk_size=chunk_size)
        else:
            numerator = causal_product(fq, fk, v.to(work), chunk_size=chunk_size)
        # z_i = phi(q_i) . sum_{j<=i} phi(k_j)
        denominator = (fq * fk.cumsum(dim=2)).sum(-1, keepdim=True)
    else:
        # phi(Q) (phi(K)^T V)  -- associativity: never the L x S matrix
        numerator = fq @ (fk.transpose(-1, -2) @ v.to(work))
        denominator = fq @ fk.sum(dim=2).unsqueeze(-1)
    return _normalise(numerator, denominator + eps).to(q.dtype)


def linear_attention_weights(q, k, *, causal: bool = False, feature_map="elu+1", eps: float = 1e-6) -> torch.Tensor:
    r"""The $L\times S$ weights linear attention uses implicitly (for pictures and tests; quadratic).

    $A_{ij} = \phi(q_i)\cdot\phi(k_j) / (\sum_{j'}\phi(q_i)\cdot\phi(k_{j'}) + \varepsilon)$, masked to
    $j\le i$ when causal; ``linear_attention(q, k, v) == linear_attention_weights(q, k) @ v``.
    Shapes: q ``(B, H, L, D)``, k ``(B, H, S, D)``; returns ``(B, H, L, S)``.
    """
    _check_causal_qkv(q, k, k, causal)  # causal needs as many keys as queries, as linear_attention does
    phi = check_feature_map(feature_map)
    _check_eps(eps)
    scores = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, 0.0)
    return _normalise(scores, scores.sum(-1, keepdim=True) + eps)


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    r"""$H_i = -\sum_j p_{ij}\log p_{ij}$ with $p_{ij} = w_{ij}/\sum_{j'} w_{ij'}$ (non-negative weights).

    ``(..., L, S) -> (..., L)``, in nats; a uniform row over $n$ keys gives $\log n$.
    """
    p = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


# ------------------------------------------------------------------------------------------------
# Flow-Attention
# ------------------------------------------------------------------------------------------------


def _check_variant(variant) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products over the last dim: ``(..., n, D), (..., n or 1, D) -> (..., n)``."""
    return (a * b).sum(-1)


def flow_terms(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, eps: float = 1e-6,
               variant: str = "code") -> dict[str, torch.Tensor]:
    r"""The flows of Flow-Attention, from the raw (projected) queries and keys.

    Bidirectional ($\tilde q=\sigma(q)$, $\tilde k=\sigma(k)$, $\varepsilon$ added to each factor):

    $$I_i = 1/\big((\tilde q_i+\varepsilon)\cdot(\textstyle\sum_j\tilde k_j+\varepsilon)\big),\quad
      O_j = 1/\big((\tilde k_j+\varepsilon)\cdot(\sum_i\tilde q_i+\varepsilon)\big),$$
    $$\hat I_i = (\tilde q_i+\varepsilon)\cdot(\textstyle\sum_j \tilde k_j O_j+\varepsilon),\quad
      \hat O_j = (\tilde k_j+\varepsilon)\cdot(\sum_i \tilde q_i I_i+\varepsilon),$$

    (note: ``incoming`` and ``outgoing`` hold the *reciprocals* $1/I$ and $1/O$ of the paper's flows, as
    the code does). Code variant: $\hat O\leftarrow\operatorname{clip}(\hat O,-1,1)$,
    allocation $a_i=\sigma(\hat I_i L/S)$, competition $c_j = S\operatorname{softmax}_j(\hat O)$;
    paper variant: $a_i=\sigma(\hat I_i)$, $c_j=\operatorname{softmax}_j(\hat O)$, no clip.

    Causal (``S == L``, $n_i = i$ 1-based, every sum a prefix sum): $I_i$ and $O_j$ are multiplied by
    $n$, $\hat I$ and $\hat O$ divided by it, $a_i=\sigma(\hat I_i)$ and
    $c_j = n_j\,e^{\hat O_j}/\sum_{t\le j}e^{\hat O_t}$ (the paper variant: $c_j=e^{\hat O_j}/\sum_{t\le j}e^{\hat O_t}$,
    no clip).

    Shapes: q ``(B, H, L, D)``, k ``(B, H, S, D)``. Returns a dict of ``phi_q (B,H,L,D)``,
    ``phi_k (B,H,S,D)``, ``incoming (B,H,L)``, ``outgoing (B,H,S)``, ``conserved_incoming (B,H,L)``,
    ``conserved_outgoing (B,H,S)`` (after the clip), ``allocation (B,H,L)``, ``competition (B,H,S)`` and
    ``normal`` (``(L,)``, the counts $n$, or ones when not causal).
    """
    _check_causal_qkv(q, k, k, causal)  # k stands in for v: only q and k enter the flow terms
    _check_variant(variant)
    _check_eps(eps)
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    length, keys = q.shape[2], k.shape[2]
    if causal:
        # n_i = i (1-based): the number of terms in each prefix sum
        normal = torch.arange(1, length + 1, device=q.device, dtype=fq.dtype)
        incoming = normal / _dot(fq + eps, fk.cumsum(2) + eps)
        outgoing = normal / _dot(fk + eps, fq.cumsum(2) + eps)
        conserved_incoming = _dot(fq + eps, (fk * outgoing[..., None]).cumsum(2) + eps) / normal
        conserved_outgoing = _dot(fk + eps, (fq * incoming[..., None]).cumsum(2) + eps) / normal
    else:
        normal = torch.ones(length, device=q.device, dtype=fq.dtype)
        incoming = 1.0 / _dot(fq + eps, fk.sum(2, keepdim=True) + eps)
        outgoing = 1.0 / _dot(fk + eps, fq.sum(2, keepdim=True) + eps)
        conserved_incoming = _dot(fq + eps, (fk * outgoing[..., None]).sum(2, keepdim=True) + eps)
        conserved_outgoing = _dot(fk + eps, (fq * incoming[..., None]).sum(2, keepdim=True) + eps)
    if variant == "code":
        conserved_outgoing = conserved_outgoing.clamp(-1.0, 1.0)  # "for stability"
    if causal:
        # c_j = n_j exp(O^_j) / sum_{t<=j} exp(O^_t), written with a running log-sum-exp
        competition = torch.exp(conserved_outgoing - torch.logcumsumexp(conserved_outgoing, dim=-1))
        allocation = torch.sigmoid(conserved_incoming)
        if variant == "code":
            competition = competition * normal
    else:
        competition = torch.softmax(conserved_outgoing, dim=-1)
        allocation = torch.sigmoid(conserved_incoming * (length / keys if variant == "code" else 1.0))
        if variant == "code":
            competition = competition * keys
    return dict(phi_q=fq, phi_k=fk, incoming=incoming, outgoing=outgoing, conserved_incoming=conserved_incoming,
                conserved_outgoing=conserved_outgoing, allocation=allocation, competition=competition, normal=normal)


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, eps: float = 1e-6,
                   variant: str = "code", chunk_size: int | None = None, backend: str = "reference") -> torch.Tensor:
    r"""Flow-Attention (Wu et al., 2022, arXiv 2202.06258), in linear time.

    $$o_i = a_i\,\frac{\tilde q_i I_i}{n_i}\sum_{j} \tilde k_j^\top (c_j v_j)$$

    with the terms of :func:`flow_terms` ($\sum_j$ over all keys, $n_i=1$; or $\sum_{j\le i}$, $n_i=i$ when
    ``causal``, computed chunk by chunk or by the Triton kernel with ``backend="kernel"``).

    Args:
        q: raw (projected) queries ``(B, H, L, D)``: the sigmoid feature map is applied here.
        k: raw keys ``(B, H, S, D)``; v: values ``(B, H, S, Dv)`` (``S == L`` when causal).
        eps: the code's $10^{-6}$; variant: ``"code"`` (default, the official code) or ``"paper"``.

    Returns:
        ``(B, H, L, Dv)``.
    """
    _check_causal_qkv(q, k, v, causal)
    check_backend(backend)
    work = compute_dtype(q.dtype)  # sums over up to S keys: float32 for 16-bit inputs
    terms = flow_terms(q.to(work), k.to(work), causal=causal, eps=eps, variant=variant)
    # queries normalised by their incoming flow; values weighted by the competition
    q_flow = terms["phi_q"] * (terms["incoming"] / terms["normal"])[..., None]
    v_flow = v.to(work) * terms["competition"][..., None]
    if causal:
        # the kernel reads its inputs in q's dtype (and writes float32 sums); the reference computes in float32
        inputs = (q_flow, terms["phi_k"], v_flow)
        if backend == "kernel":
            inputs = tuple(x.to(q.dtype) for x in inputs)
        aggregated = causal_product(*inputs, backend=backend, chunk_size=chunk_size)
    else:
        aggregated = q_flow @ (terms["phi_k"].transpose(-1, -2) @ v_flow)
    # allocation: R = sigma(I^) * A
    return (aggregated * terms["allocation"][..., None]).to(q.dtype)


def flow_attention_weights(q, k, *, causal: bool = False, eps: float = 1e-6, variant: str = "code") -> torch.Tensor:
    r"""The $L\times S$ matrix $W$ with ``flow_attention(q, k, v) == W @ v`` (quadratic; for pictures and tests).

    $W_{ij} = a_i\,(\tilde q_i I_i / n_i)\cdot\tilde k_j\,c_j$, zero for $j>i$ when causal. Rows do *not*
    sum to one: the allocation $a_i\in(0,1)$ scales each sink. Shapes: ``(B,H,L,D), (B,H,S,D) -> (B,H,L,S)``.
    """
    terms = flow_terms(q, k, causal=causal, eps=eps, variant=variant)
    q_flow = terms["phi_q"] * (terms["incoming"] / terms["normal"])[..., None]
    weights = (q_flow @ terms["phi_k"].transpose(-1, -2)) * terms["competition"][..., None, :]
    if causal:
        keep = torch.ones(weights.shape[-2:], dtype=torch.bool, device=q.device).tril()
        weights = weights.masked_fill(~keep, 0.0)
    return weights * terms["allocation"][..., None]


# ------------------------------------------------------------------------------------------------
# token mixers and the registry
# ------------------------------------------------------------------------------------------------


class _ProjectedAttention(MultiHeadAttention):
    """Lesson 00's projections and heads around a different mixing rule, ``self.mix(q, k, v)``."""

    def __init__(self, dim: int, num_heads: int, *, causal: bool, bias: bool, backend: str):
        check_bool("causal", causal)
        super().__init__(dim, num_heads, causal=causal, bias=bias)
        check_backend(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge_heads(self.mix(*self.project(x)))


class LinearAttention(_ProjectedAttention):
    r"""Multi-head linear attention (Katharopoulos et al., 2020), a token mixer ``(B, L, dim) -> (B, L, dim)``.

    Args:
        feature_map: ``"elu+1"`` (the paper's), ``"sigmoid"`` or ``"relu"``; eps: normaliser's epsilon.
        backend: ``"reference"`` (chunked PyTorch) or ``"kernel"`` (the Triton kernel, causal only).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, feature_map: str = "elu+1",
                 eps: float = 1e-6, bias: bool = False, backend: str = "reference"):
        super().__init__(dim, num_heads, causal=causal, bias=bias, backend=backend)
        check_feature_map(feature_map)
        _check_eps(eps)
        self.feature_map, self.eps = feature_map, eps

    def mix(self, q, k, v):
        return linear_attention(q, k, v, causal=self.causal, feature_map=self.feature_map, eps=self.eps,
                                backend=self.backend)


class FlowAttention(_ProjectedAttention):
    r"""Multi-head Flow-Attention (Wu et al., 2022), a token mixer ``(B, L, dim) -> (B, L, dim)``.

    As the official code: projections with biases, sigmoid features, $\varepsilon=10^{-6}$; its output
    dropout (0.05) is left to the model around it. ``variant="paper"`` follows the paper's equations.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, eps: float = 1e-6,
                 variant: str = "code", bias: bool = True, backend: str = "reference"):
        super().__init__(dim, num_heads, causal=causal, bias=bias, backend=backend)
        _check_variant(variant)
        _check_eps(eps)
        self.eps, self.variant = eps, variant

    def mix(self, q, k, v):
        return flow_attention(q, k, v, causal=self.causal, eps=self.eps, variant=self.variant, backend=self.backend)


@register_mechanism("linear", paper="P29", lesson="30", supports_causal=True,
                    summary="linear attention, phi(Q)(phi(K)^T V) with elu+1 features (Katharopoulos et al., 2020)")
def build_linear(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return LinearAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("flowformer", paper="P29", lesson="30", supports_causal=True,
                    summary="Flow-Attention: conserved flows, competition and allocation, linear time (Flowformer)")
def build_flowformer(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return FlowAttention(dim, num_heads, causal=causal, **options)


def softmax_entropy_bound(num_keys: int) -> float:
    """$\\log n$: the entropy of a uniform row over ``num_keys`` keys (the largest possible)."""
    check_positive_int("num_keys", num_keys)
    return math.log(num_keys)


# ------------------------------------------------------------------------------------------------
# measuring memory
# ------------------------------------------------------------------------------------------------


def peak_tensor_memory(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and return ``(result, peak bytes of the tensors it allocated)``.

    Counts every new tensor storage an operator creates while ``fn`` runs (views and in-place results
    add nothing) and frees it when the tensor dies, so the peak is what the computation itself needed on
    top of its inputs, on any device, without a profiler.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, int] = {}
    usage = {"now": 0, "peak": 0}

    def release(key: int) -> None:
        usage["now"] -= live.pop(key, 0)

    class _Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, call_args=(), call_kwargs=None):
            out = func(*call_args, **(call_kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in live and t.numel():
                    key = t.untyped_storage().data_ptr()
                    live[key] = t.untyped_storage().nbytes()
                    usage["now"] += live[key]
                    usage["peak"] = max(usage["peak"], usage["now"])
                    weakref.finalize(t, release, key)
            return out

    with _Tracker():
        result = fn(*args, **kwargs)
    return result, usage["peak"]
