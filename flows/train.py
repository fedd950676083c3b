"""Prefect flow for training: a torchrun job, locally or as the `train` deployment on a GPU pool.

`target="local"` runs `muse train` (torchrun, one process per GPU) where this flow runs: this
is what the `train` deployment does on its GPU work pool. `target="deployment"` (or a
deployment name) calls `run_deployment` so a CPU-side pipeline hands training to the GPU
pool; the job reads the encoded shards straight from the storage root.
"""

from __future__ import annotations

import base64
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import cfg_from
from flows.handoff import hand_off
from flows.train_log import TrainLog
from muse import checkpoint
from muse.storage import Storage

TRAIN_DEPLOYMENT = "train/train"
# `--resume` of muse train: latest, none, or a checkpoint folder (the UI offers the first two)
Resume = Literal["latest", "none"] | str


@task(task_run_name="torchrun")
def torchrun_task(config_path: str, overrides: list[str], resume: str) -> str:
    """torchrun here; its output line by line to this task's run log (and the worker's terminal),
    a `training-progress` artifact updated at each checkpoint."""
    from muse.train import launch

    cfg = cfg_from(config_path, overrides)
    launch(cfg, config_path=config_path, overrides=overrides, resume=resume, on_line=TrainLog(cfg.train.run_name))
    storage = Storage.from_config(cfg)
    latest = checkpoint.latest(storage, cfg.train.run_name)
    return storage.url(latest) if latest else ""


@task
def report_task(config_path: str, overrides: list[str], samples: list[str] | None = None) -> str:
    """Markdown artifact: last metrics, loss curve, sample images (embedded PNGs)."""
    cfg = cfg_from(config_path, overrides)
    storage = Storage.from_config(cfg)
    run = checkpoint.run_dir(cfg.train.run_name)
    records = checkpoint.read_metrics(storage, cfg.train.run_name)
    latest = checkpoint.latest(storage, cfg.train.run_name)
    lines = [f"# Training `{cfg.train.run_name}`", "",
             f"- checkpoint: `{storage.url(latest) if latest else 'none'}`",
             f"- steps: {records[-1]['step'] if records else 0}", ""]
    if records:
        last = records[-1]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in last.items()]
        first = next((r["loss"] for r in records if "loss" in r), None)
        if first is not None:
            lines += ["", f"loss: {first:.4f} at the first step -> {last.get('loss', float('nan')):.4f} now"]
    for title, rel in [("Loss curve", f"{run}/loss.png")] + [(f"Sample {i}", s) for i, s in enumerate(samples or [])]:
        data = _read(storage, rel)
        if data:
            lines += ["", f"## {title}", f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})",
                      f"`{rel}`"]
    md = "\n".join(lines)
    create_markdown_artifact(key="training-summary", markdown=md, description=f"run {cfg.train.run_name}")
    return md


def _read(storage: Storage, ref: str) -> bytes | None:
    """Bytes of a file under the storage root (or a local absolute path), None if absent."""
    from pathlib import Path

    try:
        rel = storage.relative(ref)
        if rel is None:
            return Path(ref).read_bytes() if Path(ref).is_file() else None
        return storage.read_bytes(rel) if storage.exists(rel) else None
    except OSError:
        return None


@flow(name="train", log_prints=True)
def train_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None, resume: Resume = "latest",
               target: str = "local") -> str:
    """Train with torchrun here (`target="local"`), or on the GPU pool (`"deployment"` or a deployment name).

    Args:
        config_path: the pipeline.yaml to run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), e.g. ["train.max_steps=1000"]
        resume: "latest" continues the run's last checkpoint, "none" starts fresh, or a checkpoint folder
        target: "local" runs torchrun in this worker; "deployment" (or a deployment name such as
            "train/train") hands the run to that deployment's work pool
    """
    overrides = list(overrides or [])
    if target == "local":
        latest = torchrun_task(config_path, overrides, resume)
        report_task(config_path, overrides)
        return latest
    name = TRAIN_DEPLOYMENT if target == "deployment" else target
    cfg = cfg_from(config_path, overrides)
    run = hand_off(name, {"config_path": config_path, "overrides": overrides, "resume": resume, "target": "local"},
                   cfg.train.job_variables, cfg.train.handoff_start_timeout_s)
    if not run.state.is_completed():
        raise RuntimeError(f"training deployment {name} ended {run.state.name if run.state else 'without a state'}: "
                           f"see flow run {run.id}")
    storage = Storage.from_config(cfg)
    latest = checkpoint.latest(storage, cfg.train.run_name)
    return storage.url(latest) if latest else ""

