"""`muse train`: the parent of the training job. It runs torchrun, which starts one
`python -m muse.train` rank per GPU; this process only owns the job and reports how it ended.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable

import torch

from muse.config import PipelineConfig, TrainConfig
from muse.lifecycle import run_owned

TAIL_LINES = 40  # of the job's output, in the error when the flow streamed it
TRAINER_MODULE = "muse.train"  # what each rank runs (`python -m`); the tests' fault injection swaps it


class TrainError(RuntimeError):
    """The training job failed; its own log says why."""


def procs_per_node(t: TrainConfig) -> int:
    """Ranks torchrun starts on each machine: train.nproc_per_node, `auto`/`gpu` = the visible GPUs
    (at least 1). The world size is train.nnodes x this (also `muse plan`)."""
    n = t.nproc_per_node
    return max(torch.cuda.device_count(), 1) if n in ("auto", "gpu") else int(n)


def rendezvous_args(t: TrainConfig) -> list[str]:
    """torchrun's flags for this machine. One node: --standalone (a free local port). train.nnodes > 1:
    c10d rendezvous at train.rdzv_endpoint, whose store node 0 hosts (is_host; the others connect to
    it, waiting up to a minute for it); the rendezvous numbers the ranks, and global rank 0 (on any
    node) writes the checkpoints. torchrun ignores --node-rank under c10d, so it is not passed."""
    n = procs_per_node(t)
    if t.nnodes == 1:
        return ["--standalone", f"--nproc-per-node={n}"]
    return [f"--nnodes={t.nnodes}", f"--nproc-per-node={n}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id={t.rdzv_id or 'muse-' + t.run_name}",
            f"--rdzv-conf=is_host={str(t.node_rank == 0).lower()}"]


def launch(cfg: PipelineConfig, config_path: str | None, overrides: list[str], resume: str = "latest",
           on_line: Callable[[str], None] | None = None) -> None:
    """`muse train`: run torchrun with one process per GPU (train.nproc_per_node) on this machine, one
    of train.nnodes (see `rendezvous_args`), owning the job:
    SIGTERM or Ctrl-C makes the ranks checkpoint and stop while this waits; if this process is
    killed, torchrun and the ranks die too (see muse/lifecycle.py). With `on_line` (the Prefect
    flow), the job's output goes to it line by line and a failure's error ends with its last lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(cfg.train),
           "-m", TRAINER_MODULE, "--config", str(config_path), "--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    print("muse train:", " ".join(cmd), file=sys.stderr, flush=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def keep(line: str) -> None:
        tail.append(line)
        on_line(line)

    rc, stopped_by = run_owned(cmd, on_line=keep if on_line else None)
    last = ("; its last lines:\n" + "\n".join(tail)) if tail else " (see the log above)"
    if stopped_by and rc == 0:
        raise TrainError(f"stopped by {stopped_by} after the ranks wrote a checkpoint: "
                         f"`muse train` resumes from it{last}")
    if rc:
        raise TrainError(f"training failed: torchrun exited with code {rc}{last}")
