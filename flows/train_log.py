"""The training job's output in Prefect: every line to the task's run log, and the progress
artifact `training-progress` (step/total, loss, samples/s, ETA) updated at the log cadence
(each `train.log_every` metrics line) and at each checkpoint.

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
    """`on_line` for muse.launch.launch: log each line, update the progress artifact at each
    metrics line (train.log_every) and checkpoint."""

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
            self.progress(int(m.group(1)))
        elif m := CHECKPOINT.match(line):
            self.progress(int(m.group(1)), "checkpoint written")

    def progress(self, step: int, note: str = "") -> None:
        if not self.total:  # the trainer prints the total before any step
            return
        done = step - self.start_step
        eta = (time.monotonic() - self.t0) / done * (self.total - step) if done > 0 else None
        text = (f"step {step}/{self.total}, loss {self.loss}, samples/s {self.rate}, "
                f"ETA {eta_text(eta)}" + (f" ({note})" if note else ""))
        update_progress_artifact(self.artifact, 100.0 * step / self.total, description=text)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
