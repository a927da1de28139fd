"""Switch Triton's interpreter on when there is no GPU, before anything imports Triton.

Triton decides when a kernel or one of its own library functions is *defined* whether it will be
compiled or interpreted, from the environment variable ``TRITON_INTERPRET``. Some PyTorch modules import
Triton as a side effect (an optimizer step can), so the switch must happen early: importing ``kernels``
does it, and so does importing ``attnlib``. Setting ``TRITON_INTERPRET`` yourself always wins.
Torch only: this module does not import Triton.
"""

import os

import torch


def use_interpreter_without_gpu() -> None:
    """Set ``TRITON_INTERPRET=1`` unless it is set already or a CUDA device is visible."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
