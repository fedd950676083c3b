"""End to end: download -> encode -> train -> sample, and the scheduled data refresh."""

from __future__ import annotations

from typing import Literal

from prefect import flow, task

from flows.common import cfg_from
from flows.download import download_flow
from flows.encode import encode_flow
from flows.limits import root_lease
from flows.train import Resume, report_task, train_flow


@task
def sample_task(config_path: str, overrides: list[str]) -> list[str]:
    from muse.sample import run_sample

    return run_sample(cfg_from(config_path, overrides))


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None,
                  train_on: Literal["local", "deployment"] = "local", resume: Resume = "latest") -> dict:
    """The whole pipeline: download -> encode -> train -> sample.

    Args:
        config_path: the pipeline.yaml to run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), e.g. ["train.max_steps=1000"]
        train_on: "local" trains in this run's worker; "deployment" hands training to the
            `train` deployment on the GPU pool (it must have a worker online)
        resume: "latest" continues the run's last checkpoint, "none" starts fresh, or a checkpoint folder
    """
    overrides = list(overrides or [])
    cfg = cfg_from(config_path, overrides)  # fail fast on a bad config, before any work
    with root_lease(cfg):  # one pipeline / data-refresh per storage root at a time
        downloaded = download_flow(config_path, overrides)
        encoded = encode_flow(config_path, overrides)
        checkpoint = train_flow(config_path, overrides, resume=resume, target=train_on)
        samples = sample_task(config_path, overrides)
        report_task(config_path, overrides, samples)
    out = {**row_counts(downloaded), "succeeded": downloaded["succeeded"], "encoded_rows": encoded["rows"],
           "dataset_version": encoded["version"], "checkpoint": checkpoint, "samples": samples}
    print(f"pipeline done: {out}")
    return out


@flow(name="data-refresh", log_prints=True)
def data_refresh_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None) -> dict:
    """Download + encode only what is new: unchanged source files and finished shards are skipped.

    Args:
        config_path: the pipeline.yaml to run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), e.g. ["train.max_steps=1000"]
    """
    overrides = list(overrides or [])
    with root_lease(cfg_from(config_path, overrides)):  # waits while a pipeline holds this root
        downloaded = download_flow(config_path, overrides)
        encoded = encode_flow(config_path, overrides)
    return {**row_counts(downloaded), "encoded_rows": encoded["rows"], "dataset_version": encoded["version"]}


def row_counts(downloaded: dict) -> dict:
    """rows_in counts every row of the URL lists; rows only those the source filters selected
    (each one downloaded or replaced, so rows == encoded_rows once encode is done)."""
    filtered = sum(downloaded.get("filtered_by_reason", {}).values())
    return {"rows_in": downloaded["rows_in"], "filtered": filtered, "rows": downloaded["rows_in"] - filtered}
