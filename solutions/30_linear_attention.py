r"""Lesson 30, linear attention and Flowformer: solutions.

The answers to ``exercises/30_linear_attention.py``; check them with

    pytest tests/exercises/test_30_linear_attention.py
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
    b, h, length, d = phi_q.shape
    state = phi_q.new_zeros(b, h, d, v.shape[-1])
    norm = phi_q.new_zeros(b, h, d)
    outputs = []
    for i in range(length):
        # S_i = S_{i-1} + phi(k_i)^T v_i ;  z_i = z_{i-1} + phi(k_i)
        state = state + phi_k[:, :, i, :, None] * v[:, :, i, None, :]
        norm = norm + phi_k[:, :, i]
        q_i = phi_q[:, :, i]
        # o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)
        numerator = torch.einsum("bhd,bhde->bhe", q_i, state)
        outputs.append(numerator / ((q_i * norm).sum(-1, keepdim=True) + eps))
    return torch.stack(outputs, dim=2)


def chunked_causal_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    r"""$Y = \operatorname{tril}(QK^\top)V$ chunk by chunk: $Y_t = \operatorname{tril}(Q_tK_t^\top)V_t + Q_tS_{t-1}$,
    then $S_t = S_{t-1} + K_t^\top V_t$.

    Shapes: q, k ``(B, H, L, D)``, v ``(B, H, L, Dv)``; returns ``(B, H, L, Dv)``; any ``chunk_size >= 1``.
    """
    b, h, length, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1])
    outputs = []
    for start in range(0, length, chunk_size):
        qt, kt, vt = (x[:, :, start:start + chunk_size] for x in (q, k, v))
        c = qt.shape[2]
        keep = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        # intra-chunk (diagonal included) + inter-chunk from the state of the earlier chunks
        outputs.append((qt @ kt.transpose(-1, -2)).masked_fill(~keep, 0.0) @ vt + qt @ state)
        state = state + kt.transpose(-1, -2) @ vt
    return torch.cat(outputs, dim=2)


def competition_and_allocation(conserved_incoming: torch.Tensor, conserved_outgoing: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Flowformer's allocation and competition, with the official code's numerics (bidirectional).

    $\hat O \leftarrow \operatorname{clip}(\hat O, -1, 1)$, allocation $a_i = \sigma(\hat I_i\,L/S)$,
    competition $c_j = S\operatorname{softmax}_j(\hat O)$.

    Shapes: conserved_incoming ``(B, H, L)``, conserved_outgoing ``(B, H, S)``. Returns
    ``(allocation (B, H, L), competition (B, H, S))``.
    """
    length, keys = conserved_incoming.shape[-1], conserved_outgoing.shape[-1]
    allocation = torch.sigmoid(conserved_incoming * (length / keys))
    competition = torch.softmax(conserved_outgoing.clamp(-1.0, 1.0), dim=-1) * keys
    return allocation, competition
