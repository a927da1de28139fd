r"""Lesson 13, differential and grouped differential attention: solutions to the exercises."""

from __future__ import annotations

import math

import torch


def lambda_init(layer_index: int) -> float:
    r"""$\lambda_\text{init} = 0.8 - 0.6\,e^{-0.3\,\ell}$ for the 0-based layer index $\ell$."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def differential_weights(scores1: torch.Tensor, scores2: torch.Tensor, lam: float, causal: bool) -> torch.Tensor:
    r"""$\operatorname{softmax}(S_1) - \lambda\operatorname{softmax}(S_2)$, causally masked if asked."""
    if causal:
        length = scores1.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool, device=scores1.device).triu(1)
        scores1 = scores1.masked_fill(future, float("-inf"))
        scores2 = scores2.masked_fill(future, float("-inf"))
    # A_1 - lambda A_2
    return torch.softmax(scores1, dim=-1) - lam * torch.softmax(scores2, dim=-1)


def repeat_noise_heads(noise: torch.Tensor, ratio: int) -> torch.Tensor:
    """Each noise head ``ratio`` times in a row: ``(B, H2, L, D) -> (B, H2 * ratio, L, D)``."""
    return noise.repeat_interleave(ratio, dim=1)
