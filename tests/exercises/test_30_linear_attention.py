"""Checks for lesson 30's exercises: linear attention as an RNN, the chunked causal product, Flowformer's
competition and allocation.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation (pairs of tokens in loops, or the formula written out). When the answer matches a
*known mistake* (the state read before it is updated, a chunk that sees its own future, a competition
not scaled by the number of sources, ...), the failure message names it.

Run against your work with ``make check LESSON=30``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "30_linear_attention"


def _inputs(b, h, length, d, dv, seed, positive=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    if positive:
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    return q, k, torch.randn(b, h, length, dv, generator=g, dtype=torch.float64)


def _pair_weights(q, k, allowed):
    """w_ij = q_i . k_j where allowed(i, j), else 0, from an explicit loop over pairs: (B, H, L, L)."""
    length = q.shape[2]
    w = torch.zeros(*q.shape[:2], length, length, dtype=torch.float64)
    for i in range(length):
        for j in range(length):
            if allowed(i, j):
                w[:, :, i, j] = (q[:, :, i] * k[:, :, j]).sum(-1)
    return w


# --- the checkers -----------------------------------------------------------------------------------


def check_causal_linear_recurrence(fn):
    for b, h, length, d, dv, seed in [(1, 1, 6, 3, 2, 0), (2, 2, 9, 4, 5, 1)]:
        q, k, v = _inputs(b, h, length, d, dv, seed)
        got = harness.call(fn, q.clone(), k.clone(), v.clone())
        w = _pair_weights(q, k, lambda i, j: j <= i)
        want = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
        strict = _pair_weights(q, k, lambda i, j: j < i)
        full = _pair_weights(q, k, lambda i, j: True)
        mistakes = {
            "the normaliser is missing: o_i = phi(q_i) S_i without dividing by phi(q_i) . z_i": w @ v,
            "the state is read before it is updated, so token i does not see itself (j < i instead of j <= i)":
                (strict @ v) / (strict.sum(-1, keepdim=True) + 1e-6),
            "the sums run over every token, not only j <= i: that is the bidirectional form, not causal":
                (full @ v) / (full.sum(-1, keepdim=True) + 1e-6),
        }
        harness.expect_close(got, want, f"causal_linear_recurrence on q of shape {(b, h, length, d)}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


def check_chunked_causal_product(fn):
    for b, h, length, d, dv, chunk, seed in [(1, 1, 7, 3, 2, 3, 2), (2, 1, 10, 4, 3, 4, 3), (1, 2, 5, 2, 2, 8, 4)]:
        q, k, v = _inputs(b, h, length, d, dv, seed, positive=False)
        got = harness.call(fn, q.clone(), k.clone(), v.clone(), chunk)
        want = _pair_weights(q, k, lambda i, j: j <= i) @ v
        same_chunk = lambda i, j: i // chunk == j // chunk  # noqa: E731
        mistakes = {
            "inside a chunk the future is not masked: each token sees the whole chunk (tril is missing)":
                _pair_weights(q, k, lambda i, j: j <= i or same_chunk(i, j)) @ v,
            "the diagonal is masked out inside a chunk (triu(1)'s complement is tril(), diagonal included)":
                _pair_weights(q, k, lambda i, j: j < i or (j == i and not same_chunk(i, j))) @ v,
            "the state is updated before it is read, so the current chunk is counted twice":
                (_pair_weights(q, k, lambda i, j: j <= i) + _pair_weights(q, k, lambda i, j: same_chunk(i, j))) @ v,
            "the state from earlier chunks is never added (only the intra-chunk part)":
                _pair_weights(q, k, lambda i, j: j <= i and same_chunk(i, j)) @ v,
        }
        harness.expect_close(got, want, f"chunked_causal_product, length {length}, chunk_size {chunk}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


def check_competition_and_allocation(fn):
    for b, h, length, keys, seed in [(1, 1, 5, 8, 5), (2, 2, 9, 4, 6)]:
        g = torch.Generator().manual_seed(seed)
        inc = 2 * torch.randn(b, h, length, generator=g, dtype=torch.float64)
        out = 2 * torch.randn(b, h, keys, generator=g, dtype=torch.float64)  # some beyond +-1: the clip matters
        got = harness.call(fn, inc.clone(), out.clone())
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError("competition_and_allocation: expected a tuple (allocation, competition), "
                                 f"got {type(got).__name__}")
        allocation, competition = got
        clipped = out.clamp(-1, 1)
        want_a = 1 / (1 + torch.exp(-inc * length / keys))
        want_c = keys * torch.exp(clipped) / torch.exp(clipped).sum(-1, keepdim=True)
        where = f"(L={length} queries, S={keys} keys)"
        harness.expect_close(allocation, want_a, f"allocation {where}", mistakes={
            "the factor L / S inside the sigmoid is missing (the paper's form; the code scales by L / S)":
                torch.sigmoid(inc),
            "the factor is S / L instead of L / S": torch.sigmoid(inc * keys / length),
        }, atol=1e-9, rtol=1e-7)
        harness.expect_close(competition, want_c, f"competition {where}", mistakes={
            "the softmax is not multiplied by S, the number of sources (the code keeps a mean weight of one)":
                torch.softmax(clipped, -1),
            "the conserved outgoing flow is not clipped to [-1, 1] before the softmax":
                keys * torch.softmax(out, -1),
            "the competition multiplies by L (queries) instead of S (keys)": length * torch.softmax(clipped, -1),
        }, atol=1e-9, rtol=1e-7)


CHECKERS = {
    "causal_linear_recurrence": check_causal_linear_recurrence,
    "chunked_causal_product": check_chunked_causal_product,
    "competition_and_allocation": check_competition_and_allocation,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_causal_linear_recurrence(impl):
    check_causal_linear_recurrence(impl.causal_linear_recurrence)


def test_chunked_causal_product(impl):
    check_chunked_causal_product(impl.chunked_causal_product)


def test_competition_and_allocation(impl):
    check_competition_and_allocation(impl.competition_and_allocation)


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


def _recurrence(strict=False, normalise=True, full=False):
    def fn(phi_q, phi_k, v, eps=1e-6):
        scores = phi_q @ phi_k.transpose(-1, -2)
        if not full:
            length = scores.shape[-1]
            scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(-1 if strict else 0), 0.0)
        return scores @ v / (scores.sum(-1, keepdim=True) + eps) if normalise else scores @ v
    return fn


def _chunked(mask_inside=True, diagonal=True, update_first=False, use_state=True):
    def fn(q, k, v, chunk_size):
        state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        parts = []
        for start in range(0, q.shape[2], chunk_size):
            qt, kt, vt = (x[:, :, start:start + chunk_size] for x in (q, k, v))
            c = qt.shape[2]
            s = qt @ kt.transpose(-1, -2)
            if mask_inside:
                s = s.masked_fill(~torch.ones(c, c, dtype=torch.bool).tril(0 if diagonal else -1), 0.0)
            if update_first:
                state = state + kt.transpose(-1, -2) @ vt
            parts.append(s @ vt + (qt @ state if use_state else 0))
            if not update_first:
                state = state + kt.transpose(-1, -2) @ vt
        return torch.cat(parts, dim=2)
    return fn


def _competition(factor=True, clip=True, by_length=False, allocation_ratio=True, inverse_ratio=False):
    def fn(inc, out):
        length, keys = inc.shape[-1], out.shape[-1]
        ratio = (keys / length if inverse_ratio else length / keys) if allocation_ratio else 1.0
        c = torch.softmax(out.clamp(-1, 1) if clip else out, -1) * ((length if by_length else keys) if factor else 1)
        return torch.sigmoid(inc * ratio), c
    return fn


MISTAKES = {
    "no-normaliser": ("causal_linear_recurrence", _recurrence(normalise=False), "normaliser is missing"),
    "read-before-update": ("causal_linear_recurrence", _recurrence(strict=True), "does not see itself"),
    "not-causal": ("causal_linear_recurrence", _recurrence(full=True), "bidirectional"),
    "no-mask-inside": ("chunked_causal_product", _chunked(mask_inside=False), "future is not masked"),
    "no-diagonal": ("chunked_causal_product", _chunked(diagonal=False), "diagonal is masked out"),
    "update-first": ("chunked_causal_product", _chunked(update_first=True), "counted twice"),
    "no-state": ("chunked_causal_product", _chunked(use_state=False), "never added"),
    "no-times-S": ("competition_and_allocation", _competition(factor=False), "not multiplied by S"),
    "no-clip": ("competition_and_allocation", _competition(clip=False), "not clipped"),
    "times-L": ("competition_and_allocation", _competition(by_length=True), "multiplies by L"),
    "paper-allocation": ("competition_and_allocation", _competition(allocation_ratio=False), "L / S inside"),
    "inverse-ratio": ("competition_and_allocation", _competition(inverse_ratio=True), "S / L instead"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
