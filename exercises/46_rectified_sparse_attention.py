r"""Lesson 46, rectified sparse attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=46

(which runs ``pytest tests/exercises/test_46_rectified_sparse_attention.py --against exercises``).
A failing check says what is wrong: a pooled block that stands for one key instead of $N_b$, text
entries left unsummed, a selection that forgets the entry crossing $\tau$, a compensation added for
the blocks already computed, ...

Rules: plain PyTorch (``softmax``, ``sort``, ``cumsum``, ``scatter``, ``repeat_interleave``). The library's
own versions (:func:`attnlib.sparse.rectified_sparse.ipar_weights`, :func:`attnlib.sparse.rectified_sparse.select_blocks`,
:func:`attnlib.sparse.rectified_sparse.apply_rectification`) are the answers; write yours without them.
"""

from __future__ import annotations

import math  # noqa: F401  (you may want math.log)

import torch


def ipar_reallocation(block_scores: torch.Tensor, text_scores: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Isolated-pooling attention reallocation: the implicit full attention of one pooled query.

    A pooled visual key stands for $N_b$ keys, a text key for one:

    $$\hat p_j = \frac{N_b\, e^{S_j}}{Z}\ \ (j = 1..T),\qquad \hat p_\text{text} = \frac{\sum_t e^{S^\text{text}_t}}{Z},
      \qquad Z = N_b \sum_j e^{S_j} + \sum_t e^{S^\text{text}_t}.$$

    Args:
        block_scores: ``(..., T)`` scaled pooled logits $S_j = s\,\bar q\cdot\bar k_j$.
        text_scores: ``(..., L_t)`` scaled logits $s\,\bar q\cdot k_t$ of the text keys ($L_t \ge 1$).
        block_size: $N_b$.

    Returns:
        ``(..., T + 1)``: the $T$ block weights, then the summed text weight; each row sums to 1.
    """
    raise NotImplementedError(
        "Add log(N_b) to every block score (a pooled key stands for N_b keys), concatenate the text "
        "scores, take one softmax over the last dim, then keep the T block columns and the SUM of the text "
        "columns as one last column"
    )


def select_blocks(weights: torch.Tensor, min_blocks: int, tau: float) -> torch.Tensor:
    r"""The selection rule of Rectified SpaAttn for rows of weights $\hat p$.

    Sort each row in decreasing order; count the entries whose running sum is still $\le \tau$; keep the first
    $n = \min(E, \max(\text{count} + 1, \text{min\_blocks}))$ entries of the sorted row (the ``+ 1`` is the entry
    that crosses $\tau$). Ties: the earlier entry first (a stable sort).

    Args:
        weights: ``(..., E)`` non-negative, each row summing to 1.
        min_blocks: the floor $\lfloor (1 - \text{drop}) T_v \rfloor$.
        tau: the threshold, in ``(0, 1]``.

    Returns:
        ``(..., E)`` bool, ``True`` for the kept entries, in the original order of the entries.
    """
    raise NotImplementedError(
        "sorted_w, order = torch.sort(weights, dim=-1, descending=True, stable=True); count = "
        "(sorted_w.cumsum(-1) <= tau).sum(-1) + 1; n = count.clamp(min=min_blocks, max=E); the first n "
        "positions of the sorted row are kept: build that mask and scatter it back with order"
    )


def rectified_output(sparse_out: torch.Tensor, weights: torch.Tensor, covered: torch.Tensor,
                     v_pooled: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""The rectified output of the visual query rows.

    $$O_a = R_i\, O^\text{sp}_a + \sum_{j \notin C_i} \hat p_{ij}\,\bar v_j, \qquad R_i = \sum_{j \in C_i} \hat p_{ij}
      \ (+\ \hat p_{i,\text{text}}),$$

    for every query row $a$ of query block $i = \lfloor a / N_b \rfloor$. The text entry, when there is one, is
    always in $C_i$ (text keys are always computed).

    Args:
        sparse_out: ``(B, H, L_v, D)`` the block-sparse output of the visual rows (normalised over the
            computed keys); ``L_v`` need not be a multiple of ``block_size``.
        weights: ``(B, H, T, E)`` $\hat p$ of every query block, ``E = T`` (no text) or ``T + 1`` (text last).
        covered: ``(B, H, T, T)`` bool, the visual blocks of $C_i$.
        v_pooled: ``(B, H, T, D)`` the block means $\bar v_j$.
        block_size: $N_b$.

    Returns:
        ``(B, H, L_v, D)``.
    """
    raise NotImplementedError(
        "R = (weights[..., :T] * covered).sum(-1), plus weights[..., T] if E == T + 1; compensation = "
        "(weights[..., :T] * ~covered) @ v_pooled, shape (B, H, T, D); block of row a is a // block_size: "
        "index R and the compensation with it (arange(L_v) // block_size) and return sparse_out * R + compensation"
    )
