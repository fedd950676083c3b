"""The training job's output in Prefect: every line to the task's run log, and a progress
artifact (step/total, loss, samples/s, ETA) updated at each checkpoint.

It reads the lines rank 0 prints (muse/train.py): "... | 40 steps | ..." once at the start,
"step 10 | loss 2.3 | ... | samples_per_s 6.5" every train.log_every steps and
"step 10: checkpoint gs://..." at each checkpoint.
"""

from __future__ import annotations

import re
import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

TOTAL = re.compile(r"\| (\d+) steps \|")
METRICS = re.compile(r"^step (\d+) \| loss ([-+\w.]+) .*\| samples_per_s ([-+\w.]+)")
CHECKPOINT = re.compile(r"^step (\d+): checkpoint ")
RESUMED = re.compile(r"^resumed from .* at step (\d+)")


class TrainLog:
    """`on_line` for muse.launch.launch: log each line, update the progress artifact at checkpoints."""

    def __init__(self, run_name: str):
        self.log = get_run_logger()
        self.total, self.start_step = None, 0
        self.loss = self.rate = None
        self.t0 = time.monotonic()
        self.artifact = create_progress_artifact(0.0, key="training-progress",
                                                 description=f"run {run_name}: starting")

    def __call__(self, line: str) -> None:
        self.log.info(line)
        if m := TOTAL.search(line):
            self.total = int(m.group(1))
        elif m := RESUMED.match(line):  # ETA from the steps this job did, not the resumed ones
            self.start_step, self.t0 = int(m.group(1)), time.monotonic()
        elif m := METRICS.match(line):
            self.loss, self.rate = m.group(2), m.group(3)
        elif (m := CHECKPOINT.match(line)) and self.total:
            self.checkpoint(int(m.group(1)))

    def checkpoint(self, step: int) -> None:
        done = step - self.start_step
        eta = (time.monotonic() - self.t0) / done * (self.total - step) if done > 0 else 0.0
        text = f"step {step}/{self.total}, loss {self.loss}, samples/s {self.rate}, ETA {eta / 60:.1f} min"
        update_progress_artifact(self.artifact, 100.0 * step / self.total, description=text)
