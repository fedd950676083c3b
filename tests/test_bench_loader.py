"""bench/loader.py --tiny prints its table, ratio last."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_loader_bench_tiny_prints_table():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "loader.py"), "--tiny"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(l.startswith("loader gcs-emulator") for l in lines)
    assert any(l.startswith("trainer step") for l in lines)
    assert lines[-1].startswith("ratio") and float(lines[-1].split()[-1]) > 0
