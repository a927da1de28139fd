"""The linear-attention benchmark's bookkeeping (timings need a GPU and are never asserted)."""

import json

import torch

import kernels
from benchmarks import common
from benchmarks import linear as bench_linear

DEVICE = kernels.expected_device()  # the interpreter on CPU tensors, or the compiled kernel on a GPU


def test_shapes_keep_width_fixed_and_tokens_up_to_16k():
    for length in bench_linear.LENGTHS:
        for head_dim in bench_linear.HEAD_DIMS:
            batch, heads = bench_linear.shape_for(length, head_dim)
            assert heads * head_dim == 2048 and batch * length == max(16384, length)


def test_output_path_names_card_and_date(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path, "linear").name == "linear_nvidia-h100-80gb-hbm3_2026-11-27.json"


def test_load_results_reads_only_linear_files(tmp_path):
    (tmp_path / "linear_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "linear": []}))
    (tmp_path / "flash_b_2026-01-01.json").write_text("{}")
    assert [r["environment"]["device"] for r in bench_linear.load_results(tmp_path)] == ["a"]


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_linear.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_the_whole_sweep_runs_at_toy_size_on_the_cpu():
    # a rehearsal of the GPU run: the same code path at toy sizes with a fake timer
    fake = {"triton_linear": [1.0, 0.5, 2.0], "torch_chunked": [3.0, 2.0, 4.0], "sdpa_causal": [4.0, 3.0, 5.0]}
    calls = []

    def timer(call):
        call()
        calls.append(1)
        return list(fake.values())[(len(calls) - 1) % 3]

    results = bench_linear.run([32, 48], [16], torch.float32, device=DEVICE, timer=timer,
                               shape=lambda length, head_dim: (1, 2))
    rows = results["linear"]
    assert len(rows) == 2 * 2  # lengths x (fwd, fwd_bwd)
    for row in rows:
        assert row["ms"] == fake
        assert max(row["max_rel_diff_vs_torch"].values()) < 1e-5, row
        assert row["speedup_vs_sdpa"] == 4.0
    json.dumps(results)  # what main() writes must serialise
