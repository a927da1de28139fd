"""Checks for lesson 12's exercises: the code's routed gates, the load-balancing loss, the weighted sum of heads.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (the paper's gates where the code's were
asked for, a loss averaged token by token, heads flattened in the wrong order, ...), the failure message
names it.

Run against your work with ``make check LESSON=12``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "12_mixture_of_heads"


# --- inputs and references ------------------------------------------------------------------------------


def untied_logits(shape, seed):
    """Seeded float64 logits whose entries are well apart (no top-k ties: the kept heads are unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    experts = shape[-1]
    base = torch.rand(*shape[:-1], experts, generator=g, dtype=torch.float64).argsort(-1).to(torch.float64)
    return 0.7 * base + 0.2 * torch.rand(*shape, generator=g, dtype=torch.float64)


def loop_routed_gates(logits, top_k):
    """k p_i m_i / sum_j p_j m_j, one token at a time, with Python lists."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.zeros_like(flat)
    for t, row in enumerate(flat.tolist()):
        exps = [math.exp(v - max(row)) for v in row]
        p = [e / sum(exps) for e in exps]
        chosen = sorted(range(len(p)), key=lambda i: -p[i])[:top_k]
        mass = sum(p[i] for i in chosen)
        for i in chosen:
            out[t, i] = top_k * p[i] / mass
    return out.reshape(logits.shape)


def keep(values, indices):
    return torch.zeros_like(values).scatter(-1, indices, 1.0)


# --- the checkers -----------------------------------------------------------------------------------


def check_code_routed_gates(fn):
    for shape, top_k, seed in [((2, 5, 6), 2, 0), ((7, 4), 1, 1), ((3, 4, 5), 3, 2)]:
        logits = untied_logits(shape, seed)
        got = harness.call(fn, logits.clone(), top_k)
        want = loop_routed_gates(logits, top_k)
        p = torch.softmax(logits, -1)
        m = keep(p, p.topk(top_k, -1).indices)
        bottom = keep(p, (-p).topk(top_k, -1).indices)
        p_wrong_dim = torch.softmax(logits, 0)
        m_wrong_dim = keep(p_wrong_dim, p_wrong_dim.topk(top_k, -1).indices)
        mistakes = {
            "the paper's gates p * m (the code renormalises the kept probabilities and multiplies by k)": p * m,
            "the kept probabilities are multiplied by k but not renormalised (divide by their sum first)":
                top_k * p * m,
            "the kept probabilities are renormalised but not multiplied by k (each row must sum to k)":
                p * m / (p * m).sum(-1, keepdim=True),
            "the k smallest probabilities are kept instead of the k largest":
                top_k * p * bottom / (p * bottom).sum(-1, keepdim=True),
            "the softmax runs over the wrong dimension (over tokens, dim 0, instead of over heads, dim -1)":
                top_k * p_wrong_dim * m_wrong_dim / (p_wrong_dim * m_wrong_dim).sum(-1, keepdim=True),
        }
        harness.expect_close(got, want, f"code_routed_gates on logits {shape} with top_k={top_k}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


def check_balance_loss(fn):
    for shape, top_k, seed in [((2, 6, 5), 2, 0), ((9, 4), 3, 1), ((3, 5, 6), 2, 2)]:
        logits = 2 * untied_logits(shape, seed)
        probs = torch.softmax(logits, -1)
        mask = keep(probs, probs.topk(top_k, -1).indices).bool()
        got = harness.call(fn, probs.clone(), mask.clone())
        experts = shape[-1]
        flat_p, flat_m = probs.reshape(-1, experts), mask.reshape(-1, experts)
        tokens = flat_p.shape[0]
        # brute force: count and average token by token
        want = sum((sum(float(flat_m[t, i]) for t in range(tokens)) / tokens)
                   * (sum(float(flat_p[t, i]) for t in range(tokens)) / tokens) for i in range(experts))
        want = torch.tensor(want, dtype=torch.float64)
        mean_p = flat_p.mean(0)
        mistakes = {
            "the product is averaged token by token, mean_t sum_i p_ti m_ti, instead of the product of "
            "the two token averages, sum_i f_i P_i": (flat_p * flat_m).sum(-1).mean(),
            "the sum over heads is multiplied by the number of routed heads E (that is the official code's "
            "scaling, not Eq. 7)": experts * want,
            "the heads are averaged instead of summed": want / experts,
            "f_i is computed from the probabilities instead of the top-k mask (the sum of P_i squared)":
                (mean_p ** 2).sum(),
            "f_i is divided by k (the share of all selections instead of the fraction of tokens)": want / top_k,
        }
        harness.expect_close(got, want, f"balance_loss on probs {shape} with top-{top_k} masks",
                             mistakes=mistakes, atol=1e-10, rtol=1e-8)


def check_weighted_head_sum(fn):
    for b, h, length, d, dim, seed in [(2, 3, 5, 4, 7, 0), (1, 4, 6, 2, 8, 1)]:
        g = torch.Generator().manual_seed(seed)
        heads = torch.randn(b, h, length, d, generator=g, dtype=torch.float64)
        gates = torch.rand(b, length, h, generator=g, dtype=torch.float64) * 2
        w_o = torch.randn(h * d, dim, generator=g, dtype=torch.float64)
        got = harness.call(fn, heads.clone(), gates.clone(), w_o.clone())
        # sum over heads, written as the paper writes it
        want = torch.zeros(b, length, dim, dtype=torch.float64)
        for i in range(h):
            want += gates[:, :, i, None] * (heads[:, i] @ w_o[i * d:(i + 1) * d])
        concat = heads.transpose(1, 2).reshape(b, length, h * d)
        gated = heads * gates.transpose(1, 2)[..., None]
        mistakes = {
            "the gates are ignored: that is plain multi-head attention": concat @ w_o,
            "the heads are reshaped from (B, h, L, d) to (B, L, h * d) without moving the head axis next to d "
            "first (transpose(1, 2) before the reshape)": gated.reshape(b, length, h * d) @ w_o,
            "the heads are concatenated as (d, h) instead of (h, d): head i must fill columns i*d..(i+1)*d-1":
                gated.permute(0, 2, 3, 1).reshape(b, length, d * h) @ w_o,
            "the gates of a token are summed and scale the whole output instead of each head":
                (concat @ w_o) * gates.sum(-1, keepdim=True),
        }
        harness.expect_close(got, want, f"weighted_head_sum on heads {(b, h, length, d)} and w_o {(h * d, dim)}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


CHECKERS = {
    "code_routed_gates": check_code_routed_gates,
    "balance_loss": check_balance_loss,
    "weighted_head_sum": check_weighted_head_sum,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_code_routed_gates(impl):
    check_code_routed_gates(impl.code_routed_gates)


def test_balance_loss(impl):
    check_balance_loss(impl.balance_loss)


def test_weighted_head_sum(impl):
    check_weighted_head_sum(impl.weighted_head_sum)


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


def gates_paper(logits, top_k):
    p = torch.softmax(logits, -1)
    return p * keep(p, p.topk(top_k, -1).indices)


def gates_not_renormalised(logits, top_k):
    return top_k * gates_paper(logits, top_k)


def gates_not_scaled(logits, top_k):
    kept = gates_paper(logits, top_k)
    return kept / kept.sum(-1, keepdim=True)


def gates_bottom_k(logits, top_k):
    p = torch.softmax(logits, -1)
    kept = p * keep(p, p.topk(top_k, -1, largest=False).indices)
    return top_k * kept / kept.sum(-1, keepdim=True)


def gates_softmax_dim0(logits, top_k):
    p = torch.softmax(logits, 0)
    kept = p * keep(p, p.topk(top_k, -1).indices)
    return top_k * kept / kept.sum(-1, keepdim=True)


def gates_softmax_of_kept_logits(logits, top_k):
    # a correct alternative: softmax over the kept logits only is the renormalised probability
    kept = torch.full_like(logits, float("-inf")).scatter(-1, logits.topk(top_k, -1).indices,
                                                           logits.gather(-1, logits.topk(top_k, -1).indices))
    return top_k * torch.softmax(kept, -1)


def loss_per_token(probs, mask):
    return (probs * mask).sum(-1).mean()


def loss_code_scaled(probs, mask):
    e = probs.shape[-1]
    return torch.mean(probs.reshape(-1, e).mean(0) * mask.reshape(-1, e).double().mean(0)) * e * e


def loss_mean_over_heads(probs, mask):
    e = probs.shape[-1]
    return (probs.reshape(-1, e).mean(0) * mask.reshape(-1, e).double().mean(0)).mean()


def loss_from_probs(probs, mask):
    return (probs.reshape(-1, probs.shape[-1]).mean(0) ** 2).sum()


def loss_share_of_selections(probs, mask):
    e = probs.shape[-1]
    m = mask.reshape(-1, e).double()
    return ((m.sum(0) / m.sum()) * probs.reshape(-1, e).mean(0)).sum()


def sum_ignores_gates(heads, gates, w_o):
    b, h, length, d = heads.shape
    return heads.transpose(1, 2).reshape(b, length, h * d) @ w_o


def sum_reshape_without_transpose(heads, gates, w_o):
    b, h, length, d = heads.shape
    return (heads * gates.transpose(1, 2)[..., None]).reshape(b, length, h * d) @ w_o


def sum_heads_last(heads, gates, w_o):
    b, h, length, d = heads.shape
    return (heads * gates.transpose(1, 2)[..., None]).permute(0, 2, 3, 1).reshape(b, length, d * h) @ w_o


def sum_one_gate_per_token(heads, gates, w_o):
    return sum_ignores_gates(heads, gates, w_o) * gates.sum(-1, keepdim=True)


@pytest.mark.checker
def test_softmax_over_kept_logits_is_accepted():
    """Renormalising the kept probabilities is a softmax over the kept logits: the checker accepts both."""
    check_code_routed_gates(gates_softmax_of_kept_logits)


MISTAKES = {
    "gates-paper": ("code_routed_gates", gates_paper, "the paper's gates p * m"),
    "gates-not-renormalised": ("code_routed_gates", gates_not_renormalised, "not renormalised"),
    "gates-not-scaled": ("code_routed_gates", gates_not_scaled, "not multiplied by k"),
    "gates-bottom-k": ("code_routed_gates", gates_bottom_k, "k smallest probabilities"),
    "gates-softmax-dim0": ("code_routed_gates", gates_softmax_dim0, "wrong dimension"),
    "loss-per-token": ("balance_loss", loss_per_token, "averaged token by token"),
    "loss-code-scaled": ("balance_loss", loss_code_scaled, "multiplied by the number of routed heads"),
    "loss-mean-over-heads": ("balance_loss", loss_mean_over_heads, "averaged instead of summed"),
    "loss-f-from-probs": ("balance_loss", loss_from_probs, "instead of the top-k mask"),
    "loss-share-of-selections": ("balance_loss", loss_share_of_selections, "divided by k"),
    "sum-no-gates": ("weighted_head_sum", sum_ignores_gates, "plain multi-head attention"),
    "sum-no-transpose": ("weighted_head_sum", sum_reshape_without_transpose, "without moving the head axis"),
    "sum-heads-last": ("weighted_head_sum", sum_heads_last, "(d, h) instead of (h, d)"),
    "sum-one-gate": ("weighted_head_sum", sum_one_gate_per_token, "scale the whole output"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
