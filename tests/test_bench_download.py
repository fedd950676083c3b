"""bench/download.py runs at a tiny size and prints its table (no timing asserts)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_download_tiny_prints_table():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "download.py"), "--tiny"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("img2dataset CLI (reference)") for line in lines)
    assert any(line.startswith("muse download") for line in lines)
    assert lines[-1].startswith("ratio muse/img2dataset images/s: ")
    float(lines[-1].split(":")[1].split()[0])
