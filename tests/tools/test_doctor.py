"""The environment check: one [OK]/[INFO]/[FAIL] line per check, exit status 1 on any failure."""

import re
import subprocess
import sys

from attnlib.tools import doctor

LINE = re.compile(r"^\[(OK|INFO|FAIL)\]\s+[\w\- ]+: .+$")


def test_this_machine_passes_and_every_line_has_a_status(capsys):
    assert doctor.main([]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert all(LINE.match(line) for line in lines), lines
    names = [line.split("]")[1].split(":")[0].strip() for line in lines]
    for expected in ["python", "torch", "triton", "ipywidgets", "gpu", "kernels", "flash kernel", "figures"]:
        assert expected in names
    assert any(line.startswith("[OK]") and "flash kernel" in line and "max difference" in line for line in lines)


def test_a_missing_package_fails_with_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "PACKAGES", doctor.PACKAGES + [("no-such-dist", "no_such_module_xyz", "nothing")])
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("[FAIL]")]
    assert len(failed) == 1 and "no-such-dist" in failed[0] and "make setup" in failed[0]
    assert "1 check(s) failed: no-such-dist" in out


def test_a_kernel_that_gives_wrong_numbers_fails(monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "flash_attention", lambda q, k, v, causal: q * 0 + 1)
    check = doctor.check_tiny_kernel()
    assert check.status == "FAIL" and "differs from the reference" in check.detail


def test_a_check_that_crashes_becomes_a_fail_line(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "check_gpu", broken)
    checks = {c.what: c for c in doctor.run_checks()}
    assert checks["gpu"].status == "FAIL" and "driver exploded" in checks["gpu"].detail


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "attnlib.tools.doctor"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[OK]    torch:" in result.stdout and "All checks passed" in result.stdout
