"""bench/encode.py runs at a tiny size and prints its table (no timing asserts)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_encode_bench_prints_its_table():
    out = subprocess.run([sys.executable, "bench/encode.py", "--tiny"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("pipeline (decode+models+write)") for line in lines)
    assert any(line.startswith("bare model forward") for line in lines)
    assert lines[-1].startswith("ratio (pipeline / bare forward")
    assert float(lines[-1].rsplit(":", 1)[1]) > 0
