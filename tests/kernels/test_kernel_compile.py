"""The kernels compile for an H100 (sm_90) at their default tiles, even on a machine without a GPU.

The interpreter accepts things a GPU compiler rejects (a tl.dot smaller than 16, say); compiling ahead
of time with the assembler that Triton ships catches those, and checks the shared memory the tiles
need. The compiled code is not run here.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--quick"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # two cases, each compiling every kernel: flash (3), differential (3), chunked linear (3), FlashBias (6),
    # block-sparse (6: without and with the per-key bias)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 2 * 21 and all(line.startswith("[OK]") for line in lines), report
    for family in ("forward", "diff forward", "linear forward", "bias ", "sparse", "+ bias"):
        assert any(family in line for line in lines), f"no {family!r} kernel was compiled:\n{report}"
