"""Lesson 47, Flux attention: streaming mask, router, straight-through Gumbel, branches, sparsity penalty."""

import math

import pytest
import torch

from attnlib import TinyTransformer, attention_naive, build_mechanism, get_mechanism
from attnlib.sparse.flux_routing import (
    FarRecall,
    FluxAttention,
    FluxModel,
    LayerRouter,
    LocalCopy,
    SparsityConstraint,
    attention_flops,
    gumbel_noise,
    lagrangian_penalty,
    mean_over_tasks,
    pool_first_last,
    pool_first_last_prefixes,
    reverse_gradient,
    sample_mix,
    set_mode,
    sparsity,
    straight_through_gumbel,
    streaming_attention,
    streaming_mask,
    target_schedule,
    temperature,
)
from attnlib.tools.training import auxiliary_loss


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(causal=True, sink=1, window=3, pool_size=2)
    options.update(kwargs)
    return FluxAttention(16, 2, **options).double()


def random_router(module, seed=0, x=None):
    """Give the router's last layer random weights, so that its decision depends on the input; with ``x``,
    centre the logit gap on its median over ``x`` so that both decisions occur."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = module.router.head[-1]
        last.weight.copy_(50 * torch.randn(last.weight.shape, generator=g, dtype=last.weight.dtype))
        last.bias.zero_()
        if x is not None:
            logits = module.router_logits(module.split_heads(module.q_proj(x), module.num_heads))
            last.bias[1] = -(logits[..., 1] - logits[..., 0]).median()


# --- the sparse branch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, sink, window", [(7, 1, 3), (10, 0, 1), (6, 2, 6), (9, 3, 2)])
def test_streaming_mask_brute_force(length, sink, window):
    mask = streaming_mask(length, sink=sink, window=window)
    for i in range(length):
        for j in range(length):
            want = j <= i and (j < sink or i - j < window)
            assert bool(mask[i, j]) == want, (i, j)


def test_streaming_mask_decoding_rows_are_the_last_rows():
    full = streaming_mask(9, sink=2, window=3)
    assert torch.equal(streaming_mask(2, 9, sink=2, window=3), full[-2:])


def test_streaming_attention_matches_oracle_and_reduces_to_causal():
    q, k, v = seeded(2, 2, 8, 4), seeded(2, 2, 8, 4, seed=1), seeded(2, 2, 8, 4, seed=2)
    mask = streaming_mask(8, sink=1, window=3)
    torch.testing.assert_close(streaming_attention(q, k, v, sink=1, window=3), attention_naive(q, k, v, mask=mask,
                                                                                                causal=True))
    # a window as long as the sequence is plain causal attention
    torch.testing.assert_close(streaming_attention(q, k, v, sink=0, window=8), attention_naive(q, k, v, causal=True))


def test_attention_flops_counts_allowed_pairs():
    assert attention_flops(streaming_mask(10, sink=10, window=10), 8, 2) == 4 * 8 * 2 * 55
    # sink 1 + window 4: rows 0..4 see all i+1 keys, rows 5..9 see 1 + 4
    assert attention_flops(streaming_mask(10, sink=1, window=4), 1) == 4 * (1 + 2 + 3 + 4 + 5 + 5 * 5)


# --- the straight-through Gumbel estimator ------------------------------------------------------------------------


def test_gumbel_noise_formula_and_seed():
    a = gumbel_noise((5, 2), generator=torch.Generator().manual_seed(3))
    b = gumbel_noise((5, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    u = torch.rand((5, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, -torch.log(-torch.log(u + 1e-8) + 1e-8))
    assert not torch.equal(a, gumbel_noise((5, 2), generator=torch.Generator().manual_seed(4)))


def test_gumbel_argmax_samples_the_softmax():
    """Gumbel-max: argmax(a + g) picks choice 1 with probability softmax(a)_1."""
    logits = torch.tensor([0.3, 1.1]).expand(20000, 2)
    z, _ = straight_through_gumbel(logits, 1.0, noise=gumbel_noise((20000, 2), generator=torch.Generator().manual_seed(0)))
    assert z[:, 1].mean().item() == pytest.approx(torch.softmax(torch.tensor([0.3, 1.1]), 0)[1].item(), abs=0.015)


def test_straight_through_forward_is_one_hot_and_gradient_is_the_softs():
    logits = seeded(6, 2).requires_grad_(True)
    noise = gumbel_noise((6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z, soft = straight_through_gumbel(logits, 0.7, noise=noise)
    assert set(z.detach().flatten().tolist()) <= {0.0, 1.0}
    assert torch.equal(z.detach().sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(z.detach().argmax(-1), (logits + noise).argmax(-1))
    weights = seeded(6, 2, seed=5)
    (grad_z,) = torch.autograd.grad((z * weights).sum(), logits)
    logits2 = logits.detach().clone().requires_grad_(True)
    soft2 = torch.softmax((logits2 + noise) / 0.7, -1)
    (grad_soft,) = torch.autograd.grad((soft2 * weights).sum(), logits2)
    torch.testing.assert_close(grad_z, grad_soft, atol=1e-12, rtol=0)
    assert grad_z.abs().sum() > 0


def test_temperature_sharpens_the_soft_sample():
    logits = torch.tensor([[0.0, 1.0]])
    _, hot = straight_through_gumbel(logits, 1.5)
    _, cold = straight_through_gumbel(logits, 0.5)
    assert cold[0, 1] > hot[0, 1] > 0.5


# --- the router ----------------------------------------------------------------------------------------------


def test_router_starts_at_full_probability_0989():
    router = LayerRouter(8)
    p = torch.softmax(router(torch.randn(5, 8)), -1)[:, 1]
    want = math.exp(4.5) / (1 + math.exp(4.5))
    torch.testing.assert_close(p, torch.full((5,), want))
    assert 0.988 < want < 0.990
    assert torch.equal(router.head[-1].weight, torch.zeros(2, 8))


def test_router_network_sizes():
    router = LayerRouter(4)
    shapes = [tuple(m.weight.shape) for m in router.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(32, 4), (8, 32), (16, 8), (4, 16), (2, 4)]


def test_pool_first_last_brute_force_and_overlap():
    q = seeded(2, 3, 7, 4)
    for pool in (1, 2, 3, 5):
        want = torch.zeros(2, 4, dtype=torch.float64)
        for b in range(2):
            rows = [q[b, h, t] for h in range(3) for t in list(range(min(pool, 7))) + list(range(max(0, 7 - pool), 7))]
            want[b] = torch.stack(rows).mean(0)
        torch.testing.assert_close(pool_first_last(q, pool), want)
    # the prefix version: row t pools the prefix 0..t
    prefixes = pool_first_last_prefixes(q, 2)
    for t in range(7):
        torch.testing.assert_close(prefixes[:, t], pool_first_last(q[:, :, :t + 1], 2))


# --- the layer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["sample", "prefix"])
def test_z_one_is_full_and_z_zero_is_sparse_exactly(routing):
    module = layer(routing=routing, allow_leak=routing == "sample")
    x = seeded(2, 8, 16)
    q = module.split_heads(module.q_proj(x), 2)
    k, v = module.split_heads(module.k_proj(x), 2), module.split_heads(module.v_proj(x), 2)
    module.train()
    full_out = module.out_proj(attention_naive(q, k, v, causal=True).transpose(1, 2).reshape(2, 8, 16))
    sparse_mask = streaming_mask(8, sink=1, window=3)
    sparse_out = module.out_proj(attention_naive(q, k, v, mask=sparse_mask, causal=True).transpose(1, 2).reshape(2, 8, 16))
    with torch.no_grad():
        module.router.reset_last_layer(50.0)  # z = 1 whatever the noise
        torch.testing.assert_close(module(x), full_out)
        assert torch.equal(module.last_z, torch.ones(2, 8, dtype=torch.float64))
        module.router.reset_last_layer(-50.0)  # z = 0
        torch.testing.assert_close(module(x), sparse_out)
        assert torch.equal(module.last_z, torch.zeros(2, 8, dtype=torch.float64))
        for mode, want in (("full", full_out), ("sparse", sparse_out)):
            module.mode = mode
            torch.testing.assert_close(module(x), want)


def test_mixed_batch_routes_each_sample_and_eval_computes_only_the_chosen_branch():
    module = layer(routing="sample", allow_leak=True)
    x = seeded(6, 8, 16)
    random_router(module, seed=1, x=x)
    module.eval()
    with torch.no_grad():
        out = module(x)
        z = module.last_z[:, 0]
        assert 0 < z.sum() < 6, "the test needs both decisions in the batch"
        module.mode = "full"
        full = module(x)
        module.mode = "sparse"
        sparse = module(x)
    torch.testing.assert_close(out, z[:, None, None] * full + (1 - z[:, None, None]) * sparse)


def test_eval_decision_is_the_argmax():
    module = layer(routing="sample", allow_leak=True)
    random_router(module, seed=2)
    x = seeded(5, 8, 16)
    module.eval()
    with torch.no_grad():
        module(x)
        logits = module.router_logits(module.split_heads(module.q_proj(x), 2))
    assert torch.equal(module.last_z[:, 0], (logits[:, 1] > logits[:, 0]).double())


def test_seeded_noise_reproducible_in_training():
    module = layer(routing="sample", allow_leak=True)
    random_router(module, seed=3)
    module.train()
    x = seeded(8, 8, 16)
    outs = []
    for _ in range(2):
        module.generator = torch.Generator().manual_seed(7)
        outs.append((module(x), module.last_z.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_router_gradient_flows_through_the_straight_through_z():
    module = layer(routing="sample", allow_leak=True)
    random_router(module, seed=4)
    module.train()
    module.generator = torch.Generator().manual_seed(0)
    module(seeded(4, 8, 16)).square().sum().backward()
    assert module.router.head[-1].weight.grad.abs().sum() > 0
    assert module.router.features[0].weight.grad.abs().sum() > 0


def test_prefix_routing_is_causal_and_last_position_is_the_sample_decision():
    module = layer(routing="prefix")
    x = seeded(3, 9, 16)
    random_router(module, seed=5, x=x)
    module.eval()
    with torch.no_grad():
        y = module(x)
        prefix_z = module.last_z.clone()
        for t in range(8):
            changed = x.clone()
            changed[:, t + 1:] = seeded(3, 8 - t, 16, seed=t + 10)
            torch.testing.assert_close(module(changed)[:, :t + 1], y[:, :t + 1], atol=1e-12, rtol=0)
        module.routing = "sample"
        module(x)
    assert torch.equal(prefix_z[:, -1], module.last_z[:, -1])
    assert not torch.equal(prefix_z, prefix_z[:, -1:].expand_as(prefix_z)), "the test needs decisions that vary"


def test_sample_routing_reads_the_whole_prompt():
    """The paper's per-prompt decision: an early output can change when a later prompt token changes."""
    module = layer(routing="sample", allow_leak=True, pool_size=1)
    x = seeded(64, 6, 16)
    random_router(module, seed=6, x=x)
    module.eval()
    changed = x.clone()
    changed[:, -1] = seeded(64, 16, seed=99)
    with torch.no_grad():
        y, z = module(x), module.last_z[:, 0].clone()
        y2, z2 = module(changed), module.last_z[:, 0]
    flipped = z != z2
    assert flipped.any(), "the test needs some decision to flip"
    assert not torch.allclose(y[flipped, 4], y2[flipped, 4])  # row 4 misses key 1 in the sparse branch
    torch.testing.assert_close(y[~flipped, :5], y2[~flipped, :5])


def test_gradcheck_through_both_branches():
    module = layer(routing="sample", allow_leak=True)
    module.train()
    x = seeded(2, 5, 16).requires_grad_(True)

    def run(inp):
        module.generator = torch.Generator().manual_seed(0)
        return module(inp)

    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6)


def test_registry_defaults_with_two_heads_and_ten_tokens():
    mechanism = get_mechanism("flux")
    assert mechanism.paper == "P26" and mechanism.lesson == "47" and mechanism.supports_causal
    mixer = build_mechanism("flux", 16, 2, causal=True)
    assert mixer.routing == "prefix"
    assert mixer(torch.randn(2, 10, 16)).shape == (2, 10, 16)
    assert build_mechanism("flux", 16, 2, causal=False).routing == "sample"


# --- sparsity and the Lagrangian -------------------------------------------------------------------------------


def test_sparsity_formula():
    z = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # (layers 4, batch 3)
    torch.testing.assert_close(sparsity(z), torch.tensor([0.5, 1.0, 0.0]))
    per_position = z[:, :, None].expand(4, 3, 5)
    torch.testing.assert_close(sparsity(per_position), sparsity(z))


def test_penalty_value_and_sign_of_lambda_gradient():
    rho, lam1, lam2 = torch.tensor([0.2, 0.9]), torch.tensor(0.3), torch.tensor(0.1)
    torch.testing.assert_close(lagrangian_penalty(rho, 0.5, lam1, lam2),
                               torch.tensor([0.3 * 0.3 + 0.1 * 0.09, 0.3 * 0.4 + 0.1 * 0.16]))
    constraint = SparsityConstraint(2, target=0.5, generator=torch.Generator().manual_seed(0))
    before = (constraint.lambda1.detach().clone(), constraint.lambda2.detach().clone())
    assert ((before[0] >= 0) & (before[0] <= 0.5)).all()
    z = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])  # rho = 0, 1, 0, 0.5
    ids = torch.tensor([0, 0, 1, 1])
    penalty = constraint(z, ids)
    penalty.backward()
    # forward: the plain penalty, task means then their mean
    rho = torch.tensor([0.0, 1.0, 0.0, 0.5])
    plain = lagrangian_penalty(rho, 0.5, before[0][ids], before[1][ids])
    torch.testing.assert_close(penalty, (plain[:2].mean() + plain[2:].mean()) / 2)
    # backward: minus the true gradient, so a minimiser's step increases lambda
    assert (constraint.lambda1.grad < 0).all()
    torch.optim.SGD(constraint.parameters(), lr=0.1).step()
    assert (constraint.lambda1.detach() > before[0]).all() and (constraint.lambda2.detach() >= before[1]).all()


def test_reverse_gradient_equals_maximize():
    lam = torch.tensor([0.2, 0.4], requires_grad=True)
    (reverse_gradient(lam) * torch.tensor([1.0, 3.0])).sum().backward()
    torch.optim.SGD([lam], lr=0.1).step()
    lam2 = torch.tensor([0.2, 0.4], requires_grad=True)
    (lam2 * torch.tensor([1.0, 3.0])).sum().backward()
    torch.optim.SGD([lam2], lr=0.1, maximize=True).step()
    torch.testing.assert_close(lam.detach(), lam2.detach())


def test_penalty_pushes_z_towards_target():
    """The routers' gradient from the penalty alone lowers p_full when rho is below the target."""
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=16, max_len=8, dim=16, depth=2, num_heads=2, mechanism="flux",
                            mechanism_options=dict(routing="sample", allow_leak=True))
    flux = FluxModel(model, 1, target=1.0)
    flux.train()
    flux(torch.randint(0, 16, (4, 8)))
    assert torch.equal(flux.decisions(), torch.ones_like(flux.decisions()))  # starts full (p = 0.989)
    assert torch.equal(auxiliary_loss(flux), flux.constraint.aux_loss)
    flux.constraint.aux_loss.backward()
    bias_grad = model.blocks[0].mixer.router.head[-1].bias.grad
    assert bias_grad[1] > 0 > bias_grad[0]  # descending lowers the full logit, raises the sparse one


def test_mean_over_tasks():
    values, ids = torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 2])
    torch.testing.assert_close(mean_over_tasks(values, ids), torch.tensor(6.0))


def test_schedules():
    assert temperature(0, 100) == pytest.approx(1.5)
    assert temperature(30, 100) == pytest.approx(1.25)
    assert temperature(60, 100) == temperature(99, 100) == 1.0
    assert all(temperature(s, 100) >= temperature(s + 1, 100) for s in range(99))
    assert target_schedule(0, 100, target=0.45) == 0.45  # the code's default: no warm-up
    assert target_schedule(10, 100, target=0.4, warmup_fraction=0.2) == pytest.approx(0.2)
    assert target_schedule(20, 100, target=0.4, warmup_fraction=0.2) == 0.4


# --- tasks -----------------------------------------------------------------------------------------------------


def test_far_recall_and_local_copy_answers():
    g = torch.Generator().manual_seed(0)
    far = FarRecall(num_pairs=6, far_pairs=2)
    batch = far.sample(50, g)
    assert torch.equal(far.solve(batch.inputs)[:, -1], batch.targets[:, -1])
    keys = batch.inputs[:, 0:12:2]
    position = (keys == batch.inputs[:, -1:]).float().argmax(-1)
    assert (position < 2).all() and (position == 0).any() and (position == 1).any()
    local = LocalCopy(seq_len=far.seq_len, offset=2)
    lb = local.sample(50, g)
    assert torch.equal(local.solve(lb.inputs)[:, -1], lb.targets[:, -1])
    assert (lb.inputs >= 8).all()
    mixed, ids = sample_mix([far, local], 4, g)
    assert mixed.inputs.shape == (8, far.seq_len) and ids.tolist() == [0] * 4 + [1] * 4


def test_set_mode_and_model_collects_decisions():
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=16, max_len=8, dim=16, depth=3, num_heads=2, mechanism="flux")
    flux = FluxModel(model)
    set_mode(model, "sparse")
    flux.eval()
    with torch.no_grad():
        flux(torch.randint(0, 16, (2, 8)))
    assert flux.decisions().shape == (3, 2, 8) and flux.decisions().sum() == 0
    assert flux.constraint.aux_loss is None


# --- bad inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(sink=-1), ValueError, "sink: expected a non-negative int"),
    (dict(window=0), ValueError, "window: expected a positive int"),
    (dict(pool_size=0), ValueError, "pool_size: expected a positive int"),
    (dict(routing="token"), ValueError, "routing: expected one of"),
    (dict(mode="half"), ValueError, "mode: expected one of"),
    (dict(tau=0.0), ValueError, "tau: expected a number > 0"),
])
def test_bad_options(kwargs, error, words):
    with pytest.raises(error, match=words):
        FluxAttention(16, 2, **kwargs)


def test_bad_inputs():
    module = FluxAttention(16, 2)
    with pytest.raises(ValueError, match="x: expected last dim 16"):
        module(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="x: expected a 3-d"):
        module(torch.randn(3, 16))
    with pytest.raises(ValueError, match="logits: expected a last dim of 2"):
        straight_through_gumbel(torch.randn(3, 3), 1.0)
    with pytest.raises(ValueError, match="noise: expected shape"):
        straight_through_gumbel(torch.randn(3, 2), 1.0, noise=torch.randn(2, 2))
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        gumbel_noise((2, 2), generator=0)
    with pytest.raises(ValueError, match="z: expected"):
        sparsity(torch.ones(3))
    with pytest.raises(ValueError, match="task_ids: expected shape"):
        SparsityConstraint(2)(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target: expected a number <= 1"):
        SparsityConstraint(1, target=1.5)
    with pytest.raises(ValueError, match="model: expected at least one FluxAttention"):
        FluxModel(TinyTransformer(vocab_size=4, max_len=4, dim=8, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="far_pairs: expected at most"):
        FarRecall(num_pairs=3, far_pairs=4)
    with pytest.raises(ValueError, match="tasks: expected one sequence length"):
        sample_mix([FarRecall(num_pairs=6), LocalCopy(seq_len=5)], 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mode: expected one of"):
        set_mode(TinyTransformer(vocab_size=4, max_len=4, dim=8, depth=1, num_heads=2, mechanism="flux"), "dense")


def test_sample_routing_in_a_causal_layer_is_refused_unless_the_leak_is_allowed():
    with pytest.raises(ValueError, match=r"routing: .sample. makes one decision .* \(not causal\)"):
        layer(routing="sample")
    with pytest.raises(TypeError, match="allow_leak: expected a bool"):
        layer(routing="sample", allow_leak="yes")
    # allowed, the leak is real: an early position's output moves when only later tokens change
    module = layer(routing="sample", allow_leak=True).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, 16, generator=generator, dtype=torch.float64)
    later = x.clone()
    later[:, 6:] = torch.randn(64, 6, 16, generator=generator, dtype=torch.float64)
    last = module.router.head[-1]
    with torch.no_grad():  # a router whose decision depends on the prompt (a fresh one always says "full"),
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
        module(x)  # ... centred so that about half the prompts go each way
        last.bias[1] -= torch.logit(module.last_p_full[:, -1]).median()
        assert (module(x)[:, :6] - module(later)[:, :6]).abs().max() > 1e-3
    layer(routing="sample", causal=False)  # not causal: nothing to leak
