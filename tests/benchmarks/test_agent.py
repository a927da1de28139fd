"""Lesson 31's benchmark bookkeeping, rehearsed on the CPU at toy sizes (timings need a GPU and are never asserted)."""

import json

import torch

import kernels
from benchmarks import agent as bench_agent
from benchmarks import common

DEVICE = kernels.expected_device()  # the interpreter on CPU tensors, or the compiled kernel on a GPU


def test_flop_counts_and_the_bound():
    # two maps of N x n: 8 B H N n d; dense: 4 B H N^2 d; the ratio is N / (2 n)
    assert bench_agent.agent_flops(2, 3, 64, 4, 16, "fwd") == 8 * 2 * 3 * 64 * 4 * 16
    assert bench_agent.agent_flops(2, 3, 64, 4, 16, "fwd_bwd") == 3.5 * 8 * 2 * 3 * 64 * 4 * 16
    assert bench_agent.full_flops(2, 3, 64, 16, "fwd") == common.attention_flops(2, 3, 64, 16, False, "fwd")
    for length, agents in [(1024, 49), (16384, 256), (4096, 64)]:
        ratio = bench_agent.full_flops(1, 1, length, 64, "fwd") / bench_agent.agent_flops(1, 1, length, agents, 64, "fwd")
        assert abs(ratio - bench_agent.speedup_bound(length, agents)) < 1e-9
    assert bench_agent.speedup_bound(16384, 256) == 32.0


def test_every_configuration_pools_its_agents():
    q = torch.randn(1, 2, 2048, 16)
    for length in bench_agent.LENGTHS:
        for agents in bench_agent.AGENTS:
            x = torch.zeros(1, 1, length, 16)
            assert bench_agent.pooled_agents(x, agents).shape == (1, 1, agents, 16)
    # on a one-row grid (2048 is no square) each agent is the mean of a run of consecutive queries
    a = bench_agent.pooled_agents(q, 64)
    assert torch.allclose(a, q.view(1, 2, 64, 32, 16).mean(3), atol=1e-6)


def test_output_path_and_loading(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path, "agent").name == "agent_nvidia-h100-80gb-hbm3_2026-11-27.json"
    (tmp_path / "agent_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "agent": []}))
    (tmp_path / "flash_b_2026-01-01.json").write_text("{}")
    assert [r["environment"]["device"] for r in bench_agent.load_results(tmp_path)] == ["a"]


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_agent.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_the_whole_sweep_runs_at_toy_size_on_the_cpu():
    # the GPU run's code path at toy sizes with a fake timer: 36 tokens (a 6 x 6 grid), 4 and 9 agents
    fake = [3.0, 2.0, 4.0]
    results = bench_agent.run([36, 20], [4, 9], torch.float32, head_dim=16, device=DEVICE,
                              timer=lambda call: (call(), fake)[1], shape=lambda length, head_dim: (1, 2))
    rows = results["agent"]
    assert len(rows) == 2 * 2 * 2  # lengths x agents x (fwd, fwd_bwd)
    for row in rows:
        assert set(row["ms"]) == {"agent_flash", "agent_sdpa", "full_sdpa"}
        for errors in row["max_abs_diff_vs_reference"].values():
            assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) < 1e-4, row
        assert row["ms"]["agent_flash"] == fake and row["speedup_vs_full"]["agent_flash"] == 1.0
        flops = bench_agent.agent_flops(1, 2, row["length"], row["num_agents"], 16, row["mode"])
        assert abs(row["tflops"]["agent_flash"] - flops / 3e-3 / 1e12) < 1e-12
        assert row["bound"] == row["length"] / (2 * row["num_agents"])
    json.dumps(results)  # what main() writes must serialise


def test_the_check_catches_a_wrong_implementation(monkeypatch):
    # a reference that forgets the agent step must show up as a large difference, not pass silently
    q, k, v = (torch.randn(1, 1, 36, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    good = bench_agent.check_against_reference(q, k, v, 4)
    assert max(good["agent_sdpa"].values()) < 1e-5
    monkeypatch.setattr(bench_agent, "reference", lambda q, k, v, n: torch.softmax(q.float() @ k.float().mT / 4, -1) @ v.float())
    bad = bench_agent.check_against_reference(q, k, v, 4)
    assert bad["agent_sdpa"]["out"] > 1e-2
