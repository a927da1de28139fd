"""Lesson 41: radial attention (attnlib.sparse.radial).

The band width and the temporal thinning against loops written from the definitions; the token mask
against a loop over (query, key); the block mask against the official code's procedure (one canvas per
frame pair, an explicit token mask, the >60 % / >1/3 rule in float32 as the code computes it); the
invariants (symmetry, adjacent frames dense, the density halving per octave, O(n log n) growth, the
canvas cut, the dense border, tiles of the block mask all full); where the paper's Eq. 4 and the code
differ; the kernel path against the PyTorch path (forward and gradients, lengths not multiples of 16);
the module, the registry, the benchmark mask, the toy video, and bad inputs.
"""

import math

import pytest
import torch

from attnlib import attention, build_mechanism, get_mechanism
from attnlib.sparse.block_sparse import build_block_layout, tile_counts
from attnlib.sparse.radial import (
    RadialAttention,
    band_half_width,
    band_pairs,
    benchmark_mask,
    decay_table,
    expand_block_mask,
    fit_exponential,
    frame_pair_kept,
    frame_pair_mask,
    keep_block,
    paper_radial_mask,
    radial_attention,
    radial_block_mask,
    radial_mask,
    radial_pair_count,
    radial_token_mask,
    shrink_canvas,
    similarity_attention,
    smooth_video,
)

from ..helpers import make_qkv

# --- definitions as loops ---------------------------------------------------------------------------


def bits(n):
    """Number of binary digits of n (0 for 0), by repeated halving."""
    count = 0
    while n:
        n //= 2
        count += 1
    return count


def loop_width(distance, s, decay=1.0, block=128, adjacent=None):
    if distance == 1 and adjacent is not None:
        return adjacent
    if distance <= 1:
        return s
    return max(2 ** bits(s) / 2 ** bits(distance) * decay, block)


def loop_kept(distance, s, block=128):
    length = 2 ** bits(s) / 2 ** bits(distance)
    return length >= block or distance % int(block / length) == 0


def loop_token_mask(n, s, decay=1.0, block=128, sink=False, adjacent=None):
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            i, r, j, c = q // s, q % s, k // s, k % s
            d = abs(i - j)
            band = loop_kept(d, s, block) and abs(c - r) <= loop_width(d, s, decay, block, adjacent)
            out[q, k] = band or (sink and j == 0)
    return out


def code_rule(canvas, block):
    """The code's block rule in its own float32 arithmetic, on a canvas whose sides are multiples of block."""
    rows, cols = canvas.shape[0] // block, canvas.shape[1] // block
    densities = canvas.reshape(rows, block, cols, block).sum(dim=1) / block  # float32, as the code
    nonzero = densities > 0
    high = densities > 1 / 3
    fraction = high.sum(dim=-1) / (nonzero.sum(dim=-1) + 1e-9)
    return fraction > 0.6


def canvas_block_mask(n, s, decay=1.0, block=128, sink=False, cut=True, adjacent=None):
    """The official procedure: per frame pair, a padded canvas of the pair's token mask, shrunk, OR-ed in."""
    token = loop_token_mask(n, s, decay, block, sink, adjacent)
    frames, tiles = -(-n // s), -(-n // block)
    out = torch.zeros(tiles, tiles, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            li, lj = min(s, n - i * s), min(s, n - j * s)
            ri, rj = (i * s) % block, (j * s) % block
            bi = -(-li // block) if cut else -(-(ri + li) // block)
            bj = -(-lj // block) if cut else -(-(rj + lj) // block)
            canvas = torch.zeros(ri + li + 2 * block, rj + lj + 2 * block, dtype=torch.bool)
            canvas[ri:ri + li, rj:rj + lj] = token[i * s:i * s + li, j * s:j * s + lj]
            keep = code_rule(canvas[:bi * block, :bj * block], block)
            for a in range(bi):
                for b in range(bj):
                    r, c = (i * s) // block + a, (j * s) // block + b
                    if keep[a, b] and r < tiles and c < tiles:
                        out[r, c] = True
    out[n // block:, :] = True
    out[:, n // block:] = True
    return out


# --- one frame pair -----------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 7, 16, 20, 64, 100, 3600, 3840])
def test_band_width_and_thinning_match_the_definitions(s):
    for block in (4, 16, 128):
        for decay in (1.0, 0.95, 0.2):
            for d in range(0, 70):
                assert band_half_width(d, s, decay=decay, block_size=block) == pytest.approx(
                    loop_width(d, s, decay, block))
                assert frame_pair_kept(d, s, block_size=block) == loop_kept(d, s, block)


def test_width_halves_per_octave_until_the_block_floor():
    s, block = 3840, 128
    assert band_half_width(0, s) == band_half_width(1, s) == s  # adjacent frames are dense
    widths = [band_half_width(2 ** k, s, block_size=block) for k in range(1, 8)]
    assert widths[:4] == [1024, 512, 256, 128]  # 4096 / 2^bitlen(Delta)
    assert widths[4:] == [block] * 3  # never below one block
    # every distance of one octave [2^k, 2^(k+1)) shares one width
    assert {band_half_width(d, s) for d in range(8, 16)} == {256.0}
    assert band_half_width(5, s, decay=0.2) == 128 and band_half_width(2, s, decay=0.2) == pytest.approx(204.8)


def test_thinning_keeps_one_distance_in_block_over_length():
    s, block = 64, 16  # l = 128 / 2^bitlen(Delta): 16 at Delta 4..7, 8 at 8..15, 4 at 16..31
    assert all(frame_pair_kept(d, s, block_size=block) for d in range(8))
    assert [d for d in range(8, 16) if frame_pair_kept(d, s, block_size=block)] == [8, 10, 12, 14]
    assert [d for d in range(16, 32) if frame_pair_kept(d, s, block_size=block)] == [16, 20, 24, 28]


def test_frame_pair_mask_is_a_band_on_the_in_frame_index():
    s = 20
    m = frame_pair_mask(0, 3, s, block_size=4)  # w = 32 / 4 = 8
    r = torch.arange(s)
    assert torch.equal(m, (r[None, :] - r[:, None]).abs() <= 8)
    assert frame_pair_mask(2, 0, s, block_size=4, sink=True).all()
    assert not frame_pair_mask(0, 9, s, block_size=16).any()  # thinned: 9 % floor(16 / 4) != 0


def test_the_width_is_compared_in_float32_as_the_official_code_does():
    # s = 512: l(2) = 2^10 / 2^2 = 256; a decay a hair below 129/256 gives w = 128.9999999999 in float64
    decay = 129 / 256 - 1e-13
    width = band_half_width(2, 512, decay=decay)
    assert width == 129.0  # float32 rounds it up, as torch.abs(c - r) <= w does with w a Python float
    distance = torch.arange(200)
    official = distance <= 256 * decay  # an int64 tensor against a Python float: computed in float32
    assert torch.equal(distance <= width, official) and bool(official[129])
    mask = radial_mask(3 * 512, 512, decay=decay, granularity="token")
    # a query of frame 2 and a key of frame 0, |c - r| = 129 and 130 apart in the frame
    assert bool(mask[2 * 512 + 129, 0]) and not bool(mask[2 * 512 + 130, 0])


def test_adjacent_width_reproduces_the_former_wan_rule():
    assert band_half_width(1, 3840, adjacent_width=1920) == 1920
    assert band_half_width(0, 3840, adjacent_width=1920) == 3840  # the frame itself stays dense
    assert band_half_width(2, 3840, adjacent_width=1920) == band_half_width(2, 3840)


# --- the token mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, s, decay, block, sink, adjacent", [
    (60, 12, 1.0, 4, False, None), (57, 12, 1.0, 4, True, None), (96, 8, 0.5, 2, False, None),
    (90, 9, 0.3, 4, True, 3), (64, 16, 1.0, 16, False, None), (35, 7, 1.0, 1, False, None)],
    ids=["plain", "partial-last-frame-sink", "decay", "odd-frame-adjacent", "frame-equals-block", "block-1"])
def test_token_mask_matches_the_loop(n, s, decay, block, sink, adjacent):
    got = radial_token_mask(n, s, decay=decay, block_size=block, sink=sink, adjacent_width=adjacent)
    assert torch.equal(got, loop_token_mask(n, s, decay, block, sink, adjacent))


def test_token_mask_invariants():
    s, frames, block = 16, 24, 4
    m = radial_token_mask(frames * s, s, block_size=block)
    assert torch.equal(m, m.T)  # bidirectional and symmetric
    frame = torch.arange(frames * s) // s
    assert m[(frame[:, None] - frame[None, :]).abs() <= 1].all()  # own and adjacent frames dense
    assert m.diagonal().all()
    # keys per query, counted per frame distance, agree with the closed-form pair count
    assert int(m.sum()) == radial_pair_count(frames, s, block_size=block)
    # a smaller decay only removes keys
    smaller = radial_token_mask(frames * s, s, block_size=block, decay=0.3)
    assert not (smaller & ~m).any() and smaller.sum() < m.sum()
    sink = radial_token_mask(frames * s, s, block_size=block, sink=True)
    assert sink[:, :s].all() and torch.equal(sink[:, s:], m[:, s:])
    assert int(sink.sum()) == radial_pair_count(frames, s, block_size=block, sink=True)


def test_band_density_halves_per_octave_of_distance():
    # the allowed pairs of one frame pair, at half-width w = s / 2^k (octave k, distances 2^k .. 2^(k+1) - 1):
    # 2 w s - w^2 + s - w, about half of the previous octave's, so an octave (twice the pairs) costs the same
    s = 1024
    per_pair = [band_pairs(s, band_half_width(2 ** k, s, block_size=1)) for k in range(1, 8)]
    ratios = [b / a for a, b in zip(per_pair, per_pair[1:])]
    assert all(0.5 <= r < 0.6 for r in ratios) and max(ratios[3:]) < 0.52, ratios
    assert all(band_pairs(s, band_half_width(d, s, block_size=1)) == per_pair[k - 1]
               for k in range(1, 8) for d in range(2 ** k, 2 ** (k + 1)))


def test_pair_count_grows_as_n_log_n():
    s, block = 64, 16
    frames = [16, 32, 64, 128, 256, 512]
    counts = [radial_pair_count(f, s, block_size=block) for f in frames]
    per_n_log_n = [c / (f * s * math.log2(f)) for c, f in zip(counts, frames)]
    # count / (n log2 f) stays within a narrow band while count / n^2 falls like log f / f
    assert max(per_n_log_n) / min(per_n_log_n) < 1.35, per_n_log_n
    density = [c / (f * s) ** 2 for c, f in zip(counts, frames)]
    assert all(b < 0.7 * a for a, b in zip(density, density[1:]))
    # the paper's bound 4 s n (log2 n - log2 s) holds for its own mask (with the sink) ...
    for f in (2, 4, 8, 16):
        assert int(paper_radial_mask(f * 16, 16).sum()) <= 4 * 16 * 16 * f * math.log2(f)


# --- paper (Eq. 4) against code --------------------------------------------------------------------


def test_paper_and_code_masks_differ_as_documented():
    s, frames = 16, 40  # s a power of two: 2^bitlen(s) = 2 s
    code = radial_token_mask(frames * s, s, block_size=1)
    paper = paper_radial_mask(frames * s, s, sink=False)
    frame = torch.arange(frames * s) // s
    index = torch.arange(frames * s) % s
    distance = (frame[:, None] - frame[None, :]).abs()
    gap = (index[:, None] - index[None, :]).abs()
    near = distance <= 1
    assert torch.equal(code[near], paper[near])  # both dense
    for d in range(2, 16):  # 2^rho <= s and the code's length l >= block = 1: no thinning in either
        rho = bits(d) - 1
        rows = distance == d
        # paper |k - l| + 1 <= s / 2^rho; code |c - r| <= s / 2^rho: one token more on each side
        assert torch.equal(paper[rows], (gap <= s // 2 ** rho - 1)[rows])
        assert torch.equal(code[rows], (gap <= s // 2 ** rho)[rows])
    # beyond 2^rho > s the paper keeps only the diagonal k = l, in every ceil(2^rho / s)-th frame pair
    far = distance == 32  # rho = 5, 32 / 16 = 2 -> kept (32 % 2 == 0)
    assert torch.equal(paper[far], (gap == 0)[far])
    assert not paper[distance == 33].any()
    # the code at block 4 keeps a band of B tokens where it keeps a thinned pair, never a lone diagonal
    blocky = radial_token_mask(frames * s, s, block_size=4)
    kept = (distance == 32)
    assert torch.equal(blocky[kept], (gap <= 4)[kept])


def test_code_band_is_narrower_than_the_paper_when_s_is_not_a_power_of_two():
    s = 3840
    for d in (2, 3, 4, 7, 8):
        rho = bits(d) - 1
        paper_half = s / 2 ** rho - 1
        code_half = band_half_width(d, s, block_size=1)
        assert 0.5 < code_half / paper_half < 0.55  # 4096 / 2^(rho + 1) against 3840 / 2^rho - 1


def test_flat_band_is_not_a_2d_neighbourhood():
    # a 6 x 8 frame: the band |c - r| <= 8 around (2, 7) wraps into the next row's first columns ...
    h, w = 6, 8
    r = 2 * w + 7
    seen = {(c // w, c % w) for c in range(h * w) if abs(c - r) <= 8}
    assert (3, 0) in seen and (3, 7) in seen  # 1 and 1 rows away, but 7 and 0 columns away
    # ... and spans 2 w / w = 2 rows of full width around the query, not a square box
    assert {y for y, _ in seen} == {1, 2, 3} and len(seen) == 17
    assert (2, 0) in seen and (1, 7) in seen


# --- the block mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, s, block, decay, sink, cut", [
    (100, 20, 8, 1.0, False, True), (132, 44, 16, 1.0, False, True), (132, 44, 16, 1.0, False, False),
    (123, 44, 16, 0.5, True, True), (84, 12, 8, 1.0, True, False), (96, 16, 8, 0.3, False, True),
    (70, 7, 4, 1.0, False, True), (48, 4, 8, 1.0, False, True)],
    ids=["aligned-offsets", "quirk-cut", "quirk-kept", "partial-sink-decay", "frame<2block-nocut", "decay",
         "odd-frames", "frame<block"])
def test_block_mask_matches_the_code_procedure(n, s, block, decay, sink, cut):
    got = radial_block_mask(n, s, block_size=block, decay=decay, sink=sink, cut_canvas=cut)
    assert torch.equal(got, canvas_block_mask(n, s, decay, block, sink, cut))


def test_integer_block_rule_equals_the_code_float_rule():
    g = torch.Generator().manual_seed(0)
    for block in (4, 8, 16, 128):
        for p in (0.05, 0.2, 0.35, 0.6):
            canvas = torch.rand(3 * block, 3 * block, generator=g) < p
            assert torch.equal(shrink_canvas(canvas, block), code_rule(canvas, block))
    # the thresholds exactly: 6 of 16 rows (> 1/3) is high, 5 is not; 3 of 5 columns (= 60 %) is not enough
    counts = torch.tensor([[6, 6, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                           [6, 6, 6, 5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                           [6, 6, 6, 6, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert keep_block(counts, 16).tolist() == [True, False, True]


def test_canvas_cut_quirk():
    # s = 44, B = 16: frame 1 starts at offset 12, so 12 + 44 = 56 > 3 blocks * 16 = 48: its last
    # 8 tokens are cut from its own pairs. With s = 48 every frame starts on a block: nothing is cut.
    for s, cut_matters in ((44, True), (48, False), (40, False)):
        n = 6 * s
        cut = radial_block_mask(n, s, block_size=16, cut_canvas=True)
        kept = radial_block_mask(n, s, block_size=16, cut_canvas=False)
        assert not (cut & ~kept).any()  # keeping the whole canvas only adds blocks
        assert (not torch.equal(cut, kept)) == cut_matters
        if cut_matters:
            # the blocks that differ hold the spilled tail of some frame (rows or columns)
            tails = {(i * s + s - 1) // 16 for i in range(6) if (i * s) % 16 + s > -(-s // 16) * 16}
            rows, cols = (kept & ~cut).nonzero(as_tuple=True)
            assert all(r in tails or c in tails for r, c in zip(rows.tolist(), cols.tolist()))


def test_frames_shorter_than_a_block_lose_even_their_own_blocks():
    # the code's rule divides a column's count by B: with s = 8 < B / 3 = 10.7 no column of a 32-token block
    # is dense enough, so the block mask keeps nothing but the dense border (the code expects s >> B)
    block = radial_block_mask(8 * 32, 8, block_size=32)
    assert not block.any()
    assert radial_block_mask(8 * 32, 32, block_size=32).diagonal().all()


def test_canvas_cut_can_leave_a_query_block_without_keys():
    # s = 30, B = 16: frame 1's cut canvas ends at token 47; block 3 (tokens 48-63) holds 12 cut tokens of frame 1
    # and 4 of frame 2, whose columns never exceed 4/16 < 1/3: no key block for those queries
    cut = radial_block_mask(8 * 30, 30, block_size=16)
    assert (~cut.any(dim=1)).nonzero().flatten().tolist() == [3]
    assert radial_block_mask(8 * 30, 30, block_size=16, cut_canvas=False).any(dim=1).all()
    q, k, v = make_qkv(hq=1, lq=240, d=4, seed=9)
    out = radial_attention(q, k, v, tokens_per_frame=30, block_size=16)
    assert (out[:, :, 48:64] == 0).all() and torch.isfinite(out).all()  # zeros, never NaN


def test_ragged_last_block_is_dense_and_aligned_lengths_have_no_border():
    ragged = radial_block_mask(100, 20, block_size=16)  # 100 = 6 * 16 + 4
    assert ragged[6].all() and ragged[:, 6].all()
    aligned = radial_block_mask(20 * 16, 16, block_size=16)
    assert not aligned[-1].all()


def test_block_mask_tiles_are_full_or_skipped_and_cover_the_mask():
    n, s, block = 150, 30, 16
    block_mask = radial_block_mask(n, s, block_size=block)
    mask = expand_block_mask(block_mask, n, block)
    layout = build_block_layout(mask, block, block)
    kinds = layout.tile_kinds()[0, 0]
    # every visited tile is full except the ragged last key block (the kernel masks keys past n)
    visited = kinds > 0
    assert torch.equal(visited, block_mask)
    assert (kinds[:, :-1][visited[:, :-1]] == 2).all()
    counts = tile_counts(mask, block, block)
    assert counts["visited"] == int(block_mask.sum())


def test_official_printouts_are_reproduced():
    # a user's printout on mit-han-lab/radial-attention (GitHub thread 61): Wan2.1, 768 x 1280, 69 frames
    # (18 latent frames of 3840 tokens), any small decay: "mask sparsity: 0.7366323471069336", with the Wan
    # rule of that time, w(1) = s // 2
    m = radial_block_mask(18 * 3840, 3840, decay=0.2, block_size=128, sink=True, adjacent_width=1920)
    assert m.shape == (540, 540)
    sparsity = 1 - m.sum() / m.numel()  # float32, as the code prints it
    assert sparsity.item() == 0.7366323471069336
    assert torch.equal(m, radial_block_mask(18 * 3840, 3840, decay=1e-3, block_size=128, sink=True,
                                            adjacent_width=1920))


# --- attention and the kernel path -------------------------------------------------------------------


def test_radial_attention_is_masked_attention():
    q, k, v = make_qkv(hq=2, lq=50, d=8, dtype=torch.float64, seed=3)
    for granularity in ("token", "block"):
        mask = radial_mask(50, 10, block_size=4, decay=0.5, granularity=granularity)
        want = attention(q, k, v, mask=mask)
        got = radial_attention(q, k, v, tokens_per_frame=10, block_size=4, decay=0.5, granularity=granularity)
        assert torch.allclose(got, want, atol=1e-12)
    # one frame: every token sees every token
    assert torch.allclose(radial_attention(q, k, v, tokens_per_frame=50, block_size=4, granularity="token"),
                          attention(q, k, v), atol=1e-12)


@pytest.mark.parametrize("n, s, granularity, sink", [(77, 20, "block", False), (77, 20, "token", True),
                                                     (45, 9, "block", True)],
                         ids=["block-77", "token-77-sink", "block-45-odd-frames"])
def test_kernel_path_equals_torch_path_forward_and_gradients(n, s, granularity, sink):
    q, k, v = make_qkv(hq=2, lq=n, d=16, seed=5, requires_grad=True)
    options = dict(tokens_per_frame=s, block_size=16, sink=sink, granularity=granularity)
    want = radial_attention(q, k, v, **options)
    got = radial_attention(q, k, v, backend="kernel", **options)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
    grad = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, (q, k, v), grad)
    grads_got = torch.autograd.grad(got, (q, k, v), grad)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_gradcheck_float64():
    q, k, v = make_qkv(hq=2, lq=14, d=3, dtype=torch.float64, seed=7, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: radial_attention(a, b, c, tokens_per_frame=3, block_size=1,
                                                                     granularity="token"), (q, k, v))


# --- the module and the registry --------------------------------------------------------------------


def test_module_equals_the_function_with_mha_projections():
    torch.manual_seed(0)
    layer = RadialAttention(16, 2, tokens_per_frame=6, block_size=4, decay=0.5).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    q, k, v = layer.project(x)
    want = layer.out_proj(radial_attention(q, k, v, tokens_per_frame=6, block_size=4, decay=0.5)
                          .transpose(1, 2).reshape(2, 40, 16))
    out, weights = layer(x, return_weights=True)
    assert torch.allclose(out, want, atol=1e-12)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 40, dtype=torch.float64))
    assert not (weights[:, :, ~layer.pattern(40)] != 0).any()


def test_num_frames_option_sets_the_frame_length():
    layer = RadialAttention(16, 2, num_frames=4, block_size=4, granularity="token")
    assert layer.frame_length(40) == 10 and layer.frame_length(41) == 11
    assert torch.equal(layer.pattern(40), radial_token_mask(40, 10, block_size=4))


def test_registered_mechanism_with_defaults_on_any_length():
    mechanism = get_mechanism("radial")
    assert (mechanism.paper, mechanism.lesson, mechanism.supports_causal) == ("P39", "41", False)
    torch.manual_seed(0)
    mixer = build_mechanism("radial", 16, 2)
    for length in (1, 5, 16, 17, 40, 97):
        x = torch.randn(2, length, 16)
        y = mixer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    # bidirectional: the last token changes the first output
    x = torch.randn(1, 20, 16)
    x2 = x.clone()
    x2[:, -1] += 1
    assert not torch.allclose(mixer(x)[:, 0], mixer(x2)[:, 0])


def test_kernel_module_equals_reference_module():
    torch.manual_seed(0)
    reference = RadialAttention(32, 2, tokens_per_frame=12, block_size=16, sink=True)
    kernel = RadialAttention(32, 2, tokens_per_frame=12, block_size=16, sink=True, backend="kernel")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(1, 60, 32)
    with torch.no_grad():
        assert torch.allclose(kernel(x), reference(x), atol=2e-5)


# --- the benchmark mask -----------------------------------------------------------------------------


def test_benchmark_mask_is_the_hunyuan_setting_scaled():
    length = 1000  # 3 frames of 334 tokens (never frames shorter than two blocks)
    mask = benchmark_mask(length)
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    assert torch.equal(mask, radial_mask(length, 334, decay=0.95, block_size=128))
    big = benchmark_mask(7680)  # 30 frames of 256 tokens
    assert torch.equal(big, radial_mask(7680, 256, decay=0.95, block_size=128))
    assert 0.2 < big.float().mean() < 0.5  # sparse where it counts
    assert torch.equal(mask, mask.T) and mask.diagonal().all()
    assert torch.equal(mask, benchmark_mask(length, seed=3))  # static: the seed changes nothing


# --- the toy video ----------------------------------------------------------------------------------


def test_smooth_video_has_the_promised_correlations():
    video = smooth_video(12, 6, 6, 256, temporal_corr=0.8, spatial_corr=0.5, seed=1).view(12, 6, 6, 256)
    assert torch.equal(video, smooth_video(12, 6, 6, 256, temporal_corr=0.8, spatial_corr=0.5, seed=1)
                       .view(12, 6, 6, 256))
    assert abs(video.var() - 1) < 0.05

    def corr(a, b):
        return (a * b).mean().item()

    assert abs(corr(video[1:], video[:-1]) - 0.8) < 0.05
    assert abs(corr(video[2:], video[:-2]) - 0.64) < 0.05
    assert abs(corr(video[:, 1:], video[:, :-1]) - 0.5) < 0.05
    assert abs(corr(video[:, :, 1:], video[:, :, :-1]) - 0.5) < 0.05


def test_decay_table_and_fit():
    weights = similarity_attention(smooth_video(8, 4, 4, 64, temporal_corr=0.9, spatial_corr=0.3), sharpness=6.0)
    table = decay_table(weights, (4, 4))
    assert table.shape == (8, 7)
    # the mass sums back to one per query: sum over cells of (mean weight x number of keys in the cell)
    assert torch.allclose(weights.sum(-1), torch.ones(128, dtype=torch.float64))
    assert table[0, 0] > table[1, 0] > table[3, 0] and table[0, 0] > table[0, 1]
    c, rate, r2 = fit_exponential(torch.tensor([3.0 * math.exp(-0.5 * d) for d in range(6)], dtype=torch.float64))
    assert c == pytest.approx(3.0) and rate == pytest.approx(0.5) and r2 == pytest.approx(1.0)


# --- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, words", [
    (lambda: radial_token_mask(0, 4), ValueError, ["seq_len", "positive int", "0"]),
    (lambda: radial_token_mask(16, 0), ValueError, ["tokens_per_frame", "0"]),
    (lambda: radial_token_mask(16, 4, decay=0), ValueError, ["decay", "positive", "0"]),
    (lambda: radial_token_mask(16, 4, sink=1), TypeError, ["sink", "bool", "int"]),
    (lambda: radial_block_mask(16, 4, block_size=0), ValueError, ["block_size", "0"]),
    (lambda: band_half_width(-1, 4), ValueError, ["distance", "non-negative", "-1"]),
    (lambda: band_half_width(1, 4, adjacent_width=-2), ValueError, ["adjacent_width", "-2"]),
    (lambda: radial_mask(16, 4, granularity="pixel"), ValueError, ["granularity", "block", "pixel"]),
    (lambda: expand_block_mask(torch.ones(3, 3, dtype=torch.bool), 16, 4), ValueError, ["block", "(4, 4)", "(3, 3)"]),
    (lambda: radial_attention(*make_qkv(lq=8), tokens_per_frame=4, backend="flash"), ValueError,
     ["backend", "reference", "flash"]),
    (lambda: radial_attention(*make_qkv(lq=8)[:1], *make_qkv(lq=6)[1:], tokens_per_frame=4), ValueError,
     ["k", "8", "6"]),
    (lambda: build_mechanism("radial", 16, 2, causal=True), ValueError, ["causal", "radial"]),
    (lambda: RadialAttention(16, 2, causal=True), ValueError, ["causal", "bidirectional"]),
    (lambda: RadialAttention(16, 2, tokens_per_frame=4, num_frames=2), ValueError, ["num_frames", "not both"]),
    (lambda: RadialAttention(16, 2, backend="kernel")(torch.zeros(1, 4, 16), return_weights=True), ValueError,
     ["return_weights", "kernel"]),
    (lambda: smooth_video(2, 2, 2, temporal_corr=1.0, spatial_corr=0.5), ValueError, ["temporal_corr", "[0, 1)"]),
    (lambda: decay_table(torch.ones(10, 10), (2, 2)), ValueError, ["frame_shape", "10"]),
    (lambda: fit_exponential(torch.tensor([1.0, 0.0, 2.0])), ValueError, ["values", "positive"]),
], ids=["length-zero", "frame-zero", "decay-zero", "sink-not-bool", "block-zero", "negative-distance",
        "negative-adjacent", "bad-granularity", "block-shape", "bad-backend", "lengths-differ", "causal-registry",
        "causal-module", "frames-twice", "kernel-weights", "corr-one", "frames-not-dividing", "fit-nonpositive"])
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
