r"""Lesson 02, a tiny transformer and the synthetic tasks: exercises.

Replace each ``raise NotImplementedError(...)`` with your code, then check your work from the
repository root with

    make check LESSON=02

(which runs ``pytest tests/exercises/test_02_tiny_transformer.py --against exercises``).
A failing check says what is wrong: post-norm instead of pre-norm, a loss averaged over the wrong
positions, targets that are not shifted, ...

Rules: plain PyTorch (``torch.log_softmax``, ``gather``, indexing, ``torch.cat``, ...). The library's
own versions (:class:`attnlib.tools.transformer.Block`, :func:`attnlib.tools.training.masked_loss`,
:class:`attnlib.tools.tasks.AssociativeRecall`) are the answers; write yours without them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pre_norm_block(h: torch.Tensor, norm1: Callable, mixer: Callable, norm2: Callable, mlp: Callable) -> torch.Tensor:
    r"""One pre-norm transformer block, given its four sub-modules.

    $$U = H + \operatorname{Mix}(\operatorname{LN}_1(H)), \qquad H' = U + \operatorname{MLP}(\operatorname{LN}_2(U)).$$

    Each sub-layer reads a *normalised copy* of the residual stream and *adds* its result back.

    Args:
        h: the residual stream ``(B, L, dim)``.
        norm1, norm2: layer norms, ``(B, L, dim) -> (B, L, dim)``.
        mixer: the token mixer (attention), ``(B, L, dim) -> (B, L, dim)``.
        mlp: the position-wise MLP, ``(B, L, dim) -> (B, L, dim)``.

    Returns:
        $H'$, ``(B, L, dim)``.
    """
    raise NotImplementedError(
        "Two residual steps: u = h + mixer(norm1(h)), then return u + mlp(norm2(u)). "
        "The norm goes inside each branch, not around the sum"
    )


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    r"""Cross-entropy averaged over the scored positions only.

    With $M$ the set of positions where ``loss_mask`` is ``True`` and $z_{b,t}$ the logits there:

    $$\mathcal{L} = \frac{1}{|M|} \sum_{(b,t) \in M} -\log \operatorname{softmax}(z_{b,t})_{y_{b,t}}.$$

    Args:
        logits: ``(B, L, V)`` unnormalised scores over a vocabulary of size ``V``.
        targets: ``(B, L)`` long, the token id to predict at each position (any value where unscored).
        loss_mask: ``(B, L)`` bool, ``True`` where the prediction is scored (at least one).

    Returns:
        a scalar tensor (0-d).
    """
    raise NotImplementedError(
        "Take torch.log_softmax(logits, dim=-1), pick the target's entry with "
        ".gather(-1, targets[..., None]), negate, then average over the positions where loss_mask is True "
        "(divide by loss_mask.sum(), not by B * L)"
    )


def associative_recall_sequence(keys: torch.Tensor, values: torch.Tensor, query: int):
    r"""One associative-recall example as next-token prediction (as :class:`attnlib.tools.tasks.AssociativeRecall`).

    The full sequence is the pairs, then the queried key and its answer:

    ``x = k_0 v_0 k_1 v_1 ... k_{n-1} v_{n-1} k_q v_q``   (length $2n + 2$)

    A causal model predicts the *next* token at every position, so

    * ``inputs``  $= x_0 \dots x_{2n}$ (all but the last token), length $2n + 1$;
    * ``targets`` $= x_1 \dots x_{2n+1}$ (shifted by one), length $2n + 1$;
    * ``loss_mask``: only the position of the query key $k_q$ (the last input) is scored, since only
      there the next token, $v_q$, follows from the context.

    Args:
        keys: ``(n,)`` long, distinct key token ids $k_i$.
        values: ``(n,)`` long, value token ids $v_i$.
        query: the index $q$ of the queried pair, ``0 <= query < n``.

    Returns:
        ``(inputs, targets, loss_mask)``, each of shape ``(2n + 1,)``; long, long, bool.
    """
    raise NotImplementedError(
        "Interleave the pairs with torch.stack([keys, values], dim=1).reshape(-1), append keys[query] and "
        "values[query] with torch.cat, then inputs = x[:-1], targets = x[1:], and a bool mask that is True "
        "only at the last position"
    )
