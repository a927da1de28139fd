r"""Lesson 41, radial attention: solutions.

Each function follows the official code's mask builder (mit-han-lab/radial-attention,
``radial_attn/attn_mask.py``), written from the formulas of the lesson.
"""

from __future__ import annotations

import torch


def band_half_width(distance: int, tokens_per_frame: int, decay: float = 1.0, block_size: int = 128) -> float:
    r"""$w(\Delta) = s$ for $\Delta \le 1$, else
    $\max(2^{\operatorname{bitlen}(s)}/2^{\operatorname{bitlen}(\Delta)}\,\delta,\ B)$."""
    if distance <= 1:
        return float(tokens_per_frame)
    # l = 2^bitlen(s) / 2^bitlen(Delta): halves with every octave of the frame distance
    length = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()
    return max(length * decay, float(block_size))


def frame_pair_kept(distance: int, tokens_per_frame: int, block_size: int = 128) -> bool:
    r"""Kept iff $\ell \ge B$, or $\Delta \bmod \lfloor B/\ell \rfloor = 0$."""
    length = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()
    if length >= block_size:
        return True
    return distance % int(block_size / length) == 0


def radial_token_mask(num_frames: int, tokens_per_frame: int, decay: float = 1.0,
                      block_size: int = 128) -> torch.Tensor:
    r"""$M_{qk} = \text{kept}(\Delta) \wedge |c - r| \le w(\Delta)$, ``(n, n)`` bool."""
    s = tokens_per_frame
    n = num_frames * s
    width = torch.tensor([band_half_width(d, s, decay, block_size) for d in range(num_frames)], dtype=torch.float64)
    kept = torch.tensor([frame_pair_kept(d, s, block_size) for d in range(num_frames)])
    token = torch.arange(n)
    frame, index = token // s, token % s
    distance = (frame[:, None] - frame[None, :]).abs()
    gap = (index[None, :] - index[:, None]).abs()
    return kept[distance] & (gap <= width[distance])


def shrink_to_blocks(canvas: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Keep a block iff more than 60 % of its non-empty columns have density (allowed rows / B) above 1/3."""
    rows, cols = canvas.shape[0] // block_size, canvas.shape[1] // block_size
    # allowed rows of each column inside each block: (rows, cols, B)
    counts = canvas.reshape(rows, block_size, cols, block_size).sum(dim=1)
    high = (3 * counts > block_size).sum(-1)  # density > 1/3, in integers
    nonempty = (counts > 0).sum(-1)
    return 5 * high > 3 * nonempty  # more than 60 % of the non-empty columns
