"""Run tracking: TensorBoard event files for every run, Weights & Biases when configured.

    checkpoints/<run_name>/tb/events.out.tfevents.*   one file per (re)start of the run (`layout.tb_dir`)

`Tracker.start(cfg, storage, rank, step)` gives rank 0 a real tracker and every other rank
a no-op one, so the training loop calls it unconditionally. Events are written with
`torch.utils.tensorboard.SummaryWriter` (needs the `tensorboard` package, not TensorFlow).
On a local root they go straight into the tb folder; on `gs://` they are written to a
local temp folder and uploaded through `Storage` (whole files: event files only grow) at
every `flush()` (the trainer calls it at each checkpoint), at most every `upload_every_s`
otherwise, and at `close()`.

A resumed run starts a new event file with `purge_step = step + 1`: TensorBoard hides the
points of earlier files at or after that step, so steps replayed after a crash appear once.

`train.wandb` (project, entity, mode) also sends the scalars and images to Weights & Biases;
wandb is imported only then, and `require(cfg)` fails at start when it is not installed.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from muse.config import ConfigError
from muse.layout import tb_dir
from muse.storage import Storage


def require(cfg) -> None:
    """Fail before training when a configured tracker cannot be imported (call on every rank)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("TensorBoard logging needs the tensorboard package: pip install tensorboard")
    if cfg.train.wandb is not None and cfg.train.wandb.mode != "disabled" \
            and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb is set but wandb is not installed: pip install wandb "
                          "(or set train.wandb: null)")


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        pass

    def image(self, step: int, tag: str, img: np.ndarray, caption: str | None = None) -> None:
        pass

    def text(self, step: int, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """TensorBoard (+ optional wandb) for one run, written by rank 0."""

    def __init__(self, storage: Storage, run_name: str, start_step: int = 0, wandb_cfg=None,
                 config: dict | None = None, upload_every_s: float = 60.0):
        from torch.utils.tensorboard import SummaryWriter

        self.storage, self.rel = storage, tb_dir(run_name)
        self.remote = not storage.is_local
        self.local = Path(tempfile.mkdtemp(prefix="muse-tb-")) if self.remote else Path(storage.path(self.rel))
        self.local.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run hides its own replayed steps from the earlier event files
        self.writer = SummaryWriter(str(self.local), purge_step=start_step + 1 if start_step else None)
        self.upload_every_s, self.uploaded_at = upload_every_s, time.monotonic()
        self.wandb = None
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                                    name=run_name, config=config)
        self.closed = False
        atexit.register(self.close)  # a crash still uploads what was logged

    @classmethod
    def start(cls, cfg, storage: Storage, rank: int, step: int = 0) -> NullTracker:
        """A Tracker on rank 0, a NullTracker elsewhere; `step` is the step the run resumes at."""
        if rank != 0:
            return NullTracker()
        return cls(storage, cfg.train.run_name, step, cfg.train.wandb, cfg.model_dump(mode="json"))

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        """Numbers of `values` as `<prefix>/<key>` (non-numbers and `step` are left out)."""
        nums = {f"{prefix}/{k}": float(v) for k, v in values.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tag, v in nums.items():
            self.writer.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(nums, step=step)
        if self.remote and time.monotonic() - self.uploaded_at > self.upload_every_s:
            self.flush()

    def image(self, step: int, tag: str, img: np.ndarray, caption: str | None = None) -> None:
        """uint8 (H, W, 3); the caption goes to `<tag>/caption` as text (TensorBoard images have none)."""
        self.writer.add_image(tag, np.asarray(img, dtype=np.uint8), step, dataformats="HWC")
        if caption:
            self.writer.add_text(f"{tag}/caption", caption, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(img, caption=caption)}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def flush(self) -> None:
        """Events to disk, and on gs:// to the bucket."""
        self.writer.flush()
        if self.remote:
            for f in sorted(self.local.iterdir()):
                self.storage.upload_file(f, f"{self.rel}/{f.name}")
            self.uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
        atexit.unregister(self.close)
