"""kernels: the course's Triton kernels.

Importing this package picks how kernels run (:mod:`kernels._runtime`): compiled on a CUDA GPU, or in
Triton's interpreter on CPU tensors when no GPU is visible. Nothing to set by hand.
"""

from ._runtime import INTERPRETED, TRITON_VERSION, expected_device
from .block_sparse import block_sparse_attention
from .differential import differential_flash_attention
from .flash import flash_attention
from .flash_bias import dense_bias_flash_attention, flash_bias_attention
from .linear_attention import chunked_linear_attention

__all__ = ["flash_attention", "differential_flash_attention", "chunked_linear_attention", "flash_bias_attention",
           "dense_bias_flash_attention", "block_sparse_attention", "INTERPRETED", "TRITON_VERSION", "expected_device"]
