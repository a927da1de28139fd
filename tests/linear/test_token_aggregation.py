"""Lesson 32: content-aware token aggregation (CATANet, P13) against float64 loops and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import TinyTransformer
from attnlib.linear.token_aggregation import (
    ContentAwareTokenAggregation,
    attention_cost,
    centre_cross_attention,
    cosine_assign,
    gather_tokens,
    initial_centres,
    intra_group_attention,
    kmeans_step,
    scatter_back,
    sort_by_group,
    subgroup_indices,
)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- naive oracles: loops over tokens, written as the paper and the code describe them ------------------


def loop_assign(x, centres):
    out = torch.zeros(x.shape[:2], dtype=torch.long)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            cos = [float(x[b, t] @ c) / (float(x[b, t].norm()) * float(c.norm())) for c in centres]
            out[b, t] = max(range(len(cos)), key=lambda m: (cos[m], -m))
    return out


def loop_kmeans(x, centres):
    units = [x[b, t] / x[b, t].norm() for b in range(x.shape[0]) for t in range(x.shape[1])]
    old = [c / c.norm() for c in centres]
    new = []
    for m in range(len(old)):
        members = [u for u in units if max(range(len(old)), key=lambda j: (float(u @ old[j]), -j)) == m]
        total = sum(members) if members else None
        new.append(old[m] if total is None else total / total.norm())
    return torch.stack(new)


def loop_windows(n, g, window):
    """The code's padding, written as lists: queries padded by reflecting the tail, keys by reflecting more."""
    g = min(n, g)
    groups = math.ceil(n / g)
    pad = groups * g - n
    seq_q = list(range(n)) + list(range(n - 1, n - 1 - pad, -1))
    seq_k = list(range(n)) + [n - 1 - (i % n) for i in range(pad + g)]
    qs = [seq_q[i * g:(i + 1) * g] for i in range(groups)]
    ks = [seq_k[i * g:i * g + 2 * g] for i in range(groups)] if window == "next" else qs
    return qs, ks


def loop_intra(q, k, v, g, window):
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    qs, ks = loop_windows(n, g, window)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):  # padded queries (reflected copies) are dropped
                keys = ks[i // min(n, g)]
                s = [float(q[bi, hi, i] @ k[bi, hi, j]) / math.sqrt(d) for j in keys]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                out[bi, hi, i] = sum(w / sum(e) * v[bi, hi, j] for w, j in zip(e, keys))
    return out


# --- centres ----------------------------------------------------------------------------------------


def test_cosine_assign_matches_loop_and_ignores_norms():
    x, c = seeded(2, 9, 5, seed=1), seeded(4, 5, seed=2)
    want = loop_assign(x, c)
    assert torch.equal(cosine_assign(x, c), want)
    scales = torch.rand(2, 9, 1, dtype=torch.float64) * 10 + 0.1
    assert torch.equal(cosine_assign(x * scales, c * 3.0), want)


def test_kmeans_step_matches_loop_and_keeps_empty_centres():
    x = seeded(2, 11, 4, seed=3).abs() + 0.1  # every feature positive
    far = -torch.ones(1, 4, dtype=torch.float64)  # negative cosine with every token: no token chooses it
    c = torch.cat([seeded(3, 4, seed=4).abs(), far])
    got = kmeans_step(x, c)
    assert torch.allclose(got, loop_kmeans(x, c), atol=1e-12)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert (cosine_assign(x, c) == 3).sum() == 0
    assert torch.allclose(got[3], F.normalize(c[3], dim=0))


@pytest.mark.parametrize("n,m", [(10, 4), (12, 3), (7, 7), (3, 5)], ids=lambda v: str(v))
def test_initial_centres_are_means_of_reflect_padded_chunks(n, m):
    x = seeded(2, n, 3, seed=5)
    pad = m - n % m
    rows = list(range(n)) + [n - 1 - (i % n) for i in range(pad)]
    size = len(rows) // m
    want = torch.stack([torch.stack([x[b, j] for b in range(2) for j in rows[i * size:(i + 1) * size]]).mean(0)
                        for i in range(m)])
    assert torch.allclose(initial_centres(x, m), want, atol=1e-12)


# --- sorting and sub-groups ----------------------------------------------------------------------------


def test_sort_is_stable_and_scatter_back_inverts_it():
    groups = torch.tensor([[2, 0, 1, 0, 2, 1, 0, 0, 1]])
    order = sort_by_group(groups)
    want = sorted(range(9), key=lambda t: (int(groups[0, t]), t))
    assert order[0].tolist() == want
    x = seeded(1, 2, 9, 3, seed=6)
    assert torch.equal(scatter_back(gather_tokens(x, order), order), x)
    assert torch.equal(gather_tokens(x, order)[0, :, 0], x[0, :, want[0]])


@pytest.mark.parametrize("n,g", [(10, 4), (37, 8), (12, 12), (12, 50), (9, 2), (9, 6)], ids=lambda v: str(v))
@pytest.mark.parametrize("window", ["next", "own"])
def test_subgroup_indices_follow_the_codes_padding(n, g, window):
    queries, keys = subgroup_indices(n, g, window)
    qs, ks = loop_windows(n, g, window)
    assert queries.tolist() == qs and keys.tolist() == ks
    assert sorted(queries.flatten().tolist()[:n]) == list(range(n))  # every token queries exactly once


# --- attention inside sub-groups and to the centres ---------------------------------------------------


@pytest.mark.parametrize("n,g", [(10, 4), (9, 3), (7, 7), (11, 5)], ids=lambda v: str(v))
@pytest.mark.parametrize("window", ["next", "own"])
def test_intra_group_attention_matches_loop(n, g, window):
    q, k, v = seeded(2, 2, n, 3, seed=7), seeded(2, 2, n, 3, seed=8), seeded(2, 2, n, 4, seed=9)
    got = intra_group_attention(q, k, v, g, window=window)
    assert torch.allclose(got, loop_intra(q, k, v, g, window), atol=1e-12)


@pytest.mark.parametrize("window", ["next", "own"])
def test_one_group_is_full_softmax_attention(window):
    q, k, v = seeded(2, 3, 10, 4, seed=10), seeded(2, 3, 10, 4, seed=11), seeded(2, 3, 10, 4, seed=12)
    for g in (10, 64):
        assert torch.allclose(intra_group_attention(q, k, v, g, window=window), attnlib.attention(q, k, v),
                              atol=1e-13)


def test_next_window_sees_the_next_subgroup_and_own_does_not():
    """The code lets sub-group i read sub-group i+1 (not i-1); window='own' keeps each sub-group apart."""
    q, k, v = seeded(1, 1, 12, 3, seed=13), seeded(1, 1, 12, 3, seed=14), seeded(1, 1, 12, 3, seed=15)
    base = {w: intra_group_attention(q, k, v, 4, window=w) for w in ("next", "own")}
    for changed in (2, 6):  # a key of sub-group 0, then of sub-group 1
        k2, v2 = k.clone(), v.clone()
        k2[..., changed, :] += 1.0
        v2[..., changed, :] += 1.0
        moved = {w: (intra_group_attention(q, k2, v2, 4, window=w) - base[w]).abs().amax(-1)[0, 0] > 1e-9
                 for w in ("next", "own")}
        group = changed // 4
        assert moved["own"].tolist() == [i // 4 == group for i in range(12)]
        assert moved["next"][:4].tolist() == [True] * 4  # sub-group 0 sees sub-groups 0 and 1
        assert moved["next"][4:8].all() == (group == 1)  # sub-group 1 never sees sub-group 0


def test_centre_cross_attention_is_attention_to_the_centres():
    q, kc, vc = seeded(2, 2, 7, 3, seed=16), seeded(2, 4, 3, seed=17), seeded(2, 4, 5, seed=18)
    want = torch.zeros(2, 2, 7, 5, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for t in range(7):
                w = torch.softmax(kc[h] @ q[b, h, t] / math.sqrt(3), 0)
                want[b, h, t] = w @ vc[h]
    assert torch.allclose(centre_cross_attention(q, kc, vc), want, atol=1e-12)


# --- the module ---------------------------------------------------------------------------------------


def make_module(seed=0, **options):
    torch.manual_seed(seed)
    defaults = dict(num_centres=3, group_size=4, kmeans_iters=3, ema_decay=0.9)
    return ContentAwareTokenAggregation(8, 2, **{**defaults, **options}).double()


@torch.no_grad()
def test_module_in_eval_matches_loops():
    mod = make_module().eval()
    x = seeded(2, 11, 8, seed=19)
    c = mod.centres if bool(mod.initialised) else initial_centres(x, 3)
    groups = loop_assign(x, c)
    y = torch.zeros(2, 11, 8, dtype=torch.float64)
    kc = mod.centre_k_proj(c).reshape(3, 2, 4).transpose(0, 1)
    vc = mod.centre_v_proj(c).reshape(3, 2, 4).transpose(0, 1)
    for b in range(2):
        order = sorted(range(11), key=lambda t: (int(groups[b, t]), t))
        xs = x[b, order]
        q, k, v = (p(xs).reshape(11, 2, 4).transpose(0, 1)[None] for p in (mod.q_proj, mod.k_proj, mod.v_proj))
        part = loop_intra(q, k, v, 4, "next") + centre_cross_attention(q, kc, vc)
        y[b, order] = part[0].transpose(0, 1).reshape(11, 8)
    assert torch.allclose(mod(x), mod.out_proj(y), atol=1e-12)
    assert torch.equal(mod.last_groups, groups)


def test_training_updates_centres_by_the_ema_rule_and_eval_does_not():
    mod = make_module()
    x1, x2 = seeded(2, 10, 8, seed=20), seeded(2, 10, 8, seed=21)
    mod.eval()
    mod(x1)
    assert not bool(mod.initialised) and torch.equal(mod.centres, torch.zeros(3, 8, dtype=torch.float64))
    mod.train()
    mod(x1)  # first training step stores the k-means result
    c = initial_centres(x1, 3)
    for _ in range(3):
        c = loop_kmeans(x1, c)
    assert bool(mod.initialised) and torch.allclose(mod.centres, c, atol=1e-12)
    old = mod.centres.clone()
    mod(x2)
    new = old
    for _ in range(3):
        new = loop_kmeans(x2, new)
    assert torch.allclose(mod.centres, 0.9 * old + 0.1 * new, atol=1e-12)
    frozen = mod.centres.clone()
    mod.eval()
    mod(x1)
    assert torch.equal(mod.centres, frozen)


def test_module_is_permutation_equivariant_when_sub_groups_do_not_change():
    x = seeded(1, 12, 8, seed=22)
    mod = make_module(group_size=16).train()
    mod(x)  # set the centres
    mod.eval()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mod(x[:, perm]), mod(x)[:, perm], atol=1e-12)
    # smaller sub-groups: a permutation that keeps the order inside each group keeps the same sub-groups
    mod.group_size = 3
    groups = mod.last_groups[0]
    y = mod(x)
    keep_inside = sorted(range(12), key=lambda t: (int((groups == groups[t]).nonzero()[0]), t))
    p = torch.tensor(keep_inside)
    assert torch.allclose(mod(x[:, p]), y[:, p], atol=1e-12)


def test_order_inside_a_group_decides_the_sub_groups():
    """Why the sort must be stable: with one group split into sub-groups, reversing the tokens changes the
    sub-groups, so the output is not the reversed output."""
    mod = make_module(num_centres=1, group_size=3).eval()
    x = seeded(1, 9, 8, seed=23)
    rev = torch.arange(8, -1, -1)
    assert not torch.allclose(mod(x[:, rev]), mod(x)[:, rev], atol=1e-6)
    assert torch.equal(mod(x), mod(x))  # deterministic


def test_gradients_of_intra_group_attention():
    q, k, v = (seeded(1, 2, 7, 3, seed=s).requires_grad_() for s in (24, 25, 26))
    assert torch.autograd.gradcheck(lambda a, b, c: intra_group_attention(a, b, c, 3), (q, k, v))


def test_gradients_of_the_module_in_eval_and_through_kmeans_in_training():
    x = seeded(1, 7, 8, seed=27)
    mod = make_module(group_size=3, ema_decay=1.0).train()
    mod(x)  # initialise; with decay 1 the stored centres never move again
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(mod, (xg,))
    mod.eval()
    assert torch.autograd.gradcheck(mod, (xg,))
    # in training the centres reach IRCA with a gradient: the keys of the centres get one from x
    mod.train()
    mod(xg).sum().backward()
    assert mod.centre_k_proj.weight.grad.abs().sum() > 0


def test_registered_non_causal_and_works_in_a_tiny_transformer():
    mech = attnlib.get_mechanism("catanet")
    assert mech.paper == "P13" and mech.lesson == "32" and not mech.supports_causal
    with pytest.raises(ValueError, match="causal"):
        attnlib.build_mechanism("catanet", 16, 2, causal=True)
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=12, max_len=10, dim=16, depth=2, num_heads=2, mechanism="catanet",
                            causal=False)
    tokens = torch.randint(0, 12, (3, 10))
    out = model(tokens)
    assert out.shape == (3, 10, 12) and torch.isfinite(out).all()
    out.sum().backward()


def test_cost_formulas():
    full = attention_cost(256, 16, "full")
    assert full == attention_cost(256, 16, "window", window=256)
    cata = attention_cost(4096, 16, "catanet", num_centres=16, group_size=64)
    assert cata["scores"] == 4096 * (128 + 16)
    assert cata["flops"] < attention_cost(4096, 16, "full")["flops"] / 20


@pytest.mark.parametrize("make,error,words", [
    (lambda: ContentAwareTokenAggregation(8, 3), ValueError, "num_heads"),
    (lambda: ContentAwareTokenAggregation(8, 2, group_size=0), ValueError, "group_size"),
    (lambda: ContentAwareTokenAggregation(8, 2, num_centres=-1), ValueError, "num_centres"),
    (lambda: ContentAwareTokenAggregation(8, 2, ema_decay=1.5), ValueError, "ema_decay"),
    (lambda: ContentAwareTokenAggregation(8, 2, window="prev"), ValueError, "window"),
    (lambda: ContentAwareTokenAggregation(8, 2)(torch.randn(2, 5, 6)), ValueError, "x: expected last dim 8"),
    (lambda: ContentAwareTokenAggregation(8, 2)(torch.randn(5, 8)), ValueError, "x: expected a 3-d"),
    (lambda: ContentAwareTokenAggregation(8, 2)(torch.zeros(2, 5, 8, dtype=torch.long)), TypeError, "x:"),
    (lambda: cosine_assign(torch.randn(1, 4, 3), torch.randn(2, 5)), ValueError, "centres: expected 3"),
    (lambda: kmeans_step(torch.randn(1, 4, 3), torch.randn(0, 3)), ValueError, "at least one centre"),
    (lambda: subgroup_indices(10, 0), ValueError, "group_size"),
    (lambda: intra_group_attention(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2), 2),
     ValueError, "k, v"),
    (lambda: attention_cost(10, 4, "dense"), ValueError, "kind"),
], ids=["heads", "group-size", "centres", "decay", "window", "width", "rank", "dtype", "centre-width",
        "no-centre", "subgroups", "kv-shape", "cost-kind"])
def test_bad_input_names_the_argument(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_intra_group_attention_in_float16_computes_its_scores_in_float32():
    # raw dot products of 40 x 40 x 64 = 102,400 pass float16's 65,504: inf - inf = NaN if they stayed in float16
    q = torch.full((1, 1, 8, 64), 40.0)
    k = torch.full((1, 1, 8, 64), 40.0)
    v = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    out = intra_group_attention(q.half(), k.half(), v.half(), 4, scale=1.0)
    want = intra_group_attention(q.double(), k.double(), v.double(), 4, scale=1.0)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.double() - want).abs().max() < 1e-2


@pytest.mark.parametrize("tokens, group", [(10, 7), (5, 4), (13, 9)])
def test_group_sizes_whose_key_padding_would_reflect_twice_are_refused(tokens, group):
    # g < N < 1.5 g: the code's padding slice k[N - p - g : N] starts below 0 and its windows no longer fit
    with pytest.raises(ValueError, match=f"group_size: with {tokens} tokens in sub-groups of {group}"):
        subgroup_indices(tokens, group)
    largest = (2 * tokens) // 3
    subgroup_indices(tokens, largest)  # the largest group size the message suggests works
    pad = -(-tokens // largest) * largest - tokens
    assert pad + largest <= tokens
