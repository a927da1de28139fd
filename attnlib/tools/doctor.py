"""Check that this machine can run the course: ``python -m attnlib.tools.doctor``.

Prints one line per check, ``[OK]``, ``[INFO]`` or ``[FAIL]``, that can be pasted as they are into a
bug report: the platform, the versions of the packages the course uses, whether a CUDA GPU is visible,
whether the Triton kernels will be compiled or interpreted, and the result of one tiny FlashAttention
call checked against the reference. Exits with status 1 when any check fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# (distribution on the package index, module to import, why the course needs it)
PACKAGES = [
    ("torch", "torch", "tensors and autograd"),
    ("triton", "triton", "the kernels (compiled on a GPU, interpreted on a CPU)"),
    ("numpy", "numpy", "arrays"),
    ("matplotlib", "matplotlib", "figures"),
    ("ipywidgets", "ipywidgets", "the interactive controls"),
    ("jupyterlab", "jupyterlab", "the course's front end (make lab)"),
    ("jupyterlab_widgets", "jupyterlab_widgets", "ipywidgets' JupyterLab extension"),
    ("scikit-learn", "sklearn", "small real data sets (digits, photographs)"),
    ("nbval", "nbval", "running the notebooks as tests"),
    ("pytest", "pytest", "the tests and the exercise checks"),
]

MIN_PYTHON = (3, 10)
FIX = "run `make setup` (or `pip install -r requirements.txt`) in the course's folder"


@dataclass
class Check:
    """One line of the report: ``status`` is ``"OK"``, ``"INFO"`` or ``"FAIL"``."""

    status: str
    what: str
    detail: str

    def line(self) -> str:
        return f"{'[' + self.status + ']':7} {self.what}: {self.detail}"


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("FAIL", "python", f"{version} is too old; the course needs {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Check("OK", "python", f"{version} ({sys.executable})")


def check_platform() -> Check:
    return Check("INFO", "platform", f"{platform.system()} {platform.release()}, {platform.machine()}")


def check_package(distribution: str, module: str, why: str) -> Check:
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install can raise anything, not only ImportError
        return Check("FAIL", distribution, f"cannot be imported ({type(error).__name__}: {error}); needed for {why}; {FIX}")
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sys.modules[module], "__version__", "unknown version")
    return Check("OK", distribution, version)


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("INFO", "gpu", "no CUDA GPU visible: every notebook runs on the CPU, kernels in Triton's "
                                    "interpreter (slow, so the notebooks use small sizes)")
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    return Check("OK", "gpu", f"{name}, compute capability {major}.{minor}, CUDA {torch.version.cuda}")


def check_kernel_mode() -> Check:
    import kernels

    mode = "interpreted on the CPU" if kernels.INTERPRETED else "compiled for the GPU"
    return Check("OK", "kernels", f"Triton {kernels.TRITON_VERSION}, {mode}, tensors on {kernels.expected_device()!r}")


def check_tiny_kernel() -> Check:
    """Run the FlashAttention kernel once on a tiny problem and compare it with the reference."""
    import torch

    import attnlib
    from kernels import expected_device, flash_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=generator) for _ in range(3))
    q, k, v = (t.to(expected_device()) for t in (q, k, v))
    start = time.perf_counter()
    try:
        out = flash_attention(q, k, v, causal=True)
    except Exception as error:
        return Check("FAIL", "flash kernel", f"did not run ({type(error).__name__}: {error})")
    seconds = time.perf_counter() - start
    error = (out.float().cpu() - attnlib.attention(q.cpu(), k.cpu(), v.cpu(), causal=True)).abs().max().item()
    if not error < 1e-2:
        return Check("FAIL", "flash kernel", f"ran, but differs from the reference by {error:.2e}")
    return Check("OK", "flash kernel", f"ran in {seconds:.2f} s, max difference from the reference {error:.1e}")


def check_figure() -> Check:
    """Render a small matplotlib figure to PNG (what every lesson does)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Check("OK", "figures", f"matplotlib renders PNG (backend {matplotlib.get_backend()})")


def run_checks() -> list[Check]:
    """Every check, in order; a check that cannot run (a package is missing) becomes a FAIL line."""
    checks = [check_python(), check_platform()]
    checks += [check_package(*package) for package in PACKAGES]
    missing = {c.what for c in checks if c.status == "FAIL"}
    steps: list[tuple[str, Callable[[], Check], set]] = [
        ("gpu", check_gpu, {"torch"}),
        ("kernels", check_kernel_mode, {"torch", "triton"}),
        ("flash kernel", check_tiny_kernel, {"torch", "triton"}),
        ("figures", check_figure, {"matplotlib"}),
    ]
    for what, step, needs in steps:
        if needs & missing:
            checks.append(Check("FAIL", what, f"not checked: needs {', '.join(sorted(needs & missing))}"))
            continue
        try:
            checks.append(step())
        except Exception as error:
            checks.append(Check("FAIL", what, f"{type(error).__name__}: {error}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    checks = run_checks()
    for check in checks:
        print(check.line())
    failed = [c.what for c in checks if c.status == "FAIL"]
    if failed:
        print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}. Paste these lines into your bug report.")
        return 1
    print("\nAll checks passed: open the course with `make lab`.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
