r"""Lesson 11, decoupled-head attention and the fusion of heads (DHA, P36): exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=11

(which runs ``pytest tests/exercises/test_11_decoupled_heads.py --against exercises``).
A failing check says what is wrong: the key map used for the values, a missing centring, a loss that is
not relative, ...

Rules: plain PyTorch (indexing, ``torch.softmax``, ``@``, ``.mean``, ``.pow``, ...). The library's own
versions (:func:`attnlib.heads.decoupled_heads.decoupled_head_attention`, :func:`~attnlib.heads.decoupled_heads.linear_cka`,
:func:`~attnlib.heads.decoupled_heads.fusion_loss`) are the answers; write yours without them.
"""

from __future__ import annotations

import torch


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_map: list[int],
                        value_map: list[int]) -> torch.Tensor:
    r"""Causal decoupled-head attention: query head $i$ reads key head $g_k(i)$ and value head $g_v(i)$.

    $$O_i = \operatorname{softmax}\!\Big(\frac{Q_i K_{g_k(i)}^\top}{\sqrt d} + \text{causal mask}\Big)\, V_{g_v(i)} .$$

    Args:
        q: ``(B, H, L, d)`` queries.
        k: ``(B, Hk, L, d)`` keys (any ``Hk``).
        v: ``(B, Hv, L, d)`` values (any ``Hv``).
        key_map: ``H`` ints in ``[0, Hk)``; value_map: ``H`` ints in ``[0, Hv)``.

    Returns:
        ``(B, H, L, d)``.
    """
    raise NotImplementedError(
        "Gather the heads first: k[:, key_map] and v[:, value_map] are (B, H, L, d). Then it is lesson 00's "
        "causal attention: scores q @ k^T / sqrt(d), -inf above the diagonal, softmax over the keys, times v"
    )


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Linear centered kernel alignment of ``x (n, p)`` and ``y (n, q)`` (rows are the same $n$ samples).

    Centre each column over the rows ($X \leftarrow X - \bar X$, same for $Y$), then

    $$\operatorname{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}{\lVert X^\top X \rVert_F\, \lVert Y^\top Y \rVert_F}.$$

    Returns:
        a 0-d tensor in $[0, 1]$.
    """
    raise NotImplementedError(
        "x = x - x.mean(0), y = y - y.mean(0); then (y.T @ x).pow(2).sum() divided by the Frobenius norms "
        "(x.T @ x).norm() * (y.T @ y).norm() (norms, not squared norms, in the denominator)"
    )


def fusion_loss(fused: torch.Tensor, groups: list[int]) -> torch.Tensor:
    r"""How far the fused heads of each group are from agreeing, relative to their size.

    With $\overline W_g$ the mean of the heads in group $g$:

    $$\mathcal L_\text{fuse} = \frac{\sum_g \sum_{i \in G_g} \lVert \widetilde W^{(i)} - \overline W_g \rVert_F^2}
      {\sum_i \lVert \widetilde W^{(i)} \rVert_F^2}.$$

    Args:
        fused: ``(H, d, dim)`` the fused heads $\widetilde W^{(i)}$.
        groups: ``H`` ints, the group of each head (groups numbered ``0 .. G-1``, none empty).

    Returns:
        a 0-d tensor, 0 exactly when the heads of every group are equal.
    """
    raise NotImplementedError(
        "For each group g, take the heads fused[i] with groups[i] == g, their mean over the group, and add "
        "the squared differences to that mean; divide the total by fused.pow(2).sum()"
    )
