"""One contract for every registered mechanism, so that each new lesson inherits it.

Built by name with the registry's defaults, each token mixer maps ``(B, L, dim)`` to ``(B, L, dim)`` with finite
values and gradients, gives the same output twice (in evaluation), keeps the samples of a batch apart, never lets
an earlier position see a later token when built causal, takes ``causal`` as a ``bool`` only, and refuses an
empty sequence or an input in another dtype than its parameters with an error that names ``x``.
"""

import pytest
import torch

import attnlib

DIM, HEADS, LENGTH = 32, 2, 16

MECHANISMS = attnlib.list_mechanisms()
CAUSAL = [m for m in MECHANISMS if m.supports_causal]

# what a mechanism does by design that the contract would otherwise refuse, and why
ONLY_CAUSAL = {"h2o-attn": "H2O evicts keys while decoding left to right",
               "alibi-lowrank": "ALiBi's rank-2 factors are -m (i - j), ALiBi only where j <= i"}
RANDOM_PER_CALL = {"pgqa": "PGQA subtracts fresh noise from each group's output at every call (the paper's method)"}
BATCH_COUPLED = {
    "pgqa": RANDOM_PER_CALL["pgqa"],
    "catanet": "before its first training step CATANet's centres are the means of chunks of the whole batch "
               "(the official code's initialisation)",
}


def build(mechanism, causal=None):
    causal = mechanism.name in ONLY_CAUSAL if causal is None else causal
    torch.manual_seed(0)
    return attnlib.build_mechanism(mechanism.name, DIM, HEADS, causal=causal)


def output(module, x):
    y = module(x)
    return y[0] if isinstance(y, tuple) else y


def ids(mechanisms):
    return [m.name for m in mechanisms]


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=ids(MECHANISMS))
def test_shape_finite_values_and_gradients(mechanism):
    module = build(mechanism)
    x = torch.randn(2, LENGTH, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = output(module, x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0, "the output does not depend on the input"
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=ids(MECHANISMS))
def test_deterministic_and_batch_independent_in_evaluation(mechanism):
    module = build(mechanism).eval()
    x = torch.randn(2, LENGTH, DIM, generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[1] = torch.randn(LENGTH, DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second, other = output(module, x), output(module, x), output(module, changed)
    if mechanism.name not in RANDOM_PER_CALL:
        assert torch.equal(first, second), "two calls on the same input differ"
    if mechanism.name not in BATCH_COUPLED:
        assert torch.allclose(first[0], other[0], atol=1e-6), "sample 0 changed when only sample 1 did"


@pytest.mark.parametrize("mechanism", CAUSAL, ids=ids(CAUSAL))
def test_causal_mechanisms_never_see_later_tokens(mechanism):
    module = build(mechanism, causal=True).eval()
    x = torch.randn(1, LENGTH, DIM, generator=torch.Generator().manual_seed(4))
    later = x.clone()
    later[:, 10:] = torch.randn(1, LENGTH - 10, DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(output(module, x)[:, :10], output(module, later)[:, :10], atol=1e-6)


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=ids(MECHANISMS))
def test_causal_is_a_bool(mechanism):
    # "False" is a non-empty string, so taken by truthiness it would build a causal mixer
    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        attnlib.build_mechanism(mechanism.name, DIM, HEADS, causal="False")


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=ids(MECHANISMS))
def test_empty_input_and_a_wrong_dtype_are_named(mechanism):
    module = build(mechanism)
    with pytest.raises(ValueError, match=r"x: expected at least one token, got shape \(2, 0, 32\)"):
        module(torch.randn(2, 0, DIM))
    with pytest.raises(TypeError, match="x: expected torch.float32 .* got torch.float64"):
        module(torch.randn(2, LENGTH, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected last dim 32"):
        module(torch.randn(2, LENGTH, DIM + 1))
    if getattr(module, "backend", None) != "kernel":  # the Triton kernels compute in 16 or 32 bits only
        assert output(module.double(), torch.randn(1, 3, DIM, dtype=torch.float64)).dtype == torch.float64


def test_the_contract_covers_every_mechanism_and_its_exemptions_exist():
    names = set(ids(MECHANISMS))
    assert len(names) >= 27
    assert set(ONLY_CAUSAL) | set(RANDOM_PER_CALL) | set(BATCH_COUPLED) <= names
