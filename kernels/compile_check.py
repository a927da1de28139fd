"""Compile the course's kernels for a GPU architecture, without a GPU.

Triton ships the NVIDIA assembler (``ptxas``), so a kernel can be compiled ahead of time for, say, an
H100 (``sm_90``) on any Linux machine. This catches what the CPU interpreter cannot: a ``tl.dot`` with
a dimension below 16, a construct the compiler rejects, tiles that need more shared memory than the
card has. It does not run anything, so it says nothing about speed or numerical results.

Usage::

    python -m kernels.compile_check            # sm_90 (H100/H200), the default tiles
    python -m kernels.compile_check --arch 80  # A100

It needs kernels defined for the compiler, not the interpreter: run as a script it restarts itself with
``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

# shared memory one thread block may use, in bytes (CUDA's per-block opt-in maximum)
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

CASES = [  # (dtype, head_dim, causal)
    ("fp16", 64, True),
    ("bf16", 128, False),
    ("fp16", 80, True),
    ("fp32", 128, True),
]

QUICK_CASES = [("bf16", 128, True), ("fp16", 64, False)]

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def kernel_signature(kernel, dtype: str, constexprs: dict, types: dict | None = None) -> dict:
    """Triton type strings for every argument of a kernel: ``"constexpr"`` for ``constexprs``, then ``types``
    (a kernel's own arguments, e.g. ``{"MASK": "*u8"}``), then the course's names: pointers to the data
    (``Q``, ``K``, ``V``, ``O`` and their gradients) in ``dtype``, statistics (``LSE``, ``DELTA``, ...) in
    float32, scales as float32 scalars, anything else a 32-bit integer."""
    types = types or {}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name in ("LSE", "DELTA", "LAM", "O2", "LSE1", "LSE2", "DELTA1", "DELTA2", "DQ2"):
            signature[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Q1", "K1", "Q2", "K2", "DQ1", "DK1", "DK2"):
            signature[name] = f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(kernel, dtype: str, constexprs: dict, tiles, arch: int, signature: dict | None = None):
    """Compile one kernel for ``sm_<arch>``; ``signature`` defaults to :func:`kernel_signature`'s guess."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    source = ASTSource(fn=kernel, signature=signature or kernel_signature(kernel, dtype, constexprs),
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))


def kernels_to_compile(dtype, head_dim: int) -> list[tuple]:
    """``(name, kernel, tiles, extra constexprs)`` for every kernel of the course at its default tiles.

    The differential kernels are compiled with values twice as wide as the queries (as in the papers).
    """
    import triton

    from kernels import differential, flash

    tiles = flash.default_tiles(head_dim, dtype)
    diff_tiles = differential.default_tiles(head_dim, 2 * head_dim, dtype)
    wide = dict(BLOCK_DV=max(16, triton.next_power_of_2(2 * head_dim)))
    return [
        ("forward", flash._fwd_kernel, tiles["fwd"], {}),
        ("backward dK dV", flash._bwd_dkdv_kernel, tiles["dkdv"], {}),
        ("backward dQ", flash._bwd_dq_kernel, tiles["dq"], {}),
        ("diff forward", differential._diff_fwd_kernel, diff_tiles["fwd"], dict(wide, STORE_AUX=True)),
        ("diff bwd dK dV", differential._diff_bwd_dkdv_kernel, diff_tiles["dkdv"], wide),
        ("diff bwd dQ", differential._diff_bwd_dq_kernel, diff_tiles["dq"], wide),
    ]


def targets_with_signatures(torch_dtype, head_dim: int, causal: bool) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` of the kernels that describe their own arguments
    (each kernel module's ``compile_targets``): chunked linear attention (always causal), FlashBias,
    block-sparse attention (whose mask comes as block lists, so ``causal`` does not apply)."""
    from kernels import block_sparse, flash_bias, linear_attention

    targets = list(linear_attention.compile_targets(torch_dtype, head_dim))  # named "linear ..."
    targets += [(f"bias {name}", *rest) for name, *rest in flash_bias.compile_targets(torch_dtype, head_dim, causal=causal)]
    targets += list(block_sparse.compile_targets(torch_dtype, head_dim))
    return targets


def check(arch: int = 90, cases=CASES) -> list[dict]:
    """Compile every kernel of the course for every case; return one record per compiled kernel."""
    import torch
    import triton

    records = []
    for dtype, head_dim, causal in cases:
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        jobs = []
        for name, kernel, kernel_tiles, extra in kernels_to_compile(torch_dtype, head_dim):
            constexprs = dict(CAUSAL=causal, BLOCK_M=kernel_tiles.block_m, BLOCK_N=kernel_tiles.block_n,
                              BLOCK_D=max(16, triton.next_power_of_2(head_dim)), UPCAST=False,
                              PRECISION="ieee" if dtype == "fp32" else "tf32", **extra)
            jobs.append((name, kernel, kernel_tiles, constexprs, None))
        jobs += targets_with_signatures(torch_dtype, head_dim, causal)
        for name, kernel, kernel_tiles, constexprs, signature in jobs:
            start = time.perf_counter()
            compiled = compile_kernel(kernel, dtype, constexprs, kernel_tiles, arch, signature)
            records.append(dict(kernel=name, dtype=dtype, head_dim=head_dim, causal=causal,
                                tiles=kernel_tiles, shared=compiled.metadata.shared,
                                seconds=time.perf_counter() - start))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability times 10 (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="two cases instead of four (what the tests run)")
    args = parser.parse_args(argv)
    limit = MAX_SHARED.get(args.arch, 99 * 1024)
    failed = 0
    for r in check(args.arch, QUICK_CASES if args.quick else CASES):
        ok = r["shared"] <= limit
        failed += not ok
        t = r["tiles"]
        print(f"[{'OK' if ok else 'FAIL'}] sm_{args.arch} {r['kernel']:<22} {r['dtype']} d={r['head_dim']:<3} "
              f"causal={str(r['causal']):<5} tiles {t.block_m}x{t.block_n} warps={t.num_warps} "
              f"stages={t.num_stages}: shared memory {r['shared'] / 1024:.0f} KiB (limit {limit / 1024:.0f}) "
              f"in {r['seconds']:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "0":
        # importing the package already chose the interpreter: start again with the compiler switched on
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execve(sys.executable, [sys.executable, "-m", "kernels.compile_check", *sys.argv[1:]], env)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    sys.exit(main())
