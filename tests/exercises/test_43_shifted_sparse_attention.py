"""Checks for lesson 43's exercises: the segment S²-Attn mask, Algorithm 1 (roll attention), the H2O cache.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (loops over positions, float64). When the answer matches a *known mistake* (every head
shifted, a mask that wraps around, outputs not rolled back, a recent window that is not protected,
...), the failure message names it.

Run against your work with ``make check LESSON=43``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "43_shifted_sparse_attention"


# --- independent references (loops) -----------------------------------------------------------------


def loop_mask(n, heads, g, *, shifted_heads="half", version="segment", causal=True, shift=None):
    """Masks from the definitions, one (head, query, key) at a time; options produce known mistakes."""
    s = g // 2 if shift is None else shift
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        shifted = {"half": h >= heads // 2, "all": True, "none": False, "first-half": h < heads - heads // 2}[shifted_heads]
        for i in range(n):
            for j in range(n):
                if not shifted:
                    same = i // g == j // g
                    order = j <= i
                elif version == "roll":
                    ri, rj = (i - s) % n, (j - s) % n
                    same, order = ri // g == rj // g, rj <= ri
                else:
                    same = (i + g - s) // g == (j + g - s) // g
                    order = j <= i
                out[h, i, j] = same and (order or not causal)
    return out


def loop_roll_attention(q, k, v, g, *, shifted_heads="half", roll_back=True, sign=-1, causal=True):
    """Attention with the roll-version mask, query by query in float64 (never rolls a tensor)."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    mask = loop_mask(n, h, g, shifted_heads=shifted_heads, version="roll", causal=causal,
                     shift=(g // 2) if sign == -1 else (-(g // 2)) % n)
    for bb in range(b):
        for hh in range(h):
            for i in range(n):
                keys = [j for j in range(n) if mask[hh, i, j]]
                s = torch.stack([q[bb, hh, i].double() @ k[bb, hh, j].double() for j in keys]) / math.sqrt(d)
                p = torch.softmax(s, 0)
                out[bb, hh, i] = sum(pj * v[bb, hh, j].double() for pj, j in zip(p, keys))
    if not roll_back:  # what a forgotten roll back leaves: the shifted rows sit s places too early
        split = {"half": h // 2, "all": 0}[shifted_heads]
        out[:, split:] = out[:, split:].roll(-(g // 2), dims=2)
    return out


def loop_h2o(scores, budget, recent, *, protect_recent=True, accumulate=True, evict="smallest", full_row=False):
    """The H2O cache with Python lists; options produce known mistakes."""
    n = scores.shape[0]
    out = torch.zeros(n, n, dtype=torch.bool)
    cache, total, last = [], [0.0] * n, [0.0] * n
    for t in range(n):
        cache.append(t)
        if len(cache) > budget:
            pool = [j for j in cache if j <= t - recent] if protect_recent else list(cache)
            key = (lambda j: (total[j] if accumulate else last[j], j))
            victim = min(pool, key=key) if evict == "smallest" else max(pool, key=key)
            cache.remove(victim)
        for j in cache:
            out[t, j] = True
        seen = list(range(t + 1)) if full_row else cache
        p = torch.softmax(torch.stack([scores[t, j].double() for j in seen]), 0)
        last = [0.0] * n
        for j, pj in zip(seen, p.tolist()):
            total[j] += pj
            last[j] = pj
    return out


# --- the checkers -----------------------------------------------------------------------------------


def check_s2_segment_mask(fn):
    for n, heads, g in [(12, 2, 4), (12, 4, 6), (10, 2, 2), (9, 3, 3), (8, 2, 8)]:
        got = harness.call(fn, n, heads, g)
        what = f"s2_segment_mask(seq_len={n}, num_heads={heads}, group_size={g})"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        harness.expect_close(got, loop_mask(n, heads, g), what, mistakes={
            "every head is shifted; only the heads h >= H // 2 are (the others keep the plain groups)":
                loop_mask(n, heads, g, shifted_heads="all"),
            "no head is shifted: the shifted heads must use segments [0, s), [s, s + G), ...":
                loop_mask(n, heads, g, shifted_heads="none"),
            "the first half of the heads is shifted instead of the second (heads h >= H // 2)":
                loop_mask(n, heads, g, shifted_heads="first-half"),
            "the shifted groups wrap around (the roll version): the first s tokens see the last ones, "
            "a leak of the future": loop_mask(n, heads, g, version="roll"),
            "the causal condition j <= i is missing": loop_mask(n, heads, g, causal=False),
        })


def check_s2_roll_attention(fn):
    for b, h, n, d, g, seed in [(1, 2, 8, 4, 4, 0), (2, 4, 12, 3, 6, 1), (1, 2, 9, 2, 3, 2)]:
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
        before = [x.clone() for x in (q, k, v)]
        got = harness.call(fn, q, k, v, g)
        if not all(torch.equal(x, y) for x, y in zip((q, k, v), before)):
            raise AssertionError("s2_roll_attention: it changed q, k or v in place (the official code does, on a "
                                 "copy it owns); roll into new tensors instead")
        what = f"s2_roll_attention on q of shape {(b, h, n, d)} with group_size={g}"
        harness.expect_close(got, loop_roll_attention(q, k, v, g), what, atol=1e-8, rtol=1e-6, mistakes={
            "the outputs of the shifted heads are not rolled back by +s": loop_roll_attention(q, k, v, g, roll_back=False),
            "every head is rolled; only the heads h >= H // 2 are shifted": loop_roll_attention(q, k, v, g, shifted_heads="all"),
            "the roll goes the wrong way: roll q, k, v by -s first, then the outputs by +s":
                loop_roll_attention(q, k, v, g, sign=+1),
            "the causal mask inside each group is missing": loop_roll_attention(q, k, v, g, causal=False),
        })


def check_h2o_cache_mask(fn):
    for n, budget, recent, seed in [(12, 4, 2, 0), (10, 5, 1, 1), (9, 3, 3, 2), (11, 6, 2, 3)]:
        scores = 3.0 * torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = harness.call(fn, scores.clone(), budget, recent)
        what = f"h2o_cache_mask on {n} tokens with budget={budget}, recent={recent}"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        harness.expect_close(got, loop_h2o(scores, budget, recent), what, mistakes={
            "the recent window is not protected: only keys j <= t - recent may be evicted":
                loop_h2o(scores, budget, recent, protect_recent=False),
            "keys are evicted by the last step's attention instead of the attention accumulated over all steps":
                loop_h2o(scores, budget, recent, accumulate=False),
            "the key with the LARGEST accumulated score is evicted; H2O keeps the heavy hitters and evicts the smallest":
                loop_h2o(scores, budget, recent, evict="largest"),
            "the softmax runs over every earlier key instead of over the cache (the keys evicted are gone)":
                loop_h2o(scores, budget, recent, full_row=True),
        })


CHECKERS = {
    "s2_segment_mask": check_s2_segment_mask,
    "s2_roll_attention": check_s2_roll_attention,
    "h2o_cache_mask": check_h2o_cache_mask,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_s2_segment_mask(impl):
    check_s2_segment_mask(impl.s2_segment_mask)


def test_s2_roll_attention(impl):
    check_s2_roll_attention(impl.s2_roll_attention)


def test_h2o_cache_mask(impl):
    check_h2o_cache_mask(impl.h2o_cache_mask)


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


def _masks(n, heads, g, **options):
    return loop_mask(n, heads, g, **options)


def mask_all_shifted(n, heads, g):
    return _masks(n, heads, g, shifted_heads="all")


def mask_none_shifted(n, heads, g):
    return _masks(n, heads, g, shifted_heads="none")


def mask_wraps(n, heads, g):
    return _masks(n, heads, g, version="roll")


def mask_not_causal(n, heads, g):
    return _masks(n, heads, g, causal=False)


def roll_grouped(q, k, v, g, *, back=True, all_heads=False, sign=-1, causal=True):
    b, h, n, d = q.shape
    s, half = g // 2, 0 if all_heads else h // 2
    q, k, v = (torch.cat([x[:, :half], x[:, half:].roll(sign * s, dims=2)], 1) for x in (q, k, v))
    grouped = [x.reshape(b, h, n // g, g, d) for x in (q, k, v)]
    scores = grouped[0] @ grouped[1].transpose(-2, -1) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~torch.ones(g, g, dtype=torch.bool).tril(), float("-inf"))
    out = (torch.softmax(scores, -1) @ grouped[2]).reshape(b, h, n, d)
    return torch.cat([out[:, :half], out[:, half:].roll(-sign * s, dims=2)], 1) if back else out


def roll_not_back(q, k, v, g):
    return roll_grouped(q, k, v, g, back=False)


def roll_all_heads(q, k, v, g):
    return roll_grouped(q, k, v, g, all_heads=True)


def roll_wrong_way(q, k, v, g):
    return roll_grouped(q, k, v, g, sign=+1)


def roll_no_causal(q, k, v, g):
    return roll_grouped(q, k, v, g, causal=False)


def roll_in_place(q, k, v, g):
    s, half = g // 2, q.shape[1] // 2
    for x in (q, k, v):
        x[:, half:] = x[:, half:].roll(-s, dims=2)
    out = roll_grouped(q, k, v, g, all_heads=False, sign=0)
    out[:, half:] = out[:, half:].roll(s, dims=2)
    return out


def h2o_unprotected(scores, budget, recent):
    return loop_h2o(scores, budget, recent, protect_recent=False)


def h2o_last_step(scores, budget, recent):
    return loop_h2o(scores, budget, recent, accumulate=False)


def h2o_evicts_largest(scores, budget, recent):
    return loop_h2o(scores, budget, recent, evict="largest")


def h2o_full_row(scores, budget, recent):
    return loop_h2o(scores, budget, recent, full_row=True)


MISTAKES = {
    "mask-all-shifted": ("s2_segment_mask", mask_all_shifted, "every head is shifted"),
    "mask-none-shifted": ("s2_segment_mask", mask_none_shifted, "no head is shifted"),
    "mask-wraps": ("s2_segment_mask", mask_wraps, "wrap around"),
    "mask-not-causal": ("s2_segment_mask", mask_not_causal, "causal condition j <= i is missing"),
    "roll-not-back": ("s2_roll_attention", roll_not_back, "not rolled back"),
    "roll-all-heads": ("s2_roll_attention", roll_all_heads, "every head is rolled"),
    "roll-wrong-way": ("s2_roll_attention", roll_wrong_way, "wrong way"),
    "roll-no-causal": ("s2_roll_attention", roll_no_causal, "causal mask inside each group is missing"),
    "roll-in-place": ("s2_roll_attention", roll_in_place, "in place"),
    "h2o-unprotected": ("h2o_cache_mask", h2o_unprotected, "recent window is not protected"),
    "h2o-last-step": ("h2o_cache_mask", h2o_last_step, "accumulated over all steps"),
    "h2o-evicts-largest": ("h2o_cache_mask", h2o_evicts_largest, "LARGEST"),
    "h2o-full-row": ("h2o_cache_mask", h2o_full_row, "over the cache"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
