"""`make demo-ui` (python -m flows.demo_ui) drives the demo's pipeline deployment to Completed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_ui_runs_the_pipeline_deployment_to_completed_and_stops_everything(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "flows.demo_ui", "--output", str(tmp_path / "out"), "--quick",
                        "--until-done", "--port", str(port)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1400, check=False)
    log = tmp_path / "out" / "prefect-home" / "server-and-workers.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + tail
    assert f"Prefect UI at http://127.0.0.1:{port}" in r.stdout
    assert "pipeline run ended Completed" in r.stdout
    assert (tmp_path / "out" / "data" / "samples" / "demo-grid.png").exists()
    with socket.socket() as s:   # the server is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0
