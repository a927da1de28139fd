"""Lesson 50's benchmark bookkeeping, rehearsed on the CPU at toy size (timings need a GPU, never asserted)."""

import json

import torch

import kernels
from benchmarks import bias as bench_bias
from benchmarks import common

DEVICE = kernels.expected_device()


def test_the_whole_sweep_runs_at_toy_size_on_the_cpu():
    results = bench_bias.run([40, 48], head_dim=16, rank=3, dtype=torch.float32, device=DEVICE,
                             timer=lambda call: (call(), [2.0, 1.0, 3.0])[1], shape=lambda length, head_dim: (1, 2))
    rows = results["bias"]
    assert len(rows) == 2 * 2 * 2  # causal x lengths x (fwd, fwd_bwd)
    for row in rows:
        assert set(row["ms"]) == set(bench_bias.NAMES)
        errors = row["max_abs_diff_vs_sdpa_dense"]
        assert set(errors) == {"flashbias", "dense_flash", "sdpa_concat"}
        for name, diffs in errors.items():
            assert set(diffs) == {"out", "dq", "dk", "dv"} and max(diffs.values()) < 1e-4, (name, diffs)
        flops = bench_bias.attention_flops(1, 2, row["length"], 16, row["causal"], row["mode"])
        assert abs(row["tflops"]["flashbias"] - flops / 2e-3 / 1e12) < 1e-12
        assert bench_bias.speedups(row) == {"dense_flash": 1.0, "sdpa_dense": 1.0, "sdpa_concat": 1.0}
    json.dumps(results)  # what main() writes must serialise


def test_speedups_are_time_ratios():
    row = {"ms": {"flashbias": [2.0, 1, 3], "dense_flash": [3.0, 2, 4], "sdpa_dense": None, "sdpa_concat": [1.0, 1, 1]}}
    assert bench_bias.speedups(row) == {"dense_flash": 1.5, "sdpa_concat": 0.5}


def test_inputs_make_an_exact_low_rank_bias():
    q, k, v, u, w, bias = bench_bias.make_inputs(1, 2, 20, 16, 4, torch.float64, "cpu")
    assert u.shape == (1, 2, 20, 4) and torch.allclose(bias, u @ w.transpose(-2, -1))
    assert torch.linalg.matrix_rank(bias[0, 0]).item() == 4


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_bias.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_output_file_and_loading(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path, "bias").name == "bias_nvidia-h100-80gb-hbm3_2026-11-27.json"
    (tmp_path / "bias_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "bias": []}))
    (tmp_path / "flash_b_2026-01-01.json").write_text("{}")
    assert [r["environment"]["device"] for r in bench_bias.load_results(tmp_path)] == ["a"]
