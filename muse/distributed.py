"""The distributed runtime of a training rank: its place in the torchrun job (`Dist`, made by
`setup_distributed`) and the stop request a signal raises (`StopRequest`).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python -m muse.train` is one process, and
every collective of `Dist` is then a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class StopRequest:
    """SIGTERM (preemption, `muse train` stopping the job) or Ctrl-C: finish the step, write a
    checkpoint, exit 0. A second Ctrl-C raises KeyboardInterrupt: stop now, no checkpoint."""

    def __init__(self):
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _on_signal(self, signum, _frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class Dist:
    """This process's place in the job. torchrun sets RANK/WORLD_SIZE; plain `python -m` is one
    process and every collective below is then a no-op."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, *a) -> None:
        if self.master:
            print(*a, flush=True)

    def gather(self, obj) -> list:
        if not self.ddp:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean_(self, x: torch.Tensor) -> None:
        if self.ddp:
            dist.all_reduce(x)
            x /= self.world

    def any(self, flag: bool) -> bool:
        if not self.ddp:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of every rank's `values` (one all-reduce)."""
        if not self.ddp:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self, waiting_for: str = "the other ranks") -> None:
        """All ranks meet; a rank that waits longer than train.dist_timeout_s says for what."""
        if not self.ddp:
            return
        try:
            dist.barrier()
        except RuntimeError as e:  # gloo's timeout and NCCL's DistBackendError are RuntimeErrors
            raise RuntimeError(f"rank {self.rank}: gave up waiting for {waiting_for} "
                               f"(raise train.dist_timeout_s if that is expected to take longer): {e}") from e

    def close(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU); train.device=cpu forces the CPU.
    `timeout_s` (train.dist_timeout_s): how long a collective waits, e.g. the other ranks at the
    barrier while rank 0 alone writes a checkpoint (NCCL's default, 10 minutes, is too short for
    ~10 GB; gloo's is 30 minutes)."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available() and device != "cpu"
    d = Dist(rank, world, local_rank, "WORLD_SIZE" in os.environ,
             torch.device(f"cuda:{local_rank}" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(d.device)
    if d.ddp:
        # device_id binds NCCL's communicator to this rank's GPU at once (no guessing, no hang)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=d.device if cuda else None)
    return d
