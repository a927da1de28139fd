"""What every benchmark of the course shares: shapes, FLOP counts, CUDA-event timing, the machine's
description and the dated JSON files the lessons plot.

Each benchmark module (:mod:`benchmarks.flash`, :mod:`benchmarks.agent`, :mod:`benchmarks.bias`,
:mod:`benchmarks.linear`, :mod:`benchmarks.sparse`) compares a kernel of ``kernels`` with the library's
reference and with PyTorch's SDPA; it sits above both packages, which never import it. Results are written
to this folder as ``<kind>_<card>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks"  # the dated JSON files live beside the code that writes them


TOKENS, WIDTH = 16384, 2048


def attention_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool, mode: str) -> float:
    """FLOPs of one call: forward $4BHN^2d$ (halved when causal); ``"fwd_bwd"`` is 3.5 times that."""
    forward = 4.0 * batch * heads * length * length * head_dim / (2 if causal else 1)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def shape_for(length: int, head_dim: int) -> tuple[int, int]:
    """``(batch, heads)`` with ``batch * length = 16k`` tokens and ``heads * head_dim = 2048``."""
    return max(1, TOKENS // length), WIDTH // head_dim


def gpu_timer(call) -> list[float]:
    """Median, 20 % and 80 % quantile of ``call()`` in ms, with CUDA events (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    return do_bench(call, quantiles=[0.5, 0.2, 0.8])


def time_call(fn, tensors, mode, timer=gpu_timer) -> list[float]:
    """Median, 20 % and 80 % quantile in ms of ``fn(*tensors)`` (``mode="fwd"``), or of that forward pass and
    the backward pass to every tensor in ``tensors`` (``"fwd_bwd"``; the output gradient is random, shaped
    like ``tensors[0]``)."""
    if mode == "fwd":
        return timer(lambda: fn(*tensors))
    xs = [x.detach().clone().requires_grad_() for x in tensors]
    grad = torch.randn_like(tensors[0])

    def step():
        for x in xs:
            x.grad = None
        fn(*xs).backward(grad)

    return timer(step)


def time_implementations(row: dict, fns: dict, time, flops=None) -> None:
    """Time every ``fns[name]`` with ``time(fn)`` into ``row["ms"][name]`` (median, 20 %, 80 % in ms) and, given
    ``flops`` (one number, or one per name), ``row["tflops"][name]``. A ``RuntimeError`` (out of memory, a
    backend that refuses the case) leaves ``None`` there and its first line in ``row["errors"][name]``."""
    for name, fn in fns.items():
        try:
            median, low, high = time(fn)
        except RuntimeError as error:
            row["ms"][name] = None
            row.setdefault("errors", {})[name] = str(error).splitlines()[0]
            continue
        row["ms"][name] = [median, low, high]
        if flops is not None:
            count = flops[name] if isinstance(flops, dict) else flops
            row["tflops"][name] = count / (median * 1e-3) / 1e12


def environment(device: str = "cuda") -> dict:
    import triton

    card = {"device": platform.processor() or platform.machine()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = {
            "device": torch.cuda.get_device_name(0),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return {
        **card,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }


def output_path(env: dict, folder: Path, kind: str = "flash") -> Path:
    card = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return folder / f"{kind}_{card}_{env['date']}.json"


def load_results(folder: Path = RESULTS, kind: str = "flash") -> list[dict]:
    """Every committed result file ``<kind>_*.json`` in ``folder``, oldest first."""
    return [json.loads(path.read_text()) for path in sorted(Path(folder).glob(f"{kind}_*.json"))]


def save_results(results: dict, folder: Path, kind: str) -> Path:
    """Write ``results`` to ``folder/<kind>_<card>_<date>.json``; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = output_path(results["environment"], folder, kind)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path


def no_gpu(program: str) -> bool:
    """Say so and return ``True`` when no CUDA GPU is visible (timings need one)."""
    if torch.cuda.is_available():
        return False
    print(f"{program}: no CUDA GPU is visible; timings need one (see benchmarks/ for committed results)")
    return True


def main_for(argv, *, kind: str, description: str, run_sweep, quick_lengths) -> int:
    """The command line of one kernel's benchmark: ``--quick`` and ``--out``, then ``run_sweep(quick)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=f"lengths {quick_lengths} only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON file")
    args = parser.parse_args(argv)
    if no_gpu(f"benchmarks.{kind}"):
        return 2
    save_results(run_sweep(args.quick), args.out, kind)
    return 0
