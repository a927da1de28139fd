r"""Time FlashBias (lesson 50) against attention with a dense bias, on a GPU, and save the results.

Usage (on a machine with a CUDA GPU)::

    python -m benchmarks.bias            # N = 1k ... 16k
    python -m benchmarks.bias --quick    # N = 1k, 4k, 16k

Four implementations of $O = \operatorname{softmax}(s\,QK^\top + UW^\top)V$, on the same inputs:

* ``flashbias``: :func:`kernels.flash_bias.flash_bias_attention`, the factors inside the tile loop;
* ``dense_flash``: :func:`kernels.flash_bias.dense_bias_flash_attention`, the same kernel reading a dense
  $(B, H, N, N)$ bias tile by tile (the bias is a constant: no bias gradient);
* ``sdpa_dense``: PyTorch's SDPA with the dense bias as a float ``attn_mask``;
* ``sdpa_concat``: SDPA with scale 1 on $[sQ \| U]$ and $[K \| W]$, zero-padded to a multiple of 8
  (FlashBias's "no new kernel" form).

Setting: bfloat16, head dim 64, rank 8 (the paper's kernel benchmark uses rank 8), factors in bfloat16 as in
the official benchmark, ``B * N = 16k`` tokens and ``H * d = 2048`` (as :mod:`benchmarks.flash`), non-causal and
causal, forward and forward + backward. Each configuration is checked against ``sdpa_dense`` first (output and
the gradients of q, k, v), then timed with CUDA events (median and 20/80 % quantiles in ms). The dense bias
is materialised once per configuration, outside the timed region (its $H N^2$ bytes are 16 GiB at 16k).
Throughput uses :func:`benchmarks.common.attention_flops` (the $UW^\top$ FLOPs are not counted).

The course's goal (not yet measured on a card): ``flashbias`` at least 1.3x faster than ``dense_flash`` at
8k-16k tokens (forward), the paper's repository reporting 1.87x forward and 1.46x forward+backward against a
dense-bias Triton kernel.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from . import common
from .common import RESULTS, attention_flops, environment, gpu_timer, shape_for, time_call, time_implementations

LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 4096, 16384]
HEAD_DIM, RANK = 64, 8
NAMES = ("flashbias", "dense_flash", "sdpa_dense", "sdpa_concat")


def implementations() -> dict:
    """Each ``fn(q, k, v, u, w, bias, causal)``; ``bias`` is ``U W^T`` materialised (used by the dense ones)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from attnlib.bias.flash_bias import concat_bias_inputs
    from kernels.flash_bias import dense_bias_flash_attention, flash_bias_attention

    def sdpa_dense(q, k, v, u, w, bias, causal):
        if causal:  # SDPA takes a mask or is_causal, not both: fold the causal mask into the bias
            n, m = q.shape[2], k.shape[2]
            future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1)
            bias = bias.masked_fill(future, float("-inf"))
        return sdpa(q, k, v, attn_mask=bias)

    def sdpa_concat(q, k, v, u, w, bias, causal):
        q_cat, k_cat = concat_bias_inputs(q, k, u, w, multiple=8)
        return sdpa(q_cat, k_cat, v, is_causal=causal, scale=1.0)

    return {
        "flashbias": lambda q, k, v, u, w, bias, causal: flash_bias_attention(q, k, v, u, w, causal=causal),
        "dense_flash": lambda q, k, v, u, w, bias, causal: dense_bias_flash_attention(q, k, v, bias, causal=causal),
        "sdpa_dense": sdpa_dense,
        "sdpa_concat": sdpa_concat,
    }


def make_inputs(batch, heads, length, head_dim, rank, dtype, device, seed=0):
    """``q, k, v (B, H, N, d)``, factors ``u, w (B, H, N, r)`` (entries of size ~1/sqrt(r)) and ``bias = U W^T``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    u, w = (torch.randn(batch, heads, length, rank, device=device, dtype=dtype, generator=g) / rank**0.25
            for _ in range(2))
    bias = torch.matmul(u, w.transpose(-2, -1))
    return q, k, v, u, w, bias


def check_against_sdpa_dense(inputs, causal) -> dict:
    """Largest differences of every implementation against ``sdpa_dense``: ``out, dq, dk, dv``."""
    q, k, v, u, w, bias = inputs
    results = {}
    for name, fn in implementations().items():
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fn(*xs, u, w, bias, causal)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        results[name] = [out.float(), *(x.grad.float() for x in xs)]
    return {name: {what: (a - b).abs().max().item()
                   for what, a, b in zip(("out", "dq", "dk", "dv"), results[name], results["sdpa_dense"])}
            for name in NAMES if name != "sdpa_dense"}


def time_one(fn, inputs, causal, mode, timer=gpu_timer) -> list[float]:
    """Median, 20 % and 80 % quantile of one call in ms (``"fwd"`` or ``"fwd_bwd"``, gradients of q, k, v)."""
    q, k, v, u, w, bias = inputs
    return time_call(lambda *qkv: fn(*qkv, u, w, bias, causal), (q, k, v), mode, timer)


def run(lengths, head_dim=HEAD_DIM, rank=RANK, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer,
        shape=shape_for) -> dict:
    """Check and time every configuration; ``device``, ``timer`` and ``shape`` let the tests rehearse it on a CPU."""
    torch.manual_seed(0)
    fns = implementations()
    records = []
    for causal in (False, True):
        for length in lengths:
            batch, heads = shape(length, head_dim)
            inputs = make_inputs(batch, heads, length, head_dim, rank, dtype, device)
            errors = check_against_sdpa_dense([x[:1] for x in inputs], causal)
            for mode in ("fwd", "fwd_bwd"):
                row = dict(length=length, head_dim=head_dim, rank=rank, causal=causal, mode=mode, batch=batch,
                           heads=heads, max_abs_diff_vs_sdpa_dense=errors, ms={}, tflops={})
                flops = attention_flops(batch, heads, length, head_dim, causal, mode)
                time_implementations(row, fns, partial(time_one, inputs=inputs, causal=causal, mode=mode, timer=timer), flops)
                records.append(row)
                print(_format(row), flush=True)
            del inputs
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "bias": records}


def speedups(row) -> dict:
    """``flashbias`` against each other implementation: time ratio (> 1 means FlashBias is faster)."""
    ms = row["ms"]
    if not ms.get("flashbias"):
        return {}
    return {name: ms[name][0] / ms["flashbias"][0] for name in NAMES[1:] if ms.get(name)}


def _format(row) -> str:
    shown = " ".join(f"{n} {row['tflops'][n]:6.1f}" if row["tflops"].get(n) else f"{n}    n/a" for n in NAMES)
    ratios = "".join(f"  x{value:.2f} vs {name}" for name, value in speedups(row).items())
    return (f"bias d={row['head_dim']} r={row['rank']} causal={str(row['causal']):<5} N={row['length']:<5} "
            f"{row['mode']:<7} TFLOP/s {shown}{ratios}")


def load_results(folder: Path = RESULTS) -> list[dict]:
    """Every committed result file ``bias_*.json`` in ``folder``, oldest first."""
    return common.load_results(folder, kind="bias")


def main(argv=None) -> int:
    return common.main_for(argv, kind="bias", quick_lengths=QUICK_LENGTHS,
                          description="Benchmark FlashBias against dense-bias attention.",
                          run_sweep=lambda quick: run(QUICK_LENGTHS if quick else LENGTHS))


if __name__ == "__main__":
    sys.exit(main())
