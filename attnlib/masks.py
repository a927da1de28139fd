r"""Attention masks as small functions that compose.

A mask says which keys each query may attend to: ``True`` means *may attend*. Following FlexAttention
and attention-gym, a mask is described by a **mask function** of integer index tensors

$$\text{mask\_fn}(b, h, i, j) \to \text{bool},$$

where $b$ is the batch index, $h$ the head, $i$ the query's *position* and $j$ the key's position.
Mask functions compose with :func:`and_masks` / :func:`or_masks` (and :func:`not_mask`), and
:func:`make_mask` turns one into a boolean tensor of shape ``(B, H, Lq, Lk)`` (size-1 dims where the
mask does not depend on batch or head) that :func:`attnlib.attention` accepts.

**Positions when query and key lengths differ.** The queries are the *last* ``Lq`` positions of the key
sequence: query row ``r`` sits at position $i = r + (L_k - L_q)$. This is the convention of
FlashAttention 2.1+ and of decoding with a key/value cache (one new query, ``Lk`` cached keys). With
``Lq == Lk`` it is the ordinary lower-triangular causal mask. (``torch``'s SDPA aligns ``is_causal``
at the top-left corner instead; the two agree when ``Lq == Lk``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_positive_int

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --- mask functions ---------------------------------------------------------------------------------


def causal() -> MaskFn:
    r"""Causal mask: a query sees itself and the past, $j \le i$."""

    def mask_fn(b, h, i, j):
        return j <= i

    mask_fn.__name__ = "causal"
    return mask_fn


def sliding_window(left: int, right: int = 0) -> MaskFn:
    r"""Sliding window: a query at position $i$ sees keys $i - \text{left} \le j \le i + \text{right}$.

    ``right=0`` gives the causal sliding window of ``left + 1`` keys (the query itself and ``left``
    keys before it).
    """
    for name, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")

    def mask_fn(b, h, i, j):
        return (j >= i - left) & (j <= i + right)

    mask_fn.__name__ = f"sliding_window(left={left}, right={right})"
    return mask_fn


def key_padding(lengths: torch.Tensor) -> MaskFn:
    r"""Padding: in batch element $b$ only the first ``lengths[b]`` keys are real, $j < \ell_b$."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(f"lengths: expected a 1-d integer tensor (one length per batch element), got {lengths!r}")

    def mask_fn(b, h, i, j):
        return j < lengths.to(j.device)[b]

    mask_fn.__name__ = "key_padding"
    return mask_fn


def and_masks(*mask_fns: MaskFn) -> MaskFn:
    """A key is allowed if *every* mask function allows it."""
    if not mask_fns:
        raise ValueError("and_masks: expected at least one mask function, got none")

    def mask_fn(b, h, i, j):
        out = mask_fns[0](b, h, i, j)
        for fn in mask_fns[1:]:
            out = out & fn(b, h, i, j)
        return out

    mask_fn.__name__ = " & ".join(fn.__name__ for fn in mask_fns)
    return mask_fn


def or_masks(*mask_fns: MaskFn) -> MaskFn:
    """A key is allowed if *any* mask function allows it."""
    if not mask_fns:
        raise ValueError("or_masks: expected at least one mask function, got none")

    def mask_fn(b, h, i, j):
        out = mask_fns[0](b, h, i, j)
        for fn in mask_fns[1:]:
            out = out | fn(b, h, i, j)
        return out

    mask_fn.__name__ = " | ".join(fn.__name__ for fn in mask_fns)
    return mask_fn


def not_mask(mask_fn: MaskFn) -> MaskFn:
    """The complement: allowed exactly where ``mask_fn`` forbids."""

    def inverted(b, h, i, j):
        return ~mask_fn(b, h, i, j)

    inverted.__name__ = f"~({mask_fn.__name__})"
    return inverted


# --- turning a mask function into a tensor ----------------------------------------------------------


def make_mask(
    mask_fn: MaskFn,
    q_len: int,
    k_len: int | None = None,
    *,
    batch: int = 1,
    heads: int = 1,
    device=None,
) -> torch.Tensor:
    """Evaluate ``mask_fn`` on every (batch, head, query, key) and return a boolean tensor.

    Shapes: returns ``(batch, heads, q_len, k_len)`` (broadcast dims of size 1 are expanded only as
    far as the mask function needs them). Query row ``r`` is at position ``r + k_len - q_len``.
    """
    k_len = q_len if k_len is None else k_len
    for name, value in (("q_len", q_len), ("k_len", k_len), ("batch", batch), ("heads", heads)):
        check_positive_int(name, value)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    i = (torch.arange(q_len, device=device) + (k_len - q_len)).view(1, 1, -1, 1)
    j = torch.arange(k_len, device=device).view(1, 1, 1, -1)
    out = mask_fn(b, h, i, j)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError(f"mask_fn: expected it to return a boolean tensor, got {type(out).__name__}")
    shape = [max(s, 1) for s in out.shape]
    shape[2], shape[3] = q_len, k_len
    return out.expand(*shape)


# --- the common masks as tensors --------------------------------------------------------------------


def causal_mask(q_len: int, k_len: int | None = None, *, device=None) -> torch.Tensor:
    """Causal mask as a ``(q_len, k_len)`` boolean tensor (bottom-right aligned, see module doc)."""
    return make_mask(causal(), q_len, k_len, device=device)[0, 0]


def sliding_window_mask(
    q_len: int, k_len: int | None = None, *, left: int, right: int = 0, device=None
) -> torch.Tensor:
    """Sliding-window mask as a ``(q_len, k_len)`` boolean tensor."""
    return make_mask(sliding_window(left, right), q_len, k_len, device=device)[0, 0]


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Key-padding mask of shape ``(batch, 1, 1, max_len)``: key ``j`` of element ``b`` is real iff ``j < lengths[b]``."""
    check_positive_int("max_len", max_len)
    mask = make_mask(key_padding(lengths), 1, max_len, batch=len(lengths), device=lengths.device)
    return mask[:, :1, :1, :]
