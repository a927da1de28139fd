r"""Lesson 31, agent attention: solutions to ``exercises/31_agent_attention.py``."""

from __future__ import annotations

import math

import torch


def pool_agents(q: torch.Tensor, grid: tuple[int, int], agents_grid: tuple[int, int]) -> torch.Tensor:
    r"""Agents as block averages of the queries on their grid: ``(B, H, h*w, d) -> (B, H, p_h*p_w, d)``."""
    b, heads, _, d = q.shape
    (h, w), (ph, pw) = grid, agents_grid
    # split rows into p_h blocks of h / p_h, columns into p_w blocks of w / p_w
    blocks = q.reshape(b, heads, ph, h // ph, pw, w // pw, d)
    # A_{ij} = mean of block (i, j)
    return blocks.mean(dim=(3, 5)).reshape(b, heads, ph * pw, d)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
    r"""$O = \operatorname{softmax}(s\,QA^\top)\,\operatorname{softmax}(s\,AK^\top)\,V$."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    # V_A = softmax(s A K^T) V
    agent_values = torch.softmax(scale * agents @ k.transpose(-2, -1), dim=-1) @ v
    # O = softmax(s Q A^T) V_A
    return torch.softmax(scale * q @ agents.transpose(-2, -1), dim=-1) @ agent_values


def effective_map(q: torch.Tensor, k: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
    r"""$M = \operatorname{softmax}(s\,QA^\top)\,\operatorname{softmax}(s\,AK^\top)$, ``(B, H, N, M)``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return (torch.softmax(scale * q @ agents.transpose(-2, -1), dim=-1)
            @ torch.softmax(scale * agents @ k.transpose(-2, -1), dim=-1))
