"""kernels: the course's Triton kernels. Torch and Triton only: nothing here imports the library.

Importing this package picks how kernels run (:mod:`kernels._runtime`): compiled on a CUDA GPU, or in
Triton's interpreter on CPU tensors when no GPU is visible. Nothing to set by hand.

The package is light to import: each kernel module (and Triton itself) is loaded on first use, so
``from kernels import flash_attention`` loads :mod:`kernels.flash` and what it needs, and nothing else.

Layout: :mod:`kernels.common` holds what every kernel shares (tiles, launch options, input checks, the
compile signature); each other module is one kernel family, forward and backward:
:mod:`kernels.flash` (lessons 01, 10, 31), :mod:`kernels.differential` (13),
:mod:`kernels.linear_attention` (30), :mod:`kernels.block_sparse` with :mod:`kernels.block_layout` (40-46),
:mod:`kernels.flash_bias` (50). :mod:`kernels.compile_check` compiles them all for a GPU without one.
"""

from __future__ import annotations

import importlib

from ._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()  # before anything imports Triton (see kernels._interpreter)

# public name -> the module that defines it
_EXPORTS = {
    "flash_attention": "flash",
    "differential_flash_attention": "differential",
    "chunked_linear_attention": "linear_attention",
    "flash_bias_attention": "flash_bias",
    "dense_bias_flash_attention": "flash_bias",
    "block_sparse_attention": "block_sparse",
    "BlockLayout": "block_layout",
    "build_block_layout": "block_layout",
    "INTERPRETED": "_runtime",
    "TRITON_VERSION": "_runtime",
    "expected_device": "_runtime",
}

_SUBMODULES = ("common", "flash", "differential", "linear_attention", "flash_bias", "block_sparse", "block_layout",
               "compile_check")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
