"""Checks for lesson 01's exercises: the online softmax, merging partial attention, two Triton kernels.

Each ``check_xxx(fn)`` runs a learner's function on several inputs, including lengths that are not a
multiple of the block, and compares it with an independent float64 computation. When the answer matches
a *known mistake* (a running sum that is not rescaled, a missing mask on the last block, swapped
weights, ...), the failure message names that mistake.

The two Triton checkers run the kernels through Triton's interpreter on CPU tensors when no GPU is
visible. A kernel that reads or writes out of bounds does not crash there: it silently touches
neighbouring memory. So the checkers place every input inside a buffer filled with NaN (a read past
the end brings NaN into the result) and every output inside a buffer filled with a sentinel value (a
write past the end changes it), and say which of the two happened.

Run against your work with ``make check LESSON=01``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import contextlib
import math
import re

import kernels  # noqa: F401  (before triton: it switches on Triton's interpreter when no GPU is visible)

# isort: split
import pytest
import torch
import triton
import triton.language as tl

import attnlib

from . import harness

LESSON = "01_flash_attention"

DEVICE = kernels.expected_device()
SENTINEL = -7777.0  # what the output buffers hold before the kernel runs
GUARD = 4096  # elements of padding before and after each buffer


# --- helpers ----------------------------------------------------------------------------------------


def randn(*shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Seeded float32 normal numbers ``shift + scale * N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float()


@contextlib.contextmanager
def ready_made_softmax_forbidden():
    """Make torch's softmax and log-sum-exp raise while the learner's code runs."""

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"your code calls {name}; the exercise is to write the softmax with exp, "
                                 "max and sum, one block at a time")
        return refused

    targets = [(torch, "softmax"), (torch.nn.functional, "softmax"), (torch.special, "softmax"),
               (torch.Tensor, "softmax"), (torch, "logsumexp"), (torch.Tensor, "logsumexp"),
               (torch.special, "logsumexp")]
    label = {torch: "torch", torch.nn.functional: "torch.nn.functional", torch.special: "torch.special",
             torch.Tensor: "Tensor"}
    saved = [(owner, name, owner.__dict__.get(name), name in owner.__dict__) for owner, name in targets]
    try:
        for owner, name in targets:
            setattr(owner, name, refuse(f"{label[owner]}.{name}"))
        yield
    finally:
        for owner, name, original, had_own in saved:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def expect_no_nan(got, what: str, why: str) -> None:
    """Fail with ``why`` if ``got`` holds NaN (or inf, when the answer is finite)."""
    if isinstance(got, torch.Tensor) and got.is_floating_point() and torch.isnan(got).any():
        raise AssertionError(f"{what}: contains NaN; {why}")


def run_kernel(fn, kernel_name: str, *args, **kwargs):
    """Call a launcher; a stub kernel's static assertion becomes "not implemented yet" with its hint."""
    try:
        return harness.call(fn, *args, **kwargs)
    except AssertionError:
        raise
    except Exception as error:  # the interpreter's InterpreterError, or a CompilationError on a GPU
        message = str(error)
        found = re.search(r"not implemented yet:?\s*(.*?)['\"]?\)?\s*$", message, flags=re.S)
        if "not implemented yet" in message:
            hint = found.group(1).strip() if found else ""
            raise AssertionError(f"{kernel_name} is not implemented yet (the kernel {fn.__name__}() launches)."
                                 + (f" Hint: {hint}" if hint else "")) from None
        raise AssertionError(f"{kernel_name} failed in Triton ({type(error).__name__}): "
                             f"{message.strip().splitlines()[-1] if message.strip() else ''}") from None


def inside_nan_buffer(x: torch.Tensor, row_stride: int | None = None) -> torch.Tensor:
    """A copy of the 2-d ``x`` whose rows are ``row_stride`` apart, with NaN between and around them."""
    rows, cols = x.shape
    row_stride = cols if row_stride is None else row_stride
    buffer = torch.full((GUARD + rows * row_stride + GUARD,), float("nan"), dtype=x.dtype, device=DEVICE)
    view = buffer[GUARD:GUARD + rows * row_stride].view(rows, row_stride)[:, :cols]
    view.copy_(x)
    return view


def guarded_output(rows: int, cols: int, row_stride: int | None = None):
    """An output view ``(rows, cols)`` inside a buffer of sentinels; returns ``(view, buffer, used)``.

    ``used`` is a boolean mask of the buffer's entries the kernel may write.
    """
    row_stride = cols if row_stride is None else row_stride
    buffer = torch.full((GUARD + rows * row_stride + GUARD,), SENTINEL, device=DEVICE)
    view = buffer[GUARD:GUARD + rows * row_stride].view(rows, row_stride)[:, :cols]
    used = torch.zeros(buffer.shape, dtype=torch.bool)
    used[GUARD:GUARD + rows * row_stride].view(rows, row_stride)[:, :cols] = True
    return view, buffer, used


def expect_writes_inside(buffer: torch.Tensor, used: torch.Tensor, what: str) -> None:
    """Fail if the kernel changed any entry of ``buffer`` outside ``used``."""
    touched = (buffer.cpu() != SENTINEL) & ~used
    if not touched.any():
        return
    first, last = touched.nonzero().flatten()[[0, -1]].tolist()
    end = used.nonzero().flatten()[-1].item()
    if first < GUARD:
        where = "before the start of the output"
    elif last > end:
        where = "past the end of the output"
    else:
        where = "between the output's rows (past the end of a row)"
    raise AssertionError(f"{what}: the kernel wrote {where}: check the mask on tl.store "
                         "(only rows and columns inside the tensor may be stored)")


# --- 1. online softmax ------------------------------------------------------------------------------


def ref_online_softmax(x, block_size, *, rescale="right", skip_tail=False, along=-1):
    """Float64 online softmax, with switches that reproduce the usual mistakes."""
    x = x.double().movedim(along, -1)
    m = torch.full(x.shape[:-1] + (1,), float("-inf"), dtype=torch.float64)
    l = torch.zeros_like(m)
    n = x.shape[-1]
    stop = n - n % block_size if skip_tail else n
    for start in range(0, stop, block_size):
        block = x[..., start:start + block_size]
        m_new = torch.maximum(m, block.amax(-1, keepdim=True))
        m_ref = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        factor = {"right": torch.exp(m - m_ref), "none": torch.ones_like(m)}[rescale]
        l = factor * l + torch.exp(block - m_ref).sum(-1, keepdim=True)
        m = m_new
    return (torch.exp(x - m) / l).movedim(-1, along)


def check_online_softmax(fn) -> None:
    def call(x, block_size):
        before = x.clone()
        with ready_made_softmax_forbidden():
            got = harness.call(fn, x, block_size)
        if not torch.equal(before, x):
            raise AssertionError(f"{fn.__name__}() modified its input x in place; compute new tensors instead")
        return got

    # ordinary inputs; a rising trend makes the max change at (nearly) every block
    trend = lambda n: torch.linspace(0.0, 4.0, n)  # noqa: E731
    cases = [((3, 10), 4, randn(3, 10, seed=0, scale=2.0) + trend(10)),
             ((2, 3, 16), 16, randn(2, 3, 16, seed=1)),
             ((4, 7), 1, randn(4, 7, seed=2) + trend(7)),
             ((5, 33), 8, randn(5, 33, seed=3, scale=3.0) + trend(33)),
             ((6, 12), 5, randn(6, 12, seed=4, scale=2.0)),
             ((2, 9), 32, randn(2, 9, seed=5))]
    for shape, block_size, x in cases:
        what = f"online_softmax(x of shape {shape}, block_size={block_size})"
        got = call(x, block_size)
        expect_no_nan(got, what, "the rescaling factor is probably inverted: it is e^{m - m'} (0 at the first "
                                 "block, where m = -inf), not e^{m' - m} (inf there, and inf * 0 = NaN)")
        mistakes = {
            "the running sum is not rescaled when the max changes: multiply l by e^{m - m'} before "
            "adding the new block's sum": ref_online_softmax(x, block_size, rescale="none"),
            "the last, partial block is skipped: lengths that are not a multiple of block_size are wrong "
            "(range(0, n, block_size) with x[..., start:start + block_size] covers them)":
                ref_online_softmax(x, block_size, skip_tail=True),
        }
        mistakes["the softmax is taken over the wrong axis (dim -2); it goes along the last dim"] = \
            ref_online_softmax(x, block_size, along=-2)
        harness.expect_close(got, torch.softmax(x.double(), dim=-1), what, mistakes=mistakes)

    # masked entries: row 0's whole first block is -inf, so the running max is still -inf after it
    x = randn(3, 12, seed=7)
    x[0, :4] = float("-inf")
    x[1, ::3] = float("-inf")
    what = "online_softmax(x with -inf entries, the whole first block of row 0 included, block_size=4)"
    got = call(x, 4)
    expect_no_nan(got, what, "after a block of only -inf the running max m' is still -inf, and "
                             "e^{-inf - (-inf)} is NaN: while m' is -inf use 0 in its place inside exp "
                             "(torch.where(torch.isfinite(m_new), m_new, 0))")
    harness.expect_close(got, torch.softmax(x.double(), dim=-1), what)

    # large entries: e^300 overflows float32 unless the running max is subtracted
    x = randn(2, 20, seed=8, scale=5.0, shift=300.0)
    what = "online_softmax(x with entries around 300, block_size=6)"
    got = call(x, 6)
    if isinstance(got, torch.Tensor) and got.is_floating_point() and not torch.isfinite(got).all():
        raise AssertionError(f"{what}: contains inf or NaN; the running max is not subtracted inside exp "
                             "(e^x overflows float32 for x > 88.7): use e^{x - m'}")
    harness.expect_close(got, torch.softmax(x.double(), dim=-1), what)


# --- 2. merging partial attention -------------------------------------------------------------------


def partial_attention(q, k, v, allowed):
    """Float64 attention of ``q`` over the keys ``allowed`` lets it see: ``(out, lse)``, empty rows 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - ref.unsqueeze(-1)) @ v, lse


def merge_cases():
    """``(description, o1, lse1, o2, lse2, o, lse)``: two partials and their exact merge."""
    cases = []
    # ordinary: 20 keys split 7 / 13
    q, k, v = randn(1, 2, 12, 8, seed=10), randn(1, 2, 20, 8, seed=11), randn(1, 2, 20, 8, seed=12)
    cases.append(("20 keys split 7 / 13", q, k, v, torch.ones(12, 20, dtype=torch.bool), torch.arange(20) < 7))
    # causal, keys split 5 / 7: queries 0..4 see nothing of the second part (lse2 = -inf)
    q, k, v = randn(2, 1, 12, 16, seed=13), randn(2, 1, 12, 16, seed=14), randn(2, 1, 12, 6, seed=15)
    causal = attnlib.causal_mask(12, 12)
    cases.append(("causal, keys split 5 / 7 (rows 0-4 have an empty second part)", q, k, v,
                  causal, torch.arange(12) < 5))
    # rows that see no key at all in either part (lse1 = lse2 = -inf)
    q, k, v = randn(1, 1, 6, 8, seed=16), randn(1, 1, 10, 8, seed=17), randn(1, 1, 10, 8, seed=18)
    allowed = torch.ones(6, 10, dtype=torch.bool)
    allowed[0] = False
    allowed[3] = False
    allowed[4, :4] = False  # row 4: empty first part
    cases.append(("rows 0 and 3 see no key in either part", q, k, v, allowed, torch.arange(10) < 4))
    # large scores (hundreds), so e^{lse} overflows float32
    q, k, v = randn(1, 1, 8, 16, seed=19, scale=12.0), randn(1, 1, 16, 16, seed=20, scale=12.0), randn(1, 1, 16, 8, seed=21)
    cases.append(("large scores (log-sum-exps of several hundred)", q, k, v,
                  torch.ones(8, 16, dtype=torch.bool), torch.arange(16) < 9))
    out = []
    for description, q, k, v, allowed, part in cases:
        o1, lse1 = partial_attention(q, k, v, allowed & part)
        o2, lse2 = partial_attention(q, k, v, allowed & ~part)
        o, lse = partial_attention(q, k, v, allowed)
        out.append((description, o1.float(), lse1.float(), o2.float(), lse2.float(), o, lse))
    return out


def check_merge_partial_attention(fn) -> None:
    for description, o1, lse1, o2, lse2, want_o, want_lse in merge_cases():
        what = f"merge_partial_attention({description})"
        inputs = [o1, lse1, o2, lse2]
        before = [t.clone() for t in inputs]
        got = harness.call(fn, *inputs)
        if any(not torch.equal(a, b) for a, b in zip(before, inputs)):
            raise AssertionError(f"{what}: modified an input in place; compute new tensors instead")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"{what}: expected a pair (o, lse), got {type(got).__name__}")
        o, lse = got
        both_empty = torch.isinf(lse1) & torch.isinf(lse2)
        if both_empty.any():
            why = ("a row where both partials are empty (lse1 = lse2 = -inf) must give o = 0 and lse = -inf; "
                   "e^{lse_i - lse} is then e^{-inf - (-inf)} = NaN: use 0 in place of lse where it is -inf")
        else:
            why = "look for -inf - (-inf) or inf / inf"
        expect_no_nan(lse, what + ", lse", why)
        if isinstance(lse, torch.Tensor) and (lse == float("inf")).any():
            raise AssertionError(f"{what}, lse: contains +inf; log(e^{{lse1}} + e^{{lse2}}) overflows when "
                                 "computed literally (e^x is inf in float32 for x > 88.7): use "
                                 "torch.logaddexp(lse1, lse2), which subtracts the larger one first")
        expect_no_nan(o, what + ", output o", why)
        d64 = [t.double() for t in (o1, lse1, o2, lse2)]
        e1, e2 = torch.exp(d64[1]).unsqueeze(-1), torch.exp(d64[3]).unsqueeze(-1)
        harness.expect_close(lse, want_lse, what + ", lse", atol=1e-4, mistakes={
            "the merged lse is the larger of the two; it is log(e^{lse1} + e^{lse2}) = torch.logaddexp(lse1, lse2)":
                torch.maximum(d64[1], d64[3]),
            "the log-sum-exps are added; the sums e^{lse_i} add, so lse = log(e^{lse1} + e^{lse2})":
                d64[1] + d64[3],
        })
        ref = torch.where(torch.isfinite(want_lse), want_lse, torch.zeros_like(want_lse))
        w1, w2 = torch.exp(d64[1] - ref).unsqueeze(-1), torch.exp(d64[3] - ref).unsqueeze(-1)
        if isinstance(o, torch.Tensor) and o.is_floating_point() and torch.isinf(o).any():
            raise AssertionError(f"{what}, output o: contains inf; the weights are e^{{lse_i - lse}}, "
                                 "not e^{lse_i} (which overflows for large scores)")
        harness.expect_close(o, want_o, what + ", output o", atol=1e-5, mistakes={
            "the log-sum-exp weights are swapped: o1 is weighted by e^{lse1 - lse} and o2 by e^{lse2 - lse}":
                w2 * d64[0] + w1 * d64[2],
            "the two outputs are averaged with equal weights; weight each by its share of the softmax's "
            "denominator, e^{lse_i - lse}": (d64[0] + d64[2]) / 2,
            "the two outputs are added without weights; weight each by e^{lse_i - lse}": d64[0] + d64[2],
            "the weights are e^{lse_i}, not normalised: divide by e^{lse}, i.e. use e^{lse_i - lse}":
                e1 * d64[0] + e2 * d64[2],
        })


# --- 3. the row-wise softmax kernel -----------------------------------------------------------------


def check_softmax_rows(fn) -> None:
    kernel = "softmax_rows_kernel"
    # (rows, n_cols, input row stride, output row stride): ragged widths, strided views, tiny and exact rows
    cases = [(4, 10, 24, 16), (3, 16, 16, 16), (5, 33, 40, 64), (2, 1, 20, 1), (6, 64, 64, 70), (3, 50, 50, 50)]
    for rows, n_cols, x_stride, out_stride in cases:
        data = randn(rows, n_cols, seed=100 + n_cols, scale=2.0)
        x = inside_nan_buffer(data, x_stride)
        out, buffer, used = guarded_output(rows, n_cols, out_stride)
        what = f"softmax_rows(x of shape ({rows}, {n_cols}), rows {x_stride} apart)"
        got = run_kernel(fn, kernel, x, out=out)
        expect_writes_inside(buffer, used, what)
        if got is not out:
            raise AssertionError(f"{what}: softmax_rows() must return the `out` it was given")
        expect_no_nan(got, what, "the kernel read memory outside the row's n_cols entries (in this check the "
                                 "input's rows are x_row_stride elements apart with NaN in between and after): "
                                 "load from x_ptr + row * x_row_stride + cols with mask=cols < n_cols")
        block = max(16, triton.next_power_of_2(n_cols))
        padded = torch.cat([data.double(), torch.zeros(rows, block - n_cols, dtype=torch.float64)], dim=1)
        harness.expect_close(got, torch.softmax(data.double(), dim=-1), what, mistakes={
            "the padding lanes (cols >= n_cols) are loaded as 0 instead of -inf, so each adds e^{0 - m} to the "
            "denominator: use other=float('-inf') in tl.load": torch.softmax(padded, dim=-1)[:, :n_cols],
            "the exponentials are not divided by their sum (tl.sum(e, axis=0))":
                torch.exp(data.double() - data.double().amax(-1, keepdim=True)),
        })

    data = randn(3, 20, seed=200, scale=5.0, shift=300.0)
    what = "softmax_rows(x with entries around 300)"
    out, buffer, used = guarded_output(3, 20)
    got = run_kernel(fn, kernel, inside_nan_buffer(data, 32), out=out)
    expect_writes_inside(buffer, used, what)
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: contains inf or NaN; the row max is not subtracted before tl.exp "
                             "(e^x overflows float32 for x > 88.7)")
    harness.expect_close(got, torch.softmax(data.double(), dim=-1), what)


# --- 4. the attention forward kernel ----------------------------------------------------------------


def ref_flash(q, k, v, block_n, scale, *, rescale_acc=True, rescale_l=True, mask_tail=True, normalise=True):
    """Float64 online-softmax attention over key blocks, with switches that reproduce the usual mistakes."""
    q, k, v = q.double(), k.double(), v.double()
    lk = k.shape[0]
    if not mask_tail:  # keys past the end read as zero rows and keep their score 0
        pad = -lk % block_n
        k = torch.cat([k, k.new_zeros(pad, k.shape[1])])
        v = torch.cat([v, v.new_zeros(pad, v.shape[1])])
    m = torch.full((q.shape[0], 1), float("-inf"), dtype=torch.float64)
    l = torch.zeros_like(m)
    acc = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    for start in range(0, k.shape[0], block_n):
        s = q @ k[start:start + block_n].T * scale
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, p = torch.exp(m - m_new), torch.exp(s - m_new)
        l = (alpha if rescale_l else 1.0) * l + p.sum(-1, keepdim=True)
        acc = (alpha if rescale_acc else 1.0) * acc + p @ v[start:start + block_n]
        m = m_new
    return acc / l if normalise else acc


def check_attention_forward(fn) -> None:
    kernel = "attention_forward_kernel"
    # (lq, lk, d, block_m, block_n): one tile; ragged queries and keys; more keys blocks; a single query
    cases = [(16, 16, 16, 16, 16), (40, 72, 32, 16, 32), (64, 100, 64, 32, 16), (5, 50, 16, 16, 16)]
    tol = dict(atol=1e-4, rtol=1e-4) if kernels.INTERPRETED else dict(atol=2e-3, rtol=2e-3)
    for n, (lq, lk, d, block_m, block_n) in enumerate(cases):
        # keys grow along the sequence, so the running max keeps changing from block to block
        growth = torch.linspace(0.5, 2.0, lk)[:, None]
        q, k, v = randn(lq, d, seed=300 + n), randn(lk, d, seed=400 + n) * growth, randn(lk, d, seed=500 + n)
        out, buffer, used = guarded_output(lq, d)
        what = f"attention_forward(q ({lq}, {d}), k, v ({lk}, {d}), block_m={block_m}, block_n={block_n})"
        got = run_kernel(fn, kernel, inside_nan_buffer(q), inside_nan_buffer(k), inside_nan_buffer(v),
                         block_m=block_m, block_n=block_n, out=out)
        expect_writes_inside(buffer, used, what)
        if got is not out:
            raise AssertionError(f"{what}: attention_forward() must return the `out` it was given")
        expect_no_nan(got, what, "the kernel read past the end of K or V (in this check the rows after the "
                                 "last key hold NaN, and 0 * NaN is NaN): load the K and V tiles with "
                                 "mask=(cols < lk)[:, None] and other=0.0")
        scale = 1 / math.sqrt(d)
        want = attnlib.attention(*(t.double()[None, None] for t in (q, k, v)))[0, 0]
        mistakes = {
            "the accumulator is not rescaled when the max changes: multiply acc by alpha = e^{m - m'} "
            "before adding P V": ref_flash(q, k, v, block_n, scale, rescale_acc=False),
            "the running sum l is not rescaled when the max changes: l' = alpha * l + rowsum(P)":
                ref_flash(q, k, v, block_n, scale, rescale_l=False),
            "neither l nor acc is rescaled by alpha = e^{m - m'} when the max changes":
                ref_flash(q, k, v, block_n, scale, rescale_acc=False, rescale_l=False),
            "the output is not divided by l at the end (store acc / l[:, None])":
                ref_flash(q, k, v, block_n, scale, normalise=False),
            "the scale s = 1/sqrt(d) is missing from the scores": ref_flash(q, k, v, block_n, 1.0),
        }
        if lk % block_n:
            mistakes["the mask on the last, partial key block is missing: keys cols >= lk (loaded as 0) get "
                     "score 0 and a share of the softmax, so lengths that are not a multiple of the block are "
                     "wrong; set their scores to -inf with tl.where(cols < lk, s, float('-inf'))"] = \
                ref_flash(q, k, v, block_n, scale, mask_tail=False)
        harness.expect_close(got, want, what, mistakes=mistakes, **tol)


CHECKERS = {
    "online_softmax": check_online_softmax,
    "merge_partial_attention": check_merge_partial_attention,
    "softmax_rows": check_softmax_rows,
    "attention_forward": check_attention_forward,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_online_softmax(impl):
    check_online_softmax(impl.online_softmax)


def test_merge_partial_attention(impl):
    check_merge_partial_attention(impl.merge_partial_attention)


def test_softmax_rows(impl):
    check_softmax_rows(impl.softmax_rows)


def test_attention_forward(impl):
    check_attention_forward(impl.attention_forward)


# --- the checkers' own tests: they must reject the stubs and the usual mistakes ---------------------


@pytest.mark.checker
@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_stubs_are_rejected(name):
    stubs = harness.load_lesson("exercises", LESSON)
    with pytest.raises(AssertionError, match="not implemented"):
        CHECKERS[name](getattr(stubs, name))


def online_softmax_with(name, *, rescale="right", skip_tail=False, subtract_max=True, guard=True,
                        along=-1, library=False):
    """A learner's online softmax, named ``name``, with one configurable mistake."""

    def online_softmax(x, block_size):
        if library:
            return torch.softmax(x, dim=-1)
        x = x.movedim(along, -1)
        m = torch.full(x.shape[:-1] + (1,), float("-inf"))
        l = torch.zeros_like(m)
        n = x.shape[-1]
        for start in range(0, n - n % block_size if skip_tail else n, block_size):
            block = x[..., start:start + block_size]
            m_new = torch.maximum(m, block.amax(-1, keepdim=True))
            m_ref = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new)) if guard else m_new
            if not subtract_max:
                m_ref = torch.zeros_like(m_new)
            factor = {"right": torch.exp(m - m_ref), "none": 1.0, "inverted": torch.exp(m_ref - m)}[rescale]
            if not subtract_max:
                factor = 1.0
            l = factor * l + torch.exp(block - m_ref).sum(-1, keepdim=True)
            m = m_new
        return (torch.exp(x - (m if subtract_max else 0.0)) / l).movedim(-1, along)

    online_softmax.__name__ = online_softmax.__qualname__ = name
    return online_softmax


def merge_with(name, *, weights="right", lse_rule="logaddexp", guard=True):
    """A learner's merge, named ``name``, with one configurable mistake."""

    def merge(o1, lse1, o2, lse2):
        lse = {"logaddexp": torch.logaddexp(lse1, lse2), "max": torch.maximum(lse1, lse2),
               "sum": lse1 + lse2, "literal": torch.log(torch.exp(lse1) + torch.exp(lse2))}[lse_rule]
        ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) if guard else lse
        w1, w2 = torch.exp(lse1 - ref).unsqueeze(-1), torch.exp(lse2 - ref).unsqueeze(-1)
        if weights == "swapped":
            w1, w2 = w2, w1
        elif weights == "equal":
            w1 = w2 = 0.5
        elif weights == "unnormalised":
            w1, w2 = torch.exp(lse1).unsqueeze(-1), torch.exp(lse2).unsqueeze(-1)
        return w1 * o1 + w2 * o2, lse

    merge.__name__ = merge.__qualname__ = name
    return merge


@triton.jit
def _softmax_rows_with_mistake(x_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, BLOCK: tl.constexpr,
                               MISTAKE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    stride = n_cols if MISTAKE == "ignores_stride" else x_row_stride
    if MISTAKE == "no_load_mask":
        x = tl.load(x_ptr + row * stride + cols)
    elif MISTAKE == "pads_with_zero":
        x = tl.load(x_ptr + row * stride + cols, mask=inside, other=0.0)
    else:
        x = tl.load(x_ptr + row * stride + cols, mask=inside, other=float("-inf"))
    if MISTAKE == "no_max":
        e = tl.exp(x)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)
    if MISTAKE == "no_store_mask":
        tl.store(out_ptr + row * out_row_stride + cols, p)
    else:
        tl.store(out_ptr + row * out_row_stride + cols, p, mask=inside)


def softmax_rows_with(mistake):
    def softmax_rows(x, *, out=None):
        out = torch.empty_like(x) if out is None else out
        block = max(16, triton.next_power_of_2(x.shape[1]))
        _softmax_rows_with_mistake[(x.shape[0],)](x, out, x.shape[1], x.stride(0), out.stride(0), BLOCK=block,
                                                  MISTAKE=mistake)
        return out

    softmax_rows.__name__ = softmax_rows.__qualname__ = f"softmax_rows_{mistake}"
    return softmax_rows


@triton.jit
def _attention_with_mistake(q_ptr, k_ptr, v_ptr, o_ptr, lq, lk, stride_q, stride_k, stride_v, stride_o, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                            MISTAKE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < lq
    q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(0, lk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < lk
        if MISTAKE == "no_kv_load_mask":
            k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :])
            v = tl.load(v_ptr + cols[:, None] * stride_v + dims[None, :])
        else:
            k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + cols[:, None] * stride_v + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if MISTAKE != "no_scale":
            s = s * scale
        if MISTAKE != "no_tail_mask":
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        if MISTAKE == "no_rescale_l":
            l = l + tl.sum(p, axis=1)
        else:
            l = alpha * l + tl.sum(p, axis=1)
        if MISTAKE == "no_rescale_acc":
            acc = acc + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    if MISTAKE == "no_division":
        out = acc
    else:
        out = acc / l[:, None]
    if MISTAKE == "no_store_mask":
        tl.store(o_ptr + rows[:, None] * stride_o + dims[None, :], out)
    else:
        tl.store(o_ptr + rows[:, None] * stride_o + dims[None, :], out, mask=row_ok[:, None])


def attention_forward_with(mistake):
    def attention_forward(q, k, v, *, scale=None, block_m=16, block_n=16, out=None):
        (lq, d), lk = q.shape, k.shape[0]
        out = torch.empty_like(q) if out is None else out
        scale = d ** -0.5 if scale is None else scale
        _attention_with_mistake[(triton.cdiv(lq, block_m),)](
            q, k, v, out, lq, lk, q.stride(0), k.stride(0), v.stride(0), out.stride(0), scale,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, MISTAKE=mistake)
        return out

    attention_forward.__name__ = attention_forward.__qualname__ = f"attention_forward_{mistake}"
    return attention_forward


WRONG = [
    # (checker, wrong implementation, words the failure message must contain)
    ("online_softmax", online_softmax_with("not_rescaled", rescale="none"), ["not rescaled when the max changes"]),
    ("online_softmax", online_softmax_with("inverted_factor", rescale="inverted"), ["inverted", "NaN"]),
    ("online_softmax", online_softmax_with("skips_last_block", skip_tail=True), ["last, partial block"]),
    ("online_softmax", online_softmax_with("no_max", subtract_max=False), ["max is not subtracted"]),
    ("online_softmax", online_softmax_with("no_minus_inf_guard", guard=False), ["only -inf", "NaN"]),
    ("online_softmax", online_softmax_with("wrong_axis", along=-2), ["wrong axis"]),
    ("online_softmax", online_softmax_with("calls_torch_softmax", library=True), ["torch.softmax"]),
    ("merge_partial_attention", merge_with("swapped_weights", weights="swapped"), ["weights are swapped"]),
    ("merge_partial_attention", merge_with("equal_weights", weights="equal"), ["equal weights"]),
    ("merge_partial_attention", merge_with("unnormalised_weights", weights="unnormalised"), ["not normalised"]),
    ("merge_partial_attention", merge_with("lse_is_max", lse_rule="max"), ["larger of the two"]),
    ("merge_partial_attention", merge_with("lse_added", lse_rule="sum"), ["log-sum-exps are added"]),
    ("merge_partial_attention", merge_with("lse_literal", lse_rule="literal"), ["overflows", "logaddexp"]),
    ("merge_partial_attention", merge_with("no_empty_guard", guard=False), ["both partials are empty", "NaN"]),
    ("softmax_rows", softmax_rows_with("no_store_mask"), ["wrote", "mask on tl.store"]),
    ("softmax_rows", softmax_rows_with("no_load_mask"), ["NaN", "mask=cols < n_cols"]),
    ("softmax_rows", softmax_rows_with("pads_with_zero"), ["loaded as 0 instead of -inf"]),
    ("softmax_rows", softmax_rows_with("ignores_stride"), ["NaN", "x_row_stride"]),
    ("softmax_rows", softmax_rows_with("no_max"), ["max is not subtracted"]),
    ("attention_forward", attention_forward_with("no_rescale_acc"), ["accumulator is not rescaled"]),
    ("attention_forward", attention_forward_with("no_rescale_l"), ["running sum l is not rescaled"]),
    ("attention_forward", attention_forward_with("no_tail_mask"), ["mask on the last, partial key block is missing"]),
    ("attention_forward", attention_forward_with("no_division"), ["not divided by l"]),
    ("attention_forward", attention_forward_with("no_scale"), ["scale"]),
    ("attention_forward", attention_forward_with("no_store_mask"), ["past the end of the output", "mask on tl.store"]),
    ("attention_forward", attention_forward_with("no_kv_load_mask"), ["NaN", "past the end of K or V"]),
]


@pytest.mark.checker
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow and NaN inside the wrong kernels
@pytest.mark.parametrize("checker, wrong, words", WRONG, ids=[f"{c}-{w.__name__}" for c, w, _ in WRONG])
def test_checker_catches_mistake(checker, wrong, words):
    with pytest.raises(AssertionError) as caught:
        CHECKERS[checker](wrong)
    message = str(caught.value)
    for word in words:
        assert word in message, f"expected {word!r} in the checker's message, got: {message}"
