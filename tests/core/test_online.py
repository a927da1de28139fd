"""Online softmax and blockwise attention: exact against the reference, in linear memory."""

import pytest
import torch

from attnlib import attention, blockwise_attention, online_softmax_step

from ..helpers import make_qkv, max_err


def test_online_softmax_step_by_step_equals_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64) * 5
    values = torch.randn(10, 4, generator=g, dtype=torch.float64)
    m = torch.full((3, 1), float("-inf"), dtype=torch.float64)
    l = torch.zeros(3, 1, dtype=torch.float64)
    acc = torch.zeros(3, 4, dtype=torch.float64)
    for start in range(0, 10, 3):  # blocks of 3, 3, 3, 1
        m, l, acc = online_softmax_step(m, l, acc, scores[:, start:start + 3], values[start:start + 3])
    torch.testing.assert_close(acc / l, torch.softmax(scores, -1) @ values)
    torch.testing.assert_close((m + l.log()).squeeze(-1), torch.logsumexp(scores, -1))


@pytest.mark.parametrize("block_size", [1, 3, 16, 64], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 13, 13, 8), (1, 2, 1, 5, 17, 8), (1, 2, 2, 17, 5, 8)],
                         ids=["gqa-square", "lq<lk", "lq>lk"])
def test_blockwise_equals_reference(shape, causal, block_size):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype=torch.float64)
    got = blockwise_attention(q, k, v, causal=causal, block_size=block_size)
    assert max_err(got, attention(q, k, v, causal=causal)) < 1e-12


def test_blockwise_lse_and_empty_rows():
    q, k, v = make_qkv(1, 1, 1, 6, 3, 8, dtype=torch.float64)  # rows 0-2 see no key when causal
    out, lse = blockwise_attention(q, k, v, causal=True, block_size=2, return_lse=True)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 8))
    assert torch.isinf(lse[0, 0, :3]).all() and (lse[0, 0, :3] < 0).all()
    scores = (q @ k.transpose(-2, -1))[0, 0, 3:] / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse[0, 0, 3:], torch.logsumexp(scores, -1))


def test_blockwise_gradients_match_reference():
    q, k, v = make_qkv(1, 2, 1, 9, 9, 4, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(blockwise_attention(q, k, v, causal=True, block_size=4).sum(), (q, k, v))
    want = torch.autograd.grad(attention(q, k, v, causal=True).sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_blockwise_fp16_returns_fp16_close_to_reference():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, dtype=torch.float16)
    out = blockwise_attention(q, k, v, block_size=16)
    assert out.dtype == torch.float16 and max_err(out, attention(q, k, v)) < 2e-3


def test_blockwise_bad_block_size():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(q, k, v, block_size=0)
