"""Checks for lesson 32's exercises: a cosine k-means step, the sub-groups' key windows, the aggregated attention.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (centres averaged instead of normalised,
empty centres reset, no reflection padding, the output left in sorted order, ...), the failure message
names it.

Run against your work with ``make check LESSON=32``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "32_token_aggregation"


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- references, written as loops -----------------------------------------------------------------------


def loop_kmeans(x, centres, *, normalise_sums=True, keep_empty=True, unit_tokens=True):
    tokens = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1])]
    units = [t / t.norm() for t in tokens]
    old = [c / c.norm() for c in centres]
    new = []
    for m in range(len(old)):
        chosen = [i for i, u in enumerate(units) if max(range(len(old)), key=lambda j: (float(u @ old[j]), -j)) == m]
        if not chosen:
            new.append(old[m] if keep_empty else torch.zeros_like(old[m]))
            continue
        members = [(units if unit_tokens else tokens)[i] for i in chosen]
        total = sum(members)
        new.append(total / total.norm() if normalise_sums else total / len(members))
    return torch.stack(new)


def loop_keys(n, g, *, pad_mode="reflect"):
    g = min(n, g)
    groups = math.ceil(n / g)
    pad = groups * g - n
    if pad_mode == "reflect":
        tail = [n - 1 - (i % n) for i in range(pad + g)]
    elif pad_mode == "repeat-last":
        tail = [n - 1] * (pad + g)
    else:  # wrap around to the start
        tail = [i % n for i in range(pad + g)]
    keys = list(range(n)) + tail
    return torch.tensor([keys[i * g:i * g + 2 * g] for i in range(groups)], dtype=torch.long)


def loop_aggregate(q, k, v, groups, g, kc, vc, *, stable=True, scatter=True, joint_softmax=False,
                   own_only=False, centres=True):
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    gs = min(n, g)
    for bi in range(b):
        order = sorted(range(n), key=(lambda t: (int(groups[bi, t]), t)) if stable
                       else (lambda t: (int(groups[bi, t]), -t)))
        windows = loop_keys(n, g)
        for hi in range(h):
            for i in range(n):
                keys = windows[i // gs].tolist()
                if own_only:
                    keys = keys[:gs]
                ks = [k[bi, hi, order[j]] for j in keys]
                vs = [v[bi, hi, order[j]] for j in keys]
                qi = q[bi, hi, order[i]]
                if joint_softmax:
                    ks, vs = ks + list(kc[hi]), vs + list(vc[hi])
                s = torch.stack([qi @ kj for kj in ks]) / math.sqrt(d)
                y = torch.softmax(s, 0) @ torch.stack(vs)
                if centres and not joint_softmax:
                    y = y + torch.softmax(kc[hi] @ qi / math.sqrt(d), 0) @ vc[hi]
                out[bi, hi, order[i] if scatter else i] = y
    return out


# --- the checkers -----------------------------------------------------------------------------------


def check_cosine_kmeans_step(fn):
    for shape, m, seed in [((2, 9, 4), 3, 0), ((1, 12, 5), 4, 1)]:
        x = seeded(*shape, seed=seed).abs() + 0.05
        centres = torch.cat([seeded(m - 1, shape[-1], seed=seed + 10).abs(), -torch.ones(1, shape[-1],
                                                                                           dtype=torch.float64)])
        centres[0] *= 5.0  # centres of any length
        got = harness.call(fn, x.clone(), centres.clone())
        want = loop_kmeans(x, centres)
        mistakes = {
            "the centres are the mean of their tokens instead of their normalised sum":
                loop_kmeans(x, centres, normalise_sums=False),
            "an empty centre is reset to zero instead of keeping its old normalised value":
                loop_kmeans(x, centres, keep_empty=False),
            "the tokens are summed before being normalised (sum the unit tokens)":
                loop_kmeans(x, centres, unit_tokens=False),
            "an empty centre keeps its old value without normalising it":
                torch.where(torch.arange(m)[:, None] == m - 1, centres, want),
        }
        harness.expect_close(got, want, f"cosine_kmeans_step on x {shape} with {m} centres",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


def check_subgroup_key_positions(fn):
    for n, g in [(10, 4), (11, 5), (8, 4), (6, 6), (5, 9), (9, 2)]:
        got = harness.call(fn, n, g)
        want = loop_keys(n, g)
        gs = min(n, g)
        groups = math.ceil(n / gs)
        mistakes = {
            "the padding repeats the last token instead of reflecting the end (N-1, N-2, ...)":
                loop_keys(n, g, pad_mode="repeat-last"),
            "the padding wraps around to the first tokens instead of reflecting the end":
                loop_keys(n, g, pad_mode="wrap"),
        }
        if groups > 1:
            prev = torch.stack([torch.cat([want[max(i - 1, 0), :gs], want[i, :gs]]) for i in range(groups)])
            mistakes["each sub-group reads the previous sub-group instead of the next"] = prev
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (groups, gs):
            raise AssertionError(f"subgroup_key_positions({n}, {g}): shape {(groups, gs)}; it looks like each "
                                 "sub-group reads only its own keys (the code adds the next sub-group: 2g keys)")
        harness.expect_shape(got, want.shape, f"subgroup_key_positions({n}, {g})")
        harness.expect_close(got, want, f"subgroup_key_positions({n}, {g})", mistakes=mistakes, atol=0, rtol=0)


def check_aggregate_attention(fn):
    for b, h, n, d, m, g, seed in [(2, 2, 10, 3, 3, 4, 0), (1, 1, 9, 4, 2, 3, 1)]:
        q, k, v = seeded(b, h, n, d, seed=seed), seeded(b, h, n, d, seed=seed + 1), seeded(b, h, n, d, seed=seed + 2)
        kc, vc = seeded(h, m, d, seed=seed + 3), seeded(h, m, d, seed=seed + 4)
        groups = torch.randint(0, m, (b, n), generator=torch.Generator().manual_seed(seed))
        got = harness.call(fn, q.clone(), k.clone(), v.clone(), groups.clone(), g, kc.clone(), vc.clone())
        want = loop_aggregate(q, k, v, groups, g, kc, vc)
        mistakes = {
            "the output is left in sorted order (scatter it back to the tokens' positions)":
                loop_aggregate(q, k, v, groups, g, kc, vc, scatter=False),
            "one softmax runs over the window's keys and the centres together (the code adds two softmaxes)":
                loop_aggregate(q, k, v, groups, g, kc, vc, joint_softmax=True),
            "each sub-group attends only to itself (the code adds the next sub-group)":
                loop_aggregate(q, k, v, groups, g, kc, vc, own_only=True),
            "the cross-attention to the centres is missing":
                loop_aggregate(q, k, v, groups, g, kc, vc, centres=False),
            "the sort is not stable (inside a group, tokens must keep their order)":
                loop_aggregate(q, k, v, groups, g, kc, vc, stable=False),
        }
        harness.expect_close(got, want, f"aggregate_attention on q {(b, h, n, d)} with {m} centres, g = {g}",
                             mistakes=mistakes, atol=1e-9, rtol=1e-7)


CHECKERS = {
    "cosine_kmeans_step": check_cosine_kmeans_step,
    "subgroup_key_positions": check_subgroup_key_positions,
    "aggregate_attention": check_aggregate_attention,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_cosine_kmeans_step(impl):
    check_cosine_kmeans_step(impl.cosine_kmeans_step)


def test_subgroup_key_positions(impl):
    check_subgroup_key_positions(impl.subgroup_key_positions)


def test_aggregate_attention(impl):
    check_aggregate_attention(impl.aggregate_attention)


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


def kmeans_mean(x, c):
    return loop_kmeans(x, c, normalise_sums=False)


def kmeans_reset(x, c):
    return loop_kmeans(x, c, keep_empty=False)


def kmeans_raw_sum(x, c):
    return loop_kmeans(x, c, unit_tokens=False)


def keys_repeat_last(n, g):
    return loop_keys(n, g, pad_mode="repeat-last")


def keys_wrap(n, g):
    return loop_keys(n, g, pad_mode="wrap")


def keys_own(n, g):
    return loop_keys(n, g)[:, :min(n, g)]


def aggregate_sorted(q, k, v, groups, g, kc, vc):
    return loop_aggregate(q, k, v, groups, g, kc, vc, scatter=False)


def aggregate_joint(q, k, v, groups, g, kc, vc):
    return loop_aggregate(q, k, v, groups, g, kc, vc, joint_softmax=True)


def aggregate_own(q, k, v, groups, g, kc, vc):
    return loop_aggregate(q, k, v, groups, g, kc, vc, own_only=True)


def aggregate_no_centres(q, k, v, groups, g, kc, vc):
    return loop_aggregate(q, k, v, groups, g, kc, vc, centres=False)


def aggregate_unstable(q, k, v, groups, g, kc, vc):
    return loop_aggregate(q, k, v, groups, g, kc, vc, stable=False)


MISTAKES = {
    "kmeans-mean": ("cosine_kmeans_step", kmeans_mean, "mean of their tokens"),
    "kmeans-reset": ("cosine_kmeans_step", kmeans_reset, "reset to zero"),
    "kmeans-raw-sum": ("cosine_kmeans_step", kmeans_raw_sum, "summed before being normalised"),
    "keys-repeat-last": ("subgroup_key_positions", keys_repeat_last, "repeats the last token"),
    "keys-wrap": ("subgroup_key_positions", keys_wrap, "wraps around"),
    "keys-own": ("subgroup_key_positions", keys_own, "only its own keys"),
    "aggregate-sorted": ("aggregate_attention", aggregate_sorted, "left in sorted order"),
    "aggregate-joint": ("aggregate_attention", aggregate_joint, "one softmax"),
    "aggregate-own": ("aggregate_attention", aggregate_own, "only to itself"),
    "aggregate-no-centres": ("aggregate_attention", aggregate_no_centres, "centres is missing"),
    "aggregate-unstable": ("aggregate_attention", aggregate_unstable, "not stable"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
