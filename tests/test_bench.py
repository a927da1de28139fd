"""The benchmark's bookkeeping (the timings themselves need a GPU and are never asserted)."""

import json

import torch

from kernels import bench


def test_flop_count_convention():
    # forward 4 B H N^2 d, half when causal, forward+backward 3.5 times the forward
    assert bench.attention_flops(2, 3, 8, 16, False, "fwd") == 4 * 2 * 3 * 64 * 16
    assert bench.attention_flops(2, 3, 8, 16, True, "fwd") == 2 * 2 * 3 * 64 * 16
    assert bench.attention_flops(2, 3, 8, 16, False, "fwd_bwd") == 3.5 * 4 * 2 * 3 * 64 * 16


def test_shapes_keep_tokens_and_width_fixed():
    for length in bench.LENGTHS:
        for head_dim in bench.HEAD_DIMS:
            batch, heads = bench.shape_for(length, head_dim)
            assert batch * length == 16384 and heads * head_dim == 2048


def test_output_path_names_card_and_date(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert bench.output_path(env, tmp_path).name == "flash_nvidia-h100-80gb-hbm3_2026-11-27.json"


def test_load_results_reads_committed_files(tmp_path):
    (tmp_path / "flash_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "results": []}))
    (tmp_path / "other.json").write_text("{}")
    assert [r["environment"]["device"] for r in bench.load_results(tmp_path)] == ["a"]


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
