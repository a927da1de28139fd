r"""A tiny pre-norm transformer whose token mixer is any registered mechanism.

The model maps a sequence to one output per position. With $L$ positions and width $d$:

$$H^{(0)} = E[x] + P, \qquad\text{(token embedding, or } x W_\text{in} \text{ for vectors, plus learned positions)}$$

then ``depth`` pre-norm blocks, $\ell = 1 \dots$ ``depth``:

$$U = H^{(\ell-1)} + \operatorname{Mix}\big(\operatorname{LN}_1(H^{(\ell-1)})\big), \qquad
  H^{(\ell)} = U + \operatorname{MLP}\big(\operatorname{LN}_2(U)\big),$$

with $\operatorname{MLP}(z) = \operatorname{GELU}(z W_1 + b_1) W_2 + b_2$, and finally

$$Y = \operatorname{LN}_f(H^{(\text{depth})})\, W_\text{out} + b_\text{out}.$$

$\operatorname{Mix}$ is the only place where positions exchange information: it is the token mixer
built by name from the registry (:func:`attnlib.build_mechanism`), ``"mha"`` (softmax multi-head
attention) by default. Everything else acts on each position separately. *Pre-norm* means the
normalisation sits inside the residual branch, so the residual stream $H$ itself is a plain sum of the
embedding and every block's contribution (this keeps deep models trainable without a careful warm-up).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..registry import build_mechanism, get_mechanism


class MLP(nn.Module):
    r"""The position-wise feed-forward network $\operatorname{GELU}(z W_1 + b_1) W_2 + b_2$, ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(z)))


class Block(nn.Module):
    r"""One pre-norm block, ``(B, L, dim) -> (B, L, dim)``.

    $$U = H + \operatorname{Mix}(\operatorname{LN}_1(H)), \qquad H' = U + \operatorname{MLP}(\operatorname{LN}_2(U)).$$

    Args:
        mixer: the token mixer, any module ``(B, L, dim) -> (B, L, dim)``.
        dim: model width.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, mixer: nn.Module, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # U = H + Mix(LN1(H))
        u = h + self.mixer(self.norm1(h))
        # H' = U + MLP(LN2(U))
        return u + self.mlp(self.norm2(u))


class TinyTransformer(nn.Module):
    r"""A small pre-norm transformer, ``(B, L)`` tokens or ``(B, L, input_dim)`` vectors -> ``(B, L, output_dim)``.

    Give exactly one of ``vocab_size`` (token ids in, an embedding table) and ``input_dim`` (vectors in,
    a linear projection). :meth:`for_task` reads both, and ``output_dim``, from a task of
    :mod:`attnlib.tools.tasks`.

    Args:
        vocab_size: number of token ids (discrete inputs).
        input_dim: size of each input vector (continuous inputs).
        output_dim: outputs per position (logits over the vocabulary, or 1 for a number);
            default ``vocab_size``.
        max_len: longest sequence (the number of learned positions).
        dim: model width $d$.
        depth: number of blocks.
        num_heads: heads of each token mixer.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        mechanism: registry name of the token mixer (see :func:`attnlib.list_mechanisms`).
        mechanism_options: extra keyword arguments for the mechanism's factory, the same in every layer.
        layer_options: one dict per layer (``depth`` of them) of keyword arguments added to
            ``mechanism_options`` for that layer only: per-layer head budgets, or a layer index that
            sets an initial value by depth.
        causal: position $t$ sees only positions $\le t$ (default; the tasks are autoregressive).
    """

    def __init__(self, *, vocab_size: int | None = None, input_dim: int | None = None,
                 output_dim: int | None = None, max_len: int, dim: int = 64, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: int = 4, mechanism: str = "mha",
                 mechanism_options: dict | None = None, layer_options: list[dict] | None = None,
                 causal: bool = True):
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(f"vocab_size, input_dim: expected exactly one of them (tokens or vectors), "
                             f"got vocab_size={vocab_size!r}, input_dim={input_dim!r}")
        if vocab_size is not None:
            check_positive_int("vocab_size", vocab_size)
        else:
            check_positive_int("input_dim", input_dim)
        if output_dim is None:
            if vocab_size is None:
                raise ValueError("output_dim: expected a positive int for vector inputs (1 for a number), got None")
            output_dim = vocab_size
        for name, value in (("output_dim", output_dim), ("max_len", max_len), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
            check_positive_int(name, value)
        if not isinstance(mechanism, str):
            raise TypeError(f"mechanism: expected a registry name (str), got {type(mechanism).__name__}")
        if mechanism_options is not None and not isinstance(mechanism_options, dict):
            raise TypeError(f"mechanism_options: expected a dict or None, got {type(mechanism_options).__name__}")
        if layer_options is not None:
            if not isinstance(layer_options, (list, tuple)) or len(layer_options) != depth \
                    or not all(isinstance(o, dict) for o in layer_options):
                raise ValueError(f"layer_options: expected a list of {depth} dicts (one per layer, depth={depth}), "
                                 f"got {layer_options!r}")
        get_mechanism(mechanism)  # an unknown name fails here, listing the registered ones

        self.vocab_size, self.input_dim, self.output_dim = vocab_size, input_dim, output_dim
        self.max_len, self.dim, self.depth, self.num_heads = max_len, dim, depth, num_heads
        self.mechanism, self.causal = mechanism, causal
        self.mechanism_options = dict(mechanism_options or {})
        self.layer_options = [dict(o) for o in layer_options] if layer_options is not None else [{}] * depth

        if vocab_size is not None:
            self.embed = nn.Embedding(vocab_size, dim)
        else:
            self.embed = nn.Linear(input_dim, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(
            Block(build_mechanism(mechanism, dim, num_heads, causal=causal,
                                  **{**self.mechanism_options, **self.layer_options[layer]}), dim, mlp_ratio)
            for layer in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, output_dim)
        self._init_weights()

    @classmethod
    def for_task(cls, task, **kwargs) -> TinyTransformer:
        """A model sized for ``task`` (its vocabulary or input size, outputs and length); ``kwargs`` as in the class."""
        return cls(vocab_size=task.vocab_size, input_dim=task.input_dim, output_dim=task.output_dim,
                   max_len=kwargs.pop("max_len", task.seq_len), **kwargs)

    def _init_weights(self) -> None:
        # unit-variance token and position embeddings (nn.Embedding's default): on the small tasks of
        # the course they make the retrieval circuit form in a few hundred steps, where GPT-2's
        # std 0.02 needs a smaller learning rate and more steps
        if isinstance(self.embed, nn.Embedding):
            nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.pos, std=1.0)

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, causal={self.causal}"

    def _check_input(self, x) -> None:
        if self.vocab_size is not None:
            check_tensor("x", x, ndim=2, floating=False)
            if x.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"x: expected integer token ids (torch.long), got {x.dtype}")
        else:
            check_tensor("x", x, ndim=3)
            if x.shape[-1] != self.input_dim:
                raise ValueError(f"x: expected last dim {self.input_dim} (input_dim), got shape {tuple(x.shape)}")
        if x.shape[1] > self.max_len:
            raise ValueError(f"x: expected at most max_len={self.max_len} positions, got {x.shape[1]}")

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        r"""$H^{(0)} = E[x] + P$ (or $x W_\text{in} + P$): ``(B, L)`` or ``(B, L, input_dim)`` -> ``(B, L, dim)``."""
        self._check_input(x)
        return self.embed(x) + self.pos[: x.shape[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L)`` token ids or ``(B, L, input_dim)`` vectors -> outputs ``(B, L, output_dim)``."""
        h = self.embed_input(x)
        for block in self.blocks:
            h = block(h)
        # Y = LN_f(H) W_out + b_out
        return self.head(self.norm(h))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every layer for input ``x``: a list of ``depth`` tensors ``(B, heads, L, L)``.

        Works for mixers that keep their last weights (``MultiHeadAttention`` with the reference
        backend keeps them in ``last_weights``).
        """
        was_training = self.training
        self.eval()
        try:
            self.forward(x)
        finally:
            self.train(was_training)
        maps = []
        for layer, block in enumerate(self.blocks):
            weights = getattr(block.mixer, "last_weights", None)
            if weights is None:
                raise ValueError(
                    f"mechanism: {self.mechanism!r} with options {self.mechanism_options} keeps no attention "
                    f"weights (layer {layer}); use mechanism='mha' (the reference backend) to draw maps"
                )
            maps.append(weights)
        return maps
