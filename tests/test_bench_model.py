"""bench/model.py runs at a tiny size and prints its table (no timing asserts)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_bench_prints_its_table():
    out = subprocess.run([sys.executable, "bench/model.py", "--tiny", "--repeats", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("train step (s)") for line in lines)
    assert any(line.startswith("12-step guided generation") for line in lines)
    assert any(line.startswith("super-res multi-axis / full attention: samples/s ratio") for line in lines)
    assert lines[-1].startswith("ratio (train step")
    float(lines[-1].rsplit(":", 1)[1])
