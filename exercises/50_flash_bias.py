r"""Lesson 50, FlashBias: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=50

(which runs ``pytest tests/exercises/test_50_flash_bias.py --against exercises``).
A failing check says what is wrong: a flipped sign, a missing factor 2, the wrong singular values, the
softmax scale on the bias, ...

Rules: plain PyTorch (``torch.arange``, ``torch.stack``, ``torch.cat``, ``torch.linalg.svd``, ...). The
library's versions in :mod:`attnlib.bias.flash_bias` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def alibi_factors(slopes: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rank-2 factors of the ALiBi bias $B_{hij} = -m_h\,(i - j)$ for self-attention over ``length`` tokens.

    Args:
        slopes: $m_h$, ``(H,)``.
        length: $L$.

    Returns:
        ``U (H, L, 2)`` and ``W (L, 2)`` (the same key factor for every head) with
        ``U[h] @ W.T == -slopes[h] * (i - j)``; in ``slopes``' dtype.
    """
    raise NotImplementedError(
        "Write -m (i - j) = (-m i) * 1 + m * j: U[h, i] = m_h * [-i, 1] and W[j] = [1, j] "
        "(torch.arange(length) for the positions, torch.stack(..., dim=-1) to make the 2 columns)")


def squared_distance_factors(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Factors of the spatial bias $B_{ij} = -\lVert x_i - y_j\rVert^2$, of width $p + 2$.

    Args:
        x: query points ``(N, p)``.
        y: key points ``(M, p)``.

    Returns:
        ``U (N, p + 2)`` and ``W (M, p + 2)`` with ``U @ W.T == B``.
    """
    raise NotImplementedError(
        "Expand -|x - y|^2 = -|x|^2 - |y|^2 + 2 x.y: U = [-|x|^2, 1, 2x] and W = [1, -|y|^2, y] "
        "(torch.cat along the last dim; keepdim=True on the sums)")


def truncated_bias(bias: torch.Tensor, rank: int) -> torch.Tensor:
    r"""The best rank-$r$ approximation of ``bias (N, M)`` in the Frobenius norm (Eckart-Young).

    Returns ``(N, M)``: $U_r\Sigma_rV_r^\top$ from the SVD $B = U\Sigma V^\top$, keeping the ``rank`` largest
    singular values.
    """
    raise NotImplementedError(
        "torch.linalg.svd(bias, full_matrices=False) gives U, S, Vh with S sorted largest first; "
        "keep the first `rank` of each: U[:, :r] @ diag(S[:r]) @ Vh[:r]")


def concat_inputs(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The concatenation trick: wider queries and keys whose plain dot product is the biased score.

    Args:
        q: ``(..., N, D)``; k: ``(..., M, D)``; u: ``(..., N, r)``; w: ``(..., M, r)``; scale: $s$.

    Returns:
        ``q' (..., N, D + r)`` and ``k' (..., M, D + r)`` with $Q'K'^\top = s\,QK^\top + UW^\top$ (so that
        attention with scale 1 on them is attention with the bias).
    """
    raise NotImplementedError(
        "Concatenate along the last dim: q' = [scale * q, u], k' = [k, w]. The scale goes on q only: "
        "the bias term is not scaled")
