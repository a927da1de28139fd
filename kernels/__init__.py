"""kernels: the course's Triton kernels.

Importing this package picks how kernels run (:mod:`kernels._runtime`): compiled on a CUDA GPU, or in
Triton's interpreter on CPU tensors when no GPU is visible. Nothing to set by hand.
"""

from ._runtime import INTERPRETED, TRITON_VERSION, expected_device
from .differential import differential_flash_attention
from .flash import flash_attention

__all__ = ["flash_attention", "differential_flash_attention", "INTERPRETED", "TRITON_VERSION", "expected_device"]
