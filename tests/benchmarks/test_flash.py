"""The benchmark's bookkeeping (the timings themselves need a GPU and are never asserted)."""

import json

import torch

import kernels
from benchmarks import common, flash

DEVICE = kernels.expected_device()  # the interpreter on CPU tensors, or the compiled kernel on a GPU


def test_flop_count_convention():
    # forward 4 B H N^2 d, half when causal, forward+backward 3.5 times the forward
    assert common.attention_flops(2, 3, 8, 16, False, "fwd") == 4 * 2 * 3 * 64 * 16
    assert common.attention_flops(2, 3, 8, 16, True, "fwd") == 2 * 2 * 3 * 64 * 16
    assert common.attention_flops(2, 3, 8, 16, False, "fwd_bwd") == 3.5 * 4 * 2 * 3 * 64 * 16


def test_shapes_keep_tokens_and_width_fixed():
    for length in flash.LENGTHS:
        for head_dim in flash.HEAD_DIMS:
            batch, heads = common.shape_for(length, head_dim)
            assert batch * length == 16384 and heads * head_dim == 2048


def test_output_path_names_card_and_date(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path).name == "flash_nvidia-h100-80gb-hbm3_2026-11-27.json"


def test_load_results_reads_committed_files(tmp_path):
    (tmp_path / "flash_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "results": []}))
    (tmp_path / "other.json").write_text("{}")
    assert [r["environment"]["device"] for r in common.load_results(tmp_path)] == ["a"]


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flash.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_the_whole_sweep_runs_at_toy_size_on_the_cpu():
    # a rehearsal of the GPU run: same code path at toy sizes with a fake timer (on the CPU, the interpreter)
    results = flash.run([32, 48], [16], torch.float32, device=DEVICE, timer=lambda call: (call(), [2.0, 1.0, 3.0])[1],
                        shape=lambda length, head_dim: (1, 2))
    rows = results["results"]
    assert len(rows) == 2 * 2 * 2  # lengths x causal x (fwd, fwd_bwd)
    for row in rows:
        assert set(row["ms"]) == {"triton_flash", "sdpa_default", "sdpa_flash2"}
        assert max(row["max_abs_diff_vs_sdpa"].values()) < 1e-4, row
        assert row["ms"]["triton_flash"] == [2.0, 1.0, 3.0]
        flops = common.attention_flops(1, 2, row["length"], 16, row["causal"], row["mode"])
        assert abs(row["tflops"]["triton_flash"] - flops / 2e-3 / 1e12) < 1e-12
    json.dumps(results)  # what main() writes must serialise


def test_the_tile_sweep_runs_at_toy_size_on_the_cpu():
    candidates = {"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)], "dkdv": [(16, 32, 4, 1)], "dq": [(32, 16, 4, 1), (24, 16, 4, 1)]}
    results = flash.sweep_tiles([40], [16], torch.float32, device=DEVICE, timer=lambda call: (call(), [1.0, 0.5, 2.0])[1],
                                shape=lambda length, head_dim: (1, 1), candidates=candidates)
    rows = results["tile_sweep"]
    assert len(rows) == 2 * 5  # causal x candidates
    failed = [row for row in rows if "error" in row]
    assert [row["tiles"][0] for row in failed] == [24, 24]  # not a power of two: arange rejects it, recorded
    assert all(row["ms"] == [1.0, 0.5, 2.0] for row in rows if "error" not in row)
    assert all(row["max_abs_diff_vs_default"] < 1e-5 for row in rows if "error" not in row)
    json.dumps(results)


def test_the_differential_sweep_runs_at_toy_size_on_the_cpu():
    # lesson 13's benchmark, rehearsed like the flash sweep: fused kernel, two flash calls, two SDPA calls
    results = flash.run_differential([40], [16], torch.float32, device=DEVICE,
                                     timer=lambda call: (call(), [4.0, 3.0, 5.0])[1],
                                     shape=lambda length, head_dim: (1, 2))
    rows = results["differential"]
    assert len(rows) == 2 * 2  # causal x (fwd, fwd_bwd)
    for row in rows:
        assert set(row["ms"]) == {"triton_diff", "two_flash", "two_sdpa"}
        for errors in row["max_abs_diff_vs_two_sdpa"].values():
            assert set(errors) == {"out", "dq1", "dk1", "dq2", "dk2", "dv"} and max(errors.values()) < 1e-4, row
        flops = 2 * common.attention_flops(1, 2, 40, 16, row["causal"], row["mode"])
        assert abs(row["tflops"]["triton_diff"] - flops / 4e-3 / 1e12) < 1e-12
    json.dumps(results)


def test_differential_output_path_is_its_own_file(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path, "differential").name == "differential_nvidia-h100-80gb-hbm3_2026-11-27.json"


def test_time_implementations_records_times_throughput_and_refusals():
    def refuse(fn):
        if fn == "oom":
            raise RuntimeError("CUDA out of memory.\nmore detail")
        return [2.0, 1.0, 3.0]

    row = {"ms": {}, "tflops": {}}
    common.time_implementations(row, {"fast": "fast", "big": "oom"}, refuse, flops={"fast": 4e12, "big": 1e12})
    assert row["ms"] == {"fast": [2.0, 1.0, 3.0], "big": None}
    assert row["tflops"] == {"fast": 4e12 / 2e-3 / 1e12}
    assert row["errors"] == {"big": "CUDA out of memory."}


def test_time_call_runs_the_backward_pass_to_every_input_in_fwd_bwd_mode():
    calls = []
    tensors = [torch.randn(2, 3) for _ in range(2)]

    def fn(a, b):
        calls.append((a.requires_grad, b.requires_grad))
        return a * b

    def once(call):
        call()
        return [1.0, 1.0, 1.0]

    common.time_call(fn, tensors, "fwd", once)
    common.time_call(fn, tensors, "fwd_bwd", once)
    assert calls == [(False, False), (True, True)]
