r"""Lesson 14, steering by heads (HeadHunter and SoftPAG, P08): exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=14

(which runs ``pytest tests/exercises/test_14_head_guidance.py --against exercises``).
A failing check says what is wrong: u and 1 - u swapped, a mean that reads the future, the guidance
sign flipped, heads ranked alone instead of together with the chosen set, ...

Rules: plain PyTorch and Python. The library's own versions (:func:`attnlib.heads.head_guidance.perturbed_attention`,
:func:`attnlib.heads.head_guidance.guided_prediction`, :func:`attnlib.heads.head_guidance.greedy_head_search`) are the
answers; write yours without them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch


def soft_identity_heads(weights: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""SoftPAG towards the identity, per head, without building an identity matrix.

    $$A'_h = (1 - u_h)\,A_h + u_h\,I \quad\Rightarrow\quad \text{out}_h = (1 - u_h)\,A_h V_h + u_h\,V_h .$$

    Args:
        weights: attention maps $A$ ``(B, H, L, L)``, rows summing to one.
        v: values ``(B, H, L, D)``.
        u: per-head weights ``(H,)`` in $[0, 1]$; $u_h = 1$ is PAG (the head outputs $V_h$).

    Returns:
        ``(B, H, L, D)``.
    """
    raise NotImplementedError(
        "Compute weights @ v, then blend per head: reshape u to (1, H, 1, 1) so that it broadcasts over "
        "batch, positions and features, and return (1 - u) * (weights @ v) + u * v"
    )


def uniform_target_causal(v: torch.Tensor) -> torch.Tensor:
    r"""The output of a head whose map is the causal uniform map: the running mean of the values.

    $$T_{ij} = \begin{cases} 1/(i+1) & j \le i \\ 0 & j > i \end{cases}, \qquad (TV)_i = \frac{1}{i+1}\sum_{j \le i} v_j .$$

    Args:
        v: values ``(B, H, L, D)``.

    Returns:
        ``(B, H, L, D)``; position ``i`` holds the mean of ``v`` over positions ``0..i``.
    """
    raise NotImplementedError(
        "Take v.cumsum(dim=2) and divide position i by i + 1 (torch.arange(1, L + 1) shaped (1, 1, L, 1)); "
        "a mean over all L positions would read the future"
    )


def perturbation_guidance(cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    r"""Guidance away from a weak (perturbed) model: $\hat\epsilon = \epsilon_c + s\,(\epsilon_c - \epsilon_\text{ptb})$.

    Args:
        cond: the intact model's prediction (noise, or next-token logits), any shape.
        perturbed: the perturbed model's prediction, the same shape.
        scale: the guidance scale $s$ ($s = 0$ returns ``cond``).

    Returns:
        the guided prediction, the shape of ``cond``.
    """
    raise NotImplementedError(
        "Start from cond and move away from the weak model: cond + scale * (cond - perturbed)"
    )


def greedy_head_search(candidates: Sequence[Hashable], objective: Callable[[list], float], rounds: int,
                       per_round: int) -> list:
    r"""HeadHunter's greedy search (P08, Algorithm 1). Higher ``objective`` is better.

    Start with $S = []$ and the pool = all candidates. In each of ``rounds`` rounds: for every candidate $c$
    still in the pool, score ``objective(S + [c])``; sort the pool by score, best first (ties keep the
    pool's order); append the top ``per_round`` candidates to $S$ and remove them from the pool.

    Args:
        candidates: distinct heads, e.g. ``(layer, head)`` pairs.
        objective: scores a list of heads.
        rounds, per_round: $R$ and $k$; ``rounds * per_round <= len(candidates)``.

    Returns:
        $S$, the selected heads in the order they were added (``rounds * per_round`` of them).
    """
    raise NotImplementedError(
        "Keep a list `selected` and a list `pool`. Each round: scores = {c: objective(selected + [c]) for c in "
        "pool}; ranked = sorted(pool, key=lambda c: -scores[c]); add ranked[:per_round] to selected and remove "
        "them from the pool. Score each head together with the heads already selected, not alone"
    )
