"""`make demo-ui` (python -m flows.demo_ui) drives the demo's pipeline deployment to Completed, gets its
port back after a restart, and leaves no process behind when stopped."""

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


def _port_in_time_wait() -> int:
    """A port whose last connection the server side closed first: the kernel keeps it in TIME_WAIT
    for a minute, as the Prefect server's port is right after a restart. The listener sets
    SO_REUSEADDR as uvicorn does (Linux lets a bind share a port with a TIME_WAIT only when both
    sockets set it)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()          # the active close: this side goes to TIME_WAIT
        client.recv(1)        # (the FIN arrived)
        client.close()
    return port


def test_the_port_probe_gets_a_port_in_time_wait_back_but_not_one_in_use():
    """Issue 30 item 7: a restart within a minute moved the UI off 4200."""
    from flows.demo_ui import free_port

    port = _port_in_time_wait()
    with socket.socket() as plain, pytest.raises(OSError):   # the TIME_WAIT is there: a plain bind fails
        plain.bind(("127.0.0.1", port))
    assert free_port(port) == port
    with socket.socket() as server:   # a listening server keeps its port
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        assert free_port(port) != port
