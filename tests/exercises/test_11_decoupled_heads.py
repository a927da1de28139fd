"""Checks for lesson 11's exercises: decoupled-head attention, linear CKA, the fusion loss.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (the key map used for the values, no
centring, a loss that is not divided by the heads' size, ...), the failure message names it.

Run against your work with ``make check LESSON=11``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "11_decoupled_heads"


# --- independent float64 references -----------------------------------------------------------------


def loop_attention(q, k, v, key_map, value_map, *, causal=True, scale=None):
    """Float64 loops over batch, query head and position."""
    b, h, length, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for r in range(length):
                keys = list(range(r + 1)) if causal else list(range(length))
                s = torch.stack([scale * q[n, i, r] @ k[n, key_map[i], j] for j in keys])
                p = torch.softmax(s, 0)
                out[n, i, r] = sum(pj * v[n, value_map[i], j] for pj, j in zip(p, keys))
    return out


def hsic_cka(x, y):
    """CKA through the kernel form: HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    hsic = lambda a, b: torch.trace(h @ a @ a.T @ h @ b @ b.T)  # noqa: E731
    return hsic(x, y) / (hsic(x, x) * hsic(y, y)).sqrt()


def spread_loop(fused, groups):
    total = torch.zeros((), dtype=torch.float64)
    for g in set(groups):
        members = [fused[i] for i in range(len(groups)) if groups[i] == g]
        mean = sum(members) / len(members)
        total = total + sum((m - mean).pow(2).sum() for m in members)
    return total


# --- the checkers -----------------------------------------------------------------------------------


def check_decoupled_attention(fn):
    cases = [
        (2, [0, 1, 2, 3], [0, 1, 2, 3], 0),
        (1, [3, 2, 1, 0], [1, 0, 3, 2], 3),
        (1, [0, 0, 1, 1], [1, 0, 0, 1], 1),
        (2, [1, 1, 0, 2], [0, 0, 0, 0], 2),
    ]
    for batch, key_map, value_map, seed in cases:
        g = torch.Generator().manual_seed(seed)
        hk, hv, length, d = max(key_map) + 1, max(value_map) + 1, 5, 4
        q = torch.randn(batch, 4, length, d, generator=g, dtype=torch.float64)
        k = torch.randn(batch, hk, length, d, generator=g, dtype=torch.float64)
        v = torch.randn(batch, hv, length, d, generator=g, dtype=torch.float64)
        got = harness.call(fn, q, k, v, list(key_map), list(value_map))
        want = loop_attention(q, k, v, key_map, value_map)
        mistakes = {
            "the causal mask is missing (every query sees the future)":
                loop_attention(q, k, v, key_map, value_map, causal=False),
            "the 1/sqrt(d) scale is missing": loop_attention(q, k, v, key_map, value_map, scale=1.0),
        }
        if hk == hv:
            mistakes["the key map is used for the values too (value head g_k(i) instead of g_v(i))"] = \
                loop_attention(q, k, v, key_map, key_map)
            mistakes["the value map is used for the keys too (key head g_v(i) instead of g_k(i))"] = \
                loop_attention(q, k, v, value_map, value_map)
        if hk == hv == 4:
            ident = list(range(4))
            if key_map != ident or value_map != ident:
                mistakes["the maps are ignored (query head i reads key and value head i)"] = \
                    loop_attention(q, k, v, ident, ident)
        harness.expect_close(got, want, f"decoupled_attention with key_map={key_map}, value_map={value_map}",
                             mistakes=mistakes, atol=1e-8, rtol=1e-6)


def check_linear_cka(fn):
    g = torch.Generator().manual_seed(0)
    for n, p, q in [(12, 3, 3), (20, 4, 2), (9, 5, 6)]:
        x = torch.randn(n, p, generator=g, dtype=torch.float64) + 2.0  # an offset, so centring matters
        y = torch.randn(n, q, generator=g, dtype=torch.float64) + x[:, :1] - 1.0
        got = harness.call(fn, x.clone(), y.clone())
        if not isinstance(got, torch.Tensor) or got.dim() != 0:
            raise AssertionError(f"linear_cka: expected a 0-d tensor, got "
                                 f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        want = hsic_cka(x, y)
        xr, yr = x, y
        xc, yc = x - x.mean(0), y - y.mean(0)
        mistakes = {
            "the columns are not centred (subtract x.mean(0) and y.mean(0) first)":
                (yr.T @ xr).pow(2).sum() / ((xr.T @ xr).norm() * (yr.T @ yr).norm()),
            "the numerator is not squared (||Y^T X||_F instead of ||Y^T X||_F^2)":
                (yc.T @ xc).norm() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()),
            "the denominator uses squared norms (||X^T X||_F^2 ||Y^T Y||_F^2) instead of norms":
                (yc.T @ xc).pow(2).sum() / ((xc.T @ xc).norm() ** 2 * (yc.T @ yc).norm() ** 2),
            "the rows are centred instead of the columns (subtract the mean over dim 0, the samples)":
                hsic_cka(x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)),
        }
        harness.expect_close(got.reshape(()), want, f"linear_cka on x {(n, p)}, y {(n, q)}", mistakes=mistakes,
                             atol=1e-8, rtol=1e-6)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    got = harness.call(fn, x, 2.0 * x @ rotation)
    harness.expect_close(got.reshape(()), torch.tensor(1.0, dtype=torch.float64),
                         "linear_cka(x, 2 x R) for a rotation R (it must be 1)")


def check_fusion_loss(fn):
    g = torch.Generator().manual_seed(1)
    for groups in ([0, 0, 1, 1], [0, 1, 0, 0, 2], [0, 0, 0]):
        fused = torch.randn(len(groups), 3, 4, generator=g, dtype=torch.float64)
        got = harness.call(fn, fused.clone(), list(groups))
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"fusion_loss: expected a tensor, got {type(got).__name__}")
        spread = spread_loop(fused, groups)
        size = fused.pow(2).sum()
        whole_mean = (fused - fused.mean(0)).pow(2).sum()
        mistakes = {
            "the loss is not divided by the heads' size sum_i ||W_i||^2 (it must be relative)": spread,
            "the heads are compared with the mean over all heads, not the mean of their own group":
                whole_mean / size,
            "the distances are not squared (||W_i - mean||_F instead of ||W_i - mean||_F^2)":
                sum((fused[i] - fused[[j for j in range(len(groups)) if groups[j] == groups[i]]].mean(0)).norm()
                    for i in range(len(groups))) / size,
        }
        harness.expect_close(got.reshape(()), spread / size, f"fusion_loss with groups={groups}",
                             mistakes=mistakes, atol=1e-8, rtol=1e-6)
    same = torch.randn(1, 2, 2, generator=g, dtype=torch.float64).repeat(3, 1, 1)
    harness.expect_close(harness.call(fn, same, [0, 0, 0]).reshape(()), torch.tensor(0.0, dtype=torch.float64),
                         "fusion_loss of three identical heads in one group (it must be 0)", atol=1e-10)


CHECKERS = {
    "decoupled_attention": check_decoupled_attention,
    "linear_cka": check_linear_cka,
    "fusion_loss": check_fusion_loss,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_decoupled_attention(impl):
    check_decoupled_attention(impl.decoupled_attention)


def test_linear_cka(impl):
    check_linear_cka(impl.linear_cka)


def test_fusion_loss(impl):
    check_fusion_loss(impl.fusion_loss)


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


def _attention(q, k, v, key_map, value_map, *, causal=True, scale=None):
    k, v = k[:, list(key_map)], v[:, list(value_map)]
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def attention_value_uses_key_map(q, k, v, key_map, value_map):
    return _attention(q, k, v, key_map, key_map)


def attention_not_causal(q, k, v, key_map, value_map):
    return _attention(q, k, v, key_map, value_map, causal=False)


def attention_unscaled(q, k, v, key_map, value_map):
    return _attention(q, k, v, key_map, value_map, scale=1.0)


def attention_maps_ignored(q, k, v, key_map, value_map):
    heads = range(q.shape[1])
    return _attention(q, k, v, [i % k.shape[1] for i in heads], [i % v.shape[1] for i in heads])


def cka_uncentred(x, y):
    return (y.T @ x).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def cka_squared_denominator(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return (y.T @ x).pow(2).sum() / ((x.T @ x).norm() ** 2 * (y.T @ y).norm() ** 2)


def cka_rows_centred(x, y):
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return cka_uncentred(x - x.mean(0), y - y.mean(0))


def fusion_not_relative(fused, groups):
    g = torch.tensor(groups)
    return sum((fused[g == k] - fused[g == k].mean(0)).pow(2).sum() for k in range(int(g.max()) + 1))


def fusion_global_mean(fused, groups):
    return (fused - fused.mean(0)).pow(2).sum() / fused.pow(2).sum()


MISTAKES = {
    "value-uses-key-map": ("decoupled_attention", attention_value_uses_key_map, "the key map is used for the values"),
    "not-causal": ("decoupled_attention", attention_not_causal, "causal mask is missing"),
    "unscaled": ("decoupled_attention", attention_unscaled, "1/sqrt(d) scale is missing"),
    "maps-ignored": ("decoupled_attention", attention_maps_ignored, "the maps are ignored"),
    "cka-uncentred": ("linear_cka", cka_uncentred, "not centred"),
    "cka-squared-denominator": ("linear_cka", cka_squared_denominator, "squared norms"),
    "cka-rows-centred": ("linear_cka", cka_rows_centred, "rows are centred instead of the columns"),
    "fusion-not-relative": ("fusion_loss", fusion_not_relative, "it must be relative"),
    "fusion-global-mean": ("fusion_loss", fusion_global_mean, "mean over all heads"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
