r"""Lesson 31: agent attention, P06.

**Agent attention** (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear
Attention", arXiv 2312.08874) puts a small set of $n$ *agent tokens* $A \in \mathbb R^{n\times d}$
between the $N$ queries and the $N$ keys. The agents first gather from the keys, then the queries read
from the agents; both steps are ordinary softmax attention (lesson 00):

$$V_A = \operatorname{softmax}(s\,AK^\top + B_1)\,V \quad (n\times d_v),\qquad
  O = \operatorname{softmax}(s\,QA^\top + B_2)\,V_A + \operatorname{DWC}(V) \quad (N\times d_v),$$

with $s = d^{-1/2}$ in both steps (as the official code scales both), agent biases
$B_1\in\mathbb R^{n\times N}$, $B_2\in\mathbb R^{N\times n}$ and a depthwise $3\times3$ convolution of
$V$ on the token grid. Cost: $4Nnd$ multiply-adds per head instead of the $2N^2d$ of softmax attention,
so at most $N/(2n)$ times less work.

**Generalised linear attention.** Drop the biases and DWC. With $\phi_q(Q) = \operatorname{softmax}(s\,QA^\top)$
($N\times n$) and $\phi_k(K) = \operatorname{softmax}(s\,AK^\top)^\top$ ($N\times n$),

$$O = \phi_q(Q)\,\big(\phi_k(K)^\top V\big),$$

linear attention (lesson 30) with *feature maps made of softmaxes*: rows of $\phi_q(Q)$ and columns of
$\phi_k(K)$ each sum to one, so no extra normaliser is needed, and the $N\times N$ map
$M = \phi_q(Q)\phi_k(K)^\top$ (:func:`effective_map`) is row-stochastic and of rank at most $n$.

**Agents** are pooled from the queries: the official code views the patch queries as a $c\times h\times w$
image (all heads' channels at once, the class token left out) and applies adaptive average pooling down
to $\sqrt n\times\sqrt n$ (:func:`pool_agents`; pooling each channel separately, before or after the
head split gives the same agents).

**Agent biases** (official ``agent_transformer/models/agent_deit.py``, class ``AgentAttention``): each is
the sum of three learned pieces, all initialised from a truncated normal of std 0.02
(:class:`AgentPositionBias`): a coarse table $(H, n, 7, 7)$ bilinearly interpolated to the $h\times w$
grid, a per-row bias $(H, n, h, 1)$ and a per-column bias $(H, n, 1, w)$ for $B_1$; the transposed
analogues for $B_2$. (The code also has one bias for the class token's column and row; this module has
no class token.)

**Special cases** (tested): with one agent every query gets the same output, attention of the mean query
over the keys; with as many agents as tokens, agents equal to the keys and the agent step made the
identity (a bias that masks every key but the agent's own), agent attention *is* softmax attention.
With $A = Q$ and no biases it is **not**: $O = \operatorname{softmax}(sQQ^\top)\operatorname{softmax}(sQK^\top)V$,
two softmax maps in a row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_backend, check_positive_int, check_scale, check_tensor
from ..core import attention
from ..registry import register_mechanism

BIAS_TABLE = 7  # the coarse bias table of the official code is 7 x 7, whatever the grid


# ------------------------------------------------------------------------------------------------
# grids and agents
# ------------------------------------------------------------------------------------------------


def check_grid(grid) -> tuple[int, int]:
    """``grid`` as a pair of positive ints ``(h, w)``, or a ValueError naming it."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid: expected a pair of positive ints (h, w), got {grid!r}")
    return int(grid[0]), int(grid[1])


def token_grid(length: int, grid=None) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``length`` tokens: ``grid`` if given, else square when ``length`` is a square,
    else one row ``(1, length)`` (a plain sequence)."""
    check_positive_int("length", length)
    if grid is None:
        side = math.isqrt(length)
        return (side, side) if side * side == length else (1, length)
    grid = check_grid(grid)
    if grid[0] * grid[1] != length:
        raise ValueError(f"grid: expected h * w = {length} (the number of tokens), got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def agent_grid(grid: tuple[int, int], num_agents: int) -> tuple[int, int]:
    """Where ``num_agents`` agents sit: ``(p, p)`` with ``p * p = num_agents`` on a 2-D grid (the paper's
    square pooling), ``(1, num_agents)`` on a one-row grid."""
    check_positive_int("num_agents", num_agents)
    if grid[0] == 1:
        return 1, num_agents
    side = math.isqrt(num_agents)
    if side * side != num_agents:
        raise ValueError(f"num_agents: expected a perfect square on a 2-D grid {tuple(grid)} "
                         f"(agents are pooled to p x p), got {num_agents}")
    return side, side


def pool_agents(q: torch.Tensor, grid: tuple[int, int], agents_grid: tuple[int, int]) -> torch.Tensor:
    r"""Agents by adaptive average pooling of the queries on their grid.

    $A_{a} = \frac{1}{|R_a|}\sum_{t\in R_a} q_t$ where $R_a$ is agent $a$'s cell of the grid (PyTorch's
    adaptive pooling cells: rows $\lfloor ih/p\rfloor$ to $\lceil (i+1)h/p\rceil$, which overlap when
    $p$ does not divide $h$).

    Args:
        q: queries ``(B, H, N, d)`` with ``N = h * w``, row-major on the grid.
        grid: ``(h, w)``.
        agents_grid: ``(p_h, p_w)``.

    Returns:
        agents ``(B, H, p_h * p_w, d)``, row-major on their grid.
    """
    check_tensor("q", q, ndim=4)
    for name, pair in (("grid", grid), ("agents_grid", agents_grid)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}: expected a pair (rows, columns), got {pair!r}")
        for value in pair:
            check_positive_int(name, value)
    b, heads, n, d = q.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid: expected h * w = {n} (the queries' length), got {tuple(grid)}")
    image = q.reshape(b * heads, grid[0], grid[1], d).permute(0, 3, 1, 2)  # (BH, d, h, w)
    pooled = F.adaptive_avg_pool2d(image, agents_grid)  # (BH, d, p_h, p_w)
    return pooled.flatten(2).transpose(1, 2).reshape(b, heads, -1, d)


# ------------------------------------------------------------------------------------------------
# the two softmax steps
# ------------------------------------------------------------------------------------------------


def check_agent_inputs(q, k, v, agents) -> tuple[int, int, int, int, int]:
    """Shapes, dtypes and devices of an agent attention call; returns ``(B, H, N, n, d)``."""
    for name, x in (("q", q), ("k", k), ("v", v), ("agents", agents)):
        check_tensor(name, x, ndim=4)
    if len({x.dtype for x in (q, k, v, agents)}) != 1:
        raise TypeError(f"q, k, v, agents: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {agents.dtype}")
    if len({x.device for x in (q, k, v, agents)}) != 1:
        raise ValueError(f"q, k, v, agents: expected one device, got {q.device}, {k.device}, {v.device}, {agents.device}")
    b, h, n, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k: expected (batch, heads, *, head_dim) = ({b}, {h}, *, {d}) as q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected (batch, heads, seq) = {tuple(k.shape[:3])} as k, got {tuple(v.shape)}")
    if agents.shape[:2] != (b, h) or agents.shape[3] != d or agents.shape[2] == 0:
        raise ValueError(f"agents: expected (batch, heads, num_agents >= 1, head_dim) = ({b}, {h}, n, {d}), "
                         f"got {tuple(agents.shape)}")
    return b, h, n, agents.shape[2], d


def agent_attention(q, k, v, agents, *, agent_bias=None, query_bias=None, scale: float | None = None,
                    return_weights: bool = False):
    r"""$O = \operatorname{softmax}(s\,QA^\top + B_2)\,\operatorname{softmax}(s\,AK^\top + B_1)\,V$.

    Two calls of :func:`attnlib.attention`: the agents attend to the keys (agent aggregation), then the
    queries attend to the agents (agent broadcast). No DWC here (that lives in :class:`AgentAttention`).

    Args:
        q: queries ``(B, H, N, d)``.
        k: keys ``(B, H, M, d)``.
        v: values ``(B, H, M, d_v)``.
        agents: agent tokens ``(B, H, n, d)``.
        agent_bias: $B_1$, broadcastable to ``(B, H, n, M)`` (``-inf`` entries mask).
        query_bias: $B_2$, broadcastable to ``(B, H, N, n)``.
        scale: $s$ for both steps; default $1/\sqrt d$.
        return_weights: also return ``(query_to_agent (B, H, N, n), agent_to_key (B, H, n, M))``.

    Returns:
        ``out (B, H, N, d_v)`` in the dtype of ``q``.
    """
    check_agent_inputs(q, k, v, agents)
    check_scale(scale)
    # V_A = softmax(s A K^T + B_1) V
    agent_values, agent_to_key = attention(agents, k, v, bias=agent_bias, scale=scale, return_weights=True)
    # O = softmax(s Q A^T + B_2) V_A
    out, query_to_agent = attention(q, agents, agent_values.to(q.dtype), bias=query_bias, scale=scale,
                                    return_weights=True)
    return (out, (query_to_agent, agent_to_key)) if return_weights else out


def agent_attention_naive(q, k, v, agents, *, agent_bias=None, query_bias=None, scale: float | None = None):
    r"""The oracle: loops in float64, as the paper writes it.

    For agent $a$: $v^A_a = \sum_j \operatorname{softmax}_j(s\,a_a\cdot k_j + b^{(1)}_{aj})\,v_j$; for query $i$:
    $o_i = \sum_a \operatorname{softmax}_a(s\,q_i\cdot a_a + b^{(2)}_{ia})\,v^A_a$. Shapes as in
    :func:`agent_attention`; returns ``(B, H, N, d_v)`` float64.
    """
    b_, h_, n_q, n_a, d = check_agent_inputs(q, k, v, agents)
    m = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v, agents = (x.double() for x in (q, k, v, agents))
    b1 = torch.zeros(b_, h_, n_a, m, dtype=torch.float64) if agent_bias is None else \
        agent_bias.double().expand(b_, h_, n_a, m)
    b2 = torch.zeros(b_, h_, n_q, n_a, dtype=torch.float64) if query_bias is None else \
        query_bias.double().expand(b_, h_, n_q, n_a)
    out = torch.zeros(b_, h_, n_q, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            agent_values = []
            for a in range(n_a):
                weights = torch.softmax(torch.stack([scale * agents[b, h, a] @ k[b, h, j] + b1[b, h, a, j]
                                                     for j in range(m)]), 0)
                agent_values.append(sum(w * v[b, h, j] for j, w in enumerate(weights)))
            for i in range(n_q):
                weights = torch.softmax(torch.stack([scale * q[b, h, i] @ agents[b, h, a] + b2[b, h, i, a]
                                                     for a in range(n_a)]), 0)
                out[b, h, i] = sum(w * agent_values[a] for a, w in enumerate(weights))
    return out


def effective_map(query_to_agent: torch.Tensor, agent_to_key: torch.Tensor) -> torch.Tensor:
    r"""The query-to-key map agent attention applies to $V$: $M = \phi_q(Q)\,\phi_k(K)^\top$.

    ``query_to_agent (..., N, n)`` times ``agent_to_key (..., n, M)`` gives ``(..., N, M)``: row-stochastic
    (a product of two row-stochastic matrices), rank at most ``n``.
    """
    check_tensor("query_to_agent", query_to_agent)
    check_tensor("agent_to_key", agent_to_key)
    if query_to_agent.shape[-1] != agent_to_key.shape[-2]:
        raise ValueError(f"agent_to_key: expected {query_to_agent.shape[-1]} agent rows (as query_to_agent's "
                         f"columns), got shape {tuple(agent_to_key.shape)}")
    return query_to_agent @ agent_to_key


def agent_attention_flash(q, k, v, agents, *, scale: float | None = None) -> torch.Tensor:
    r"""The same $O$ (no biases) with two calls of lesson 01's Triton kernel :func:`kernels.flash_attention`:
    agents as queries over the keys, then the queries over the agents as keys.

    Shapes as in :func:`agent_attention` with ``d_v = d`` and ``16 <= d <= 128`` (the kernel's limits).
    Neither $N\times n$ nor $n\times N$ map is ever stored. Tensors on the kernels' device
    (:func:`kernels.expected_device`).
    """
    from kernels import flash_attention  # imported here: the kernels need Triton

    check_agent_inputs(q, k, v, agents)
    # V_A = softmax(s A K^T) V,  O = softmax(s Q A^T) V_A
    agent_values = flash_attention(agents, k, v, scale=scale)
    return flash_attention(q, agents, agent_values, scale=scale)


# ------------------------------------------------------------------------------------------------
# the agent biases and the module
# ------------------------------------------------------------------------------------------------


def _trunc_normal(*shape: int) -> nn.Parameter:
    # as the official code's trunc_normal_(std=.02): the cut is at the absolute values -2 and 2, a hundred
    # standard deviations away, so this is in effect a plain normal of std 0.02
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class AgentPositionBias(nn.Module):
    r"""The agent biases of the official code, each a sum of three learned pieces.

    $$B_1[h, a, (y, x)] = \operatorname{bilinear}(T_1)[h, a, y, x] + r_1[h, a, y] + c_1[h, a, x],$$
    $$B_2[h, (y, x), a] = \operatorname{bilinear}(T_2)[h, a, y, x] + r_2[h, y, a] + c_2[h, x, a],$$

    with tables $T_1, T_2$ of shape ``(H, n, 7, 7)`` interpolated to the ``(h, w)`` grid
    (``F.interpolate(..., mode="bilinear")``, ``align_corners=False`` as in the code), and row and column
    biases sized for the grid. All start from a truncated normal, std 0.02, cut at $\pm 2$ (absolute,
    as ``trunc_normal_``'s defaults: in effect a plain normal).

    ``forward()`` returns ``(B_1 (H, n, h*w), B_2 (H, h*w, n))``.
    """

    def __init__(self, num_heads: int, num_agents: int, grid: tuple[int, int], table: int = BIAS_TABLE):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_agents", num_agents), ("table", table)):
            check_positive_int(name, value)
        self.grid = check_grid(grid)
        h, w = self.grid
        self.agent_table = _trunc_normal(num_heads, num_agents, table, table)
        self.agent_rows = _trunc_normal(num_heads, num_agents, h, 1)
        self.agent_cols = _trunc_normal(num_heads, num_agents, 1, w)
        self.query_table = _trunc_normal(num_heads, num_agents, table, table)
        self.query_rows = _trunc_normal(num_heads, h, 1, num_agents)
        self.query_cols = _trunc_normal(num_heads, 1, w, num_agents)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads, n = self.agent_table.shape[:2]
        h, w = self.grid
        # B_1 = bilinear(T_1) + r_1 + c_1,  (H, n, h, w) -> (H, n, N)
        agent_bias = F.interpolate(self.agent_table, size=(h, w), mode="bilinear", align_corners=False)
        agent_bias = (agent_bias + self.agent_rows + self.agent_cols).reshape(heads, n, h * w)
        # B_2 = bilinear(T_2)^T + r_2 + c_2,  (H, h, w, n) -> (H, N, n)
        query_bias = F.interpolate(self.query_table, size=(h, w), mode="bilinear", align_corners=False)
        query_bias = query_bias.permute(0, 2, 3, 1) + self.query_rows + self.query_cols
        return agent_bias, query_bias.reshape(heads, h * w, n)


class AgentAttention(nn.Module):
    r"""Agent attention (Han et al., 2024), a token mixer ``(B, N, dim) -> (B, N, dim)``.

    $$O = \operatorname{softmax}(s\,QA^\top + B_2)\operatorname{softmax}(s\,AK^\top + B_1)V + \operatorname{DWC}(V),
      \qquad A = \operatorname{pool}(Q),$$

    then the output projection. The tokens lie row-major on a grid ``(h, w)``; the agents are the queries
    average-pooled to ``sqrt(num_agents) x sqrt(num_agents)`` (``(1, num_agents)`` on a one-row grid).

    Args:
        dim: model width, a multiple of ``num_heads``.
        num_heads: heads $H$ (head dim ``dim // num_heads``).
        num_agents: agents $n$ per head (49 = 7x7 in Agent-DeiT-T/S); a perfect square on a 2-D grid.
        grid: ``(h, w)`` with ``h * w`` the sequence length; default: square if the length is a square,
            else one row. Needed (fixed) for the position biases.
        position_bias: the learned biases $B_1, B_2$ (:class:`AgentPositionBias`); default on when ``grid``
            is given, off otherwise (their row and column pieces are sized for one grid).
        dwc: add the depthwise $3\times3$ convolution of $V$ (over all ``dim`` channels, padding 1, with bias).
        qkv_bias: biases in the joint $QKV$ projection (off in DeiT-T's default).
        causal: must be False: every agent pools over all queries, so no causal form exists here.
        backend: ``"reference"`` (:func:`agent_attention`, keeps the maps) or ``"kernel"`` (two calls of
            the Triton flash kernel; needs ``position_bias=False``).
    """

    def __init__(self, dim: int, num_heads: int, *, num_agents: int = 49, grid=None, position_bias: bool | None = None,
                 dwc: bool = True, qkv_bias: bool = False, causal: bool = False, backend: str = "reference"):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_positive_int("num_agents", num_agents)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        if causal is not False:
            raise ValueError(f"causal: agent attention has no causal form (each agent pools every query), "
                             f"expected False, got {causal!r}")
        check_backend(backend)
        for name, value in (("dwc", dwc), ("qkv_bias", qkv_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        position_bias = grid is not None if position_bias is None else position_bias
        if not isinstance(position_bias, bool):
            raise TypeError(f"position_bias: expected a bool or None, got {type(position_bias).__name__}")
        if position_bias and grid is None:
            raise ValueError("grid: the position biases are sized for one grid; give grid=(h, w) or position_bias=False")
        if position_bias and backend == "kernel":
            raise ValueError("backend: the flash kernel takes no bias; use position_bias=False or backend='reference'")
        self.grid = None if grid is None else check_grid(grid)
        if self.grid is not None:
            agent_grid(self.grid, num_agents)  # a bad agent count fails now, not at the first forward
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_agents, self.backend, self.causal = num_agents, backend, False
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim) if dwc else None
        self.bias = AgentPositionBias(num_heads, num_agents, self.grid) if position_bias else None
        self.last_maps: dict[str, torch.Tensor] | None = None
        self.last_weights: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"num_agents={self.num_agents}, grid={self.grid}, position_bias={self.bias is not None}, "
                f"dwc={self.dwc is not None}, backend={self.backend!r}")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim) -> (B, H, N, d)``."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, return_weights: bool = False):
        """``x (B, N, dim) -> (B, N, dim)``; with ``return_weights`` also the effective maps ``(B, H, N, N)``."""
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim} (the model width), got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        if self.grid is not None and self.grid[0] * self.grid[1] != n:
            raise ValueError(f"x: expected {self.grid[0] * self.grid[1]} tokens (the grid {self.grid}), got {n}")
        grid = token_grid(n, self.grid)
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        # A = pool(Q) on the grid
        agents = pool_agents(q, grid, agent_grid(grid, self.num_agents))
        if self.backend == "kernel":
            if return_weights:
                raise ValueError("return_weights: the 'kernel' backend keeps no maps; use backend='reference'")
            out = agent_attention_flash(q, k, v, agents)
            self.last_maps = self.last_weights = None
        else:
            b1, b2 = self.bias() if self.bias is not None else (None, None)
            out, (query_to_agent, agent_to_key) = agent_attention(q, k, v, agents, agent_bias=b1, query_bias=b2,
                                                                  return_weights=True)
            self.last_maps = {"query_to_agent": query_to_agent.detach(), "agent_to_key": agent_to_key.detach()}
            self.last_weights = effective_map(query_to_agent, agent_to_key).detach()
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        if self.dwc is not None:
            # O <- O + DWC(V), V seen as a (dim, h, w) image
            image = v.transpose(1, 2).reshape(b, grid[0], grid[1], self.dim).permute(0, 3, 1, 2)
            out = out + self.dwc(image).permute(0, 2, 3, 1).reshape(b, n, self.dim)
        out = self.proj(out)
        return (out, self.last_weights) if return_weights else out


@register_mechanism("agent", paper="P06", lesson="31", supports_causal=False,
                    summary="agent attention (Han et al., 2024): queries pooled to num_agents agents, two softmax steps + DWC")
def build_agent(dim: int, num_heads: int, *, causal: bool, **options) -> nn.Module:
    return AgentAttention(dim, num_heads, causal=causal, **options)
