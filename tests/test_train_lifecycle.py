"""`muse train` owns its job (issue 12, finding 6): killing the CLI's process group leaves no rank
or loader worker behind, and SIGTERM or Ctrl-C to the CLI waits for the ranks' checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse import checkpoint
from muse.config import load_config
from muse.storage import Storage
from tests.train_helpers import REPO, make_data, process_tree, read_trace, run_train, tiny_config

pytestmark = pytest.mark.slow
PAUSE = 2


def _start_cli(config, trace, **env):
    """`muse train` in a session of its own (as a shell runs a job), two ranks paused at step 2
    (`muse.testing.faults cli` is `muse` with the ranks' faults from the environment)."""
    cmd = [sys.executable, "-m", "muse.testing.faults", "cli", "train", "--config", str(config),
           "--set", "train.nproc_per_node=2"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "MUSE_TRACE": str(trace), "MUSE_PAUSE_AT_STEP": str(PAUSE), **env}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_pause(proc, trace, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(PAUSE in read_trace(trace, r) for r in (0, 1)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"muse train exited early: {proc.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError("the ranks never reached the pause")


def _start_time(pid):
    """The process's start time (a pid reused later is another process), None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _alive(procs):
    return [p for p, t in procs.items() if _start_time(p) == t]


def _job(pid):
    return {p: _start_time(p) for p in process_tree(pid) if _start_time(p)}


def test_kill9_of_the_cli_process_group_leaves_nothing_running(tmp_path):
    """On main torchrun started the ranks in sessions of their own: they and their loader workers
    trained on after the CLI and torchrun were killed."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=8, num_workers=2)
    make_data(config, shards=2, rows=24, row_group_size=8)
    proc, job = _start_cli(config, tmp_path / "tr"), {}
    try:
        _wait_for_pause(proc, tmp_path / "tr")
        job = _job(proc.pid)
        # CLI, torchrun, 2 ranks, 2 loader workers each
        assert len(job) >= 1 + 1 + 2 + 4, job
        os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30  # they go within a second; 30 s for a loaded CI machine
        while _alive(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(job), f"still running 30 s after kill -9: {_alive(job)}"
    finally:
        for p in _alive(job):  # what this test started and did not end
            os.kill(p, signal.SIGKILL)
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("sig,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_sigterm_or_ctrl_c_waits_for_the_checkpoint(tmp_path, sig, to_group):
    """SIGTERM to the CLI alone (a scheduler), or SIGINT to its process group (Ctrl-C in a terminal):
    the CLI returns only after the ranks wrote the step-2 checkpoint and exited. On main SIGTERM
    returned at once with the ranks still running, and Ctrl-C gave tracebacks and no checkpoint."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=8, checkpoint_every=100)
    make_data(config, shards=2, rows=24, row_group_size=8)
    proc = _start_cli(config, tmp_path / "tr")
    try:
        _wait_for_pause(proc, tmp_path / "tr")
        job = _job(proc.pid)
        os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not _alive(job), f"muse train returned with {_alive(job)} still running:\n{log}"
    storage = Storage.from_config(load_config(config))
    rel = checkpoint.latest(storage, "t")
    assert rel and rel.endswith(f"step-{PAUSE:08d}"), log
    assert "SIGTERM received, writing a checkpoint" in log and "Traceback" not in log, log
    assert proc.returncode == 1 and f"stopped by {sig.name}" in log and "resumes from it" in log, log


def test_ctrl_c_to_a_rank_checkpoints_like_sigterm(tmp_path):
    """`python -m muse.train` in a terminal (or torchrun forwarding Ctrl-C): on main SIGINT was a
    KeyboardInterrupt traceback and no checkpoint."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=8, checkpoint_every=100, num_workers=2)
    make_data(config, shards=2, rows=24, row_group_size=8)
    proc = run_train(config, wait=False, env={"MUSE_TRACE": str(tmp_path / "tr"), "MUSE_PAUSE_AT_STEP": str(PAUSE)})
    try:
        deadline = time.monotonic() + 120
        while PAUSE not in read_trace(tmp_path / "tr") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the rank and its loader workers
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "SIGINT received, writing a checkpoint" in log and "Traceback" not in log, log
    rel = checkpoint.latest(Storage.from_config(load_config(config)), "t")
    assert rel and rel.endswith(f"step-{PAUSE:08d}"), log
