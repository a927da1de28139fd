"""Generalized neighborhood attention (attnlib.sparse.neighborhood) against NATTEN's rules written as loops."""

import math

import pytest
import torch

from attnlib import attention, build_mechanism
from attnlib.masks import sliding_window_mask
from attnlib.sparse.block_sparse import tile_counts
from attnlib.sparse.neighborhood import (
    NeighborhoodAttention,
    neighborhood_attention,
    neighborhood_mask,
    neighborhood_mask_1d,
    tile_counts_1d,
)


def natten_rule(length, k, s, d, causal, i, j):
    """One pair by NATTEN's per-dimension rule, in plain integers (dilation group, leader, clamped centre)."""
    if i % d != j % d:
        return False
    gl = -(-(length - i % d) // d)
    ii, jj = i // d, j // d
    if causal:
        leader = min(ii // s * s + s - 1, gl - 1)
        return jj <= ii and leader - jj < k
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = min(ii // s * s + s // 2, gl - 1)
    centre = min(max(leader, left), gl - 1 - right)
    return centre - left <= jj <= centre + right


CASES = [(12, 4, 2, 1), (13, 5, 1, 1), (16, 4, 4, 1), (17, 3, 2, 2), (20, 6, 3, 3), (9, 9, 1, 1), (10, 2, 1, 5)]


@pytest.mark.parametrize("length, k, s, d", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_matches_the_rule(length, k, s, d, causal):
    mask = neighborhood_mask_1d(length, k, stride=s, dilation=d, causal=causal)
    want = torch.tensor([[natten_rule(length, k, s, d, causal, i, j) for j in range(length)] for i in range(length)])
    assert torch.equal(mask, want)


@pytest.mark.parametrize("length, k, s, d", CASES)
def test_every_query_sees_exactly_k_keys(length, k, s, d):
    assert (neighborhood_mask_1d(length, k, stride=s, dilation=d).sum(1) == k).all()


def test_causal_sees_no_future_and_at_most_k():
    mask = neighborhood_mask_1d(20, 5, stride=3, causal=True)
    assert not mask.triu(1).any() and (mask.sum(1) <= 5).all() and mask.diagonal().all()


def test_even_window_has_one_more_key_on_the_left():
    mask = neighborhood_mask_1d(20, 4)
    assert mask[10].nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_special_cases():
    n = 16
    # stride 1 = sliding window (interior rows; borders shift inward instead of shrinking)
    sliding = neighborhood_mask_1d(n, 5)
    assert torch.equal(sliding[2:-2], sliding_window_mask(n, left=2, right=2)[2:-2])
    # stride K = blocked: query i sees exactly its block of K
    blocked = neighborhood_mask_1d(n, 4, stride=4)
    assert torch.equal(blocked, (torch.arange(n)[:, None] // 4) == (torch.arange(n)[None, :] // 4))
    # K = L: full attention (causal: the causal mask)
    assert neighborhood_mask_1d(n, n).all()
    assert torch.equal(neighborhood_mask_1d(n, n, causal=True), torch.ones(n, n, dtype=torch.bool).tril())


def test_2d_is_the_and_of_dimensions_and_sees_prod_k():
    rows, cols = 7, 9
    mask = neighborhood_mask((rows, cols), (3, 4), stride=(2, 1), dilation=(1, 2))
    mr = neighborhood_mask_1d(rows, 3, stride=2)
    mc = neighborhood_mask_1d(cols, 4, dilation=2)
    for a in range(rows * cols):
        for b in range(0, rows * cols, 5):
            assert mask[a, b] == (mr[a // cols, b // cols] & mc[a % cols, b % cols])
    assert (mask.sum(1) == 12).all()


def test_attention_equals_masked_loop_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 4, stride=2)
    mask = neighborhood_mask_1d(10, 4, stride=2)
    for i in range(10):  # float64 loop over the visible keys
        keys = mask[i].nonzero().flatten()
        w = torch.softmax(q[0, 1, i] @ k[0, 1, keys].T / math.sqrt(3), -1)
        assert torch.allclose(out[0, 1, i], w @ v[0, 1, keys])
    assert torch.autograd.gradcheck(lambda *t: neighborhood_attention(*t, 3, stride=3), (q, k, v))
    grid = neighborhood_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], (2, 3), shape=(2, 4))
    assert torch.allclose(grid, attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], mask=neighborhood_mask((2, 4), (2, 3))))


@pytest.mark.parametrize("length, k, s, causal", [(100, 17, 1, False), (100, 16, 16, False), (130, 20, 5, True), (97, 32, 8, False)])
def test_analytic_tile_counts_match_the_mask(length, k, s, causal):
    assert tile_counts_1d(length, k, stride=s, causal=causal, block_m=16, block_n=16) == \
        tile_counts(neighborhood_mask_1d(length, k, stride=s, causal=causal), 16, 16)


def test_tile_aligned_strides_visit_fewer_tiles_than_sliding():
    sliding = tile_counts_1d(1024, 128, stride=1, block_m=64, block_n=64)
    blocked = tile_counts_1d(1024, 128, stride=128, block_m=64, block_n=64)
    assert blocked["visited"] < sliding["visited"] and blocked["partial"] == 0 < sliding["partial"]


def test_module_registered_causal_and_kernel_backend():
    torch.manual_seed(0)
    module = build_mechanism("neighborhood", 32, 2, causal=True, kernel_size=3, stride=2)
    x = torch.randn(2, 10, 32)
    y = module(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    assert torch.allclose(module(x2)[:, :6], y[:, :6]) and not torch.allclose(module(x2)[:, 6:], y[:, 6:])
    fast = NeighborhoodAttention(32, 2, causal=True, kernel_size=3, stride=2, backend="kernel")
    fast.load_state_dict(module.state_dict())
    assert (fast(x) - y).abs().max() < 1e-5
    assert NeighborhoodAttention(16, 2, kernel_size=7, dilation=2).window_for(5) == (5, 1, 1)


@pytest.mark.parametrize("call, error, words", [
    (lambda: neighborhood_mask_1d(10, 6, dilation=2), ValueError, "kernel_size \\* dilation <= length"),
    (lambda: neighborhood_mask_1d(10, 3, stride=4), ValueError, "stride: expected stride <= kernel_size"),
    (lambda: neighborhood_mask_1d(10, 0), ValueError, "kernel_size"),
    (lambda: neighborhood_mask_1d(10, 3, causal=1), TypeError, "causal"),
    (lambda: neighborhood_mask((4, 4), (2, 2, 2)), ValueError, "one value per dimension"),
    (lambda: neighborhood_attention(*(torch.randn(1, 1, 6, 4) for _ in range(3)), 2, shape=(2, 2)), ValueError, "shape"),
    (lambda: NeighborhoodAttention(16, 2, backend="fast"), ValueError, "backend"),
], ids=["too-wide", "stride", "zero-window", "causal-int", "dims", "grid", "backend"])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_grids_have_one_to_three_dimensions():
    with pytest.raises(ValueError, match=r"shape: expected a grid of 1 to 3 dimensions \(as NATTEN\), got \(2, 2, 2, 2\)"):
        neighborhood_mask((2, 2, 2, 2), 1)
    with pytest.raises(ValueError, match="shape: expected a grid of 1 to 3 dimensions"):
        neighborhood_mask((), 1)
