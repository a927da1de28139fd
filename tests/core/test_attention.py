"""attnlib.attention and its oracle attention_naive: values, invariants, gradients, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import MultiHeadAttention, attention, attention_naive, blockwise_attention

from ..helpers import make_qkv, max_err

SHAPES = [  # (b, hq, hkv, lq, lk, d, dv)
    pytest.param((1, 1, 1, 5, 5, 4, 4), id="one-head"),
    pytest.param((2, 4, 4, 7, 7, 8, 8), id="mha"),
    pytest.param((2, 4, 2, 6, 9, 8, 5), id="gqa-lq<lk-dv!=d"),
    pytest.param((1, 4, 1, 9, 4, 8, 8), id="mqa-lq>lk"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_naive_loops(shape, causal):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dv, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    bias = torch.randn(1, hq, lq, lk, generator=g, dtype=torch.float64)
    got = attention(q, k, v, mask=mask, bias=bias, causal=causal)
    want = attention_naive(q, k, v, mask=mask, bias=bias, causal=causal)
    assert max_err(got, want) < 1e-12


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_oracle_matches_torch_sdpa_in_float64(causal):
    # the oracle itself is checked once against an independent implementation
    q, k, v = make_qkv(2, 4, 2, 6, 6, 8, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert max_err(attention_naive(q, k, v, causal=causal), want) < 1e-12


def test_oracle_matches_sdpa_with_explicit_mask_when_lengths_differ():
    q, k, v = make_qkv(1, 2, 2, 3, 7, 8, dtype=torch.float64)
    mask = attnlib.causal_mask(3, 7)  # bottom-right: the 3 queries are the last 3 positions
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert max_err(attention_naive(q, k, v, causal=True), want) < 1e-12


def test_weights_rows_sum_to_one_and_respect_the_mask():
    q, k, v = make_qkv(2, 2, 2, 6, 6, 8)
    mask = attnlib.sliding_window_mask(6, left=2)
    out, w = attention(q, k, v, mask=mask, return_weights=True)
    assert w.shape == (2, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
    assert (w[..., ~mask] == 0).all()
    torch.testing.assert_close(out, torch.matmul(w, v))


def test_default_scale_is_one_over_sqrt_d():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1 / math.sqrt(16)))
    assert max_err(attention(q, k, v), attention(q, k, v, scale=1.0)) > 1e-3


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    out, w = attention(q, k, v, mask=mask, return_weights=True)
    assert torch.equal(out[0, 0, 2], torch.zeros(8)) and torch.equal(w[0, 0, 2], torch.zeros(4))
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(q.grad[0, 0, 2], torch.zeros(8))


def test_causal_future_tokens_do_not_change_past_outputs():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8)
    out = attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 2.0
    out2 = attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :5], out2[:, :, :5])
    assert max_err(out[:, :, 5:], out2[:, :, 5:]) > 1e-3


def test_grouped_query_equals_repeated_heads():
    q, k, v = make_qkv(1, 6, 2, 5, 5, 8)
    repeated = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(attention(q, k, v), repeated)


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 2, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: attention(*t[:3], bias=t[3], causal=True), (q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_inputs_large_logits_do_not_overflow(dtype):
    q, k, v = make_qkv(1, 1, 1, 8, 8, 64, dtype=dtype, scale=30.0)  # q.k ~ 900 * 64 > fp16 max
    out = attention(q, k, v)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = attention_naive(q, k, v)
    assert max_err(out, want) < 2e-2


BAD_INPUTS = [
    pytest.param(dict(q=torch.randn(2, 3, 4)), ValueError, "q: expected a 4-d tensor", id="rank"),
    pytest.param(dict(k=torch.randn(1, 2, 5, 6)), ValueError, "head_dim 8", id="head-dim"),
    pytest.param(dict(q=torch.ones(1, 2, 5, 8, dtype=torch.int64)), TypeError, "floating-point", id="int-dtype"),
    pytest.param(dict(q=torch.randn(1, 3, 5, 8)), ValueError, "must divide", id="heads-do-not-divide"),
    pytest.param(dict(mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask", id="mask-shape"),
    pytest.param(dict(mask=torch.ones(5, 5)), TypeError, "boolean", id="mask-dtype"),
    pytest.param(dict(bias=torch.ones(2, 5, 4)), ValueError, "bias", id="bias-shape"),
    pytest.param(dict(scale=-1.0), ValueError, "scale", id="negative-scale"),
    pytest.param(dict(v=torch.randn(1, 2, 4, 8)), ValueError, "v: expected heads and length", id="v-length"),
    pytest.param(dict(k=[[1.0]]), TypeError, "k: expected a torch.Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("override, error, words", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, words):
    args = dict(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8))
    args.update(override)
    with pytest.raises(error, match=words):
        attention(**args)


@pytest.mark.parametrize("call, flag", [
    (lambda q: attention(q, q, q, causal="False"), "causal"),
    (lambda q: attention(q, q, q, return_weights="no"), "return_weights"),
    (lambda q: attention_naive(q, q, q, causal=1), "causal"),
    (lambda q: blockwise_attention(q, q, q, causal="False"), "causal"),
    (lambda q: blockwise_attention(q, q, q, return_lse=0), "return_lse"),
    (lambda q: MultiHeadAttention(16, 2, causal="False"), "causal"),
    (lambda q: MultiHeadAttention(16, 2)(torch.randn(1, 3, 16), return_weights="no"), "return_weights"),
], ids=["attention-causal", "attention-weights", "naive-causal", "blockwise-causal", "blockwise-lse", "module-causal",
        "module-weights"])
def test_flags_take_a_bool_only(call, flag):
    # a string such as "False" is truthy: taken as it is, it would switch the flag on
    with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
        call(torch.randn(1, 1, 3, 16))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_key_gives_zeros_and_no_query_an_empty_output(causal):
    q, empty = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)
    out, weights = attention(q, empty, empty, causal=causal, return_weights=True)
    assert torch.equal(out, torch.zeros(1, 2, 3, 4)) and weights.shape == (1, 2, 3, 0)
    assert torch.equal(out, blockwise_attention(q, empty, empty, causal=causal))
    assert torch.equal(out.double(), attention_naive(q, empty, empty, causal=causal))
    assert attention(empty, q, q, causal=causal).shape == (1, 2, 0, 4)


def test_a_head_dim_of_zero_is_refused():
    q = torch.randn(1, 1, 3, 0)
    with pytest.raises(ValueError, match="q: expected a head_dim of at least 1"):
        attention(q, q, torch.randn(1, 1, 3, 2))
