"""Lesson 11: decoupled-head attention (DHA, P36), its fusion of heads, and their invariants."""

import pytest
import torch
from torch import nn

from attnlib import MultiHeadAttention, TinyTransformer, build_mechanism, get_mechanism
from attnlib.heads.decoupled_heads import (
    DecoupledHeadAttention,
    FusingHeadAttention,
    allocate_budgets,
    cluster_heads,
    collapse_heads,
    collapse_model,
    convert_model,
    decoupled_head_attention,
    fuse_heads,
    fusion_loss,
    grouped_query_map,
    head_similarity,
    head_weights,
    kv_cache_per_layer,
    linear_cka,
    mean_pooled_attention,
)
from tests.helpers import make_qkv


def naive_decoupled(q, k, v, key_map, value_map, causal):
    """Float64 loops: for query head i and position r, softmax over the allowed keys of head key_map[i]."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, length, d = q.shape
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for r in range(length):
                keys = range(r + 1) if causal else range(length)
                scores = torch.stack([q[n, i, r] @ k[n, key_map[i], j] / d ** 0.5 for j in keys])
                weights = torch.softmax(scores, 0)
                out[n, i, r] = sum(w * v[n, value_map[i], j] for w, j in zip(weights, keys))
    return out


def seeded_x(b=2, length=6, dim=16, seed=1, dtype=torch.float32):
    return torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the forward pass -------------------------------------------------------------------------------


@pytest.mark.parametrize("key_map, value_map", [
    pytest.param([0, 1, 2, 3], [0, 1, 2, 3], id="mha"),
    pytest.param([0, 0, 1, 1], [0, 0, 0, 0], id="decoupled"),
    pytest.param([1, 0, 1, 0], [0, 1, 2, 2], id="arbitrary"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_functional_matches_naive_loops(key_map, value_map, causal):
    q, _, _ = make_qkv(b=2, hq=4, lq=5, d=8, seed=0)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, max(key_map) + 1, 5, 8, generator=g)
    v = torch.randn(2, max(value_map) + 1, 5, 8, generator=g)
    got = decoupled_head_attention(q, k, v, key_map, value_map, causal=causal)
    torch.testing.assert_close(got.double(), naive_decoupled(q, k, v, key_map, value_map, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [16, 32])
def test_identity_maps_equal_mha_exactly(dim):
    torch.manual_seed(0)
    mha = MultiHeadAttention(dim, 4, causal=True)
    dha = DecoupledHeadAttention(dim, 4, causal=True)
    dha.load_state_dict(mha.state_dict())
    x = seeded_x(dim=dim)
    assert torch.equal(dha(x), mha(x))
    assert dha.key_map == dha.value_map == [0, 1, 2, 3]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_maps_equal_mha_module_with_fewer_kv_heads(kv_heads):
    torch.manual_seed(0)
    gqa = MultiHeadAttention(16, 4, num_kv_heads=kv_heads, causal=True)
    dha = DecoupledHeadAttention(16, 4, num_key_heads=kv_heads, num_value_heads=kv_heads, causal=True)
    dha.load_state_dict(gqa.state_dict())
    assert dha.key_map == grouped_query_map(4, kv_heads)
    torch.testing.assert_close(dha(seeded_x()), gqa(seeded_x()))


def test_module_matches_naive_with_its_own_projections():
    torch.manual_seed(0)
    dha = DecoupledHeadAttention(16, 4, key_map=[0, 0, 1, 1], value_map=[0, 1, 1, 1], causal=True).double()
    x = seeded_x(dtype=torch.float64)
    split = lambda y, n: y.view(2, 6, n, 4).transpose(1, 2)  # noqa: E731
    heads = naive_decoupled(split(dha.q_proj(x), 4), split(dha.k_proj(x), 2), split(dha.v_proj(x), 2),
                            dha.key_map, dha.value_map, causal=True)
    want = dha.out_proj(heads.transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(dha(x), want)


def test_causal_future_tokens_change_nothing_before():
    torch.manual_seed(0)
    dha = DecoupledHeadAttention(16, 4, key_map=[0, 1, 1, 0], value_map=[0, 0, 0, 0], causal=True)
    x = seeded_x()
    changed = x.clone()
    changed[:, 4:] += 1.0
    assert torch.allclose(dha(x)[:, :4], dha(changed)[:, :4])
    assert not torch.allclose(dha(x)[:, 4:], dha(changed)[:, 4:])


def test_gradients_gradcheck():
    q, _, _ = make_qkv(b=1, hq=3, lq=4, d=3, seed=0, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: decoupled_head_attention(q, k, v, [1, 0, 1], [0, 0, 0], causal=True), (q, k, v))


def test_fusing_module_gradients_reach_omega_and_weights():
    torch.manual_seed(0)
    fusing = FusingHeadAttention(8, 2, key_groups=[0, 0], value_groups=[0, 1], causal=True).double()
    x = seeded_x(1, 3, 8, dtype=torch.float64)
    fusing.train()
    (fusing(x).sum() + fusing.aux_loss).backward()
    assert fusing.omega_key.grad is not None and fusing.omega_key.grad.abs().sum() > 0
    assert fusing.attn.k_proj.weight.grad.abs().sum() > 0
    # the fusion loss itself, through fuse_heads, in float64
    heads = torch.randn(3, 2, 4, dtype=torch.float64)
    omega = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: fusion_loss(fuse_heads(heads, w, [0, 0, 1]), [0, 0, 1]), (omega,))


# --- fusion invariants ------------------------------------------------------------------------------


def test_fusing_starts_exactly_at_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True)
    fusing = FusingHeadAttention.from_attention(mha, key_groups=[0, 0, 1, 1], value_groups=[0, 0, 0, 0])
    x = seeded_x()
    torch.testing.assert_close(fusing(x), mha(x), atol=1e-6, rtol=1e-6)
    assert fusing.fusion_loss() > 0.1  # the heads of a group still differ


def test_mean_weights_equal_mean_pooled_gqa():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True)
    gqa = MultiHeadAttention(16, 4, num_kv_heads=2, causal=True)
    gqa.q_proj.load_state_dict(mha.q_proj.state_dict())
    gqa.out_proj.load_state_dict(mha.out_proj.state_dict())
    with torch.no_grad():  # GQA's conversion: mean of the heads of each consecutive pair
        for name in ("k_proj", "v_proj"):
            getattr(gqa, name).weight.copy_(getattr(mha, name).weight.view(2, 2, 4, 16).mean(1).reshape(8, 16))
    groups = grouped_query_map(4, 2)
    fusing = FusingHeadAttention.from_attention(mha, key_groups=groups, value_groups=groups, omega_init="mean")
    x = seeded_x()
    torch.testing.assert_close(fusing(x), gqa(x))
    torch.testing.assert_close(fusing.collapse()(x), gqa(x))
    torch.testing.assert_close(mean_pooled_attention(mha, key_groups=groups, value_groups=groups)(x), gqa(x))


def test_fusion_of_identical_heads_is_lossless():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True)
    with torch.no_grad():  # heads 1, 2, 3 share their key weights; heads 0, 1 their value weights
        k = mha.k_proj.weight.view(4, 4, 16)
        k[2], k[3] = k[1].clone(), k[1].clone()
        v = mha.v_proj.weight.view(4, 4, 16)
        v[1] = v[0].clone()
    key_groups, value_groups = [0, 1, 1, 1], [0, 0, 1, 2]
    fusing = FusingHeadAttention.from_attention(mha, key_groups=key_groups, value_groups=value_groups)
    assert fusing.fusion_loss() < 1e-12
    collapsed = fusing.collapse()
    x = seeded_x()
    torch.testing.assert_close(collapsed(x), mha(x))
    torch.testing.assert_close(mean_pooled_attention(mha, key_groups=key_groups, value_groups=value_groups)(x), mha(x))
    assert collapsed.kv_cache_per_token() == (2 + 3) * 4


def test_collapsing_a_converged_group_keeps_the_outputs():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, causal=True, bias=True)
    fusing = FusingHeadAttention.from_attention(mha, key_groups=[0, 1, 0, 1], value_groups=[0, 0, 0, 1])
    with torch.no_grad():  # a converged state: every row of omega within a group equal (and not the mean)
        fusing.omega_key.copy_(torch.tensor([[0.7, 0, 0.3, 0], [0, 0.2, 0, 0.8]])[[0, 1, 0, 1]])
        fusing.omega_value.copy_(torch.tensor([[0.5, 1.5, -1.0, 0], [0.5, 1.5, -1.0, 0], [0.5, 1.5, -1.0, 0],
                                               [0, 0, 0, 1.0]]))
    assert fusing.fusion_loss() < 1e-10
    x = seeded_x()
    collapsed = fusing.collapse()
    assert (collapsed.num_key_heads, collapsed.num_value_heads) == (2, 2)
    torch.testing.assert_close(collapsed(x), fusing(x), atol=1e-6, rtol=1e-5)
    # and a group that has not converged changes the outputs when collapsed
    with torch.no_grad():
        fusing.omega_value.copy_(torch.eye(4))
    assert not torch.allclose(fusing.collapse()(x), fusing(x), atol=1e-4)


def test_fuse_and_collapse_by_hand():
    heads = torch.arange(12.0).view(3, 2, 2)
    omega = torch.tensor([[0.5, 0.5, 9.0], [0.0, 1.0, 9.0], [9.0, 9.0, 2.0]])
    fused = fuse_heads(heads, omega, [0, 0, 1])  # entries across groups (the 9s) are ignored
    torch.testing.assert_close(fused[0], 0.5 * heads[0] + 0.5 * heads[1])
    torch.testing.assert_close(fused[2], 2.0 * heads[2])
    torch.testing.assert_close(collapse_heads(fused, [0, 0, 1])[0], (fused[0] + fused[1]) / 2)
    spread = (fused[0] - fused[1]).pow(2).sum() / 2
    torch.testing.assert_close(fusion_loss(fused, [0, 0, 1]), spread / fused.pow(2).sum())
    torch.testing.assert_close(fusion_loss(3.0 * fused, [0, 0, 1]), fusion_loss(fused, [0, 0, 1]))


def test_fusion_loss_is_aux_loss_only_in_training():
    torch.manual_seed(0)
    fusing = FusingHeadAttention(16, 4, fusion_weight=2.5, causal=True)
    fusing.train()
    fusing(seeded_x())
    torch.testing.assert_close(fusing.aux_loss, 2.5 * fusing.fusion_loss())
    fusing.eval()
    fusing(seeded_x())
    assert fusing.aux_loss is None


# --- similarity, clustering, budgets ----------------------------------------------------------------


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    torch.testing.assert_close(linear_cka(x, 3.0 * x @ rotation), torch.tensor(1.0, dtype=torch.float64))
    other = torch.randn(20, 4, generator=g, dtype=torch.float64)
    assert 0.0 <= linear_cka(x, other) < 0.9
    torch.testing.assert_close(linear_cka(x, other), linear_cka(other, x))
    # against the kernel form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XX^T, H the centring matrix
    h = torch.eye(20, dtype=torch.float64) - 1.0 / 20
    hsic = lambda a, b: torch.trace(h @ a @ a.T @ h @ b @ b.T)  # noqa: E731
    torch.testing.assert_close(linear_cka(x, other), hsic(x, other) / (hsic(x, x) * hsic(other, other)).sqrt())
    assert linear_cka(torch.ones(5, 2, dtype=torch.float64), x[:5]) == 0


def test_head_similarity_and_clustering():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 8, generator=g)
    heads = torch.stack([base[0], base[1], 2 * base[0] + 0.01 * torch.randn(3, 8, generator=g), base[1]])
    sim = head_similarity(heads)
    assert sim.shape == (4, 4) and torch.allclose(sim.diagonal(), torch.ones(4))
    assert sim[0, 2] > 0.99 and sim[1, 3] > 0.99
    assert cluster_heads(sim, 2) == [0, 1, 0, 1]
    assert cluster_heads(sim, 4) == [0, 1, 2, 3]
    assert cluster_heads(sim, 1) == [0, 0, 0, 0]


def test_allocate_budgets_takes_heads_from_the_redundant_set():
    redundant = torch.full((4, 4), 0.9).fill_diagonal_(1.0)
    distinct = torch.full((4, 4), 0.1).fill_diagonal_(1.0)
    budgets = allocate_budgets({"a": redundant, "b": distinct}, total_heads=5)
    assert budgets == {"a": [0, 0, 0, 0], "b": [0, 1, 2, 3]}
    assert allocate_budgets({"a": redundant, "b": distinct}, total_heads=8)["a"] == [0, 1, 2, 3]


def test_per_layer_budgets_in_a_tiny_transformer():
    torch.manual_seed(0)
    layers = [{"key_map": [0, 0, 0, 0], "value_map": [0, 1, 2, 3]}, {"num_key_heads": 2, "num_value_heads": 3}]
    model = TinyTransformer(vocab_size=10, max_len=8, dim=16, depth=2, num_heads=4, mechanism="dha",
                            layer_options=layers)
    assert [(b.mixer.num_key_heads, b.mixer.num_value_heads) for b in model.blocks] == [(1, 4), (2, 3)]
    assert model.blocks[1].mixer.value_map == [0, 0, 1, 2]
    assert kv_cache_per_layer(model) == [(1 + 4) * 4, (2 + 3) * 4]
    x = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (2, 8, 10)
    assert len(model.attention_maps(x)) == 2


def test_convert_and_collapse_a_model():
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=10, max_len=8, dim=16, depth=2, num_heads=4)
    x = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    groups = [[0, 0, 1, 1], [0, 1, 2, 2]]
    fused = convert_model(model, groups, [[0, 0, 0, 0], [0, 1, 2, 3]], how="fuse")
    model.eval(), fused.eval()
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    assert kv_cache_per_layer(model) == [32, 32] and kv_cache_per_layer(fused) == [(2 + 1) * 4, (3 + 4) * 4]
    collapsed = collapse_model(fused)
    assert all(isinstance(b.mixer, DecoupledHeadAttention) for b in collapsed.blocks)
    assert all(isinstance(b.mixer, MultiHeadAttention) for b in model.blocks)  # the checkpoint is untouched
    assert kv_cache_per_layer(collapsed) == kv_cache_per_layer(fused)


def test_registry_entries():
    for name in ("dha", "dha-fusion"):
        mech = get_mechanism(name)
        assert (mech.paper, mech.lesson, mech.supports_causal) == ("P36", "11", True)
        mixer = build_mechanism(name, 16, 2, causal=True)
        assert mixer(seeded_x(1, 5, 16)).shape == (1, 5, 16)
    assert build_mechanism("dha", 16, 4, causal=True, key_map=[0, 0, 1, 1]).num_key_heads == 2


# --- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param(dict(key_map=[0, 1, 4, 0]), ValueError, "no query head in group", id="key-map-gap"),
    pytest.param(dict(key_map=[0, -1, 0, 0]), ValueError, "out of range", id="key-map-negative"),
    pytest.param(dict(value_map=[0, 1]), ValueError, "one entry per query head", id="value-map-short"),
    pytest.param(dict(value_map=[0.0, 1, 0, 0]), TypeError, "list of ints", id="value-map-float"),
    pytest.param(dict(num_key_heads=5), ValueError, "at most num_heads", id="budget-too-large"),
    pytest.param(dict(num_value_heads=0), ValueError, "num_value_heads", id="budget-zero"),
    pytest.param(dict(key_map=[0, 0, 1, 1], num_key_heads=2), ValueError, "at most one", id="map-and-budget"),
])
def test_module_bad_options(kwargs, error, words):
    with pytest.raises(error, match=words):
        DecoupledHeadAttention(16, 4, **kwargs)


def test_functional_bad_inputs():
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=3, d=4)
    with pytest.raises(ValueError, match=r"key_map: expected head indices in \[0, 2\)"):
        decoupled_head_attention(q, k, v, [0, 1, 2, 0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="value_map: expected one entry per query head"):
        decoupled_head_attention(q, k, v, [0, 0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="k, v: expected the same number of keys"):
        decoupled_head_attention(q, k, v[:, :, :2], [0, 0, 1, 1], [0, 0, 1, 1])


def test_fusion_bad_inputs():
    with pytest.raises(ValueError, match="key_groups: expected one entry per query head"):
        FusingHeadAttention(16, 4, key_groups=[0, 0, 1])
    with pytest.raises(ValueError, match="fusion_weight"):
        FusingHeadAttention(16, 4, fusion_weight=-1.0)
    with pytest.raises(ValueError, match="omega_init"):
        FusingHeadAttention(16, 4, omega_init="random")
    with pytest.raises(ValueError, match="expected multi-head attention"):
        FusingHeadAttention.from_attention(MultiHeadAttention(16, 4, num_kv_heads=2), key_groups=[0, 0, 1, 1],
                                           value_groups=[0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"omega: expected shape \(3, 3\)"):
        fuse_heads(torch.randn(3, 2, 2), torch.eye(2), [0, 0, 1])
    with pytest.raises(ValueError, match="num_groups: expected at most 3"):
        cluster_heads(torch.eye(3), 4)
    with pytest.raises(ValueError, match="total_heads: expected from 2"):
        allocate_budgets({"a": torch.eye(2), "b": torch.eye(2)}, 5)
    with pytest.raises(ValueError, match="x, y: expected the same number of rows"):
        linear_cka(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(TypeError, match="x, y: expected one dtype"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64))
    model = TinyTransformer(vocab_size=10, max_len=8, dim=16, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="key_groups: expected one grouping per layer"):
        convert_model(model, [[0, 0, 1, 1]], [[0, 0, 1, 1]] * 2)
    with pytest.raises(ValueError, match="how"):
        convert_model(model, [[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]] * 2, how="max")
    with pytest.raises(ValueError, match="num_heads"):
        head_weights(nn.Linear(4, 6), 4)
