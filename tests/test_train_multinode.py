"""Training across machines: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, gloo, one process
each), started as two `muse train` commands, train the weights one node with two processes trains,
bit for bit; the 2-node checkpoint resumes on one node x 2 and finishes the same."""

import hashlib
import os
import socket
import subprocess
import sys

import pytest

from muse.cli import main
from muse.config import ConfigError, load_config
from muse.launch import rendezvous_args
from tests.train_helpers import REPO, make_data, tiny_config

STEPS = 4  # checkpoints at 2 and 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _muse_train(config, run: str, *extra: str) -> subprocess.Popen:
    """`muse train` as a user runs it (CLI -> torchrun -> ranks), its output captured."""
    cmd = [sys.executable, "-m", "muse.cli", "train", "--config", str(config),
           "--set", f"train.run_name={run}", *extra]
    # one thread per rank in both layouts: a CPU matmul's result may depend on its thread count
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(*procs: subprocess.Popen, timeout: int = 240) -> list[str]:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # only while unreaped: a freed pid may already be someone else's
                p.kill()
                p.communicate()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return logs


def _weights_sha(root, run: str, step: int) -> str:
    path = root / "checkpoints" / run / f"step-{step:08d}" / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_node_stays_standalone_and_nodes_use_c10d(tmp_path):
    config = tiny_config(tmp_path, "r")
    assert rendezvous_args(load_config(config).train) == ["--standalone", "--nproc-per-node=1"]
    node = lambda r: rendezvous_args(load_config(config, [  # noqa: E731
        "train.nnodes=3", f"train.node_rank={r}", 'train.rdzv_endpoint="10.0.0.1:29400"',
        "train.nproc_per_node=8"]).train)
    assert node(0) == ["--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
                       "--rdzv-id=muse-t", "--rdzv-conf=is_host=true"]
    assert node(2)[-1] == "--rdzv-conf=is_host=false"
    assert "--rdzv-id=job7" in rendezvous_args(load_config(config, [
        "train.nnodes=2", 'train.rdzv_endpoint="[fd00::1]:29400"', "train.rdzv_id=job7"]).train)


@pytest.mark.parametrize("flags,says", [
    (["--nnodes", "2"], "train.nnodes=2 needs train.rdzv_endpoint"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29400"], "train.node_rank=2 but train.nnodes=2"),
    (["--node-rank", "1"], "train.node_rank=1 but train.nnodes=1"),
    (["--rdzv-endpoint", "h:29400"], "train.rdzv_endpoint / train.rdzv_id are for several machines"),
    (["--nnodes", "2", "--rdzv-endpoint", "h"], "train.rdzv_endpoint='h' is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:70000"], "train.rdzv_endpoint='h:70000' is not HOST:PORT"),
    (["--nnodes", "0"], "train.nnodes: Input should be greater than 0"),
])
def test_node_flags_are_checked_at_load_naming_the_key(tmp_path, capsys, flags, says):
    config = tiny_config(tmp_path, str(tmp_path / "root"))
    assert main(["train", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("muse train: invalid config"), err


@pytest.mark.slow
def test_two_nodes_train_what_one_node_trains_and_resume_on_one(tmp_path):
    root = tmp_path / "root"
    config = tiny_config(tmp_path, str(root), max_steps=STEPS, checkpoint_every=2)
    make_data(config, shards=2, rows=24, row_group_size=8)
    one = _muse_train(config, "one", "--set", "train.nproc_per_node=2")
    _finish(one)

    # node 1 first: it waits for node 0, which hosts the rendezvous store
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_muse_train(config, "two", "--set", "train.nproc_per_node=1", "--nnodes", "2",
                         "--node-rank", str(r), "--rdzv-endpoint", endpoint) for r in (1, 0)]
    logs = _finish(*nodes)
    assert all("--rdzv-backend=c10d" in log and "--standalone" not in log for log in logs)
    # one process per node, two in the job: only global rank 0 (on either node) logs and saves
    assert sum("world 2 x batch 4 x accum 2 = global batch 16" in log for log in logs) == 1
    assert sum(f"step {STEPS}: checkpoint" in log for log in logs) == 1
    assert sorted(p.name for p in (root / "checkpoints" / "two").iterdir()) == sorted(
        p.name for p in (root / "checkpoints" / "one").iterdir())
    for step in (2, STEPS):
        assert _weights_sha(root, "two", step) == _weights_sha(root, "one", step), step

    # the 2-node checkpoint at step 2, resumed on one node x 2 processes
    resumed = _muse_train(config, "resumed", "--set", "train.nproc_per_node=2",
                          "--resume", "checkpoints/two/step-00000002")
    log = _finish(resumed)[0]
    assert "resumed from" in log and "at step 2" in log, log
    assert _weights_sha(root, "resumed", STEPS) == _weights_sha(root, "one", STEPS)
