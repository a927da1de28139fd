r"""Lesson 40, generalized neighborhood attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=40

(which runs ``pytest tests/exercises/test_40_neighborhood_attention.py --against exercises``).
A failing check says what is wrong: a window cut at the border instead of shifted, the extra key of an
even window on the wrong side, a ragged key tile counted as full, the density bound instead of the tile bound...

Rules: plain PyTorch. The library's versions in :mod:`attnlib.sparse.neighborhood` and
:mod:`attnlib.sparse.block_sparse` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def window_start(length: int, kernel_size: int, stride: int) -> torch.Tensor:
    r"""The first key each query sees in 1-D neighborhood attention (non-causal, dilation 1): ``(length,)`` int64.

    Query $i$ sees keys ``start[i] .. start[i] + kernel_size - 1``, where
    $\text{left} = \lfloor K/2\rfloor$, $\text{right} = \lfloor K/2\rfloor + (K \bmod 2) - 1$,
    leader $\ell = \min(\lfloor i/s\rfloor s + \lfloor s/2\rfloor, L-1)$,
    centre $c = \operatorname{clamp}(\ell, \text{left}, L-1-\text{right})$ and start $= c - \text{left}$.
    """
    raise NotImplementedError("Compute the leader of each query's stride group, clamp it into "
                              "[K // 2, L - 1 - right], and subtract K // 2")


def tile_kinds(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    r"""Kinds of the tiles of a ``(Lq, Lk)`` boolean mask: ``(ceil(Lq/block_m), ceil(Lk/block_n))`` int64.

    0 = no allowed element (skipped), 2 = every element allowed (full) and the tile lies inside the keys
    (a last key tile that sticks out past ``Lk`` is never full), 1 = otherwise (partial).
    Query rows past ``Lq`` do not exist: judge a tile by its real rows only.
    """
    raise NotImplementedError("Loop over the tiles, slice mask[t*bm:(t+1)*bm, u*bn:(u+1)*bn], use .any() and .all()")


def tile_bound(mask: torch.Tensor, block_m: int, block_n: int) -> float:
    r"""The tile-level speed-up bound of a ``(Lq, Lk)`` mask: (number of tiles) / (tiles with any allowed element)."""
    raise NotImplementedError("Count the tiles that hold at least one True; divide the number of tiles by it")
