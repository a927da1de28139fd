"""Lesson 13: differential attention and grouped differential attention (attnlib.heads.differential).

The vectorised function against the float64 loop oracle; the invariants the derivation promises (rows of
the differential map sum to 1 - lambda, lambda = 0 is softmax attention, GDA with ratio 1 is differential
attention, growth keeps the function); both modules against independent re-implementations that follow
the official code's layouts; causality; gradients; bad inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attnlib import TinyTransformer, attention, attention_naive, build_mechanism, get_mechanism
from attnlib.heads.differential import (
    DifferentialAttention,
    GroupedDifferentialAttention,
    differential_attention,
    differential_attention_naive,
    grow_signal_heads,
    lambda_init_for_layer,
    reparameterized_lambda,
)


def make_inputs(b=1, h1=4, h2=2, hkv=1, lq=6, lk=None, d=8, dv=16, *, dtype=torch.float64, seed=0):
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h1, lq, d), (b, hkv, lk, d), (b, h2, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)]
    return [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]


# --- lambda -----------------------------------------------------------------------------------------


def test_lambda_init_follows_the_paper_with_a_zero_based_layer_index():
    for layer in range(6):
        assert lambda_init_for_layer(layer) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer))
    assert lambda_init_for_layer(0) == pytest.approx(0.2)


def test_motif_convention_is_the_paper_shifted_by_one_layer():
    # Motif's port uses (layer - 1) on a 0-based index: layer 0 gets a slightly negative lambda_init
    assert lambda_init_for_layer(0, convention="motif") == pytest.approx(0.8 - 0.6 * math.exp(0.3))
    assert lambda_init_for_layer(0, convention="motif") < 0 < lambda_init_for_layer(0)
    for layer in range(1, 6):
        assert lambda_init_for_layer(layer, convention="motif") == pytest.approx(lambda_init_for_layer(layer - 1))
    # and the two conventions give different layers
    torch.manual_seed(0)
    paper = DifferentialAttention(16, 2, layer_index=0)
    torch.manual_seed(0)
    motif = DifferentialAttention(16, 2, layer_index=0, lambda_convention="motif")
    x = torch.randn(1, 5, 16)
    assert not torch.allclose(paper(x), motif(x))


def test_reparameterized_lambda():
    zeros = torch.zeros(4)
    assert reparameterized_lambda(zeros, zeros, zeros, zeros, 0.3).item() == pytest.approx(0.3)
    g = torch.Generator().manual_seed(1)
    q1, k1, q2, k2 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4))
    want = math.exp(float(q1 @ k1)) - math.exp(float(q2 @ k2)) + 0.5
    assert reparameterized_lambda(q1, k1, q2, k2, 0.5).item() == pytest.approx(want)


def test_layer_index_reaches_the_mechanism_through_the_transformer():
    model = TinyTransformer(vocab_size=8, max_len=8, dim=16, depth=3, num_heads=2, mechanism="diff",
                            layer_options=[{"layer_index": i} for i in range(3)])
    got = [block.mixer.lambda_init for block in model.blocks]
    assert got == pytest.approx([lambda_init_for_layer(i) for i in range(3)])
    assert get_mechanism("diff").paper == get_mechanism("gda").paper == "P05"


# --- the function -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    pytest.param(dict(h1=2, h2=2, hkv=2), id="diff-mha"),
    pytest.param(dict(h1=4, h2=2, hkv=1), id="gda-r2-one-kv"),
    pytest.param(dict(h1=6, h2=2, hkv=2, lq=5, lk=7), id="gda-r3-lq<lk"),
    pytest.param(dict(h1=2, h2=1, hkv=1, lq=7, lk=4), id="lq>lk-empty-rows"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_the_loop_oracle(shape, causal):
    inputs = make_inputs(**shape)
    got = differential_attention(*inputs, 0.35, causal=causal)
    want = differential_attention_naive(*inputs, 0.35, causal=causal)
    assert torch.allclose(got, want, atol=1e-12)


def test_lambda_zero_is_softmax_attention_and_the_oracle_agrees():
    q1, k1, q2, k2, v = make_inputs()
    want = attention_naive(q1, k1, v, causal=True)
    assert torch.allclose(differential_attention(q1, k1, q2, k2, v, 0.0, causal=True), want, atol=1e-12)
    assert torch.allclose(differential_attention_naive(q1, k1, q2, k2, v, 0.0, causal=True), want, atol=1e-12)


def test_lambda_one_with_equal_maps_cancels_everything():
    q1, k1, _, _, v = make_inputs(h1=2, h2=2)
    assert differential_attention(q1, k1, q1, k1, v, 1.0).abs().max() < 1e-12


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.8, -0.3])
def test_rows_of_the_differential_map_sum_to_one_minus_lambda(lam):
    inputs = make_inputs(lq=7, lk=4)
    _, (a1, a2, diff) = differential_attention(*inputs, lam, causal=True, return_weights=True)
    sums = diff.sum(-1)
    assert torch.allclose(sums[..., 3:], torch.full_like(sums[..., 3:], 1 - lam), atol=1e-12)
    # rows 0-2 sit before every key: zero weights, zero output, no NaN
    assert torch.equal(diff[..., :3, :], torch.zeros_like(diff[..., :3, :]))
    assert torch.allclose(a1.sum(-1)[..., 3:], torch.ones(1, dtype=torch.float64), atol=1e-12)
    out = differential_attention(*inputs, lam, causal=True)
    assert torch.isfinite(out).all() and torch.equal(out[..., :3, :], torch.zeros_like(out[..., :3, :]))


def test_mask_and_causal_combine():
    inputs = make_inputs(h1=2, h2=2, hkv=2)
    mask = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    _, (a1, a2, diff) = differential_attention(*inputs, 0.4, causal=True, mask=mask, return_weights=True)
    allowed = mask & torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(diff * ~allowed, torch.zeros_like(diff))


def test_gradients_float64():
    inputs = [x.requires_grad_() for x in make_inputs(h1=2, h2=1, hkv=1, lq=4, lk=5, d=3, dv=4)]
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: differential_attention(*t, causal=True), (*inputs, lam))


# --- the modules ------------------------------------------------------------------------------------


def unilm_layout_reference(module: DifferentialAttention, x):
    """Differential attention written as unilm's multihead_diffattn.py lays it out (no GQA), float64."""
    b, length, _ = x.shape
    h, d = module.num_heads, module.head_dim
    q = module.q_proj(x).view(b, length, 2 * h, d).transpose(1, 2)
    k = module.k_proj(x).view(b, length, 2 * h, d).transpose(1, 2)
    v = module.v_proj(x).view(b, length, h, 2 * d).transpose(1, 2)
    scores = (q * d ** -0.5) @ k.transpose(-1, -2)
    scores = scores + torch.triu(torch.full((length, length), float("-inf"), dtype=x.dtype), 1)
    w = F.softmax(scores, dim=-1).view(b, h, 2, length, length)
    lam = (torch.exp((module.lambda_q1 * module.lambda_k1).sum()) - torch.exp((module.lambda_q2 * module.lambda_k2).sum())
           + module.lambda_init)
    out = (w[:, :, 0] - lam * w[:, :, 1]) @ v
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * module.subln.weight
    out = out * (1 - module.lambda_init)
    return module.out_proj(out.transpose(1, 2).reshape(b, length, 2 * h * d))


def vllm_layout_reference(module: GroupedDifferentialAttention, x):
    """GDA written as the authors' vLLM backend lays it out: four attentions, concat, repeat, norm."""
    b, length, _ = x.shape
    n, r, d = module.num_noise_heads, module.ratio, module.head_dim
    q = module.q_proj(x).view(b, length, n, r + 1, d)
    q1 = q[:, :, :, :r].reshape(b, length, n * r, d).transpose(1, 2)
    q2 = q[:, :, :, r].transpose(1, 2)
    k = module.k_proj(x).view(b, length, -1, 2, d)
    v = module.v_proj(x).view(b, length, -1, 2, d)
    k1, k2, v1, v2 = (t[:, :, :, i].transpose(1, 2) for t in (k, v) for i in (0, 1))

    def attn(qq, kk, vv):  # causal softmax attention, grouped-query over the key/value heads
        return attention(qq, kk, vv, causal=True)

    a1 = torch.cat([attn(q1, k1, v1), attn(q1, k1, v2)], -1)
    a2 = torch.cat([attn(q2, k2, v1), attn(q2, k2, v2)], -1).repeat_interleave(r, dim=1)
    lam = module.lam().double()
    out = a1 - lam * a2
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * module.subln.weight
    out = out * (1 - module.lambda_init)
    return module.out_proj(out.transpose(1, 2).reshape(b, length, -1))


def test_differential_module_matches_the_unilm_layout():
    torch.manual_seed(0)
    module = DifferentialAttention(32, 2, causal=True, layer_index=2).double()
    with torch.no_grad():
        module.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert torch.allclose(module(x), unilm_layout_reference(module, x), atol=1e-10)


@pytest.mark.parametrize("ratio, num_heads, num_kv_heads", [(1, 4, 4), (3, 8, 2), (3, 8, 4), (2, 6, 2)])
def test_gda_module_matches_the_vllm_layout(ratio, num_heads, num_kv_heads):
    torch.manual_seed(1)
    module = GroupedDifferentialAttention(24, num_heads, ratio=ratio, num_kv_heads=num_kv_heads, head_dim=4,
                                          causal=True, layer_index=1).double()
    with torch.no_grad():
        module.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    assert torch.allclose(module(x), vllm_layout_reference(module, x), atol=1e-10)


@pytest.mark.parametrize("diff_kv, gda_kv", [(2, 4), (1, 2)], ids=["mha", "gqa"])
def test_gda_with_ratio_one_is_differential_attention(diff_kv, gda_kv):
    torch.manual_seed(2)
    diff = DifferentialAttention(32, 2, num_kv_heads=diff_kv, causal=True, layer_index=3)
    gda = GroupedDifferentialAttention(32, 4, ratio=1, num_kv_heads=gda_kv, causal=True, layer_index=3)
    gda.load_state_dict(diff.state_dict())  # same parameter names and shapes: the layouts agree
    x = torch.randn(2, 9, 32)
    assert torch.equal(diff(x), gda(x))


def test_lambda_zero_without_the_norm_is_plain_softmax_attention():
    torch.manual_seed(3)
    module = DifferentialAttention(16, 2, causal=True, lambda_init=0.0, norm=False).double()
    with torch.no_grad():
        for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
            p.zero_()
    assert module.lam().item() == 0.0
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    q = module._split(module.q_proj(x), module.head_dim)
    k = module._split(module.k_proj(x), module.head_dim)
    v = module._split(module.v_proj(x), 2 * module.head_dim)
    want = module.out_proj(attention(q[:, 0::2], k[:, 0::2], v, causal=True).transpose(1, 2).reshape(1, 6, 16))
    assert torch.allclose(module(x), want, atol=1e-12)


def test_growth_replicates_only_signal_heads_and_keeps_the_function():
    torch.manual_seed(4)
    small = GroupedDifferentialAttention(24, 8, ratio=3, num_kv_heads=2, head_dim=4, causal=True, layer_index=2)
    grown = grow_signal_heads(small, 2)
    assert (grown.ratio, grown.num_noise_heads, grown.num_signal_heads) == (6, 2, 12)
    assert grown.lambda_init == small.lambda_init and grown.k_proj.weight.shape == small.k_proj.weight.shape
    x = torch.randn(2, 7, 24)
    assert torch.allclose(grown(x), small(x), atol=1e-5)
    # the noise queries are the original ones
    _, q2_small = small.split_query_heads(small._split(small.q_proj(x), 4))
    _, q2_grown = grown.split_query_heads(grown._split(grown.q_proj(x), 4))
    assert torch.equal(q2_small, q2_grown)


@pytest.mark.parametrize("name, options", [("diff", {}), ("gda", dict(ratio=3)), ("diff", dict(num_kv_heads=1))])
def test_causal_a_future_token_changes_no_past_output(name, options):
    torch.manual_seed(5)
    mixer = build_mechanism(name, 32, 4, causal=True, **options)
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 32)
    assert torch.allclose(mixer(x)[:, :5], mixer(y)[:, :5], atol=1e-6)
    assert not torch.allclose(mixer(x)[:, 5:], mixer(y)[:, 5:])


def test_maps_are_kept_for_pictures():
    torch.manual_seed(6)
    model = TinyTransformer(vocab_size=8, max_len=8, dim=16, depth=2, num_heads=2, mechanism="gda")
    maps = model.attention_maps(torch.randint(0, 8, (3, 6)))
    mixer = model.blocks[0].mixer
    assert len(maps) == 2 and maps[0].shape == (3, 1, 6, 6)
    assert torch.allclose(maps[0].sum(-1), 1 - mixer.lam().detach() * torch.ones(1), atol=1e-5)
    assert set(mixer.last_maps) == {"signal", "noise", "differential"}


# --- bad inputs ---------------------------------------------------------------------------------------


BAD_CALLS = [
    pytest.param(dict(q2=torch.randn(1, 3, 6, 8)), ValueError, "q2: its heads", id="noise-heads-do-not-divide"),
    pytest.param(dict(k2=torch.randn(1, 1, 5, 8)), ValueError, "k2: expected the shape of k1", id="k2-shape"),
    pytest.param(dict(v=torch.randn(1, 1, 5, 16)), ValueError, "v: expected", id="v-length"),
    pytest.param(dict(q1=torch.randn(4, 6, 8)), ValueError, "q1: expected a 4-d", id="rank"),
    pytest.param(dict(lam=torch.ones(2)), ValueError, "lam: expected a scalar", id="lam-vector"),
    pytest.param(dict(lam="0.5"), TypeError, "lam: expected a float", id="lam-string"),
    pytest.param(dict(q1=torch.randn(1, 4, 6, 8, dtype=torch.float64)), TypeError, "one dtype", id="mixed-dtypes"),
]


@pytest.mark.parametrize("override, error, words", BAD_CALLS)
def test_bad_calls_are_rejected(override, error, words):
    q1, k1, q2, k2, v = make_inputs(dtype=torch.float32)
    args = dict(q1=q1, k1=k1, q2=q2, k2=k2, v=v, lam=0.5)
    args.update(override)
    with pytest.raises(error, match=words):
        differential_attention(**args)


BAD_MODULES = [
    pytest.param(lambda: DifferentialAttention(30, 2), "dim: expected a multiple of 2 \\* num_heads", id="dim"),
    pytest.param(lambda: DifferentialAttention(32, 4, num_kv_heads=3), "num_kv_heads", id="kv"),
    pytest.param(lambda: GroupedDifferentialAttention(32, 6, ratio=4), "num_heads: expected a multiple of ratio", id="groups"),
    pytest.param(lambda: GroupedDifferentialAttention(32, 8, ratio=3, num_kv_heads=3), "num_kv_heads: expected an even", id="odd-kv"),
    pytest.param(lambda: DifferentialAttention(32, 2, layer_index=-1), "layer_index", id="layer"),
    pytest.param(lambda: DifferentialAttention(32, 2, lambda_convention="paper"), "convention", id="convention"),
    pytest.param(lambda: DifferentialAttention(32, 2, backend="fast"), "backend", id="backend"),
    pytest.param(lambda: grow_signal_heads(GroupedDifferentialAttention(32, 4), 0), "factor", id="growth-factor"),
]


@pytest.mark.parametrize("build, words", BAD_MODULES)
def test_bad_options_are_rejected(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_bad_module_input_is_rejected():
    with pytest.raises(ValueError, match="x: expected last dim 32"):
        DifferentialAttention(32, 2)(torch.randn(1, 4, 16))
    with pytest.raises(TypeError, match="module: expected a GroupedDifferentialAttention"):
        grow_signal_heads(DifferentialAttention(32, 2), 2)


def multihead_diffattn_as_written(module, x):
    """unilm's multihead_diffattn.py forward (without RoPE), written out in float64: repeat_kv over the 2Hkv
    interleaved key heads, one softmax over 2H query heads, then pairs (2h, 2h+1)."""
    b, length, _ = x.shape
    h, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    q = module.q_proj(x).view(b, length, 2 * h, d).transpose(1, 2)
    k = module.k_proj(x).view(b, length, 2 * hkv, d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    v = module.v_proj(x).view(b, length, hkv, 2 * d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    scores = (q * d ** -0.5) @ k.transpose(-1, -2)
    scores = scores + torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    weights = torch.softmax(scores, dim=-1).view(b, h, 2, length, length)
    lam = (torch.exp((module.lambda_q1 * module.lambda_k1).sum()) - torch.exp((module.lambda_q2 * module.lambda_k2).sum())
           + module.lambda_init)
    out = (weights[:, :, 0] - lam * weights[:, :, 1]) @ v
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * module.subln.weight * (1 - module.lambda_init)
    return module.out_proj(out.transpose(1, 2).reshape(b, length, 2 * h * d))


def test_the_repeat_layout_is_multihead_diffattn_and_differs_from_the_grouped_one():
    torch.manual_seed(0)
    module = DifferentialAttention(32, 4, num_kv_heads=2, causal=True, kv_layout="repeat").double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert (module(x) - multihead_diffattn_as_written(module, x)).abs().max() < 1e-12
    grouped = DifferentialAttention(32, 4, num_kv_heads=2, causal=True).double()
    grouped.load_state_dict(module.state_dict())
    assert (grouped(x) - module(x)).abs().max() > 1e-3  # the two official modules differ with n = 2
    # with as many key/value heads as heads, both layouts are one function
    full = DifferentialAttention(32, 4, causal=True, kv_layout="repeat").double()
    same = DifferentialAttention(32, 4, causal=True).double()
    same.load_state_dict(full.state_dict())
    assert (full(x) - same(x)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="kv_layout: expected one of"):
        DifferentialAttention(32, 4, kv_layout="flash")


def test_no_key_gives_zeros_as_a_fully_masked_row_does():
    q, empty = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8)
    out = differential_attention(q, empty, q, empty, torch.randn(1, 2, 0, 16), 0.5)
    assert torch.equal(out, torch.zeros(1, 2, 5, 16))
