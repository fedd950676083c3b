"""Prefect flow for `muse eval`: score a checkpoint on the eval slice, show the metrics as a table."""

from __future__ import annotations

from prefect import flow, task

from flows.common import cfg_from, stats_table


@task(task_run_name="eval")
def eval_task(config_path: str, overrides: list[str], checkpoint: str | None = None,
              max_samples: int | None = None) -> dict:
    """Generate for the eval slice and score it (FID, CLIP score, extra metrics); returns the metrics."""
    from muse.evaluate import run_eval

    return run_eval(cfg_from(config_path, overrides), checkpoint_ref=checkpoint, max_samples=max_samples)


def metric_rows(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": round(float(v), 4)} for k, v in metrics.items()]


@flow(name="eval", log_prints=True)
def eval_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None, checkpoint: str | None = None,
              max_samples: int | None = None) -> dict:
    """`muse eval` as a flow: the metrics as an `eval-metrics` table artifact; returns them."""
    overrides = list(overrides or [])
    cfg = cfg_from(config_path, overrides)  # fail fast on a bad config
    metrics = eval_task(config_path, overrides, checkpoint, max_samples)
    stats_table("eval-metrics", metric_rows(metrics),
                f"run {cfg.train.run_name}, checkpoint {checkpoint or 'latest'}, eval slice "
                f"train.eval_holdout={cfg.train.eval_holdout}")
    return metrics
