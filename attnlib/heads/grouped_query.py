r"""Lesson 10: grouped-query attention and key-driven grouping (KDGQA, DGQA, PGQA), P11.

**Grouped-query attention.** $H$ query heads share $G$ key/value heads ($G$ divides $H$). Query head
$h$ reads key/value head $g(h) = \lfloor h / (H/G) \rfloor$:

$$O_h = \operatorname{softmax}\!\big(s\,Q_h K_{g(h)}^\top\big)\,V_{g(h)}, \qquad s = 1/\sqrt{d}.$$

$G = H$ is multi-head attention (MHA), $G = 1$ multi-query attention (MQA). A decoder caches $K$ and
$V$ for every past token, so the cache holds $2 \cdot G \cdot d$ numbers per token and layer instead of
$2 \cdot H \cdot d$: a factor $H/G$ less memory (and memory traffic) at decoding time.

**Uptraining** (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints"): the key/value projection of group $j$ starts as the *mean* of the projections
of the $H/G$ MHA heads it replaces,

$$W^K_j = \frac{G}{H} \sum_{h \in \mathcal G_j} W^K_h, \qquad W^V_j = \frac{G}{H} \sum_{h \in \mathcal G_j} W^V_h,$$

and the model is then trained a little more.

**Key-driven grouping** (Khan et al., 2024, "Beyond Uniform Query Distribution: Key-Driven Grouped
Query Attention", arXiv:2408.08454): instead of $H/G$ query heads per key/value head, give more query
heads to the key/value heads whose keys have larger norms. With $n_j$ the allocation of group $j$
($\sum_j n_j = H$, some $n_j$ may be 0), the first $n_0$ query heads read key/value head 0, the next
$n_1$ read head 1, and so on.

* **KDGQA** (every forward pass): $m_j = \sum_b \lVert K_{b,j} \rVert_F$ (norm over tokens and head dim,
  summed over the batch), min-max normalised $\tilde m_j = (m_j - \min m)/(\max m - \min m)$, then
  $n_j = \operatorname{round}(H\,\tilde m_j / \sum \tilde m)$, fixed up until $\sum n = H$: subtract 1
  from the largest $n_j$ while the sum is too large, add 1 to the smallest while it is too small.
* **DGQA** (across training steps): a cached magnitude vector $c$; "diff" mode allocates
  $\propto |c - m|$, "ema" mode $\propto 0.9\,m + 0.1\,c$; rounding errors are fixed by random
  $\pm 1$ steps; every ``window`` training steps the allocation is recomputed and the cache becomes
  $(c + m)/\text{window}$ (as the official code does); in evaluation it is recomputed on every batch
  and the cache becomes $m$.
* **PGQA** (static groups): noise is subtracted from each group's output; see :func:`pgqa_noise`.

Numerics follow the official code (github.com/zohaib-khan5040/key-driven-gqa, ``modules/attention``),
with two guards where it divides by zero: equal norms (always the case for $G = 1$) give an even
allocation instead of NaN, and an all-zero DGQA ratio vector falls back to the uniform split.
KDGQA, DGQA and PGQA look at the keys (or outputs) of *every* position and of the whole batch, so they
cannot run causally: they are registered for bidirectional models only, as in the paper's ViTs.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_backend, check_int_tensor, check_positive_int, check_tensor
from ..core import attention
from ..registry import register_mechanism

DGQA_MODES = ("diff", "ema")
EMA_BETA = 0.9


# ------------------------------------------------------------------------------------------------
# group maps and allocations
# ------------------------------------------------------------------------------------------------


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_kv_heads > num_heads:
        raise ValueError(f"num_kv_heads: expected at most num_heads={num_heads}, got {num_kv_heads}")


def uniform_allocation(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """GQA's allocation: ``H/G`` query heads per key/value head, a long tensor ``(G,)``."""
    _check_heads(num_heads, num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
    return torch.full((num_kv_heads,), num_heads // num_kv_heads, dtype=torch.long)


def kv_head_of_query(allocation: torch.Tensor) -> torch.Tensor:
    r"""Which key/value head each query head reads: ``(G,)`` counts $n_j$ -> ``(H,)`` indices.

    Consecutive blocks: the first $n_0$ query heads read head 0, the next $n_1$ head 1, ...
    """
    check_tensor("allocation", allocation, ndim=1, floating=False)
    if (allocation < 0).any():
        raise ValueError(f"allocation: expected counts >= 0, got {allocation.tolist()}")
    return torch.repeat_interleave(torch.arange(len(allocation), device=allocation.device), allocation)


def key_norms(k: torch.Tensor) -> torch.Tensor:
    r"""$m_j = \sum_b \lVert K_{b,j} \rVert_F$: ``k (B, G, L, D)`` -> ``(G,)`` (summed over the batch)."""
    check_tensor("k", k, ndim=4)
    return torch.linalg.vector_norm(k, dim=(2, 3)).sum(dim=0)


def kdgqa_allocation(norms: torch.Tensor, num_heads: int) -> torch.Tensor:
    r"""KDGQA's allocation of ``num_heads`` query heads from the key norms ``(G,)`` -> long ``(G,)``.

    $$\tilde m_j = \frac{m_j - \min m}{\max m - \min m}, \qquad
      n_j = \operatorname{round}\Big(\frac{\tilde m_j}{\sum_i \tilde m_i}\,H\Big),$$

    then, while $\sum n > H$, subtract 1 from the largest $n_j$ (the first one on ties); while
    $\sum n < H$, add 1 to the smallest (the first one on ties). The weakest group gets $\tilde m = 0$,
    so it only receives heads from the fix-up. Rounding is half-to-even (``torch.round``), and the operations
    come in the official code's order (divide by the sum, then multiply by $H$): at an exact .5 tie the other
    order can round the other way. If every norm is equal (always with one group) min-max is $0/0$ (the
    official code then divides by zero and its fix-up loop never ends); we use equal weights. A norm that is
    not finite is refused.
    """
    check_tensor("norms", norms, ndim=1)
    check_positive_int("num_heads", num_heads)
    if norms.numel() == 0:
        raise ValueError("norms: expected one norm per key/value head, got none")
    if not torch.isfinite(norms).all():
        raise ValueError(f"norms: expected finite key norms, got {norms.tolist()}")
    norms = norms.detach()
    spread = norms.max() - norms.min()
    if spread > 0:
        # m~ = (m - min m) / (max m - min m)
        weights = (norms - norms.min()) / spread
    else:
        weights = torch.ones_like(norms)
    # n = round(m~ / sum m~ * H), in this order (as the official code)
    allocation = torch.round(weights / weights.sum() * num_heads).long()
    while allocation.sum() > num_heads:
        allocation[torch.argmax(allocation)] -= 1
    while allocation.sum() < num_heads:
        allocation[torch.argmin(allocation)] += 1
    return allocation


def dgqa_ratios(magnitudes: torch.Tensor, cache: torch.Tensor, mode: str) -> torch.Tensor:
    r"""DGQA's unnormalised shares ``(G,)``: $|c - m|$ ("diff") or $0.9\,m + 0.1\,c$ ("ema")."""
    if mode not in DGQA_MODES:
        raise ValueError(f"mode: expected one of {DGQA_MODES}, got {mode!r}")
    if mode == "diff":
        return (cache - magnitudes).abs()
    return EMA_BETA * magnitudes + (1.0 - EMA_BETA) * cache


def dgqa_allocation(ratios: torch.Tensor, num_heads: int, generator: torch.Generator) -> torch.Tensor:
    r"""DGQA's allocation from the shares ``ratios (G,)``: $n_j = \operatorname{round}\big((r_j/\sum r)\,H\big)$ (divided
    first, as the official code, like :func:`kdgqa_allocation`),
    then random fix-ups drawn from ``generator``: while $\sum n > H$ pick a group uniformly and take
    one head from it if it has any; while $\sum n < H$ pick a group uniformly and give it one.

    An all-zero ``ratios`` (0/0 in the official code) falls back to equal shares.
    """
    check_tensor("ratios", ratios, ndim=1)
    check_positive_int("num_heads", num_heads)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    ratios = ratios.detach()
    if not ratios.sum() > 0:
        ratios = torch.ones_like(ratios)
    # n = round(r / sum r * H), in the official code's order
    allocation = torch.round(ratios / ratios.sum() * num_heads).long()
    groups = len(allocation)
    while allocation.sum() > num_heads:
        j = int(torch.randint(0, groups, (1,), generator=generator))
        if allocation[j] > 0:
            allocation[j] -= 1
    while allocation.sum() < num_heads:
        j = int(torch.randint(0, groups, (1,), generator=generator))
        allocation[j] += 1
    return allocation


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allocation: torch.Tensor, *,
                      causal: bool = False, return_weights: bool = False):
    r"""Attention where query head $h$ reads key/value head $g(h)$ given by ``allocation``.

    $$O_h = \operatorname{softmax}\big(s\,Q_h K_{g(h)}^\top\big) V_{g(h)}, \qquad
      g = \text{consecutive blocks of sizes } n_0, \dots, n_{G-1}.$$

    Shapes: ``q (B, H, L, D)``, ``k, v (B, G, L, D)``, ``allocation (G,)`` long summing to ``H``.
    Returns ``(B, H, L, D)`` (and the weights ``(B, H, L, L)``). With the uniform allocation this is
    :func:`attnlib.attention`'s grouped-query path.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_int_tensor("allocation", allocation, ndim=1)
    if (allocation < 0).any() or len(allocation) != k.shape[1] or int(allocation.sum()) != q.shape[1]:
        raise ValueError(f"allocation: expected {k.shape[1]} counts (one per key/value head) summing to "
                         f"{q.shape[1]} (the query heads), got {allocation.tolist()}")
    index = kv_head_of_query(allocation).to(q.device)
    # gather the key/value head of every query head: (B, G, L, D) -> (B, H, L, D)
    return attention(q, k[:, index], v[:, index], causal=causal, return_weights=return_weights)


# ------------------------------------------------------------------------------------------------
# uptraining: mean-pooling an MHA checkpoint
# ------------------------------------------------------------------------------------------------


def mean_pool_heads(param: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    r"""Mean-pool the heads of a key or value projection: $W_j = \frac{G}{H}\sum_{h\in\mathcal G_j} W_h$.

    ``param`` is a weight ``(H * d, dim)`` or a bias ``(H * d,)``, rows ordered head by head; the result
    is ``(G * d, dim)`` or ``(G * d,)``. Group $j$ holds heads $jH/G \dots (j+1)H/G - 1$.
    """
    check_tensor("param", param)
    uniform_allocation(num_heads, num_kv_heads)
    if param.dim() not in (1, 2) or param.shape[0] % num_heads:
        raise ValueError(f"param: expected a weight (H * d, dim) or a bias (H * d,) with H={num_heads}, "
                         f"got shape {tuple(param.shape)}")
    head_dim = param.shape[0] // num_heads
    per_head = param.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *param.shape[1:])
    # W_j = mean over the heads of group j
    return per_head.mean(dim=1).reshape(num_kv_heads * head_dim, *param.shape[1:])


def mean_pooled_state(mha_state: dict, num_heads: int, num_kv_heads: int) -> dict:
    """A copy of a state dict in which every ``k_proj``/``v_proj`` weight and bias is mean-pooled.

    Works for one :class:`attnlib.MultiHeadAttention` or for a whole :class:`attnlib.TinyTransformer`
    (any key ending in ``k_proj.weight``, ``k_proj.bias``, ``v_proj.weight``, ``v_proj.bias``).
    """
    pooled = {}
    for name, value in mha_state.items():
        if name.rsplit(".", 2)[-2:-1] in (["k_proj"], ["v_proj"]):
            value = mean_pool_heads(value, num_heads, num_kv_heads)
        pooled[name] = value.clone()
    return pooled


def uptrain_init(mha_model: nn.Module, grouped_model: nn.Module) -> nn.Module:
    """Load ``mha_model``'s weights into ``grouped_model``, mean-pooling the key/value heads.

    Both are :class:`attnlib.TinyTransformer` (or single attention modules) of the same width and
    number of query heads; ``grouped_model`` has ``G`` key/value heads per layer. Returns
    ``grouped_model``.
    """
    first = next(m for m in grouped_model.modules() if hasattr(m, "num_kv_heads"))
    state = mean_pooled_state(mha_model.state_dict(), first.num_heads, first.num_kv_heads)
    missing, unexpected = grouped_model.load_state_dict(state, strict=False)
    extra = [name for name in missing if not name.endswith(("cache", "dgqa_step"))]
    if extra or unexpected:
        raise ValueError(f"grouped_model: parameters do not match the MHA checkpoint (missing {extra}, "
                         f"unexpected {unexpected})")
    return grouped_model


def kv_cache_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                   batch_size: int = 1, bytes_per_number: int = 2) -> int:
    r"""Bytes a decoder caches: $2 \cdot \text{layers} \cdot G \cdot d \cdot L \cdot B \cdot \text{bytes}$ (keys and values)."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("seq_len", seq_len), ("batch_size", batch_size), ("bytes_per_number", bytes_per_number)):
        check_positive_int(name, value)
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_number


# ------------------------------------------------------------------------------------------------
# PGQA's noise
# ------------------------------------------------------------------------------------------------


def pgqa_noise(outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    r"""The noise PGQA subtracts from one group's attention output, as the official code makes it.

    ``outputs (B, n, P * d)``: the group's $n$ query heads, each output flattened to one row. A raw
    matrix $R \in [0,1)^{n \times Pd}$ is drawn uniformly (the code calls it Gaussian, it is not), the
    same for the whole batch; its entries $(r, r)$ are zeroed; each row is standardised with its mean
    and unbiased std (a zero std counts as 1), then given the mean $\mu_{b,r}$ and unbiased std
    $\sigma_{b,r}$ of output row $r$ of sample $b$:

    $$N_{b,r,:} = \frac{R_{r,:} - \operatorname{mean}(R_{r,:})}{\operatorname{std}(R_{r,:})}\,\sigma_{b,r} + \mu_{b,r}.$$

    Returns $N$, ``(B, n, P * d)``; the output is then $O - N$. Gradients flow through $\mu, \sigma$.
    """
    check_tensor("outputs", outputs, ndim=3)
    if outputs.shape[-1] < 2:
        raise ValueError(f"outputs: expected rows of at least 2 numbers (an unbiased std), got shape "
                         f"{tuple(outputs.shape)}")
    _, rows, cols = outputs.shape
    raw = torch.rand(rows, cols, generator=generator, dtype=outputs.dtype).to(outputs.device)
    diagonal = torch.arange(min(rows, cols))
    raw[diagonal, diagonal] = 0.0
    raw_std = raw.std(dim=-1, keepdim=True)
    raw_std = torch.where(raw_std == 0, torch.ones_like(raw_std), raw_std)
    # (R - mean R) / std R: each row standardised
    standard = (raw - raw.mean(dim=-1, keepdim=True)) / raw_std
    # rescaled to each output row's mean and unbiased std
    return standard * outputs.std(dim=-1, keepdim=True) + outputs.mean(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# the modules
# ------------------------------------------------------------------------------------------------


class KeyDrivenGroupedAttention(nn.Module):
    r"""Grouped-query self-attention with a per-call allocation of query heads to key/value heads.

    A token mixer ``(B, L, dim) -> (B, L, dim)``. The projections are named as in
    :class:`attnlib.MultiHeadAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), so that an
    MHA checkpoint loads into it with :func:`uptrain_init`.

    Args:
        dim: model width, a multiple of ``num_heads``.
        num_heads: query heads $H$.
        num_kv_heads: key/value heads $G$ (default ``max(1, H // 2)``, the official code's choice).
        grouping: ``"uniform"`` (GQA), ``"key_norm"`` (KDGQA), ``"dynamic"`` (DGQA) or
            ``"perturbed"`` (PGQA).
        causal: only for ``"uniform"``; the others look at every position.
        bias: whether the projections have biases.
        backend: ``"reference"`` (:func:`attnlib.attention`, keeps the weights) or ``"kernel"`` (the
            Triton kernel's grouped-query path, :func:`kernels.flash_attention`; uniform grouping only,
            head dim 16 to 128).
        mode, window, seed: DGQA's ``"diff"``/``"ema"`` mode, its update window in training steps, and
            the seed of its random fix-ups (``seed`` also seeds PGQA's noise). The steps are this module's
            training calls (the buffer ``dgqa_step``, never reset); the official code counts the batch index of
            each epoch, which restarts at 0, so it also reallocates at every epoch's first batch.
    """

    GROUPINGS = ("uniform", "key_norm", "dynamic", "perturbed")

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, grouping: str = "uniform",
                 causal: bool = False, bias: bool = False, backend: str = "reference", mode: str = "diff",
                 window: int = 10, seed: int = 0):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = max(1, num_heads // 2) if num_kv_heads is None else num_kv_heads
        uniform = uniform_allocation(num_heads, num_kv_heads)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if grouping not in self.GROUPINGS:
            raise ValueError(f"grouping: expected one of {self.GROUPINGS}, got {grouping!r}")
        if causal and grouping != "uniform":
            raise ValueError(f"causal: grouping {grouping!r} reads the keys of every position, so it cannot "
                             "run causally; use grouping='uniform' (GQA)")
        check_backend(backend)
        if backend == "kernel" and (grouping != "uniform" or not 16 <= dim // num_heads <= 128):
            raise ValueError(f"backend: 'kernel' needs grouping='uniform' and a head dim from 16 to 128, got "
                             f"grouping={grouping!r} and head dim {dim // num_heads}")
        if mode not in DGQA_MODES:
            raise ValueError(f"mode: expected one of {DGQA_MODES}, got {mode!r}")
        check_positive_int("window", window)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.grouping, self.causal, self.backend = grouping, causal, backend
        self.mode, self.window, self.seed = mode, window, seed
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("cache", torch.zeros(num_kv_heads))  # DGQA's magnitude cache
        self.register_buffer("dgqa_step", torch.zeros((), dtype=torch.long))  # training calls so far
        self.allocation = uniform  # the allocation of the last call, (G,)
        self.last_weights: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"grouping={self.grouping!r}, causal={self.causal}")

    def reset_randomness(self) -> None:
        """Re-seed the generator of DGQA's fix-ups and PGQA's noise (same numbers as after construction)."""
        self.generator.manual_seed(self.seed)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, L, heads * d) -> (B, heads, L, d)``."""
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def next_allocation(self, k: torch.Tensor) -> torch.Tensor:
        """The allocation for this call, ``(G,)``, from the keys ``(B, G, L, d)`` (updates DGQA's state)."""
        if self.grouping in ("uniform", "perturbed"):
            return self.allocation
        magnitudes = key_norms(k.detach())
        if self.grouping == "key_norm":
            return kdgqa_allocation(magnitudes, self.num_heads)
        ratios = lambda: dgqa_ratios(magnitudes, self.cache, self.mode)  # noqa: E731
        if not self.training:
            allocation = dgqa_allocation(ratios(), self.num_heads, self.generator)
            self.cache = magnitudes
            return allocation
        allocation = self.allocation
        if int(self.dgqa_step) % self.window == 0:
            allocation = dgqa_allocation(ratios(), self.num_heads, self.generator)
            # the official code's update: (cache + current) / window
            self.cache = (self.cache + magnitudes) / self.window
        self.dgqa_step += 1
        return allocation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of ``x (B, L, dim)``; returns ``(B, L, dim)``.

        ``self.allocation`` holds the query heads per key/value head of this call and
        ``self.last_weights`` the attention weights ``(B, H, L, L)``.
        """
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        q = self.split_heads(self.q_proj(x), self.num_heads)
        k = self.split_heads(self.k_proj(x), self.num_kv_heads)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        self.allocation = self.next_allocation(k)
        if self.backend == "kernel":
            from kernels import flash_attention  # imported here: the kernels need Triton

            # the kernel's grouped-query path: k, v keep their G heads, never repeated in memory
            out, weights = flash_attention(q, k, v, causal=self.causal), None
        else:
            out, weights = grouped_attention(q, k, v, self.allocation, causal=self.causal, return_weights=True)
        if self.grouping == "perturbed":
            out = self.subtract_noise(out)
        self.last_weights = weights.detach() if weights is not None else None
        # concatenate heads, then Y = [head_1..head_h] W^O
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim))

    def subtract_noise(self, out: torch.Tensor) -> torch.Tensor:
        """PGQA: $O_j - N_j$ for each group $j$ (fresh noise per group and call), ``(B, H, L, d)``."""
        b, _, length, d = out.shape
        groups = []
        for group in torch.split(out, self.allocation.tolist(), dim=1):
            flat = group.reshape(b, group.shape[1], length * d)
            groups.append((flat - pgqa_noise(flat, self.generator)).view_as(group))
        return torch.cat(groups, dim=1)


# ------------------------------------------------------------------------------------------------
# picture
# ------------------------------------------------------------------------------------------------


def plot_head_groups(allocation, *, title: str | None = None, ax=None):
    """Draw which query head reads which key/value head: ``allocation (G,)`` counts summing to ``H``.

    Query heads are a row of circles on top, key/value heads a row of squares below (grey when no
    query head reads them), one line per query head to the key/value head it reads.
    """
    import matplotlib.pyplot as plt

    from ..tools.plotting import _axes

    allocation = torch.as_tensor(allocation).long()
    index = kv_head_of_query(allocation).tolist()
    heads, groups = len(index), len(allocation)
    ax = _axes(ax, size=(5.2, 2.4))
    colors = plt.get_cmap("tab10")
    q_x = [(h + 0.5) / heads for h in range(heads)]
    kv_x = [(j + 0.5) / groups for j in range(groups)]
    for h, j in enumerate(index):
        ax.plot([q_x[h], kv_x[j]], [1.0, 0.0], color=colors(j % 10), alpha=0.7, zorder=1)
    ax.scatter(q_x, [1.0] * heads, s=260, c=[colors(j % 10) for j in index], zorder=2, edgecolors="black")
    kv_colors = [colors(j % 10) if allocation[j] > 0 else "lightgrey" for j in range(groups)]
    ax.scatter(kv_x, [0.0] * groups, s=360, marker="s", c=kv_colors, zorder=2, edgecolors="black")
    for h in range(heads):
        ax.annotate(f"q{h}", (q_x[h], 1.0), ha="center", va="center", fontsize=7, zorder=3)
    for j in range(groups):
        ax.annotate(f"kv{j}", (kv_x[j], 0.0), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.35, 1.35)
    ax.axis("off")
    ax.set_title(title or f"{heads} query heads, {groups} key/value heads, allocation {allocation.tolist()}",
                 fontsize=9)
    return ax


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------


def _grouped(grouping: str):
    def build(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
        return KeyDrivenGroupedAttention(dim, num_heads, grouping=grouping, causal=causal, **options)
    return build


register_mechanism("gqa", paper="P11", lesson="10", supports_causal=True,
                   summary="grouped-query attention: H query heads share num_kv_heads key/value heads "
                           "(default H // 2)")(_grouped("uniform"))
register_mechanism("kdgqa", paper="P11", lesson="10", supports_causal=False,
                   summary="key-distributed GQA: query heads per key/value head from the key norms of each batch")(
    _grouped("key_norm"))
register_mechanism("dgqa", paper="P11", lesson="10", supports_causal=False,
                   summary="dynamic key-distributed GQA: allocation from how key norms change in training")(
    _grouped("dynamic"))
register_mechanism("pgqa", paper="P11", lesson="10", supports_causal=False,
                   summary="perturbed GQA: static groups, row-matched noise subtracted from each group's output")(
    _grouped("perturbed"))
