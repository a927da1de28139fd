"""The kernels compile for an H100 (sm_90) at their default tiles, even on a machine without a GPU.

The interpreter accepts things a GPU compiler rejects (a tl.dot smaller than 16, say); compiling ahead
of time with the assembler that Triton ships catches those, and checks the shared memory the tiles
need. The compiled code is not run here. The tests compile a representative set (``--quick``); the full
matrix, every kernel in four cases, is ``python -m kernels.compile_check``.
"""

import subprocess
import sys
from pathlib import Path

from kernels import compile_check

ROOT = Path(__file__).resolve().parents[2]


def test_a_representative_kernel_of_each_family_compiles_for_sm90():
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(compile_check.QUICK_KERNELS) and all(line.startswith("[OK]") for line in lines), report
    for family in ("forward", "backward dK dV", "diff forward", "linear forward", "bias lowrank forward",
                   "block-sparse forward + bias"):
        assert any(f" {family} " in line for line in lines), f"no {family!r} kernel was compiled:\n{report}"


def test_the_full_matrix_lists_every_kernel_of_every_family():
    import torch

    names = [target[0] for target in compile_check.targets(torch.bfloat16, 128, True)]
    # flash (3), differential (3), chunked linear (4: its forward also with float32 sums), FlashBias (6: low rank
    # and dense), block-sparse (6: with and without the per-key bias)
    assert len(names) == len(set(names)) == 22, names
    assert set(compile_check.QUICK_KERNELS) <= set(names)
