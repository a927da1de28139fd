"""Checks for lesson 47's exercises: the streaming mask, the straight-through Gumbel sample, the sparsity penalty.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
computation written as loops. When the answer matches a *known mistake* (a window one token too wide, a mask
that forgets causality, the soft sample in the forward pass, the sparsity averaged over the batch, ...), the
failure message names it.

Run against your work with ``make check LESSON=47``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "47_flux_attention"


# --- references ---------------------------------------------------------------------------------------------


def loop_mask(length, sink, window):
    return torch.tensor([[j <= i and (j < sink or i - j < window) for j in range(length)] for i in range(length)])


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the checkers -----------------------------------------------------------------------------------------------


def check_streaming_mask(fn):
    for length, sink, window in [(7, 1, 3), (9, 2, 2), (6, 0, 1), (5, 3, 5)]:
        got = harness.call(fn, length, sink, window)
        want = loop_mask(length, sink, window)
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        mistakes = {
            "the window holds one token too many (i - j <= window instead of i - j < window: the query itself "
            "counts as one of the w recent tokens)": (j <= i) & ((j < sink) | (i - j <= window)),
            "the mask forgets causality: sink tokens after the query must stay hidden (and with j <= i)":
                (j < sink) | ((i - j < window) & (j <= i)),
            "the sinks are missing (only the local window is kept)": (j <= i) & (i - j < window),
            "the sinks hold one token too many (j <= sink instead of j < sink)": (j <= i) & ((j <= sink) | (i - j < window)),
            "True and False are swapped (True must mean may attend)": ~want,
        }
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"streaming_mask: expected a boolean tensor, got "
                                 f"{got.dtype if isinstance(got, torch.Tensor) else type(got).__name__}")
        harness.expect_close(got.double(), want.double(), f"streaming_mask({length}, sink={sink}, window={window})",
                             mistakes={k: v.double() for k, v in mistakes.items()}, atol=0, rtol=0)


def check_straight_through(fn):
    for shape, tau, seed in [((6, 2), 0.7, 0), ((3, 4, 2), 1.5, 1)]:
        logits = seeded(*shape, seed=seed).requires_grad_(True)
        u = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        noise = -torch.log(-torch.log(u + 1e-8) + 1e-8)
        got = harness.call(fn, logits, noise.clone(), tau)
        soft = torch.softmax((logits.detach() + noise) / tau, -1)
        want = torch.nn.functional.one_hot((logits.detach() + noise).argmax(-1), 2).double()
        mistakes = {
            "the forward value is the soft sample y; it must be the one-hot h (add y - y.detach() to h)": soft,
            "the noise is ignored (argmax of the logits alone)":
                torch.nn.functional.one_hot(logits.detach().argmax(-1), 2).double(),
            "the one-hot picks the smallest entry (argmin instead of argmax)": 1 - want,
        }
        what = f"straight_through on logits {shape}, tau={tau}"
        harness.expect_close(got, want, what, mistakes=mistakes, atol=0, rtol=0)
        if not got.requires_grad:
            raise AssertionError(f"{what}: the output carries no gradient; the straight-through estimator must pass "
                                 "the soft sample's gradient back (h + (y - y.detach()))")
        weights = seeded(*shape, seed=seed + 20)
        (grad,) = torch.autograd.grad((got * weights).sum(), logits)
        logits2 = logits.detach().clone().requires_grad_(True)
        (want_grad,) = torch.autograd.grad((torch.softmax((logits2 + noise) / tau, -1) * weights).sum(), logits2)
        no_tau = logits.detach().clone().requires_grad_(True)
        (grad_no_tau,) = torch.autograd.grad((torch.softmax(no_tau + noise, -1) * weights).sum(), no_tau)
        no_noise = logits.detach().clone().requires_grad_(True)
        (grad_no_noise,) = torch.autograd.grad((torch.softmax(no_noise / tau, -1) * weights).sum(), no_noise)
        harness.expect_close(grad, want_grad, f"{what}: the gradient with respect to the logits",
                             mistakes={"the temperature is left out of the soft sample (divide (a + g) by tau)":
                                       grad_no_tau,
                                       "the noise is ignored in the soft sample (softmax((a + g) / tau))":
                                       grad_no_noise}, atol=1e-10, rtol=1e-8)


def check_flux_penalty(fn):
    for layers, batch, target, lam1, lam2, seed in [(4, 5, 0.45, 0.3, 0.2, 0), (3, 6, 0.8, 0.1, 0.4, 1)]:
        g = torch.Generator().manual_seed(seed)
        z = (torch.rand(layers, batch, generator=g) < 0.5).double()
        z[:, 0] = 1.0  # one sample with every layer full, rho = 0
        got = harness.call(fn, z.clone(), target, lam1, lam2)
        want = torch.zeros(batch, dtype=torch.float64)
        for b in range(batch):
            rho = 1 - sum(float(z[l, b]) for l in range(layers)) / layers
            want[b] = lam1 * abs(rho - target) + lam2 * (rho - target) ** 2
        dense = z.mean(0)
        rho = 1 - dense
        mistakes = {
            "the sparsity is the share of full layers (rho = 1 - mean z, z = 1 means full attention)":
                lam1 * (dense - target).abs() + lam2 * (dense - target) ** 2,
            "the absolute value is missing from the linear term": lam1 * (rho - target) + lam2 * (rho - target) ** 2,
            "the multipliers are swapped (lambda1 weighs |rho - t|, lambda2 the square)":
                lam2 * (rho - target).abs() + lam1 * (rho - target) ** 2,
            "z is summed over layers instead of averaged (divide by the number of layers N)":
                lam1 * (1 - z.sum(0) - target).abs() + lam2 * (1 - z.sum(0) - target) ** 2,
        }
        harness.expect_close(got, want, f"flux_penalty on z {(layers, batch)}, t={target}", mistakes=mistakes,
                             atol=1e-10, rtol=1e-8)


CHECKERS = {
    "streaming_mask": check_streaming_mask,
    "straight_through": check_straight_through,
    "flux_penalty": check_flux_penalty,
}


# --- the learner's tests --------------------------------------------------------------------------------------


def test_streaming_mask(impl):
    check_streaming_mask(impl.streaming_mask)


def test_straight_through(impl):
    check_straight_through(impl.straight_through)


def test_flux_penalty(impl):
    check_flux_penalty(impl.flux_penalty)


# --- the checkers' own tests: they must reject the stubs and the usual mistakes -----------------------------


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


def _grid(length):
    return torch.arange(length)[:, None], torch.arange(length)[None, :]


def mask_wide_window(length, sink, window):
    i, j = _grid(length)
    return (j <= i) & ((j < sink) | (i - j <= window))


def mask_no_sinks(length, sink, window):
    i, j = _grid(length)
    return (j <= i) & (i - j < window)


def mask_inverted(length, sink, window):
    i, j = _grid(length)
    return ~((j <= i) & ((j < sink) | (i - j < window)))


def mask_sinks_not_causal(length, sink, window):
    i, j = _grid(length)
    return (j < sink) | ((i - j < window) & (j <= i))


def st_soft_forward(logits, noise, tau):
    return torch.softmax((logits + noise) / tau, -1)


def st_no_noise(logits, noise, tau):
    soft = torch.softmax(logits / tau, -1)
    hard = torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard + (soft - soft.detach())


def st_detached(logits, noise, tau):
    soft = torch.softmax((logits + noise) / tau, -1)
    return torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0).detach()


def st_no_tau(logits, noise, tau):
    soft = torch.softmax(logits + noise, -1)
    hard = torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard + (soft - soft.detach())


def penalty_dense_share(z, target, lambda1, lambda2):
    gap = z.mean(0) - target
    return lambda1 * gap.abs() + lambda2 * gap ** 2


def penalty_no_abs(z, target, lambda1, lambda2):
    gap = 1 - z.mean(0) - target
    return lambda1 * gap + lambda2 * gap ** 2


def penalty_swapped(z, target, lambda1, lambda2):
    gap = 1 - z.mean(0) - target
    return lambda2 * gap.abs() + lambda1 * gap ** 2


def penalty_summed(z, target, lambda1, lambda2):
    gap = 1 - z.sum(0) - target
    return lambda1 * gap.abs() + lambda2 * gap ** 2


MISTAKES = {
    "mask-wide-window": ("streaming_mask", mask_wide_window, "one token too many"),
    "mask-no-sinks": ("streaming_mask", mask_no_sinks, "sinks are missing"),
    "mask-inverted": ("streaming_mask", mask_inverted, "True and False are swapped"),
    "mask-not-causal": ("streaming_mask", mask_sinks_not_causal, "forgets causality"),
    "st-soft-forward": ("straight_through", st_soft_forward, "soft sample y"),
    "st-no-noise": ("straight_through", st_no_noise, "noise is ignored"),
    "st-detached": ("straight_through", st_detached, "no gradient"),
    "st-no-tau": ("straight_through", st_no_tau, "temperature is left out"),
    "penalty-dense-share": ("flux_penalty", penalty_dense_share, "share of full layers"),
    "penalty-no-abs": ("flux_penalty", penalty_no_abs, "absolute value is missing"),
    "penalty-swapped": ("flux_penalty", penalty_swapped, "multipliers are swapped"),
    "penalty-summed": ("flux_penalty", penalty_summed, "summed over layers"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
