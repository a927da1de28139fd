"""Checks for lesson 44's exercises: one round of HiP's tree search, the mask from selected blocks, recall.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (loops over nodes, queries and keys, float64). When the answer matches a *known mistake* (the
first block instead of the centre, a mean instead of a max, empty children kept, a window one key too
wide, queries not aligned with the last keys, precision instead of recall, ...), the failure message
names it.

Run against your work with ``make check LESSON=44``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "44_hip_attention"


# --- independent references (loops) -----------------------------------------------------------------


def loop_round(starts, sizes, queries, keys, block_k, keep, *, rep="center", reduce="max", drop_empty=True,
               split="floor", best=True, sort_by_start=True):
    """One round of the search with Python lists; options produce known mistakes."""
    children = []
    for a, n in zip(starts.tolist(), sizes.tolist()):
        left = n // 2 if split == "floor" else n - n // 2
        children += [(a, left), (a + left, n - left)]
    ranked = []
    for index, (a, n) in enumerate(children):
        if n < 1 and drop_empty:
            continue
        r = a + n // 2 if rep == "center" else a
        rows = []
        for q in queries.double():
            dots = [float(q @ keys[j].double()) for j in range(r * block_k, min((r + 1) * block_k, len(keys)))]
            rows.append(max(dots) if reduce != "mean" else sum(dots) / len(dots))
        score = max(rows) if reduce != "sum-queries" else sum(rows)
        ranked.append(((-score if best else score), index))
    survivors = [children[index] for _, index in sorted(ranked)[:keep]]
    if sort_by_start:
        survivors.sort()
    return (torch.tensor([a for a, _ in survivors], dtype=torch.int64),
            torch.tensor([n for _, n in survivors], dtype=torch.int64))


def loop_selection(blocks, q_len, k_len, block_q, block_k, window, num_sinks, *, causal=True, offset=True,
                   wide=False, token_index=False, causal_sinks=True):
    """The mask one (query, key) pair at a time; options produce known mistakes."""
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + (k_len - q_len if offset else 0)
        chosen = set(blocks[i // block_q].tolist()) - {-1}
        for j in range(k_len):
            near = p - j <= window if wide else p - j < window
            picked = (j in chosen) if token_index else (j // block_k in chosen)
            ok = (near or picked) and (j <= p or not causal)
            sink = j < num_sinks and (j <= p or not causal or not causal_sinks)
            out[i, j] = ok or sink
    return out


def loop_recall(mask, scores, k, *, measure="recall", divide_by_k=False, largest=True, only_mask=False):
    """Recall row by row with Python sorting; options produce known mistakes."""
    out = torch.ones(scores.shape[0], dtype=torch.float64)
    for row in range(scores.shape[0]):
        visible = [j for j in range(scores.shape[1]) if math.isfinite(float(scores[row, j]))]
        if only_mask:
            visible = [j for j in visible if mask[row, j]]
        if not visible:
            continue
        ranked = sorted(visible, key=lambda j: float(scores[row, j]), reverse=largest)
        top = ranked[:min(k, len(visible))]
        hits = sum(bool(mask[row, j]) for j in top)
        if measure == "precision":
            kept = sum(bool(mask[row, j]) for j in visible)
            out[row] = hits / kept if kept else 1.0
        else:
            out[row] = hits / (k if divide_by_k else len(top))
    return out


# --- the checkers -----------------------------------------------------------------------------------

ROUND_CASES = [
    # (starts, sizes, n_queries, dim, n_keys, block_k, keep, seed)
    ([0, 5, 9, 12], [5, 4, 3, 1], 3, 8, 26, 2, 4, 0),
    ([0, 5, 9, 12], [5, 4, 3, 1], 2, 4, 25, 2, 4, 1),  # a short last block: only its existing key counts
    ([0, 3, 7, 11, 15, 19], [3, 4, 4, 4, 4, 4], 4, 6, 23, 1, 6, 2),
    ([2, 6], [4, 7], 1, 5, 40, 3, 2, 3),
]


def check_hip_round(fn):
    for starts, sizes, nq, d, n_keys, block_k, keep, seed in ROUND_CASES:
        g = torch.Generator().manual_seed(seed)
        queries = torch.randn(nq, d, generator=g, dtype=torch.float64)
        keys = torch.randn(n_keys, d, generator=g, dtype=torch.float64)
        starts, sizes = torch.tensor(starts), torch.tensor(sizes)
        got = harness.call(fn, starts.clone(), sizes.clone(), queries, keys, block_k=block_k, keep=keep)
        what = f"hip_round(starts={starts.tolist()}, sizes={sizes.tolist()}, block_k={block_k}, keep={keep})"
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"{what}: expected a tuple (starts, sizes), got {type(got).__name__}")

        def both(**options):
            return torch.cat(loop_round(starts, sizes, queries, keys, block_k, keep, **options)).double()

        got_both = torch.cat([torch.as_tensor(x).reshape(-1) for x in got]).double()
        harness.expect_close(got_both, both(), what + " -> (starts, sizes) concatenated", mistakes={
            "the representative is the child's first block; HiP's Triton code and the paper use its centre, "
            "start + size // 2": both(rep="first"),
            "a child is scored by the mean of its dot products instead of the max": both(reduce="mean"),
            "the scores of the queries are summed instead of taking the max over queries": both(reduce="sum-queries"),
            "empty children (size 0) are scored and can survive; drop them": both(drop_empty=False),
            "the left child gets the larger half; split at start + size // 2": both(split="ceil"),
            "the WORST children are kept; keep the largest scores": both(best=False),
            "the survivors are not sorted by start": both(sort_by_start=False),
        })


def check_selection_mask(fn):
    cases = [  # (blocks, q_len, k_len, block_q, block_k, window, num_sinks)
        ([[0, 2], [1, 4], [3, -1]], 12, 12, 4, 2, 2, 3),
        ([[1, 3], [0, 5], [2, 6]], 7, 20, 3, 3, 3, 2),
        ([[2], [4], [0], [7], [1]], 9, 16, 2, 2, 1, 1),
    ]
    for blocks, q_len, k_len, block_q, block_k, window, num_sinks in cases:
        blocks = torch.tensor(blocks)
        got = harness.call(fn, blocks.clone(), q_len, k_len, block_q=block_q, block_k=block_k, window=window,
                           num_sinks=num_sinks)
        what = (f"selection_mask(blocks={blocks.tolist()}, q_len={q_len}, k_len={k_len}, block_q={block_q}, "
                f"block_k={block_k}, window={window}, num_sinks={num_sinks})")
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        args = (blocks, q_len, k_len, block_q, block_k, window, num_sinks)
        harness.expect_close(got, loop_selection(*args), what, mistakes={
            "the causal condition j <= p_i is missing": loop_selection(*args, causal=False),
            "the queries are not aligned with the last keys: query i sits at p_i = i + k_len - q_len":
                loop_selection(*args, offset=False),
            "the window is one key too wide: it holds the query and the window - 1 keys before it (p - j < window)":
                loop_selection(*args, wide=True),
            "the selected entries are used as token indices; they are key blocks (j // block_k)":
                loop_selection(*args, token_index=True),
            "the sinks ignore causality: a sink after the query stays hidden": loop_selection(*args, causal_sinks=False),
        })


def check_topk_recall(fn):
    for n, k, seed in [(12, 4, 0), (10, 3, 1), (9, 9, 2)]:
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(n, n, generator=g, dtype=torch.float64)
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        mask = (torch.rand(n, n, generator=g) < 0.5) & torch.ones(n, n, dtype=torch.bool).tril()
        got = harness.call(fn, mask.clone(), scores.clone(), k)
        what = f"topk_recall on {n} causal queries with k={k}"
        harness.expect_close(got, loop_recall(mask, scores, k), what, mistakes={
            "it measures precision (the share of the mask's keys that are top-k) instead of recall":
                loop_recall(mask, scores, k, measure="precision"),
            "it divides by k even when a query sees fewer than k keys; use min(k, visible keys)":
                loop_recall(mask, scores, k, divide_by_k=True),
            "it takes the SMALLEST scores; the top-k are the largest": loop_recall(mask, scores, k, largest=False),
            "the top-k are taken among the mask's keys only (then the recall is always 1); take them among "
            "every visible key": loop_recall(mask, scores, k, only_mask=True),
        })


CHECKERS = {
    "hip_round": check_hip_round,
    "selection_mask": check_selection_mask,
    "topk_recall": check_topk_recall,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_hip_round(impl):
    check_hip_round(impl.hip_round)


def test_selection_mask(impl):
    check_selection_mask(impl.selection_mask)


def test_topk_recall(impl):
    check_topk_recall(impl.topk_recall)


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


def _round(**options):
    def wrong(starts, sizes, queries, keys, *, block_k, keep):
        return loop_round(starts, sizes, queries, keys, block_k, keep, **options)
    return wrong


def _selection(**options):
    def wrong(blocks, q_len, k_len, *, block_q, block_k, window, num_sinks):
        return loop_selection(blocks, q_len, k_len, block_q, block_k, window, num_sinks, **options)
    return wrong


def _recall(**options):
    def wrong(mask, scores, k):
        return loop_recall(mask, scores, k, **options).float()
    return wrong


MISTAKES = {
    "round-first-block": ("hip_round", _round(rep="first"), "centre"),
    "round-mean": ("hip_round", _round(reduce="mean"), "mean of its dot products"),
    "round-sum-queries": ("hip_round", _round(reduce="sum-queries"), "summed"),
    "round-keeps-empty": ("hip_round", _round(drop_empty=False), "empty children"),
    "round-ceil-split": ("hip_round", _round(split="ceil"), "larger half"),
    "round-worst": ("hip_round", _round(best=False), "WORST"),
    "round-unsorted": ("hip_round", _round(sort_by_start=False), "not sorted by start"),
    "mask-not-causal": ("selection_mask", _selection(causal=False), "causal condition"),
    "mask-no-offset": ("selection_mask", _selection(offset=False), "aligned with the last keys"),
    "mask-wide-window": ("selection_mask", _selection(wide=True), "one key too wide"),
    "mask-token-index": ("selection_mask", _selection(token_index=True), "key blocks"),
    "mask-sinks-not-causal": ("selection_mask", _selection(causal_sinks=False), "sinks ignore causality"),
    "recall-precision": ("topk_recall", _recall(measure="precision"), "precision"),
    "recall-divides-by-k": ("topk_recall", _recall(divide_by_k=True), "divides by k"),
    "recall-smallest": ("topk_recall", _recall(largest=False), "SMALLEST"),
    "recall-only-mask": ("topk_recall", _recall(only_mask=True), "among the mask's keys only"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"

