"""Compile the course's kernels for a GPU architecture, without a GPU.

Triton ships the NVIDIA assembler (``ptxas``), so a kernel can be compiled ahead of time for, say, an
H100 (``sm_90``) on any Linux machine. This catches what the CPU interpreter cannot: a ``tl.dot`` with
a dimension below 16, a construct the compiler rejects, tiles that need more shared memory than the
card has. It does not run anything, so it says nothing about speed or numerical results.

Usage::

    python -m kernels.compile_check            # sm_90 (H100/H200): every kernel, four cases
    python -m kernels.compile_check --arch 80  # A100
    python -m kernels.compile_check --quick    # one case, one or two kernels per family (the tests)

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

QUICK_CASES = [("bf16", 128, True)]

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def compile_kernel(kernel, constexprs: dict, tiles, arch: int, signature: dict):
    """Compile one kernel for ``sm_<arch>``; ``signature`` gives every argument's Triton type."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))


# each kernel family, and whether its kernels take a causal flag (chunked linear attention is always causal;
# the block-sparse kernel's mask comes as block lists)
FAMILIES = (("flash", True), ("differential", True), ("linear_attention", False), ("flash_bias", True),
            ("block_sparse", False))

# what the tests compile: one case, and in each family the kernels most likely to break (every forward, the
# flash backward that holds two key-sized accumulators, the block-sparse forward with its per-key bias)
QUICK_KERNELS = ("forward", "backward dK dV", "diff forward", "linear forward", "bias lowrank forward",
                 "block-sparse forward + bias")


def targets(torch_dtype, head_dim: int, causal: bool) -> list[tuple]:
    """``(name, kernel, tiles, constexprs, signature)`` of every kernel of the course (each kernel module's
    ``compile_targets``, at its default GPU tiles)."""
    import importlib

    jobs = []
    for family, takes_causal in FAMILIES:
        module = importlib.import_module(f"kernels.{family}")
        options = dict(causal=causal) if takes_causal else {}
        prefix = "bias " if family == "flash_bias" else ""
        jobs += [(prefix + name, *rest) for name, *rest in module.compile_targets(torch_dtype, head_dim, **options)]
    return jobs


def check(arch: int = 90, cases=CASES, only: tuple[str, ...] | None = None) -> list[dict]:
    """Compile every kernel of the course (or those named in ``only``) for every case; one record per kernel."""
    import torch

    records = []
    for dtype, head_dim, causal in cases:
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        for name, kernel, kernel_tiles, constexprs, signature in targets(torch_dtype, head_dim, causal):
            if only is not None and name not in only:
                continue
            start = time.perf_counter()
            compiled = compile_kernel(kernel, constexprs, kernel_tiles, arch, signature)
            records.append(dict(kernel=name, dtype=dtype, head_dim=head_dim, causal=causal,
                                tiles=kernel_tiles, shared=compiled.metadata.shared,
                                seconds=time.perf_counter() - start))
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability times 10 (90 = H100)")
    parser.add_argument("--quick", action="store_true",
                        help="one case and a representative kernel of each family (what the tests run)")
    args = parser.parse_args(argv)
    limit = MAX_SHARED.get(args.arch, 99 * 1024)
    failed = 0
    for r in check(args.arch, *((QUICK_CASES, QUICK_KERNELS) if args.quick else (CASES,))):
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
