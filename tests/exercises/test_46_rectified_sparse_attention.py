"""Checks for lesson 46's exercises: IPAR's reallocation, the selection rule, the rectified output.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation (loops over rows and entries, float64). When the answer matches a *known mistake* (a pooled
block counted as one key, the text entries not summed, the entry that crosses tau forgotten, the pooled
values added for the computed blocks instead of the dropped ones, ...), the failure message names it.

Run against your work with ``make check LESSON=46``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import harness

LESSON = "46_rectified_sparse_attention"


# --- independent references (loops) -----------------------------------------------------------------


def loop_ipar(block_scores, text_scores, block_size, *, block_factor=None, add_to_logit=False, with_text=True):
    """Row by row with math.exp; options produce known mistakes."""
    factor = block_size if block_factor is None else block_factor
    rows_in = block_scores.reshape(-1, block_scores.shape[-1])
    text_in = text_scores.reshape(-1, text_scores.shape[-1])
    rows = []
    for scores, text in zip(rows_in.tolist(), text_in.tolist()):
        if add_to_logit:
            blocks = [math.exp(s + block_size) for s in scores]
        else:
            blocks = [factor * math.exp(s) for s in scores]
        text_mass = sum(math.exp(s) for s in text) if with_text else 0.0
        z = sum(blocks) + text_mass
        rows.append([b / z for b in blocks] + [text_mass / z])
    return torch.tensor(rows, dtype=torch.float64).reshape(*block_scores.shape[:-1], block_scores.shape[-1] + 1)


def loop_select(weights, min_blocks, tau, *, plus_one=True, descending=True, use_floor=True, sort=True):
    """Row by row with Python lists; options produce known mistakes."""
    flat = weights.reshape(-1, weights.shape[-1])
    out = torch.zeros(flat.shape, dtype=torch.bool)
    for r, row in enumerate(flat.tolist()):
        entries = list(range(len(row)))
        if sort:
            entries.sort(key=lambda j: (-row[j] if descending else row[j], j))
        total, count = 0.0, 0
        for j in entries:
            total += row[j]
            if total <= tau:
                count += 1
        n = count + 1 if plus_one else count
        if use_floor:
            n = max(n, min_blocks)
        for j in entries[:min(n, len(row))]:
            out[r, j] = True
    return out.reshape(weights.shape)


def loop_rectified(sparse_out, weights, covered, v_pooled, block_size, *, text_in_r=True, compensate="dropped",
                   factor="multiply", rows="block"):
    """Query row by query row; options produce known mistakes."""
    b, h, length, d = sparse_out.shape
    t = covered.shape[-1]
    out = torch.zeros(b, h, length, d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for a in range(length):
                i = a // block_size if rows == "block" else a % t
                r = sum(float(weights[bb, hh, i, j]) for j in range(t) if covered[bb, hh, i, j])
                if weights.shape[-1] == t + 1 and text_in_r:
                    r += float(weights[bb, hh, i, t])
                extra = torch.zeros(d, dtype=torch.float64)
                for j in range(t):
                    if compensate == "dropped" and not covered[bb, hh, i, j] or compensate == "covered" and covered[bb, hh, i, j]:
                        extra += float(weights[bb, hh, i, j]) * v_pooled[bb, hh, j].double()
                row = sparse_out[bb, hh, a].double()
                scaled = {"multiply": row * r, "divide": row / r, "none": row}[factor]
                out[bb, hh, a] = scaled + extra
    return out


# --- inputs -----------------------------------------------------------------------------------------


def ipar_inputs(seed, shape, blocks, texts):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, blocks, generator=g, dtype=torch.float64) * 2,
            torch.randn(*shape, texts, generator=g, dtype=torch.float64) * 2)


def output_inputs(seed, b, h, length, block_size, text):
    g = torch.Generator().manual_seed(seed)
    t = -(-length // block_size)
    sparse_out = torch.randn(b, h, length, 3, generator=g, dtype=torch.float64)
    weights = torch.softmax(torch.randn(b, h, t, t + text, generator=g, dtype=torch.float64), -1)
    covered = torch.rand(b, h, t, t, generator=g) < 0.5
    v_pooled = torch.randn(b, h, t, 3, generator=g, dtype=torch.float64)
    return sparse_out, weights, covered, v_pooled


# --- the checkers -----------------------------------------------------------------------------------


def check_ipar_reallocation(fn):
    for seed, shape, blocks, texts, block_size in [(0, (3,), 5, 4, 8), (1, (2, 2), 4, 1, 16), (2, (4,), 6, 3, 3)]:
        block_scores, text_scores = ipar_inputs(seed, shape, blocks, texts)
        got = harness.call(fn, block_scores.clone(), text_scores.clone(), block_size)
        what = f"ipar_reallocation on {blocks} pooled blocks of {block_size} keys and {texts} text keys"
        harness.expect_close(got, loop_ipar(block_scores, text_scores, block_size), what, mistakes={
            "a pooled block counts as one key: each stands for N_b keys, so its weight is multiplied by N_b "
            "(its logit gains log N_b) before normalising":
                loop_ipar(block_scores, text_scores, block_size, block_factor=1),
            "N_b is added to the logit; a block of N_b equal keys adds log N_b (the weight is multiplied by N_b)":
                loop_ipar(block_scores, text_scores, block_size, add_to_logit=True),
            "the block weights are divided by N_b instead of multiplied":
                loop_ipar(block_scores, text_scores, block_size, block_factor=1 / block_size),
            "the text keys are left out of the normalisation Z":
                loop_ipar(block_scores, text_scores, block_size, with_text=False),
        })


def check_select_blocks(fn):
    for seed, rows, entries, min_blocks, tau, temperature in [(0, 6, 8, 2, 0.3, 1.0), (1, 5, 10, 3, 0.5, 0.5),
                                                              (2, 8, 6, 1, 0.3, 3.0), (3, 4, 12, 4, 0.7, 1.5)]:
        g = torch.Generator().manual_seed(seed)
        weights = torch.softmax(torch.randn(rows, entries, generator=g, dtype=torch.float64) * temperature, -1)
        got = harness.call(fn, weights.clone(), min_blocks, tau)
        what = f"select_blocks on {rows} rows of {entries} entries with min_blocks={min_blocks}, tau={tau}"
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}")
        harness.expect_close(got, loop_select(weights, min_blocks, tau), what, mistakes={
            "the entry whose running sum crosses tau is not kept: keep count + 1 entries":
                loop_select(weights, min_blocks, tau, plus_one=False),
            "the row is sorted in increasing order; the LARGEST weights come first":
                loop_select(weights, min_blocks, tau, descending=False),
            "the floor min_blocks is ignored: keep at least min_blocks entries":
                loop_select(weights, min_blocks, tau, use_floor=False),
            "the running sum is taken over the unsorted row; sort first, then cumsum":
                loop_select(weights, min_blocks, tau, sort=False),
        })


def check_rectified_output(fn):
    for seed, b, h, length, block_size, text in [(0, 1, 2, 10, 4, 1), (1, 2, 1, 12, 3, 0), (2, 1, 2, 9, 2, 1)]:
        sparse_out, weights, covered, v_pooled = output_inputs(seed, b, h, length, block_size, text)
        args = (sparse_out, weights, covered, v_pooled, block_size)
        got = harness.call(fn, *(x.clone() for x in args[:4]), block_size)
        what = (f"rectified_output on {length} query rows in blocks of {block_size}"
                + (" with a text entry" if text else " without text"))
        mistakes = {
            "the pooled values are added for the COVERED blocks; the compensation is for the blocks outside C":
                loop_rectified(*args, compensate="covered"),
            "the sparse output is divided by R; the sparse weights are already amplified by 1/R, so multiply by R":
                loop_rectified(*args, factor="divide"),
            "the sparse output is not multiplied by R (only the compensation is added)":
                loop_rectified(*args, factor="none"),
            "row a is mapped to block a % T; it belongs to block a // block_size (repeat_interleave, not repeat)":
                loop_rectified(*args, rows="cycle"),
        }
        if text:
            mistakes["the text entry is left out of R; text keys are always computed, so their weight belongs in R"] = \
                loop_rectified(*args, text_in_r=False)
        harness.expect_close(got, loop_rectified(*args), what, mistakes=mistakes)


CHECKERS = {
    "ipar_reallocation": check_ipar_reallocation,
    "select_blocks": check_select_blocks,
    "rectified_output": check_rectified_output,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_ipar_reallocation(impl):
    check_ipar_reallocation(impl.ipar_reallocation)


def test_select_blocks(impl):
    check_select_blocks(impl.select_blocks)


def test_rectified_output(impl):
    check_rectified_output(impl.rectified_output)


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


def ipar_no_factor(block_scores, text_scores, block_size):
    weights = torch.softmax(torch.cat([block_scores, text_scores], -1), -1)
    t = block_scores.shape[-1]
    return torch.cat([weights[..., :t], weights[..., t:].sum(-1, keepdim=True)], -1)


def ipar_plus_nb(block_scores, text_scores, block_size):
    return ipar_no_factor(block_scores + block_size, text_scores, block_size)


def ipar_divided(block_scores, text_scores, block_size):
    return ipar_no_factor(block_scores - math.log(block_size), text_scores, block_size)


def ipar_text_unsummed(block_scores, text_scores, block_size):
    return torch.softmax(torch.cat([block_scores + math.log(block_size), text_scores], -1), -1)


def ipar_text_ignored(block_scores, text_scores, block_size):
    weights = torch.softmax(block_scores + math.log(block_size), -1)
    return torch.cat([weights, torch.zeros_like(weights[..., :1])], -1)


def _select(weights, min_blocks, tau, *, plus_one=1, descending=True, floor=True, sort=True):
    entries = weights.shape[-1]
    if sort:
        sorted_weights, order = torch.sort(weights, dim=-1, descending=descending, stable=True)
    else:
        sorted_weights, order = weights, torch.arange(entries).expand_as(weights)
    count = (sorted_weights.cumsum(-1) <= tau).sum(-1) + plus_one
    keep = count.clamp(min=min_blocks if floor else 0, max=entries)
    in_order = torch.arange(entries) < keep[..., None]
    return torch.zeros_like(in_order).scatter(-1, order, in_order)


def select_no_plus_one(weights, min_blocks, tau):
    return _select(weights, min_blocks, tau, plus_one=0)


def select_ascending(weights, min_blocks, tau):
    return _select(weights, min_blocks, tau, descending=False)


def select_no_floor(weights, min_blocks, tau):
    return _select(weights, min_blocks, tau, floor=False)


def select_unsorted(weights, min_blocks, tau):
    return _select(weights, min_blocks, tau, sort=False)


def select_float_mask(weights, min_blocks, tau):
    return _select(weights, min_blocks, tau).double()


def _output(sparse_out, weights, covered, v_pooled, block_size, *, text=True, flip=False, factor="multiply",
            cycle=False):
    t = covered.shape[-1]
    block_weights = weights[..., :t]
    r = (block_weights * covered).sum(-1)
    if text and weights.shape[-1] == t + 1:
        r = r + weights[..., t]
    compensation = (block_weights * (covered if flip else ~covered)) @ v_pooled
    rows = torch.arange(sparse_out.shape[-2])
    rows = rows % t if cycle else rows // block_size
    scaled = {"multiply": sparse_out * r[..., rows, None], "divide": sparse_out / r[..., rows, None],
              "none": sparse_out}[factor]
    return scaled + compensation[..., rows, :]


def output_compensates_covered(*args):
    return _output(*args, flip=True)


def output_divides(*args):
    return _output(*args, factor="divide")


def output_no_factor(*args):
    return _output(*args, factor="none")


def output_cycles(*args):
    return _output(*args, cycle=True)


def output_no_text(*args):
    return _output(*args, text=False)


MISTAKES = {
    "ipar-no-factor": ("ipar_reallocation", ipar_no_factor, "counts as one key"),
    "ipar-plus-nb": ("ipar_reallocation", ipar_plus_nb, "N_b is added to the logit"),
    "ipar-divided": ("ipar_reallocation", ipar_divided, "divided by N_b"),
    "ipar-text-unsummed": ("ipar_reallocation", ipar_text_unsummed, "wrong shape"),
    "ipar-text-ignored": ("ipar_reallocation", ipar_text_ignored, "left out of the normalisation"),
    "select-no-plus-one": ("select_blocks", select_no_plus_one, "count + 1"),
    "select-ascending": ("select_blocks", select_ascending, "increasing order"),
    "select-no-floor": ("select_blocks", select_no_floor, "floor min_blocks is ignored"),
    "select-unsorted": ("select_blocks", select_unsorted, "unsorted row"),
    "select-float-mask": ("select_blocks", select_float_mask, "bool tensor"),
    "output-compensates-covered": ("rectified_output", output_compensates_covered, "COVERED"),
    "output-divides": ("rectified_output", output_divides, "divided by R"),
    "output-no-factor": ("rectified_output", output_no_factor, "not multiplied by R"),
    "output-cycles": ("rectified_output", output_cycles, "a // block_size"),
    "output-no-text": ("rectified_output", output_no_text, "text entry is left out of R"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
