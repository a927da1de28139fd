"""Mixture-of-head attention (lesson 12, P04): gates, load balance, the module against a float64 loop oracle."""

import itertools
import math

import pytest
import torch
from torch import nn

import attnlib
from attnlib import MultiHeadAttention, build_mechanism, get_mechanism
from attnlib.heads.mixture_of_heads import (
    MixtureOfHeadsAttention,
    default_head_split,
    load_balancing_loss,
    mixture_of_heads_gates,
    routed_head_gates,
    top_k_mask,
)
from attnlib.tools.training import auxiliary_loss


def seeded_module(dim=16, heads=4, *, seed=0, router_scale=3.0, **options):
    """A float64 module with large random router weights (spread-out logits: no top-k ties)."""
    torch.manual_seed(seed)
    module = MixtureOfHeadsAttention(dim, heads, **options).double()
    with torch.no_grad():
        for router in (module.routed_router, module.shared_router, module.type_router):
            if router is not None:
                router.weight.mul_(router_scale)
    return module


def inputs(b=2, length=6, dim=16, seed=1):
    return torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_no_top_k_ties(module, x, margin=1e-6):
    """The oracle sorts and the module calls topk: they agree only if the k-th and (k+1)-th logits differ."""
    if module.routed_router is None or module.top_k == module.num_routed:
        return
    logits = module.routed_router(x).sort(dim=-1, descending=True).values
    gap = logits[..., module.top_k - 1] - logits[..., module.top_k]
    assert gap.min() > margin, "the test input has a near tie at the top-k boundary: pick another seed"


def softmax_list(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def oracle_gates(module, x_t):
    """Eq. 5-6 (paper) or the official code's scaling, for one token ``x_t (dim,)``, written with lists and loops."""
    h, hs, k = module.num_heads, module.num_shared, module.top_k
    code = module.convention == "code"
    rows = lambda lin: [float(lin.weight[i] @ x_t) for i in range(lin.weight.shape[0])]  # noqa: E731
    alpha = [1.0, 1.0]
    if hs > 0 and k > 0:
        alpha = [a * (2 if code else 1) for a in softmax_list(rows(module.type_router))]
    shared = softmax_list(rows(module.shared_router)) if hs > 1 else [1.0] * hs
    shared = [s * (hs if code else 1) for s in shared]
    routed = [0.0] * (h - hs)
    if k > 0:
        p = softmax_list(rows(module.routed_router))
        chosen = sorted(range(h - hs), key=lambda i: -p[i])[:k]
        kept_mass = sum(p[i] for i in chosen)
        for i in chosen:
            routed[i] = k * p[i] / kept_mass if code else p[i]
    return [alpha[0] * s for s in shared] + [alpha[1] * r for r in routed]


def oracle_moh(module, x):
    """MoH(x_t) = sum_i g_{t,i} H^i_t W_O^i, with every head's attention written as loops over keys."""
    b, length, _ = x.shape
    h, d = module.num_heads, module.head_dim
    q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)
    w_o = module.out_proj.weight.T  # (h d, dim): rows i*d..(i+1)*d are W_O^i
    out = torch.zeros(b, length, module.dim, dtype=torch.float64)
    for bi, t in itertools.product(range(b), range(length)):
        gates = oracle_gates(module, x[bi, t])
        keys = range(t + 1) if module.causal else range(length)
        for i in range(h):
            cols = slice(i * d, (i + 1) * d)
            scores = [float(q[bi, t, cols] @ k[bi, j, cols]) / math.sqrt(d) for j in keys]
            weights = softmax_list(scores)
            head = sum(w * v[bi, j, cols] for w, j in zip(weights, keys))
            out[bi, t] += gates[i] * (head @ w_o[cols])
    return out


SPLITS = [
    pytest.param(4, 2, 1, id="h4-shared2-top1"),
    pytest.param(6, 3, 2, id="h6-shared3-top2"),
    pytest.param(4, 1, 2, id="h4-shared1-top2"),
    pytest.param(4, 0, 2, id="h4-no-shared"),
    pytest.param(4, 4, 0, id="h4-all-shared"),
]


@pytest.mark.parametrize("heads, shared, top_k", SPLITS)
@pytest.mark.parametrize("convention", ["code", "paper"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_matches_loop_oracle(heads, shared, top_k, convention, causal):
    dim = 4 * heads
    module = seeded_module(dim, heads, num_shared=shared, top_k=top_k, convention=convention, causal=causal)
    x = inputs(dim=dim)
    assert_no_top_k_ties(module, x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), oracle_moh(module, x), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("heads, shared", [(4, 2), (8, 4), (3, 1), (4, 0), (4, 4)],
                         ids=["h4-s2", "h8-s4", "h3-s1", "h4-s0", "h4-s4"])
def test_all_heads_with_uniform_routers_is_mha(heads, shared):
    """Code convention: every routed head kept and zero routers give gates of exactly 1, hence plain MHA."""
    torch.manual_seed(0)
    dim = 4 * heads
    mha = MultiHeadAttention(dim, heads, causal=True)
    moh = MixtureOfHeadsAttention(dim, heads, num_shared=shared, top_k=heads - shared, causal=True)
    missing, unexpected = moh.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and all("router" in name for name in missing)
    with torch.no_grad():
        for router in (moh.routed_router, moh.shared_router, moh.type_router):
            if router is not None:
                router.weight.zero_()
    x = torch.randn(2, 7, dim)
    out = moh(x)
    if heads in (4, 8):  # softmax of 0s is 1/2^n, times 2^n: exactly 1 in floating point
        assert torch.equal(moh.last_gates, torch.ones_like(moh.last_gates))
        assert torch.equal(out, mha(x))
    torch.testing.assert_close(moh.last_gates, torch.ones_like(moh.last_gates))
    torch.testing.assert_close(out, mha(x))


def test_paper_convention_is_not_mha_scale():
    """The paper's gates sum to one instead of h, so the same weights give a smaller output than MHA."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    moh = MixtureOfHeadsAttention(16, 4, num_shared=2, top_k=2, convention="paper")
    moh.load_state_dict(mha.state_dict(), strict=False)
    with torch.no_grad():
        for router in (moh.routed_router, moh.shared_router, moh.type_router):
            router.weight.zero_()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moh.gates(x)[0], torch.full((2, 5, 4), 0.25))
    torch.testing.assert_close(moh(x), mha(x) / 4)


@pytest.mark.parametrize("heads, shared, top_k", SPLITS)
def test_paper_gates_sum(heads, shared, top_k):
    r"""Paper: shared gates sum to alpha_1, routed ones to alpha_2 times the kept probability mass."""
    module = seeded_module(4 * heads, heads, num_shared=shared, top_k=top_k, convention="paper")
    x = inputs(dim=4 * heads)
    with torch.no_grad():
        gates, probs, mask = module.gates(x)
        alpha = torch.softmax(module.type_router(x), -1) if module.type_router is not None else None
    shared_sum, routed_sum = gates[..., :shared].sum(-1), gates[..., shared:].sum(-1)
    if shared and top_k:
        torch.testing.assert_close(shared_sum, alpha[..., 0])
        torch.testing.assert_close(routed_sum, alpha[..., 1] * (probs * mask).sum(-1))
    total = gates.sum(-1)
    assert (total <= 1 + 1e-12).all()
    if top_k == heads - shared:  # every routed head kept: the gates are a distribution over heads
        torch.testing.assert_close(total, torch.ones_like(total))
    else:
        assert (total < 1 - 1e-6).all()


@pytest.mark.parametrize("heads, shared, top_k", SPLITS)
@pytest.mark.parametrize("convention", ["code", "paper"])
def test_routed_gates_zero_outside_top_k_and_shared_always_on(heads, shared, top_k, convention):
    module = seeded_module(4 * heads, heads, num_shared=shared, top_k=top_k, convention=convention)
    x = inputs(length=20, dim=4 * heads)
    with torch.no_grad():
        gates = module.gates(x)[0]
    routed = gates[..., shared:]
    assert ((routed != 0).sum(-1) == top_k).all()  # exactly k routed heads per token
    assert (gates[..., :shared] > 0).all()  # shared heads never off
    if top_k:
        logits = module.routed_router(x)
        kept = logits.topk(top_k, -1).indices
        assert ((routed != 0) == torch.zeros_like(routed, dtype=torch.bool).scatter(-1, kept, True)).all()


def test_code_gates_renormalise_and_scale():
    """Code: kept probabilities renormalised to one, times k; paper: the raw kept probabilities."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0]], dtype=torch.float64)
    p = torch.softmax(logits, -1)
    code, _, mask = routed_head_gates(logits, 2, convention="code")
    paper, _, _ = routed_head_gates(logits, 2, convention="paper")
    assert mask.tolist() == [[True, False, False, True]]
    torch.testing.assert_close(paper, p * mask)
    torch.testing.assert_close(code, 2 * p * mask / (p * mask).sum())
    torch.testing.assert_close(code.sum(), torch.tensor(2.0, dtype=torch.float64))
    assert paper.sum() < 1


def test_top_k_with_ties_still_keeps_k():
    """A uniform router ties every head: topk still keeps exactly k, and the code's gates are all 1 there."""
    logits = torch.zeros(3, 5, 6)
    gates, probs, mask = routed_head_gates(logits, 2)
    assert (mask.sum(-1) == 2).all()
    torch.testing.assert_close(gates[mask], torch.ones(3 * 5 * 2))
    assert torch.equal(top_k_mask(probs, 0), torch.zeros_like(mask))


def brute_force_balance(probs, mask):
    """sum_i f_i P_i with f_i and P_i counted token by token."""
    tokens, experts = probs.shape
    total = 0.0
    for i in range(experts):
        f = sum(float(mask[t, i]) for t in range(tokens)) / tokens
        p = sum(float(probs[t, i]) for t in range(tokens)) / tokens
        total += f * p
    return total


@pytest.mark.parametrize("tokens, experts, top_k", [(7, 4, 1), (12, 6, 2), (5, 3, 3)])
def test_load_balancing_loss_brute_force(tokens, experts, top_k):
    g = torch.Generator().manual_seed(tokens)
    logits = 2 * torch.randn(2, tokens, experts, generator=g, dtype=torch.float64)
    _, probs, mask = routed_head_gates(logits, top_k)
    want = brute_force_balance(probs.reshape(-1, experts), mask.reshape(-1, experts))
    assert load_balancing_loss(probs, mask, convention="paper").item() == pytest.approx(want, rel=1e-12)
    # the code's loss: mean(P * f) * E * E = E * (paper's)
    assert load_balancing_loss(probs, mask, convention="code").item() == pytest.approx(experts * want, rel=1e-12)


def test_load_balancing_loss_is_minimal_under_uniform_routing():
    experts, top_k = 5, 2
    uniform = torch.full((10, experts), 1.0 / experts, dtype=torch.float64)
    uniform_mask = top_k_mask(uniform, top_k)
    floor = top_k / experts
    assert load_balancing_loss(uniform, uniform_mask, convention="paper").item() == pytest.approx(floor)
    assert load_balancing_loss(uniform, uniform_mask, convention="code").item() == pytest.approx(top_k)
    # one token: the loss is its top-k probability mass, at least k/E, equal only for uniform routing
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        _, p, m = routed_head_gates(torch.randn(1, experts, generator=g, dtype=torch.float64), top_k)
        assert load_balancing_loss(p, m, convention="paper").item() > floor
    # a perfectly balanced assignment costs k/E whatever the probabilities
    p = torch.softmax(torch.randn(experts, experts, generator=g, dtype=torch.float64), -1)
    m = torch.stack([torch.roll(torch.arange(experts) < top_k, shift) for shift in range(experts)])
    assert load_balancing_loss(p, m, convention="paper").item() == pytest.approx(floor)
    # collapse (every token confidently on the same heads) costs far more
    collapsed = torch.softmax(torch.tensor([[9.0, 8.0, 0.0, 0.0, 0.0]] * 10, dtype=torch.float64), -1)
    loss = load_balancing_loss(collapsed, top_k_mask(collapsed, top_k), convention="paper").item()
    assert loss > 0.99 > 2 * floor


def test_aux_loss_set_in_training_only():
    module = seeded_module(16, 4, num_shared=1, top_k=2, aux_weight=0.01)
    x = inputs()
    module.train()
    module(x)
    _, probs, mask = module.gates(x)
    torch.testing.assert_close(module.aux_loss, 0.01 * load_balancing_loss(probs, mask, convention="code"))
    assert auxiliary_loss(module) is module.aux_loss or torch.equal(auxiliary_loss(module), module.aux_loss)
    module.eval()
    module(x)
    assert module.aux_loss is None and auxiliary_loss(module) is None
    module.train()
    module.aux_weight = 0.0
    module(x)
    assert module.aux_loss is None


def test_transformer_collects_every_layer_aux_loss():
    torch.manual_seed(0)
    model = attnlib.TinyTransformer(vocab_size=8, max_len=6, dim=16, depth=3, num_heads=4, mechanism="moh")
    model.train()
    model(torch.randint(0, 8, (2, 6)))
    losses = [block.mixer.aux_loss for block in model.blocks]
    assert all(isinstance(loss, torch.Tensor) for loss in losses)
    torch.testing.assert_close(auxiliary_loss(model), sum(losses))


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_causality(convention):
    torch.manual_seed(0)
    module = MixtureOfHeadsAttention(16, 4, num_shared=1, top_k=2, convention=convention, causal=True)
    x = torch.randn(2, 9, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 16)
    with torch.no_grad():
        y, y_changed = module(x), module(changed)
    torch.testing.assert_close(y[:, :5], y_changed[:, :5], atol=0, rtol=0)
    assert not torch.allclose(y[:, 5:], y_changed[:, 5:])


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_gradients_reach_every_router(convention):
    module = seeded_module(16, 4, num_shared=2, top_k=1, convention=convention, router_scale=1.0)
    x = inputs()
    module.train()
    (module(x).square().sum() + module.aux_loss).backward()
    for name in ("routed_router", "shared_router", "type_router", "q_proj", "out_proj"):
        grad = getattr(module, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the load-balancing loss alone trains the routed router (through P_i)
    module.zero_grad()
    module(x)
    module.aux_loss.backward()
    assert module.routed_router.weight.grad.abs().sum() > 0
    assert module.q_proj.weight.grad is None


def test_gradcheck():
    module = seeded_module(8, 4, num_shared=1, top_k=2, causal=True)
    x = inputs(1, 4, 8).requires_grad_(True)
    assert_no_top_k_ties(module, x, margin=1e-3)
    assert torch.autograd.gradcheck(lambda z: module(z), (x,), eps=1e-6, atol=1e-6)


def test_blockwise_backend_agrees():
    torch.manual_seed(0)
    ref = MixtureOfHeadsAttention(16, 4, causal=True)
    blockwise = MixtureOfHeadsAttention(16, 4, causal=True, backend="blockwise")
    blockwise.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(ref(x), blockwise(x))


def test_defaults_and_registry():
    assert default_head_split(2) == (1, 1)
    assert default_head_split(4) == (2, 1)
    assert default_head_split(8) == (4, 2)
    mechanism = get_mechanism("moh")
    assert mechanism.paper == "P04" and mechanism.lesson == "12" and mechanism.supports_causal
    for heads in (1, 2, 3, 4, 8):
        mixer = build_mechanism("moh", 8 * heads, heads, causal=True)
        assert mixer.active_heads <= heads and mixer(torch.randn(1, 3, 8 * heads)).shape == (1, 3, 8 * heads)
    assert build_mechanism("moh", 32, 8, causal=True).active_heads == 6  # 75% of the heads


def test_return_weights():
    module = MixtureOfHeadsAttention(16, 4, causal=True)
    out, weights = module(torch.randn(2, 5, 16), return_weights=True)
    assert out.shape == (2, 5, 16) and weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))


@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param(dict(num_shared=5), ValueError, "num_shared: expected an int from 0 to 4", id="too-many-shared"),
    pytest.param(dict(num_shared=-1), ValueError, "num_shared", id="negative-shared"),
    pytest.param(dict(num_shared=2, top_k=3), ValueError, "top_k: expected an int from 0 to 2", id="top-k-too-big"),
    pytest.param(dict(top_k=1.5), ValueError, "top_k", id="top-k-float"),
    pytest.param(dict(num_shared=0, top_k=0), ValueError, "at least one active head", id="no-active-head"),
    pytest.param(dict(convention="both"), ValueError, "convention: expected one of", id="convention"),
    pytest.param(dict(aux_weight=-0.1), ValueError, "aux_weight: expected a number >= 0", id="aux-weight"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="backend"),
])
def test_bad_options(kwargs, error, words):
    with pytest.raises(error, match=words):
        MixtureOfHeadsAttention(16, 4, **kwargs)


def test_bad_inputs():
    module = MixtureOfHeadsAttention(16, 4)
    with pytest.raises(ValueError, match="x: expected last dim 16"):
        module(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="x: expected a 3-d"):
        module(torch.randn(3, 16))
    with pytest.raises(TypeError, match="x: expected a floating-point dtype"):
        module(torch.ones(1, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="convention"):
        routed_head_gates(torch.randn(2, 3), 1, convention="Code")
    with pytest.raises(ValueError, match="convention"):
        load_balancing_loss(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), convention="mean")


def test_gates_function_matches_module():
    module = seeded_module(16, 4, num_shared=2, top_k=1)
    x = inputs()
    direct = mixture_of_heads_gates(x, num_heads=4, num_shared=2, top_k=1, routed_router=module.routed_router,
                                    shared_router=module.shared_router, type_router=module.type_router)
    with torch.no_grad():
        module(x)
    torch.testing.assert_close(direct[0].detach(), module.last_gates)


def test_plots_draw_gates_and_load():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlib.heads.mixture_of_heads import plot_head_gates, plot_head_load

    module = seeded_module(16, 4, num_shared=2, top_k=1)
    with torch.no_grad():
        module(inputs())
    ax = plot_head_gates(module.last_gates[0], token_labels=[f"t{i}" for i in range(6)], num_shared=2)
    assert ax.images[0].get_array().mask.sum() == 6  # one routed head off per token, of the two
    ax = plot_head_load(module.last_gates, num_shared=2)
    heights = [bar.get_height() for bar in ax.patches]
    assert heights[:2] == [1.0, 1.0] and sum(heights[2:]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gates: expected a 2-d"):
        plot_head_gates(module.last_gates)
    plt.close("all")


def _routers(dim, shared, routed):
    return dict(type_router=nn.Linear(dim, 2), shared_router=nn.Linear(dim, shared), routed_router=nn.Linear(dim, routed))


@pytest.mark.parametrize("call, error, words", [
    (lambda x: mixture_of_heads_gates(x, num_heads=4, num_shared=2, top_k=1, **_routers(8, 2, 3)), ValueError,
     r"routed_router: expected an nn.Linear\(8, 2\) \(one logit per routed head\), got nn.Linear\(8, 3\)"),
    (lambda x: mixture_of_heads_gates(x, num_heads=4, num_shared=2, top_k=1), TypeError,
     "type_router: expected an nn.Linear"),
    (lambda x: mixture_of_heads_gates(x, num_heads=4, num_shared=2, top_k=3, **_routers(8, 2, 2)), ValueError,
     "top_k: expected an int from 0 to 2"),
    (lambda x: routed_head_gates(torch.randn(3, 4), 5), ValueError, "top_k: expected an int from 0 to 4"),
    (lambda x: routed_head_gates(torch.randn(3, 4), -1), ValueError, "top_k: expected an int from 0 to 4"),
    (lambda x: routed_head_gates(torch.ones(3, 4, dtype=torch.long), 1), TypeError, "logits: expected a floating"),
    (lambda x: load_balancing_loss(torch.rand(6, 4), torch.ones(4, 6, dtype=torch.bool)), ValueError,
     r"mask: expected the shape of probs \(6, 4\)"),
], ids=["router-size", "router-missing", "top-k-gates", "top-k-large", "top-k-negative", "int-logits",
        "loss-shapes"])
def test_gates_name_what_is_wrong(call, error, words):
    with pytest.raises(error, match=words):
        call(torch.randn(1, 3, 8))
