"""Linear attention and Flow-Attention (attnlib.linear.linear_attention) against float64 loops, and their invariants.

Flowformer: Wu et al., 2022, "Flowformer: Linearizing Transformers with Conservation Flows", arXiv 2202.06258;
numerics of the official code (thuml/Flowformer, Flow_Attention.py). Linear attention: Katharopoulos et al.,
2020, arXiv 2006.16236.
"""

import math

import pytest
import torch

from attnlib.linear.linear_attention import (
    FlowAttention,
    LinearAttention,
    causal_product_chunked,
    causal_product_quadratic,
    causal_product_recurrent,
    flow_attention,
    flow_attention_weights,
    flow_terms,
    linear_attention,
    linear_attention_weights,
    row_entropy,
)
from attnlib.registry import build_mechanism, get_mechanism

torch.set_num_threads(1)


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(b=2, h=2, length=13, d=4, dv=3, seed=0, keys=None):
    keys = length if keys is None else keys
    return randn(b, h, length, d, seed=seed), randn(b, h, keys, d, seed=seed + 1), randn(b, h, keys, dv, seed=seed + 2)


# --- independent float64 loops ------------------------------------------------------------------------


def loop_linear_attention(q, k, v, causal, phi, eps):
    """o_i = sum_j (phi(q_i).phi(k_j)) v_j / (sum_j phi(q_i).phi(k_j) + eps), one query and one key at a time."""
    b, h, length, _ = q.shape
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(length):
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                for j in range(k.shape[2] if not causal else i + 1):
                    w = float(phi(q[bi, hi, i]) @ phi(k[bi, hi, j]))
                    num, den = num + w * v[bi, hi, j], den + w
                out[bi, hi, i] = num / (den + eps)
    return out


def loop_flow_attention(q, k, v, causal, eps=1e-6):
    """The official code's Flow-Attention, written with explicit sums over sinks i and sources j (one head)."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    n_q, n_k = fq.shape[0], fk.shape[0]

    def seen(i):  # the sources sink i may see (and, for source j, the sinks up to j)
        return range(i + 1) if causal else range(n_k)

    def seen_q(j):
        return range(j + 1) if causal else range(n_q)

    n = [float(i + 1) if causal else 1.0 for i in range(max(n_q, n_k))]
    inc = [n[i] / float((fq[i] + eps) @ (sum(fk[j] for j in seen(i)) + eps)) for i in range(n_q)]
    out_ = [n[j] / float((fk[j] + eps) @ (sum(fq[t] for t in seen_q(j)) + eps)) for j in range(n_k)]
    c_inc = [float((fq[i] + eps) @ (sum(fk[j] * out_[j] for j in seen(i)) + eps)) / n[i] for i in range(n_q)]
    c_out = [min(1.0, max(-1.0, float((fk[j] + eps) @ (sum(fq[t] * inc[t] for t in seen_q(j)) + eps)) / n[j]))
             for j in range(n_k)]
    if causal:
        alloc = [1 / (1 + math.exp(-c_inc[i])) for i in range(n_q)]
        comp = [n[j] * math.exp(c_out[j]) / sum(math.exp(c_out[t]) for t in range(j + 1)) for j in range(n_k)]
    else:
        alloc = [1 / (1 + math.exp(-c_inc[i] * n_q / n_k)) for i in range(n_q)]
        comp = [n_k * math.exp(c_out[j]) / sum(math.exp(x) for x in c_out) for j in range(n_k)]
    out = torch.zeros(n_q, v.shape[-1], dtype=torch.float64)
    for i in range(n_q):
        for j in seen(i):
            out[i] += alloc[i] * inc[i] / n[i] * float(fq[i] @ fk[j]) * comp[j] * v[j]
    return out


def elu1(x):
    return torch.nn.functional.elu(x) + 1


# --- the three forms of the causal product -------------------------------------------------------------


def test_recurrence_equals_a_float64_loop_over_pairs():
    q, k, v = qkv(b=1, h=1, length=9)
    want = torch.stack([sum(float(q[0, 0, i] @ k[0, 0, j]) * v[0, 0, j] for j in range(i + 1)) for i in range(9)])
    assert torch.allclose(causal_product_recurrent(q, k, v)[0, 0], want, atol=1e-12)


def test_recurrence_equals_the_quadratic_causal_form():
    q, k, v = qkv(length=21, d=5, dv=6)
    assert torch.allclose(causal_product_recurrent(q, k, v), causal_product_quadratic(q, k, v), atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 21, 64])
def test_chunked_form_equals_both_for_any_chunk_size(chunk):
    q, k, v = qkv(length=21, d=5, dv=6, seed=3)
    got = causal_product_chunked(q, k, v, chunk)
    assert torch.allclose(got, causal_product_quadratic(q, k, v), atol=1e-12)
    assert torch.allclose(got, causal_product_recurrent(q, k, v), atol=1e-12)


# --- linear attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu+1", "sigmoid"])
def test_linear_attention_matches_a_float64_loop(causal, feature_map):
    q, k, v = qkv(b=1, length=7)
    phi = elu1 if feature_map == "elu+1" else torch.sigmoid
    want = loop_linear_attention(q, k, v, causal, phi, 1e-6)
    assert torch.allclose(linear_attention(q, k, v, causal=causal, feature_map=feature_map), want, atol=1e-12)


def test_linear_attention_with_queries_and_keys_of_different_lengths():
    q, k, v = qkv(b=1, length=5, keys=8)
    assert torch.allclose(linear_attention(q, k, v), loop_linear_attention(q, k, v, False, elu1, 1e-6), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_weights_are_a_distribution_and_reproduce_the_output(causal):
    q, k, v = qkv(length=11)
    w = linear_attention_weights(q, k, causal=causal, eps=0.0)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(2, 2, 11, dtype=torch.float64))
    if causal:
        assert (w.triu(1) == 0).all()
    assert torch.allclose(w @ v, linear_attention(q, k, v, causal=causal, eps=0.0), atol=1e-12)


def test_constant_features_give_uniform_weights_the_degenerate_case():
    # when phi(q).phi(k) is the same for every key, linear attention is the plain mean: maximal entropy
    q, k = torch.zeros(1, 1, 6, 3, dtype=torch.float64), torch.zeros(1, 1, 6, 3, dtype=torch.float64)
    w = linear_attention_weights(q, k, eps=0.0)
    assert torch.allclose(w, torch.full_like(w, 1 / 6))
    assert torch.allclose(row_entropy(w), torch.full((1, 1, 6), math.log(6), dtype=torch.float64))


def test_row_entropy_of_a_one_hot_row_is_zero():
    assert torch.allclose(row_entropy(torch.eye(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))


# --- Flow-Attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flow_attention_matches_a_float64_loop_of_the_official_numerics(causal):
    q, k, v = qkv(b=1, h=1, length=8, d=3, dv=2, seed=5)
    q, k = 2 * q, 2 * k  # large enough that the clip of the conserved outgoing flow is active somewhere
    got = flow_attention(q, k, v, causal=causal)[0, 0]
    assert torch.allclose(got, loop_flow_attention(q[0, 0], k[0, 0], v[0, 0], causal), atol=1e-12)


def test_flow_attention_with_more_keys_than_queries():
    q, k, v = qkv(b=1, h=1, length=5, keys=9, seed=6)
    got = flow_attention(q, k, v)[0, 0]
    assert torch.allclose(got, loop_flow_attention(q[0, 0], k[0, 0], v[0, 0], False), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["code", "paper"])
def test_flow_weights_reproduce_the_output(causal, variant):
    q, k, v = qkv(length=10, seed=7)
    w = flow_attention_weights(q, k, causal=causal, variant=variant)
    assert torch.allclose(w @ v, flow_attention(q, k, v, causal=causal, variant=variant), atol=1e-12)


def test_incoming_flow_of_every_sink_is_conserved():
    # the paper: normalising phi(Q) by the incoming flow I makes each sink receive exactly one unit
    q, k, _ = qkv(length=9, keys=12, seed=8)
    t = flow_terms(q, k, eps=0.0)
    received = ((t["phi_q"] * t["incoming"][..., None]) @ t["phi_k"].transpose(-1, -2)).sum(-1)
    assert torch.allclose(received, torch.ones_like(received))


def test_outgoing_flow_of_every_source_is_conserved():
    q, k, _ = qkv(length=9, keys=12, seed=8)
    t = flow_terms(q, k, eps=0.0)
    sent = (t["phi_q"] @ (t["phi_k"] * t["outgoing"][..., None]).transpose(-1, -2)).sum(-2)
    assert torch.allclose(sent, torch.ones_like(sent))


def test_conserved_flows_sum_to_the_number_of_sources_and_sinks():
    # every source sends one unit, so the sinks receive S units in all; every sink receives one, so the
    # sources send L units in all (before the code's clip: the paper variant)
    q, k, _ = qkv(length=9, keys=12, seed=9)
    t = flow_terms(q, k, eps=0.0, variant="paper")
    assert torch.allclose(t["conserved_incoming"].sum(-1), torch.full((2, 2), 12.0, dtype=torch.float64))
    assert torch.allclose(t["conserved_outgoing"].sum(-1), torch.full((2, 2), 9.0, dtype=torch.float64))


def test_competition_and_allocation_ranges():
    q, k, _ = qkv(length=9, keys=12, seed=10)
    code, paper = flow_terms(q, k), flow_terms(q, k, variant="paper")
    assert torch.allclose(code["competition"].sum(-1), torch.full((2, 2), 12.0, dtype=torch.float64))
    assert torch.allclose(paper["competition"].sum(-1), torch.ones(2, 2, dtype=torch.float64))
    assert ((code["allocation"] > 0) & (code["allocation"] < 1)).all()
    assert (code["conserved_outgoing"].abs() <= 1).all()


def test_causal_sinks_are_conserved_over_the_prefix():
    q, k, _ = qkv(length=10, seed=11)
    t = flow_terms(q, k, causal=True, eps=0.0)
    scores = (t["phi_q"] * (t["incoming"] / t["normal"])[..., None]) @ t["phi_k"].transpose(-1, -2)
    received = scores.tril().sum(-1)
    assert torch.allclose(received, torch.ones_like(received))


def test_causal_last_position_sees_what_the_bidirectional_version_sees():
    q, k, _ = qkv(length=10, seed=12)
    causal, full = flow_terms(q, k, causal=True), flow_terms(q, k)
    # I_L: the causal incoming flow is the full one times the count n_L = L
    assert torch.allclose(causal["incoming"][..., -1], 10 * full["incoming"][..., -1])
    # and the first source's outgoing flow: one sink (itself) instead of all of them
    first = 1.0 / ((causal["phi_k"][..., 0, :] + 1e-6) * (causal["phi_q"][..., 0, :] + 1e-6)).sum(-1)
    assert torch.allclose(causal["outgoing"][..., 0], first)


def test_code_and_paper_variants_differ_as_documented():
    # the code multiplies the competition by S, the allocation's argument by L/S, and clips O^ to [-1, 1]
    q, k, _ = qkv(length=6, keys=10, seed=13, b=1, h=1)
    q, k = 0.1 * q, 0.1 * k  # small inputs: |O^| < 1, so the clip is inactive
    code, paper = flow_terms(q, k), flow_terms(q, k, variant="paper")
    assert (paper["conserved_outgoing"].abs() < 1).all()
    assert torch.allclose(code["competition"], 10 * paper["competition"])
    assert torch.allclose(code["allocation"], torch.sigmoid(paper["conserved_incoming"] * 6 / 10))
    # more sinks than sources: O^ averages L/S > 1, so the clip bites
    big_q, big_k, v = 3 * randn(1, 1, 10, 4, seed=1), 3 * randn(1, 1, 6, 4, seed=2), randn(1, 1, 6, 3, seed=3)
    clipped = flow_terms(big_q, big_k)["conserved_outgoing"]
    unclipped = flow_terms(big_q, big_k, variant="paper")["conserved_outgoing"]
    assert unclipped.max() > 1 and torch.equal(clipped, unclipped.clamp(-1, 1))
    assert not torch.allclose(flow_attention(big_q, big_k, v), flow_attention(big_q, big_k, v, variant="paper"))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_flow_attention_does_not_depend_on_the_chunk_size(chunk):
    q, k, v = qkv(length=17, seed=14)
    want = flow_attention_weights(q, k, causal=True) @ v
    assert torch.allclose(flow_attention(q, k, v, causal=True, chunk_size=chunk), want, atol=1e-12)


# --- causality -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [linear_attention, flow_attention], ids=["linear", "flow"])
def test_causal_versions_ignore_the_future(fn):
    q, k, v = qkv(length=12, seed=15)
    out = fn(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, 7:] += 5 * randn(*x[:, :, 7:].shape, seed=99)
    out2 = fn(q2, k2, v2, causal=True)
    assert torch.allclose(out[:, :, :7], out2[:, :, :7], atol=1e-12)
    assert not torch.allclose(out[:, :, 7:], out2[:, :, 7:])


def test_bidirectional_flow_attention_is_not_causal():
    q, k, v = qkv(length=8, seed=16)
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    assert not torch.allclose(flow_attention(q, k, v)[:, :, 0], flow_attention(q, k, v2)[:, :, 0])


# --- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_linear_attention(causal):
    q, k, v = (x.requires_grad_() for x in qkv(b=1, h=1, length=6, d=3, dv=2, seed=17))
    assert torch.autograd.gradcheck(lambda *t: linear_attention(*t, causal=causal, chunk_size=4), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_flow_attention(causal):
    q, k, v = (x.requires_grad_() for x in qkv(b=1, h=1, length=6, d=3, dv=2, seed=18))
    assert torch.autograd.gradcheck(lambda *t: flow_attention(*t, causal=causal, chunk_size=4), (q, k, v))


# --- modules and the registry -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "flowformer"])
def test_registered_mechanisms_are_causal_with_two_heads(name):
    assert get_mechanism(name).paper == "P29" and get_mechanism(name).lesson == "30"
    torch.manual_seed(0)
    mixer = build_mechanism(name, 16, 2, causal=True).double()
    x = randn(2, 9, 16, seed=19)
    y = mixer(x)
    x2 = x.clone()
    x2[:, 6:] = randn(2, 3, 16, seed=20)
    y2 = mixer(x2)
    assert y.shape == (2, 9, 16)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-12) and not torch.allclose(y[:, 6:], y2[:, 6:])


def test_modules_compute_the_functions_on_their_projections():
    torch.manual_seed(0)
    x = randn(1, 7, 8, seed=21)
    for module, fn in ((LinearAttention(8, 2, causal=True).double(), linear_attention),
                       (FlowAttention(8, 2, causal=True).double(), flow_attention)):
        split = [p(x).view(1, 7, 2, 4).transpose(1, 2) for p in (module.q_proj, module.k_proj, module.v_proj)]
        want = module.out_proj(fn(*split, causal=True).transpose(1, 2).reshape(1, 7, 8))
        assert torch.allclose(module(x), want, atol=1e-12)


# --- bad inputs ----------------------------------------------------------------------------------------


BAD = [
    pytest.param(lambda q, k, v: linear_attention(q, k, v, feature_map="tanh"), ValueError, "feature_map", id="map"),
    pytest.param(lambda q, k, v: flow_attention(q, k, v, variant="blog"), ValueError, "variant", id="variant"),
    pytest.param(lambda q, k, v: flow_attention(q, k, v, eps=-1.0), ValueError, "eps: expected a float >= 0",
                 id="eps"),
    pytest.param(lambda q, k, v: linear_attention(q, k, v, causal=1), TypeError, "causal: expected a bool", id="causal"),
    pytest.param(lambda q, k, v: linear_attention(q, k[:, :, :3], v[:, :, :3], causal=True), ValueError,
                 "causal attention needs as many keys", id="causal-lengths"),
    pytest.param(lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=0), ValueError, "chunk_size",
                 id="chunk"),
    pytest.param(lambda q, k, v: linear_attention(q, k, v, causal=True, backend="cuda"), ValueError, "backend",
                 id="backend"),
    pytest.param(lambda q, k, v: flow_attention(q[0], k, v), ValueError, "q: expected a 4-d tensor", id="rank"),
    pytest.param(lambda q, k, v: flow_attention(q, k.int(), v), TypeError, "k: expected a floating", id="dtype"),
    pytest.param(lambda q, k, v: LinearAttention(10, 3), ValueError, "dim: expected a multiple", id="heads"),
    pytest.param(lambda q, k, v: FlowAttention(8, 2)(q), ValueError, "x: expected a 3-d tensor", id="module-rank"),
]


@pytest.mark.parametrize("call, error, words", BAD)
def test_bad_input_is_rejected_with_a_message(call, error, words):
    q, k, v = qkv(length=5)
    with pytest.raises(error, match=words):
        call(q, k, v)


def test_peak_tensor_memory_counts_the_score_matrix_of_softmax_but_not_of_linear_attention():
    from attnlib.linear.linear_attention import peak_tensor_memory

    q, k, v = (torch.randn(1, 1, 512, 8) for _ in range(3))
    _, quadratic = peak_tensor_memory(lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    _, linear = peak_tensor_memory(lambda: linear_attention(q, k, v, causal=True))
    assert quadratic >= 512 * 512 * 4  # at least one float32 L x L matrix
    assert linear < 512 * 512 * 4 / 4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("fn", [linear_attention, flow_attention], ids=["linear", "flow"])
def test_float16_sums_over_many_keys_do_not_overflow(fn, causal):
    """At L = 4096 the normaliser passes float16's 65,504: the sums run in float32, the output stays float16."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4096, 16, generator=generator) for _ in range(3))
    want = fn(q.double(), k.double(), v.double(), causal=causal)
    got = fn(q.half(), k.half(), v.half(), causal=causal)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 2e-2 * want.abs().max()


def test_a_row_whose_relu_features_are_all_zero_gives_zeros_with_eps_zero():
    q = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    q[0, 0, 2] = -1.0  # relu(q_2) = 0: its normaliser is 0 when eps = 0
    k, v = torch.randn(1, 1, 5, 4, dtype=torch.float64), torch.randn(1, 1, 5, 3, dtype=torch.float64)
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, feature_map="relu", eps=0.0)
        weights = linear_attention_weights(q, k, causal=causal, feature_map="relu", eps=0.0)
        assert torch.isfinite(out).all() and torch.equal(out[0, 0, 2], torch.zeros(3, dtype=torch.float64))
        assert torch.isfinite(weights).all() and torch.allclose(out, weights @ v)


def test_causal_weights_need_as_many_keys_as_queries():
    with pytest.raises(ValueError, match="k: causal attention needs as many keys as queries"):
        linear_attention_weights(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 6, 2), causal=True)


@pytest.mark.parametrize("fn", [causal_product_recurrent, causal_product_quadratic, causal_product_chunked,
                                lambda q, k, v: flow_terms(q, k)],
                         ids=["recurrent", "quadratic", "chunked", "flow-terms"])
def test_the_helpers_check_their_inputs(fn):
    q3 = torch.randn(1, 5, 4)  # a batch-heads-length-dim tensor with a dimension missing
    with pytest.raises(ValueError, match="q: expected a 4-d tensor"):
        fn(q3, q3, q3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_the_clipped_outgoing_flow_lies_in_zero_one_so_competition_ratios_stay_below_e(causal):
    g = torch.Generator().manual_seed(5)
    q, k = (3 * torch.randn(1, 2, 32, 8, generator=g, dtype=torch.float64) for _ in range(2))
    terms = flow_terms(q, k, causal=causal)
    o_hat = terms["conserved_outgoing"]
    assert (o_hat > 0).all() and (o_hat <= 1).all()
    if not causal:  # one softmax over the keys: any two competitions differ by at most e^(1 - 0)
        competition = terms["competition"]
        assert (competition.amax(-1) / competition.amin(-1)).max() <= math.e
