"""Lesson 31: agent attention (attnlib.linear.agent_attention).

The two softmax steps against a float64 loop oracle; the module against an independent re-implementation
in the official code's layout (pooling over all channels before the head split, the three-piece biases,
DWC on V); what the derivation promises (generalised linear attention, a row-stochastic map of rank at
most n, one agent, as many agents as tokens); the two-call flash path against the library (CPU
interpreter); gradients; the registry (no causal form); bad inputs.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from attnlib import TinyTransformer, attention, build_mechanism, get_mechanism
from attnlib.linear.agent_attention import (
    AgentAttention,
    AgentPositionBias,
    agent_attention,
    agent_attention_flash,
    agent_attention_naive,
    agent_grid,
    effective_map,
    pool_agents,
    token_grid,
)

DEVICE = kernels.expected_device()


def make_inputs(b=1, h=2, n=6, m=None, num_agents=3, d=4, dv=5, *, dtype=torch.float64, seed=0):
    m = n if m is None else m
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, dv), (b, h, num_agents, d)]
    return [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]


# --- the two softmax steps --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,num_agents", [(6, 6, 3), (5, 7, 1), (4, 4, 4)], ids=["N6-n3", "N5-M7-n1", "N4-n4"])
def test_matches_the_loop_oracle_with_biases(n, m, num_agents):
    q, k, v, a = make_inputs(n=n, m=m, num_agents=num_agents, seed=n + m)
    g = torch.Generator().manual_seed(7)
    b1 = torch.randn(2, num_agents, m, generator=g, dtype=torch.float64)
    b2 = torch.randn(1, 2, n, num_agents, generator=g, dtype=torch.float64)
    want = agent_attention_naive(q, k, v, a, agent_bias=b1, query_bias=b2)
    assert torch.allclose(agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2), want, atol=1e-12)
    assert torch.allclose(agent_attention(q, k, v, a, scale=0.3), agent_attention_naive(q, k, v, a, scale=0.3), atol=1e-12)


def test_the_oracle_against_brute_force_matrices():
    # the oracle itself, once, against the equation written with whole matrices
    q, k, v, a = make_inputs(n=5, num_agents=2)
    s = 4 ** -0.5
    want = torch.softmax(s * q @ a.mT, -1) @ (torch.softmax(s * a @ k.mT, -1) @ v)
    assert torch.allclose(agent_attention_naive(q, k, v, a), want, atol=1e-12)


def test_generalised_linear_attention_and_the_effective_map():
    q, k, v, a = make_inputs(n=9, num_agents=3, seed=3)
    out, (phi_q, agent_to_key) = agent_attention(q, k, v, a, return_weights=True)
    phi_k = agent_to_key.mT  # (B, H, N, n)
    # O = phi_q(Q) (phi_k(K)^T V): linear in N, no normaliser needed
    assert torch.allclose(out, phi_q @ (phi_k.mT @ v), atol=1e-12)
    # rows of phi_q and columns of phi_k sum to one
    assert torch.allclose(phi_q.sum(-1), torch.ones(1, 2, 9, dtype=torch.float64))
    assert torch.allclose(phi_k.sum(-2), torch.ones(1, 2, 3, dtype=torch.float64))
    m = effective_map(phi_q, agent_to_key)
    assert torch.allclose(m @ v, out, atol=1e-12)
    assert torch.allclose(m.sum(-1), torch.ones(1, 2, 9, dtype=torch.float64)) and (m >= 0).all()
    assert torch.linalg.matrix_rank(m[0, 0]).item() <= 3


def test_one_agent_gives_every_query_the_same_output():
    # one agent: the query step has a single choice (weight 1), so O = softmax(s a K^T) V for every query
    q, k, v, _ = make_inputs(n=7, num_agents=1, seed=4)
    a = pool_agents(q, (1, 7), (1, 1))
    assert torch.allclose(a, q.mean(2, keepdim=True), atol=1e-12)
    out = agent_attention(q, k, v, a)
    assert torch.allclose(out, attention(a, k, v).expand_as(out), atol=1e-12)


def test_as_many_agents_as_tokens_with_agents_on_the_keys_and_an_identity_agent_step_is_softmax_attention():
    q, k, v, _ = make_inputs(n=6, num_agents=6, seed=5)
    eye = torch.eye(6, dtype=torch.bool)
    # B_1 masks every key but the agent's own: softmax(s K K^T + B_1) = I, so V_A = V; with A = K the
    # query step is softmax(s Q K^T): exactly softmax attention
    identity_bias = torch.zeros(6, 6, dtype=torch.float64).masked_fill(~eye, float("-inf"))
    out, (_, agent_to_key) = agent_attention(q, k, v, k, agent_bias=identity_bias, return_weights=True)
    assert torch.equal(agent_to_key[0, 0], eye.double())
    assert torch.allclose(out, attention(q, k, v), atol=1e-12)
    # a finite bias -beta (1 - I) approaches it: the error shrinks as beta grows
    errors = [(agent_attention(q, k, v, k, agent_bias=-beta * (~eye).double()) - attention(q, k, v)).abs().max().item()
              for beta in (0.0, 4.0, 16.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_agents_equal_to_the_queries_is_not_softmax_attention():
    # n = N and A = Q without biases: softmax(s Q Q^T) softmax(s Q K^T) V, two maps in a row
    q, k, v, _ = make_inputs(n=6, num_agents=6, seed=6)
    out = agent_attention(q, k, v, q)
    assert (out - attention(q, k, v)).abs().max() > 1e-2
    s = 4 ** -0.5
    assert torch.allclose(out, torch.softmax(s * q @ q.mT, -1) @ torch.softmax(s * q @ k.mT, -1) @ v, atol=1e-12)


def test_gradients():
    q, k, v, a = (x.requires_grad_() for x in make_inputs(n=4, num_agents=2, d=3, dv=2, seed=8))
    b1 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *xs: agent_attention(*xs[:4], agent_bias=xs[4], query_bias=xs[5]),
                                    (q, k, v, a, b1, b2))


# --- pooling and the grid ---------------------------------------------------------------------------


def test_pooling_averages_grid_cells_and_ignores_the_head_split():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 3, 16, 4, generator=g, dtype=torch.float64)  # a 4 x 4 grid
    agents = pool_agents(q, (4, 4), (2, 2))
    grid = q.view(2, 3, 4, 4, 4)
    for i in range(2):
        for j in range(2):
            cell = grid[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3))
            assert torch.allclose(agents[:, :, 2 * i + j], cell)
    # the official code pools all heads' channels at once, before the head split: the same agents
    merged = q.transpose(1, 2).reshape(2, 16, 12)
    image = merged.view(2, 4, 4, 12).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(image, 2).flatten(2).transpose(1, 2)  # (B, n, H*d)
    assert torch.allclose(pooled.view(2, 4, 3, 4).transpose(1, 2), agents)


def test_grids():
    assert token_grid(49) == (7, 7) and token_grid(12) == (1, 12) and token_grid(12, (3, 4)) == (3, 4)
    assert agent_grid((7, 7), 9) == (3, 3) and agent_grid((1, 12), 5) == (1, 5)


# --- the module against the official layout ---------------------------------------------------------


def official_layout(module: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """Agent attention as agent_deit.py lays it out (without its class token), written independently."""
    b, n, c = x.shape
    heads, d, na = module.num_heads, module.head_dim, module.num_agents
    hh, ww = module.grid
    p = int(na ** 0.5)
    q, k, v = module.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q.reshape(b, hh, ww, c).permute(0, 3, 1, 2), (p, p)).reshape(b, c, -1).permute(0, 2, 1)
    split = lambda t: t.reshape(b, -1, heads, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, agents = split(q), split(k), split(v), split(agents)
    bias = module.bias
    b1 = F.interpolate(bias.agent_table, size=(hh, ww), mode="bilinear").reshape(1, heads, na, -1)
    b1 = b1 + (bias.agent_rows[None, :, :, :, :] + bias.agent_cols[None]).reshape(1, heads, na, -1)
    b2 = F.interpolate(bias.query_table, size=(hh, ww), mode="bilinear").reshape(1, heads, na, -1).permute(0, 1, 3, 2)
    b2 = b2 + (bias.query_rows[None] + bias.query_cols[None]).reshape(1, heads, -1, na)
    agent_v = torch.softmax(agents * d ** -0.5 @ k.mT + b1, -1) @ v
    out = (torch.softmax(q * d ** -0.5 @ agents.mT + b2, -1) @ agent_v).transpose(1, 2).reshape(b, n, c)
    out = out + module.dwc(v.transpose(1, 2).reshape(b, hh, ww, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, c)
    return module.proj(out)


def test_module_matches_the_official_layout():
    torch.manual_seed(0)
    module = AgentAttention(12, 2, num_agents=4, grid=(6, 6)).double()
    with torch.no_grad():  # biases well away from zero, so that each piece matters
        for p in module.bias.parameters():
            p.normal_()
    x = torch.randn(2, 36, 12, dtype=torch.float64)
    assert torch.allclose(module(x), official_layout(module, x), atol=1e-12)


def test_paper_form_and_code_biases_differ():
    # the paper's compact equation has no biases; the code adds B_1, B_2 (initialised at std 0.02).
    # Zero biases give the paper's form exactly; the code's initial biases already move the output.
    torch.manual_seed(1)
    module = AgentAttention(8, 2, num_agents=4, grid=(4, 4), dwc=False).double()
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (module._heads(t) for t in module.qkv(x).chunk(3, -1))
        a = pool_agents(q, (4, 4), (2, 2))
        paper = module.proj(agent_attention(q, k, v, a).transpose(1, 2).reshape(1, 16, 8))
        code = module(x)
        assert 1e-6 < (code - paper).abs().max() < 0.1
        for p in module.bias.parameters():
            p.zero_()
        assert torch.allclose(module(x), paper, atol=1e-12)


def test_bias_shapes_and_initialisation():
    torch.manual_seed(2)
    bias = AgentPositionBias(3, 9, (5, 6))
    b1, b2 = bias()
    assert b1.shape == (3, 9, 30) and b2.shape == (3, 30, 9)
    stds = [p.std().item() for p in bias.parameters()]
    assert all(0.01 < s < 0.03 for s in stds)
    # trunc_normal_(std=.02) cuts at the absolute bounds -2 and 2 (100 standard deviations), not at
    # +-2 std: in effect a plain normal, so values beyond 2 std do occur
    values = torch.cat([p.flatten() for p in bias.parameters()])
    assert values.abs().max() > 0.04 and values.abs().max() <= 2.0


def test_dwc_is_depthwise_on_the_grid():
    # V changed at one grid cell changes the DWC term only in its 3 x 3 neighbourhood
    torch.manual_seed(3)
    module = AgentAttention(8, 2, num_agents=4, grid=(5, 5), position_bias=False)
    v = torch.zeros(1, 8, 5, 5)
    v[0, :, 2, 2] = 1.0
    response = (module.dwc(v) - module.dwc(torch.zeros_like(v))).abs().sum(1)[0]
    assert (response[1:4, 1:4] > 0).all() and response.sum() == response[1:4, 1:4].sum()


# --- the flash path (two calls of lesson 01's kernel) -----------------------------------------------


def test_two_flash_calls_match_the_library_forward_and_gradients():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(3))
    a = pool_agents(q, (1, 37), (1, 5))
    xs = [x.clone().to(DEVICE).requires_grad_() for x in (q, k, v, a)]
    ys = [x.clone().requires_grad_() for x in (q, k, v, a)]
    out = agent_attention_flash(*xs)
    want = agent_attention(*ys)
    assert torch.allclose(out.cpu(), want, atol=2e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(DEVICE))
    want.backward(grad)
    for x, y in zip(xs, ys):
        assert torch.allclose(x.grad.cpu(), y.grad, atol=1e-4)


def test_kernel_backend_matches_the_reference_backend():
    torch.manual_seed(4)
    ref = AgentAttention(32, 2, num_agents=9, grid=(6, 6), position_bias=False)
    fast = AgentAttention(32, 2, num_agents=9, grid=(6, 6), position_bias=False, backend="kernel")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 36, 32)
    assert torch.allclose(fast.to(DEVICE)(x.to(DEVICE)).cpu(), ref(x), atol=2e-5)


# --- registry and model -----------------------------------------------------------------------------


def test_registered_without_a_causal_form():
    mech = get_mechanism("agent")
    assert (mech.paper, mech.lesson, mech.supports_causal) == ("P06", "31", False)
    with pytest.raises(ValueError, match="cannot run causally"):
        build_mechanism("agent", 16, 2, causal=True)
    with pytest.raises(ValueError, match="no causal form"):
        AgentAttention(16, 2, causal=True)


def test_defaults_work_with_two_heads_and_in_a_tiny_transformer():
    torch.manual_seed(5)
    mixer = build_mechanism("agent", 16, 2)
    for length in (7, 49):  # a one-row grid and a square grid
        out, maps = mixer(torch.randn(2, length, 16), return_weights=True)
        assert out.shape == (2, length, 16) and maps.shape == (2, 2, length, length)
    model = TinyTransformer(input_dim=3, output_dim=2, max_len=16, dim=16, depth=2, num_heads=2, mechanism="agent",
                            mechanism_options={"num_agents": 4, "grid": (4, 4)}, causal=False)
    model(torch.randn(2, 16, 3)).sum().backward()
    assert model.blocks[0].mixer.bias.agent_table.grad.abs().sum() > 0


def test_bad_inputs():
    q, k, v, a = make_inputs()
    with pytest.raises(ValueError, match="agents: expected"):
        agent_attention(q, k, v, a[..., :2])
    with pytest.raises(TypeError, match="one dtype"):
        agent_attention(q, k, v, a.float())
    with pytest.raises(ValueError, match="v: expected"):
        agent_attention(q, k, v[:, :, :3], a)
    with pytest.raises(ValueError, match="num_agents: expected a perfect square"):
        AgentAttention(16, 2, num_agents=5, grid=(4, 4))
    with pytest.raises(ValueError, match=r"grid: expected h \* w = 12"):
        token_grid(12, (3, 5))
    with pytest.raises(ValueError, match="grid: expected a pair"):
        AgentAttention(16, 2, grid=(4,))
    with pytest.raises(ValueError, match="grid: the position biases"):
        AgentAttention(16, 2, position_bias=True)
    with pytest.raises(ValueError, match="flash kernel takes no bias"):
        AgentAttention(16, 2, grid=(4, 4), num_agents=4, backend="kernel")
    with pytest.raises(ValueError, match="backend: expected"):
        AgentAttention(16, 2, backend="fast")
    with pytest.raises(ValueError, match="x: expected 16 tokens"):
        AgentAttention(16, 2, grid=(4, 4), num_agents=4)(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="x: expected last dim 16"):
        AgentAttention(16, 2)(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="dim: expected a multiple"):
        AgentAttention(15, 2)


@pytest.mark.parametrize("grid, agents, words", [
    ((4, 4), (0, 0), "agents_grid: expected a positive int, got 0"),
    ((4.0, 4.0), (2, 2), "grid: expected a positive int, got 4.0"),
    ((16,), (2, 2), r"grid: expected a pair \(rows, columns\)"),
], ids=["no-agents", "float-grid", "one-number"])
def test_pool_agents_names_a_bad_grid(grid, agents, words):
    with pytest.raises(ValueError, match=words):
        pool_agents(torch.randn(1, 2, 16, 8), grid, agents)
