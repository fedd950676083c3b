"""Prefect flow for training: a torchrun job, locally or as the `train` deployment on a GPU pool.

`target="local"` runs `muse train` (torchrun, one process per GPU) where this flow runs: this
is what the `train` deployment does on its GPU work pool. `target="deployment"` (or a
deployment name) calls `run_deployment` so a CPU-side pipeline hands training to the GPU
pool; the job reads the encoded shards straight from the storage root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.context import FlowRunContext

from flows.common import cfg_from
from flows.handoff import hand_off, run_link
from flows.report import grid_image_url, is_grid, summary_markdown
from flows.train_log import TrainLog
from muse import checkpoint
from muse.storage import Storage

TRAIN_DEPLOYMENT = "train/train"
# `--resume` of muse train: latest, none, or a checkpoint folder (the UI offers the first two)
Resume = Literal["latest", "none"] | str


@task(task_run_name="torchrun")
def torchrun_task(config_path: str, overrides: list[str], resume: str) -> str:
    """torchrun here; its output line by line to this task's run log (and the worker's terminal),
    a `training-progress` artifact updated every train.log_every steps and at each checkpoint."""
    from muse.launch import launch

    cfg = cfg_from(config_path, overrides)
    launch(cfg, config_path=config_path, overrides=overrides, resume=resume, on_line=TrainLog(cfg.train.run_name))
    storage = Storage.from_config(cfg)
    latest = checkpoint.latest(storage, cfg.train.run_name)
    return storage.url(latest) if latest else ""


@task
def report_task(config_path: str, overrides: list[str], samples: list[str] | None = None) -> str:
    """Markdown artifact `training-summary`: last metrics, eval metrics, the sample grid and the
    loss curve at page size, the prompts with thumbnails (flows/report.py); and an image artifact
    `sample-grid` of the grid where its file has a URL (gs:// roots; a local path has none)."""
    from muse.sample import read_prompts

    cfg = cfg_from(config_path, overrides)
    md = summary_markdown(cfg, samples, read_prompts(cfg) if samples else [])
    create_markdown_artifact(key="training-summary", markdown=md, description=f"run {cfg.train.run_name}")
    storage = Storage.from_config(cfg)
    for rel in (storage.relative(s) for s in samples or []):
        if rel and is_grid(rel) and (found := grid_image_url(storage, rel)):
            create_image_artifact(image_url=found[0], key="sample-grid",
                                  description=f"samples of run {cfg.train.run_name}: {Path(rel).name} ({found[1]})")
    return md


def _top_level() -> bool:
    """This flow run was started on its own, not by `pipeline` (which writes the one summary)."""
    ctx = FlowRunContext.get()
    return not (ctx and ctx.flow_run and ctx.flow_run.parent_task_run_id)


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
        if _top_level():
            report_task(config_path, overrides)
        return latest
    name = TRAIN_DEPLOYMENT if target == "deployment" else target
    cfg = cfg_from(config_path, overrides)
    run = hand_off(name, {"config_path": config_path, "overrides": overrides, "resume": resume, "target": "local"},
                   cfg.train.job_variables, cfg.train.handoff_start_timeout_s)
    if not run.state.is_completed():
        raise RuntimeError(f"training deployment {name} ended {run.state.name if run.state else 'without a state'}: "
                           f"see flow run '{run.name}' ({run_link(run)})")
    storage = Storage.from_config(cfg)
    latest = checkpoint.latest(storage, cfg.train.run_name)
    return storage.url(latest) if latest else ""

