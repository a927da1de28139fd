"""Choose how Triton kernels run: compiled on a CUDA GPU, or Triton's interpreter on the CPU.

Triton decides when a kernel is *defined* (at ``@triton.jit``) whether it will be compiled or
interpreted, from the ``TRITON_INTERPRET`` environment variable. This module runs before any kernel of
the course is defined: without a CUDA device it switches the interpreter on, so that a learner on a
laptop never has to set anything. Setting ``TRITON_INTERPRET=1`` yourself forces the interpreter on a
GPU machine too (then pass CPU tensors).
"""

from __future__ import annotations

import os
import sys

import torch

from ._interpreter import use_interpreter_without_gpu

_triton_was_imported = "triton.language" in sys.modules
use_interpreter_without_gpu()

import triton  # noqa: E402  (imported after the switch on purpose)
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
"""True when kernels run in Triton's interpreter (on CPU tensors), False when they are compiled."""

if INTERPRETED and _triton_was_imported and isinstance(tl.zeros, JITFunction):
    # Triton's own library functions (tl.zeros, tl.sum, ...) were defined for the compiler before the
    # interpreter was switched on; interpreted kernels cannot call them.
    raise ImportError(
        "kernels: Triton was imported (by another module, before attnlib or kernels) with its interpreter "
        "off, and there is no GPU to compile for. Restart the Python kernel and import attnlib or kernels "
        "first (before training anything), or set TRITON_INTERPRET=1 before starting Python."
    )

TRITON_VERSION: str = triton.__version__


def expected_device() -> str:
    """The device kernels take their tensors on: ``"cpu"`` when interpreting, else ``"cuda"``."""
    return "cpu" if INTERPRETED else "cuda"


def check_device(name: str, x: torch.Tensor) -> None:
    """Raise a clear error if ``x`` is not on the device the kernels run on."""
    want = expected_device()
    if x.device.type != want:
        how = ("the kernels are compiled for the GPU here: move the tensors with .cuda()" if want == "cuda"
               else "no GPU is visible, so the kernels run in Triton's interpreter on CPU tensors")
        raise ValueError(f"{name}: expected a {want} tensor, got one on {x.device} ({how})")
