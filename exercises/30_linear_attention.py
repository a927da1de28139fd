r"""Lesson 30, linear attention and Flowformer: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=30

(which runs ``pytest tests/exercises/test_30_linear_attention.py --against exercises``).
A failing check says what is wrong: a state read before it is updated (the diagonal is lost), a chunk
that sees its own future, a competition that is not scaled by the number of sources, ...

Rules: plain PyTorch (``torch.einsum``, ``@``, ``masked_fill``, ``torch.softmax``, ...). The library's
versions in :mod:`attnlib.linear.linear_attention` are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def causal_linear_recurrence(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
                             ) -> torch.Tensor:
    r"""Causal linear attention as an RNN: $S_i = S_{i-1} + \phi(k_i)^\top v_i$, $z_i = z_{i-1} + \phi(k_i)$,
    $o_i = \phi(q_i)S_i / (\phi(q_i)\cdot z_i + \varepsilon)$.

    Shapes: phi_q, phi_k ``(B, H, L, D)`` (features, already non-negative), v ``(B, H, L, Dv)``;
    returns ``(B, H, L, Dv)``.
    """
    raise NotImplementedError(
        "Loop over i: first add phi_k[:, :, i, :, None] * v[:, :, i, None, :] to a (B, H, D, Dv) state and "
        "phi_k[:, :, i] to a (B, H, D) normaliser, THEN read them: numerator einsum('bhd,bhde->bhe', q_i, S), "
        "denominator (q_i * z).sum(-1, keepdim=True) + eps; stack the outputs on dim 2")


def chunked_causal_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    r"""$Y = \operatorname{tril}(QK^\top)V$ chunk by chunk: $Y_t = \operatorname{tril}(Q_tK_t^\top)V_t + Q_tS_{t-1}$,
    then $S_t = S_{t-1} + K_t^\top V_t$.

    Shapes: q, k ``(B, H, L, D)``, v ``(B, H, L, Dv)``; returns ``(B, H, L, Dv)``; any ``chunk_size >= 1``.
    """
    raise NotImplementedError(
        "For start in range(0, L, chunk_size): slice the chunk (the last one may be shorter), compute "
        "(Q_t K_t^T) with the upper triangle zeroed (torch.ones(c, c).tril(), diagonal kept) times V_t, add "
        "Q_t @ state, and only then update state += K_t^T V_t; torch.cat the chunks on dim 2")


def competition_and_allocation(conserved_incoming: torch.Tensor, conserved_outgoing: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Flowformer's allocation and competition, with the official code's numerics (bidirectional).

    $\hat O \leftarrow \operatorname{clip}(\hat O, -1, 1)$, allocation $a_i = \sigma(\hat I_i\,L/S)$,
    competition $c_j = S\operatorname{softmax}_j(\hat O)$.

    Shapes: conserved_incoming ``(B, H, L)``, conserved_outgoing ``(B, H, S)``. Returns
    ``(allocation (B, H, L), competition (B, H, S))``.
    """
    raise NotImplementedError(
        "L and S are the last dims of the two inputs. allocation = sigmoid(conserved_incoming * L / S); "
        "competition = softmax(conserved_outgoing.clamp(-1, 1), dim=-1) * S")
