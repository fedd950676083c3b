"""bench/filters.py runs at a tiny size and prints its table (no timing asserts)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_filters_tiny_prints_table():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "filters.py"), "--tiny", "--rounds", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("rows 10,000, kept ")
    assert any(line.strip().startswith("filtered: pwatermark > 0.8") for line in lines)
    assert any(line.startswith("plain pq.read_table (reference)") for line in lines)
    assert lines[-1].startswith("ratio filter/plain-read rows/s: ")
    assert float(lines[-1].split(":")[1]) > 0
