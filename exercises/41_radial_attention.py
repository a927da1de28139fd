r"""Lesson 41, radial attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=41

(which runs ``pytest tests/exercises/test_41_radial_attention.py --against exercises``).
A failing check says what is wrong: an octave off by one, the frame length where the code uses the next
power of two, a band without its block floor, thinning that never drops a pair, a band on the global
token index, a block rule that counts the empty columns, ...

Rules: plain Python and PyTorch (``int.bit_length``, ``torch.arange``, ``reshape``, ``sum``). The library's
versions in :mod:`attnlib.sparse.radial` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def band_half_width(distance: int, tokens_per_frame: int, decay: float = 1.0, block_size: int = 128) -> float:
    r"""The half-width $w(\Delta)$ of the band between two frames $\Delta$ = ``distance`` apart.

    A key at in-frame index $c$ is in the band of a query at in-frame index $r$ iff $|c - r| \le w$:

    $$w(\Delta) = \begin{cases} s & \Delta \le 1 \\
      \max\big(2^{\operatorname{bitlen}(s)} / 2^{\operatorname{bitlen}(\Delta)} \cdot \delta,\ B\big) & \Delta \ge 2
      \end{cases}$$

    with $s$ = ``tokens_per_frame``, $\delta$ = ``decay``, $B$ = ``block_size`` and
    $\operatorname{bitlen}(x)$ the number of binary digits of $x$ (Python's ``x.bit_length()``).

    Returns:
        a float.
    """
    raise NotImplementedError(
        "If distance <= 1 return float(s). Otherwise l = 2 ** s.bit_length() / 2 ** distance.bit_length(), "
        "and return max(l * decay, block_size)"
    )


def frame_pair_kept(distance: int, tokens_per_frame: int, block_size: int = 128) -> bool:
    r"""Temporal thinning: whether two frames ``distance`` apart interact at all.

    With the undecayed length $\ell = 2^{\operatorname{bitlen}(s)} / 2^{\operatorname{bitlen}(\Delta)}$ (no
    decay factor here): kept if $\ell \ge B$; otherwise kept only when
    $\Delta \bmod \lfloor B / \ell \rfloor = 0$.

    Returns:
        a bool.
    """
    raise NotImplementedError(
        "l = 2 ** s.bit_length() / 2 ** distance.bit_length(); return True if l >= block_size, "
        "else distance % int(block_size / l) == 0"
    )


def radial_token_mask(num_frames: int, tokens_per_frame: int, decay: float = 1.0,
                      block_size: int = 128) -> torch.Tensor:
    r"""The radial token mask of ``num_frames`` whole frames of $s$ tokens, ``(n, n)`` bool, $n = f s$.

    Token $q$ is in frame $i = \lfloor q/s \rfloor$ at in-frame index $r = q \bmod s$ (likewise key $k$:
    $j$, $c$). With $\Delta = |i - j|$:

    $$M_{qk} = \text{kept}(\Delta) \wedge |c - r| \le w(\Delta)$$

    (``frame_pair_kept`` and ``band_half_width`` above; no sink).
    """
    raise NotImplementedError(
        "frame = arange(n) // s and index = arange(n) % s; tabulate w and kept for every distance "
        "0 .. f - 1; then allowed = kept[dist] & (|index_k - index_q| <= w[dist]) with dist = |frame_q - frame_k|"
    )


def shrink_to_blocks(canvas: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""The official code's block rule: which $B \times B$ blocks of a token mask the kernel visits.

    ``canvas`` is ``(R, C)`` bool with $R$ and $C$ multiples of $B$. In each block, the density of a column is
    the number of its allowed rows divided by $B$; the block is kept iff **more than 60 %** of the block's
    non-empty columns (density > 0) have a density **greater than 1/3**.

    Returns:
        ``(R // B, C // B)`` bool.
    """
    raise NotImplementedError(
        "counts = canvas.reshape(R // B, B, C // B, B).sum(dim=1) gives each column's allowed rows per block; "
        "high = counts / B > 1/3, nonempty = counts > 0; keep = high.sum(-1) > 0.6 * nonempty.sum(-1)"
    )
