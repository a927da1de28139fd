"""Lesson 40's benchmark bookkeeping, rehearsed on the CPU at toy size (timings need a GPU, never asserted)."""

import json

import torch

import kernels
from benchmarks import common
from benchmarks import sparse as bench_sparse

DEVICE = kernels.expected_device()


def test_the_whole_sweep_runs_at_toy_size_on_the_cpu():
    results = bench_sparse.run([64], head_dim=16, dtype=torch.float32, device=DEVICE,
                               timer=lambda call: (call(), [2.0, 1.0, 3.0])[1], shape=lambda length, head_dim: (1, 1),
                               block_m=16, block_n=16, fraction=4, families=bench_sparse.FAMILIES)
    rows = results["sparse"]
    assert len(rows) == 3 * 2  # families x (fwd, fwd_bwd)
    assert [r["family"] for r in rows[::2]] == list(bench_sparse.FAMILIES)
    for row in rows:
        assert set(row["ms"]) == set(bench_sparse.NAMES)
        for name, diffs in row["max_abs_diff_vs_reference"].items():
            assert set(diffs) == {"out", "dq", "dk", "dv"} and max(diffs.values()) < 1e-4, (name, diffs)
        counts = row["tiles"]
        assert counts["dense"] == 16 and row["tile_bound"] == 16 / counts["visited"]
        # with equal fake times the efficiency is 1 / bound
        assert abs(row["efficiency_vs_tile_bound"] - 1 / row["tile_bound"]) < 1e-12
    by_family = {r["family"]: r for r in rows}
    # window 16 = one tile: blocked windows are tile-aligned (no partial tiles), sliding ones are not
    assert by_family["blocked"]["tiles"]["partial"] == 0 and by_family["sliding"]["tiles"]["partial"] > 0
    json.dumps(results)  # what main() writes must serialise


def test_summary_ratios():
    row = {"ms": {"sparse": [1.0, 1, 1], "full_list": [8.0, 8, 8], "sdpa": [4.0, 4, 4]}, "tile_bound": 10.0}
    assert bench_sparse.summary(row) == {"speedup_vs_full_list": 8.0, "efficiency_vs_tile_bound": 0.8,
                                         "speedup_vs_sdpa": 4.0}
    assert bench_sparse.summary({"ms": {"sparse": None}, "tile_bound": 2.0}) == {}


def test_windows_of_the_families():
    assert bench_sparse.window_for(32768, "sliding") == (2048, 1)
    assert bench_sparse.window_for(32768, "strided") == (2048, 256)
    assert bench_sparse.window_for(32768, "blocked") == (2048, 2048)


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_sparse.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_output_file_and_loading(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert common.output_path(env, tmp_path, "sparse").name == "sparse_nvidia-h100-80gb-hbm3_2026-11-27.json"
    (tmp_path / "sparse_a_2026-01-01.json").write_text(json.dumps({"environment": {"device": "a"}, "sparse": []}))
    (tmp_path / "flash_b_2026-01-01.json").write_text("{}")
    assert [r["environment"]["device"] for r in bench_sparse.load_results(tmp_path)] == ["a"]


def test_the_masks_of_lessons_41_to_46_run_through_the_sweep():
    families = tuple(bench_sparse.PAPER_MASKS)
    results = bench_sparse.run([64], head_dim=16, dtype=torch.float32, device=DEVICE,
                               timer=lambda call: (call(), [2.0, 1.0, 3.0])[1], shape=lambda length, head_dim: (1, 1),
                               block_m=16, block_n=16, families=families)
    rows = results["sparse"]
    assert [r["family"] for r in rows[::2]] == list(families)
    for row in rows:
        assert row["window"] is None and row["stride"] is None
        for name, diffs in row["max_abs_diff_vs_reference"].items():
            assert max(diffs.values()) < 1e-4, (row["family"], name, diffs)
        assert row["tiles"]["dense"] == 16 and row["tile_bound"] >= 1
    json.dumps(results)


def test_each_paper_mask_is_a_square_boolean_mask_for_the_kernel():
    for family in bench_sparse.PAPER_MASKS:
        mask = bench_sparse.paper_mask(512, family, "cpu")
        assert mask.shape == (512, 512) and mask.dtype == torch.bool, family
        assert mask.any(dim=-1).all(), f"{family}: a query with no key"
