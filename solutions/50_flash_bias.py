r"""Lesson 50, FlashBias: answers to the exercises."""

from __future__ import annotations

import torch


def alibi_factors(slopes: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rank-2 factors of ALiBi, $U_hW^\top = -m_h(i - j)$: ``U (H, L, 2)``, ``W (L, 2)``."""
    pos = torch.arange(length, dtype=slopes.dtype)
    # -m (i - j) = (-m i) * 1 + m * j
    u = slopes[:, None, None] * torch.stack([-pos, torch.ones_like(pos)], dim=-1)
    w = torch.stack([torch.ones_like(pos), pos], dim=-1)
    return u, w


def squared_distance_factors(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Factors of $-\lVert x_i - y_j\rVert^2$ of width $p + 2$: ``U (N, p+2)``, ``W (M, p+2)``."""
    sq_x = (x * x).sum(-1, keepdim=True)
    sq_y = (y * y).sum(-1, keepdim=True)
    # -|x|^2 - |y|^2 + 2 x.y
    u = torch.cat([-sq_x, torch.ones_like(sq_x), 2 * x], dim=-1)
    w = torch.cat([torch.ones_like(sq_y), -sq_y, y], dim=-1)
    return u, w


def truncated_bias(bias: torch.Tensor, rank: int) -> torch.Tensor:
    r"""The best rank-$r$ approximation $U_r\Sigma_rV_r^\top$ of ``bias (N, M)``."""
    left, values, right_t = torch.linalg.svd(bias, full_matrices=False)
    return left[:, :rank] @ torch.diag(values[:rank]) @ right_t[:rank]


def concat_inputs(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$Q' = [sQ \| U]$, $K' = [K \| W]$ so that $Q'K'^\top = s\,QK^\top + UW^\top$."""
    return torch.cat([scale * q, u], dim=-1), torch.cat([k, w], dim=-1)
