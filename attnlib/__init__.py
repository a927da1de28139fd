"""attnlib: the course's library of attention mechanisms.

Start with :func:`attention` (the reference every lesson builds on), :func:`blockwise_attention` (the
same result in linear memory), :class:`MultiHeadAttention`, the masks in :mod:`attnlib.masks`, and the
mechanism registry (:func:`build_mechanism`, :func:`list_mechanisms`). The Triton kernels live in the
sibling package ``kernels``.
"""

from ._triton_mode import use_interpreter_without_gpu

use_interpreter_without_gpu()  # before anything imports Triton (see attnlib._triton_mode)

from . import masks, plotting, progress, tasks, training, widgets  # noqa: E402
# part 1, heads (lessons 10-14): each module registers its mechanisms when imported
from . import decoupled_heads, differential, grouped_query, head_guidance, mixture_of_heads  # noqa: E402
# parts 3 and 5, linear time and bias (lessons 30-32, 50)
from . import agent_attention, flash_bias, linear_attention, token_aggregation  # noqa: E402
# part 4, sparse and local attention (lessons 40-47)
from . import (block_sparse, dynamic_mask, flux_routing, freeswim, hip, neighborhood, radial,  # noqa: E402
               rectified_sparse, shifted_sparse)
from .core import attention, attention_naive, masked_softmax, repeat_kv
from .masks import (and_masks, causal, causal_mask, key_padding, make_mask, not_mask, or_masks,
                    padding_mask, sliding_window, sliding_window_mask)
from .modules import MultiHeadAttention
from .online import blockwise_attention, online_softmax_step
from .registry import Mechanism, build_mechanism, get_mechanism, list_mechanisms, register_mechanism
from .tasks import AssociativeRecall, Batch, Copying, InContextRegression
from .training import auxiliary_loss, evaluate, masked_loss, train
from .transformer import TinyTransformer

__all__ = [
    "attention", "attention_naive", "masked_softmax", "repeat_kv",
    "blockwise_attention", "online_softmax_step",
    "MultiHeadAttention",
    "masks", "causal", "sliding_window", "key_padding", "and_masks", "or_masks", "not_mask", "make_mask",
    "causal_mask", "sliding_window_mask", "padding_mask",
    "Mechanism", "register_mechanism", "get_mechanism", "list_mechanisms", "build_mechanism",
    "plotting", "widgets", "progress",
    "tasks", "AssociativeRecall", "Copying", "InContextRegression", "Batch",
    "TinyTransformer", "training", "train", "evaluate", "masked_loss", "auxiliary_loss",
    "grouped_query", "decoupled_heads", "mixture_of_heads", "differential", "head_guidance",
    "linear_attention", "agent_attention", "token_aggregation", "flash_bias",
    "block_sparse", "neighborhood", "radial", "freeswim", "shifted_sparse", "hip", "dynamic_mask",
    "rectified_sparse", "flux_routing",
]
