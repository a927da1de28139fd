r"""Lesson 47, Flux attention (routing layers between full and sparse attention): exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=47

(which runs ``pytest tests/exercises/test_47_flux_attention.py --against exercises``).
A failing check says what is wrong: a window one token too wide, a mask that forgets causality, a
straight-through estimator whose forward pass is the soft sample, a sparsity counted over the wrong axis, ...

Rules: plain PyTorch. The library's own versions (:func:`attnlib.sparse.flux_routing.streaming_mask`,
:func:`attnlib.sparse.flux_routing.straight_through_gumbel`, :func:`attnlib.sparse.flux_routing.sparsity` and
:func:`attnlib.sparse.flux_routing.lagrangian_penalty`) are the answers; write yours without them.

Paper: Tang et al., *Flux Attention: Context-Aware Hybrid Attention for Efficient LLMs Inference*, 2025,
arXiv:2604.07394.
"""

from __future__ import annotations

import torch


def streaming_mask(length: int, sink: int, window: int) -> torch.Tensor:
    r"""The causal streaming-attention mask of the sparse branch.

    $$M_{ij} = [\,j \le i\,]\;\big([\,j < s\,] \lor [\,i - j < w\,]\big)$$

    Query $i$ sees the $s$ first tokens (sinks) and the $w$ most recent tokens, itself included.

    Args:
        length: $L$, queries and keys.
        sink: $s \ge 0$.
        window: $w \ge 1$.

    Returns:
        ``(L, L)`` bool, ``True`` = may attend.
    """
    raise NotImplementedError(
        "i = torch.arange(length)[:, None], j = torch.arange(length)[None, :]; "
        "return (j <= i) & ((j < sink) | (i - j < window))"
    )


def straight_through(logits: torch.Tensor, noise: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Hard Gumbel-softmax with a straight-through estimator, as the Flux router samples full vs sparse.

    $$y = \operatorname{softmax}\big((a + g)/\tau\big), \qquad h = \operatorname{onehot}(\arg\max y), \qquad
      z = h + \big(y - \operatorname{sg}(y)\big)$$

    The forward value must be *exactly* one-hot; the gradient with respect to ``logits`` that of $y$.
    ($\operatorname{sg}$ is ``.detach()``.)

    Args:
        logits: ``(..., 2)``, $a$ = (sparse, full).
        noise: ``(..., 2)``, Gumbel noise $g$.
        tau: temperature $\tau > 0$.

    Returns:
        ``(..., 2)``: $z$.
    """
    raise NotImplementedError(
        "soft = torch.softmax((logits + noise) / tau, dim=-1); hard = torch.zeros_like(soft).scatter(-1, "
        "soft.argmax(-1, keepdim=True), 1.0); return hard + (soft - soft.detach())"
    )


def flux_penalty(z: torch.Tensor, target: float, lambda1: float, lambda2: float) -> torch.Tensor:
    r"""The per-sample sparsity penalty of Flux attention.

    With $N$ routed layers and $z_{\ell,b} = 1$ when layer $\ell$ runs full attention for sample $b$,

    $$\rho_b = 1 - \frac1N \sum_\ell z_{\ell,b}, \qquad
      \mathcal{R}_b = \lambda_1 |\rho_b - t| + \lambda_2 (\rho_b - t)^2 .$$

    Args:
        z: ``(N, B)``, the decisions of every layer (layers first).
        target: $t$.
        lambda1, lambda2: the multipliers.

    Returns:
        ``(B,)``: $\mathcal{R}_b$.
    """
    raise NotImplementedError(
        "rho = 1 - z.mean(dim=0) (the mean over layers, dim 0); gap = rho - target; "
        "return lambda1 * gap.abs() + lambda2 * gap ** 2"
    )
