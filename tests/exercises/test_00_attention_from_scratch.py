"""Checks for lesson 00's exercises: softmax, scaled dot-product attention, the causal mask, split heads.

Each ``check_xxx(fn)`` runs a learner's function on several inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (a missing scale, a softmax over the
wrong dim, an inverted mask, ...), the failure message names that mistake.

Run against your work with ``make check LESSON=00``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

import attnlib
from attnlib import core as attnlib_core

from . import harness

LESSON = "00_attention_from_scratch"


# --- helpers ----------------------------------------------------------------------------------------


def randn(*shape, seed: int, scale: float = 1.0, shift: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal numbers ``shift + scale * N(0, 1)`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@contextlib.contextmanager
def ready_made_softmax_forbidden():
    """Make torch's own softmax and attention raise while the learner's code runs (writing them is the exercise)."""

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"your code calls {name}; the exercise is to write it with exp, max and sum")
        return refused

    targets = [(torch, "softmax"), (torch.nn.functional, "softmax"), (torch.special, "softmax"),
               (torch.Tensor, "softmax"), (torch.nn.functional, "scaled_dot_product_attention"),
               (attnlib, "attention"), (attnlib_core, "attention"), (attnlib, "masked_softmax"),
               (attnlib_core, "masked_softmax")]
    saved = [(owner, name, owner.__dict__.get(name, None), name in owner.__dict__) for owner, name in targets]
    label = {torch: "torch", torch.nn.functional: "torch.nn.functional", torch.special: "torch.special",
             torch.Tensor: "Tensor", attnlib: "attnlib", attnlib_core: "attnlib.core"}
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


def run(fn, *args, **kwargs):
    """Call the learner's ``fn`` (through :func:`harness.call`) and check that it left its inputs alone."""
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with ready_made_softmax_forbidden():
        got = harness.call(fn, *args, **kwargs)
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    for position, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            continue
        old = before.pop(0)
        if not torch.equal(old, arg):
            name = f"`{names[position]}`" if position < len(names) else f"number {position + 1}"
            raise AssertionError(f"{fn.__name__}() modified its input {name} in place "
                                 "(an in-place op such as x -= ..., x.sub_(...) or masked_fill_); "
                                 "compute a new tensor instead")
    return got


def expect_finite(got: torch.Tensor, what: str, why: str) -> None:
    """Fail with ``why`` if ``got`` holds inf or NaN."""
    if isinstance(got, torch.Tensor) and got.is_floating_point() and not torch.isfinite(got).all():
        raise AssertionError(f"{what}: contains inf or NaN; {why}")


# --- independent float64 references (the correct answer and the usual mistakes) ---------------------


def ref_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x.double(), dim=dim)


def ref_attention(q, k, v, mask=None, *, scale="sqrt", dim=-1, empty_rows="zero"):
    """Float64 attention, with switches that reproduce the usual mistakes.

    ``scale``: ``"sqrt"`` (1/sqrt(d), right), ``"none"`` or ``"d"`` (1/d); ``dim``: the softmax dim
    (-1, the keys, is right); ``empty_rows``: ``"zero"`` (right) or ``"uniform"`` (what filling masked
    scores with -1e9 gives on a row with no allowed key).
    """
    q, k, v = q.double(), k.double(), v.double()
    d = q.shape[-1]
    factor = {"sqrt": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d}[scale]
    scores = q @ k.transpose(-2, -1) * factor
    if mask is None:
        return torch.softmax(scores, dim=dim) @ v
    mask = mask.expand(scores.shape)
    scores = scores.masked_fill(~mask, -1e9 if empty_rows == "uniform" else float("-inf"))
    empty = ~mask.any(dim=-1, keepdim=True)
    if empty_rows == "zero":
        scores = scores.masked_fill(empty, 0.0)
    weights = torch.softmax(scores, dim=dim)
    if empty_rows == "zero":
        weights = weights.masked_fill(empty, 0.0)
    return weights @ v


# --- the checkers -----------------------------------------------------------------------------------


def check_softmax(fn) -> None:
    # ordinary inputs, along several dims
    for shape, dim, seed in (((4, 7), -1, 0), ((3, 5, 6), 1, 1), ((5, 3), 0, 2), ((2, 3, 4), -2, 3)):
        x = randn(*shape, seed=seed, scale=2.0)
        what = f"softmax(x of shape {shape}, dim={dim})"
        got = run(fn, x, dim=dim)
        expect_finite(got, what, "on ordinary inputs exp(x) is finite, so look for a 0/0")
        e = torch.exp(x.double())  # without the shift
        e_shifted = torch.exp(x.double() - x.double().amax(dim=dim, keepdim=True))
        other_dim = 0 if dim not in (0, -len(shape)) else -1
        whole = "the exponentials are divided by the sum over the whole tensor, not the sum along `dim`"
        unnormalised = "the exponentials are not normalised: divide them by their sum along `dim` (keepdim=True)"
        harness.expect_close(got, ref_softmax(x, dim), what, mistakes={
            "the softmax is taken along the last dim whatever `dim` says (use dim=dim in amax and sum)":
                ref_softmax(x, -1),
            f"the softmax is taken along dim {other_dim} instead of `dim`": ref_softmax(x, other_dim),
            whole: e_shifted / e_shifted.sum(),
            whole + " (and the max is not subtracted)": e / e.sum(),
            unnormalised: e_shifted,
            unnormalised + " (and the max is not subtracted)": e,
        })

    # large inputs: row 1 sits 300 above row 0, so exp overflows float32 unless the max is subtracted
    x = torch.stack([randn(8, seed=4, scale=5.0), randn(8, seed=5, scale=5.0, shift=300.0)])
    what = "softmax(x, dim=-1) with rows around 0 and around 300"
    got = run(fn, x, dim=-1)
    if isinstance(got, torch.Tensor) and got.shape == x.shape and got.is_floating_point():
        if not torch.isfinite(got[1]).all():
            raise AssertionError(f"{what}: row 1 contains inf or NaN; the max is not subtracted before exp, "
                                 "and exp(300) overflows float32 (exp(x) is inf for x > 88.7)")
        if not torch.isfinite(got[0]).all():
            raise AssertionError(f"{what}: row 0 contains inf or NaN; the max is taken over the whole tensor "
                                 "instead of along `dim` (use x.amax(dim=dim, keepdim=True)), so every "
                                 "exp of row 0 underflows to 0 and the row becomes 0/0")
    harness.expect_close(got, ref_softmax(x, -1), what)

    # float16: exp overflows above 11.09, and the result must stay float16
    x = randn(4, 16, seed=6, scale=4.0, shift=10.0, dtype=torch.float16)
    what = "softmax(x in float16, dim=-1)"
    got = run(fn, x, dim=-1)
    expect_finite(got, what, "float16 overflows above 65504 = exp(11.09): subtract the max before exp")
    if isinstance(got, torch.Tensor) and got.dtype != torch.float16:
        raise AssertionError(f"{what}: returns dtype {got.dtype}; keep the dtype of the input (float16)")
    harness.expect_close(got, ref_softmax(x, -1), what, atol=2e-3, rtol=1e-2)

    # masked entries (-inf) get weight 0; the other entries of the row still sum to 1
    x = randn(3, 6, seed=7).masked_fill(torch.tensor([[False] * 4 + [True] * 2,
                                                      [True, False] * 3,
                                                      [False] * 6]), float("-inf"))
    what = "softmax(x with some -inf entries, dim=-1)"
    got = run(fn, x, dim=-1)
    harness.expect_close(got, ref_softmax(x, -1), what)


def check_scaled_dot_product_attention(fn) -> None:
    cases = []
    # 3-d (batch, seq, d), more keys than queries, values of another width
    cases.append(("q (2, 5, 8), k (2, 7, 8), v (2, 7, 3), no mask",
                  randn(2, 5, 8, seed=10), randn(2, 7, 8, seed=11), randn(2, 7, 3, seed=12), None))
    # 2-d, no leading dims
    cases.append(("q (4, 16), k (6, 16), v (6, 5), no mask",
                  randn(4, 16, seed=13), randn(6, 16, seed=14), randn(6, 5, seed=15), None))
    # 4-d (batch, heads, seq, head_dim) with a causal (L, L) mask that broadcasts
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    cases.append(("q, k, v (2, 3, 6, 16), causal mask (6, 6)",
                  randn(2, 3, 6, 16, seed=16), randn(2, 3, 6, 16, seed=17), randn(2, 3, 6, 4, seed=18), causal))
    # a padding-style mask (B, 1, Lq, Lk) with rows that allow no key at all
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)[:, None, None, :].expand(2, 1, 4, 5)
    padding = padding.clone()
    padding[0, 0, 3] = False  # batch 0, query 3: nothing allowed
    padding[1, 0, 0] = False  # batch 1, query 0: nothing allowed
    cases.append(("q (2, 2, 4, 8), k, v (2, 2, 5, 8), mask (2, 1, 4, 5) with fully masked rows",
                  randn(2, 2, 4, 8, seed=19), randn(2, 2, 5, 8, seed=20), randn(2, 2, 5, 8, seed=21), padding))

    for description, q, k, v, mask in cases:
        what = f"scaled_dot_product_attention({description})"
        args = (q, k, v) if mask is None else (q, k, v, mask)
        got = run(fn, *args)
        weights_shape = q.shape[:-1] + k.shape[-2:-1]
        if isinstance(got, torch.Tensor) and got.shape == weights_shape and weights_shape != v.shape[:-2] + (q.shape[-2], v.shape[-1]):
            raise AssertionError(f"{what}: wrong shape {tuple(got.shape)}: that is the shape of the weights P "
                                 "(..., Lq, Lk); return the output P @ v (..., Lq, dv)")
        mistakes = {
            "the 1/sqrt(d) scale is missing": ref_attention(q, k, v, mask, scale="none"),
            "the scores are scaled by 1/d instead of 1/sqrt(d)": ref_attention(q, k, v, mask, scale="d"),
            "the softmax is taken over the queries (dim -2) instead of the keys (dim -1)":
                ref_attention(q, k, v, mask, dim=-2),
        }
        if mask is not None:
            mistakes.update({
                "the mask is inverted: True must mean may attend (fill the scores where ~mask)":
                    ref_attention(q, k, v, ~mask),
                "the mask is ignored": ref_attention(q, k, v),
                "rows with no allowed key are not set to zero (filling with a large negative number such as "
                "-1e9 gives them uniform weights); a query that may attend to nothing must give a zero output":
                    ref_attention(q, k, v, mask, empty_rows="uniform"),
            })
        harness.expect_close(got, ref_attention(q, k, v, mask), what, mistakes=mistakes)

    # large scores (about 900 here): exp overflows unless the softmax subtracts the row max
    q, k, v = randn(1, 4, 16, seed=22, scale=30.0), randn(1, 6, 16, seed=23, scale=30.0), randn(1, 6, 8, seed=24)
    what = "scaled_dot_product_attention(q, k with entries of size about 30, so scores of size about 900)"
    got = run(fn, q, k, v)
    expect_finite(got, what, "subtract each row's max score before exp (a stable softmax), "
                             "or exp overflows for scores above 88.7")
    harness.expect_close(got, ref_attention(q, k, v), what, mistakes={
        "the 1/sqrt(d) scale is missing": ref_attention(q, k, v, scale="none"),
    })


def check_causal_mask(fn) -> None:
    for length in (4, 7, 1):
        what = f"causal_mask({length})"
        got = run(fn, length)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
        if got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected a boolean tensor (dtype torch.bool, True = may attend), "
                                 f"got dtype {got.dtype}")
        ones = torch.ones(length, length, dtype=torch.bool)
        harness.expect_close(got, ones.tril(), what, mistakes={
            "the mask is inverted: True must mean may attend (query i sees keys j <= i)": ~ones.tril(),
            "the mask is transposed: it lets each query see the future (j >= i) instead of the past":
                ones.triu(),
            "the diagonal is missing: a query may attend to its own token (j <= i, not j < i)": ones.tril(-1),
        })


def check_split_heads(fn) -> None:
    for b, length, heads, d, seed in ((2, 5, 3, 4, 30), (1, 4, 1, 6, 31), (3, 2, 8, 1, 32), (2, 6, 2, 3, 33)):
        x = randn(b, length, heads * d, seed=seed)
        what = f"split_heads(x of shape {tuple(x.shape)}, heads={heads})"
        got = run(fn, x, heads)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (b, length, heads, d) != (b, heads, length, d):
            raise AssertionError(f"{what}: wrong shape {tuple(got.shape)} = (B, L, heads, d); "
                                 "move the heads before the sequence with .transpose(1, 2)")
        harness.expect_close(got, x.reshape(b, length, heads, d).transpose(1, 2), what, mistakes={
            "x is reshaped straight to (B, heads, L, d): reshape to (B, L, heads, d) first, then transpose(1, 2), "
            "or the heads mix features of different tokens": x.reshape(b, heads, length, d),
            "the width is split as (d, heads) instead of (heads, d): each head must get consecutive features":
                x.reshape(b, length, d, heads).permute(0, 3, 1, 2),
        })

    x = randn(1, 3, 10, seed=34)
    what = "split_heads(x of shape (1, 3, 10), heads=4)"
    try:
        with ready_made_softmax_forbidden():
            harness.call(fn, x, 4)
    except ValueError as error:
        if "heads" not in str(error):
            raise AssertionError(f"{what}: the ValueError should name the argument `heads`; its message was "
                                 f"{str(error)!r}") from None
    except AssertionError:
        raise
    except Exception as error:
        raise AssertionError(f"{what}: expected a ValueError naming `heads` (4 does not divide 10), got "
                             f"{type(error).__name__}: {error}") from None
    else:
        raise AssertionError(f"{what}: expected a ValueError naming `heads` (4 does not divide 10), "
                             "but nothing was raised")


CHECKERS = {
    "softmax": check_softmax,
    "scaled_dot_product_attention": check_scaled_dot_product_attention,
    "causal_mask": check_causal_mask,
    "split_heads": check_split_heads,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_softmax(impl):
    check_softmax(impl.softmax)


def test_scaled_dot_product_attention(impl):
    check_scaled_dot_product_attention(impl.scaled_dot_product_attention)


def test_causal_mask(impl):
    check_causal_mask(impl.causal_mask)


def test_split_heads(impl):
    check_split_heads(impl.split_heads)


# --- the checkers' own tests: they must reject the stubs and the usual mistakes ---------------------


@pytest.mark.checker
@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_stubs_are_rejected(name):
    stubs = harness.load_lesson("exercises", LESSON)
    with pytest.raises(AssertionError, match="not implemented"):
        CHECKERS[name](getattr(stubs, name))


def softmax_without_max(x, dim=-1):
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def softmax_global_max(x, dim=-1):
    e = torch.exp(x - x.max())
    return e / e.sum(dim=dim, keepdim=True)


def softmax_last_dim_only(x, dim=-1):
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def softmax_whole_tensor_sum(x, dim=-1):
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum()


def softmax_unnormalised(x, dim=-1):
    return torch.exp(x - x.amax(dim=dim, keepdim=True))


def softmax_in_float32(x, dim=-1):
    x = x.float()
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def softmax_in_place(x, dim=-1):
    x -= x.amax(dim=dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def softmax_from_torch(x, dim=-1):
    return torch.softmax(x, dim=dim)


def attention_with(name, *, scale="sqrt", dim=-1, fill=float("-inf"), zero_empty_rows=True, invert=False,
                   ignore_mask=False, return_weights=False, scale_q_in_place=False, stable=True):
    """A learner's attention, named ``name``, with one configurable mistake."""

    def attention(q, k, v, mask=None):
        d = q.shape[-1]
        factor = {"sqrt": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d}[scale]
        if scale_q_in_place:
            q *= factor
            scores = q @ k.transpose(-2, -1)
        else:
            scores = q @ k.transpose(-2, -1) * factor
        use_mask = mask is not None and not ignore_mask
        if use_mask:
            allowed = ~mask if invert else mask
            scores = scores.masked_fill(~allowed, fill)
        shifted = scores - scores.amax(dim=dim, keepdim=True) if stable else scores
        e = torch.exp(shifted)
        weights = e / e.sum(dim=dim, keepdim=True)
        if use_mask and zero_empty_rows:
            weights = torch.where(allowed.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))
        return weights if return_weights else weights @ v

    attention.__name__ = attention.__qualname__ = name
    return attention


def causal_mask_inverted(length):
    return ~torch.ones(length, length, dtype=torch.bool).tril()


def causal_mask_transposed(length):
    return torch.ones(length, length, dtype=torch.bool).triu()


def causal_mask_no_diagonal(length):
    return torch.ones(length, length, dtype=torch.bool).tril(-1)


def causal_mask_float(length):
    return torch.ones(length, length).tril()


def split_heads_without_transpose(x, heads):
    b, length, width = x.shape
    return x.reshape(b, heads, length, width // heads)


def split_heads_forgets_transpose(x, heads):
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads)


def split_heads_interleaved(x, heads):
    b, length, width = x.shape
    return x.reshape(b, length, width // heads, heads).permute(0, 3, 1, 2)


def split_heads_unchecked(x, heads):
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads).transpose(1, 2)


WRONG = [
    # (checker, wrong implementation, words the failure message must contain)
    ("softmax", softmax_without_max, ["max is not subtracted", "overflow"]),
    ("softmax", softmax_global_max, ["whole tensor", "amax(dim=dim"]),
    ("softmax", softmax_last_dim_only, ["last dim", "`dim`"]),
    ("softmax", softmax_whole_tensor_sum, ["sum over the whole tensor"]),
    ("softmax", softmax_unnormalised, ["not normalised"]),
    ("softmax", softmax_in_float32, ["dtype", "float16"]),
    ("softmax", softmax_in_place, ["modified", "in place"]),
    ("softmax", softmax_from_torch, ["torch.softmax"]),
    ("scaled_dot_product_attention", attention_with("attention_without_scale", scale="none"), ["scale is missing"]),
    ("scaled_dot_product_attention", attention_with("attention_scaled_by_1_over_d", scale="d"), ["1/d"]),
    ("scaled_dot_product_attention", attention_with("attention_softmax_over_queries", dim=-2), ["over the queries", "dim -2"]),
    ("scaled_dot_product_attention", attention_with("attention_inverted_mask", invert=True), ["mask is inverted"]),
    ("scaled_dot_product_attention", attention_with("attention_ignores_mask", ignore_mask=True), ["mask is ignored"]),
    ("scaled_dot_product_attention", attention_with("attention_nan_on_empty_rows", zero_empty_rows=False), ["NaN"]),
    ("scaled_dot_product_attention", attention_with("attention_fill_minus_1e9", fill=-1e9, zero_empty_rows=False), ["no allowed key", "-1e9"]),
    ("scaled_dot_product_attention", attention_with("attention_returns_weights", return_weights=True), ["shape", "weights"]),
    ("scaled_dot_product_attention", attention_with("attention_scales_q_in_place", scale_q_in_place=True), ["modified", "in place"]),
    ("scaled_dot_product_attention", attention_with("attention_without_max", stable=False), ["inf or NaN", "max"]),
    ("causal_mask", causal_mask_inverted, ["mask is inverted"]),
    ("causal_mask", causal_mask_transposed, ["transposed", "future"]),
    ("causal_mask", causal_mask_no_diagonal, ["diagonal"]),
    ("causal_mask", causal_mask_float, ["torch.bool"]),
    ("split_heads", split_heads_without_transpose, ["reshaped straight to (B, heads, L, d)"]),
    ("split_heads", split_heads_forgets_transpose, ["shape", "transpose(1, 2)"]),
    ("split_heads", split_heads_interleaved, ["consecutive features"]),
    ("split_heads", split_heads_unchecked, ["ValueError", "heads"]),
]


@pytest.mark.checker
@pytest.mark.parametrize("checker, wrong, words", WRONG, ids=[f"{c}-{w.__name__}" for c, w, _ in WRONG])
def test_checker_catches_mistake(checker, wrong, words):
    with pytest.raises(AssertionError) as caught:
        CHECKERS[checker](wrong)
    message = str(caught.value)
    for word in words:
        assert word in message, f"expected {word!r} in the checker's message, got: {message}"
