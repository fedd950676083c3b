"""Fault injection for the trainer's tests: the trainer reads no test switch itself; the tests
run this module instead of `muse.train`, and it passes a `Faults` to `train.main`.

    python -m muse.testing.faults --config pipeline.yaml ...   `python -m muse.train` with faults
    torchrun ... -m muse.testing.faults --config ...            the same, one per rank
    python -m muse.testing.faults cli train --config ...       `muse train`, its ranks run this module

The faults, from the environment (inherited by torchrun's ranks):
  MUSE_INJECT_NONFINITE_STEPS=3,4  make the loss of those optimizer steps NaN
  MUSE_TRACE=/path/prefix          each rank appends {step, keys, weights hash} per step to
                                   /path/prefix.rank<R>.jsonl
  MUSE_PAUSE_AT_STEP=N             after step N wait (<=120 s) for SIGTERM/SIGKILL
  MUSE_CONTINUE_FILE=/path         with MUSE_PAUSE_AT_STEP: go on once this file exists (a test
                                   changes the data while the ranks wait, then creates it)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

ENV_VARS = ("MUSE_INJECT_NONFINITE_STEPS", "MUSE_TRACE", "MUSE_PAUSE_AT_STEP", "MUSE_CONTINUE_FILE")
MODULE = "muse.testing.faults"


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Faults:
    """What `train.train` asks of its `faults` argument: `poison(step)` and `after_step(...)`."""
    nonfinite_steps: frozenset = frozenset()
    pause_at: int = 0
    trace: str | None = None
    continue_file: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> Faults:
        steps = frozenset(int(s) for s in env.get("MUSE_INJECT_NONFINITE_STEPS", "").split(",") if s.strip())
        return cls(steps, int(env.get("MUSE_PAUSE_AT_STEP", "0") or 0), env.get("MUSE_TRACE") or None,
                   env.get("MUSE_CONTINUE_FILE") or None)

    def poison(self, step: int) -> bool:
        """Make the loss of this optimizer step NaN?"""
        return step in self.nonfinite_steps

    def after_step(self, rank: int, rec: dict, keys: list, model, stopped) -> None:
        """Append the step to the trace; at MUSE_PAUSE_AT_STEP wait until `stopped()` (a signal) or
        the MUSE_CONTINUE_FILE exists."""
        if self.trace:
            with open(f"{self.trace}.rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": rec["step"], "keys": keys, "hash": weights_hash(model),
                                    "loss": rec["loss"], "lr": rec["lr"], "skipped": rec["skipped"]}) + "\n")
        if rec["step"] == self.pause_at:
            deadline = time.time() + 120
            while not stopped() and time.time() < deadline and not (
                    self.continue_file and os.path.exists(self.continue_file)):
                time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:  # `muse ...` whose `muse train` starts its ranks with this module
        from muse import cli, launch

        launch.TRAINER_MODULE = MODULE
        return cli.main(argv[1:])
    from muse import train

    return train.main(argv, faults=Faults.from_env())


if __name__ == "__main__":
    sys.exit(main())
