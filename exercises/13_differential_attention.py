r"""Lesson 13, differential and grouped differential attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=13

(which runs ``pytest tests/exercises/test_13_differential_attention.py --against exercises``).
A failing check says what is wrong: an off-by-one layer index, scores subtracted before the softmax,
noise heads tiled instead of repeated, ...

Rules: plain PyTorch (``torch.softmax``, ``masked_fill``, ``repeat_interleave``, ...). The library's
versions in :mod:`attnlib.heads.differential` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def lambda_init(layer_index: int) -> float:
    r"""The initial $\lambda$ of a layer, from its **0-based** index $\ell$:

    $$\lambda_\text{init} = 0.8 - 0.6\,e^{-0.3\,\ell}.$$

    (The paper writes $0.8 - 0.6e^{-0.3(l-1)}$ with a 1-based $l$: the same numbers.)
    """
    raise NotImplementedError("Return 0.8 - 0.6 * math.exp(-0.3 * layer_index); the first layer (index 0) gives 0.2")


def differential_weights(scores1: torch.Tensor, scores2: torch.Tensor, lam: float, causal: bool) -> torch.Tensor:
    r"""The differential map $A_1 - \lambda A_2$ with $A_i = \operatorname{softmax}(S_i)$ row-wise.

    Args:
        scores1, scores2: already scaled scores ``(..., L, L)`` (queries by keys, same length).
        lam: $\lambda$.
        causal: query ``t`` sees keys ``j <= t`` only.

    Returns:
        ``(..., L, L)``; every row sums to $1 - \lambda$.
    """
    raise NotImplementedError(
        "Mask the future with -inf when causal (torch.ones(L, L, dtype=torch.bool).triu(1) marks it), take a "
        "softmax of EACH score matrix over the last dim, then subtract: softmax(s1) - lam * softmax(s2)")


def repeat_noise_heads(noise: torch.Tensor, ratio: int) -> torch.Tensor:
    r"""Line the noise heads of GDA up with the signal heads: ``(B, H2, L, D) -> (B, H2 * ratio, L, D)``.

    Signal head $i$ is served by noise head $\lfloor i / r \rfloor$, so each noise head appears ``ratio``
    times *in a row*: heads ``[n0, n1]`` with ratio 3 become ``[n0, n0, n0, n1, n1, n1]``.
    """
    raise NotImplementedError("Use noise.repeat_interleave(ratio, dim=1) (not .repeat, which tiles n0 n1 n0 n1 ...)")
