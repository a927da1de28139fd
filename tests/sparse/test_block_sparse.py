"""The block layout (attnlib.sparse.block_sparse) against brute force: tile kinds, lists, transposed lists, bounds;
and sparse_attention, which runs a mask through the reference or the kernel."""

import pytest
import torch

from attnlib import attention
from attnlib.sparse.block_sparse import (
    block_sparse_attention_reference,
    build_block_layout,
    density_bound,
    full_block_layout,
    sparse_attention,
    tile_bound,
    tile_counts,
)

from ..helpers import make_qkv


def brute_force_kinds(mask, bm, bn):
    """Tile kinds by loops: 0 skipped, 1 partial, 2 full (the ragged last key block is never full)."""
    lq, lk = mask.shape
    tq, tk = -(-lq // bm), -(-lk // bn)
    kinds = torch.zeros(tq, tk, dtype=torch.int8)
    for t in range(tq):
        for u in range(tk):
            tile = mask[t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
            if tile.any():
                kinds[t, u] = 2 if tile.all() and (u + 1) * bn <= lk else 1
    return kinds


def random_mask(seed, shape, density):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("lq, lk, bm, bn, density", [(37, 45, 16, 16, 0.3), (64, 64, 16, 32, 0.97), (50, 33, 32, 16, 1.0),
                                                     (20, 70, 16, 16, 0.02)])
def test_lists_match_brute_force(lq, lk, bm, bn, density):
    mask = random_mask(0, (2, 3, lq, lk), density)
    mask[0, 1, : lq // 2] = True  # some full tiles
    mask[1, 2, :, :] = False  # a head with nothing visible
    layout = build_block_layout(mask, bm, bn)
    for b in range(2):
        for h in range(3):
            kinds = brute_force_kinds(mask[b, h], bm, bn)
            assert torch.equal(layout.tile_kinds()[b, h], kinds)
            for t in range(kinds.shape[0]):
                n, f = layout.kv_count[b, h, t].item(), layout.kv_full[b, h, t].item()
                listed = layout.kv_index[b, h, t, :n].tolist()
                # full blocks first, then partial, each in ascending order
                assert listed == [u for u in range(kinds.shape[1]) if kinds[t, u] == 2] + \
                                 [u for u in range(kinds.shape[1]) if kinds[t, u] == 1]
                assert f == int((kinds[t] == 2).sum())
            for u in range(kinds.shape[1]):
                n, f = layout.q_count[b, h, u].item(), layout.q_full[b, h, u].item()
                assert sorted(layout.q_index[b, h, u, :n].tolist()) == [t for t in range(kinds.shape[0]) if kinds[t, u]]
                assert all(kinds[t, u] == 2 for t in layout.q_index[b, h, u, :f].tolist())
                assert all(kinds[t, u] == 1 for t in layout.q_index[b, h, u, f:n].tolist())


def test_full_mask_visits_every_tile_and_all_are_full_when_blocks_divide():
    layout = full_block_layout(64, 96, 16, 32)
    assert (layout.kv_count == 3).all() and (layout.kv_full == 3).all() and (layout.q_count == 4).all()
    ragged = full_block_layout(40, 40, 16, 16)  # the last key block holds keys past the end: partial
    assert (ragged.kv_count == 3).all() and (ragged.kv_full == 2).all()


def test_bounds():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:16, :16] = True
    mask[40, 50] = True
    counts = tile_counts(mask, 16, 16)
    assert counts == dict(dense=16, visited=2, full=1, partial=1)
    assert tile_bound(mask, 16, 16) == 8.0
    assert density_bound(mask) == 64 * 64 / 257
    # the tile bound never exceeds the density bound (a visited tile holds at most its area)
    m = random_mask(3, (1, 1, 80, 80), 0.01)
    assert tile_bound(m, 16, 16) <= density_bound(m)
    assert tile_bound(torch.zeros(8, 8, dtype=torch.bool), 16, 16) == float("inf")


def test_reference_is_masked_attention_with_empty_rows_zero():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = random_mask(2, (1, 2, 9, 9), 0.4)
    mask[0, 0, 3] = False
    out = block_sparse_attention_reference(q, k, v, mask)
    assert torch.equal(out[0, 0, 3], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(out, attention(q, k, v, mask=mask))


@pytest.mark.parametrize("bad, error, words", [
    (dict(mask=torch.ones(1, 1, 8, 8, dtype=torch.int64)), TypeError, "boolean"),
    (dict(mask=torch.ones(8, 8, dtype=torch.bool), block_m=0), ValueError, "block_m"),
    (dict(mask=torch.ones(8, 8, 8, dtype=torch.bool)), ValueError, "mask"),
], ids=["int-mask", "zero-block", "3d-mask"])
def test_bad_input(bad, error, words):
    args = {"block_m": 16, "block_n": 16, **bad}
    with pytest.raises(error, match=words):
        build_block_layout(args["mask"], args["block_m"], args["block_n"])


# --- sparse_attention: the one call every part-4 lesson ends in ------------------------------------------


def test_sparse_attention_backends_agree_with_a_per_key_bias_of_key_value_heads():
    q, k, v = make_qkv(1, 4, 2, lq=40, d=16, seed=3)
    mask = torch.rand(1, 4, 40, 40, generator=torch.Generator().manual_seed(1)) < 0.3
    bias = torch.randn(1, 2, 1, 40, dtype=torch.float64).float()
    out, weights = sparse_attention(q, k, v, mask, key_bias=bias, return_weights=True)
    # the reference: attention with the bias repeated to the query heads (head h reads bias head h // 2)
    want = attention(q, k, v, mask=mask, bias=bias.repeat_interleave(2, dim=1))
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(weights.sum(-1)[mask.any(-1)], torch.ones(()), atol=1e-5)
    kernel = sparse_attention(q, k, v, mask, key_bias=bias, backend="kernel", block_m=16, block_n=16)
    assert (kernel - out).abs().max().item() < 1e-4


@pytest.mark.parametrize("call, error, words", [
    (lambda f, q, m: f(q, q, q, m, backend="torch"), ValueError, "backend: expected one of ('reference', 'kernel')"),
    (lambda f, q, m: f(q, q, q, m, backend="kernel", return_weights=True), ValueError, "never forms the weights"),
    (lambda f, q, m: f(q, q, q, m, return_weights="yes"), TypeError, "return_weights: expected a bool"),
], ids=["backend", "kernel-weights", "weights-flag"])
def test_sparse_attention_refuses_bad_options(call, error, words):
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(error) as raised:
        call(sparse_attention, q, torch.ones(16, 16, dtype=torch.bool))
    assert words in str(raised.value)


def test_density_bound_refuses_a_float_mask():
    with pytest.raises(TypeError, match="mask: expected a boolean tensor"):
        density_bound(torch.rand(4, 4))
