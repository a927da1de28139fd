r"""Lesson 32, content-aware token aggregation (CATANet): exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=32

(which runs ``pytest tests/exercises/test_32_token_aggregation.py --against exercises``).
A failing check says what is wrong: centres averaged instead of normalised, empty centres reset, no
padding, an output left in sorted order, one softmax over both key sets, ...

Rules: plain PyTorch (``F.normalize``, ``argmax``, ``index_add``, ``torch.sort``, ``gather``, ``scatter``,
``softmax``, ...). The library's own versions (:func:`attnlib.linear.token_aggregation.kmeans_step`,
:func:`attnlib.linear.token_aggregation.subgroup_indices`, :class:`attnlib.linear.token_aggregation.ContentAwareTokenAggregation`)
are the answers; write yours without them.

Paper: Liu, Liu, Tang and Wu, *CATANet: Efficient Content-Aware Token Aggregation for Lightweight Image
Super-Resolution*, CVPR 2025, arXiv:2503.06896.
"""

from __future__ import annotations

import math  # noqa: F401  (you may need it)

import torch
import torch.nn.functional as F  # noqa: F401


def cosine_kmeans_step(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    r"""One step of cosine k-means over every token of the batch, as the official code's ``center_iter``.

    With unit tokens $\hat x = x / \lVert x \rVert$ and unit centres $\hat c_m$, each token joins
    $a = \arg\max_m \hat x \cdot \hat c_m$, and

    $$c_m^\text{new} = \frac{\sum_{a_t = m} \hat x_t}{\lVert \sum_{a_t = m} \hat x_t \rVert},$$

    while a centre that no token joined keeps its old *normalised* value $\hat c_m$.

    Args:
        x: ``(B, N, C)`` tokens (all batch elements share the centres).
        centres: ``(M, C)`` current centres (any length).

    Returns:
        ``(M, C)``, every row of unit length.
    """
    raise NotImplementedError(
        "normalise x (flattened to (B*N, C)) and the centres with F.normalize(..., dim=-1); groups = "
        "(x_unit @ c_unit.T).argmax(-1); sums = torch.zeros_like(c_unit).index_add(0, groups, x_unit); "
        "counts = torch.bincount(groups, minlength=M); keep c_unit where counts == 0, else F.normalize(sums)"
    )


def subgroup_key_positions(num_tokens: int, group_size: int) -> torch.Tensor:
    r"""The sorted positions of the keys each sub-group attends to, as in the official IASA.

    With $g = \min(N, \text{group\_size})$ and $n_g = \lceil N / g \rceil$ sub-groups, pad the sorted sequence
    $0, 1, \dots, N-1$ with $p + g$ positions ($p = n_g g - N$) reflected from its end, $N-1, N-2, \dots$
    (repeat the reflection, $N-1, N-2, \dots$ again, if you run out). Sub-group $i$ reads the padded positions
    $[ig, ig + 2g)$: its own sub-group and the next one.

    Example: $N = 10$, $g = 4$: ``[[0..7], [4, 5, 6, 7, 8, 9, 9, 8], [8, 9, 9, 8, 7, 6, 5, 4]]``.

    Returns:
        ``(n_g, 2g)`` int64.
    """
    raise NotImplementedError(
        "g = min(N, group_size); n_g = ceil(N / g); pad = n_g * g - N; keys = list(range(N)) + "
        "[N - 1 - (i % N) for i in range(pad + g)]; row i is keys[i*g : i*g + 2*g]"
    )


def aggregate_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor,
                        group_size: int, k_centres: torch.Tensor, v_centres: torch.Tensor) -> torch.Tensor:
    r"""CATANet's attention for given groups: sort, attend inside sub-groups and to the centres, scatter back.

    1. Sort the tokens by ``groups`` with a *stable* sort (``torch.sort(..., stable=True)``).
    2. IASA: the query at sorted position $i$ attends, with softmax and scale $1/\sqrt{D}$, to the keys at the
       sorted positions ``subgroup_key_positions(N, group_size)[i // g]`` ($g = \min(N, \text{group\_size})$;
       a position listed twice counts twice).
    3. IRCA: every query also attends to the centres, $\operatorname{softmax}(q K_c^\top/\sqrt D) V_c$, and
       the two outputs are **added** (two separate softmaxes).
    4. Put each output back at its token's original position.

    Args:
        q, k, v: ``(B, H, N, D)`` in image order.
        groups: ``(B, N)`` int64 group of each token.
        group_size: sub-group size.
        k_centres, v_centres: ``(H, M, D)`` keys and values of the centres.

    Returns:
        ``(B, H, N, D)`` in image order.
    """
    raise NotImplementedError(
        "order = torch.sort(groups, -1, stable=True).indices; gather q, k, v along dim 2 with "
        "order[:, None, :, None].expand_as(q); loop over sorted positions i, softmax over the window's keys; "
        "add softmax(q_sorted @ k_centres^T / sqrt(D)) @ v_centres; scatter back along dim 2 with the same index"
    )
