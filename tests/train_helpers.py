"""Tiny configs and encoded datasets for the trainer tests and bench/loader.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from muse.config import load_config
from muse.layout import dataset_dir
from muse.storage import Storage
from muse.testing import faults
from muse.testing.datasets import write_test_dataset

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, root: str, **train) -> Path:
    """A pipeline.yaml for a hidden-32 model on 16-dim T5, 64 codes; returns its path."""
    data = {
        "storage": {"root": root},
        "source": {"paths": ["unused.parquet"]},
        "model": {"preset": "tiny", "hidden_size": 32, "depth": 1, "num_heads": 2,
                  "codebook_size": 64, "text_dim": 16},
        "train": {"run_name": "t", "batch_size": 4, "grad_accum": 2, "max_steps": 8, "lr": 3e-3,
                  "warmup_steps": 2, "num_workers": 0, "shuffle_buffer": 16, "loader_streams": 2,
                  "checkpoint_every": 4, "log_every": 1, "cond_dropout": 0.1,
                  # `auto` on a 1-GPU machine sends the 2-process tests to set_device(cuda:1)
                  "device": "cpu", **train},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_data(config_path: Path, **kw) -> dict:
    cfg = load_config(config_path)
    storage = Storage.from_config(cfg)
    return write_test_dataset(storage, dataset_dir(cfg), **kw)


def run_train(config_path: Path, *extra: str, nproc: int = 0, env: dict | None = None,
              wait: bool = True, timeout: int = 240):
    """`python -m muse.train` (nproc=0) or `torchrun --nproc-per-node=N -m muse.train`; with a
    fault of muse/testing/faults.py in `env` (MUSE_TRACE, ...), that module instead."""
    module = faults.MODULE if set(env or {}) & set(faults.ENV_VARS) else "muse.train"
    cmd = [sys.executable, "-m", module, "--config", str(config_path), *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", *cmd[1:]]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_trace(prefix: str | Path, rank: int = 0) -> dict[int, dict]:
    """Last record per step (a resumed run replays the steps after its checkpoint)."""
    out = {}
    p = Path(f"{prefix}.rank{rank}.jsonl")
    if p.exists():
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each worker in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def signal_tree(pid: int, sig: int) -> None:
    """Signal a job the way a preempted VM does: every process of it."""
    for p in process_tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def read_tb(storage: Storage, run_name: str, tmp: Path):
    """The run's TensorBoard events, downloaded through Storage (so gs:// works), loaded in full."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from muse.layout import tb_dir

    local = tmp / f"tb-{run_name}"
    local.mkdir(parents=True, exist_ok=True)
    for rel in storage.list(tb_dir(run_name)):
        (local / rel.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(rel))
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc
