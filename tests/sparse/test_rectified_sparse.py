"""Lesson 46: rectified sparse attention (attnlib.sparse.rectified_sparse).

Every step against loops written from the definitions in float64 (pooling, IPAR, the selection rule, GAPR with
its M n_b factors, the whole output row by row); the invariants the derivation promises (rows of the implied
map sum to one, so a constant value comes out unchanged; keeping every block is full attention; text rows are
dense; IPAR equals the code's form and, without text, the pooled softmax; GAPR does not depend on the scale);
the generalized Hilbert curve and the block neighbours; the block lists of the mask; the kernel path against
the torch path (forward and gradients, in Triton's interpreter); gradcheck; the module and the registry; the
benchmark mask; where this module departs from the official code (tau 0.3 vs 0.5, the rounding of the block
floor, the ragged last block); bad inputs.
"""

import math

import pytest
import torch

from attnlib import TinyTransformer, attention, build_mechanism
from attnlib.sparse.block_sparse import build_block_layout, tile_bound
from attnlib.sparse.rectified_sparse import (
    MODES,
    RectifiedSparseAttention,
    benchmark_mask,
    block_counts,
    block_neighbors,
    curve_order,
    effective_weights,
    gapr_untrusted,
    gilbert_order,
    ipar_weights,
    min_blocks,
    plan_map,
    pool_blocks,
    raster_coordinates,
    rectified_plan,
    rectified_sparse_attention,
    reorder_visual,
    select_blocks,
    sequence_neighbors,
    video_like_qkv,
)

from ..helpers import make_qkv

# --- loops from the definitions ---------------------------------------------------------------------


def loop_blocks(length, block):
    """[[tokens of block 0], [tokens of block 1], ...]"""
    return [list(range(start, min(start + block, length))) for start in range(0, length, block)]


def loop_mean(x, tokens):
    return sum(x[t] for t in tokens) / len(tokens)


def loop_ipar(q, k, block, num_text, scale):
    """p_hat for one (batch, head): q, k (L, D) float64; n_j exp(s qbar.kbar) and the summed text, over Z."""
    lv = q.shape[0] - num_text
    blocks = loop_blocks(lv, block)
    out = torch.zeros(len(blocks), len(blocks) + (1 if num_text else 0), dtype=torch.float64)
    for i, qi in enumerate(blocks):
        q_bar = loop_mean(q, qi)
        terms = [len(kj) * math.exp(scale * float(q_bar @ loop_mean(k, kj))) for kj in blocks]
        if num_text:
            terms.append(sum(math.exp(scale * float(q_bar @ k[t])) for t in range(lv, lv + num_text)))
        z = sum(terms)
        out[i] = torch.tensor([t / z for t in terms])
    return out


def loop_select(row, drop, tau, num_visual_blocks):
    """The selection of one row, with Python lists: stable descending sort, running sum, floor."""
    order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))
    total, count = 0.0, 0
    for j in order:
        total += float(row[j])
        if total <= tau:
            count += 1
    floor = math.floor(round((1 - drop) * num_visual_blocks, 9))
    keep = min(len(row), max(count + 1, floor))
    chosen = set(order[:keep])
    return torch.tensor([j in chosen for j in range(len(row))])


def loop_gapr(q, k, block, num_text):
    """GAPR's untrusted pairs of one (batch, head), with the M n_b factors of the code kept."""
    lv = q.shape[0] - num_text
    blocks = loop_blocks(lv, block)
    t = len(blocks)
    out = torch.zeros(t, t, dtype=torch.bool)
    for i, qi in enumerate(blocks):
        q_bar = loop_mean(q, qi)
        dq = loop_mean(torch.stack([(q[a] - q_bar).abs() for a in qi]), range(len(qi)))
        for j, kj in enumerate(blocks):
            k_bar = loop_mean(k, kj)
            dk = loop_mean(torch.stack([(k[b] - k_bar).abs() for b in kj]), range(len(kj)))
            factor = len(qi) * len(kj)
            err = factor * (abs(float(dq @ k_bar)) + abs(float(q_bar @ dk)))
            gain = factor * abs(float(q_bar @ k_bar))
            out[i, j] = not gain > err
    return out


def loop_rectified(q, k, v, *, block, drop, tau, num_text, neighbors, mode):
    """The whole output, one query row at a time, from the loop plan (float64, one batch element, heads looped)."""
    _, h, length, d = q.shape
    scale = 1 / math.sqrt(d)
    lv = length - num_text
    blocks = loop_blocks(lv, block)
    t = len(blocks)
    out = torch.zeros(h, length, v.shape[-1], dtype=torch.float64)
    for hh in range(h):
        qh, kh, vh = q[0, hh], k[0, hh], v[0, hh]
        p_hat = loop_ipar(qh, kh, block, num_text, scale)
        untrusted = loop_gapr(qh, kh, block, num_text)
        for i, qi in enumerate(blocks):
            chosen = loop_select(p_hat[i], drop, tau, t)
            computed = [bool(chosen[j]) or (neighbors is not None and bool(neighbors[i, j])) for j in range(t)]
            covered = [computed[j] or (mode == "rectified" and bool(untrusted[i, j])) for j in range(t)]
            keys = [x for j in range(t) if computed[j] for x in blocks[j]] + list(range(lv, length))
            r = sum(float(p_hat[i, j]) for j in range(t) if covered[j]) + (float(p_hat[i, t]) if num_text else 0.0)
            compensation = sum((float(p_hat[i, j]) * loop_mean(vh, blocks[j]) for j in range(t) if not covered[j]),
                               torch.zeros(v.shape[-1], dtype=torch.float64))
            for a in qi:
                logits = torch.stack([qh[a] @ kh[b] for b in keys]) * scale
                sparse = torch.softmax(logits, 0) @ vh[keys]
                if mode == "sparse":
                    out[hh, a] = sparse
                elif mode == "ipar":
                    out[hh, a] = r * sparse
                else:
                    out[hh, a] = r * sparse + compensation
        for a in range(lv, length):  # text queries: dense
            out[hh, a] = torch.softmax(torch.stack([qh[a] @ kh[b] for b in range(length)]) * scale, 0) @ vh
    return out[None]


def qkv(lv, num_text, *, heads=2, d=4, seed=0, dtype=torch.float64, requires_grad=False):
    return make_qkv(hq=heads, lq=lv + num_text, d=d, dtype=dtype, seed=seed, requires_grad=requires_grad)


# --- the generalized Hilbert curve and the neighbours -----------------------------------------------


@pytest.mark.parametrize("height", list(range(1, 13)) + [16, 24])
def test_gilbert_is_a_permutation_that_walks_between_neighbours(height):
    for width in list(range(1, 13)) + [16, 23]:
        order = gilbert_order(height, width)
        assert sorted(order.tolist()) == list(range(height * width)) and order[0] == 0
        rows, cols = order // width, order % width
        dr, dc = (rows[1:] - rows[:-1]).abs(), (cols[1:] - cols[:-1]).abs()
        if len(order) > 1:
            assert torch.maximum(dr, dc).max() == 1  # every step to one of the 8 neighbours
            diagonal = int(((dr + dc) > 1).sum())
            assert diagonal <= 1
            major, minor = max(height, width), min(height, width)
            if major % 2 == 0 or minor % 2 == 1:
                assert diagonal == 0, (height, width)


@pytest.mark.parametrize("side, block, patch", [(16, 16, (4, 4)), (16, 64, (8, 8)), (8, 32, (4, 8))])
def test_gilbert_blocks_are_compact_patches(side, block, patch):
    # on a power-of-two square the curve is the Hilbert curve: aligned runs of 4^k cells fill squares
    order = gilbert_order(side, side)
    for start in range(0, side * side, block):
        cells = order[start:start + block]
        rows, cols = cells // side, cells % side
        extent = sorted((int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1))
        assert extent == sorted(patch)
    # raster blocks are strips instead
    raster = torch.arange(side * side)[:block]
    assert int((raster // side).max()) + 1 == block // side


def test_curve_order_of_a_video_is_frame_by_frame():
    order = curve_order((3, 4, 6))
    assert sorted(order.tolist()) == list(range(72))
    for f in range(3):
        assert torch.equal(order[f * 24:(f + 1) * 24], f * 24 + gilbert_order(4, 6))
    assert torch.equal(curve_order((3, 4, 6), curve="raster"), torch.arange(72))
    assert torch.equal(curve_order((5,)), torch.arange(5))


def brute_neighbors(coords, block):
    length = coords.shape[0]
    t = -(-length // block)
    out = torch.zeros(t, t, dtype=torch.bool)
    for a in range(length):
        for b in range(length):
            if (coords[a] - coords[b]).abs().max() <= 1:
                out[a // block, b // block] = True
    return out


@pytest.mark.parametrize("shape, block, curve", [((6, 7), 5, "gilbert"), ((2, 4, 5), 6, "gilbert"),
                                                 ((5, 8), 8, "raster"), ((11,), 3, "raster")])
def test_block_neighbors_match_brute_force(shape, block, curve):
    coords = raster_coordinates(shape)[curve_order(shape, curve=curve)]
    got = block_neighbors(coords, block)
    assert torch.equal(got, brute_neighbors(coords, block))
    assert torch.equal(got, got.T) and got.diagonal().all()
    if len(shape) == 1:
        assert torch.equal(got, sequence_neighbors(got.shape[0]))


# --- pooling, IPAR, selection, GAPR -----------------------------------------------------------------


def test_pool_blocks_averages_the_tokens_each_block_has():
    x = torch.randn(2, 3, 11, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = pool_blocks(x, 4)
    assert block_counts(11, 4).tolist() == [4, 4, 3]
    for j, tokens in enumerate(loop_blocks(11, 4)):
        assert torch.allclose(got[..., j, :], x[..., tokens, :].mean(-2), atol=1e-12)


def test_ragged_last_block_differs_from_zero_padding():
    # the official code pads with zeros and divides by N_b; we average over the tokens present
    x = torch.randn(1, 1, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (0, 0, 0, 2)).reshape(1, 1, 3, 4, 3).mean(-2)
    ours = pool_blocks(x, 4)
    assert torch.allclose(ours[..., :2, :], padded[..., :2, :], atol=1e-12)
    assert torch.allclose(ours[..., 2, :] * 2 / 4, padded[..., 2, :], atol=1e-12)


@pytest.mark.parametrize("lv, num_text, block", [(12, 3, 4), (13, 0, 4), (10, 5, 3), (8, 2, 8)])
def test_ipar_matches_the_loops(lv, num_text, block):
    q, k, _ = qkv(lv, num_text, heads=2, d=5, seed=lv)
    got = ipar_weights(q, k, block_size=block, num_text=num_text)
    for h in range(2):
        assert torch.allclose(got[0, h], loop_ipar(q[0, h], k[0, h], block, num_text, 1 / math.sqrt(5)), atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-12)


def test_ipar_equals_the_code_form_and_reduces_to_the_pooled_softmax():
    q, k, _ = qkv(16, 6, heads=2, d=8, seed=3)
    s = 1 / math.sqrt(8)
    q_pool, k_pool = pool_blocks(q[..., :16, :], 4), pool_blocks(k[..., :16, :], 4)
    # the code: p = softmax over [pooled blocks, text tokens]; p_blk N_b / (sum p_blk N_b + sum p_text)
    p = torch.softmax(torch.cat([q_pool @ k_pool.transpose(-2, -1), q_pool @ k[..., 16:, :].transpose(-2, -1)], -1) * s, -1)
    z = p[..., :4].sum(-1, keepdim=True) * 4 + p[..., 4:].sum(-1, keepdim=True)
    code = torch.cat([p[..., :4] * 4 / z, p[..., 4:].sum(-1, keepdim=True) / z], -1)
    assert torch.allclose(ipar_weights(q, k, block_size=4, num_text=6), code, atol=1e-12)
    # without text and with equal blocks the counts cancel: the pooled softmax
    no_text = ipar_weights(q[..., :16, :], k[..., :16, :], block_size=4)
    assert torch.allclose(no_text, torch.softmax(q_pool @ k_pool.transpose(-2, -1) * s, -1), atol=1e-12)
    # and with text, skipping the reallocation (plain softmax) gives a different, wrong answer
    assert not torch.allclose(code[..., :4], p[..., :4], atol=1e-3)


@pytest.mark.parametrize("drop, tau", [(0.75, 0.3), (0.5, 0.5), (0.9, 0.3), (0.0, 0.3), (0.8, 1.0)])
def test_selection_matches_the_loops(drop, tau):
    g = torch.Generator().manual_seed(int(drop * 100) + int(tau * 10))
    weights = torch.softmax(torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2, -1)
    got = select_blocks(weights, drop_rate=drop, tau=tau, num_visual_blocks=8)
    for index in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
        assert torch.equal(got[tuple(index)], loop_select(weights[tuple(index)], drop, tau, 8))


def test_selection_count_per_row_and_the_text_entry_taking_a_slot():
    weights = torch.tensor([[0.05, 0.1, 0.05, 0.1, 0.7]], dtype=torch.float64)  # last entry: text
    chosen = select_blocks(weights, drop_rate=0.5, tau=0.3, num_visual_blocks=4)
    # cumsum [0.7, ...] <= 0.3 holds for none: n = max(0 + 1, floor(0.5 * 4) = 2) = 2: the text and one block
    assert chosen.tolist() == [[False, True, False, False, True]]
    g = torch.Generator().manual_seed(5)
    weights = torch.softmax(torch.randn(50, 12, generator=g, dtype=torch.float64), -1)
    for drop in (0.5, 0.75, 0.9):
        counts = select_blocks(weights, drop_rate=drop, tau=0.3).sum(-1)
        sorted_weights = weights.sort(-1, descending=True).values
        want = ((sorted_weights.cumsum(-1) <= 0.3).sum(-1) + 1).clamp(min=math.floor((1 - drop) * 12 + 1e-9))
        assert torch.equal(counts, want)


def test_tau_of_the_scripts_keeps_a_subset_of_the_function_default():
    # the official scripts pass tau = 0.3; the function's own default is 0.5
    g = torch.Generator().manual_seed(6)
    weights = torch.softmax(torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.3, -1)  # flat rows
    at_03 = select_blocks(weights, drop_rate=0.9, tau=0.3)
    at_05 = select_blocks(weights, drop_rate=0.9, tau=0.5)
    assert not (at_03 & ~at_05).any()
    assert at_05.sum() > at_03.sum()  # on flat rows the threshold, not the drop rate, decides


def test_block_floor_rounding_differs_from_the_scripts():
    assert min_blocks(100, 0.8) == 20 and int((1 - 0.8) * 100) == 19
    assert [min_blocks(64, d) for d in (0.0, 0.5, 0.75, 0.9)] == [64, 32, 16, 6]


@pytest.mark.parametrize("lv, num_text, block", [(12, 2, 4), (11, 0, 3), (9, 3, 2)])
def test_gapr_matches_the_loops_and_ignores_the_scale(lv, num_text, block):
    q, k, _ = qkv(lv, num_text, heads=2, d=6, seed=lv + block)
    got = gapr_untrusted(q, k, block_size=block, num_text=num_text)
    for h in range(2):
        assert torch.equal(got[0, h], loop_gapr(q[0, h], k[0, h], block, num_text))
    # on scaled dot products (s q) the verdict is the same: every term is linear in q
    assert torch.equal(gapr_untrusted(q * 0.37, k, block_size=block, num_text=num_text), got)
    assert got.any() and not got.all()


def test_gapr_trusts_blocks_of_identical_tokens():
    # no spread inside a block: pooling is exact, err = 0 < gain wherever qbar.kbar != 0
    base = torch.randn(1, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    q = base.repeat_interleave(4, dim=2)
    k = base.flip(2).repeat_interleave(4, dim=2)
    assert not gapr_untrusted(q, k, block_size=4).any()


# --- the output -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lv, num_text, block, drop", [(12, 3, 3, 0.75), (13, 0, 4, 0.5), (10, 2, 2, 0.8)])
def test_output_matches_the_row_by_row_oracle(mode, lv, num_text, block, drop):
    q, k, v = qkv(lv, num_text, heads=2, d=4, seed=lv * 7 + block)
    t = -(-lv // block)
    neighbors = sequence_neighbors(t) if lv % 2 else None
    got = rectified_sparse_attention(q, k, v, block_size=block, drop_rate=drop, num_text=num_text,
                                     neighbors=neighbors, mode=mode)
    want = loop_rectified(q, k, v, block=block, drop=drop, tau=0.3, num_text=num_text, neighbors=neighbors, mode=mode)
    assert torch.allclose(got, want, atol=1e-10)


def test_modes_differ_where_they_should():
    q, k, v = qkv(24, 4, heads=2, d=8, seed=11)
    outs = {m: rectified_sparse_attention(q, k, v, block_size=4, drop_rate=0.8, num_text=4, mode=m) for m in MODES}
    for a in MODES:
        for b in MODES:
            if a < b:
                assert not torch.allclose(outs[a][..., :24, :], outs[b][..., :24, :]), (a, b)
    # text rows are dense attention in every mode
    dense = attention(q, k, v)
    for out in outs.values():
        assert torch.allclose(out[..., 24:, :], dense[..., 24:, :], atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_implied_map_reproduces_the_output_and_its_rows_sum_to_one(mode):
    q, k, v = qkv(20, 3, heads=2, d=6, seed=12)
    out, plan = rectified_sparse_attention(q, k, v, block_size=4, drop_rate=0.75, num_text=3, mode=mode,
                                           return_plan=True)
    weights = effective_weights(q, k, plan)
    assert torch.allclose(weights @ v, out[..., :20, :], atol=1e-12)
    rows = weights.sum(-1)
    if mode == "ipar":  # only the kept mass: R_hat < 1
        assert torch.allclose(rows, plan.factor[..., torch.arange(20) // 4], atol=1e-12) and (rows < 1).all()
    else:  # sparse renormalises; ipar+pr and rectified hand the rest to pooled values: the mass is conserved
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_a_shift_of_the_values_passes_through_except_for_ipar_alone(mode):
    q, k, v = qkv(18, 2, heads=2, d=4, seed=13)
    shift = torch.tensor([1.5, -2.0, 0.5, 3.0], dtype=torch.float64)
    options = dict(block_size=3, drop_rate=0.8, num_text=2, mode=mode)
    base = rectified_sparse_attention(q, k, v, **options)
    moved = rectified_sparse_attention(q, k, v + shift, **options)
    if mode == "ipar":
        assert not torch.allclose(moved, base + shift, atol=1e-6)
    else:
        assert torch.allclose(moved, base + shift, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_keeping_every_block_is_full_attention(mode):
    q, k, v = qkv(15, 0, heads=2, d=4, seed=14)
    out, plan = rectified_sparse_attention(q, k, v, block_size=4, drop_rate=0.0, mode=mode, return_plan=True)
    assert plan.computed.all() and torch.allclose(plan.factor, torch.ones_like(plan.factor), atol=1e-12)
    assert torch.allclose(out, attention(q, k, v), atol=1e-12)
    q, k, v = qkv(15, 3, heads=2, d=4, seed=15)
    every = torch.ones(4, 4, dtype=torch.bool)
    out = rectified_sparse_attention(q, k, v, block_size=4, drop_rate=0.9, num_text=3, neighbors=every, mode=mode)
    assert torch.allclose(out, attention(q, k, v), atol=1e-12)


def test_plan_bookkeeping():
    q, k, v = qkv(32, 4, heads=2, d=8, seed=16)
    neighbors = sequence_neighbors(8)
    plan = rectified_plan(q, k, v, block_size=4, drop_rate=0.75, num_text=4, neighbors=neighbors)
    assert plan.computed.shape == (1, 2, 8, 8) and plan.weights.shape == (1, 2, 8, 9)
    assert (plan.computed >= neighbors).all() and (plan.computed >= plan.selected[..., :8]).all()
    assert torch.equal(plan.covered, plan.computed | plan.untrusted)
    # every query block computes at least the floor of blocks minus the text slot
    assert (plan.selected.sum(-1) >= min_blocks(8, 0.75)).all()
    mask = plan.token_mask()
    assert mask[..., 32:, :].all() and mask[..., :32, 32:].all()
    assert torch.equal(mask[..., :32, :32], plan.computed.repeat_interleave(4, -2).repeat_interleave(4, -1))
    assert 0 < plan.density() < 1


@pytest.mark.parametrize("mode", ["rectified", "sparse"])
def test_plan_map_counts_each_kind(mode):
    q, k, v = qkv(24, 2, heads=2, d=6, seed=21)
    plan = rectified_plan(q, k, v, block_size=3, drop_rate=0.75, num_text=2, neighbors=sequence_neighbors(8), mode=mode)
    kinds = plan_map(plan, head=1)
    assert int((kinds >= 2).sum()) == int(plan.computed[0, 1].sum())
    assert int((kinds == 3).sum()) == int(plan.selected[0, 1, :, :8].sum())
    assert int((kinds == 0).sum()) == (int((~plan.covered[0, 1]).sum()) if mode == "rectified" else 0)


def test_block_lists_cover_exactly_the_computed_blocks():
    q, k, v = qkv(64, 0, heads=2, d=16, seed=17, dtype=torch.float32)
    plan = rectified_plan(q, k, v, block_size=16, drop_rate=0.5)
    layout = build_block_layout(plan.token_mask(), 16, 16)
    assert torch.equal(layout.tile_kinds(), plan.computed.to(torch.int8) * 2)  # full tiles, nothing partial


def test_gradcheck_for_a_fixed_selection():
    q, k, v = qkv(9, 2, heads=1, d=3, seed=18, requires_grad=True)

    def fn(a, b, c):
        return rectified_sparse_attention(a, b, c, block_size=3, drop_rate=0.5, num_text=2)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_grouped_query_heads_repeat_the_keys():
    q, k, v = make_qkv(hq=4, hkv=2, lq=14, d=4, dtype=torch.float64, seed=19)
    got = rectified_sparse_attention(q, k, v, block_size=3, num_text=2)
    want = rectified_sparse_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), block_size=3, num_text=2)
    assert torch.allclose(got, want, atol=1e-12)


# --- the kernel path --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rectified", "sparse"])
def test_kernel_path_equals_torch_path_forward_and_gradients(mode):
    q, k, v = make_qkv(hq=2, lq=42, d=16, dtype=torch.float32, seed=20)  # 37 visual + 5 text, not a multiple of 16
    options = dict(block_size=8, drop_rate=0.6, num_text=5, neighbors=sequence_neighbors(5), mode=mode)
    results = []
    for backend in ("reference", "kernel"):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = rectified_sparse_attention(*xs, backend=backend, **options)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape))
        results.append([out.detach(), *(x.grad for x in xs)])
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        assert torch.allclose(got, want, atol=2e-5), (name, (got - want).abs().max())


# --- the module -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 3, 8, 17, 40])
def test_registered_defaults_work_at_width_16_with_two_heads(length):
    torch.manual_seed(0)
    mixer = build_mechanism("rectified-sparse", 16, 2)
    x = torch.randn(2, length, 16)
    assert mixer(x).shape == (2, length, 16)
    with pytest.raises(ValueError, match="causal"):
        build_mechanism("rectified-sparse", 16, 2, causal=True)
    with pytest.raises(ValueError, match="no causal form"):
        RectifiedSparseAttention(16, 2, causal=True)


def test_module_in_the_tiny_transformer_sees_the_future():
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=11, max_len=24, dim=16, depth=2, num_heads=2, mechanism="rectified-sparse",
                            causal=False).eval()
    x = torch.randint(0, 11, (2, 24), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    with torch.no_grad():
        assert model(x).shape == (2, 24, 11)
        assert not torch.allclose(model(changed)[:, 0], model(x)[:, 0])


def test_module_equals_the_function_with_the_grid_order_and_shares_mha_parameters():
    torch.manual_seed(0)
    mha = build_mechanism("mha", 16, 2).double()
    grid = (2, 4, 5)
    mixer = RectifiedSparseAttention(16, 2, grid=grid, num_text_tokens=3, block_size=4, drop_rate=0.8).double()
    mixer.load_state_dict(mha.state_dict())
    x = torch.randn(2, 43, 16, dtype=torch.float64)
    q, k, v = mha.project(x)
    order = curve_order(grid)
    neighbors = block_neighbors(raster_coordinates(grid)[order], 4)
    out = rectified_sparse_attention(*(reorder_visual(t, order, 3) for t in (q, k, v)), block_size=4, drop_rate=0.8,
                                     num_text=3, neighbors=neighbors)
    back = torch.empty_like(order)
    back[order] = torch.arange(40)
    want = mha.merge_heads(reorder_visual(out, back, 3))
    assert torch.allclose(mixer(x), want, atol=1e-12)
    # keeping every block gives the MHA module back
    dense = RectifiedSparseAttention(16, 2, drop_rate=0.0).double()
    dense.load_state_dict(mha.state_dict())
    assert torch.allclose(dense(x), mha(x), atol=1e-12)


def test_module_kernel_backend_equals_torch_backend():
    torch.manual_seed(0)
    reference = RectifiedSparseAttention(32, 2, block_size=8, num_text_tokens=4)
    kernel = RectifiedSparseAttention(32, 2, block_size=8, num_text_tokens=4, backend="kernel")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(1, 45, 32)
    with torch.no_grad():
        assert torch.allclose(kernel(x), reference(x), atol=2e-5)


# --- synthetic tokens and the benchmark mask --------------------------------------------------------


def test_video_like_tokens_are_seeded_and_local():
    q, k, v = video_like_qkv((2, 6, 6), num_heads=2, head_dim=8, num_text=4, seed=3)
    assert q.shape == k.shape == v.shape == (1, 2, 76, 8)
    again = video_like_qkv((2, 6, 6), num_heads=2, head_dim=8, num_text=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    assert not torch.equal(q, video_like_qkv((2, 6, 6), num_heads=2, head_dim=8, num_text=4, seed=4)[0])
    # attention falls off with distance: a token's 8 neighbours get more weight than the tokens far away
    _, w = attention(q[..., :72, :], k[..., :72, :], v[..., :72, :], return_weights=True)
    coords = raster_coordinates((2, 6, 6)).double()
    dist = torch.cdist(coords, coords, p=float("inf"))
    near = (w[0] * ((dist <= 1) & (dist > 0))).sum(-1) / ((dist <= 1) & (dist > 0)).sum(-1)
    far = (w[0] * (dist >= 4)).sum(-1) / (dist >= 4).sum(-1).clamp_min(1)
    assert (near.mean(-1) > 3 * far.mean(-1)).all()


def test_benchmark_mask():
    length = 1000
    mask = benchmark_mask(length, seed=0)
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    assert torch.equal(mask, benchmark_mask(length, seed=0)) and not torch.equal(mask, benchmark_mask(length, seed=1))
    blocks = torch.arange(length) // 128
    block_mask = mask[::128][:, ::128]
    assert torch.equal(mask, block_mask[blocks][:, blocks])  # constant on 128 x 128 blocks
    assert block_mask.diagonal().all()  # a block always sees itself (it is its own neighbour)
    assert (block_mask.sum(-1) >= min_blocks(8, 0.75)).all()
    assert 1.0 < tile_bound(mask, 64, 64) < 4.0
    # the call the sparse benchmark makes
    assert torch.equal(benchmark_mask(length, device="cpu", seed=0), mask)


# --- bad inputs -------------------------------------------------------------------------------------


def _qkv():
    return qkv(12, 2, d=4)


@pytest.mark.parametrize("make, error, words", [
    (lambda: rectified_sparse_attention(*_qkv(), drop_rate=1.0), ValueError, ["drop_rate", "[0, 1)", "1.0"]),
    (lambda: rectified_sparse_attention(*_qkv(), tau=0.0), ValueError, ["tau", "(0, 1]", "0.0"]),
    (lambda: rectified_sparse_attention(*_qkv(), tau="0.3"), TypeError, ["tau", "float", "str"]),
    (lambda: rectified_sparse_attention(*_qkv(), block_size=0), ValueError, ["block_size", "positive int", "0"]),
    (lambda: rectified_sparse_attention(*_qkv(), num_text=14), ValueError, ["num_text", "fewer", "14"]),
    (lambda: rectified_sparse_attention(*_qkv(), num_text=-1), ValueError, ["num_text", "non-negative", "-1"]),
    (lambda: rectified_sparse_attention(*_qkv(), mode="pooled"), ValueError, ["mode", "rectified", "pooled"]),
    (lambda: rectified_sparse_attention(*_qkv(), backend="cuda"), ValueError, ["backend", "kernel", "cuda"]),
    (lambda: rectified_sparse_attention(*_qkv(), block_size=4, neighbors=torch.ones(2, 2, dtype=torch.bool)),
     ValueError, ["neighbors", "(4, 4)", "(2, 2)"]),
    (lambda: rectified_sparse_attention(_qkv()[0], *qkv(10, 2, d=4)[1:]), ValueError, ["q, k", "14", "12"]),
    (lambda: rectified_plan(*_qkv()[:2], mode="ipar+pr"), ValueError, ["v", "ipar+pr"]),
    (lambda: gilbert_order(0, 4), ValueError, ["height", "0"]),
    (lambda: ipar_weights(*qkv(12, 0, heads=2)[:1], qkv(12, 0, heads=1)[1], block_size=4), ValueError,
     ["k", "(1, 2, 12, 4)", "(1, 1, 12, 4)"]),
    (lambda: gapr_untrusted(*_qkv()[:2], block_size=4, num_text=20), ValueError, ["num_text", "14", "20"]),
    (lambda: select_blocks(torch.ones(3, 4, dtype=torch.long), drop_rate=0.5, tau=0.3), TypeError,
     ["weights", "floating", "int64"]),
    (lambda: curve_order((2, 3, 4, 5)), ValueError, ["grid", "(2, 3, 4, 5)"]),
    (lambda: curve_order((4, 4), curve="zorder"), ValueError, ["curve", "zorder"]),
    (lambda: RectifiedSparseAttention(16, 2, grid=(3, 3))(torch.zeros(1, 10, 16)), ValueError, ["grid", "9", "10"]),
    (lambda: RectifiedSparseAttention(16, 2, backend="kernel"), ValueError, ["backend", "16 to 128", "8"]),
    (lambda: RectifiedSparseAttention(16, 2, num_text_tokens=4)(torch.zeros(1, 4, 16)), ValueError,
     ["num_text_tokens=4", "4"]),
], ids=["drop-1", "tau-0", "tau-str", "block-0", "text-too-long", "text-negative", "bad-mode", "bad-backend",
        "neighbors-shape", "k-length", "plan-without-v", "gilbert-0", "ipar-heads", "gapr-text", "select-int", "grid-4d", "bad-curve", "grid-mismatch",
        "kernel-head-dim", "all-text"])
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_block_neighbors_refuses_float_coordinates():
    with pytest.raises(TypeError, match="coords: expected an integer tensor, got torch.float32"):
        block_neighbors(torch.tensor([[0.5, 0.0], [1.0, 0.0]]), 1)
