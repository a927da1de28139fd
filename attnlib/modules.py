r"""Multi-head attention as a module: the projections around :func:`attnlib.attention`.

For an input $X \in \mathbb{R}^{L \times d_\text{model}}$ and $h$ heads of size $d = d_\text{model}/h$:

$$Q_i = X W^Q_i,\quad K_i = X W^K_{g(i)},\quad V_i = X W^V_{g(i)},\qquad
  \text{head}_i = \operatorname{softmax}\!\Big(\tfrac{Q_i K_i^\top}{\sqrt d}\Big) V_i,\qquad
  Y = [\text{head}_1, \dots, \text{head}_h]\, W^O,$$

where $g(i) = \lfloor i / (h / h_{kv}) \rfloor$ maps query head $i$ to its key/value head: $h_{kv} = h$
is multi-head attention (Vaswani et al., 2017), $h_{kv} = 1$ multi-query attention, anything between
grouped-query attention (lesson 10).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_backend, check_bool, check_positive_int, check_tokens
from .core import attention
from .online import blockwise_attention
from .registry import register_mechanism

# the library's two backends, and lesson 01's online softmax in linear memory as a named third
BACKENDS = ("reference", "blockwise", "kernel")


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention, a token mixer ``(B, L, dim) -> (B, L, dim)``.

    Args:
        dim: model width; must be divisible by ``num_heads``.
        num_heads: query heads $h$.
        num_kv_heads: key/value heads $h_{kv}$ (default ``num_heads``); must divide ``num_heads``.
        causal: each token sees only itself and earlier tokens.
        backend: ``"reference"`` (:func:`attnlib.attention`, can return weights),
            ``"blockwise"`` (:func:`attnlib.blockwise_attention`, linear memory) or ``"kernel"``
            (the Triton kernel :func:`kernels.flash_attention`).
        bias: whether the projections have biases.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, causal: bool = False,
                 backend: str = "reference", bias: bool = False):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        check_backend(backend, BACKENDS)
        check_bool("causal", causal)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        if backend == "kernel" and not 16 <= self.head_dim <= 128:
            raise ValueError(f"dim: the kernel backend needs a head dim (dim / num_heads) from 16 to 128, "
                             f"got {dim} / {num_heads} = {self.head_dim}")
        self.causal, self.backend = causal, backend
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)
        self.last_weights: torch.Tensor | None = None

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, L, heads * d) -> (B, heads, L, d)``."""
        b, length, _ = x.shape
        return x.view(b, length, heads, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check ``x (B, L, dim)`` and project it to ``q (B, h, L, d)`` and ``k, v (B, h_kv, L, d)``."""
        check_tokens(x, self.dim)
        q = self.split_heads(self.q_proj(x), self.num_heads)
        k = self.split_heads(self.k_proj(x), self.num_kv_heads)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Concatenate the heads of ``out (B, h, L, d)``, then $Y = [O_1 .. O_h] W^O$: ``(B, L, dim)``."""
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None):
        """The heads' outputs ``(B, h, L, d)`` through this module's backend, and the weights (reference
        backend; else ``None``), which are also kept in ``self.last_weights``."""
        if self.backend != "reference" and mask is not None:
            raise ValueError(f"backend: {self.backend!r} takes no mask and returns no weights; use 'reference'")
        weights = None
        if self.backend == "reference":
            out, weights = attention(q, k, v, mask=mask, causal=self.causal, return_weights=True)
        elif self.backend == "blockwise":
            out = blockwise_attention(q, k, v, causal=self.causal)
        else:
            from kernels import flash_attention  # imported here: the kernels need Triton

            out = flash_attention(q, k, v, causal=self.causal)
        self.last_weights = weights.detach() if weights is not None else None
        return out, weights

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, return_weights: bool = False):
        """Mix the tokens of ``x (B, L, dim)``; ``mask`` broadcastable to ``(B, heads, L, L)``.

        Returns ``(B, L, dim)``, and the weights ``(B, heads, L, L)`` with ``return_weights``
        (reference backend only). The last weights are also kept in ``self.last_weights`` when asked.
        """
        check_bool("return_weights", return_weights)
        q, k, v = self.project(x)
        if self.backend != "reference" and return_weights:
            raise ValueError(f"backend: {self.backend!r} takes no mask and returns no weights; use 'reference'")
        out, weights = self.attend(q, k, v, mask=mask)
        out = self.merge_heads(out)
        return (out, weights) if return_weights else out


@register_mechanism("mha", paper=None, lesson="00", supports_causal=True,
                    summary="softmax multi-head attention (Vaswani et al., 2017); num_kv_heads= for GQA")
def build_mha(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return MultiHeadAttention(dim, num_heads, causal=causal, **options)


@register_mechanism("mha-flash", paper=None, lesson="01", supports_causal=True,
                    summary="multi-head attention through the Triton FlashAttention kernel")
def build_mha_flash(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return MultiHeadAttention(dim, num_heads, causal=causal, backend="kernel", **options)
