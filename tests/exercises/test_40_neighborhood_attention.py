"""Checks for lesson 40's exercises: NATTEN's window start, the kinds of a mask's tiles, the tile bound.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation. When the answer matches a *known mistake* (a window cut at the border, the extra key of an
even window on the right, a ragged tile counted as full, 1/density instead of the tile bound), the
failure message names it.

Run against your work with ``make check LESSON=40``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "40_neighborhood_attention"


def _start_loop(length, k, s, *, even_right=False, cut=False, first_leader=False):
    """NATTEN's start by scalar arithmetic, with switches that reproduce the usual mistakes."""
    left = k // 2 if not even_right else (k - 1) // 2
    right = k - 1 - left
    starts = []
    for i in range(length):
        leader = i // s * s + (0 if first_leader else s // 2)
        leader = min(leader, length - 1)
        centre = leader if cut else min(max(leader, left), length - 1 - right)
        starts.append(centre - left)
    return torch.tensor(starts)


def check_window_start(fn):
    for length, k, s in [(12, 4, 2), (13, 5, 1), (16, 4, 4), (11, 6, 3), (9, 9, 1)]:
        got = harness.call(fn, length, k, s)
        harness.expect_shape(got, (length,), f"window_start({length}, {k}, {s})")
        mistakes = {
            "the window is cut at the borders instead of shifted inward (clamp the centre to [K//2, L-1-right])":
                _start_loop(length, k, s, cut=True),
            "an even window has its extra key on the right; NATTEN puts it on the left (left = K // 2)":
                _start_loop(length, k, s, even_right=True),
            "the leader is the first query of the stride group; it is the centre one (+ s // 2)":
                _start_loop(length, k, s, first_leader=True),
        }
        harness.expect_close(got, _start_loop(length, k, s), f"window_start(length={length}, K={k}, stride={s})",
                             mistakes=mistakes, atol=0, rtol=0)


def _kinds_loop(mask, bm, bn, *, ragged_full=False, full_if_any=False):
    lq, lk = mask.shape
    tq, tk = -(-lq // bm), -(-lk // bn)
    kinds = torch.zeros(tq, tk, dtype=torch.int64)
    for t in range(tq):
        for u in range(tk):
            cells = [bool(mask[i, j]) for i in range(t * bm, min((t + 1) * bm, lq)) for j in range(u * bn, min((u + 1) * bn, lk))]
            if any(cells):
                full = (all(cells) or full_if_any) and ((u + 1) * bn <= lk or ragged_full)
                kinds[t, u] = 2 if full else 1
    return kinds


def _masks():
    g = torch.Generator().manual_seed(0)
    random = torch.rand(11, 13, generator=g) < 0.3
    random[:4, :4] = True
    blocked = (torch.arange(10)[:, None] // 4) == (torch.arange(10)[None, :] // 4)
    return [(random, 4, 4), (blocked, 4, 4), (torch.ones(9, 10, dtype=torch.bool), 4, 4), (random, 8, 4)]


def check_tile_kinds(fn):
    for mask, bm, bn in _masks():
        got = harness.call(fn, mask.clone(), bm, bn)
        harness.expect_close(got, _kinds_loop(mask, bm, bn), f"tile_kinds of a {tuple(mask.shape)} mask, tiles {bm}x{bn}",
                             mistakes={
                                 "the last key tile sticks out past the keys and is counted as full; it must be "
                                 "partial (the kernel has to mask the keys past the end)": _kinds_loop(mask, bm, bn, ragged_full=True),
                                 "a tile with any allowed element is called full; full needs every element":
                                     _kinds_loop(mask, bm, bn, full_if_any=True),
                             }, atol=0, rtol=0)


def check_tile_bound(fn):
    for mask, bm, bn in _masks():
        got = harness.call(fn, mask.clone(), bm, bn)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, (int, float)):
            raise AssertionError(f"tile_bound: expected a float, got {type(got).__name__}")
        kinds = _kinds_loop(mask, bm, bn)
        want = kinds.numel() / int((kinds > 0).sum())
        harness.expect_close(torch.tensor(float(got)), torch.tensor(want), f"tile_bound of a {tuple(mask.shape)} mask",
                             mistakes={
                                 "this is 1 / density (elements), not the tile-level bound (tiles / visited tiles)":
                                     torch.tensor(mask.numel() / int(mask.sum())),
                                 "only the full tiles are counted as visited; partial tiles are visited too":
                                     torch.tensor(kinds.numel() / max(int((kinds == 2).sum()), 1)),
                             }, atol=1e-9, rtol=1e-9)


CHECKERS = {"window_start": check_window_start, "tile_kinds": check_tile_kinds, "tile_bound": check_tile_bound}


def test_window_start(impl):
    check_window_start(impl.window_start)


def test_tile_kinds(impl):
    check_tile_kinds(impl.tile_kinds)


def test_tile_bound(impl):
    check_tile_bound(impl.tile_bound)


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


MISTAKES = {
    "cut-at-border": ("window_start", lambda n, k, s: _start_loop(n, k, s, cut=True), "cut at the borders"),
    "even-right": ("window_start", lambda n, k, s: _start_loop(n, k, s, even_right=True), "on the right"),
    "first-leader": ("window_start", lambda n, k, s: _start_loop(n, k, s, first_leader=True), "first query"),
    "ragged-full": ("tile_kinds", lambda m, bm, bn: _kinds_loop(m, bm, bn, ragged_full=True), "sticks out"),
    "any-is-full": ("tile_kinds", lambda m, bm, bn: _kinds_loop(m, bm, bn, full_if_any=True), "any allowed"),
    "density": ("tile_bound", lambda m, bm, bn: m.numel() / int(m.sum()), "1 / density"),
    "full-only": ("tile_bound", lambda m, bm, bn: (lambda k: k.numel() / max(int((k == 2).sum()), 1))(_kinds_loop(m, bm, bn)),
                  "only the full tiles"),
    "returns-string": ("tile_bound", lambda m, bm, bn: "2", "expected a float"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
