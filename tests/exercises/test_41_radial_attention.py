"""Checks for lesson 41's exercises: the band's half-width, temporal thinning, the token mask, the block rule.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (bit lengths by repeated halving, loops over tokens and columns). When the answer matches a
*known mistake* (an octave off by one, the frame length where the code uses the next power of two, a band
without its block floor, thinning that never drops a pair, a band on the global token index, a block rule
that counts the empty columns, ...), the failure message names it.

Run against your work with ``make check LESSON=41``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "41_radial_attention"


# --- independent references (loops) -----------------------------------------------------------------


def bits(n):
    count = 0
    while n:
        n //= 2
        count += 1
    return count


def loop_width(d, s, decay=1.0, block=128, *, octave="bitlen", reference="power", floor=True, adjacent=True,
               use_decay=True, decay_after_floor=False):
    """The half-width from its definition; the options reproduce the usual mistakes."""
    if d == 0 or (d == 1 and adjacent):
        return float(s)
    top = 2 ** bits(s) if reference == "power" else s
    below = 2 ** bits(d) if octave == "bitlen" else 2 ** (bits(d) - 1)
    length = top / below
    factor = decay if use_decay else 1.0
    if decay_after_floor:
        return max(length, block) * factor
    return max(length * factor, block) if floor else length * factor


def loop_kept(d, s, block=128, *, thin=True, octave="bitlen", split="floor", invert=False):
    below = 2 ** bits(d) if octave == "bitlen" else 2 ** max(bits(d) - 1, 0)
    length = 2 ** bits(s) / below
    if not thin or length >= block:
        return True
    step = int(block / length) if split == "floor" else math.ceil(block / length)
    return (d % step != 0) if invert else (d % step == 0)


def loop_mask(f, s, decay=1.0, block=128, *, where="in-frame", strict=False, thin=True):
    n = f * s
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            d = abs(q // s - k // s)
            gap = abs(k % s - q % s) if where == "in-frame" else abs(k - q)
            w = loop_width(d, s, decay, block)
            inside = gap < w if strict else gap <= w
            out[q, k] = inside and (loop_kept(d, s, block) or not thin)
    return out


def loop_blocks(canvas, block, *, over="nonempty", cmp="strict", axis="column", any_rule=False, per="block"):
    rows, cols = canvas.shape[0] // block, canvas.shape[1] // block
    out = torch.zeros(rows, cols, dtype=torch.bool)
    for a in range(rows):
        for b in range(cols):
            tile = canvas[a * block:(a + 1) * block, b * block:(b + 1) * block]
            if axis == "row":
                tile = tile.T
            counts = [int(tile[:, c].sum()) for c in range(block)]
            if any_rule:
                out[a, b] = any(counts)
                continue
            real_rows = int(tile.any(dim=1).sum())
            scale = block if per == "block" else max(real_rows, 1)
            nonempty = sum(c > 0 for c in counts)
            if cmp == "strict":
                high = sum(c / scale > 1 / 3 for c in counts)
                base = nonempty if over == "nonempty" else block
                out[a, b] = base > 0 and high / base > 0.6
            else:
                high = sum(c / scale >= 1 / 3 for c in counts)
                base = nonempty if over == "nonempty" else block
                out[a, b] = base > 0 and high / base >= 0.6
    return out


# --- the checkers -----------------------------------------------------------------------------------

WIDTH_CASES = [(d, s, decay, block) for s in (12, 64, 100, 3840) for block in (4, 16, 128)
               for decay in (1.0, 0.3) for d in (0, 1, 2, 3, 5, 8, 13, 40)]


def check_band_half_width(fn):
    got = torch.tensor([float(harness.call(fn, d, s, decay, block)) for d, s, decay, block in WIDTH_CASES],
                       dtype=torch.float64)

    def table(**options):
        return torch.tensor([loop_width(d, s, decay, block, **options) for d, s, decay, block in WIDTH_CASES],
                            dtype=torch.float64)

    harness.expect_close(got, table(), "band_half_width over many (distance, s, decay, block) cases", mistakes={
        "the octave is off by one: divide by 2^bitlen(distance) (= 2^(floor(log2 distance) + 1)), not "
        "2^floor(log2 distance)": table(octave="floor-log2"),
        "the frame length s is used where the code uses the next power of two, 2^bitlen(s)": table(reference="s"),
        "the band has no floor: it is never narrower than one block, max(l * decay, block_size)": table(floor=False),
        "adjacent frames (distance 1) are not dense: w = s for distance <= 1": table(adjacent=False),
        "the decay factor is not applied": table(use_decay=False),
        "the decay is applied after the block floor; the code floors the decayed length, max(l * decay, B)":
            table(decay_after_floor=True),
    }, atol=1e-9, rtol=1e-9)


KEPT_CASES = [(d, s, block) for s in (12, 64, 100, 3600) for block in (4, 12, 16, 20, 128) for d in range(0, 70, 3)]


def check_frame_pair_kept(fn):
    got = torch.tensor([bool(harness.call(fn, d, s, block)) for d, s, block in KEPT_CASES])

    def table(**options):
        return torch.tensor([loop_kept(d, s, block, **options) for d, s, block in KEPT_CASES])

    harness.expect_close(got, table(), "frame_pair_kept over many (distance, s, block) cases", mistakes={
        "no frame pair is ever dropped: below l < block_size only every floor(block_size / l)-th distance is kept":
            table(thin=False),
        "the octave is off by one: l = 2^bitlen(s) / 2^bitlen(distance), not / 2^floor(log2 distance)":
            table(octave="floor-log2"),
        "the step is rounded up; the code keeps distance % floor(block_size / l) == 0": table(split="ceil"),
        "the test is inverted: the kept distances are the multiples of the step": table(invert=True),
    }, atol=0, rtol=0)


def check_radial_token_mask(fn):
    for f, s, decay, block in [(6, 8, 1.0, 2), (5, 12, 0.5, 4), (9, 4, 1.0, 1), (8, 4, 1.0, 4), (4, 10, 1.0, 4)]:
        got = harness.call(fn, f, s, decay, block)
        what = f"radial_token_mask(num_frames={f}, tokens_per_frame={s}, decay={decay}, block_size={block})"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        harness.expect_close(got, loop_mask(f, s, decay, block), what, atol=0, rtol=0, mistakes={
            "the band is on the global token index |k - q|; it is on the in-frame index |c - r| "
            "(c = k mod s, r = q mod s)": loop_mask(f, s, decay, block, where="global"),
            "the band is |c - r| < w; the code keeps |c - r| <= w": loop_mask(f, s, decay, block, strict=True),
            "temporal thinning is missing: frame pairs that are not kept must be empty":
                loop_mask(f, s, decay, block, thin=False),
        })


def check_shrink_to_blocks(fn):
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(3 * b, 2 * b, generator=g) < p, b) for b, p in ((4, 0.3), (6, 0.35), (8, 0.5), (12, 0.3))]
    # ties: one block of 6 rows with exactly 1/3 density in 3 of 5 columns, one with exactly 60 %
    tie = torch.zeros(6, 6, dtype=torch.bool)
    tie[:2, :3] = True  # 3 columns at density 2/6 = 1/3
    tie[0, 3:5] = True  # 2 more non-empty columns
    sixty = torch.zeros(6, 6, dtype=torch.bool)
    sixty[:3, :3] = True  # 3 columns at density 1/2
    sixty[0, 3:5] = True  # 5 non-empty columns: 3/5 = 60 % exactly
    band = torch.zeros(16, 16, dtype=torch.bool)
    band[:4, :] = True  # few real rows: the density is divided by B, not by the rows present
    cases += [(tie, 6), (sixty, 6), (band, 16)]
    for canvas, block in cases:
        got = harness.call(fn, canvas.clone(), block)
        what = f"shrink_to_blocks on a {tuple(canvas.shape)} canvas with block_size={block}"
        harness.expect_close(got, loop_blocks(canvas, block), what, atol=0, rtol=0, mistakes={
            "the share is taken over all B columns; the code counts only the non-empty columns (density > 0)":
                loop_blocks(canvas, block, over="all"),
            "ties are kept (>= 1/3, >= 60 %); the code asks for more than 1/3 and more than 60 %":
                loop_blocks(canvas, block, cmp="loose"),
            "the densities are per row; the code measures columns (allowed rows of each key column)":
                loop_blocks(canvas, block, axis="row"),
            "a block is kept as soon as any element is allowed; the code keeps only blocks dense enough":
                loop_blocks(canvas, block, any_rule=True),
            "a column's count is divided by the rows that hold anything; the code divides by B":
                loop_blocks(canvas, block, per="rows"),
        })


CHECKERS = {
    "band_half_width": check_band_half_width,
    "frame_pair_kept": check_frame_pair_kept,
    "radial_token_mask": check_radial_token_mask,
    "shrink_to_blocks": check_shrink_to_blocks,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_band_half_width(impl):
    check_band_half_width(impl.band_half_width)


def test_frame_pair_kept(impl):
    check_frame_pair_kept(impl.frame_pair_kept)


def test_radial_token_mask(impl):
    check_radial_token_mask(impl.radial_token_mask)


def test_shrink_to_blocks(impl):
    check_shrink_to_blocks(impl.shrink_to_blocks)


# --- the checkers' own tests: they must reject the stubs and the usual mistakes ---------------------


@pytest.mark.checker
@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_stubs_are_rejected(name):
    stubs = harness.load_lesson("exercises", LESSON)
    with pytest.raises(AssertionError, match="not implemented"):
        CHECKERS[name](getattr(stubs, name))


@pytest.mark.checker
def test_solutions_pass_every_checker():
    solutions = harness.load_lesson("solutions", LESSON)
    for name, checker in CHECKERS.items():
        checker(getattr(solutions, name))


def width_floor_log2(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, octave="floor-log2")


def width_uses_s(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, reference="s")


def width_no_floor(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, floor=False)


def width_adjacent_banded(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, adjacent=False)


def width_no_decay(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, use_decay=False)


def width_decay_after_floor(d, s, decay=1.0, block=128):
    return loop_width(d, s, decay, block, decay_after_floor=True)


def kept_always(d, s, block=128):
    return True


def kept_octave(d, s, block=128):
    return loop_kept(d, s, block, octave="floor-log2")


def kept_ceil(d, s, block=128):
    return loop_kept(d, s, block, split="ceil")


def kept_inverted(d, s, block=128):
    return loop_kept(d, s, block, invert=True)


def mask_global(f, s, decay=1.0, block=128):
    return loop_mask(f, s, decay, block, where="global")


def mask_strict(f, s, decay=1.0, block=128):
    return loop_mask(f, s, decay, block, strict=True)


def mask_unthinned(f, s, decay=1.0, block=128):
    return loop_mask(f, s, decay, block, thin=False)


def mask_float(f, s, decay=1.0, block=128):
    return loop_mask(f, s, decay, block).float()


def blocks_over_all(canvas, block):
    return loop_blocks(canvas, block, over="all")


def blocks_loose(canvas, block):
    return loop_blocks(canvas, block, cmp="loose")


def blocks_rows(canvas, block):
    return loop_blocks(canvas, block, axis="row")


def blocks_any(canvas, block):
    return loop_blocks(canvas, block, any_rule=True)


def blocks_per_rows(canvas, block):
    return loop_blocks(canvas, block, per="rows")


MISTAKES = {
    "width-floor-log2": ("band_half_width", width_floor_log2, "octave is off by one"),
    "width-uses-s": ("band_half_width", width_uses_s, "next power of two"),
    "width-no-floor": ("band_half_width", width_no_floor, "no floor"),
    "width-adjacent-banded": ("band_half_width", width_adjacent_banded, "adjacent frames"),
    "width-no-decay": ("band_half_width", width_no_decay, "decay factor is not applied"),
    "width-decay-after-floor": ("band_half_width", width_decay_after_floor, "after the block floor"),
    "kept-always": ("frame_pair_kept", kept_always, "no frame pair is ever dropped"),
    "kept-octave": ("frame_pair_kept", kept_octave, "octave is off by one"),
    "kept-ceil": ("frame_pair_kept", kept_ceil, "rounded up"),
    "kept-inverted": ("frame_pair_kept", kept_inverted, "inverted"),
    "mask-global": ("radial_token_mask", mask_global, "global token index"),
    "mask-strict": ("radial_token_mask", mask_strict, "|c - r| < w"),
    "mask-unthinned": ("radial_token_mask", mask_unthinned, "thinning is missing"),
    "mask-float": ("radial_token_mask", mask_float, "bool tensor"),
    "blocks-over-all": ("shrink_to_blocks", blocks_over_all, "non-empty columns"),
    "blocks-loose": ("shrink_to_blocks", blocks_loose, "ties are kept"),
    "blocks-rows": ("shrink_to_blocks", blocks_rows, "per row"),
    "blocks-any": ("shrink_to_blocks", blocks_any, "any element"),
    "blocks-per-rows": ("shrink_to_blocks", blocks_per_rows, "divides by B"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
