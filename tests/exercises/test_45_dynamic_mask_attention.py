"""Checks for lesson 45's exercises: the bias from the values, the causal top-w selection, the masked biased attention.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (loops over tokens and keys, float64). When the answer matches a *known mistake* (values
flattened across tokens, the softplus missing, the causal mask applied after the top-w, future keys kept to
fill the budget, the bias left out of the logits, ...), the failure message names it. The biases are
continuous random numbers: no two keys tie.

Run against your work with ``make check LESSON=45``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "45_dynamic_mask_attention"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- independent references (loops) -----------------------------------------------------------------


def loop_bias(v, weight, a, *, softplus=True, form="log", flatten="heads-then-features"):
    """b[b, h, 0, j] from the definition, one key at a time; options produce known mistakes."""
    bsz, hkv, length, d = v.shape
    if flatten == "heads-then-features":
        flat = [[torch.cat([v[b, hh, j] for hh in range(hkv)]) for j in range(length)] for b in range(bsz)]
    else:  # v.reshape(B, L, H * D) without moving the heads: consecutive memory of (H, L, D)
        raw = v.reshape(bsz, -1)
        flat = [[raw[b, j * hkv * d:(j + 1) * hkv * d] for j in range(length)] for b in range(bsz)]
    out = torch.zeros(bsz, hkv, 1, length, dtype=torch.float64)
    for b in range(bsz):
        for j in range(length):
            for h in range(hkv):
                delta = float(weight[h].double() @ flat[b][j].double())
                x = math.log1p(math.exp(delta)) if softplus else delta
                value = float(a[h]) * x
                out[b, h, 0, j] = value if form == "log" else math.exp(value)
    return out


def loop_selection(bias, window, *, causal_first=True, largest=True, causal=True):
    """The top-w causal selection query by query; options produce known mistakes."""
    bsz, h, _, length = bias.shape
    out = torch.zeros(bsz, h, length, length, dtype=torch.bool)
    for b in range(bsz):
        for hh in range(h):
            for i in range(length):
                keys = [j for j in range(length) if (j <= i or not causal or not causal_first)]
                ranked = sorted(keys, key=lambda j: (-1 if largest else 1) * bias[b, hh, 0, j].item())
                for j in ranked[:window]:
                    if causal and not causal_first and j > i:
                        continue  # the causal mask applied after the choice
                    out[b, hh, i, j] = True
    return out


def loop_attention(q, k, v, bias, mask, *, add_bias=True, scale=True, renormalise=True, bias_after=False):
    """Masked biased attention query by query (float64); options produce known mistakes."""
    bsz, h, length, d = q.shape
    out = torch.zeros(bsz, h, length, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for hh in range(h):
            for i in range(length):
                s = torch.stack([q[b, hh, i].double() @ k[b, hh, j].double() / (math.sqrt(d) if scale else 1.0)
                                 + (bias[b, hh, 0, j].double() if add_bias and not bias_after else 0.0)
                                 for j in range(length)])
                keys = mask[b, hh, i]
                if renormalise:
                    if not keys.any():
                        continue
                    p = torch.zeros(length, dtype=torch.float64)
                    p[keys] = torch.softmax(s[keys], 0)
                else:  # softmax over every key, then the unselected ones zeroed
                    p = torch.softmax(s, 0) * keys
                if bias_after:
                    p = p + bias[b, hh, 0].double() * keys
                out[b, hh, i] = p @ v[b, hh].double()
    return out


# --- the checkers -----------------------------------------------------------------------------------


def check_value_bias(fn):
    for bsz, hkv, length, d, seed in [(2, 2, 5, 3, 0), (1, 3, 4, 2, 1), (2, 1, 6, 4, 2)]:
        g = gen(seed)
        v = torch.randn(bsz, hkv, length, d, generator=g, dtype=torch.float64)
        weight = torch.randn(hkv, hkv * d, generator=g, dtype=torch.float64)
        a = torch.randn(hkv, generator=g, dtype=torch.float64)
        got = harness.call(fn, v.clone(), weight.clone(), a.clone())
        what = f"value_bias on v of shape {(bsz, hkv, length, d)}"
        harness.expect_close(got, loop_bias(v, weight, a), what, atol=1e-8, rtol=1e-6, mistakes={
            "flat(V) mixes tokens: v.reshape(B, L, H_kv * D) without first moving the heads next to the features "
            "(v.transpose(1, 2))": loop_bias(v, weight, a, flatten="raw"),
            "the softplus is missing: b = A softplus(delta), which keeps the score's sign under A's control":
                loop_bias(v, weight, a, softplus=False),
            "this is the paper's exp(A softplus(delta)); the exercise (and the official code) uses its log, "
            "A softplus(delta), as the additive bias": loop_bias(v, weight, a, form="exp"),
        })


def check_top_w_causal_mask(fn):
    for bsz, h, length, window, seed in [(1, 2, 9, 3, 3), (2, 1, 12, 5, 4), (1, 1, 6, 1, 5), (1, 2, 7, 7, 6),
                                         (1, 1, 5, 8, 7)]:
        bias = torch.randn(bsz, h, 1, length, generator=gen(seed), dtype=torch.float64)
        got = harness.call(fn, bias.clone(), window)
        what = f"top_w_causal_mask on {length} keys with window={window}"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        harness.expect_shape(got, (bsz, h, length, length), what)
        want = loop_selection(bias, window)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        if (got & ~causal).any() and torch.equal(got & causal, want):
            # which future keys fill the budget depends on how topk orders tied -inf entries: check the structure
            raise AssertionError(f"{what}: wrong values; future keys picked to fill the budget are kept: a query "
                                 "with fewer than w visible keys must keep only those (drop the picks whose value "
                                 "is -inf)")
        harness.expect_close(got, want, what, mistakes={
            "the causal mask is applied after the top-w: choose among the visible keys j <= i only, else a query "
            "wastes its budget on future keys and keeps fewer than w": loop_selection(bias, window, causal_first=False),
            "the w SMALLEST biases are kept; DMA keeps the largest": loop_selection(bias, window, largest=False),
            "there is no causal mask: queries keep future keys": loop_selection(bias, window, causal=False),
        })


def check_masked_biased_attention(fn):
    for bsz, h, length, d, seed in [(1, 2, 6, 4, 8), (2, 1, 7, 3, 9)]:
        g = gen(seed)
        q, k, v = (torch.randn(bsz, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
        bias = 2 * torch.randn(bsz, h, 1, length, generator=g, dtype=torch.float64)
        mask = (torch.rand(bsz, h, length, length, generator=g) < 0.5) & torch.ones(length, length).tril().bool()
        mask[..., 0, 0] = True
        mask[..., 2, :] = False  # a query that keeps no key: zeros, not NaN
        got = harness.call(fn, q, k, v, bias, mask)
        what = f"masked_biased_attention on q of shape {(bsz, h, length, d)}"
        harness.expect_close(got, loop_attention(q, k, v, bias, mask), what, atol=1e-8, rtol=1e-6, mistakes={
            "the bias is not added to the logits (it must be: that is how A and W_delta learn)":
                loop_attention(q, k, v, bias, mask, add_bias=False),
            "the softmax runs over every key and the unselected weights are zeroed afterwards: mask the scores "
            "with -inf BEFORE the softmax, so that the kept weights sum to 1": loop_attention(q, k, v, bias, mask,
                                                                                           renormalise=False),
            "the 1/sqrt(D) scale is missing": loop_attention(q, k, v, bias, mask, scale=False),
            "the bias is added to the weights after the softmax instead of to the scores before it":
                loop_attention(q, k, v, bias, mask, bias_after=True),
        })


CHECKERS = {
    "value_bias": check_value_bias,
    "top_w_causal_mask": check_top_w_causal_mask,
    "masked_biased_attention": check_masked_biased_attention,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_value_bias(impl):
    check_value_bias(impl.value_bias)


def test_top_w_causal_mask(impl):
    check_top_w_causal_mask(impl.top_w_causal_mask)


def test_masked_biased_attention(impl):
    check_masked_biased_attention(impl.masked_biased_attention)


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


def bias_raw_reshape(v, weight, a):
    b, hkv, length, d = v.shape
    delta = v.reshape(b, length, hkv * d) @ weight.T
    return (a * torch.nn.functional.softplus(delta)).transpose(1, 2)[:, :, None, :]


def bias_no_softplus(v, weight, a):
    b, hkv, length, d = v.shape
    delta = v.transpose(1, 2).reshape(b, length, hkv * d) @ weight.T
    return (a * delta).transpose(1, 2)[:, :, None, :]


def bias_paper_exp(v, weight, a):
    b, hkv, length, d = v.shape
    delta = v.transpose(1, 2).reshape(b, length, hkv * d) @ weight.T
    return torch.exp(a * torch.nn.functional.softplus(delta)).transpose(1, 2)[:, :, None, :]


def _topk_mask(scores, window, keep=None):
    values, indices = scores.topk(min(window, scores.shape[-1]), dim=-1)
    kept = torch.ones_like(values, dtype=torch.bool) if keep is None else keep(values)
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, indices, kept)


def mask_causal_after(bias, window):
    b, h, _, length = bias.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return _topk_mask(bias.expand(b, h, length, length), window) & causal


def mask_keeps_filler(bias, window):
    b, h, _, length = bias.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return _topk_mask(bias.expand(b, h, length, length).masked_fill(~causal, -math.inf), window)


def mask_smallest(bias, window):
    b, h, _, length = bias.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return _topk_mask((-bias).expand(b, h, length, length).masked_fill(~causal, -math.inf), window,
                      keep=lambda values: values > -math.inf)


def mask_not_causal(bias, window):
    b, h, _, length = bias.shape
    return _topk_mask(bias.expand(b, h, length, length), window)


def _attention(q, k, v, bias, mask, *, add_bias=True, scale=True, renormalise=True, bias_after=False):
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if add_bias and not bias_after:
        scores = scores + bias
    if renormalise:
        weights = torch.nan_to_num(torch.softmax(scores.masked_fill(~mask, -math.inf), -1))
    else:
        weights = torch.softmax(scores, -1) * mask
    if bias_after:
        weights = weights + bias * mask
    return weights @ v


def attention_no_bias(q, k, v, bias, mask):
    return _attention(q, k, v, bias, mask, add_bias=False)


def attention_zeroed_after(q, k, v, bias, mask):
    return _attention(q, k, v, bias, mask, renormalise=False)


def attention_no_scale(q, k, v, bias, mask):
    return _attention(q, k, v, bias, mask, scale=False)


def attention_bias_after(q, k, v, bias, mask):
    return _attention(q, k, v, bias, mask, bias_after=True)


def attention_nan_rows(q, k, v, bias, mask):
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias).masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1) @ v


MISTAKES = {
    "bias-raw-reshape": ("value_bias", bias_raw_reshape, "mixes tokens"),
    "bias-no-softplus": ("value_bias", bias_no_softplus, "softplus is missing"),
    "bias-paper-exp": ("value_bias", bias_paper_exp, "paper's exp"),
    "mask-causal-after": ("top_w_causal_mask", mask_causal_after, "causal mask is applied after the top-w"),
    "mask-keeps-filler": ("top_w_causal_mask", mask_keeps_filler, "fill the budget are kept"),
    "mask-smallest": ("top_w_causal_mask", mask_smallest, "SMALLEST"),
    "mask-not-causal": ("top_w_causal_mask", mask_not_causal, "no causal mask"),
    "attention-no-bias": ("masked_biased_attention", attention_no_bias, "bias is not added"),
    "attention-zeroed-after": ("masked_biased_attention", attention_zeroed_after, "BEFORE the softmax"),
    "attention-no-scale": ("masked_biased_attention", attention_no_scale, "scale is missing"),
    "attention-bias-after": ("masked_biased_attention", attention_bias_after, "after the softmax"),
    "attention-nan-rows": ("masked_biased_attention", attention_nan_rows, "NaN"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
