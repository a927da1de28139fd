r"""Lesson 14, steering by heads (HeadHunter and SoftPAG, P08): solutions.

The same functions as ``exercises/14_head_guidance.py``, answered. Check them with

    python -m pytest tests/exercises/test_14_head_guidance.py
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch


def soft_identity_heads(weights: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""$\text{out}_h = (1 - u_h)\,A_h V_h + u_h\,V_h$.

    Shapes: ``weights (B, H, L, L)``, ``v (B, H, L, D)``, ``u (H,)`` -> ``(B, H, L, D)``.
    """
    u = u.view(1, -1, 1, 1).to(v.dtype)
    # (1 - u) A V + u I V, with I V = V
    return (1 - u) * (weights @ v) + u * v


def uniform_target_causal(v: torch.Tensor) -> torch.Tensor:
    r"""$(TV)_i = \frac{1}{i+1}\sum_{j \le i} v_j$: ``v (B, H, L, D) -> (B, H, L, D)``."""
    counts = torch.arange(1, v.shape[2] + 1, dtype=v.dtype, device=v.device).view(1, 1, -1, 1)
    return v.cumsum(dim=2) / counts


def perturbation_guidance(cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    r"""$\epsilon_c + s\,(\epsilon_c - \epsilon_\text{ptb})$, any shape."""
    return cond + scale * (cond - perturbed)


def greedy_head_search(candidates: Sequence[Hashable], objective: Callable[[list], float], rounds: int,
                       per_round: int) -> list:
    r"""Greedy rounds: score $S \cup \{c\}$ for every remaining $c$, add the best ``per_round``."""
    selected, pool = [], list(candidates)
    for _ in range(rounds):
        scores = {c: objective(selected + [c]) for c in pool}
        ranked = sorted(pool, key=lambda c: -scores[c])  # stable: ties keep the pool's order
        added = ranked[:per_round]
        selected += added
        pool = [c for c in pool if c not in added]
    return selected
