"""Lesson 45: dynamic mask attention (attnlib.sparse.dynamic_mask) against loops, its invariants, gradients, the kernel path.

Random biases are continuous (float64), so no two keys tie and no test depends on the order ``torch.topk``
gives tied keys. At initialisation (A = 0) every key ties: those tests check only what holds whatever the order.
"""

import math

import pytest
import torch

from attnlib import attention, build_mechanism
from attnlib.sparse.block_sparse import tile_counts
from attnlib.sparse.dynamic_mask import (
    DynamicMaskAttention,
    benchmark_mask,
    block_smooth,
    dynamic_bias,
    dynamic_mask,
    dynamic_mask_attention,
    key_lifetimes,
    lifetime_mask,
    lifetime_tile_counts,
    window_mask,
)
from attnlib.sparse.neighborhood import neighborhood_mask_1d

from ..helpers import make_qkv, max_err


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_bias(b, h, length, seed=0):
    return torch.randn(b, h, 1, length, generator=gen(seed), dtype=torch.float64)


# --- independent computations (loops, float64) ------------------------------------------------------


def loop_bias(v, weight, a, delta_bias=None, form="log"):
    b, hkv, length, d = v.shape
    out = torch.zeros(b, hkv, 1, length, dtype=torch.float64)
    for bb in range(b):
        for j in range(length):
            for h in range(hkv):
                # delta_jh = sum over every key/value head h' and feature e of W[h, h' D + e] v[h', j, e]
                delta = sum(weight[h, hh * d + e].double() * v[bb, hh, j, e].double()
                            for hh in range(hkv) for e in range(d))
                if delta_bias is not None:
                    delta = delta + delta_bias[h].double()
                value = a[h].double() * math.log1p(math.exp(delta))
                out[bb, h, 0, j] = value if form == "log" else math.exp(value)
    return out


def loop_selection(bias, window, q_len, causal=True):
    b, h, _, k_len = bias.shape
    out = torch.zeros(b, h, q_len, k_len, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            for r in range(q_len):
                visible = [j for j in range(k_len) if not causal or j <= r + k_len - q_len]
                ranked = sorted(visible, key=lambda j: -bias[bb, hh, 0, j].item())
                for j in ranked[:window]:
                    out[bb, hh, r, j] = True
    return out


def loop_attention(q, k, v, bias, mask):
    """softmax over the selected keys of s q.k + b_j, per query (GQA: query head h reads head h // groups)."""
    b, hq, lq, d = q.shape
    groups = hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            g = h // groups
            for r in range(lq):
                keys = mask[bb, g, r].nonzero().flatten().tolist()
                if not keys:
                    continue
                s = torch.stack([q[bb, h, r].double() @ k[bb, g, j].double() / math.sqrt(d) + bias[bb, g, 0, j].double()
                                 for j in keys])
                p = torch.softmax(s, 0)
                out[bb, h, r] = sum(pj * v[bb, g, j].double() for pj, j in zip(p, keys))
    return out


def loop_smooth(mask, block):
    out = torch.zeros_like(mask)
    length = mask.shape[-1]
    for start in range(0, length, block):
        stop = min(start + block, length)
        keep = 2 * mask[..., start:stop].sum(-1) > (stop - start)
        out[..., start:stop] = keep[..., None]
    return out


# --- 1. the bias ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["log", "exp"])
def test_bias_against_a_loop(form):
    g = gen(1)
    v = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    weight, a, c = torch.randn(3, 12, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    got = dynamic_bias(v, weight.double(), a.double(), delta_bias=c.double(), form=form)
    assert got.shape == (2, 3, 1, 5)
    assert torch.allclose(got, loop_bias(v, weight, a, c, form), atol=1e-12)


def test_a_zero_makes_every_key_tie():
    v = torch.randn(1, 2, 9, 4, generator=gen(2))
    weight = torch.randn(2, 8, generator=gen(3))
    assert torch.equal(dynamic_bias(v, weight, torch.zeros(2)), torch.zeros(1, 2, 1, 9))
    assert torch.equal(dynamic_bias(v, weight, torch.zeros(2), form="exp"), torch.ones(1, 2, 1, 9))
    # whatever order topk gives the tied keys: row i keeps min(i + 1, w) keys, none in the future
    mask = dynamic_mask(torch.zeros(1, 2, 1, 9), 4)
    assert (mask.sum(-1) == torch.clamp(torch.arange(9) + 1, max=4)).all()
    assert not (mask & ~torch.ones(9, 9, dtype=torch.bool).tril()).any()


# --- 2. the selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("window, q_len, k_len, causal", [(3, 10, 10, True), (1, 7, 7, True), (4, 5, 11, True),
                                                           (5, 9, 12, False), (9, 9, 9, True), (20, 6, 6, True)],
                         ids=["w3", "w1", "fewer-queries", "non-causal", "w-equals-L", "w-above-L"])
def test_selection_against_a_loop(window, q_len, k_len, causal):
    bias = random_bias(2, 3, k_len, seed=window)
    got = dynamic_mask(bias, window, q_len=q_len, causal=causal)
    assert got.dtype == torch.bool and got.shape == (2, 3, q_len, k_len)
    assert torch.equal(got, loop_selection(bias, window, q_len, causal))


def test_keys_per_query_and_causality():
    length, window = 30, 7
    mask = dynamic_mask(random_bias(1, 2, length, seed=5), window)
    assert (mask.sum(-1) == torch.clamp(torch.arange(length) + 1, max=window)).all()
    assert not (mask & ~torch.ones(length, length, dtype=torch.bool).tril()).any()
    # non-causal: every query keeps exactly w keys
    assert (dynamic_mask(random_bias(1, 2, length, seed=6), window, causal=False).sum(-1) == window).all()


def test_top_w_only_when_the_keys_outnumber_the_budget():
    # Lk <= w: every visible key, and no smoothing either (as the official code, which skips create_mask)
    bias = random_bias(1, 1, 12, seed=7)
    assert torch.equal(dynamic_mask(bias, 12, block_size=4)[0, 0], torch.ones(12, 12, dtype=torch.bool).tril())


def test_block_smooth_against_a_loop_and_the_more_than_half_rule():
    mask = torch.rand(3, 4, 23, generator=gen(8)) < 0.5
    for block in (1, 2, 4, 5):
        assert torch.equal(block_smooth(mask, block), loop_smooth(mask, block))
    row = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    # 2 of 4: not more than half, dropped; 3 of 4 kept; the ragged tail 2 of 2 kept
    assert block_smooth(row, 4).tolist() == [False] * 4 + [True] * 4 + [True] * 2


def test_smoothed_selection_stays_causal_and_is_block_constant():
    length, window, block = 40, 12, 4
    mask = dynamic_mask(random_bias(1, 2, length, seed=9), window, block_size=block)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert not (mask & ~causal).any()
    unsmoothed = dynamic_mask(random_bias(1, 2, length, seed=9), window)
    assert torch.equal(mask, loop_smooth(unsmoothed, block) & causal)


def test_lifetimes_give_the_same_selection_and_tiles():
    for seed, (length, window) in enumerate([(40, 1), (40, 6), (37, 36), (50, 60)]):
        bias = random_bias(2, 1, length, seed=seed)
        ends = key_lifetimes(bias, window)
        assert torch.equal(lifetime_mask(ends[:, :, 0]), dynamic_mask(bias, window))
        for bm, bn in ((16, 16), (16, 32)):
            assert lifetime_tile_counts(ends[0, 0, 0], bm, bn) == tile_counts(lifetime_mask(ends[0, 0, 0]), bm, bn)
    # a key, once dropped, never comes back: each column of the causal selection is one interval
    mask = dynamic_mask(random_bias(1, 1, 60, seed=11), 5)[0, 0].int()
    assert ((mask[1:] - mask[:-1]) > 0).sum(0).le(1).all()


def test_window_baseline_is_lesson_40s_causal_window():
    for length, window in ((12, 4), (9, 1), (20, 20)):
        assert torch.equal(window_mask(length, length, window), neighborhood_mask_1d(length, window, causal=True))


# --- 3. attention -----------------------------------------------------------------------------------


def test_attention_against_a_loop_with_gqa():
    q, k, v = make_qkv(2, 4, 2, 11, d=8, dtype=torch.float64, seed=12)
    bias = random_bias(2, 2, 11, seed=13)
    out, mask = dynamic_mask_attention(q, k, v, bias, 4, return_mask=True)
    assert mask.shape == (2, 2, 11, 11)
    assert torch.allclose(out, loop_attention(q, k, v, bias, mask), atol=1e-12)


def test_a_window_covering_the_sequence_is_dense_causal_attention_plus_the_bias():
    q, k, v = make_qkv(1, 2, 2, 13, d=8, seed=14)
    bias = torch.randn(1, 2, 1, 13, generator=gen(15))
    for window in (13, 100):
        out = dynamic_mask_attention(q, k, v, bias, window)
        assert torch.equal(out, attention(q, k, v, bias=bias, causal=True))


def test_paper_and_code_forms_select_the_same_keys_and_differ_in_the_logits():
    g = gen(16)
    q, k, v = make_qkv(1, 2, 2, 14, d=8, dtype=torch.float64, seed=17)
    weight, a = torch.randn(2, 16, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    log_b, exp_b = dynamic_bias(v, weight, a), dynamic_bias(v, weight, a, form="exp")
    assert torch.allclose(exp_b, log_b.exp())
    assert torch.equal(dynamic_mask(log_b, 5), dynamic_mask(exp_b, 5))  # exp is increasing
    out_log, w_log, mask = dynamic_mask_attention(q, k, v, log_b, 5, return_weights=True, return_mask=True)
    out_exp, w_exp = dynamic_mask_attention(q, k, v, exp_b, 5, return_weights=True)
    # the code's log bias multiplies the unnormalised weights by the paper's exp(A softplus(delta))
    plain = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(8)) * mask
    product = plain * exp_b
    assert torch.allclose(w_log, product / product.sum(-1, keepdim=True))
    # the paper's form adds exp(A softplus(delta)) itself to the logits (in log space: exp of it overflows)
    logits = (q @ k.transpose(-2, -1) / math.sqrt(8) + exp_b).masked_fill(~mask, -math.inf)
    assert torch.allclose(w_exp, torch.softmax(logits, -1))
    assert max_err(out_log, out_exp) > 1e-3


def test_gradients_reach_a_and_w_delta_through_the_logits():
    g = gen(18)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    a = (torch.randn(2, generator=g, dtype=torch.float64) + 1.0).requires_grad_()

    def fn(q, k, v, weight, a):
        return dynamic_mask_attention(q, k, v, dynamic_bias(v, weight, a), 3)

    assert torch.autograd.gradcheck(fn, (q, k, v, weight, a), eps=1e-6, atol=1e-6)
    grads = torch.autograd.grad(fn(q, k, v, weight, a).square().sum(), (weight, a))
    assert all(gr.abs().max() > 1e-4 for gr in grads)


def test_the_selection_passes_no_gradient():
    g = gen(19)
    q, k, v = make_qkv(1, 2, 2, 10, d=4, dtype=torch.float64, seed=20, requires_grad=True)
    bias = (torch.randn(1, 2, 1, 10, generator=g, dtype=torch.float64) * 2).requires_grad_()
    out, mask = dynamic_mask_attention(q, k, v, bias, 4, return_mask=True)
    fixed = attention(q, k, v, mask=mask.detach(), bias=bias)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, bias), grad_out),
                         torch.autograd.grad(fixed, (q, k, v, bias), grad_out)):
        assert torch.allclose(got, want, atol=1e-12)


# --- the kernel path --------------------------------------------------------------------------------


def test_kernel_path_equals_the_torch_path_forward_and_gradients():
    torch.manual_seed(0)
    ref = DynamicMaskAttention(64, 4, num_kv_heads=2, window=9)
    fast = DynamicMaskAttention(64, 4, num_kv_heads=2, window=9, backend="kernel")
    with torch.no_grad():
        ref.A.copy_(torch.tensor([0.7, -1.1]))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, 64, generator=gen(21))
    out_ref = ref(x)
    q, k, v = ref.project(x)
    # the kernel itself, on block 16 tiles, against the torch path
    bias = ref.key_bias(v)
    direct = dynamic_mask_attention(q, k, v, bias, 9, backend="kernel", block_m=16, block_n=16)
    assert max_err(direct, dynamic_mask_attention(q, k, v, bias, 9)) < 1e-5
    out_fast = fast(x)
    assert torch.equal(fast.last_mask, ref.last_mask) and max_err(out_fast, out_ref) < 1e-5
    grad = torch.randn(out_ref.shape, generator=gen(22))
    params = ["A", "delta_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight"]
    got = torch.autograd.grad(out_fast, [fast.get_parameter(n) for n in params], grad)
    want = torch.autograd.grad(out_ref, [ref.get_parameter(n) for n in params], grad)
    for name, a, b in zip(params, got, want):
        assert max_err(a, b) < 1e-4 * max(1.0, b.abs().max().item()), name


# --- the module and the registry --------------------------------------------------------------------


def test_module_parameters_at_initialisation():
    layer = DynamicMaskAttention(32, 4, num_kv_heads=2)
    assert torch.equal(layer.A.data, torch.zeros(2)) and layer.delta_proj.weight.shape == (2, 16)


@pytest.mark.parametrize("options", [{}, {"window": 3, "block_size": 2}, {"form": "exp", "window": 2},
                                     {"selection": "window", "window": 3}],
                         ids=["defaults", "smoothed", "exp", "window"])
def test_registered_mechanism_is_causal(options):
    torch.manual_seed(1)
    mixer = build_mechanism("dma", 16, 2, causal=True, **options)
    with torch.no_grad():
        mixer.A.copy_(torch.tensor([1.3, -0.8]))
    for length in (1, 5, 23):
        x = torch.randn(2, length, 16, generator=gen(length))
        y = mixer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        cut = length // 2
        x2 = x.clone()
        x2[:, cut:] += torch.randn(2, length - cut, 16, generator=gen(99))
        assert torch.equal(mixer(x2)[:, :cut], y[:, :cut])


def test_module_keeps_what_it_used():
    layer = DynamicMaskAttention(16, 2, window=3)
    layer(torch.randn(1, 9, 16))
    assert layer.last_bias.shape == (1, 2, 1, 9) and layer.last_mask.shape == (1, 2, 9, 9)
    assert torch.allclose(layer.last_weights.sum(-1), torch.ones(1, 2, 9))
    assert (layer.last_weights > 0).eq(torch.repeat_interleave(layer.last_mask, 1, 1)).all()


# --- the benchmark mask -----------------------------------------------------------------------------


def test_benchmark_mask_at_a_small_length():
    mask = benchmark_mask(300, seed=3, window=32)
    assert mask.dtype == torch.bool and mask.shape == (300, 300)
    assert (mask.sum(-1) == torch.clamp(torch.arange(300) + 1, max=32)).all()
    assert not (mask & ~torch.ones(300, 300, dtype=torch.bool).tril()).any()
    assert torch.equal(mask, benchmark_mask(300, seed=3, window=32))
    assert not torch.equal(mask, benchmark_mask(300, seed=4, window=32))
    smoothed = benchmark_mask(300, seed=3, window=32, block_size=8)
    assert not (smoothed & ~torch.ones(300, 300, dtype=torch.bool).tril()).any()
    # an independent random bias past 2w: fewer than half of any block is kept, so smoothing empties the rows
    assert smoothed[4 * 32:].sum() == 0 and smoothed[:32].sum() > 0


# --- bad inputs -------------------------------------------------------------------------------------


BAD = [
    pytest.param(lambda: dynamic_mask(torch.zeros(1, 1, 4, 4), 2), ValueError, "one value per key",
                 id="bias-per-query"),
    pytest.param(lambda: dynamic_mask(torch.zeros(1, 1, 1, 4), 0), ValueError, "window", id="window-zero"),
    pytest.param(lambda: dynamic_mask(torch.zeros(1, 1, 1, 4), 2, causal=1), TypeError, "causal", id="causal-int"),
    pytest.param(lambda: dynamic_mask(torch.zeros(1, 1, 1, 4), 2, block_size=0), ValueError, "block_size",
                 id="block-zero"),
    pytest.param(lambda: dynamic_bias(torch.zeros(1, 2, 3, 4), torch.zeros(2, 4), torch.zeros(2)), ValueError,
                 r"weight: expected W_delta of shape \(H_kv, H_kv \* D\) = \(2, 8\)", id="weight-per-head"),
    pytest.param(lambda: dynamic_bias(torch.zeros(1, 2, 3, 4), torch.zeros(2, 8), torch.zeros(3)), ValueError,
                 "a: expected one value per key/value head", id="a-shape"),
    pytest.param(lambda: dynamic_bias(torch.zeros(1, 2, 3, 4), torch.zeros(2, 8), torch.zeros(2), form="sigmoid"),
                 ValueError, "form", id="form"),
    pytest.param(lambda: dynamic_mask_attention(*make_qkv(1, 2, 2, 4), torch.zeros(1, 2, 1, 5), 2), ValueError,
                 "bias: expected one value per key and key/value head", id="bias-length"),
    pytest.param(lambda: dynamic_mask_attention(*make_qkv(1, 2, 2, 4), torch.zeros(1, 2, 1, 4), 2, backend="cuda"),
                 ValueError, "backend", id="backend"),
    pytest.param(lambda: DynamicMaskAttention(16, 2, selection="random"), ValueError, "selection", id="selection"),
    pytest.param(lambda: DynamicMaskAttention(16, 2, backend="kernel"), ValueError, "head dim", id="kernel-head-dim"),
]


@pytest.mark.parametrize("make, error, words", BAD)
def test_bad_input_is_rejected(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_a_nan_bias_is_refused():
    bias = torch.zeros(1, 2, 1, 5)
    bias[..., 2] = float("nan")
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="bias: expected no NaN, got 2 NaN values"):
        dynamic_mask_attention(q, q, q, bias, 2)


def lifetimes_by_definition(row, window):
    """e_j: the w-th smallest position among the keys stronger than j (larger bias, or equal and earlier), else L."""
    ends = []
    for j, b in enumerate(row):
        stronger = sorted(k for k, c in enumerate(row) if c > b or (c == b and k < j))
        ends.append(stronger[window - 1] if len(stronger) >= window else len(row))
    return ends


def test_lifetimes_with_ties_rank_the_earlier_key_first():
    # few distinct values: many ties, which the definition breaks in favour of the earlier key
    g = torch.Generator().manual_seed(3)
    bias = torch.randint(0, 3, (2, 30), generator=g).double()
    for window in (1, 4, 9, 30):
        ends = key_lifetimes(bias, window)
        # a key never kept has e_j <= j by the definition, and exactly j here
        want = [[max(e, j) for j, e in enumerate(lifetimes_by_definition(row, window))] for row in bias.tolist()]
        assert ends.tolist() == want
    # equal biases everywhere: the w earliest keys win and are never evicted, every later key is never kept
    assert key_lifetimes(torch.zeros(1, 10), 3).tolist() == [[10, 10, 10, 3, 4, 5, 6, 7, 8, 9]]
