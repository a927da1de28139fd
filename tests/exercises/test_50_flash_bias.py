"""Checks for lesson 50's exercises: ALiBi's and the squared distance's factors, SVD truncation, concatenation.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent float64
computation. Factors are not unique (``U A`` and ``W A^{-T}`` give the same bias), so the checks compare the
bias ``U W^T`` the factors make. When the answer matches a *known mistake* (the official example's flipped
ALiBi sign, a missing factor 2, the smallest singular values kept, the softmax scale put on the bias), the
failure message names it.

Run against your work with ``make check LESSON=50``; CI runs it against ``solutions/``. The tests marked
``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "50_flash_bias"


def _pair(got, what):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError(f"{what}: expected a pair (U, W), got {type(got).__name__}")
    for name, x in zip("UW", got):
        if not isinstance(x, torch.Tensor):
            raise AssertionError(f"{what}: {name} should be a torch.Tensor, got {type(x).__name__}")
    return got


# --- the checkers -----------------------------------------------------------------------------------


def check_alibi_factors(fn):
    for heads, length in [(2, 5), (4, 7), (1, 3)]:
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)
        u, w = _pair(harness.call(fn, slopes.clone(), length), f"alibi_factors({heads} heads, length {length})")
        harness.expect_shape(u, (heads, length, 2), f"U of alibi_factors({heads} heads, length {length})")
        harness.expect_shape(w, (length, 2), f"W of alibi_factors({heads} heads, length {length})")
        pos = torch.arange(length, dtype=torch.float64)
        distance = pos[:, None] - pos[None, :]
        want = -slopes[:, None, None] * distance
        harness.expect_close(u.double() @ w.double().T, want, f"U W^T for {heads} heads, length {length}", mistakes={
            "the sign is flipped: +m (i - j) (as in the official FlashBias example) rewards distant keys; "
            "ALiBi is -m (i - j)": -want,
            "the slope m_h is missing: every head gets -(i - j)": -distance.expand(heads, length, length),
            "i and j are swapped: -m (j - i)": want.transpose(-2, -1),
        }, atol=1e-9, rtol=1e-9)


def check_squared_distance_factors(fn):
    for n, m, p, seed in [(6, 5, 2, 0), (4, 7, 3, 1), (5, 5, 1, 2)]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = torch.randn(m, p, generator=g, dtype=torch.float64)
        what = f"squared_distance_factors on {n} and {m} points in R^{p}"
        u, w = _pair(harness.call(fn, x.clone(), y.clone()), what)
        harness.expect_shape(u, (n, p + 2), f"U of {what}")
        harness.expect_shape(w, (m, p + 2), f"W of {what}")
        want = -torch.stack([torch.stack([((x[i] - y[j]) ** 2).sum() for j in range(m)]) for i in range(n)])
        sq_x, sq_y = (x * x).sum(-1), (y * y).sum(-1)
        harness.expect_close(u.double() @ w.double().T, want, f"U W^T of {what}", mistakes={
            "the sign is flipped: this is +|x - y|^2, a bonus for distance": -want,
            "the factor 2 on the cross term x.y is missing": -sq_x[:, None] - sq_y[None, :] + x @ y.T,
            "the norms are not squared: use |x|^2 = sum(x * x)":
                -sq_x.sqrt()[:, None] - sq_y.sqrt()[None, :] + 2 * x @ y.T,
        }, atol=1e-9, rtol=1e-9)


def check_truncated_bias(fn):
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(8, 6, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([5.0, 3, 2, 1, 0.5, 0.1], dtype=torch.float64)) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    left, values, right_t = torch.linalg.svd(bias, full_matrices=False)
    for rank in (1, 3, 6):
        got = harness.call(fn, bias.clone(), rank)
        want = left[:, :rank] @ torch.diag(values[:rank]) @ right_t[:rank]
        harness.expect_close(got, want, f"truncated_bias(rank={rank}) of an 8x6 bias", mistakes={
            "the smallest singular values are kept instead of the largest (torch.linalg.svd sorts them largest "
            "first)": left[:, 6 - rank:] @ torch.diag(values[6 - rank:]) @ right_t[6 - rank:],
            "the singular values are missing: U_r V_r^T instead of U_r S_r V_r^T": left[:, :rank] @ right_t[:rank],
        }, atol=1e-9, rtol=1e-9)


def check_concat_inputs(fn):
    for n, m, d, r, seed in [(4, 5, 8, 2, 0), (3, 3, 4, 3, 1)]:
        g = torch.Generator().manual_seed(seed)
        q, u = torch.randn(2, n, d, generator=g, dtype=torch.float64), torch.randn(2, n, r, generator=g, dtype=torch.float64)
        k, w = torch.randn(2, m, d, generator=g, dtype=torch.float64), torch.randn(2, m, r, generator=g, dtype=torch.float64)
        scale = d**-0.5
        what = f"concat_inputs with D={d}, r={r}"
        q_cat, k_cat = _pair(harness.call(fn, q.clone(), k.clone(), u.clone(), w.clone(), scale), what)
        harness.expect_shape(q_cat, (2, n, d + r), f"q' of {what}")
        harness.expect_shape(k_cat, (2, m, d + r), f"k' of {what}")
        qk, uw = q @ k.transpose(-2, -1), u @ w.transpose(-2, -1)
        harness.expect_close(q_cat @ k_cat.transpose(-2, -1), scale * qk + uw, f"q' k'^T of {what}", mistakes={
            "the bias is scaled too: s (QK^T + UW^T); put the scale on q only, not on u": scale * (qk + uw),
            "the scale is missing: QK^T + UW^T": qk + uw,
            "the scale is applied twice (on q and on k): s^2 QK^T + UW^T": scale**2 * qk + uw,
        }, atol=1e-9, rtol=1e-9)


CHECKERS = {
    "alibi_factors": check_alibi_factors,
    "squared_distance_factors": check_squared_distance_factors,
    "truncated_bias": check_truncated_bias,
    "concat_inputs": check_concat_inputs,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_alibi_factors(impl):
    check_alibi_factors(impl.alibi_factors)


def test_squared_distance_factors(impl):
    check_squared_distance_factors(impl.squared_distance_factors)


def test_truncated_bias(impl):
    check_truncated_bias(impl.truncated_bias)


def test_concat_inputs(impl):
    check_concat_inputs(impl.concat_inputs)


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


def _alibi(sign, with_slope=True):
    def fn(slopes, length):
        pos = torch.arange(length, dtype=slopes.dtype)
        m = slopes if with_slope else torch.ones_like(slopes)
        u = m[:, None, None] * torch.stack([sign * pos, -sign * torch.ones_like(pos)], dim=-1)
        return u, torch.stack([torch.ones_like(pos), pos], dim=-1)
    return fn


def _distance(cross=2.0, sign=1.0):
    def fn(x, y):
        sq_x, sq_y = (x * x).sum(-1, keepdim=True), (y * y).sum(-1, keepdim=True)
        u = sign * torch.cat([-sq_x, torch.ones_like(sq_x), cross * x], dim=-1)
        return u, torch.cat([torch.ones_like(sq_y), -sq_y, y], dim=-1)
    return fn


def _smallest(bias, rank):
    left, values, right_t = torch.linalg.svd(bias, full_matrices=False)
    n = values.shape[0]
    return left[:, n - rank:] @ torch.diag(values[n - rank:]) @ right_t[n - rank:]


MISTAKES = {
    "official-sign": ("alibi_factors", _alibi(+1.0), "sign is flipped"),
    "no-slope": ("alibi_factors", _alibi(-1.0, with_slope=False), "slope m_h is missing"),
    "returns-bias": ("alibi_factors", lambda slopes, length: torch.zeros(len(slopes), length, length), "expected a pair"),
    "no-factor-two": ("squared_distance_factors", _distance(cross=1.0), "factor 2"),
    "distance-sign": ("squared_distance_factors", _distance(sign=-1.0), "sign is flipped"),
    "smallest-values": ("truncated_bias", _smallest, "smallest singular values"),
    "no-sigma": ("truncated_bias", lambda b, r: torch.linalg.svd(b, full_matrices=False)[0][:, :r]
                 @ torch.linalg.svd(b, full_matrices=False)[2][:r], "singular values are missing"),
    "bias-scaled": ("concat_inputs", lambda q, k, u, w, s: (torch.cat([s * q, s * u], -1), torch.cat([k, w], -1)),
                    "bias is scaled too"),
    "no-scale": ("concat_inputs", lambda q, k, u, w, s: (torch.cat([q, u], -1), torch.cat([k, w], -1)),
                 "scale is missing"),
    "wrong-width": ("concat_inputs", lambda q, k, u, w, s: (s * q, k), "wrong shape"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
