"""The block-sparse Triton kernel (kernels.block_sparse) against the library, forward and every gradient.

Also its optional per-key bias (``key_bias=``, lesson 45): forward and the gradients of q, k, v and the bias
against :func:`attnlib.attention` with that bias, and ``key_bias=None`` unchanged. tests/kernels/test_kernel_compile.py
compiles every variant, with and without the bias, for sm_90.

Without a GPU the kernels run in Triton's interpreter, so sizes stay small. Tolerances as in
tests/kernels/test_flash_kernel.py: the kernel's error against a float64 reference may be at most a small
multiple of the error of plain PyTorch at the same precision, plus a floor.
"""

import math

import pytest
import torch

import kernels
from attnlib import attention
from attnlib.core import masked_softmax
from attnlib.sparse.block_sparse import build_block_layout
from attnlib.sparse.neighborhood import neighborhood_mask, neighborhood_mask_1d
from kernels.block_sparse import block_sparse_attention

from ..helpers import DTYPES, assert_kernel_within_tolerance, max_err

DEVICE = kernels.expected_device()


def random_mask(shape, density, seed):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < density
    mask[..., 3, :] = False  # an empty row
    mask[..., :16, :16] = True  # a full tile
    return mask


def plain_masked(q, k, v, mask):
    """Masked attention in the inputs' dtype with ordinary PyTorch ops (the tolerance baseline)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.matmul(masked_softmax(scores, mask).to(v.dtype), v)


def check(b, hq, hkv, lq, lk, d, dtype_name, mask, seed=0, **options):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, lk, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad_out = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    results = {}
    for name, fn in (("kernel", lambda *t: block_sparse_attention(*t, mask, **options)),
                     ("float64", lambda *t: attention(*(x.double() for x in t), mask=mask)),
                     ("plain", lambda *t: plain_masked(*t, mask))):
        out = fn(q, k, v)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype)))
    assert_kernel_within_tolerance(["out", "dq", "dk", "dv"], dtype, results)
    return results


CASES = [  # (b, hq, hkv, lq, lk, d, dtype, mask shape, density)
    pytest.param((1, 2, 2, 45, 61, 16, "fp32", (1, 2, 45, 61), 0.2), id="per-head-mask-ragged"),
    pytest.param((2, 2, 1, 50, 50, 32, "fp32", (2, 1, 50, 50), 0.5), id="gqa-per-batch-mask"),
    pytest.param((1, 2, 2, 40, 33, 16, "fp16", (40, 33), 0.3), id="fp16-2d-mask"),
    pytest.param((1, 1, 1, 33, 47, 16, "bf16", (1, 1, 33, 47), 0.4), id="bf16"),
]


@pytest.mark.parametrize("case", CASES)
def test_random_masks_forward_and_gradients(case):
    b, hq, hkv, lq, lk, d, dtype, shape, density = case
    check(b, hq, hkv, lq, lk, d, dtype, random_mask(shape, density, seed=lq), block_m=16, block_n=16)


@pytest.mark.parametrize("stride, dilation, causal", [(1, 1, False), (4, 1, False), (8, 1, False), (2, 2, True)],
                         ids=["sliding", "strided", "blocked", "dilated-causal"])
def test_every_neighborhood_family(stride, dilation, causal):
    mask = neighborhood_mask_1d(70, 8, stride=stride, dilation=dilation, causal=causal)
    check(1, 2, 2, 70, 70, 16, "fp32", mask, block_m=16, block_n=16)


def test_two_dimensional_window_and_a_prebuilt_layout():
    mask = neighborhood_mask((6, 8), (3, 4), stride=(1, 2))
    layout = build_block_layout(mask, 16, 32)
    check(1, 1, 1, 48, 48, 16, "fp32", mask, layout=layout)


def test_full_and_empty_masks():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g).requires_grad_() for _ in range(3))
    full = torch.ones(40, 40, dtype=torch.bool)
    assert max_err(block_sparse_attention(q, k, v, full, block_m=16, block_n=16), attention(q, k, v)) < 1e-5
    out = block_sparse_attention(q, k, v, torch.zeros(40, 40, dtype=torch.bool), block_m=16, block_n=16)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in (q, k, v))


BAD = [
    pytest.param(dict(mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, "boolean", id="int-mask"),
    pytest.param(dict(mask=torch.ones(1, 3, 8, 8, dtype=torch.bool)), ValueError, "mask", id="mask-heads"),
    pytest.param(dict(block_m=24), ValueError, "block_m", id="block-not-power-of-two"),
    pytest.param(dict(layout="blocks"), TypeError, "layout: expected a BlockLayout", id="layout-type"),
    pytest.param(dict(layout=build_block_layout(torch.ones(16, 8, dtype=torch.bool), 16, 16)), ValueError,
                 "layout: built for", id="layout-other-mask"),
    pytest.param(dict(layout=build_block_layout(torch.ones(8, 8, dtype=torch.bool), 8, 16)), ValueError,
                 "power of two >= 16", id="layout-small-blocks"),
]


@pytest.mark.parametrize("options, error, words", BAD)
def test_bad_input_is_rejected_before_launch(options, error, words):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    mask = options.pop("mask", torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(error, match=words):
        block_sparse_attention(q, k, v, mask, **options)


# --- the optional per-key bias (key_bias=, lesson 45) ------------------------------------------------


def bias_for_reference(bias, hq):
    """The kernel's ``(.., Hb, 1, Lk)`` key bias as a bias for :func:`attnlib.attention` (heads repeated to ``Hq``)."""
    bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    hb = bias4.shape[1]
    return bias4.repeat_interleave(hq // hb, 1) if hb not in (1, hq) else bias4


def plain_masked_biased(q, k, v, mask, bias):
    """Masked attention with the bias, in the inputs' dtype with ordinary PyTorch ops (the tolerance baseline)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + bias_for_reference(bias, q.shape[1])
    return torch.matmul(masked_softmax(scores, mask).to(v.dtype), v)


def check_with_bias(b, hq, hkv, lq, lk, d, dtype_name, mask, bias_shape, seed=0, **options):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, lk, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    bias = (2 * torch.randn(bias_shape, generator=g)).to(dtype).requires_grad_()
    grad_out = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    inputs = (q, k, v, bias)
    results = {}
    for name, fn in (("kernel", lambda q, k, v, bias: block_sparse_attention(q, k, v, mask, key_bias=bias, **options)),
                     ("float64", lambda *t: attention(*(x.double() for x in t[:3]), mask=mask,
                                                      bias=bias_for_reference(t[3].double(), hq))),
                     ("plain", lambda *t: plain_masked_biased(*t[:3], mask, t[3]))):
        out = fn(*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))
    names = ["out", "dq", "dk", "dv", "dbias"]
    for what, got, truth in zip(names, results["kernel"], results["float64"]):
        assert got.shape == truth.shape and got.dtype == dtype, f"{what}: shape {got.shape} dtype {got.dtype}"
    assert_kernel_within_tolerance(names, dtype, results)


BIAS_CASES = [  # (b, hq, hkv, lq, lk, d, dtype, mask shape, density, bias shape)
    pytest.param((2, 4, 2, 37, 45, 16, "fp32", (2, 1, 37, 45), 0.4, (2, 2, 1, 45)), id="gqa-bias-per-kv-head"),
    pytest.param((1, 2, 2, 50, 50, 32, "fp32", (50, 50), 0.5, (50,)), id="one-bias-for-all-heads"),
    pytest.param((2, 2, 1, 33, 47, 16, "fp16", (1, 2, 33, 47), 0.3, (1, 2, 1, 47)), id="fp16-bias-per-query-head"),
    pytest.param((2, 2, 2, 41, 39, 16, "bf16", (2, 1, 41, 39), 0.5, (2, 1, 1, 39)), id="bf16-bias-per-batch"),
]


@pytest.mark.parametrize("case", BIAS_CASES)
def test_key_bias_forward_and_every_gradient(case):
    b, hq, hkv, lq, lk, d, dtype, shape, density, bias_shape = case
    check_with_bias(b, hq, hkv, lq, lk, d, dtype, random_mask(shape, density, seed=lq), bias_shape,
                    block_m=16, block_n=16)


def test_key_bias_on_a_causal_top_w_mask():
    # the selection lesson 45 builds: each query keeps its w visible keys with the largest bias
    lk, w = 53, 9
    bias = torch.randn(lk, generator=torch.Generator().manual_seed(3))
    scores = bias.expand(lk, lk).masked_fill(~torch.ones(lk, lk, dtype=torch.bool).tril(), -math.inf)
    mask = torch.zeros(lk, lk, dtype=torch.bool).scatter_(-1, scores.topk(w, -1).indices, True)
    mask &= torch.ones(lk, lk, dtype=torch.bool).tril()
    check_with_bias(1, 2, 1, lk, lk, 16, "fp32", mask, (1, 1, 1, lk), block_m=16, block_n=16)


def test_no_key_bias_is_the_old_kernel_and_a_constant_bias_changes_nothing():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    mask = random_mask((40, 40), 0.4, seed=4)
    plain = block_sparse_attention(q, k, v, mask, block_m=16, block_n=16)
    assert torch.equal(block_sparse_attention(q, k, v, mask, block_m=16, block_n=16, key_bias=None), plain)
    # softmax is shift-invariant: a bias equal for every key moves nothing, and its gradient sums to 0 per row
    bias = torch.full((1, 2, 1, 40), 3.0, requires_grad=True)
    out = block_sparse_attention(q, k, v, mask, block_m=16, block_n=16, key_bias=bias)
    assert max_err(out, plain) < 1e-5
    out.square().sum().backward()
    assert bias.grad.abs().sum(-1).max() > 1e-3 and bias.grad.sum(-1).abs().max() < 1e-4


BAD_BIAS = [
    pytest.param(torch.zeros(1, 2, 8, 8), "one value per key", id="bias-per-query"),
    pytest.param(torch.zeros(1, 2, 1, 7), "one value per key", id="wrong-key-count"),
    pytest.param(torch.zeros(1, 3, 1, 8), "one value per key", id="wrong-heads"),
    pytest.param(torch.zeros(8, dtype=torch.int64), "floating", id="int-bias"),
]


@pytest.mark.parametrize("bias, words", BAD_BIAS)
def test_bad_key_bias_is_rejected_before_launch(bias, words):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=words):
        block_sparse_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool), key_bias=bias)
