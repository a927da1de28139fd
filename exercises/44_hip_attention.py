r"""Lesson 44, HiP: hierarchical attention pruning: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=44

(which runs ``pytest tests/exercises/test_44_hip_attention.py --against exercises``).
A failing check says what is wrong: the first block used where the centre belongs, a mean instead of a
max, empty children kept, a window one key too wide, queries not aligned with the last keys, ...

Rules: plain PyTorch (``torch.arange``, ``topk``, ``isfinite``, comparisons). The library's own versions
(:func:`attnlib.sparse.hip.split_nodes`, :func:`attnlib.sparse.hip.hip_mask`, :func:`attnlib.sparse.hip.topk_recall`) are the
answers; write yours without them.
"""

from __future__ import annotations

import torch


def hip_round(starts: torch.Tensor, sizes: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, *,
              block_k: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One round of HiP's tree search for one query block: split, score, keep the best ``keep`` children.

    1. split every node $[a, a+n)$ of key blocks into $[a, a + \lfloor n/2 \rfloor)$ and
       $[a + \lfloor n/2 \rfloor, a + n)$; drop the empty children (size 0);
    2. score a child by its centre block $r = a' + \lfloor n'/2 \rfloor$:
       $\max_{i, j} q_i \cdot k_j$ over every query and the keys $j \in [r b_k, (r+1) b_k)$ that exist;
    3. keep the ``keep`` best children (the earlier child wins a tie).

    Args:
        starts, sizes: ``(m,)`` int64, the nodes (block $u$ holds keys $u b_k .. u b_k + b_k - 1$).
        queries: ``(n_q, D)``, already scaled. keys: ``(T, D)``.
        block_k: $b_k$. keep: how many children survive.

    Returns:
        ``(starts, sizes)`` of the survivors, each ``(keep,)`` int64, sorted by start.
    """
    raise NotImplementedError(
        "Build the children as a list of (start, size): (a, n // 2) and (a + n // 2, n - n // 2) per node; skip "
        "size 0; for the others rep = start + size // 2, block = keys[rep * block_k:(rep + 1) * block_k], score = "
        "(queries @ block.T).max(); sort by (-score, child index), keep the first `keep`, then sort them by start"
    )


def selection_mask(blocks: torch.Tensor, q_len: int, k_len: int, *, block_q: int, block_k: int, window: int,
                   num_sinks: int) -> torch.Tensor:
    r"""HiP's causal mask from the selected key blocks of every query block, ``(q_len, k_len)`` bool.

    Query $i$ (block $t = \lfloor i/b_q \rfloor$) sits at $p_i = i + T_\text{src} - T_\text{dst}$ and may attend
    to key $j$ iff $j \le p_i$ and ($j < n_\text{sink}$, or $p_i - j < w$, or $\lfloor j/b_k \rfloor$ is one
    of ``blocks[t]``).

    Args:
        blocks: ``(T_q, m)`` int64 key-block indices per query block, ``-1`` = empty slot.
        q_len, k_len: $T_\text{dst} \le T_\text{src}$. block_q, block_k, window, num_sinks: as named.
    """
    raise NotImplementedError(
        "i = arange(q_len)[:, None], j = arange(k_len)[None, :], p = i + k_len - q_len; selected = "
        "(blocks[i // block_q] == (j // block_k)[..., None]).any(-1); return (j <= p) & ((j < num_sinks) | "
        "(p - j < window) | selected)"
    )


def topk_recall(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""Per query, the share of its exact top-$k$ keys that ``mask`` keeps, ``(L_q,)`` float.

    ``scores (L_q, L_k)`` with ``-inf`` where the query cannot see the key; the top-$k$ of a row are its
    $\min(k, \#\text{finite})$ largest finite scores; a row with no finite score has recall 1.
    """
    raise NotImplementedError(
        "Per row: visible = isfinite(scores[row]).nonzero(); top = visible[scores[row, visible].topk(min(k, "
        "len(visible))).indices]; recall = mask[row, top].float().mean() (1.0 for a row with nothing visible)"
    )
