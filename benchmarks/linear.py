r"""Time the chunked causal linear attention kernel against causal SDPA on a GPU, and save the results.

Usage (on a machine with a CUDA GPU)::

    python -m benchmarks.linear           # 1k to 64k tokens, head dims 64 and 128
    python -m benchmarks.linear --quick   # 1k, 4k, 16k

Protocol: bfloat16, ``(B, H, N, d)`` contiguous with ``B * N = 16k`` tokens (``B = 1`` beyond 16k) and
``H * d = 2048``. Three implementations of a causal mixer, in the same process on the same inputs:

- ``triton_linear``: linear attention with the kernel (:func:`kernels.linear_attention.chunked_linear_attention`
  on $\phi(Q), \phi(K)$ with $\phi = \mathrm{elu}+1$, then the prefix-sum normaliser);
- ``torch_chunked``: the same function with the PyTorch chunked form (:mod:`attnlib.linear.linear_attention`);
- ``sdpa_causal``: softmax attention, ``scaled_dot_product_attention(is_causal=True)`` (default backend).

Softmax and linear attention are different functions, so the comparison is of cost, not of results:
before timing, the kernel is checked against the PyTorch chunked form (forward and gradients). Each
configuration is timed with ``triton.testing.do_bench`` (median and 20/80 % quantiles, ms), forward and
forward + backward. The course's goal for the kernel (not yet measured): faster than causal SDPA from
4k tokens, at least 3x at 16k. The JSON file ``benchmarks/linear_<card>_<date>.json`` records the card,
the date and the versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import common
from .common import RESULTS, environment, gpu_timer, time_call, time_implementations

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128]
TOKENS, WIDTH = 16384, 2048


def shape_for(length: int, head_dim: int) -> tuple[int, int]:
    """``(batch, heads)`` with ``batch * length = 16k`` tokens (batch 1 from 16k on) and ``heads * head_dim = 2048``."""
    return max(1, TOKENS // length), WIDTH // head_dim


def _elu1(x):
    return torch.nn.functional.elu(x) + 1


def implementations() -> dict:
    """Each ``fn(q, k, v) -> (B, H, N, d)``, a causal token mixer."""
    from torch.nn.functional import scaled_dot_product_attention

    from attnlib.linear.linear_attention import linear_attention

    return {
        "triton_linear": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="kernel"),
        "torch_chunked": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="reference"),
        "sdpa_causal": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def check_against_torch(q, k, v) -> dict:
    """Largest relative differences of the kernel's linear attention against the PyTorch chunked form."""
    fns = implementations()
    results = {}
    for name in ("triton_linear", "torch_chunked"):
        xs = [x.detach().float().clone().requires_grad_() for x in (q, k, v)]
        out = fns[name](*xs)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        results[name] = [out, *(x.grad for x in xs)]
    return {what: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            for what, a, b in zip(("out", "dq", "dk", "dv"), results["triton_linear"], results["torch_chunked"])}


def run(lengths, head_dims, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer, shape=shape_for,
        check_length: int = 4096) -> dict:
    """Check and time every configuration; ``device``, ``timer`` and ``shape`` let the sweep be rehearsed on
    a CPU at toy sizes (the tests do). The check runs on one head of the first ``check_length`` tokens."""
    torch.manual_seed(0)
    fns = implementations()
    records = []
    for head_dim in head_dims:
        for length in lengths:
            batch, heads = shape(length, head_dim)
            q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
            errors = check_against_torch(*(x[:1, :1, :check_length] for x in (q, k, v)))
            for mode in ("fwd", "fwd_bwd"):
                row = dict(length=length, head_dim=head_dim, mode=mode, batch=batch, heads=heads,
                           max_rel_diff_vs_torch=errors, ms={}, speedup_vs_sdpa=None)
                time_implementations(row, fns, lambda fn: time_call(fn, (q, k, v), mode, timer))
                if row["ms"].get("triton_linear") and row["ms"].get("sdpa_causal"):
                    row["speedup_vs_sdpa"] = row["ms"]["sdpa_causal"][0] / row["ms"]["triton_linear"][0]
                records.append(row)
                print(_format(row), flush=True)
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "linear": records}


def _format(row) -> str:
    shown = " ".join(f"{name} {ms[0]:8.3f}" if ms else f"{name}      n/a" for name, ms in row["ms"].items())
    ratio = f"  sdpa/kernel {row['speedup_vs_sdpa']:.2f}" if row["speedup_vs_sdpa"] else ""
    return f"linear d={row['head_dim']:<3} N={row['length']:<6} {row['mode']:<7} ms {shown}{ratio}"


def load_results(folder: Path = RESULTS) -> list[dict]:
    """Every result file ``linear_*.json`` in ``folder``, oldest first."""
    return common.load_results(folder, kind="linear")


def main(argv=None) -> int:
    return common.main_for(argv, kind="linear", quick_lengths=QUICK_LENGTHS,
                          description="Benchmark chunked causal linear attention against causal SDPA.",
                          run_sweep=lambda quick: run(QUICK_LENGTHS if quick else LENGTHS, HEAD_DIMS))


if __name__ == "__main__":
    sys.exit(main())
