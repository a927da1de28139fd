"""FreeSwim (attnlib.sparse.freeswim) against the official mask rule written as plain-integer loops."""

import math

import pytest
import torch

from attnlib import MultiHeadAttention, attention, build_mechanism, get_mechanism
from attnlib.sparse.freeswim import (
    FreeSwimWindowAttention,
    benchmark_grid,
    benchmark_mask,
    cross_attention_override,
    default_grid,
    dual_path_denoise,
    dual_path_self_attention,
    duplicate_branches,
    extrapolation_scale,
    freeswim_attention,
    freeswim_code_scale,
    half_sizes_for,
    inward_window_mask,
    keep_window_branch,
    keys_per_query,
    natten_kernel_sizes,
    window_bounds,
)
from attnlib.sparse.neighborhood import neighborhood_mask


def official_rule(grid, half_sizes, inward, i, j):
    """One (query, key) pair by the official mask (``init_mask_flex``), in plain integers; any frame."""
    _, h, w = grid
    dh, dw = half_sizes
    qh, qw = (i % (h * w)) // w, i % w
    kh, kw = (j % (h * w)) // w, j % w
    down, up = max(dh - qh, 0), max(dh + qh - h + 1, 0)
    right, left = max(dw - qw, 0), max(dw + qw - w + 1, 0)
    if not inward:  # the code's comment: set the four shifts to 0 for the version without the inward shift
        down = up = right = left = 0
    return qh - dh - up <= kh <= qh + dh + down and qw - dw - left <= kw <= qw + dw + right


def rule_mask(grid, half_sizes, inward):
    n = grid[0] * grid[1] * grid[2]
    return torch.tensor([[official_rule(grid, half_sizes, inward, i, j) for j in range(n)] for i in range(n)])


GRIDS = [((1, 7, 9), (2, 3)), ((2, 5, 7), (1, 2)), ((3, 4, 6), (1, 1)), ((1, 6, 6), (0, 2)), ((2, 3, 8), (2, 1)),
         ((1, 4, 5), (3, 3))]  # the last two: a box wider than the grid in one or both axes


@pytest.mark.parametrize("grid, half", GRIDS, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("inward", [True, False], ids=["inward", "truncated"])
def test_mask_matches_the_official_rule(grid, half, inward):
    assert torch.equal(inward_window_mask(grid, half, inward=inward), rule_mask(grid, half, inward))


@pytest.mark.parametrize("grid, half", GRIDS, ids=lambda x: "x".join(map(str, x)))
def test_inward_window_is_lesson_40s_natten_window(grid, half):
    t, h, w = grid
    kernel = (t, min(2 * half[0] + 1, h), min(2 * half[1] + 1, w))
    assert natten_kernel_sizes(grid, half) == kernel
    # the official rule (shifts delta+-) gives NATTEN's clamped window with kernel 2d + 1 (full along time)
    assert torch.equal(rule_mask(grid, half, True), neighborhood_mask(grid, kernel))


def test_bounds_are_natten_clamped_centres():
    for length in range(1, 14):
        for half in range(0, 6):
            lo, hi = window_bounds(length, half)
            if 2 * half + 1 <= length:
                centre = torch.arange(length).clamp(half, length - 1 - half)
                assert torch.equal(lo, centre - half) and torch.equal(hi, centre + half)
            else:  # the box is wider than the axis: everything
                assert (lo == 0).all() and (hi == length - 1).all()


def test_box_is_one_token_wider_than_the_even_training_grid():
    # Wan's 30 x 52 training grid gives d = (15, 26), a 31 x 53 box, not NATTEN's even kernel 30 x 52
    assert half_sizes_for((30, 52)) == (15, 26)
    grid = (1, 34, 56)
    mask = inward_window_mask(grid, (15, 26))
    assert (mask.sum(1) == 31 * 53).all()
    even = neighborhood_mask(grid, (1, 30, 52))
    assert (even.sum(1) == 30 * 52).all() and (even & ~mask).sum() == 0  # strictly inside the FreeSwim box


@pytest.mark.parametrize("grid, half", [((2, 9, 11), (2, 3)), ((3, 5, 5), (2, 2)), ((1, 12, 7), (4, 1))])
def test_every_query_sees_the_training_box_and_truncation_loses_keys_at_borders(grid, half):
    t, h, w = grid
    inward = inward_window_mask(grid, half)
    truncated = inward_window_mask(grid, half, inward=False)
    box = t * (2 * half[0] + 1) * (2 * half[1] + 1)
    assert (inward.sum(1) == box).all()
    assert torch.equal(keys_per_query(grid, half), inward.sum(1))
    assert torch.equal(keys_per_query(grid, half, inward=False), truncated.sum(1))
    assert not (truncated & ~inward).any()  # the truncated box lies inside the shifted one
    n = torch.arange(t * h * w)
    row, col = (n % (h * w)) // w, n % w
    interior = (row >= half[0]) & (row < h - half[0]) & (col >= half[1]) & (col < w - half[1])
    assert torch.equal(truncated[interior], inward[interior])
    assert (truncated.sum(1)[~interior] < box).all()


def test_every_frame_is_visible():
    grid, half = (3, 4, 6), (1, 2)
    mask = inward_window_mask(grid, half)
    frames = mask.view(3, 24, 3, 24)
    for a in range(3):
        for b in range(3):
            assert torch.equal(frames[a, :, b], frames[0, :, 0])


def test_interior_is_symmetric_but_the_shift_is_not():
    mask = inward_window_mask((1, 9, 9), (2, 2))
    grid = torch.arange(81).view(9, 9)
    inner = grid[2:-2, 2:-2].reshape(-1)
    assert torch.equal(mask[inner][:, inner], mask[inner][:, inner].T)
    assert not torch.equal(mask, mask.T)  # corner (0, 0) sees (4, 4); (4, 4) does not see (0, 0)
    assert mask[0, 4 * 9 + 4] and not mask[4 * 9 + 4, 0]


def test_attention_equals_masked_loop_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    grid, half = (2, 3, 4), (1, 1)
    q, k, v = (torch.randn(1, 2, 24, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = freeswim_attention(q, k, v, grid, half, scale=0.7)
    for head in range(2):
        for i in range(24):  # float64 loop over the keys the official rule allows
            keys = [j for j in range(24) if official_rule(grid, half, True, i, j)]
            weights = torch.softmax(0.7 * (q[0, head, i] @ k[0, head, keys].T), -1)
            assert torch.allclose(out[0, head, i], weights @ v[0, head, keys])
    assert torch.autograd.gradcheck(lambda a, b, c: freeswim_attention(a, b, c, (2, 3, 4), (1, 1)), (q, k, v))


def test_a_box_covering_the_grid_is_full_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(3))
    assert torch.allclose(freeswim_attention(q, k, v, (3, 4), (2, 2)), attention(q, k, v))
    assert torch.allclose(freeswim_attention(q, k, v, (3, 4), (5, 5), inward=False), attention(q, k, v))


def test_kernel_backend_equals_reference_forward_and_gradients():
    # 70 tokens, not a multiple of the 16-token tiles; the interpreter runs the Triton kernel on the CPU
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g).requires_grad_() for _ in range(3))
    kwargs = dict(scale=freeswim_code_scale(16))
    from kernels.block_sparse import block_sparse_attention

    mask = inward_window_mask((2, 5, 7), (1, 2))
    got = block_sparse_attention(q, k, v, mask, scale=kwargs["scale"], block_m=16, block_n=16)
    want = freeswim_attention(q, k, v, (2, 5, 7), (1, 2), **kwargs)
    assert torch.allclose(got, want, atol=1e-5)
    # the library's kernel path (its default tiles) gives the same
    assert torch.allclose(freeswim_attention(q, k, v, (2, 5, 7), (1, 2), backend="kernel", **kwargs), want, atol=1e-5)
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_extrapolation_scale():
    assert extrapolation_scale(64, 100, 100) == pytest.approx(1 / 8)
    # the official constant: sqrt(log(30 * 52 * 2) / log(30 * 52) / d) for Wan2.1-1.3B's head dim 128
    assert freeswim_code_scale() == pytest.approx(math.sqrt(math.log(3120, 1560) / 128))
    assert freeswim_code_scale(16) == pytest.approx(math.sqrt(math.log(3120, 1560) / 16))
    scales = [extrapolation_scale(16, 49, n) for n in (49, 100, 196, 400)]
    assert scales == sorted(scales) and scales[0] == pytest.approx(0.25)
    # log_{n0} n: four times the tokens of a 49-token grid multiplies the logits by sqrt(1 + log 4 / log 49)
    assert scales[2] / scales[0] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(49)))


def test_dual_path_self_attention_windows_one_branch_only():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, 12, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = inward_window_mask((3, 4), (1, 0))
    bias = torch.randn(12, 12, generator=g, dtype=torch.float64)
    out = dual_path_self_attention(q, k, v, mask, scale=0.3, bias=bias)
    assert torch.allclose(out[:2], attention(q[:2], k[:2], v[:2], mask=mask, bias=bias, scale=0.3))
    assert torch.allclose(out[2:], attention(q[2:], k[2:], v[2:], bias=bias, scale=0.3))


def test_cross_attention_override_uses_the_full_branch_queries_only():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 2, 12, 5, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    out = cross_attention_override(q, k, v)
    full = attention(q[2:], k, v)
    assert torch.allclose(out[:2], full) and torch.allclose(out[2:], full)
    changed = q.clone()
    changed[:2] = torch.randn(2, 2, 12, 5, generator=g, dtype=torch.float64)  # other window-branch queries
    assert torch.equal(cross_attention_override(changed, k, v), out)
    # a duplicated context (2B, ...) is read from its full-branch half
    assert torch.equal(cross_attention_override(q, torch.cat([k * 0, k]), torch.cat([v * 0, v])), out)


def test_dual_path_denoise_keeps_the_window_branch_and_resyncs_every_step():
    seen = []

    def step(dual, i):
        seen.append(dual.clone())
        b = dual.shape[0] // 2
        return torch.cat([dual[:b] + 1, dual[b:] * 10])  # the branches drift apart within a step

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    out = dual_path_denoise(step, x, 4)
    assert torch.allclose(out, x + 4)
    for i, dual in enumerate(seen):
        assert torch.allclose(dual[:3], x + i) and torch.equal(dual[:3], dual[3:])
    assert torch.equal(duplicate_branches(x)[3:], x) and torch.equal(keep_window_branch(duplicate_branches(x)), x)


def test_module_registered_non_causal_any_length_and_reduces_to_mha():
    mechanism = get_mechanism("freeswim-window")
    assert not mechanism.supports_causal and mechanism.lesson == "42"
    torch.manual_seed(0)
    for length in (1, 7, 12, 13, 30):
        mixer = build_mechanism("freeswim-window", 16, 2)
        assert mixer(torch.randn(2, length, 16)).shape == (2, length, 16)
    assert default_grid(12) == (1, 3, 4) and default_grid(13) == (1, 1, 13)
    # a box covering the whole grid is multi-head attention with the same weights
    wide = FreeSwimWindowAttention(16, 2, grid=(2, 3, 4), half_sizes=(3, 4))
    full = MultiHeadAttention(16, 2)
    full.load_state_dict(wide.state_dict())
    x = torch.randn(2, 24, 16)
    assert torch.allclose(wide(x), full(x), atol=1e-6)
    narrow = FreeSwimWindowAttention(16, 2, grid=(2, 3, 4), half_sizes=(0, 1))
    narrow.load_state_dict(wide.state_dict())
    assert not torch.allclose(narrow(x), full(x), atol=1e-3)


def test_module_kernel_backend_equals_reference():
    torch.manual_seed(0)
    reference = FreeSwimWindowAttention(32, 2, grid=(3, 4, 5), half_sizes=(1, 1))
    kernel = FreeSwimWindowAttention(32, 2, grid=(3, 4, 5), half_sizes=(1, 1), backend="kernel")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(1, 60, 32)
    with torch.no_grad():
        assert (kernel(x) - reference(x)).abs().max() < 1e-5


def test_benchmark_mask_follows_the_rule_on_whole_and_partial_frames():
    length = 170
    frames, h, w, dh, dw = benchmark_grid(length)
    assert frames * h * w <= length < (frames + 1) * h * w
    mask = benchmark_mask(length, seed=3)
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    whole = frames * h * w
    assert torch.equal(mask[:whole, :whole], inward_window_mask((frames, h, w), (dh, dw)))
    # tokens past the whole frames keep their (row, column) and the same spatial rule
    for i in range(0, length, 7):
        for j in range(length):
            assert mask[i, j] == official_rule((frames + 1, h, w), (dh, dw), True, i, j)
    assert torch.equal(benchmark_mask(length, seed=9), mask)  # content-free: the seed changes nothing


def test_benchmark_grid_is_wans_frame_at_bench_lengths():
    for length, frames in ((8192, 1), (16384, 2), (32768, 4)):
        assert benchmark_grid(length) == (frames, 68, 120, 15, 26)
    # below one frame the frame and the box shrink together, keeping about a fifth of a frame per query
    frames, h, w, dh, dw = benchmark_grid(2048)
    assert frames == 1 and abs((2 * dh + 1) * (2 * dw + 1) / (h * w) - 31 * 53 / 8160) < 0.05


@pytest.mark.parametrize("call, error, words", [
    (lambda: inward_window_mask((4,), 1), ValueError, ["grid", "(H, W)"]),
    (lambda: inward_window_mask((2, 0, 3), 1), ValueError, ["grid (H)", "positive"]),
    (lambda: inward_window_mask((3, 3), (1, -1)), ValueError, ["half_sizes (d_w)", "non-negative"]),
    (lambda: inward_window_mask((3, 3), (1, 1, 1)), ValueError, ["half_sizes", "(d_h, d_w)"]),
    (lambda: inward_window_mask((3, 3), 1, inward=1), TypeError, ["inward", "bool"]),
    (lambda: freeswim_attention(*(torch.randn(1, 1, 6, 4) for _ in range(3)), (2, 2), 1), ValueError,
     ["grid", "6", "4 tokens"]),
    (lambda: freeswim_attention(*(torch.randn(1, 1, 4, 4) for _ in range(3)), (2, 2), 1, backend="flex"),
     ValueError, ["backend", "'flex'"]),
    (lambda: extrapolation_scale(16, 1, 10), ValueError, ["train_tokens", "at least 2"]),
    (lambda: extrapolation_scale(0, 10, 10), ValueError, ["head_dim"]),
    (lambda: cross_attention_override(torch.randn(3, 1, 4, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)),
     ValueError, ["q", "even batch"]),
    (lambda: dual_path_denoise(lambda x, i: x[:1], torch.randn(2, 3), 1), ValueError, ["step", "(4, 3)"]),
    (lambda: build_mechanism("freeswim-window", 16, 2, causal=True), ValueError, ["causal"]),
    (lambda: FreeSwimWindowAttention(16, 2, grid=(2, 2))(torch.randn(1, 5, 16)), ValueError, ["grid", "5"]),
    (lambda: FreeSwimWindowAttention(16, 2, backend="flash"), ValueError, ["backend", "'flash'"]),
], ids=["grid-1d", "grid-zero", "half-negative", "half-three", "inward-int", "grid-mismatch", "backend",
        "train-tokens", "head-dim", "odd-batch", "step-shape", "causal", "module-grid", "module-backend"])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
