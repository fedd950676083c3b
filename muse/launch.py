"""`muse train`: the parent of the training job. It runs torchrun, which starts one
`python -m muse.train` rank per GPU; this process only owns the job and reports how it ended.

A rank that fails writes its one-line cause to `$MUSE_CAUSE_DIR/rank<R>` (muse/train.py `fail`);
this process gives it a temporary folder for that and, when the job fails, raises a TrainError
that starts with the first cause written, so the last line of `muse train` names it. torchrun
runs as `python -m muse.launch` (`torchrun` below), which ends a failed job with one line
instead of the ~30-line ChildFailedError traceback (kept with `--debug` / MUSE_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from muse.config import PipelineConfig, TrainConfig
from muse.lifecycle import run_owned

TAIL_LINES = 40  # of the job's output, in the error when the flow streamed it
TRAINER_MODULE = "muse.train"  # what each rank runs (`python -m`); the tests' fault injection swaps it
CAUSE_DIR_ENV = "MUSE_CAUSE_DIR"  # where a failing rank leaves its one-line cause
DEBUG_ENV = "MUSE_DEBUG"


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
           on_line: Callable[[str], None] | None = None, debug: bool = False) -> None:
    """`muse train`: run torchrun with one process per GPU (train.nproc_per_node) on this machine, one
    of train.nnodes (see `rendezvous_args`), owning the job:
    SIGTERM or Ctrl-C makes the ranks checkpoint and stop while this waits; if this process is
    killed, torchrun and the ranks die too (see muse/lifecycle.py). With `on_line` (the Prefect
    flow), the job's output goes to it line by line and a failure's error ends with its last lines.
    A failure's error starts with the failing rank's cause; `debug` keeps torchrun's traceback."""
    cmd = [sys.executable, "-m", "muse.launch", *rendezvous_args(cfg.train),
           "-m", TRAINER_MODULE, "--config", str(config_path), "--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    print("muse train:", " ".join(cmd), file=sys.stderr, flush=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def keep(line: str) -> None:
        tail.append(line)
        on_line(line)

    with tempfile.TemporaryDirectory(prefix="muse-train-") as causes:
        env = {CAUSE_DIR_ENV: causes, **({DEBUG_ENV: "1"} if debug else {})}
        rc, stopped_by = run_owned(cmd, on_line=keep if on_line else None, env=env)
        cause = first_cause(Path(causes))
    last = ("; its last lines:\n" + "\n".join(tail)) if tail else ""
    if stopped_by and rc == 0:
        raise TrainError(f"stopped by {stopped_by} after the ranks wrote a checkpoint: "
                         f"`muse train` resumes from it{last or ' (see the log above)'}")
    if rc and cause:
        raise TrainError(f"{cause[1]} (rank {cause[0]}; torchrun exited with code {rc}){last}")
    if rc:
        raise TrainError(f"training failed: torchrun exited with code {rc}{last or ' (see the log above)'}")


def first_cause(folder: Path) -> tuple[int, str] | None:
    """(rank, its one-line cause) of the rank that failed first (the others may only have
    followed it), or None when no rank wrote one (a crash: its traceback is in the log)."""
    written = []
    for f in folder.glob("rank*"):
        try:
            written.append((f.stat().st_mtime_ns, int(f.name[4:]), f.read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(written)[1:] if written else None


def torchrun(argv: list[str]) -> int:
    """`python -m muse.launch ARGS`: torchrun ARGS, whose failure ends with one line (the ranks
    printed their causes above it) instead of ChildFailedError's traceback and table of ranks;
    with MUSE_DEBUG=1 (`muse train --debug`) the traceback as torchrun prints it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        rank, failure = e.get_first_failure()
        print(f"torchrun: {len(e.failures)} rank(s) failed, rank {rank} first (exit code {failure.exitcode}); "
              "`muse train --debug` shows torchrun's traceback", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
