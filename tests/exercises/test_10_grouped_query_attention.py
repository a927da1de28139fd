"""Checks for lesson 10's exercises: mean-pooling KV heads, KDGQA's allocation, attention by allocation.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (heads grouped with a stride, a sum
instead of a mean, no min-max step, fix-ups on the wrong group, a missing scale, ...), the failure
message names it.

Run against your work with ``make check LESSON=10``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "10_grouped_query_attention"


# --- references -------------------------------------------------------------------------------------


def pool_by_loops(weight, heads, groups, members):
    """Group j's head is the mean of the heads ``members(j)``, written as loops over rows."""
    d = weight.shape[0] // heads
    rows = []
    for j in range(groups):
        block = sum(weight[h * d:(h + 1) * d] for h in members(j)) / len(members(j))
        rows.append(block)
    return torch.cat(rows)


def allocate_in_python(norms, heads, *, min_max=True, fix_largest=True, rounding=round):
    """KDGQA's rules in plain Python floats, with switches for the usual mistakes."""
    low, high = min(norms), max(norms)
    scaled = [(n - low) / (high - low) for n in norms] if min_max else list(norms)
    alloc = [int(rounding(heads * s / sum(scaled))) for s in scaled]
    while sum(alloc) > heads:
        pick = max(alloc) if fix_largest else min(a for a in alloc if a > 0)
        alloc[alloc.index(pick)] -= 1
    while sum(alloc) < heads:
        pick = min(alloc) if fix_largest else max(alloc)
        alloc[alloc.index(pick)] += 1
    return torch.tensor(alloc)


def attention_by_loops(q, k, v, kv_of_head, scale):
    b, heads, length, _ = q.shape
    out = torch.zeros_like(q)
    for n in range(b):
        for h in range(heads):
            j = kv_of_head[h]
            for r in range(length):
                weights = torch.softmax(torch.stack([scale * q[n, h, r] @ k[n, j, c] for c in range(length)]), 0)
                out[n, h, r] = sum(w * v[n, j, c] for c, w in enumerate(weights))
    return out


# --- the checkers -----------------------------------------------------------------------------------


def check_mean_pool_kv_heads(fn):
    for heads, groups, d, dim, seed in [(4, 2, 3, 5, 0), (6, 3, 2, 4, 1), (4, 1, 2, 3, 2), (4, 4, 2, 3, 3)]:
        weight = torch.randn(heads * d, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        size = heads // groups
        got = harness.call(fn, weight.clone(), heads, groups)
        want = pool_by_loops(weight, heads, groups, lambda j: range(j * size, (j + 1) * size))
        mistakes = {
            "the heads are grouped with a stride (heads j, j + G, j + 2G, ...) instead of in consecutive "
            "blocks": pool_by_loops(weight, heads, groups, lambda j: range(j, heads, groups)),
            "the heads of a group are summed instead of averaged": want * size,
            "the first head of each group is kept instead of the mean of all of them":
                pool_by_loops(weight, heads, groups, lambda j: [j * size]),
        }
        harness.expect_close(got, want, f"mean_pool_kv_heads with H={heads}, G={groups}, weight {tuple(weight.shape)}",
                             mistakes=mistakes, atol=1e-10, rtol=1e-8)


def check_kdgqa_allocation(fn):
    cases = [
        ([1.0, 2.0, 3.0], 6),
        ([1.0, 3.0, 3.0, 2.0], 4),          # one head too many after rounding
        ([5.0, 1.0, 2.0, 2.0], 8),          # one head too few
        ([1.0, 2.0, 2.0, 2.0, 2.0], 10),    # 2.5 rounds to 2 (half to even): two too few
        ([2.0, 7.0], 12),
        ([3.0, 4.0, 4.2], 8),
    ]
    for norms, heads in cases:
        got = harness.call(fn, torch.tensor(norms, dtype=torch.float64), heads)
        want = allocate_in_python(norms, heads)
        what = f"kdgqa_allocation(norms={norms}, num_heads={heads})"
        if isinstance(got, torch.Tensor) and got.shape == want.shape and int(got.sum()) != heads:
            raise AssertionError(f"{what}: the counts sum to {int(got.sum())}, not to num_heads={heads}; "
                                 "after rounding, fix the sum with the two while loops")
        mistakes = {
            "the shares are floored instead of rounded": allocate_in_python(norms, heads, rounding=math.floor),
            "the norms are not min-max normalised (the weakest group must start from 0)":
                allocate_in_python(norms, heads, min_max=False),
            "the fix-ups go to the wrong group (take from the largest count, give to the smallest)":
                allocate_in_python(norms, heads, fix_largest=False),
            "0.5 is rounded up (Python's floor(x + 0.5)); torch.round rounds half to even":
                allocate_in_python(norms, heads, rounding=lambda x: math.floor(x + 0.5)),
        }
        harness.expect_close(got, want, what, mistakes=mistakes, atol=0, rtol=0)


def check_grouped_query_attention(fn):
    cases = [(2, 4, [2, 2], 5, 4, 0), (1, 4, [3, 1], 4, 8, 1), (1, 6, [0, 4, 2], 3, 4, 2), (1, 2, [2], 4, 4, 3)]
    for b, heads, allocation, length, d, seed in cases:
        g = torch.Generator().manual_seed(seed)
        groups = len(allocation)
        q = torch.randn(b, heads, length, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, groups, length, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, groups, length, d, generator=g, dtype=torch.float64)
        alloc = torch.tensor(allocation)
        got = harness.call(fn, q, k, v, alloc.clone())
        blocks = [j for j, n in enumerate(allocation) for _ in range(n)]
        want = attention_by_loops(q, k, v, blocks, 1 / math.sqrt(d))
        mistakes = {
            "query head h reads key/value head h % G (interleaved) instead of consecutive blocks of the "
            "allocation": attention_by_loops(q, k, v, [h % groups for h in range(heads)], 1 / math.sqrt(d)),
            "the allocation is ignored: every group gets H / G query heads":
                attention_by_loops(q, k, v, [h // max(1, heads // groups) for h in range(heads)], 1 / math.sqrt(d)),
            "the 1/sqrt(d) scale is missing": attention_by_loops(q, k, v, blocks, 1.0),
        }
        harness.expect_close(got, want, f"grouped_query_attention with allocation {allocation}, q {tuple(q.shape)}",
                             mistakes=mistakes, atol=1e-8, rtol=1e-6)


CHECKERS = {
    "mean_pool_kv_heads": check_mean_pool_kv_heads,
    "kdgqa_allocation": check_kdgqa_allocation,
    "grouped_query_attention": check_grouped_query_attention,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_mean_pool_kv_heads(impl):
    check_mean_pool_kv_heads(impl.mean_pool_kv_heads)


def test_kdgqa_allocation(impl):
    check_kdgqa_allocation(impl.kdgqa_allocation)


def test_grouped_query_attention(impl):
    check_grouped_query_attention(impl.grouped_query_attention)


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


def pool_strided(weight, heads, groups):
    d = weight.shape[0] // heads
    return weight.reshape(heads // groups, groups, d, -1).mean(0).reshape(groups * d, -1)


def pool_summed(weight, heads, groups):
    d = weight.shape[0] // heads
    return weight.reshape(groups, heads // groups, d, -1).sum(1).reshape(groups * d, -1)


def pool_first_head(weight, heads, groups):
    d = weight.shape[0] // heads
    return weight.reshape(groups, heads // groups, d, -1)[:, 0].reshape(groups * d, -1)


def allocation_without_min_max(norms, heads):
    n = torch.round(heads * norms / norms.sum()).long()
    while n.sum() > heads:
        n[torch.argmax(n)] -= 1
    while n.sum() < heads:
        n[torch.argmin(n)] += 1
    return n


def allocation_fix_ups_swapped(norms, heads):
    w = (norms - norms.min()) / (norms.max() - norms.min())
    n = torch.round(heads * w / w.sum()).long()
    while n.sum() > heads:
        positive = torch.where(n > 0, n, torch.full_like(n, 10 ** 6))
        n[torch.argmin(positive)] -= 1
    while n.sum() < heads:
        n[torch.argmax(n)] += 1
    return n


def allocation_without_fix_ups(norms, heads):
    w = (norms - norms.min()) / (norms.max() - norms.min())
    return torch.round(heads * w / w.sum()).long()


def allocation_floored(norms, heads):
    w = (norms - norms.min()) / (norms.max() - norms.min())
    n = torch.floor(heads * w / w.sum()).long()
    while n.sum() < heads:
        n[torch.argmin(n)] += 1
    return n


def attention_interleaved(q, k, v, allocation):
    index = torch.arange(q.shape[1]) % k.shape[1]
    return torch.softmax(q @ k[:, index].transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v[:, index]


def attention_uniform(q, k, v, allocation):
    index = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    return torch.softmax(q @ k[:, index].transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v[:, index]


def attention_unscaled(q, k, v, allocation):
    index = torch.repeat_interleave(torch.arange(k.shape[1]), allocation)
    return torch.softmax(q @ k[:, index].transpose(-2, -1), -1) @ v[:, index]


MISTAKES = {
    "pool-strided": ("mean_pool_kv_heads", pool_strided, "grouped with a stride"),
    "pool-summed": ("mean_pool_kv_heads", pool_summed, "summed instead of averaged"),
    "pool-first-head": ("mean_pool_kv_heads", pool_first_head, "first head of each group"),
    "alloc-no-min-max": ("kdgqa_allocation", allocation_without_min_max, "not min-max normalised"),
    "alloc-fix-ups-swapped": ("kdgqa_allocation", allocation_fix_ups_swapped, "fix-ups go to the wrong group"),
    "alloc-no-fix-ups": ("kdgqa_allocation", allocation_without_fix_ups, "fix the sum with the two while loops"),
    "alloc-floored": ("kdgqa_allocation", allocation_floored, "floored instead of rounded"),
    "attn-interleaved": ("grouped_query_attention", attention_interleaved, "h % G (interleaved)"),
    "attn-uniform": ("grouped_query_attention", attention_uniform, "the allocation is ignored"),
    "attn-unscaled": ("grouped_query_attention", attention_unscaled, "scale is missing"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
