"""`make demo-ui` (python -m flows.demo_ui) drives the demo's pipeline deployment to Completed, gets its
port back after a restart, and leaves no process behind when stopped."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse.lifecycle import descendants

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


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _start_time(pid: int) -> str | None:
    """The process's start time (a pid reused later is another process), None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _started_from(marker: str) -> dict[int, str]:
    """Running processes whose environment names `marker` (the test's output folder, in the
    PREFECT_HOME every server, worker, flow run, torchrun and rank inherits) -> their start time."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and marker.encode() in (proc / "environ").read_bytes():
                out[int(proc.name)] = fields[19]
        except OSError:
            continue
    return out


def _rank_of(pid: int) -> int | None:
    """A training rank (`python -m muse.train`, not torchrun's own process, `python -m muse.launch`) below `pid`."""
    for p in descendants(pid):
        argv = _cmdline(p)
        if "muse.train" in argv and not {"torch.distributed.run", "muse.launch"} & set(argv):
            return p
    return None


@pytest.fixture(scope="module")
def ui_output(tmp_path_factory):
    """One output folder for both stops: the second run finds the pictures, T5 and encoded shards
    of the first and reaches training sooner (its download and encode skip finished shards)."""
    return tmp_path_factory.mktemp("demo-ui") / "out"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_sigterm_or_ctrl_c_during_training_leaves_no_process(ui_output, tmp_path, sig, to_group):
    """Issue 30 item 6: on main SIGTERM skipped the clean-up (server and workers left running) and
    Ctrl-C left the rank training at ~97% CPU. SIGTERM goes to demo-ui alone (kill, a service
    manager); SIGINT to its process group (Ctrl-C in a terminal)."""
    out = ui_output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # the workers pick the runs up sooner (default 10 s)
    log = tmp_path / "demo-ui.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        # training that would run for hours: the kill must find it running
        proc = subprocess.Popen([sys.executable, "-m", "flows.demo_ui", "--output", str(out), "--quick",
                                 "--port", str(port), "--set", "train.max_steps=1000000"],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while (rank := _rank_of(proc.pid)) is None:
            assert proc.poll() is None and time.monotonic() - t0 < 600, log.read_text()[-3000:]
            time.sleep(1)
        time.sleep(3)   # past its start-up: training
        print(f"training rank {rank} found {time.monotonic() - t0:.0f} s after the start")
        job = {p: _start_time(p) for p in [proc.pid, *descendants(proc.pid)]} | _started_from(str(out))
        # demo-ui, server, 2 workers, 2 flow runs (pipeline, train), torchrun, rank: 8 at least
        assert rank in job and len(job) >= 8, {p: " ".join(_cmdline(p))[:120] for p in job}
        t_kill = time.monotonic()
        os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        print(f"demo-ui stopped {time.monotonic() - t_kill:.0f} s after {sig.name}")
        assert f"{sig.name}: stopping" in log.read_text()
        left = {p for p, t in job.items() if _start_time(p) == t} | set(_started_from(str(out)))
        assert not left, {p: " ".join(_cmdline(p))[:200] for p in left}
        with socket.socket() as s:   # the UI is down
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _started_from(str(out)):   # what this test started and did not end
            os.kill(p, signal.SIGKILL)
