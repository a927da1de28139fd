"""Checks for lesson 42's exercises: FreeSwim's inward bounds, its video window mask, the softmax scale, the override.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (scalar loops, float64). When the answer matches a *known mistake* (a window cut at the
border, a shift one short at the end, a window that forgets the other frames, a scale without its
square root, the window branch's queries in the cross-attention, ...), the failure message names it.

Run against your work with ``make check LESSON=42``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnlib import attention

from . import harness

LESSON = "42_freeswim"


# --- independent references (scalar loops) ----------------------------------------------------------


def _bounds_loop(length, half, *, truncated=False, swapped=False, short_end=False, unclipped=False):
    """FreeSwim's bounds one query at a time; the switches reproduce the usual mistakes (shifts on the wrong
    ends grow the end that the clip then cuts: the same as no shift at all)."""
    lo, hi = [], []
    for i in range(length):
        grow_high = max(half - i, 0)
        grow_low = max(i + half - length + (0 if short_end else 1), 0)
        if truncated:
            grow_high = grow_low = 0
        if swapped:
            grow_high, grow_low = grow_low, grow_high
        a, b = i - half - grow_low, i + half + grow_high
        lo.append(a if unclipped else max(a, 0))
        hi.append(b if unclipped else min(b, length - 1))
    return torch.tensor([lo, hi])


def _as_pair(got, what):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError(f"{what}: expected a pair (lo, hi) of tensors, got {type(got).__name__}")
    for name, x in zip(("lo", "hi"), got):
        if not isinstance(x, torch.Tensor):
            raise AssertionError(f"{what}: {name} should be a torch.Tensor, got {type(x).__name__}")
    return torch.stack([torch.as_tensor(got[0]).long(), torch.as_tensor(got[1]).long()])


BOUND_CASES = [(10, 2), (12, 4), (7, 3), (9, 0), (5, 3), (1, 0)]


def check_inward_bounds(fn):
    for length, half in BOUND_CASES:
        what = f"inward_bounds(length={length}, half={half})"
        got = harness.call(fn, length, half)
        harness.expect_shape(got[0] if isinstance(got, (tuple, list)) and got else got, (length,), f"{what}[0] (lo)")
        mistakes = {
            "the window is cut at the borders instead of shifted inward (grow the far end by max(d - i, 0) "
            "and the near end by max(i + d - L + 1, 0))": _bounds_loop(length, half, truncated=True),
            "the shift at the end is one short: it is max(i + d - L + 1, 0), with the + 1, so the last query "
            "still sees 2d + 1 keys": _bounds_loop(length, half, short_end=True),
            "the bounds are not clipped to [0, L - 1]": _bounds_loop(length, half, unclipped=True),
        }
        harness.expect_close(_as_pair(got, what), _bounds_loop(length, half), what, mistakes=mistakes, atol=0, rtol=0)


def _mask_loop(grid, half, *, same_frame=False, truncated=False, swapped_axes=False, column_major=False):
    """The window mask pair by pair from token coordinates; the switches reproduce the usual mistakes."""
    t, h, w = grid
    dh, dw = (half[1], half[0]) if swapped_axes else half
    rows = _bounds_loop(h, dh, truncated=truncated)
    cols = _bounds_loop(w, dw, truncated=truncated)
    n = t * h * w

    def coords(x):
        if column_major:  # frames, then columns, then rows
            return x // (h * w), x % h, (x % (h * w)) // h
        return x // (h * w), (x % (h * w)) // w, x % w

    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        ti, ri, ci = coords(i)
        for j in range(n):
            tj, rj, cj = coords(j)
            ok = rows[0, ri] <= rj <= rows[1, ri] and cols[0, ci] <= cj <= cols[1, ci]
            out[i, j] = ok and (ti == tj or not same_frame)
    return out


MASK_CASES = [((2, 4, 6), (1, 2)), ((1, 7, 5), (2, 1)), ((3, 3, 4), (1, 1)), ((2, 5, 3), (3, 1))]


def check_freeswim_mask(fn):
    for grid, half in MASK_CASES:
        what = f"freeswim_mask(grid={grid}, half_sizes={half})"
        got = harness.call(fn, grid, half)
        n = grid[0] * grid[1] * grid[2]
        harness.expect_shape(got, (n, n), what)
        if got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a boolean mask (True = may attend), got dtype {got.dtype}")
        mistakes = {
            "a query sees only its own frame; FreeSwim's window covers every frame (full along time)":
                _mask_loop(grid, half, same_frame=True),
            "the window is cut at the borders instead of shifted inward": _mask_loop(grid, half, truncated=True),
            "d_h is applied to the columns and d_w to the rows; d_h is the half size along the height (rows)":
                _mask_loop(grid, half, swapped_axes=True),
            "the tokens are read column by column; they are flattened row-major (w = n mod W)":
                _mask_loop(grid, half, column_major=True),
        }
        harness.expect_close(got, _mask_loop(grid, half), what, mistakes=mistakes, atol=0, rtol=0)


SCALE_CASES = [(128, 1560, 3120), (16, 49, 196), (64, 100, 100)]


def _scale(d, n0, n, *, no_sqrt=False, inverted=False, no_head_dim=False, log_of_ratio=False):
    ratio = math.log(n0) / math.log(n) if inverted else math.log(n) / math.log(n0)
    if log_of_ratio:
        ratio = math.log(n / n0)
    value = ratio if no_head_dim else ratio / d
    return value if no_sqrt else math.sqrt(value)


def check_extrapolation_scale(fn):
    for d, n0, n in SCALE_CASES:
        what = f"extrapolation_scale(head_dim={d}, train_tokens={n0}, test_tokens={n})"
        got = harness.call(fn, d, n0, n)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            raise AssertionError(f"{what}: expected a float, got {type(got).__name__}")
        mistakes = {name: torch.tensor(_scale(d, n0, n, **{key: True})) for name, key in (
            ("the square root is missing: s = sqrt(log_{n0}(n) / d)", "no_sqrt"),
            ("the logarithms are the wrong way round: log_{n0}(n) = log(n) / log(n0)", "inverted"),
            ("the head dim is missing: divide by d before the square root", "no_head_dim"),
            ("this is the log of the ratio n / n0, not the ratio of the logs log(n) / log(n0)", "log_of_ratio"),
        )}
        harness.expect_close(torch.tensor(float(got)), torch.tensor(_scale(d, n0, n)), what, mistakes=mistakes,
                             atol=1e-12, rtol=1e-9)


def _override_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 2, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _override(q, k, v, *, kind="override", scale=None):
    window, full = attention(q[:2], k, v, scale=scale), attention(q[2:], k, v, scale=scale)
    halves = {"override": (full, full), "own": (window, full), "window-queries": (window, window),
              "swapped": (full, window)}[kind]
    return torch.cat(halves)


def check_cross_attention_override(fn):
    for seed in (0, 1):
        q, k, v = _override_inputs(seed)
        what = "cross_attention_override(q (4, 2, 6, 8), k, v (2, 2, 3, 8))"
        got = harness.call(fn, q.clone(), k.clone(), v.clone())
        mistakes = {
            "each branch computes its own cross-attention: FreeSwim overrides the window branch's with the full "
            "branch's": _override(q, k, v, kind="own"),
            "the window branch's queries are used: the override computes the cross-attention from the full "
            "branch's queries (the second half of q)": _override(q, k, v, kind="window-queries"),
            "the two halves are swapped": _override(q, k, v, kind="swapped"),
            "the 1/sqrt(D) scale is missing": _override(q, k, v, scale=1.0),
        }
        harness.expect_close(got, _override(q, k, v), what, mistakes=mistakes, atol=1e-9, rtol=1e-7)


CHECKERS = {"inward_bounds": check_inward_bounds, "freeswim_mask": check_freeswim_mask,
            "extrapolation_scale": check_extrapolation_scale,
            "cross_attention_override": check_cross_attention_override}


def test_inward_bounds(impl):
    check_inward_bounds(impl.inward_bounds)


def test_freeswim_mask(impl):
    check_freeswim_mask(impl.freeswim_mask)


def test_extrapolation_scale(impl):
    check_extrapolation_scale(impl.extrapolation_scale)


def test_cross_attention_override(impl):
    check_cross_attention_override(impl.cross_attention_override)


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


def _bounds_mistake(**switch):
    def wrong(length, half):
        lo, hi = _bounds_loop(length, half, **switch)
        return lo, hi
    return wrong


def _mask_mistake(**switch):
    return lambda grid, half: _mask_loop(grid, half, **switch)


MISTAKES = {
    "truncated-bounds": ("inward_bounds", _bounds_mistake(truncated=True), "cut at the borders"),
    # shifts on the wrong ends grow the end the clip cuts: the same numbers as no shift
    "swapped-shifts": ("inward_bounds", _bounds_mistake(swapped=True), "cut at the borders"),
    "short-end": ("inward_bounds", _bounds_mistake(short_end=True), "one short"),
    "unclipped": ("inward_bounds", _bounds_mistake(unclipped=True), "not clipped"),
    "bounds-not-pair": ("inward_bounds", lambda length, half: _bounds_loop(length, half), "wrong shape"),
    "own-frame-only": ("freeswim_mask", _mask_mistake(same_frame=True), "every frame"),
    "truncated-mask": ("freeswim_mask", _mask_mistake(truncated=True), "cut at the borders"),
    "axes-swapped": ("freeswim_mask", _mask_mistake(swapped_axes=True), "d_h is applied to the columns"),
    "column-major": ("freeswim_mask", _mask_mistake(column_major=True), "row-major"),
    "float-mask": ("freeswim_mask", lambda grid, half: _mask_loop(grid, half).float(), "boolean"),
    "no-sqrt": ("extrapolation_scale", lambda d, n0, n: _scale(d, n0, n, no_sqrt=True), "square root"),
    "inverted-logs": ("extrapolation_scale", lambda d, n0, n: _scale(d, n0, n, inverted=True), "wrong way round"),
    "no-head-dim": ("extrapolation_scale", lambda d, n0, n: _scale(d, n0, n, no_head_dim=True), "head dim"),
    "log-of-ratio": ("extrapolation_scale", lambda d, n0, n: _scale(d, n0, n, log_of_ratio=True), "log of the ratio"),
    "own-cross-attention": ("cross_attention_override", lambda q, k, v: _override(q, k, v, kind="own"),
                            "its own cross-attention"),
    "window-queries": ("cross_attention_override", lambda q, k, v: _override(q, k, v, kind="window-queries"),
                       "window branch's queries"),
    "swapped-halves": ("cross_attention_override", lambda q, k, v: _override(q, k, v, kind="swapped"), "swapped"),
    "no-scale": ("cross_attention_override", lambda q, k, v: _override(q, k, v, scale=1.0), "1/sqrt(D)"),
    "full-half-only": ("cross_attention_override", lambda q, k, v: attention(q[2:], k, v), "wrong shape"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
