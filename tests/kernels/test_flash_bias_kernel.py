"""The FlashBias kernels (kernels.flash_bias) against the library, forward and every gradient.

Two kernels: the low-rank one (bias U W^T inside the tile loop; gradients for q, k, v, u, w) and the dense-bias
baseline (bias read tile by tile; gradients for q, k, v and, when asked, the bias). Without a GPU they run in
Triton's interpreter, so sizes stay small. Tolerances as tests/kernels/test_flash_kernel.py: the kernel's error against
float64 may be at most a small multiple of plain PyTorch's error at the same precision, plus a floor.
"""

import math

import pytest
import torch

import kernels
from attnlib import attention
from attnlib.bias.flash_bias import alibi_bias, alibi_factors
from attnlib.core import masked_softmax
from attnlib.masks import causal_mask
from kernels.flash_bias import dense_bias_flash_attention, flash_bias_attention

from ..helpers import DTYPES, assert_kernel_within_tolerance, max_err

DEVICE = kernels.expected_device()


def plain_biased(q, k, v, bias, *, causal):
    """Biased attention with ordinary PyTorch ops in the inputs' dtype (the tolerance baseline)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + bias.to(q.dtype)
    allowed = causal_mask(q.shape[2], k.shape[2]) if causal else None
    return torch.matmul(masked_softmax(scores, allowed).to(v.dtype), v)


def _inputs(b, h, lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE).requires_grad_() for n in (lq, lk, lk))
    grad_out = torch.randn(b, h, lq, d, generator=g).to(dtype).to(DEVICE)
    return g, (q, k, v), grad_out


LOWRANK_CASES = [  # (b, h, lq, lk, d, rank, causal, dtype, factor dtype, factors broadcast over batch/heads)
    pytest.param((1, 2, 64, 64, 16, 4, False, "fp32", "fp32", False), id="L64-r4"),
    pytest.param((1, 2, 77, 77, 32, 3, True, "fp32", "fp32", False), id="odd-L77-r3-causal"),
    pytest.param((2, 1, 50, 83, 16, 8, False, "fp32", "fp32", True), id="ragged-lq<lk-broadcast"),
    pytest.param((1, 2, 90, 40, 16, 2, True, "fp32", "fp32", False), id="causal-empty-rows"),
    pytest.param((1, 2, 65, 65, 32, 5, True, "fp16", "fp16", False), id="fp16-causal"),
    pytest.param((1, 2, 45, 45, 16, 4, False, "fp16", "fp32", True), id="fp16-q-fp32-factors"),
    pytest.param((1, 2, 33, 33, 16, 2, True, "bf16", "bf16", False), id="bf16-causal"),
]


def run_lowrank(shape, seed=0, **options):
    b, h, lq, lk, d, rank, causal, dtype_name, factor_name, broadcast = shape
    dtype, factor_dtype = DTYPES[dtype_name], DTYPES[factor_name]
    g, (q, k, v), grad_out = _inputs(b, h, lq, lk, d, dtype, seed)
    u_batch, w_heads = (1, 1) if broadcast else (b, h)
    u = (0.5 * torch.randn(u_batch, h, lq, rank, generator=g)).to(factor_dtype).to(DEVICE).requires_grad_()
    w = (0.5 * torch.randn(b, w_heads, lk, rank, generator=g)).to(factor_dtype).to(DEVICE).requires_grad_()
    results = {}
    for name, fn in (
        ("kernel", lambda *t: flash_bias_attention(*t, causal=causal, **options)),
        ("float64", lambda q, k, v, u, w: attention(q.double(), k.double(), v.double(),
                                                    bias=u.double() @ w.double().transpose(-2, -1), causal=causal)),
        ("plain", lambda q, k, v, u, w: plain_biased(q, k, v, (u @ w.transpose(-2, -1)).to(dtype), causal=causal)),
    ):
        out = fn(q, k, v, u, w)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v, u, w), grad_out.to(out.dtype)))
    return dtype, results


@pytest.mark.parametrize("shape", LOWRANK_CASES)
def test_lowrank_kernel_forward_and_all_gradients_match_the_library(shape):
    assert_kernel_within_tolerance(["out", "dq", "dk", "dv", "du", "dw"], *run_lowrank(shape))


def test_lowrank_kernel_small_tiles_exercise_both_loop_phases():
    assert_kernel_within_tolerance(["out", "dq", "dk", "dv", "du", "dw"],
                            *run_lowrank((1, 1, 37, 45, 16, 3, True, "fp32", "fp32", False), block_m=16, block_n=16))


DENSE_CASES = [  # (b, h, lq, lk, d, causal, dtype, bias broadcast over batch)
    pytest.param((1, 2, 64, 64, 16, False, "fp32", False), id="L64"),
    pytest.param((2, 2, 77, 77, 32, True, "fp32", True), id="odd-L77-causal-broadcast"),
    pytest.param((1, 1, 50, 83, 16, True, "fp32", False), id="causal-lq<lk"),
    pytest.param((1, 2, 65, 65, 32, True, "fp16", False), id="fp16-causal"),
    pytest.param((1, 2, 33, 33, 16, False, "bf16", False), id="bf16"),
]


def run_dense(shape, seed=0, **options):
    b, h, lq, lk, d, causal, dtype_name, broadcast = shape
    dtype = DTYPES[dtype_name]
    g, (q, k, v), grad_out = _inputs(b, h, lq, lk, d, dtype, seed)
    bias = torch.randn(1 if broadcast else b, h, lq, lk, generator=g).to(DEVICE).requires_grad_()
    results = {}
    for name, fn in (
        ("kernel", lambda *t: dense_bias_flash_attention(*t, causal=causal, **options)),
        ("float64", lambda q, k, v, bias: attention(q.double(), k.double(), v.double(), bias=bias.double(),
                                                    causal=causal)),
        ("plain", lambda q, k, v, bias: plain_biased(q, k, v, bias.to(dtype), causal=causal)),
    ):
        out = fn(q, k, v, bias)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v, bias), grad_out.to(out.dtype)))
    return dtype, results


@pytest.mark.parametrize("shape", DENSE_CASES)
def test_dense_kernel_forward_and_all_gradients_match_the_library(shape):
    assert_kernel_within_tolerance(["out", "dq", "dk", "dv", "dbias"], *run_dense(shape))


def test_dense_kernel_bias_gradient_is_optional():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    bias = torch.randn(1, 1, 40, 40, generator=g).to(DEVICE)  # a constant: no gradient asked, none computed
    out = dense_bias_flash_attention(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(attention(q, k, v, bias=bias).sum(), (q, k, v))
    assert all(max_err(a, b) < 1e-5 for a, b in zip(grads, want))
    assert bias.grad is None


def test_dense_kernel_minus_infinity_in_the_bias_masks():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g).to(DEVICE) for _ in range(3))
    bias = torch.randn(1, 1, 40, 40, generator=g)
    bias[..., 5:, :30] = float("-inf")  # rows 5.. see only the last 10 keys
    bias[..., 3, :] = float("-inf")  # row 3 sees nothing: zeros
    out = dense_bias_flash_attention(q, k, v, bias.to(DEVICE), block_m=16, block_n=16)
    assert torch.isfinite(out).all()
    assert max_err(out, attention(q, k, v, bias=bias)) < 1e-5
    assert torch.equal(out[0, 0, 3], torch.zeros(16))


def test_exact_alibi_factors_in_the_lowrank_kernel_equal_the_dense_kernel():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 70, 16, generator=g).to(DEVICE) for _ in range(3))
    u, w = alibi_factors(4, 70)
    lowrank = flash_bias_attention(q, k, v, u.to(DEVICE), w.to(DEVICE), causal=True)
    dense = dense_bias_flash_attention(q, k, v, alibi_bias(4, 70).float().to(DEVICE), causal=True)
    assert max_err(lowrank, dense) < 1e-5
    assert max_err(lowrank, attention(q.double(), k.double(), v.double(), bias=alibi_bias(4, 70), causal=True)) < 1e-5


def test_rows_with_no_visible_key_are_zero():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 1, 40, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 1, 16, 16, generator=g).to(DEVICE) for _ in range(2))
    u, w = torch.randn(1, 1, 40, 2).to(DEVICE), torch.randn(1, 1, 16, 2).to(DEVICE)
    out = flash_bias_attention(q, k, v, u, w, causal=True, block_m=16, block_n=16)
    assert torch.equal(out[0, 0, :24], torch.zeros(24, 16))


def _args(**override):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16),
                u=torch.randn(1, 2, 8, 2), w=torch.randn(1, 2, 8, 2))
    args.update(override)
    return {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in args.items()}


BAD = [
    pytest.param(dict(w=torch.randn(1, 2, 8, 3)), {}, ValueError, "same rank", id="rank-mismatch"),
    pytest.param(dict(u=torch.randn(1, 2, 9, 2)), {}, ValueError, "u: expected 8 rows", id="u-rows"),
    pytest.param(dict(w=torch.randn(3, 2, 8, 2)), {}, ValueError, "w: expected batch 1 or 1", id="w-batch"),
    pytest.param(dict(u=torch.randn(2, 8, 2)), {}, ValueError, "u: expected a 4-d", id="u-3d"),
    pytest.param(dict(u=torch.randn(1, 2, 8, 80), w=torch.randn(1, 2, 8, 80)), {}, ValueError, "rank up to 64",
                 id="rank-too-high"),
    pytest.param(dict(u=torch.randn(1, 2, 8, 2, dtype=torch.float64), w=torch.randn(1, 2, 8, 2, dtype=torch.float64)),
                 {}, TypeError, "u: expected float32", id="factor-float64"),
    pytest.param(dict(k=torch.randn(1, 1, 8, 16), v=torch.randn(1, 1, 8, 16)), {}, ValueError, "no grouped",
                 id="grouped-kv"),
    pytest.param({}, dict(block_m=24), ValueError, "block_m", id="block-not-power-of-two"),
    pytest.param({}, dict(causal=1), TypeError, "causal", id="causal-not-bool"),
]


@pytest.mark.parametrize("override, options, error, words", BAD)
def test_bad_input_is_rejected_before_launch(override, options, error, words):
    a = _args(**override)
    with pytest.raises(error, match=words):
        flash_bias_attention(a["q"], a["k"], a["v"], a["u"], a["w"], **options)


@pytest.mark.parametrize("bias, words", [(torch.randn(1, 2, 8, 9), "bias: expected shape"),
                                         (torch.randn(2, 8, 8), "bias: expected a 4-d")], ids=["shape", "3d"])
def test_dense_kernel_rejects_a_bias_of_the_wrong_shape(bias, words):
    a = _args()
    with pytest.raises(ValueError, match=words):
        dense_bias_flash_attention(a["q"], a["k"], a["v"], bias.to(DEVICE))


def test_module_kernel_backend_matches_reference():
    from attnlib.bias.flash_bias import ALiBiLowRankAttention

    torch.manual_seed(0)
    ref = ALiBiLowRankAttention(32, 2, causal=True)
    fast = ALiBiLowRankAttention(32, 2, causal=True, backend="kernel")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 30, 32).to(DEVICE)
    assert max_err(fast(x), ref(x)) < 1e-5
    fast(x).sum().backward()
    ref(x).sum().backward()
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert max_err(p_fast.grad, p_ref.grad) < 1e-4 * max(1.0, p_ref.grad.abs().max().item()), name
