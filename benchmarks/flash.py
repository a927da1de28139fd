r"""Time the course's FlashAttention kernel against PyTorch's SDPA on a GPU, and save the results.

Usage (on a machine with a CUDA GPU)::

    python -m benchmarks.flash                # the full sweep, results in benchmarks/
    python -m benchmarks.flash --quick        # fewer lengths, for a first look
    python -m benchmarks.flash --sweep-tiles  # which tile shapes are fastest on this card
    python -m benchmarks.flash --differential # lesson 13: the fused differential kernel (1k-16k tokens)

Protocol (as FlashAttention-3's paper plots): bfloat16, ``(B, H, N, d)`` contiguous with ``B * N = 16k``
tokens and ``H * d = 2048``, ``N`` from 512 to 16k, head dims 64 and 128, causal and not; forward, and
forward + backward. Each configuration is timed with ``triton.testing.do_bench`` (median and 20/80 %
quantiles, in milliseconds) for the kernel and for SDPA with its default backend choice and pinned to its
FlashAttention-2 backend, in the same process on the same inputs. Throughput uses the usual FLOP count:
forward $4 B H N^2 d$ (half when causal), backward 2.5 times the forward.

Before timing, each configuration's kernel output and gradients are compared with SDPA's, so a number
is never reported for a wrong result. The JSON file records the card, the date, and the versions of
torch, Triton, CUDA and cuDNN.

``--differential`` times the fused differential kernel (:func:`kernels.differential_flash_attention`,
both softmax maps in one pass over K and V) against two calls of :func:`kernels.flash_attention` and
against two SDPA calls, each followed by $O_1 - \lambda O_2$; bfloat16, ``N`` from 1k to 16k, the same
``B * N`` and ``H * d`` as above, values as wide as the queries (so that all three compute the same
function: lesson 01's kernel needs that). Its FLOP count is twice one attention's. It writes
``differential_<card>_<date>.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from . import common
from .common import (
    RESULTS,
    attention_flops,
    environment,
    gpu_timer,
    no_gpu,
    save_results,
    shape_for,
    time_call,
    time_implementations,
)

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 4096, 16384]
HEAD_DIMS = [64, 128]


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def run(q, k, v, causal):
        if backend is None:
            return scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def implementations() -> dict:
    from torch.nn.attention import SDPBackend

    from kernels import flash_attention

    return {
        "triton_flash": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
        "sdpa_default": _sdpa(None),
        "sdpa_flash2": _sdpa(SDPBackend.FLASH_ATTENTION),
    }


def check_against_sdpa(q, k, v, causal) -> dict:
    """Largest differences between the kernel and SDPA (default backend), forward and gradients."""
    fns = implementations()
    results = {}
    for name in ("triton_flash", "sdpa_default"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fns[name](*xs, causal)
        grad = torch.ones_like(out) / out.numel() ** 0.5
        out.backward(grad)
        results[name] = [out.float(), *(x.grad.float() for x in xs)]
    return {what: (a - b).abs().max().item()
            for what, a, b in zip(("out", "dq", "dk", "dv"), results["triton_flash"], results["sdpa_default"])}


def run(lengths, head_dims, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer, shape=shape_for) -> dict:
    """Check and time every configuration; ``device``, ``timer`` and ``shape`` exist so that the whole
    sweep can be rehearsed on a CPU at toy sizes (the tests do) before a GPU's time is spent on it."""
    torch.manual_seed(0)
    fns = implementations()
    records = []
    for head_dim in head_dims:
        for causal in (False, True):
            for length in lengths:
                batch, heads = shape(length, head_dim)
                q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
                           for _ in range(3))
                errors = check_against_sdpa(q[:1], k[:1], v[:1], causal)
                for mode in ("fwd", "fwd_bwd"):
                    row = dict(length=length, head_dim=head_dim, causal=causal, mode=mode, batch=batch,
                               heads=heads, max_abs_diff_vs_sdpa=errors, ms={}, tflops={})
                    flops = attention_flops(batch, heads, length, head_dim, causal, mode)
                    time_implementations(row, fns, lambda fn: time_call(lambda *t: fn(*t, causal), (q, k, v), mode,
                                                                        timer), flops)
                    records.append(row)
                    print(_format(row), flush=True)
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "results": records}


DIFF_LENGTHS = [1024, 2048, 4096, 8192, 16384]
DIFF_QUICK_LENGTHS = [1024, 4096, 16384]


def differential_implementations() -> dict:
    """The fused kernel and the two-call baselines, each ``fn(q1, k1, q2, k2, v, lam, causal)``."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels import differential_flash_attention, flash_attention

    return {
        "triton_diff": lambda q1, k1, q2, k2, v, lam, causal: differential_flash_attention(
            q1, k1, q2, k2, v, lam, causal=causal),
        "two_flash": lambda q1, k1, q2, k2, v, lam, causal: (
            flash_attention(q1, k1, v, causal=causal) - lam * flash_attention(q2, k2, v, causal=causal)),
        "two_sdpa": lambda q1, k1, q2, k2, v, lam, causal: (
            sdpa(q1, k1, v, is_causal=causal) - lam * sdpa(q2, k2, v, is_causal=causal)),
    }


def _differential_inputs(batch, heads, length, head_dim, dtype, device):
    tensors = [torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(5)]
    return tensors, torch.tensor(0.5, device=device, dtype=dtype)


def check_differential(inputs, lam, causal) -> dict:
    """Largest differences of the fused kernel and of two flash calls against two SDPA calls (out, 5 grads)."""
    fns = differential_implementations()
    results = {}
    for name, fn in fns.items():
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*xs, lam, causal)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        results[name] = [out.float(), *(x.grad.float() for x in xs)]
    whats = ("out", "dq1", "dk1", "dq2", "dk2", "dv")
    return {name: {w: (a - b).abs().max().item() for w, a, b in zip(whats, results[name], results["two_sdpa"])}
            for name in ("triton_diff", "two_flash")}


def run_differential(lengths, head_dims, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer,
                     shape=shape_for) -> dict:
    """Check and time the differential kernel against its two-call baselines (rehearsed on CPU by the tests)."""
    torch.manual_seed(0)
    fns = differential_implementations()
    records = []
    for head_dim in head_dims:
        for causal in (False, True):
            for length in lengths:
                batch, heads = shape(length, head_dim)
                inputs, lam = _differential_inputs(batch, heads, length, head_dim, dtype, device)
                errors = check_differential([x[:1] for x in inputs], lam, causal)
                for mode in ("fwd", "fwd_bwd"):
                    row = dict(length=length, head_dim=head_dim, causal=causal, mode=mode, batch=batch, heads=heads,
                               max_abs_diff_vs_two_sdpa=errors, ms={}, tflops={})
                    # two attention maps: twice the FLOPs of one
                    flops = 2 * attention_flops(batch, heads, length, head_dim, causal, mode)
                    time_implementations(row, fns, lambda fn: time_call(lambda *t: fn(*t, lam, causal), inputs, mode,
                                                                        timer), flops)
                    records.append(row)
                    print(_format_differential(row), flush=True)
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "differential": records}


def _format_differential(row) -> str:
    tf = {name: row["tflops"].get(name) for name in ("triton_diff", "two_flash", "two_sdpa")}
    shown = " ".join(f"{name} {value:6.1f}" if value else f"{name}    n/a" for name, value in tf.items())
    ratios = "".join(f"  fused/{name} {tf['triton_diff'] / tf[name]:.2f}" for name in ("two_flash", "two_sdpa")
                     if tf["triton_diff"] and tf[name])
    return (f"diff d={row['head_dim']:<3} causal={str(row['causal']):<5} N={row['length']:<5} {row['mode']:<7} "
            f"TFLOP/s {shown}{ratios}")


TILE_CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)],
    "dq": [(128, 32, 4, 4), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
}


def sweep_tiles(lengths, head_dims, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer, shape=shape_for,
                candidates=TILE_CANDIDATES) -> dict:
    """Time each kernel (forward, dK/dV, dQ) with every candidate tile shape, the others at their defaults.

    Tile shapes that do not compile (too much shared memory, say) are recorded with their error. The
    result says which tiles to make the defaults of :func:`kernels.flash.default_tiles` on this card.
    """
    from kernels.common import Tiles
    from kernels.flash import default_tiles, flash_backward, flash_forward

    torch.manual_seed(0)
    records = []
    for head_dim in head_dims:
        for causal in (False, True):
            for length in lengths:
                batch, heads = shape(length, head_dim)
                q, k, v, grad = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
                                 for _ in range(4))
                scale = 1 / math.sqrt(head_dim)
                defaults = default_tiles(head_dim, dtype)
                out, lse2 = flash_forward(q, k, v, causal=causal, scale=scale, tiles=defaults["fwd"])
                # each kernel's outputs as a list, for given tiles (the other kernels at their defaults)
                outputs = {
                    "fwd": lambda t: [flash_forward(q, k, v, causal=causal, scale=scale, tiles=t)[0]],
                    "dkdv": lambda t: list(flash_backward(q, k, v, out, lse2, grad, causal=causal, scale=scale,
                                                          dkdv_tiles=t, dq_tiles=defaults["dq"])[1:]),
                    "dq": lambda t: [flash_backward(q, k, v, out, lse2, grad, causal=causal, scale=scale,
                                                    dkdv_tiles=defaults["dkdv"], dq_tiles=t)[0]],
                }
                reference = {name: fn(defaults[name]) for name, fn in outputs.items()}
                for kernel, options in candidates.items():
                    for option in options:
                        tiles = Tiles(*option)
                        row = dict(kernel=kernel, head_dim=head_dim, causal=causal, length=length,
                                   tiles=list(option), default=tiles == defaults[kernel])
                        try:
                            # the result must not depend on the tiles: compare with the default tiles' result
                            row["max_abs_diff_vs_default"] = max(
                                (a.float() - b.float()).abs().max().item()
                                for a, b in zip(outputs[kernel](tiles), reference[kernel]))
                            row["ms"] = timer(lambda: outputs[kernel](tiles))
                        except Exception as error:  # noqa: BLE001  (a tile shape this card cannot run)
                            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        records.append(row)
                        shown = f"{row['ms'][0]:8.3f} ms" if "ms" in row else row["error"][:60]
                        print(f"{kernel:<4} d={head_dim:<3} causal={str(causal):<5} N={length:<5} "
                              f"tiles {option}{' (default)' if row['default'] else ''}: {shown}", flush=True)
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "tile_sweep": records}


def _format(row) -> str:
    def tf(name):
        value = row["tflops"].get(name)
        return f"{value:6.1f}" if value else "   n/a"

    ratio = ""
    if row["tflops"].get("triton_flash") and row["tflops"].get("sdpa_default"):
        ratio = f"  kernel/sdpa {row['tflops']['triton_flash'] / row['tflops']['sdpa_default']:.2f}"
    if row["tflops"].get("triton_flash") and row["tflops"].get("sdpa_flash2"):
        ratio += f"  kernel/fa2 {row['tflops']['triton_flash'] / row['tflops']['sdpa_flash2']:.2f}"
    return (f"d={row['head_dim']:<3} causal={str(row['causal']):<5} N={row['length']:<5} {row['mode']:<7} "
            f"TFLOP/s kernel {tf('triton_flash')} sdpa {tf('sdpa_default')} fa2 {tf('sdpa_flash2')}{ratio}")


def load_results(folder: Path = RESULTS, kind: str = "flash") -> list[dict]:
    """Every committed result file of this benchmark (``kind`` ``"flash"``, ``"differential"`` or ``"tiles"``)."""
    return common.load_results(folder, kind=kind)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the Triton FlashAttention kernel against SDPA.")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} only")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="instead: time each kernel with several tile shapes at 4k and 16k tokens")
    parser.add_argument("--differential", action="store_true",
                        help="instead: the fused differential kernel against two flash calls and two SDPA calls")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON file")
    args = parser.parse_args(argv)
    if no_gpu("benchmarks.flash"):
        return 2
    if args.sweep_tiles:
        results, kind = sweep_tiles([4096, 16384], HEAD_DIMS), "tiles"
    elif args.differential:
        results, kind = run_differential(DIFF_QUICK_LENGTHS if args.quick else DIFF_LENGTHS, HEAD_DIMS), "differential"
    else:
        results, kind = run(QUICK_LENGTHS if args.quick else LENGTHS, HEAD_DIMS), "flash"
    save_results(results, args.out, kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
