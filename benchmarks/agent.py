r"""Time agent attention (lesson 31) against full softmax attention on a GPU, and save the results.

Usage (on a machine with a CUDA GPU)::

    python -m benchmarks.agent           # N = 1k..16k tokens, 49..256 agents
    python -m benchmarks.agent --quick   # N = 1k, 4k, 16k; 49 and 256 agents

Agent attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention",
arXiv 2312.08874) without biases or DWC is two softmax attentions, so it runs on any flash kernel:

$$A = \operatorname{pool}(Q),\qquad V_A = \operatorname{attn}(A, K, V),\qquad O = \operatorname{attn}(Q, A, V_A).$$

Three implementations, each from the same ``q, k, v`` (the pooling of the agents is inside the timing):
``agent_flash`` (two calls of :func:`kernels.flash_attention`, lesson 01's Triton kernel),
``agent_sdpa`` (two calls of ``torch`` SDPA) and ``full_sdpa`` (one SDPA call over all $N$ keys, the
dense attention agent attention replaces). FLOPs: $8BHNnd$ for agent attention (two maps of $N\times n$),
$4BHN^2d$ for full attention, so the bound on the speed-up is $N/(2n)$.

Protocol as in :mod:`benchmarks.flash`: bfloat16, ``(B, H, N, d)`` with ``B * N = 16k`` tokens and
``H * d = 2048``, head dim 64, forward and forward + backward; ``triton.testing.do_bench`` medians and
20/80 % quantiles in ms. Before timing, both agent versions are checked against the library's
:func:`attnlib.linear.agent_attention.agent_attention` in float32 (outputs and the gradients of q, k, v).
Results go to ``benchmarks/agent_<card>_<date>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from attnlib.linear.agent_attention import agent_attention, agent_grid, pool_agents, token_grid

from . import common
from .common import RESULTS, environment, gpu_timer, shape_for, time_call, time_implementations

LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 4096, 16384]
AGENTS = [49, 64, 144, 256]
QUICK_AGENTS = [49, 256]
HEAD_DIM = 64


def agent_flops(batch: int, heads: int, length: int, num_agents: int, head_dim: int, mode: str) -> float:
    """Two attentions of ``length x num_agents``: $8BHNnd$ forward; ``"fwd_bwd"`` is 3.5 times that."""
    forward = 8.0 * batch * heads * length * num_agents * head_dim
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def full_flops(batch: int, heads: int, length: int, head_dim: int, mode: str) -> float:
    """Dense attention: $4BHN^2d$ forward; ``"fwd_bwd"`` is 3.5 times that."""
    return 4.0 * batch * heads * length * length * head_dim * (3.5 if mode == "fwd_bwd" else 1.0)


def speedup_bound(length: int, num_agents: int) -> float:
    r"""The FLOP ratio full / agent, $N / (2n)$."""
    return length / (2 * num_agents)


def pooled_agents(q: torch.Tensor, num_agents: int) -> torch.Tensor:
    """Agents pooled from ``q (B, H, N, d)`` on its grid (square when ``N`` is a square, else one row)."""
    grid = token_grid(q.shape[2])
    return pool_agents(q, grid, agent_grid(grid, num_agents))


def implementations(num_agents: int) -> dict:
    """Each ``fn(q, k, v) -> out``: two flash calls, two SDPA calls, and full SDPA."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels import flash_attention

    def agent_flash(q, k, v):
        agents = pooled_agents(q, num_agents)
        return flash_attention(q, agents, flash_attention(agents, k, v))

    def agent_sdpa(q, k, v):
        agents = pooled_agents(q, num_agents)
        return sdpa(q, agents, sdpa(agents, k, v))

    return {"agent_flash": agent_flash, "agent_sdpa": agent_sdpa, "full_sdpa": lambda q, k, v: sdpa(q, k, v)}


def reference(q, k, v, num_agents: int) -> torch.Tensor:
    """The library's agent attention in float32 (what both agent versions must match)."""
    q, k, v = (x.float() for x in (q, k, v))
    return agent_attention(q, k, v, pooled_agents(q, num_agents))


def _outputs_and_grads(fn, q, k, v) -> list[torch.Tensor]:
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return [out.float(), *(x.grad.float() for x in xs)]


def check_against_reference(q, k, v, num_agents: int) -> dict:
    """Largest differences of ``agent_flash`` and ``agent_sdpa`` against :func:`reference` (out, dq, dk, dv)."""
    fns = implementations(num_agents)
    want = _outputs_and_grads(lambda *xs: reference(*xs, num_agents), q, k, v)
    return {name: {what: (a - b).abs().max().item()
                   for what, a, b in zip(("out", "dq", "dk", "dv"), _outputs_and_grads(fns[name], q, k, v), want)}
            for name in ("agent_flash", "agent_sdpa")}


def run(lengths, agents, dtype=torch.bfloat16, *, head_dim: int = HEAD_DIM, device="cuda", timer=gpu_timer,
        shape=shape_for) -> dict:
    """Check and time every (length, agents) configuration; ``device``, ``timer`` and ``shape`` exist so the
    sweep can be rehearsed on a CPU at toy sizes (the tests do) before a GPU's time is spent on it."""
    torch.manual_seed(0)
    records = []
    for length in lengths:
        batch, heads = shape(length, head_dim)
        q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
        for num_agents in agents:
            fns = implementations(num_agents)
            errors = check_against_reference(q[:1], k[:1], v[:1], num_agents)
            for mode in ("fwd", "fwd_bwd"):
                row = dict(length=length, num_agents=num_agents, head_dim=head_dim, mode=mode, batch=batch,
                           heads=heads, bound=speedup_bound(length, num_agents),
                           max_abs_diff_vs_reference=errors, ms={}, tflops={})
                flops = {"agent_flash": agent_flops(batch, heads, length, num_agents, head_dim, mode),
                         "agent_sdpa": agent_flops(batch, heads, length, num_agents, head_dim, mode),
                         "full_sdpa": full_flops(batch, heads, length, head_dim, mode)}
                time_implementations(row, fns, lambda fn: time_call(fn, (q, k, v), mode, timer), flops)
                row["speedup_vs_full"] = {name: row["ms"]["full_sdpa"][0] / row["ms"][name][0]
                                          for name in ("agent_flash", "agent_sdpa")
                                          if row["ms"].get(name) and row["ms"].get("full_sdpa")}
                records.append(row)
                print(_format(row), flush=True)
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "agent": records}


def _format(row) -> str:
    ms = " ".join(f"{name} {row['ms'][name][0]:8.3f}" if row["ms"].get(name) else f"{name}      n/a"
                  for name in ("agent_flash", "agent_sdpa", "full_sdpa"))
    gains = " ".join(f"full/{name} {value:.2f}x" for name, value in row["speedup_vs_full"].items())
    return (f"agent N={row['length']:<5} n={row['num_agents']:<3} {row['mode']:<7} ms {ms}  {gains} "
            f"(bound {row['bound']:.1f}x)")


def load_results(folder: Path = RESULTS) -> list[dict]:
    """Every committed result file ``agent_*.json`` in ``folder``, oldest first."""
    return common.load_results(folder, kind="agent")


def main(argv=None) -> int:
    return common.main_for(argv, kind="agent", quick_lengths=QUICK_LENGTHS,
                          description="Benchmark agent attention (two flash / SDPA calls) against full SDPA.",
                          run_sweep=lambda quick: run(QUICK_LENGTHS if quick else LENGTHS,
                                                      QUICK_AGENTS if quick else AGENTS))


if __name__ == "__main__":
    sys.exit(main())
