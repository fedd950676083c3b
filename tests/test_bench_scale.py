"""bench/scale.py --tiny prints a time per step and size, and the growth exponents last."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few hundred objects written to the GCS emulator
def test_scale_bench_tiny_prints_times_and_exponents():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--tiny"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for step in ("plan_download", "plan_encode", "finalize_manifest", "loader start-up"):
        row = next(l for l in lines if l.startswith(step))
        assert len(row.split()[-2:]) == 2 and all(float(x) >= 0 for x in row.split()[-2:])
        assert any(l.startswith(f"exponent {step} 10->50: ") for l in lines)
    assert lines[-1].startswith("exponent ")
