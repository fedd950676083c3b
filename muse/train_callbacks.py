"""What the trainer does every N steps besides training: `train.sample_every` (a `muse sample` of
the latest checkpoint) and `train.eval_every` (a small `muse eval` of the in-memory weights).

The trainer calls one `StepCallback` after each step; it imports the sampler and the evaluator
only when they are configured. Both are best effort: a failure is logged and training goes on.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from muse import checkpoint
from muse.config import PipelineConfig
from muse.layout import eval_results, training_sample
from muse.storage import Storage


class StepCallback:
    """`callback(step, model, device)` after every optimizer step, on every rank (the other ranks
    wait at a barrier while rank 0 evaluates)."""

    def __init__(self, cfg: PipelineConfig, storage: Storage, tracker, d):
        """`d`: the job's `muse.distributed.Dist`."""
        self.cfg, self.storage, self.tracker = cfg, storage, tracker
        self.master, self.d = d.master, d

    def __call__(self, step: int, model, device: torch.device) -> None:
        t = self.cfg.train
        if t.sample_every and step % t.sample_every == 0 and self.master:
            sample_best_effort(self.cfg, step, self.storage, self.tracker)
        if t.eval_every and step % t.eval_every == 0:
            if self.master:
                eval_best_effort(self.cfg, step, model, device, self.storage, self.tracker)
            self.d.barrier(f"rank 0's evaluation at step {step}")  # the other ranks wait for it


def sample_best_effort(cfg: PipelineConfig, step: int, storage: Storage, tracker=None) -> None:
    """`muse sample` on the latest checkpoint (sample.prompts), its grid (or single image) sent to
    the tracker as `samples` with the prompts as caption; a failure is logged, never fatal."""
    rel = checkpoint.latest(storage, cfg.train.run_name)
    if rel is None:
        return
    try:
        from muse.sample import run_sample

        data = cfg.model_dump(mode="json")
        data["sample"].update(checkpoint=storage.url(rel),
                              out=storage.url(training_sample(cfg.train.run_name, step)))
        written = run_sample(PipelineConfig.model_validate(data))
        if tracker is not None:
            track_png(tracker, step, "samples", storage, storage.relative(written[-1]))
    except Exception as e:  # needs T5 + the VQ decoder; training must go on without them
        print(f"step {step}: sampling skipped ({type(e).__name__}: {e})", flush=True)


def eval_best_effort(cfg: PipelineConfig, step: int, model, device, storage: Storage,
                     tracker=None) -> dict | None:
    """A small `muse eval` of the in-memory weights (<= IN_TRAINING_SAMPLES eval rows) -> metrics,
    or None: a failure is logged, never fatal. The global RNG is restored, so training goes on
    exactly as without it. The tracker gets the metrics as `eval/<name>` and the result grid as
    `eval/samples`."""
    try:
        from muse.evaluate import IN_TRAINING_SAMPLES, run_eval

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = run_eval(cfg, model=model, step=step, device=device,
                               max_samples=min(cfg.eval.max_samples, IN_TRAINING_SAMPLES))
    except Exception as e:  # needs the VQ decoder, CLIP and FID features; training must go on
        print(f"step {step}: evaluation skipped ({type(e).__name__}: {e})", flush=True)
        return None
    print(f"step {step}: eval " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    if tracker is not None:
        tracker.scalars(step, metrics, prefix="eval")
        try:
            track_png(tracker, step, "eval/samples", storage, eval_results(cfg.train.run_name, step) + ".png")
        except Exception as e:  # the metrics are in; a missing picture is not worth more
            print(f"step {step}: eval grid not tracked ({type(e).__name__}: {e})", flush=True)
    return metrics


def track_png(tracker, step: int, tag: str, storage: Storage, rel: str) -> None:
    """A PNG written under the storage root to the tracker, its `prompt` text chunk as caption."""
    from PIL import Image

    png = Image.open(io.BytesIO(storage.read_bytes(rel)))
    tracker.image(step, tag, np.asarray(png.convert("RGB")), png.text.get("prompt"))
