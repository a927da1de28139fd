r"""Lesson 44, HiP: hierarchical attention pruning: solutions.

The answers to ``exercises/44_hip_attention.py``. Try the exercises first; check them with

    make check LESSON=44
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
    children = []
    for a, n in zip(starts.tolist(), sizes.tolist()):
        children += [(a, n // 2), (a + n // 2, n - n // 2)]
    ranked = []
    for index, (a, n) in enumerate(children):
        if n < 1:
            continue
        rep = a + n // 2
        block = keys[rep * block_k:(rep + 1) * block_k]
        score = (queries @ block.T).max().item()
        ranked.append((-score, index))
    survivors = sorted(children[index] for _, index in sorted(ranked)[:keep])
    return (torch.tensor([a for a, _ in survivors], dtype=torch.int64),
            torch.tensor([n for _, n in survivors], dtype=torch.int64))


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
    i = torch.arange(q_len)[:, None]
    j = torch.arange(k_len)[None, :]
    p = i + (k_len - q_len)
    chosen = blocks[i // block_q]  # (q_len, 1, m): the blocks of each query's block
    selected = (chosen == (j // block_k)[..., None]).any(-1)
    return (j <= p) & ((j < num_sinks) | (p - j < window) | selected)


def topk_recall(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""Per query, the share of its exact top-$k$ keys that ``mask`` keeps, ``(L_q,)`` float.

    ``scores (L_q, L_k)`` with ``-inf`` where the query cannot see the key; the top-$k$ of a row are its
    $\min(k, \#\text{finite})$ largest finite scores; a row with no finite score has recall 1.
    """
    out = torch.ones(scores.shape[0])
    for row in range(scores.shape[0]):
        visible = torch.isfinite(scores[row]).nonzero().flatten()
        if len(visible) == 0:
            continue
        top = visible[scores[row, visible].topk(min(k, len(visible))).indices]
        out[row] = mask[row, top].float().mean()
    return out
