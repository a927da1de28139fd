"""Lesson 50 (attnlib.bias.flash_bias): exact factorisations, SVD truncation, the concatenation trick, the module."""


import pytest
import torch

from attnlib import attention, attention_naive, build_mechanism
from attnlib.bias.flash_bias import (
    H100_RIDGE,
    ALiBiLowRankAttention,
    alibi_bias,
    alibi_factors,
    alibi_slopes,
    arithmetic_intensity,
    attention_bytes,
    concat_bias_attention,
    concat_bias_inputs,
    grid_points,
    lowrank_bias_attention,
    relative_position_bias,
    squared_distance_bias,
    squared_distance_factors,
    svd_factors,
    truncation_error,
)

torch.set_num_threads(1)


def _qkv(b=1, h=2, lq=7, lk=None, d=8, hkv=None, seed=0, dtype=torch.float64):
    lk = lq if lk is None else lk
    hkv = h if hkv is None else hkv
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, lk, d, generator=g, dtype=dtype))


# --- biases and their exact factors -----------------------------------------------------------------


def test_alibi_slopes_are_the_geometric_sequence_of_the_alibi_paper():
    for heads in (1, 2, 8, 12):
        slopes = alibi_slopes(heads)
        assert torch.allclose(slopes, torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)],
                                                   dtype=torch.float64))
        assert slopes[-1].item() == pytest.approx(2.0**-8)
    assert alibi_slopes(8).tolist() == [0.5 ** (h + 1) for h in range(8)]


def test_alibi_bias_matches_a_loop():
    heads, lq, lk = 3, 4, 6
    bias = alibi_bias(heads, lq, lk)
    slopes = alibi_slopes(heads)
    for h in range(heads):
        for i in range(lq):
            for j in range(lk):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h].item() * (i + lk - lq - j))


@pytest.mark.parametrize("lq, lk", [(9, 9), (5, 11)])
def test_alibi_factorisation_is_exact_and_rank_two(lq, lk):
    u, w = alibi_factors(4, lq, lk, dtype=torch.float64)
    assert u.shape == (1, 4, lq, 2) and w.shape == (1, 1, lk, 2)
    assert torch.equal(u @ w.transpose(-2, -1), alibi_bias(4, lq, lk))
    assert torch.linalg.matrix_rank(alibi_bias(4, lq, lk)[0]).tolist() == [2] * 4


def test_the_official_examples_sign_is_the_opposite_of_alibi():
    # thuml/FlashBias's ALiBi example builds q_b = m [1, i], k_b = [-j, 1]: +m (i - j), a bonus for distance
    u, w = alibi_factors(2, 6, sign=+1.0, dtype=torch.float64)
    slopes = alibi_slopes(2)[:, None, None]
    pos = torch.arange(6, dtype=torch.float64)
    code = slopes * torch.stack([torch.ones(6, dtype=torch.float64), pos], -1) @ torch.stack(
        [-pos, torch.ones(6, dtype=torch.float64)], -1).transpose(0, 1)
    assert torch.allclose(u @ w.transpose(-2, -1), code[None])
    assert torch.allclose(u @ w.transpose(-2, -1), -alibi_bias(2, 6))
    # causal ALiBi: the penalty grows with distance; with the flipped sign distant keys win
    assert (alibi_bias(2, 6)[0, :, 5, :5] < 0).all() and (code[:, 5, :5] > 0).all()


@pytest.mark.parametrize("p", [1, 2, 3])
def test_squared_distance_factorisation_is_exact_with_rank_p_plus_2(p):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(20, p, generator=g, dtype=torch.float64)
    y = torch.randn(15, p, generator=g, dtype=torch.float64)
    u, w = squared_distance_factors(x, y, weight=0.3)
    assert u.shape == (20, p + 2) and w.shape == (15, p + 2)
    loop = torch.tensor([[-0.3 * sum((x[i, c] - y[j, c]).item() ** 2 for c in range(p)) for j in range(15)]
                         for i in range(20)], dtype=torch.float64)
    assert torch.allclose(u @ w.T, loop, atol=1e-12)
    assert torch.allclose(squared_distance_bias(x, y, weight=0.3), loop, atol=1e-12)
    assert torch.linalg.matrix_rank(loop).item() == p + 2


def test_image_distance_bias_has_rank_four():
    bias = squared_distance_bias(grid_points(6, 7))
    assert bias.shape == (42, 42)
    assert torch.linalg.matrix_rank(bias).item() == 4
    assert truncation_error(bias, 4) < 1e-12


def test_relative_position_bias_is_toeplitz_and_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    lq, lk = 5, 8
    table = torch.randn(2, lq + lk - 1, generator=g, dtype=torch.float64)
    bias = relative_position_bias(table, lq, lk)
    for i in range(lq):
        for j in range(lk):
            assert bias[1, i, j].item() == table[1, (i + lk - lq) - j + lq - 1].item()
    assert torch.equal(bias[:, 1:, 1:], bias[:, :-1, :-1])  # constant along diagonals


# --- SVD truncation -----------------------------------------------------------------------------------


def test_svd_truncation_error_decreases_with_rank_and_vanishes_at_full_rank():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(2 * 24 - 1, generator=g, dtype=torch.float64).cumsum(0) * 0.2  # a smooth-ish table
    bias = relative_position_bias(table, 24)
    errors = [truncation_error(bias, r) for r in range(1, 25)]
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.01 and errors[-1] < 1e-12


def test_svd_error_is_the_tail_of_the_singular_values():
    # Eckart-Young: ||B - B_r||_F^2 = sum_{i > r} sigma_i^2
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(12, 9, generator=g, dtype=torch.float64)
    sigma = torch.linalg.svdvals(bias)
    for r in (1, 4, 8):
        want = (sigma[r:] ** 2).sum().sqrt() / sigma.square().sum().sqrt()
        assert truncation_error(bias, r) == pytest.approx(want.item(), rel=1e-9)


def test_svd_factors_are_batched():
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    u, w = svd_factors(bias, 5)
    assert u.shape == (2, 3, 6, 5) and w.shape == (2, 3, 5, 5)
    assert torch.allclose(u @ w.transpose(-2, -1), bias, atol=1e-12)


# --- attention with a low-rank bias -----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_bias_attention_matches_the_naive_oracle(causal):
    q, k, v = _qkv(lq=5, lk=7)
    g = torch.Generator().manual_seed(5)
    u, w = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64), torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64)
    want = attention_naive(q, k, v, bias=u @ w.transpose(-2, -1), causal=causal)
    assert torch.allclose(lowrank_bias_attention(q, k, v, u, w, causal=causal), want, atol=1e-12)


@pytest.mark.parametrize("causal, hkv", [(False, 2), (True, 2), (True, 1)], ids=["full", "causal", "gqa-causal"])
def test_concatenation_trick_equals_biased_attention(causal, hkv):
    q, k, v = _qkv(b=2, lq=6, lk=9, hkv=hkv)
    g = torch.Generator().manual_seed(6)
    u, w = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    want = attention(q, k, v, bias=u @ w.transpose(-2, -1), causal=causal)
    assert torch.allclose(concat_bias_attention(q, k, v, u, w, causal=causal), want, atol=1e-12)
    q_cat, k_cat = concat_bias_inputs(q, k, u, w, multiple=8)
    assert q_cat.shape[-1] == 16 and k_cat.shape[-1] == 16  # 8 + 3 padded with zeros to a multiple of 8
    v_all = v.repeat_interleave(2 // hkv, dim=1)
    assert torch.allclose(attention(q_cat, k_cat, v_all, causal=causal, scale=1.0), want, atol=1e-12)


def test_concatenation_needs_scale_one_and_the_scale_on_q_only():
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(7)
    u, w = 2 * torch.randn(1, 2, 7, 2, generator=g, dtype=torch.float64), torch.randn(1, 2, 7, 2, generator=g, dtype=torch.float64)
    want = lowrank_bias_attention(q, k, v, u, w)
    q_cat, k_cat = concat_bias_inputs(q, k, u, w)
    # the usual 1/sqrt(D') scale on the concatenated inputs scales the bias too: a different function
    wrong = attention(torch.cat([q, u], -1), torch.cat([k, w], -1), v)
    assert not torch.allclose(wrong, want, atol=1e-3)
    assert torch.allclose(attention(q_cat, k_cat, v, scale=1.0), want, atol=1e-12)


def test_lowrank_bias_attention_gradcheck():
    q, k, v = (x[:, :1, :4, :3].clone().requires_grad_() for x in _qkv())
    g = torch.Generator().manual_seed(8)
    u = torch.randn(1, 1, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 1, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lowrank_bias_attention(*t, causal=True), (q, k, v, u, w))
    assert torch.autograd.gradcheck(lambda *t: concat_bias_attention(*t, causal=True), (q, k, v, u, w))


# --- bytes and arithmetic intensity -----------------------------------------------------------------


def test_byte_counts_follow_the_formula():
    n, m, d, r = 1000, 3000, 64, 8
    assert attention_bytes(n, m, d, dense_bias=True) == 2 * (2 * n + 2 * m) * d + 2 * n * m
    assert attention_bytes(n, m, d, rank=r) == 2 * (2 * n + 2 * m) * d + 2 * (n + m) * r
    assert attention_bytes(n, m, d, rank=r, bias_bytes=4) == 2 * (2 * n + 2 * m) * d + 4 * (n + m) * r


def test_a_dense_bias_is_memory_bound_on_an_h100_and_factors_are_not():
    assert H100_RIDGE == pytest.approx(295, abs=1)
    for d in (32, 64, 128):
        dense = arithmetic_intensity(16384, 16384, d, dense_bias=True)
        assert dense < H100_RIDGE and dense == pytest.approx(2 * d, rel=0.05)  # -> 2d for long sequences
        assert arithmetic_intensity(16384, 16384, d, rank=8) > H100_RIDGE


# --- the module ---------------------------------------------------------------------------------------


def test_module_backends_compute_the_same_function():
    torch.manual_seed(0)
    ref = ALiBiLowRankAttention(32, 4, causal=True)
    x = torch.randn(2, 11, 32)
    want = ref(x)
    for backend in ("dense", "concat"):
        other = ALiBiLowRankAttention(32, 4, causal=True, backend=backend)
        other.load_state_dict(ref.state_dict())
        assert torch.allclose(other(x), want, atol=1e-5), backend


def test_module_in_float64_matches_a_float64_reference_with_slopes_that_are_not_powers_of_two():
    # three heads: slopes 2^(-8/3), ... are not exact in float32; the factors are built in the module's dtype
    torch.manual_seed(3)
    module = ALiBiLowRankAttention(24, 3).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    q, k, v = module.project(x)
    want = module.merge_heads(attention_naive(q, k, v, bias=alibi_bias(3, 10).double(), causal=True))
    for backend in ("reference", "dense", "concat"):
        module.backend = backend
        assert (module(x) - want).abs().max() < 1e-12, backend


def test_module_refuses_to_run_alibi_without_the_causal_mask():
    with pytest.raises(ValueError, match=r"causal: ALiBi's rank-2 factors give -m \(i - j\), which favours far-future"):
        ALiBiLowRankAttention(16, 2, causal=False)
    assert ALiBiLowRankAttention(16, 2).causal  # the default is ALiBi's setting


def test_registered_mechanism_is_causal_with_two_heads():
    torch.manual_seed(1)
    mixer = build_mechanism("alibi-lowrank", 16, 2, causal=True)
    x = torch.randn(1, 9, 16)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 3, 16)
    assert torch.allclose(mixer(x)[:, :6], mixer(y)[:, :6], atol=1e-6)
    assert not torch.allclose(mixer(x)[:, 6:], mixer(y)[:, 6:])


def test_module_with_zero_weights_on_queries_is_pure_alibi():
    # q = 0: the weights are softmax(ALiBi) alone, so the nearest key gets the most weight
    torch.manual_seed(2)
    mixer = ALiBiLowRankAttention(8, 1, causal=True)
    torch.nn.init.zeros_(mixer.q_proj.weight)
    torch.nn.init.eye_(mixer.v_proj.weight)
    torch.nn.init.eye_(mixer.out_proj.weight)
    x = torch.randn(1, 5, 8, dtype=torch.float32)
    slope = 2.0**-8
    weights = torch.softmax(-slope * (4 - torch.arange(5.0)), 0)
    assert torch.allclose(mixer(x)[0, 4], weights @ x[0], atol=1e-6)


# --- bad inputs ---------------------------------------------------------------------------------------


BAD = [
    (lambda: lowrank_bias_attention(*_qkv(), torch.randn(1, 2, 7, 2), torch.randn(1, 2, 7, 3)), ValueError, "same rank"),
    (lambda: lowrank_bias_attention(*_qkv(), torch.randn(1, 2, 6, 2), torch.randn(1, 2, 7, 2)), ValueError, "u: expected 7 rows"),
    (lambda: concat_bias_inputs(*_qkv()[:2], torch.randn(1, 3, 7, 2), torch.randn(1, 2, 7, 2)), ValueError, "heads 1 or 2"),
    (lambda: svd_factors(torch.randn(4, 3), 4), ValueError, "rank: expected at most"),
    (lambda: svd_factors(torch.randn(4), 1), ValueError, "bias: expected at least 2"),
    (lambda: squared_distance_factors(torch.randn(4, 2), torch.randn(4, 3)), ValueError, "y: expected points"),
    (lambda: relative_position_bias(torch.randn(5), 4), ValueError, "table: expected 7"),
    (lambda: alibi_factors(2, 4, sign=2.0), ValueError, "sign"),
    (lambda: alibi_slopes(0), ValueError, "num_heads"),
    (lambda: ALiBiLowRankAttention(10, 4), ValueError, "dim: expected a multiple"),
    (lambda: ALiBiLowRankAttention(8, 2, backend="fast"), ValueError, "backend"),
    (lambda: ALiBiLowRankAttention(8, 2)(torch.randn(1, 3, 6)), ValueError, "x: expected last dim 8"),
]


@pytest.mark.parametrize("make, error, words", BAD, ids=[b[2].split(":")[0].replace(" ", "-") + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_rejected(make, error, words):
    with pytest.raises(error, match=words):
        make()
