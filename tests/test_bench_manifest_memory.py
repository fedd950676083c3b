"""bench/manifest_memory.py runs at a tiny size and prints each figure (no timing or memory asserts)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_manifest_memory_bench_tiny_prints_its_figures():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "manifest_memory.py"), "--shards", "200"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for start in ("200 shards x 10000 rows", "_SHARDS.parquet:", "read_manifest", "one count column", "list_units"):
        assert any(line.startswith(start) for line in lines), (start, out.stdout)
    assert "800 units for 20 shards" in lines[-1]  # measured on a tenth, 40 row groups a shard
