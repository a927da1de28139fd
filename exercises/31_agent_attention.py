r"""Lesson 31, agent attention: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=31

(which runs ``pytest tests/exercises/test_31_agent_attention.py --against exercises``).
A failing check says what is wrong: agents pooled along the flat sequence instead of the grid, a missing
scale, a softmax over the wrong axis, a transposed map, ...

Rules: plain PyTorch (``torch.softmax``, ``reshape``, ``mean``, ``@``). The library's versions in
:mod:`attnlib.linear.agent_attention` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def pool_agents(q: torch.Tensor, grid: tuple[int, int], agents_grid: tuple[int, int]) -> torch.Tensor:
    r"""Agents as block averages of the queries on their grid.

    The ``N = h * w`` queries lie row-major on an ``h x w`` grid (query ``y * w + x`` sits at row ``y``,
    column ``x``). Cut the grid into ``p_h x p_w`` equal blocks (``p_h`` divides ``h``, ``p_w`` divides
    ``w``); agent ``i * p_w + j`` is the mean of the queries in block ``(i, j)``.

    Args:
        q: ``(B, H, N, d)``.
        grid: ``(h, w)``.
        agents_grid: ``(p_h, p_w)``.

    Returns:
        ``(B, H, p_h * p_w, d)``.
    """
    raise NotImplementedError(
        "View q as (B, H, p_h, h // p_h, p_w, w // p_w, d): rows split into blocks, then columns; average over "
        "the two within-block dims (2 + 1 and 4 + 1 after the leading B, H) and flatten (p_h, p_w) row-major")


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
    r"""$O = \operatorname{softmax}(s\,QA^\top)\,\operatorname{softmax}(s\,AK^\top)\,V$ with $s = 1/\sqrt d$.

    Args:
        q: ``(B, H, N, d)``; k: ``(B, H, M, d)``; v: ``(B, H, M, d_v)``; agents: ``(B, H, n, d)``.

    Returns:
        ``(B, H, N, d_v)``.
    """
    raise NotImplementedError(
        "Two softmax attentions: first the agents attend to the keys, V_A = softmax(s A K^T) V (softmax over the "
        "keys, the last dim), then the queries attend to the agents, softmax(s Q A^T) V_A")


def effective_map(q: torch.Tensor, k: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
    r"""The query-to-key map $M = \operatorname{softmax}(s\,QA^\top)\,\operatorname{softmax}(s\,AK^\top)$, $s = 1/\sqrt d$.

    Shapes: q ``(B, H, N, d)``, k ``(B, H, M, d)``, agents ``(B, H, n, d)``; returns ``(B, H, N, M)``,
    whose rows sum to one (agent attention's output is ``M @ V``).
    """
    raise NotImplementedError(
        "Multiply the (N, n) query-to-agent softmax by the (n, M) agent-to-key softmax, both scaled by 1/sqrt(d)")
