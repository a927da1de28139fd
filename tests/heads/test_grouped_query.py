"""Lesson 10: grouped-query attention, mean-pooled uptraining, and KDGQA, DGQA, PGQA (P11)."""

import math

import pytest
import torch

from attnlib import MultiHeadAttention, TinyTransformer, attention, build_mechanism, get_mechanism
from attnlib.heads.grouped_query import (
    KeyDrivenGroupedAttention,
    dgqa_allocation,
    dgqa_ratios,
    grouped_attention,
    kdgqa_allocation,
    key_norms,
    kv_cache_bytes,
    kv_head_of_query,
    mean_pool_heads,
    mean_pooled_state,
    pgqa_noise,
    uniform_allocation,
    uptrain_init,
)


def loop_grouped_attention(q, k, v, allocation, causal=False):
    """The oracle: float64 loops, group by group, as the official code splits the query heads."""
    q, k, v = q.double(), k.double(), v.double()
    b, _, length, d = q.shape
    out = torch.zeros_like(q)
    h = 0
    for j, count in enumerate(allocation.tolist()):
        for _ in range(count):
            for n in range(b):
                for r in range(length):
                    keys = range(r + 1) if causal else range(length)
                    scores = torch.stack([q[n, h, r] @ k[n, j, c] / math.sqrt(d) for c in keys])
                    weights = torch.softmax(scores, 0)
                    out[n, h, r] = sum(w * v[n, j, c] for w, c in zip(weights, keys))
            h += 1
    return out


def qkv(b=2, h=4, g=2, length=5, d=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=gen, dtype=dtype),
            torch.randn(b, g, length, d, generator=gen, dtype=dtype),
            torch.randn(b, g, length, d, generator=gen, dtype=dtype))


def same_weights_mha(module: KeyDrivenGroupedAttention) -> MultiHeadAttention:
    mha = MultiHeadAttention(module.dim, module.num_heads, num_kv_heads=module.num_kv_heads, causal=module.causal)
    mha.load_state_dict({n: p for n, p in module.state_dict().items() if "_proj" in n})
    return mha.to(module.q_proj.weight.dtype)


# --- grouped attention against the oracle -----------------------------------------------------------


@pytest.mark.parametrize("allocation", [[2, 2], [4, 0], [1, 3], [0, 4]], ids=["uniform", "4-0", "1-3", "0-4"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grouped_attention_matches_loops(allocation, causal):
    q, k, v = qkv()
    allocation = torch.tensor(allocation)
    got = grouped_attention(q, k, v, allocation, causal=causal)
    torch.testing.assert_close(got, loop_grouped_attention(q, k, v, allocation, causal))


def test_uniform_allocation_is_the_core_gqa_path():
    q, k, v = qkv(h=6, g=3)
    torch.testing.assert_close(grouped_attention(q, k, v, uniform_allocation(6, 3)), attention(q, k, v))
    assert kv_head_of_query(torch.tensor([2, 0, 1])).tolist() == [0, 0, 2]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_with_as_many_groups_as_heads_is_mha(causal):
    torch.manual_seed(0)
    gqa = build_mechanism("gqa", 16, 4, causal=causal, num_kv_heads=4).double()
    mha = same_weights_mha(gqa)
    assert mha.num_kv_heads == mha.num_heads == 4
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x))


def test_gqa_with_one_group_is_mqa():
    torch.manual_seed(1)
    gqa = build_mechanism("gqa", 16, 4, causal=True, num_kv_heads=1).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    q = gqa.split_heads(gqa.q_proj(x), 4)
    k, v = gqa.split_heads(gqa.k_proj(x), 1), gqa.split_heads(gqa.v_proj(x), 1)
    # MQA: every query head against the one shared key/value head, via broadcasting
    mqa = torch.softmax((q @ k.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(),
                                                                       float("-inf")), -1) @ v
    want = gqa.out_proj(mqa.transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(gqa(x), want)


def test_default_number_of_kv_heads():
    assert build_mechanism("gqa", 16, 2).num_kv_heads == 1
    assert build_mechanism("kdgqa", 24, 6).num_kv_heads == 3  # H // 2, the official code's default
    for name in ("gqa", "kdgqa", "dgqa", "pgqa"):
        mechanism = get_mechanism(name)
        assert mechanism.paper == "P11" and mechanism.lesson == "10"


# --- uptraining: mean-pooling ---------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_mean_pool_is_the_explicit_mean(groups):
    heads, d, dim = 4, 3, 5
    weight = torch.randn(heads * d, dim, dtype=torch.float64)
    bias = torch.randn(heads * d, dtype=torch.float64)
    size = heads // groups
    for param in (weight, bias):
        pooled = mean_pool_heads(param, heads, groups)
        assert pooled.shape == (groups * d, *param.shape[1:])
        for j in range(groups):
            members = [param[h * d:(h + 1) * d] for h in range(j * size, (j + 1) * size)]
            torch.testing.assert_close(pooled[j * d:(j + 1) * d], sum(members) / size)


def test_mean_pooled_state_keeps_queries_and_shapes_of_a_gqa_model():
    torch.manual_seed(0)
    mha = TinyTransformer(vocab_size=7, max_len=6, dim=16, depth=2, num_heads=4)
    gqa = TinyTransformer(vocab_size=7, max_len=6, dim=16, depth=2, num_heads=4, mechanism="gqa",
                          mechanism_options={"num_kv_heads": 2})
    state = mean_pooled_state(mha.state_dict(), 4, 2)
    target = gqa.state_dict()
    for name, value in state.items():
        assert value.shape == target[name].shape, name
        if "k_proj" not in name and "v_proj" not in name:
            assert torch.equal(value, mha.state_dict()[name]), name
    uptrain_init(mha, gqa)
    torch.testing.assert_close(gqa.blocks[1].mixer.v_proj.weight,
                               mean_pool_heads(mha.blocks[1].mixer.v_proj.weight, 4, 2))


def test_uptraining_with_as_many_groups_as_heads_changes_nothing():
    torch.manual_seed(0)
    mha = TinyTransformer(vocab_size=7, max_len=6, dim=16, depth=2, num_heads=4)
    gqa = uptrain_init(mha, TinyTransformer(vocab_size=7, max_len=6, dim=16, depth=2, num_heads=4,
                                            mechanism="gqa", mechanism_options={"num_kv_heads": 4}))
    x = torch.randint(0, 7, (3, 6))
    torch.testing.assert_close(gqa(x), mha(x))


def test_kv_cache_bytes_scale_with_the_groups():
    full = kv_cache_bytes(num_layers=2, num_kv_heads=8, head_dim=16, seq_len=100)
    assert full == 2 * 2 * 8 * 16 * 100 * 2
    assert kv_cache_bytes(num_layers=2, num_kv_heads=2, head_dim=16, seq_len=100) * 4 == full


# --- KDGQA ------------------------------------------------------------------------------------------------


def allocation_by_the_rules(norms, heads):
    """KDGQA's rules in plain Python floats (Python's round is half-to-even, like torch.round)."""
    low, high = min(norms), max(norms)
    scaled = [(n - low) / (high - low) for n in norms]
    alloc = [round(s / sum(scaled) * heads) for s in scaled]  # the official order: divide, then times H
    while sum(alloc) > heads:
        alloc[alloc.index(max(alloc))] -= 1
    while sum(alloc) < heads:
        alloc[alloc.index(min(alloc))] += 1
    return alloc


@pytest.mark.parametrize("norms,heads", [
    ([1.0, 2.0, 3.0], 6),         # exact: 0, 2, 4
    ([1.0, 3.0, 3.0, 2.0], 4),    # 0, 1.6, 1.6, 0.8 -> 0, 2, 2, 1: one too many, the first largest loses
    ([5.0, 1.0, 2.0, 2.0], 8),    # 5.33, 0, 1.33, 1.33 -> 5, 0, 1, 1: one too few, the smallest (0) gains
    ([1.0, 2.0, 2.0, 2.0, 2.0], 10),  # 0, 2.5 x 4 -> 0, 2, 2, 2, 2 (half to even): the weakest gains twice
    ([2.0, 7.0], 12),             # two groups: the weaker gets nothing
    ([23.0, 12.0, 25.0], 12),     # 5.5, 0, 6.5 up to float64 rounding: the order of the operations decides
])
def test_kdgqa_allocation_follows_the_rules(norms, heads):
    got = kdgqa_allocation(torch.tensor(norms, dtype=torch.float64), heads)
    assert got.tolist() == allocation_by_the_rules(norms, heads)
    assert int(got.sum()) == heads and (got >= 0).all()


def test_kdgqa_fix_ups_go_to_the_first_extreme():
    assert kdgqa_allocation(torch.tensor([1.0, 3.0, 3.0, 2.0]), 4).tolist() == [0, 1, 2, 1]
    assert kdgqa_allocation(torch.tensor([5.0, 1.0, 2.0, 2.0]), 8).tolist() == [5, 1, 1, 1]
    assert kdgqa_allocation(torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0]), 10).tolist() == [2, 2, 2, 2, 2]
    # the weakest group gets zero from min-max when no fix-up is needed
    assert kdgqa_allocation(torch.tensor([4.0, 1.0, 2.5]), 6).tolist() == [4, 0, 2]


def test_kdgqa_rounds_in_the_official_order_at_a_tie():
    # (m~ / sum m~) * H rounds 5.5 and 6.5 to [6, 0, 6] in float64; H * m~ / sum m~ would give [5, 1, 6]
    assert kdgqa_allocation(torch.tensor([23.0, 12.0, 25.0], dtype=torch.float64), 12).tolist() == [6, 0, 6]


@pytest.mark.parametrize("norms, words", [
    ([1.0, float("nan"), 2.0], "norms: expected finite key norms"),
    ([1.0, float("inf")], "norms: expected finite key norms"),
    ([], "norms: expected one norm per key/value head, got none"),
], ids=["nan", "inf", "empty"])
def test_kdgqa_refuses_norms_it_cannot_allocate_from(norms, words):
    with pytest.raises(ValueError, match=words):
        kdgqa_allocation(torch.tensor(norms), 4)


def test_kdgqa_equal_norms_give_an_even_split():
    assert kdgqa_allocation(torch.tensor([2.0, 2.0]), 4).tolist() == [2, 2]
    assert kdgqa_allocation(torch.tensor([3.0]), 4).tolist() == [4]


def test_key_norms_sum_frobenius_norms_over_the_batch():
    _, k, _ = qkv()
    want = torch.stack([sum(torch.sqrt((k[b, j] ** 2).sum()) for b in range(2)) for j in range(2)])
    torch.testing.assert_close(key_norms(k), want)


def test_kdgqa_module_uses_this_batchs_allocation_and_is_deterministic():
    torch.manual_seed(0)
    module = build_mechanism("kdgqa", 24, 6, num_kv_heads=3).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    out = module(x)
    k = module.split_heads(module.k_proj(x), 3)
    allocation = kdgqa_allocation(key_norms(k), 6)
    assert module.allocation.tolist() == allocation.tolist()
    q, v = module.split_heads(module.q_proj(x), 6), module.split_heads(module.v_proj(x), 3)
    heads = loop_grouped_attention(q.detach(), k.detach(), v.detach(), allocation)
    torch.testing.assert_close(out, module.out_proj(heads.transpose(1, 2).reshape(2, 5, 24)))
    torch.testing.assert_close(module(x), out, rtol=0, atol=0)  # same batch, same answer


def test_kdgqa_depends_on_the_batch_and_on_future_tokens():
    torch.manual_seed(0)
    module = build_mechanism("kdgqa", 16, 4, num_kv_heads=2)
    with torch.no_grad():  # key head 0 reads input dims 0..7 only, key head 1 dims 8..15 only
        module.k_proj.weight[:4, 8:] = 0.0
        module.k_proj.weight[4:, :8] = 0.0
    x = torch.randn(1, 6, 16)
    x[..., 8:] = 0.0
    out = module(x)
    assert module.allocation.tolist() == [4, 0]  # two groups: the weaker one always gets none
    y = x.clone()
    y[:, -1, 8:] = 10.0  # one late token with a large key in head 1
    changed = module(y)
    assert module.allocation.tolist() == [0, 4]
    assert not torch.allclose(changed[:, 0], out[:, 0])  # the first position saw the last token's key
    with pytest.raises(ValueError, match="cannot run causally"):
        build_mechanism("kdgqa", 16, 4, causal=True)


def test_kdgqa_gradients_through_a_fixed_allocation():
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=3, g=2, length=3, d=2))
    assert torch.autograd.gradcheck(lambda a, b_, c: grouped_attention(a, b_, c, torch.tensor([1, 2])), (q, k, v))


# --- DGQA -------------------------------------------------------------------------------------------------


def test_dgqa_ratios_in_both_modes():
    m, c = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 2.0])
    assert dgqa_ratios(m, c, "diff").tolist() == [2.0, 1.0, 0.0]
    torch.testing.assert_close(dgqa_ratios(m, c, "ema"), torch.tensor([2.8, 1.1, 2.0]))


def test_dgqa_allocation_is_reproducible_and_sums_to_h():
    ratios = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # 6 * 0.2 = 1.2 -> 1 each: one head short, random
    draws = [dgqa_allocation(ratios, 6, torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    again = [dgqa_allocation(ratios, 6, torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    assert draws == again
    assert all(sum(d) == 6 and min(d) >= 1 for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the extra head goes to a random group
    over = dgqa_allocation(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, torch.Generator().manual_seed(0))
    assert int(over.sum()) == 2 and (over >= 0).all() and over[2] == 0  # 0.67 -> 1, 1, 0, 1: one too many


def test_dgqa_updates_every_window_with_the_codes_cache_rule():
    torch.manual_seed(0)
    module = build_mechanism("dgqa", 16, 4, num_kv_heads=2, window=3, seed=5).train()
    xs = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    allocations = []
    cache = torch.zeros(2)
    gen = torch.Generator().manual_seed(5)
    for step, x in enumerate(xs):
        before = module.allocation.clone()
        module(x)
        allocations.append(module.allocation.tolist())
        if step % 3 == 0:
            m = key_norms(module.split_heads(module.k_proj(x), 2)).detach()
            want = dgqa_allocation((cache - m).abs(), 4, gen)
            cache = (cache + m) / 3
            assert module.allocation.tolist() == want.tolist()
        else:
            assert module.allocation.tolist() == before.tolist()
        torch.testing.assert_close(module.cache, cache)
    twin = build_mechanism("dgqa", 16, 4, num_kv_heads=2, window=3, seed=5).train()
    twin.load_state_dict({n: p for n, p in module.state_dict().items() if "_proj" in n}, strict=False)
    assert [twin(x) is not None and twin.allocation.tolist() for x in xs] == allocations


def test_dgqa_in_eval_recomputes_from_each_batch_and_caches_the_magnitudes():
    torch.manual_seed(0)
    module = build_mechanism("dgqa", 16, 4, num_kv_heads=2, mode="ema").eval()
    x = torch.randn(2, 5, 16)
    module(x)
    m = key_norms(module.split_heads(module.k_proj(x), 2)).detach()
    torch.testing.assert_close(module.cache, m)
    assert int(module.allocation.sum()) == 4


# --- PGQA -------------------------------------------------------------------------------------------------


def test_pgqa_noise_matches_each_output_rows_mean_and_unbiased_std():
    outputs = torch.randn(3, 2, 10, dtype=torch.float64) * 2 + 1
    noise = pgqa_noise(outputs, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.mean(-1), outputs.mean(-1))
    torch.testing.assert_close(noise.std(-1), outputs.std(-1))  # unbiased, as torch.std by default
    pattern = (noise - outputs.mean(-1, keepdim=True)) / outputs.std(-1, keepdim=True)
    torch.testing.assert_close(pattern[1], pattern[0])  # one raw draw for the whole batch
    # raw entries are uniform in [0, 1) except the zeroed (r, r): after an affine map, the row minimum
    assert pattern[0].argmin(-1).tolist() == [0, 1]


def test_pgqa_noise_is_seeded_and_fresh_on_every_call():
    outputs = torch.randn(1, 2, 8)
    gen = torch.Generator().manual_seed(3)
    first, second = pgqa_noise(outputs, gen), pgqa_noise(outputs, gen)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(pgqa_noise(outputs, torch.Generator().manual_seed(3)), first)


def test_pgqa_module_subtracts_the_noise_from_gqa_also_in_eval():
    torch.manual_seed(0)
    pgqa = build_mechanism("pgqa", 16, 4, num_kv_heads=2, seed=7).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q = pgqa.split_heads(pgqa.q_proj(x), 4)
    k, v = pgqa.split_heads(pgqa.k_proj(x), 2), pgqa.split_heads(pgqa.v_proj(x), 2)
    clean = loop_grouped_attention(q, k, v, torch.tensor([2, 2]))
    gen = torch.Generator().manual_seed(7)
    noisy = torch.cat([g - pgqa_noise(g.reshape(2, 2, 20), gen).view_as(g) for g in clean.split(2, dim=1)], 1)
    out = pgqa(x)
    torch.testing.assert_close(out, pgqa.out_proj(noisy.transpose(1, 2).reshape(2, 5, 16)))
    assert not torch.allclose(pgqa(x), out)  # redrawn on every call, even in eval
    pgqa.reset_randomness()
    torch.testing.assert_close(pgqa(x), out)


# --- flash kernel, gradients, bad inputs ---------------------------------------------------------------


def test_gqa_layer_through_the_flash_kernel():
    torch.manual_seed(0)
    reference = build_mechanism("gqa", 32, 2, causal=True, num_kv_heads=1)
    flash = build_mechanism("gqa", 32, 2, causal=True, num_kv_heads=1, backend="kernel")
    flash.load_state_dict(reference.state_dict())
    x = torch.randn(1, 16, 32)
    torch.testing.assert_close(flash(x), reference(x), atol=1e-5, rtol=1e-4)


def test_gqa_module_gradcheck():
    torch.manual_seed(0)
    module = build_mechanism("gqa", 8, 4, causal=True, num_kv_heads=2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


@pytest.mark.parametrize("make,error,words", [
    (lambda: build_mechanism("gqa", 16, 4, num_kv_heads=3), ValueError, "num_kv_heads: expected a divisor"),
    (lambda: build_mechanism("gqa", 16, 4, num_kv_heads=8), ValueError, "num_kv_heads: expected at most"),
    (lambda: KeyDrivenGroupedAttention(16, 4, grouping="random"), ValueError, "grouping: expected one of"),
    (lambda: build_mechanism("dgqa", 16, 4, mode="mean"), ValueError, "mode: expected one of"),
    (lambda: build_mechanism("dgqa", 16, 4, window=0), ValueError, "window: expected a positive int"),
    (lambda: build_mechanism("kdgqa", 32, 2, backend="kernel"), ValueError, "backend: 'kernel' needs"),
    (lambda: build_mechanism("gqa", 16, 4)(torch.randn(2, 16)), ValueError, "x: expected a 3-d tensor"),
    (lambda: build_mechanism("gqa", 16, 4)(torch.randn(1, 3, 8)), ValueError, "x: expected last dim 16"),
    (lambda: grouped_attention(*qkv(), torch.tensor([1, 2])), ValueError, "allocation: expected 2 counts"),
    (lambda: kv_head_of_query(torch.tensor([2, -1])), ValueError, "allocation: expected counts >= 0"),
    (lambda: mean_pool_heads(torch.randn(10, 4), 4, 2), ValueError, "param: expected a weight"),
    (lambda: dgqa_allocation(torch.ones(2), 4, None), TypeError, "generator: expected a torch.Generator"),
])
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error, match=words):
        make()


@pytest.mark.parametrize("allocation, error, words", [
    ([2, 2], TypeError, "allocation: expected a torch.Tensor, got list"),
    (torch.tensor([2.0, 2.0]), TypeError, "allocation: expected an integer tensor"),
    (torch.tensor([5, -1]), ValueError, "allocation: expected 2 counts"),
], ids=["list", "float", "negative"])
def test_grouped_attention_names_a_bad_allocation(allocation, error, words):
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(error, match=words):
        grouped_attention(q, k, k, allocation)


def test_dgqa_rounds_in_the_official_order_at_a_tie():
    # the KDGQA tie of [23, 12, 25] as DGQA shares: (r / sum r) * H gives 5.5 and 6.5 -> [6, 0, 6], no fix-up
    shares = (torch.tensor([23.0, 12.0, 25.0], dtype=torch.float64) - 12.0) / 13.0
    got = dgqa_allocation(shares, 12, torch.Generator().manual_seed(0))
    assert got.tolist() == [6, 0, 6]
