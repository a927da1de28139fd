r"""Time the block-sparse kernel (lesson 40) on 1-D neighborhood windows, on a GPU, and save the results.

Usage (on a machine with a CUDA GPU)::

    python -m benchmarks.sparse            # N = 8k, 16k, 32k
    python -m benchmarks.sparse --quick    # N = 8k, 32k

For each length $N$ and window $K = N/16$ (93.75 % sparse, a 16x bound by density, as NATTEN's 1-D
profile at 32k with $K = 2048$), three windows of generalized neighborhood attention
(:func:`attnlib.sparse.neighborhood.neighborhood_mask_1d`): ``sliding`` (stride 1), ``strided`` (stride $K/8$)
and ``blocked`` (stride $K$); then the mask of each of lessons 41-46 at the same length (``radial``,
``freeswim``, ``hip``, ``dma``, ``rectified``: each lesson module's ``benchmark_mask``, which says which
setting of its paper it mimics; head 0 where the mask differs per head). Three implementations on the same
inputs:

* ``sparse``: :func:`kernels.block_sparse.block_sparse_attention` with the window's layout (built once,
  outside the timed region);
* ``full_list``: the same kernel on an all-``True`` mask (every tile visited, none masked): the dense
  problem for this kernel;
* ``sdpa``: PyTorch's dense SDPA without a mask.

Each configuration is checked against :func:`attnlib.attention` with the mask first (one batch element and
head: output and the gradients of q, k, v), then timed with CUDA events (median and 20/80 % quantiles in ms),
forward and forward + backward. The result that matters is the **efficiency against the tile-level bound**:

$$\text{efficiency} = \frac{t_\text{full\_list} / t_\text{sparse}}{T_qT_k / \#\text{visited tiles}} .$$

The course's goal (not yet measured on a card): at least 0.5 of the bound for the sliding window and 0.75
for tile-aligned (strided, blocked) windows, forward, at 8k-32k tokens; and faster than dense SDPA. NATTEN's
Hopper kernel reaches 52 % (sliding) and 79-83 % (strided, blocked) of its bound on an H100.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from . import common
from .common import RESULTS, environment, gpu_timer, shape_for, time_call, time_implementations

LENGTHS = [8192, 16384, 32768]
QUICK_LENGTHS = [8192, 32768]
HEAD_DIM = 128
NAMES = ("sparse", "full_list", "sdpa")
FAMILIES = ("sliding", "strided", "blocked")
# the masks of lessons 41-46, each from its module's ``benchmark_mask(length, device=, seed=)``
PAPER_MASKS = {"radial": "radial", "freeswim": "freeswim", "hip": "hip", "dma": "dynamic_mask",
               "rectified": "rectified_sparse"}


def window_for(length: int, family: str, fraction: int = 16) -> tuple[int, int]:
    """``(kernel_size, stride)`` of a family at ``length``: window ``length / fraction``."""
    window = max(1, length // fraction)
    stride = {"sliding": 1, "strided": max(1, window // 8), "blocked": window}[family]
    return window, stride


def paper_mask(length: int, family: str, device) -> torch.Tensor:
    """The ``(length, length)`` mask of one of lessons 41-46 (head 0 where the lesson's mask has heads)."""
    module = importlib.import_module(f"attnlib.sparse.{PAPER_MASKS[family]}")
    mask = module.benchmark_mask(length, device=device, seed=0)
    return mask[0] if mask.dim() == 3 else mask


def make_case(length, family, block_m, block_n, device, fraction=16) -> dict:
    """The mask, its layout, the all-``True`` mask and its layout, and the tile counts."""
    from attnlib.sparse.block_sparse import build_block_layout, tile_counts
    from attnlib.sparse.neighborhood import neighborhood_mask_1d

    if family in PAPER_MASKS:
        window = stride = None
        mask = paper_mask(length, family, device)
    else:
        window, stride = window_for(length, family, fraction)
        mask = neighborhood_mask_1d(length, window, stride=stride, device=device)
    full = torch.ones(length, length, dtype=torch.bool, device=device)
    counts = tile_counts(mask, block_m, block_n)
    return dict(window=window, stride=stride, mask=mask, layout=build_block_layout(mask, block_m, block_n),
                full=full, full_layout=build_block_layout(full, block_m, block_n), counts=counts,
                bound=counts["dense"] / max(counts["visited"], 1))


def implementations(case) -> dict:
    """Each ``fn(q, k, v)``."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from kernels.block_sparse import block_sparse_attention

    return {
        "sparse": lambda q, k, v: block_sparse_attention(q, k, v, case["mask"], layout=case["layout"]),
        "full_list": lambda q, k, v: block_sparse_attention(q, k, v, case["full"], layout=case["full_layout"]),
        "sdpa": lambda q, k, v: sdpa(q, k, v),
    }


def check_against_reference(q, k, v, case) -> dict:
    """Largest differences of ``sparse`` and ``full_list`` against :func:`attnlib.attention` (masked / dense)."""
    from attnlib import attention

    fns = implementations(case)
    errors = {}
    for name, mask in (("sparse", case["mask"]), ("full_list", None)):
        results = []
        for fn in (fns[name], lambda *t: attention(*(x.float() for x in t), mask=mask)):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            out = fn(*xs)
            out.backward(torch.ones_like(out) / out.numel() ** 0.5)
            results.append([out.float(), *(x.grad.float() for x in xs)])
        errors[name] = {what: (a - b).abs().max().item() for what, a, b in zip(("out", "dq", "dk", "dv"), *results)}
    return errors


def run(lengths, head_dim=HEAD_DIM, dtype=torch.bfloat16, *, device="cuda", timer=gpu_timer, shape=shape_for,
        block_m=None, block_n=None, fraction=16, families=FAMILIES + tuple(PAPER_MASKS)) -> dict:
    """Check and time every configuration; ``device``, ``timer``, ``shape`` and the blocks let the tests
    rehearse it on a CPU."""
    from kernels.block_sparse import default_tiles

    tiles = default_tiles(head_dim, dtype)["fwd"]
    block_m, block_n = block_m or tiles.block_m, block_n or tiles.block_n
    records = []
    for length in lengths:
        batch, heads = shape(length, head_dim)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        for family in families:
            case = make_case(length, family, block_m, block_n, device, fraction)
            errors = check_against_reference(q[:1, :1], k[:1, :1], v[:1, :1], case)
            for mode in ("fwd", "fwd_bwd"):
                row = dict(length=length, family=family, window=case["window"], stride=case["stride"], mode=mode,
                           batch=batch, heads=heads, head_dim=head_dim, block_m=block_m, block_n=block_n,
                           tiles=case["counts"], tile_bound=case["bound"], max_abs_diff_vs_reference=errors, ms={})
                time_implementations(row, implementations(case), lambda fn: time_call(fn, (q, k, v), mode, timer))
                row.update(summary(row))
                records.append(row)
                print(_format(row), flush=True)
            del case
    return {"environment": environment(device), "dtype": str(dtype).replace("torch.", ""), "sparse": records}


def summary(row) -> dict:
    """Speed-up over the full list and over SDPA (time ratios), and the efficiency against the tile bound."""
    ms = row["ms"]
    if not ms.get("sparse"):
        return {}
    out = {}
    if ms.get("full_list"):
        out["speedup_vs_full_list"] = ms["full_list"][0] / ms["sparse"][0]
        out["efficiency_vs_tile_bound"] = out["speedup_vs_full_list"] / row["tile_bound"]
    if ms.get("sdpa"):
        out["speedup_vs_sdpa"] = ms["sdpa"][0] / ms["sparse"][0]
    return out


def _format(row) -> str:
    parts = [f"{name} {row['ms'][name][0]:8.3f} ms" if row["ms"].get(name) else f"{name}      n/a" for name in NAMES]
    extra = ""
    if "efficiency_vs_tile_bound" in row:
        extra = (f"  x{row['speedup_vs_full_list']:.2f} of bound {row['tile_bound']:.2f} "
                 f"(efficiency {row['efficiency_vs_tile_bound']:.2f})")
    window = f"K={row['window']:<5} s={row['stride']:<5}" if row["window"] else f"{'':<15}"
    return (f"sparse {row['family']:<9} N={row['length']:<6} {window} "
            f"{row['mode']:<7} " + " ".join(parts) + extra)


def load_results(folder: Path = RESULTS) -> list[dict]:
    """Every committed result file ``sparse_*.json`` in ``folder``, oldest first."""
    return common.load_results(folder, kind="sparse")


def main(argv=None) -> int:
    return common.main_for(argv, kind="sparse", quick_lengths=QUICK_LENGTHS,
                          description="Benchmark the block-sparse kernel on neighborhood windows and the "
                                      "masks of lessons 41-46.",
                          run_sweep=lambda quick: run(QUICK_LENGTHS if quick else LENGTHS))


if __name__ == "__main__":
    sys.exit(main())
