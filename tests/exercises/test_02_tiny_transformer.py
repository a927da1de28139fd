"""Checks for lesson 02's exercises: the pre-norm block, the masked cross-entropy, an associative-recall example.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (post-norm instead of pre-norm, a loss
averaged over every position, targets that are not shifted, ...), the failure message names it.

Run against your work with ``make check LESSON=02``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlib import MultiHeadAttention
from attnlib.tools.transformer import MLP

from . import harness

LESSON = "02_tiny_transformer"


# --- helpers ----------------------------------------------------------------------------------------


def block_parts(dim: int, seed: int):
    """Seeded float64 sub-modules of a block: two layer norms with different affine parameters, attention, an MLP."""
    torch.manual_seed(seed)
    norm1, norm2 = nn.LayerNorm(dim).double(), nn.LayerNorm(dim).double()
    with torch.no_grad():
        for norm in (norm1, norm2):  # not the identity affine map, so that norm1 and norm2 differ
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.3)
    mixer = MultiHeadAttention(dim, 2, causal=True).double()
    mlp = MLP(dim, 2 * dim).double()
    return norm1, mixer, norm2, mlp


# --- the checkers -----------------------------------------------------------------------------------


def check_pre_norm_block(fn):
    for batch, length, dim, seed in [(2, 5, 8, 0), (1, 7, 12, 1)]:
        norm1, mixer, norm2, mlp = block_parts(dim, seed)
        h = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        before = h.clone()
        with torch.no_grad():
            got = harness.call(fn, h, norm1, mixer, norm2, mlp)
            u = h + mixer(norm1(h))
            want = u + mlp(norm2(u))
            post = norm1(h + mixer(h))
            mistakes = {
                "post-norm instead of pre-norm: the norms wrap the residual sums, LN(H + Mix(H)), "
                "instead of sitting inside the branches, H + Mix(LN(H))": norm2(post + mlp(post)),
                "the residual connections are missing (each branch's output replaces H instead of being added to it)":
                    mlp(norm2(mixer(norm1(h)))),
                "the MLP branch reads H instead of U = H + Mix(LN1(H)) (a parallel block, not a sequential one)":
                    h + mixer(norm1(h)) + mlp(norm2(h)),
                "norm1 is used in both branches; the MLP branch needs norm2": u + mlp(norm1(u)),
                "the layer norms are missing": (h + mixer(h)) + mlp(h + mixer(h)),
            }
        if not torch.equal(h, before):
            raise AssertionError("pre_norm_block: it changed h in place; compute new tensors instead")
        harness.expect_close(got, want, f"pre_norm_block on h of shape {(batch, length, dim)}",
                             mistakes=mistakes, atol=1e-8, rtol=1e-6)


def check_masked_cross_entropy(fn):
    cases = [
        (3, 5, 7, 0, 0.4),
        (2, 6, 4, 1, 0.9),
        (1, 4, 5, 2, 0.0),  # one scored position only (forced below)
    ]
    for batch, length, vocab, seed, p_scored in cases:
        g = torch.Generator().manual_seed(seed)
        logits = 2.0 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
        targets = torch.randint(0, vocab, (batch, length), generator=g)
        loss_mask = torch.rand(batch, length, generator=g) < p_scored
        loss_mask[0, -1] = True  # at least one scored position
        got = harness.call(fn, logits, targets, loss_mask)
        # independent computation: a loop over the scored positions, log-sum-exp written out
        terms = []
        for b in range(batch):
            for t in range(length):
                if loss_mask[b, t]:
                    z = logits[b, t]
                    terms.append(torch.logsumexp(z, 0) - z[targets[b, t]])
        want = torch.stack(terms).mean()
        nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        mistakes = {
            "the loss averages over all positions instead of the scored ones (loss_mask is ignored)": nll.mean(),
            "the unscored terms are zeroed but the sum is divided by all B * L positions, "
            "not by the number of scored ones": (nll * loss_mask).sum() / nll.numel(),
            "the loss sums over the scored positions instead of averaging": nll[loss_mask].sum(),
            "the log is missing: the loss uses -softmax(z)_y instead of -log softmax(z)_y":
                -torch.softmax(logits, -1).gather(-1, targets[..., None])[..., 0][loss_mask].mean(),
            "the sign is flipped: the loss is +log softmax(z)_y (it must be positive)": -want,
        }
        what = f"masked_cross_entropy on logits {(batch, length, vocab)} with {int(loss_mask.sum())} scored positions"
        harness.expect_close(got, want, what, mistakes=mistakes, atol=1e-8, rtol=1e-6)


def check_associative_recall_sequence(fn):
    keys = torch.tensor([3, 0, 5, 2, 6])
    values = torch.tensor([9, 7, 12, 8, 10])
    n = len(keys)
    for query in [2, 0, n - 1]:
        got = harness.call(fn, keys.clone(), values.clone(), query)
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError("associative_recall_sequence: expected a tuple (inputs, targets, loss_mask), "
                                 f"got {type(got).__name__}")
        inputs, targets, loss_mask = got
        x = [t for i in range(n) for t in (int(keys[i]), int(values[i]))] + [int(keys[query]), int(values[query])]
        want_inputs, want_targets = torch.tensor(x[:-1]), torch.tensor(x[1:])
        want_mask = torch.tensor([False] * (2 * n) + [True])
        where = f"(query={query}, n={n} pairs)"
        if isinstance(inputs, torch.Tensor) and inputs.shape == (2 * n + 2,):
            raise AssertionError(f"inputs {where}: it has {2 * n + 2} tokens, the whole sequence; drop the last "
                                 "one (the answer), inputs = x[:-1], so that the model must predict it")
        harness.expect_close(inputs, want_inputs, f"inputs {where}", mistakes={
            "the query repeats the first key instead of keys[query]":
                torch.tensor(x[:-2] + [int(keys[0])]),
            "the query is the value instead of the key": torch.tensor(x[:-2] + [int(values[query])]),
        })
        if inputs.dtype != torch.long or targets.dtype != torch.long:
            raise AssertionError(f"inputs, targets {where}: expected token ids in torch.long, "
                                 f"got {inputs.dtype} and {targets.dtype}")
        harness.expect_close(targets, want_targets, f"targets {where}", mistakes={
            "off by one: targets are not shifted (they equal the inputs; targets must be x[1:])": want_inputs,
            "the answer is the queried key instead of its value": torch.tensor(x[1:-1] + [int(keys[query])]),
            "the answer is the value of the first pair instead of values[query]":
                torch.tensor(x[1:-1] + [int(values[0])]),
        })
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.dtype != torch.bool:
            raise AssertionError(f"loss_mask {where}: expected a bool tensor, got "
                                 f"{getattr(loss_mask, 'dtype', type(loss_mask).__name__)}")
        harness.expect_close(loss_mask, want_mask, f"loss_mask {where}", mistakes={
            "every position is scored; only the query's position (the last input) has a determined next token":
                torch.ones(2 * n + 1, dtype=torch.bool),
            "the first position is scored instead of the last":
                torch.tensor([True] + [False] * (2 * n)),
            "no position is scored": torch.zeros(2 * n + 1, dtype=torch.bool),
        })


CHECKERS = {
    "pre_norm_block": check_pre_norm_block,
    "masked_cross_entropy": check_masked_cross_entropy,
    "associative_recall_sequence": check_associative_recall_sequence,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_pre_norm_block(impl):
    check_pre_norm_block(impl.pre_norm_block)


def test_masked_cross_entropy(impl):
    check_masked_cross_entropy(impl.masked_cross_entropy)


def test_associative_recall_sequence(impl):
    check_associative_recall_sequence(impl.associative_recall_sequence)


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


def block_post_norm(h, norm1, mixer, norm2, mlp):
    u = norm1(h + mixer(h))
    return norm2(u + mlp(u))


def block_without_residuals(h, norm1, mixer, norm2, mlp):
    return mlp(norm2(mixer(norm1(h))))


def block_parallel(h, norm1, mixer, norm2, mlp):
    return h + mixer(norm1(h)) + mlp(norm2(h))


def block_one_norm(h, norm1, mixer, norm2, mlp):
    u = h + mixer(norm1(h))
    return u + mlp(norm1(u))


def block_in_place(h, norm1, mixer, norm2, mlp):
    h += mixer(norm1(h))
    h += mlp(norm2(h))
    return h


def ce_all_positions(logits, targets, loss_mask):
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def ce_divided_by_all(logits, targets, loss_mask):
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return (nll * loss_mask).sum() / loss_mask.numel()


def ce_summed(logits, targets, loss_mask):
    return nn.functional.cross_entropy(logits[loss_mask], targets[loss_mask], reduction="sum")


def ce_without_log(logits, targets, loss_mask):
    return -torch.softmax(logits, -1).gather(-1, targets[..., None])[..., 0][loss_mask].mean()


def recall_not_shifted(keys, values, query):
    x = torch.cat([torch.stack([keys, values], 1).reshape(-1), keys[query:query + 1], values[query:query + 1]])
    mask = torch.zeros(len(x) - 1, dtype=torch.bool)
    mask[-1] = True
    return x[:-1], x[:-1], mask


def recall_whole_sequence(keys, values, query):
    x = torch.cat([torch.stack([keys, values], 1).reshape(-1), keys[query:query + 1], values[query:query + 1]])
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[-2] = True
    return x, torch.cat([x[1:], x[:1]]), mask


def recall_key_as_answer(keys, values, query):
    x = torch.cat([torch.stack([keys, values], 1).reshape(-1), keys[query:query + 1], keys[query:query + 1]])
    mask = torch.zeros(len(x) - 1, dtype=torch.bool)
    mask[-1] = True
    return x[:-1], x[1:], mask


def recall_every_position_scored(keys, values, query):
    x = torch.cat([torch.stack([keys, values], 1).reshape(-1), keys[query:query + 1], values[query:query + 1]])
    return x[:-1], x[1:], torch.ones(len(x) - 1, dtype=torch.bool)


def recall_first_pair_queried(keys, values, query):
    return recall_every_position_scored(keys, values, 0)[:2] + (torch.arange(2 * len(keys) + 1) == 2 * len(keys),)


MISTAKES = {
    "post-norm": ("pre_norm_block", block_post_norm, "post-norm instead of pre-norm"),
    "no-residuals": ("pre_norm_block", block_without_residuals, "residual connections are missing"),
    "parallel-block": ("pre_norm_block", block_parallel, "reads H instead of U"),
    "one-norm-twice": ("pre_norm_block", block_one_norm, "norm1 is used in both branches"),
    "block-in-place": ("pre_norm_block", block_in_place, "changed h in place"),
    "ce-all-positions": ("masked_cross_entropy", ce_all_positions, "averages over all positions instead of the scored ones"),
    "ce-divided-by-all": ("masked_cross_entropy", ce_divided_by_all, "divided by all B * L positions"),
    "ce-summed": ("masked_cross_entropy", ce_summed, "sums over the scored positions instead of averaging"),
    "ce-without-log": ("masked_cross_entropy", ce_without_log, "the log is missing"),
    "recall-not-shifted": ("associative_recall_sequence", recall_not_shifted, "off by one: targets are not shifted"),
    "recall-keeps-answer": ("associative_recall_sequence", recall_whole_sequence, "drop the last one (the answer)"),
    "recall-key-as-answer": ("associative_recall_sequence", recall_key_as_answer, "the queried key instead of its value"),
    "recall-all-scored": ("associative_recall_sequence", recall_every_position_scored, "every position is scored"),
    "recall-first-pair": ("associative_recall_sequence", recall_first_pair_queried, "first key instead of keys[query]"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
