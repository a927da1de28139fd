"""Checks for lesson 31's exercises: pooling agents on the grid, the two softmax steps, the effective map.

Each ``check_xxx(fn)`` runs a learner's function on a few inputs and compares it with an independent
float64 computation. When the answer matches a *known mistake* (agents pooled along the flat sequence, the
grid read column-major, a missing scale, the agent step's softmax over the agents, a transposed map), the
failure message names it.

Run against your work with ``make check LESSON=31``; CI runs it against ``solutions/``. The tests
marked ``checker`` check the checkers themselves: they must reject the stubs and the usual mistakes.
"""

from __future__ import annotations

import pytest
import torch

from . import harness

LESSON = "31_agent_attention"


def _inputs(b, h, n, m, na, d, dv, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64)
            for s in [(b, h, n, d), (b, h, m, d), (b, h, m, dv), (b, h, na, d)]]


def _softmax_rows(s):
    e = (s - s.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


# --- the checkers -----------------------------------------------------------------------------------


def _pool_flat(q, grid, agents_grid):
    b, h, n, d = q.shape
    count = agents_grid[0] * agents_grid[1]
    return q.reshape(b, h, count, n // count, d).mean(3)


def _pool_column_major(q, grid, agents_grid):
    b, h, _, d = q.shape
    (gh, gw), (ph, pw) = grid, agents_grid
    blocks = q.reshape(b, h, ph, gh // ph, pw, gw // pw, d).mean(dim=(3, 5))
    return blocks.transpose(2, 3).reshape(b, h, ph * pw, d)


def check_pool_agents(fn):
    for b, h, grid, agents_grid, d in [(1, 2, (4, 4), (2, 2), 3), (2, 1, (6, 4), (3, 2), 2), (1, 1, (2, 6), (1, 3), 2)]:
        q = _inputs(b, h, grid[0] * grid[1], 1, 1, d, 1, sum(grid))[0]
        got = harness.call(fn, q.clone(), grid, agents_grid)
        # independent: a loop over blocks and the grid cells inside each
        bh, bw = grid[0] // agents_grid[0], grid[1] // agents_grid[1]
        want = torch.zeros(b, h, agents_grid[0] * agents_grid[1], d, dtype=torch.float64)
        for i in range(agents_grid[0]):
            for j in range(agents_grid[1]):
                cells = [y * grid[1] + x for y in range(i * bh, (i + 1) * bh) for x in range(j * bw, (j + 1) * bw)]
                want[:, :, i * agents_grid[1] + j] = q[:, :, cells].mean(2)
        harness.expect_close(got, want, f"pool_agents on a {grid} grid to {agents_grid} agents", mistakes={
            "the agents average runs of consecutive tokens of the flat sequence; average 2-D blocks of the grid":
                _pool_flat(q, grid, agents_grid),
            "the agents come out column-major; agent i * p_w + j is block (i, j), row-major":
                _pool_column_major(q, grid, agents_grid),
        }, atol=1e-12, rtol=1e-10)


def check_agent_attention(fn):
    for b, h, n, m, na, d, dv in [(1, 2, 6, 6, 3, 4, 5), (2, 1, 5, 7, 2, 9, 3), (1, 1, 4, 4, 1, 16, 2)]:
        q, k, v, a = _inputs(b, h, n, m, na, d, dv, n + na)
        got = harness.call(fn, q.clone(), k.clone(), v.clone(), a.clone())
        s = d ** -0.5
        # independent: a loop over agents, then over queries
        want = torch.zeros(b, h, n, dv, dtype=torch.float64)
        for bb in range(b):
            for hh in range(h):
                agent_values = torch.stack([_softmax_rows(s * a[bb, hh, t] @ k[bb, hh].T) @ v[bb, hh] for t in range(na)])
                for i in range(n):
                    want[bb, hh, i] = _softmax_rows(s * q[bb, hh, i] @ a[bb, hh].T) @ agent_values
        mistakes = {
            "the 1/sqrt(d) scale is missing": _softmax_rows(q @ a.mT) @ _softmax_rows(a @ k.mT) @ v,
            "the agent step's softmax runs over the agents (dim -2); each agent's weights over the keys must sum to one":
                _softmax_rows(s * q @ a.mT) @ torch.softmax(s * a @ k.mT, dim=-2) @ v,
        }
        harness.expect_close(got, want, f"agent_attention with N={n}, M={m}, n={na}, d={d}", mistakes=mistakes,
                             atol=1e-10, rtol=1e-8)


def check_effective_map(fn):
    for b, h, n, m, na, d in [(1, 2, 6, 6, 3, 4), (2, 1, 5, 7, 2, 9)]:
        q, k, _, a = _inputs(b, h, n, m, na, d, 1, 2 * n + na)
        got = harness.call(fn, q.clone(), k.clone(), a.clone())
        s = d ** -0.5
        want = torch.einsum("bhia,bhaj->bhij", _softmax_rows(s * q @ a.mT), _softmax_rows(s * a @ k.mT))
        mistakes = {"the 1/sqrt(d) scale is missing": _softmax_rows(q @ a.mT) @ _softmax_rows(a @ k.mT)}
        if n == m:
            mistakes["the map is transposed (its columns sum to one); rows are queries, columns keys"] = want.mT
        harness.expect_close(got, want, f"effective_map with N={n}, M={m}, n={na}", mistakes=mistakes,
                             atol=1e-10, rtol=1e-8)


CHECKERS = {
    "pool_agents": check_pool_agents,
    "agent_attention": check_agent_attention,
    "effective_map": check_effective_map,
}


# --- the learner's tests ----------------------------------------------------------------------------


def test_pool_agents(impl):
    check_pool_agents(impl.pool_agents)


def test_agent_attention(impl):
    check_agent_attention(impl.agent_attention)


def test_effective_map(impl):
    check_effective_map(impl.effective_map)


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


def _two_steps(q, k, v, a, *, scale=True, agent_dim=-1):
    s = q.shape[-1] ** -0.5 if scale else 1.0
    return torch.softmax(s * q @ a.mT, -1) @ torch.softmax(s * a @ k.mT, dim=agent_dim) @ v


def _map(q, k, a, *, scale=True, transpose=False):
    s = q.shape[-1] ** -0.5 if scale else 1.0
    m = torch.softmax(s * q @ a.mT, -1) @ torch.softmax(s * a @ k.mT, -1)
    return m.mT if transpose else m


MISTAKES = {
    "flat-pooling": ("pool_agents", _pool_flat, "consecutive tokens of the flat sequence"),
    "column-major": ("pool_agents", _pool_column_major, "column-major"),
    "max-pooling": ("pool_agents", lambda q, grid, ag: q.reshape(q.shape[0], q.shape[1], ag[0], grid[0] // ag[0],
                                                                  ag[1], grid[1] // ag[1], q.shape[-1])
                    .amax(dim=(3, 5)).reshape(q.shape[0], q.shape[1], -1, q.shape[-1]), "wrong values"),
    "no-scale": ("agent_attention", lambda q, k, v, a: _two_steps(q, k, v, a, scale=False), "scale is missing"),
    "softmax-over-agents": ("agent_attention", lambda q, k, v, a: _two_steps(q, k, v, a, agent_dim=-2),
                            "runs over the agents"),
    "skips-agent-step": ("agent_attention", lambda q, k, v, a: torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, -1) @ v,
                         "wrong values"),
    "map-no-scale": ("effective_map", lambda q, k, a: _map(q, k, a, scale=False), "scale is missing"),
    "map-transposed": ("effective_map", lambda q, k, a: _map(q, k, a, transpose=True), "transposed"),
}


@pytest.mark.checker
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_checker_catches_mistake(mistake):
    name, wrong, words = MISTAKES[mistake]
    with pytest.raises(AssertionError) as info:
        CHECKERS[name](wrong)
    assert words in str(info.value), f"the message does not name the mistake: {info.value}"
