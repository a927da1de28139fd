r"""Lesson 02, a tiny transformer and the synthetic tasks: solutions.

The same functions as ``exercises/02_tiny_transformer.py``, answered. Check them with

    python -m pytest tests/exercises/test_02_tiny_transformer.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pre_norm_block(h: torch.Tensor, norm1: Callable, mixer: Callable, norm2: Callable, mlp: Callable) -> torch.Tensor:
    r"""One pre-norm block: $U = H + \operatorname{Mix}(\operatorname{LN}_1(H))$, $H' = U + \operatorname{MLP}(\operatorname{LN}_2(U))$.

    Shapes: ``h (B, L, dim) -> (B, L, dim)``; every sub-module maps ``(B, L, dim) -> (B, L, dim)``.
    """
    # U = H + Mix(LN1(H))
    u = h + mixer(norm1(h))
    # H' = U + MLP(LN2(U))
    return u + mlp(norm2(u))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    r"""$\frac{1}{|M|}\sum_{(b,t)\in M} -\log\operatorname{softmax}(z_{b,t})_{y_{b,t}}$.

    Shapes: ``logits (B, L, V)``, ``targets (B, L)`` long, ``loss_mask (B, L)`` bool -> a scalar.
    """
    # -log softmax(z)_y at every position, (B, L)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    # average over the scored positions only
    mask = loss_mask.to(nll.dtype)
    return (nll * mask).sum() / mask.sum()


def associative_recall_sequence(keys: torch.Tensor, values: torch.Tensor, query: int):
    r"""``x = k_0 v_0 ... k_{n-1} v_{n-1} k_q v_q``; inputs ``x[:-1]``, targets ``x[1:]``, the last input scored.

    Shapes: ``keys (n,)``, ``values (n,)`` long -> three tensors ``(2n + 1,)`` (long, long, bool).
    """
    pairs = torch.stack([keys, values], dim=1).reshape(-1)  # k_0 v_0 k_1 v_1 ...
    x = torch.cat([pairs, keys[query:query + 1], values[query:query + 1]])
    inputs, targets = x[:-1], x[1:]
    loss_mask = torch.zeros(inputs.shape[0], dtype=torch.bool)
    loss_mask[-1] = True  # at the query key, the next token is its value
    return inputs, targets, loss_mask
