"""Checks for lesson 13's exercises: lambda_init, the differential map, the repeated noise heads of GDA.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (Motif's off-by-one layer index, scores
subtracted before the softmax, noise heads tiled instead of repeated, ...), the failure message names it.

Run against your work with ``make check LESSON=13``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "13_differential_attention"


# --- the checkers -----------------------------------------------------------------------------------


def check_lambda_init(fn):
    for layer in [0, 1, 3, 11]:
        got = harness.call(fn, layer)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, (int, float)):
            raise AssertionError(f"lambda_init({layer}): expected a float, got {type(got).__name__}")
        mistakes = {
            "the layer index is off by one (Motif's port uses layer - 1 on a 0-based index; "
            "the paper's formula with a 1-based l equals exp(-0.3 * layer_index) with a 0-based one)":
                0.8 - 0.6 * math.exp(-0.3 * (layer - 1)),
            "the exponent's sign is flipped: exp(+0.3 * layer) grows instead of decaying":
                0.8 - 0.6 * math.exp(0.3 * layer),
            "the minus is a plus: 0.8 + 0.6 exp(...)": 0.8 + 0.6 * math.exp(-0.3 * layer),
        }
        harness.expect_close(torch.tensor(float(got)), torch.tensor(0.8 - 0.6 * math.exp(-0.3 * layer)),
                             f"lambda_init({layer})", mistakes={k: torch.tensor(v) for k, v in mistakes.items()},
                             atol=1e-9, rtol=1e-9)


def check_differential_weights(fn):
    for length, lam, causal, seed in [(5, 0.3, True, 0), (4, 0.8, False, 1), (6, -0.2, True, 2)]:
        g = torch.Generator().manual_seed(seed)
        s1, s2 = (2 * torch.randn(2, length, length, generator=g, dtype=torch.float64) for _ in range(2))
        got = harness.call(fn, s1.clone(), s2.clone(), lam, causal)
        # independent: a loop over rows, softmax over the visible keys written out
        want = torch.zeros(2, length, length, dtype=torch.float64)
        for b in range(2):
            for t in range(length):
                visible = t + 1 if causal else length
                e1, e2 = s1[b, t, :visible].exp(), s2[b, t, :visible].exp()
                want[b, t, :visible] = e1 / e1.sum() - lam * e2 / e2.sum()
        future = torch.ones(length, length, dtype=torch.bool).triu(1) if causal else torch.zeros(length, length, dtype=torch.bool)
        mistakes = {
            "the scores are subtracted before the softmax, softmax(S1 - lambda S2); subtract the two softmax maps":
                torch.softmax((s1 - lam * s2).masked_fill(future, float("-inf")), -1),
            "lambda multiplies the first (signal) map instead of the second": (
                lam * torch.softmax(s1.masked_fill(future, float("-inf")), -1)
                - torch.softmax(s2.masked_fill(future, float("-inf")), -1)),
            "the causal mask is missing": torch.softmax(s1, -1) - lam * torch.softmax(s2, -1),
            "the difference is renormalised to sum to one; its rows must sum to 1 - lambda": (
                torch.softmax(s1.masked_fill(future, float("-inf")), -1)
                - lam * torch.softmax(s2.masked_fill(future, float("-inf")), -1)) / (1 - lam),
        }
        harness.expect_close(got, want, f"differential_weights on {length}x{length} scores, lambda={lam}, causal={causal}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


def check_repeat_noise_heads(fn):
    for b, h2, ratio, length, d in [(1, 2, 3, 4, 2), (2, 3, 2, 3, 5), (1, 1, 4, 2, 3)]:
        noise = torch.randn(b, h2, length, d, generator=torch.Generator().manual_seed(h2 + ratio), dtype=torch.float64)
        got = harness.call(fn, noise.clone(), ratio)
        want = torch.stack([noise[:, i // ratio] for i in range(h2 * ratio)], dim=1)
        harness.expect_close(got, want, f"repeat_noise_heads on {tuple(noise.shape)} with ratio {ratio}", mistakes={
            "the noise heads are tiled (n0 n1 n0 n1 ...) instead of repeated in a row (n0 n0 n1 n1 ...): "
            "signal head i needs noise head i // ratio": noise.repeat(1, ratio, 1, 1),
        }, atol=0, rtol=0)


CHECKERS = {
    "lambda_init": check_lambda_init,
    "differential_weights": check_differential_weights,
    "repeat_noise_heads": check_repeat_noise_heads,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_lambda_init(impl):
    check_lambda_init(impl.lambda_init)


def test_differential_weights(impl):
    check_differential_weights(impl.differential_weights)


def test_repeat_noise_heads(impl):
    check_repeat_noise_heads(impl.repeat_noise_heads)


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


def _masked(s, causal):
    if not causal:
        return s
    length = s.shape[-1]
    return s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))


MISTAKES = {
    "motif-off-by-one": ("lambda_init", lambda layer: 0.8 - 0.6 * math.exp(-0.3 * (layer - 1)), "off by one"),
    "exponent-sign": ("lambda_init", lambda layer: 0.8 - 0.6 * math.exp(0.3 * layer), "sign is flipped"),
    "returns-string": ("lambda_init", lambda layer: "0.2", "expected a float"),
    "subtract-scores": ("differential_weights",
                        lambda s1, s2, lam, causal: torch.softmax(_masked(s1 - lam * s2, causal), -1),
                        "subtracted before the softmax"),
    "lambda-on-signal": ("differential_weights",
                         lambda s1, s2, lam, causal: lam * torch.softmax(_masked(s1, causal), -1)
                         - torch.softmax(_masked(s2, causal), -1), "multiplies the first"),
    "no-causal-mask": ("differential_weights",
                       lambda s1, s2, lam, causal: torch.softmax(s1, -1) - lam * torch.softmax(s2, -1),
                       "causal mask is missing"),
    "renormalised": ("differential_weights",
                     lambda s1, s2, lam, causal: (torch.softmax(_masked(s1, causal), -1)
                                                  - lam * torch.softmax(_masked(s2, causal), -1)) / (1 - lam),
                     "renormalised"),
    "tiled": ("repeat_noise_heads", lambda noise, ratio: noise.repeat(1, ratio, 1, 1), "tiled"),
    "not-repeated": ("repeat_noise_heads", lambda noise, ratio: noise, "wrong shape"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
