"""End to end: download -> encode -> train -> sample, and the scheduled data refresh."""

from __future__ import annotations

import json
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.common import ConfigError, cfg_from, missing_sources
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
                  train_on: Literal["local", "deployment"] = "local", resume: Resume = "latest",
                  cascade: bool = False, superres_overrides: list[str] | None = None) -> dict:
    """The whole pipeline: download -> encode -> train -> sample (with `cascade`: train base, then
    super-res, and sample base then super-res: 512 px pictures).

    Args:
        config_path: the pipeline.yaml to run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), e.g. ["train.max_steps=1000"]
        train_on: "local" trains in this run's worker; "deployment" hands training to the
            `train` deployment on the GPU pool (it must have a worker online)
        resume: "latest" continues the run's last checkpoint, "none" starts fresh, or a checkpoint folder
        cascade: also train the super-resolution model (needs encode.superres: true) as run
            `<train.run_name>-sr`, and sample through both
        superres_overrides: `key=value` strings for the super-res run only, e.g. ["model.preset=small"]
    """
    overrides = list(overrides or [])
    cfg = cfg_from(config_path, overrides)  # fail fast on a bad config, before any work
    sr_overrides = superres_run(cfg, overrides, superres_overrides or []) if cascade else None
    if sr_overrides is not None:
        cfg_from(config_path, sr_overrides)  # the super-res run's config too
    if (failed := missing_sources(cfg, config_path)) is not None:
        return failed  # one line in the run's log, no traceback
    with root_lease(cfg):  # one pipeline / data-refresh per storage root at a time
        downloaded = download_flow(config_path, overrides)
        encoded = encode_flow(config_path, overrides)
        checkpoint = train_flow(config_path, overrides, resume=resume, target=train_on)
        sr_checkpoint = (train_flow(config_path, sr_overrides, resume=resume, target=train_on)
                         if sr_overrides is not None else None)
        samples = sample_task(config_path, overrides + cascade_sampling(checkpoint, sr_checkpoint))
        report_task(config_path, overrides, samples)
    out = {**row_counts(downloaded), "succeeded": downloaded["succeeded"], "encoded_rows": encoded["rows"],
           "dataset_version": encoded["version"], "checkpoint": checkpoint, "samples": samples}
    if sr_checkpoint is not None:
        out["superres_checkpoint"] = sr_checkpoint
    # the whole result (every sample's path) as an artifact; the log's last line stays readable
    # (it was this dict, ~1,000 characters on the demo: issue 30 item 8)
    create_markdown_artifact(key="pipeline-result", markdown=f"```json\n{json.dumps(out, indent=2)}\n```",
                             description="what the pipeline run returned")
    print(summary_line(out))
    return out


def summary_line(out: dict) -> str:
    """One short line for the end of the pipeline run's log."""
    replaced = out["rows"] - out["succeeded"]
    sr = ", super-res checkpoint too" if "superres_checkpoint" in out else ""
    return (f"pipeline done: {out['rows']} rows ({replaced} replaced by placeholders, {out['filtered']} filtered "
            f"out), {out['encoded_rows']} encoded (dataset {out['dataset_version']}), checkpoint "
            f"{out['checkpoint']}{sr}, {len(out['samples'])} sample files; all in the artifact pipeline-result")


@flow(name="data-refresh", log_prints=True)
def data_refresh_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None) -> dict:
    """Download + encode only what is new: unchanged source files and finished shards are skipped.

    Args:
        config_path: the pipeline.yaml to run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), e.g. ["train.max_steps=1000"]
    """
    overrides = list(overrides or [])
    with root_lease(cfg_from(config_path, overrides)):  # waits while a pipeline holds this root
        downloaded = download_flow(config_path, overrides, return_state=True)
        if downloaded.is_failed():  # e.g. no URL list: one line in the download run's log, and
            return Failed(message=downloaded.message)  # its message here, not a second traceback
        downloaded = downloaded.result()
        encoded = encode_flow(config_path, overrides)
    out = {"note": downloaded["note"], "this_run": downloaded["this_run"], **row_counts(downloaded),
           "encoded_rows": encoded["rows"], "dataset_version": encoded["version"]}
    # what this run did, then the dataset it leaves
    print(f"data-refresh: {downloaded['note']}; this run: {downloaded['this_run']['shards']} shard(s), "
          f"{downloaded['this_run']['rows_in']} rows in; dataset: {out['rows']} rows, version {out['dataset_version']}")
    return out


def superres_run(cfg, overrides: list[str], extra: list[str]) -> list[str]:
    """The overrides of the cascade's super-res run: the same dataset (its rows hold vq16 and vq64),
    `model.kind: superres`, its own run name, then `extra`. Refused unless the data has vq64."""
    if not cfg.encode.superres:
        raise ConfigError("pipeline cascade: encode.superres must be true (with download.image_size: 512), "
                          "so that the dataset holds the 64x64 ids the super-res model learns")
    if cfg.model.kind != "base":
        raise ConfigError(f"pipeline cascade: model.kind is {cfg.model.kind!r}; set it to base (the cascade "
                          "trains the base model, then adds the super-res run; superres_overrides sizes it)")
    return [*overrides, "model.kind=superres", f"train.run_name={cfg.train.run_name}-sr", *extra]


def cascade_sampling(checkpoint: str, sr_checkpoint: str | None) -> list[str]:
    """Sampling overrides: through the two checkpoints just trained (none without the cascade:
    `muse sample` then takes the run's latest, which is the one just trained)."""
    if sr_checkpoint is None:
        return []
    return [f"sample.checkpoint={checkpoint}", f"sample.superres_checkpoint={sr_checkpoint}"]


def row_counts(downloaded: dict) -> dict:
    """rows_in counts every row of the URL lists; rows only those the source filters selected
    (each one downloaded or replaced, so rows == encoded_rows once encode is done)."""
    filtered = sum(downloaded.get("filtered_by_reason", {}).values())
    return {"rows_in": downloaded["rows_in"], "filtered": filtered, "rows": downloaded["rows_in"] - filtered}
