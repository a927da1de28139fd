"""attnlib: the course's library of attention mechanisms.

Start with :func:`attention` (the reference every lesson builds on), :func:`blockwise_attention` (the
same result in linear memory), :class:`MultiHeadAttention`, the masks in :mod:`attnlib.masks`, and the
mechanism registry (:func:`build_mechanism`, :func:`list_mechanisms`). The Triton kernels live in the
sibling package ``kernels``, which stands alone (torch and Triton only); the library calls them for
``backend="kernel"``.

The folders follow the course map:

* the core, here: :mod:`~attnlib.core` (attention, softmax), :mod:`~attnlib.masks`, :mod:`~attnlib.online`
  (online softmax, lesson 01), :mod:`~attnlib.modules` (multi-head attention), :mod:`~attnlib.registry`;
* one package per part of the course, one module per mechanism: :mod:`attnlib.heads` (part 1, lessons 10-14),
  ``attnlib.form`` (part 2, 20-24), :mod:`attnlib.linear` (part 3, 30-32), :mod:`attnlib.sparse` (part 4, 40-47),
  :mod:`attnlib.bias` (part 5, 50), ``attnlib.vision`` (part 6, 60-68), ``attnlib.reading`` (part 7, 70-77);
  a lesson's module has the paper's name: lesson 41 is :mod:`attnlib.sparse.radial`;
* the teaching tools, :mod:`attnlib.tools`: plotting, widgets, progress bars, the synthetic tasks, the tiny
  transformer, the training loop and the environment doctor.

Importing ``attnlib`` loads the core only (torch, no matplotlib, no ipywidgets, no Triton); everything else is
imported on first use. The registry finds every mechanism module by itself, so adding a lesson touches no list.
"""

import importlib
import pkgutil

from kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()  # before anything imports Triton (see kernels._interpreter)

from . import masks  # noqa: E402
from .core import attention, attention_naive, masked_softmax, repeat_kv  # noqa: E402
from .masks import (  # noqa: E402
    and_masks,
    causal,
    causal_mask,
    key_padding,
    make_mask,
    not_mask,
    or_masks,
    padding_mask,
    sliding_window,
    sliding_window_mask,
)
from .modules import MultiHeadAttention  # noqa: E402
from .online import blockwise_attention, online_softmax_step  # noqa: E402
from .registry import Mechanism, build_mechanism, get_mechanism, list_mechanisms, register_mechanism  # noqa: E402

# the teaching tools most lessons use, imported on first use: name -> module
_LAZY = {
    "TinyTransformer": "tools.transformer",
    "train": "tools.training", "evaluate": "tools.training", "masked_loss": "tools.training",
    "auxiliary_loss": "tools.training",
    "AssociativeRecall": "tools.tasks", "Copying": "tools.tasks", "InContextRegression": "tools.tasks",
    "Batch": "tools.tasks",
}
# the part packages and the tools, found on disk (a new part needs no entry here)
_PACKAGES = tuple(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)

__all__ = [
    "attention", "attention_naive", "masked_softmax", "repeat_kv",
    "blockwise_attention", "online_softmax_step",
    "MultiHeadAttention",
    "masks", "causal", "sliding_window", "key_padding", "and_masks", "or_masks", "not_mask", "make_mask",
    "causal_mask", "sliding_window_mask", "padding_mask",
    "Mechanism", "register_mechanism", "get_mechanism", "list_mechanisms", "build_mechanism",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _PACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'attnlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_PACKAGES))
