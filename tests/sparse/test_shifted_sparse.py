"""Lesson 43: shifted sparse attention, sink tokens and H2O eviction (attnlib.sparse.shifted_sparse).

Masks against brute-force loops over (head, query, key) written from the definitions; masked attention
against the float64 loop oracle; the grouped O(N G) computation (Algorithm 1, and the padded segment
version) against the masked one; the invariants (one group = causal attention on the unshifted heads,
the two versions differ exactly on the wrap rows, the segment version is causal and the roll version
leaks the future, sinks are seen by every query, H2O keeps exactly its budget and never evicts the
recent window); the modules in the tiny transformer; gradients; bad inputs.
"""

import pytest
import torch

from attnlib import TinyTransformer, attention, attention_naive, build_mechanism
from attnlib.masks import causal_mask
from attnlib.sparse.shifted_sparse import (
    HeavyHitterAttention,
    ShiftedSparseAttention,
    default_group_size,
    h2o_attention,
    h2o_mask,
    kept_mass,
    s2_attention,
    s2_attention_grouped,
    s2_mask,
    sf_mask,
    sink_mask,
)

from ..helpers import make_qkv

CASES = [(8, 4, 2), (12, 4, 4), (12, 6, 3), (10, 2, 2), (9, 3, 1), (10, 10, 2)]  # (N, G, heads)


# --- brute-force definitions ------------------------------------------------------------------------


def brute_force_s2_mask(n, g, heads, version, causal, num_sinks=0):
    """Loops over (head, query, key) that follow the definitions word for word (ints only, no tensors)."""
    s = g // 2
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        shifted = h >= heads // 2
        if shifted and version == "segment":
            bounds = [0] + list(range(s, n, g)) + [n]  # segments [0, s), [s, s + G), ..., [N - G + s, N)
            segment = {t: idx for idx in range(len(bounds) - 1) for t in range(bounds[idx], bounds[idx + 1])}
        for i in range(n):
            for j in range(n):
                if shifted and version == "roll":
                    # where tokens i and j sit after rolling the sequence left by s
                    ri, rj = (i - s) % n, (j - s) % n
                    ok = ri // g == rj // g and (not causal or rj <= ri)
                elif shifted:
                    ok = segment[i] == segment[j] and (not causal or j <= i)
                else:
                    ok = i // g == j // g and (not causal or j <= i)
                if j < num_sinks and (not causal or j <= i):
                    ok = True
                out[h, i, j] = ok
    return out


def brute_force_h2o_mask(scores, budget, recent):
    """One (batch, head) at a time, with a Python set as the cache and float64 softmax by hand."""
    b, h, n, _ = scores.shape
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            cache, score = [], [0.0] * n
            for t in range(n):
                cache.append(t)
                if len(cache) > budget:
                    old = [j for j in cache if j <= t - recent]
                    victim = min(old, key=lambda j: (score[j], j))
                    cache.remove(victim)
                for j in cache:
                    out[bb, hh, t, j] = True
                logits = torch.tensor([float(scores[bb, hh, t, j]) for j in cache], dtype=torch.float64)
                p = torch.softmax(logits, 0)
                for j, pj in zip(cache, p.tolist()):
                    score[j] += pj
    return out


# --- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["segment", "roll"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n, g, heads", CASES, ids=[f"N{n}-G{g}-H{h}" for n, g, h in CASES])
def test_s2_mask_matches_brute_force(n, g, heads, version, causal):
    assert torch.equal(s2_mask(n, heads, g, version=version, causal=causal),
                       brute_force_s2_mask(n, g, heads, version, causal))


@pytest.mark.parametrize("num_sinks", [1, 3])
def test_sf_mask_is_segment_mask_plus_causal_sinks(num_sinks):
    got = sf_mask(12, 4, 4, num_sinks=num_sinks)
    assert torch.equal(got, brute_force_s2_mask(12, 4, 4, "segment", True, num_sinks=num_sinks))
    # every query sees every sink at or before it, in every head
    for i in range(12):
        assert got[:, i, :min(num_sinks, i + 1)].all()
    assert not (got & ~causal_mask(12)).any()


def test_sink_mask_columns():
    m = sink_mask(6, 2)
    assert m[:, 0].all() and m[1:, 1].all() and not m[0, 1] and not m[:, 2:].any()
    assert sink_mask(6, 2, causal=False)[:, :2].all()
    assert not sink_mask(6, 0).any()


def test_one_group_segment_version_is_causal_attention_on_unshifted_heads():
    n, heads = 10, 4
    masks = s2_mask(n, heads, n, version="segment")
    assert torch.equal(masks[:heads // 2], causal_mask(n).expand(heads // 2, n, n))
    # the shifted heads see two causal halves [0, s) and [s, N)
    s = n // 2
    assert not masks[heads // 2:, s:, :s].any() and masks[heads // 2:, s:, s:].sum() == s * (s + 1) // 2 * (heads // 2)
    q, k, v = make_qkv(hq=heads, lq=n, dtype=torch.float64, seed=1)
    got = s2_attention(q, k, v, group_size=n)
    assert torch.allclose(got[:, :heads // 2], attention(q, k, v, causal=True)[:, :heads // 2], atol=1e-12)


@pytest.mark.parametrize("n, g", [(12, 4), (12, 6), (16, 4), (10, 2), (9, 3)])
def test_versions_agree_outside_the_wrap_rows_and_differ_inside(n, g):
    s = g // 2
    seg, roll = s2_mask(n, 2, g, version="segment"), s2_mask(n, 2, g, version="roll")
    assert torch.equal(seg[0], roll[0])  # unshifted head: identical
    assert torch.equal(seg[1, s:], roll[1, s:])  # shifted head, every row from s on
    for i in range(s):  # the first s rows: the roll version also sees the last G - s tokens
        extra = roll[1, i] & ~seg[1, i]
        assert extra.nonzero().flatten().tolist() == list(range(n - g + s, n))
        assert not (seg[1, i] & ~roll[1, i]).any()
    q, k, v = make_qkv(lq=n, dtype=torch.float64, seed=2)
    a, b = s2_attention(q, k, v, group_size=g), s2_attention(q, k, v, group_size=g, version="roll")
    assert torch.allclose(a[:, :, s:], b[:, :, s:], atol=1e-12)
    assert not torch.allclose(a[:, 1, :s], b[:, 1, :s])


def test_segment_version_is_causal_roll_version_leaks_the_future():
    n, g = 12, 4
    q, k, v = make_qkv(hq=2, lq=n, dtype=torch.float64, seed=3)
    for version, leaks in (("segment", False), ("roll", True)):
        base = s2_attention(q, k, v, group_size=g, version=version)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, -1] += 1.0  # change only the LAST token's key and value
        v2[:, :, -1] += 1.0
        changed = s2_attention(q, k2, v2, group_size=g, version=version)
        past_moved = not torch.allclose(changed[:, :, :-1], base[:, :, :-1], atol=1e-12)
        assert past_moved == leaks, version
    # the leak sits exactly in the first s = G/2 outputs of the shifted head
    moved = (changed - base).abs().amax(-1)[0]
    assert moved[0, :-1].max() == 0 and (moved[1, :g // 2] > 0).all() and moved[1, g // 2:-1].max() == 0


@pytest.mark.parametrize("n", [10, 12, 15, 16, 7])
def test_default_group_size_divides_and_follows_n_over_4(n):
    g = default_group_size(n)
    assert n % g == 0
    if n % 4 == 0:
        assert g == n // 4
    assert g == n or 2 <= g <= max(2, n // 4)
    assert not any(n % d == 0 for d in range(g + 1, max(2, n // 4) + 1))  # the largest such divisor
    assert default_group_size(7) == 7 and default_group_size(10) == 2


# --- attention --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["segment", "roll"])
def test_s2_attention_matches_the_loop_oracle(version):
    q, k, v = make_qkv(b=2, hq=4, lq=12, d=8, dtype=torch.float64, seed=4)
    mask = brute_force_s2_mask(12, 4, 4, version, True, num_sinks=2)
    want = attention_naive(q, k, v, mask=mask[None])
    got = s2_attention(q, k, v, group_size=4, version=version, num_sinks=2)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("version", ["segment", "roll"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n, g, heads", [(12, 4, 4), (12, 3, 2), (8, 8, 2), (10, 2, 1)])
def test_grouped_computation_equals_masked_attention(n, g, heads, version, causal):
    q, k, v = make_qkv(b=2, hq=heads, lq=n, d=8, dtype=torch.float64, seed=5)
    want = s2_attention(q, k, v, group_size=g, version=version, causal=causal)
    got = s2_attention_grouped(q, k, v, group_size=g, version=version, causal=causal)
    assert torch.allclose(got, want, atol=1e-12)


def test_weights_rows_sum_to_one_inside_the_mask():
    q, k, v = make_qkv(hq=2, lq=10, dtype=torch.float64, seed=6)
    _, w = s2_attention(q, k, v, num_sinks=1, return_weights=True)
    mask = s2_mask(10, 2, num_sinks=1)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 10, dtype=torch.float64))
    assert (w[0][~mask] == 0).all()


# --- H2O --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget, recent", [(4, 2), (3, 1), (5, 5), (1, 1), (6, None)])
def test_h2o_mask_matches_brute_force(budget, recent):
    scores = torch.randn(2, 2, 11, 11, generator=torch.Generator().manual_seed(budget), dtype=torch.float64) * 2
    r = -(-budget // 2) if recent is None else recent
    assert torch.equal(h2o_mask(scores, budget, recent), brute_force_h2o_mask(scores, budget, r))


@pytest.mark.parametrize("budget, recent", [(4, 2), (5, 1), (3, 3)])
def test_h2o_keeps_exactly_the_budget_and_the_recent_window(budget, recent):
    n = 14
    scores = torch.randn(1, 3, n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    mask = h2o_mask(scores, budget, recent)
    sizes = mask.sum(-1)
    assert torch.equal(sizes, torch.tensor([min(t + 1, budget) for t in range(n)]).expand(1, 3, n))
    for t in range(n):
        assert mask[..., t, max(0, t - recent + 1):t + 1].all()  # recent window kept
    assert not (mask & ~causal_mask(n)).any()  # causal
    # an evicted key never comes back
    for t in range(1, n):
        assert not (mask[..., t, :t] & ~mask[..., t - 1, :t]).any()


def test_h2o_with_budget_at_least_n_is_causal_attention():
    q, k, v = make_qkv(hq=2, lq=8, dtype=torch.float64, seed=8)
    assert torch.allclose(h2o_attention(q, k, v, budget=8), attention(q, k, v, causal=True), atol=1e-12)


def test_h2o_from_log_weights_equals_from_scores():
    q, k, v = make_qkv(hq=2, lq=12, dtype=torch.float64, seed=9)
    scores = torch.matmul(q, k.transpose(-2, -1)) / 4.0
    _, w = attention(q, k, v, causal=True, return_weights=True)
    assert torch.equal(h2o_mask(scores, 5, 2), h2o_mask(w.log(), 5, 2))


def test_kept_mass_of_full_and_empty_masks():
    q, k, v = make_qkv(hq=2, lq=10, dtype=torch.float64, seed=10)
    _, w = attention(q, k, v, causal=True, return_weights=True)
    assert torch.allclose(kept_mass(w, causal_mask(10)), torch.ones(1, 2, 10, dtype=torch.float64))
    assert (kept_mass(w, torch.zeros(10, 10, dtype=torch.bool)) == 0).all()
    m = s2_mask(10, 2)
    assert torch.allclose(kept_mass(w, m[None]), (w * m).sum(-1))
    assert (kept_mass(w, m[None]) <= 1 + 1e-12).all()


# --- modules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", [("s2-attn", {}), ("s2-attn", {"group_size": 5}), ("sink-attn", {}),
                                           ("h2o-attn", {"budget": 3})])
def test_mechanisms_are_causal_in_the_tiny_transformer(name, options):
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=11, max_len=10, dim=16, depth=2, num_heads=2, mechanism=name,
                            mechanism_options=options).eval()
    x = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        for t in range(9):
            x2 = x.clone()
            x2[:, t + 1:] = (x2[:, t + 1:] + 1) % 11
            assert torch.allclose(model(x2)[:, :t + 1], y[:, :t + 1], atol=1e-6)


def test_roll_module_leaks_when_allowed():
    torch.manual_seed(0)
    mixer = ShiftedSparseAttention(16, 2, group_size=4, version="roll", allow_leak=True).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mixer(x)[:, 0], mixer(x2)[:, 0])


def test_module_equals_function_and_shares_parameters_with_mha():
    torch.manual_seed(0)
    mha = build_mechanism("mha", 16, 2, causal=True).double()
    sf = build_mechanism("sink-attn", 16, 2, causal=True, num_sinks=2).double()
    sf.load_state_dict(mha.state_dict())  # the same parameter names: swap patterns in a trained model
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    q, k, v = (mha.split_heads(p(x), 2) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    want = s2_attention(q, k, v, num_sinks=2).transpose(1, 2).reshape(2, 12, 16)
    assert torch.allclose(sf(x), mha.out_proj(want), atol=1e-12)
    h2o = HeavyHitterAttention(16, 2, budget=4).double()
    h2o.load_state_dict(mha.state_dict())
    want = h2o_attention(q, k, v, budget=4).transpose(1, 2).reshape(2, 12, 16)
    assert torch.allclose(h2o(x), mha.out_proj(want), atol=1e-12)


@pytest.mark.parametrize("version, num_sinks", [("segment", 0), ("segment", 2), ("roll", 0)],
                         ids=["s2-segment", "sf-sinks", "s2-roll"])
def test_block_sparse_kernel_backend_equals_the_reference(version, num_sinks):
    # the pattern differs per head (half the heads are shifted): the kernel follows each head's block lists
    torch.manual_seed(0)
    reference = ShiftedSparseAttention(64, 2, group_size=12, version=version, num_sinks=num_sinks, allow_leak=True)
    kernel = ShiftedSparseAttention(64, 2, group_size=12, version=version, num_sinks=num_sinks, allow_leak=True,
                                    backend="kernel")
    kernel.load_state_dict(reference.state_dict())
    x = torch.randn(2, 48, 64)
    x_ref, x_ker = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = reference(x_ref), kernel(x_ker)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    assert torch.allclose(x_ker.grad, x_ref.grad, atol=1e-4), (x_ker.grad - x_ref.grad).abs().max()
    for name, p in kernel.named_parameters():
        assert torch.allclose(p.grad, dict(reference.named_parameters())[name].grad, atol=1e-4), name
    with pytest.raises(ValueError, match="return_weights"):
        kernel(x, return_weights=True)


# --- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["segment", "roll"])
def test_gradcheck_masked_and_grouped(version):
    q, k, v = make_qkv(hq=2, lq=6, d=3, dtype=torch.float64, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: s2_attention(a, b, c, group_size=3, version=version,
                                                                 num_sinks=1), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: s2_attention_grouped(a, b, c, group_size=3, version=version),
                                    (q, k, v))


def test_gradcheck_h2o_through_the_kept_keys():
    q, k, v = make_qkv(hq=2, lq=7, d=3, dtype=torch.float64, seed=12, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: h2o_attention(a, b, c, budget=3), (q, k, v))


# --- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, error, words", [
    (lambda: s2_mask(10, 2, 4), ValueError, ["group_size", "divisor", "10", "4"]),
    (lambda: s2_mask(10, 2, 0), ValueError, ["group_size", "positive int", "0"]),
    (lambda: s2_mask(8, 2, 4, version="wrap"), ValueError, ["version", "segment", "wrap"]),
    (lambda: s2_mask(8, 0, 4), ValueError, ["num_heads", "0"]),
    (lambda: s2_mask(8, 2, 4, num_sinks=-1), ValueError, ["num_sinks", "-1"]),
    (lambda: s2_mask(8, 2, 4, causal=1), TypeError, ["causal", "bool", "int"]),
    (lambda: s2_attention(*make_qkv(lq=8)[:1], *make_qkv(lq=6)[1:]), ValueError, ["k", "6"]),
    (lambda: h2o_mask(torch.zeros(1, 1, 4, 4), 0), ValueError, ["budget", "0"]),
    (lambda: h2o_mask(torch.zeros(1, 1, 4, 4), 3, 4), ValueError, ["recent", "1 to budget=3", "4"]),
    (lambda: h2o_mask(torch.zeros(1, 4, 4), 3), ValueError, ["scores", "4-d"]),
    (lambda: h2o_mask(torch.zeros(1, 1, 4, 5), 3), ValueError, ["scores", "square", "(1, 1, 4, 5)"]),
    (lambda: build_mechanism("s2-attn", 16, 2, causal=True, version="roll"), ValueError, ["version", "roll", "causal"]),
    (lambda: build_mechanism("sink-attn", 16, 2, causal=True, version="roll"), ValueError, ["version", "segment"]),
    (lambda: build_mechanism("h2o-attn", 16, 2, causal=False), ValueError, ["causal", "True"]),
    (lambda: ShiftedSparseAttention(16, 2, group_size=4)(torch.zeros(1, 10, 16)), ValueError, ["group_size", "10"]),
    (lambda: ShiftedSparseAttention(16, 2, backend="flash"), ValueError, ["backend", "'kernel'", "'flash'"]),
], ids=["G-not-dividing-N", "G-zero", "bad-version", "no-heads", "negative-sinks", "causal-not-bool",
        "q-k-lengths-differ", "budget-zero", "recent-over-budget", "scores-3d", "scores-not-square", "roll-in-causal-model",
        "sink-roll", "h2o-bidirectional", "module-G-not-dividing", "unknown-backend"])
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
