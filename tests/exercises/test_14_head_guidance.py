"""Checks for lesson 14's exercises: SoftPAG per head, the causal uniform target, perturbation guidance, HeadHunter.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation. When the answer matches a *known mistake* (u and 1 - u swapped, a mean that reads the future, the
guidance sign flipped, heads ranked alone instead of with the chosen set, ...), the failure message names it.

Run against your work with ``make check LESSON=14``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "14_head_guidance"


# --- helpers ----------------------------------------------------------------------------------------


def causal_maps(batch, heads, length, seed):
    """Seeded float64 causal attention maps ``(B, H, L, L)`` (rows sum to one) and values ``(B, H, L, D)``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    v = torch.randn(batch, heads, length, 3, generator=g, dtype=torch.float64)
    return torch.softmax(scores, -1), v


def synergy_objective(heads):
    """Additive head values, a bonus when a and e are together, and a huge bonus for a repeated head."""
    values = {"a": 3.0, "b": 1.0, "c": 0.5, "d": -1.0, "e": 0.0}
    score = sum(values[h] for h in heads)
    if "a" in heads and "e" in heads:
        score += 3.0
    if len(set(heads)) != len(heads):
        score += 100.0
    return score


# --- the checkers -----------------------------------------------------------------------------------


def check_soft_identity_heads(fn):
    for batch, heads, length, seed, u in [(2, 3, 5, 0, [0.0, 0.4, 1.0]), (1, 2, 6, 1, [0.7, 0.2])]:
        weights, v = causal_maps(batch, heads, length, seed)
        u = torch.tensor(u, dtype=torch.float64)
        before = v.clone()
        got = harness.call(fn, weights, v, u)
        # independent computation: build I and the interpolated map, one head at a time
        want = torch.stack([((1 - u[h]) * weights[:, h] + u[h] * torch.eye(length, dtype=torch.float64)) @ v[:, h]
                            for h in range(heads)], dim=1)
        u4 = u.view(1, -1, 1, 1)
        mistakes = {
            "u and 1 - u are swapped: u = 1 must give V (the identity map), u = 0 plain attention":
                u4 * (weights @ v) + (1 - u4) * v,
            "the first head's u is used for every head; reshape u to (1, H, 1, 1)":
                (1 - u[0]) * (weights @ v) + u[0] * v,
            "the u V term is missing (only (1 - u) A V)": (1 - u4) * (weights @ v),
            "V is added without its weight u ((1 - u) A V + V)": (1 - u4) * (weights @ v) + v,
        }
        if not torch.equal(v, before):
            raise AssertionError("soft_identity_heads: it changed v in place; compute new tensors instead")
        harness.expect_close(got, want, f"soft_identity_heads on maps of shape {tuple(weights.shape)}",
                             mistakes=mistakes, atol=1e-10, rtol=1e-8)


def check_uniform_target_causal(fn):
    for batch, heads, length, seed in [(2, 2, 5, 0), (1, 3, 7, 1)]:
        _, v = causal_maps(batch, heads, length, seed)
        before = v.clone()
        got = harness.call(fn, v)
        # independent computation: a loop over positions, the mean of the prefix
        want = torch.stack([v[:, :, : i + 1].mean(dim=2) for i in range(length)], dim=2)
        positions = torch.arange(1, length + 1, dtype=torch.float64).view(1, 1, -1, 1)
        mistakes = {
            "the mean is over the whole sequence, so position i reads the future (a causal model must average "
            "over positions 0..i only)": v.mean(dim=2, keepdim=True).expand_as(v),
            "the prefix sums are divided by the length L instead of by i + 1": v.cumsum(dim=2) / length,
            "the mean is over the suffix i..L-1 instead of the prefix 0..i":
                v.flip(2).cumsum(2).flip(2) / positions.flip(2),
            "the sum is not divided at all (a cumulative sum, not a mean)": v.cumsum(dim=2),
        }
        if not torch.equal(v, before):
            raise AssertionError("uniform_target_causal: it changed v in place; compute new tensors instead")
        harness.expect_close(got, want, f"uniform_target_causal on v of shape {tuple(v.shape)}",
                             mistakes=mistakes, atol=1e-10, rtol=1e-8)


def check_perturbation_guidance(fn):
    g = torch.Generator().manual_seed(0)
    for shape, scale in [((3, 5), 2.5), ((2, 4, 6), 0.5), ((4,), 0.0)]:
        cond = torch.randn(*shape, generator=g, dtype=torch.float64)
        weak = torch.randn(*shape, generator=g, dtype=torch.float64)
        got = harness.call(fn, cond, weak, scale)
        want = torch.tensor([c + scale * (c - w) for c, w in zip(cond.flatten().tolist(), weak.flatten().tolist())],
                            dtype=torch.float64).view(shape)
        mistakes = {
            "the sign is flipped: the prediction moves towards the weak model, cond + s (perturbed - cond)":
                cond + scale * (weak - cond),
            "it starts from the weak model, perturbed + s (cond - perturbed) (the classifier-free form with s in "
            "place of w; it must start from cond)": weak + scale * (cond - weak),
            "cond is missing: only s (cond - perturbed)": scale * (cond - weak),
        }
        harness.expect_close(got, want, f"perturbation_guidance with scale {scale} on shape {shape}",
                             mistakes=mistakes, atol=1e-10, rtol=1e-8)


def check_greedy_head_search(fn):
    cases = [
        (list("abcde"), 2, 1, ["a", "e"]),
        (list("abcde"), 2, 2, ["a", "b", "e", "c"]),
    ]
    for candidates, rounds, per_round, want in cases:
        calls = []

        def objective(heads):
            calls.append(list(heads))
            return synergy_objective(heads)

        got = harness.call(fn, list(candidates), objective, rounds, per_round)
        what = f"greedy_head_search with {rounds} rounds of {per_round} on candidates {candidates}"
        if not isinstance(got, list):
            raise AssertionError(f"{what}: expected a list of heads, got {type(got).__name__}")
        if got == want:
            continue
        alone = sorted(candidates, key=lambda c: -synergy_objective([c]))[: rounds * per_round]
        if len(set(got)) != len(got):
            raise AssertionError(f"{what}: got {got}, which repeats a head; remove the heads you add from the pool")
        if sorted(got) == sorted(alone) or got == alone:
            raise AssertionError(f"{what}: got {got}, expected {want}; it looks like each head is scored alone "
                                 "(one-shot ranking) instead of together with the heads already selected, "
                                 "objective(selected + [c])")
        worst_first = sorted(candidates, key=lambda c: synergy_objective([c]))[0]
        if got and got[0] == worst_first:
            raise AssertionError(f"{what}: got {got}, expected {want}; the ranking is ascending, so it keeps the "
                                 "worst heads (higher objective is better: sort best first)")
        if any(len(c) == 0 for c in calls):
            raise AssertionError(f"{what}: it scored an empty set; score selected + [c] for each candidate c")
        raise AssertionError(f"{what}: got {got}, expected {want} (heads in the order they are added)")


CHECKERS = {
    "soft_identity_heads": check_soft_identity_heads,
    "uniform_target_causal": check_uniform_target_causal,
    "perturbation_guidance": check_perturbation_guidance,
    "greedy_head_search": check_greedy_head_search,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_soft_identity_heads(impl):
    check_soft_identity_heads(impl.soft_identity_heads)


def test_uniform_target_causal(impl):
    check_uniform_target_causal(impl.uniform_target_causal)


def test_perturbation_guidance(impl):
    check_perturbation_guidance(impl.perturbation_guidance)


def test_greedy_head_search(impl):
    check_greedy_head_search(impl.greedy_head_search)


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


def soft_swapped(weights, v, u):
    u = u.view(1, -1, 1, 1)
    return u * (weights @ v) + (1 - u) * v


def soft_first_u(weights, v, u):
    return (1 - u[0]) * (weights @ v) + u[0] * v


def soft_no_v_term(weights, v, u):
    return (1 - u.view(1, -1, 1, 1)) * (weights @ v)


def soft_in_place(weights, v, u):
    u = u.view(1, -1, 1, 1)
    out = (1 - u) * (weights @ v)
    v.mul_(u)
    return out + v


def uniform_whole_sequence(v):
    return v.mean(dim=2, keepdim=True).expand_as(v)


def uniform_divided_by_length(v):
    return v.cumsum(dim=2) / v.shape[2]


def uniform_not_divided(v):
    return v.cumsum(dim=2)


def guidance_flipped(cond, perturbed, scale):
    return cond - scale * (cond - perturbed)


def guidance_from_weak(cond, perturbed, scale):
    return perturbed + scale * (cond - perturbed)


def greedy_one_shot(candidates, objective, rounds, per_round):
    return sorted(candidates, key=lambda c: -objective([c]))[: rounds * per_round]


def greedy_keeps_pool(candidates, objective, rounds, per_round):
    selected = []
    for _ in range(rounds):
        selected += sorted(candidates, key=lambda c: -objective(selected + [c]))[:per_round]
    return selected


def greedy_ascending(candidates, objective, rounds, per_round):
    selected, pool = [], list(candidates)
    for _ in range(rounds):
        added = sorted(pool, key=lambda c: objective(selected + [c]))[:per_round]
        selected += added
        pool = [c for c in pool if c not in added]
    return selected


def greedy_scored_alone(candidates, objective, rounds, per_round):
    selected, pool = [], list(candidates)
    for _ in range(rounds):
        added = sorted(pool, key=lambda c: -objective([c]))[:per_round]
        selected += added
        pool = [c for c in pool if c not in added]
    return selected


MISTAKES = {
    "soft-swapped": ("soft_identity_heads", soft_swapped, "u and 1 - u are swapped"),
    "soft-first-u": ("soft_identity_heads", soft_first_u, "the first head's u is used for every head"),
    "soft-no-v": ("soft_identity_heads", soft_no_v_term, "the u V term is missing"),
    "soft-in-place": ("soft_identity_heads", soft_in_place, "changed v in place"),
    "uniform-future": ("uniform_target_causal", uniform_whole_sequence, "reads the future"),
    "uniform-by-length": ("uniform_target_causal", uniform_divided_by_length, "divided by the length L"),
    "uniform-sum": ("uniform_target_causal", uniform_not_divided, "not divided at all"),
    "guidance-flipped": ("perturbation_guidance", guidance_flipped, "the sign is flipped"),
    "guidance-from-weak": ("perturbation_guidance", guidance_from_weak, "it starts from the weak model"),
    "greedy-one-shot": ("greedy_head_search", greedy_one_shot, "scored alone"),
    "greedy-keeps-pool": ("greedy_head_search", greedy_keeps_pool, "repeats a head"),
    "greedy-ascending": ("greedy_head_search", greedy_ascending, "the ranking is ascending"),
    "greedy-alone-each-round": ("greedy_head_search", greedy_scored_alone, "scored alone"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
