"""Prefect flow for phase 1: one task per chunk of `download.shards_per_task` shards of a source
file (one img2dataset run that writes each shard as it finishes), then the summary as a table:
this run's counts beside the dataset's totals, so a refresh that found nothing new says so.
With `download.retry_replaced` a retry pass follows the chunks (muse/download/retry.py): its
rows retried, recovered and still failed per reason join the table, and the table's summary
says how many real images it gained."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.common import RETRY_DELAYS, cfg_from, stats_table, transient, user_error
from flows.limits import submit_bounded
from muse.download import (DownloadPlan, SourceError, download_chunk, finalize_download, plan_run, run_rows,
                           summarize_run)
from muse.download.retry import gained_line, retry_stat_rows, run_retry


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient,
      task_run_name="download-{chunk.label}")
def download_chunk_task(config_path: str, overrides: list[str], chunk) -> list[dict]:
    """img2dataset over one chunk's unfinished shards (idempotent: finished shards are skipped)."""
    return download_chunk(cfg_from(config_path, overrides), chunk)


@task
def plan_task(config_path: str, overrides: list[str]) -> DownloadPlan | str:
    """The chunks to download, or the SourceError's message (a URL list that is missing or
    unreadable): the flow then fails with that one line, not a task traceback."""
    try:
        return plan_run(cfg_from(config_path, overrides))
    except SourceError as exc:
        return str(exc)


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def retry_task(config_path: str, overrides: list[str]) -> dict:
    """The retry pass (a re-run after a failure writes the same bytes: finished generations stay)."""
    return run_retry(cfg_from(config_path, overrides))


@task
def finalize_task(config_path: str, overrides: list[str], shard_stats: list[dict]) -> tuple[dict, dict]:
    """(the dataset's totals, this run's counts over the shards it wrote)."""
    cfg = cfg_from(config_path, overrides)
    return finalize_download(cfg), summarize_run(cfg, shard_stats)


@flow(name="download", log_prints=True)
def download_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None) -> dict:
    """URL lists -> image shards; every row kept, failures replaced. Returns the summary."""
    overrides = list(overrides or [])
    cfg = cfg_from(config_path, overrides)  # once, before any task; tasks get the path (docs/flows.md)
    plan = plan_task(config_path, overrides)
    if isinstance(plan, str):
        return user_error(config_path, plan)
    chunks, note = plan.chunks, plan.note()
    print(f"download: {note}")
    # nothing to do is done: 100%, not a bar left at 0% (issue 30, item 5)
    progress = create_progress_artifact(0.0 if chunks else 100.0, key="download-progress",
                                        description=f"0/{len(chunks)} download tasks done" if chunks else note)
    limit = cfg.download.max_parallel_tasks
    futures = submit_bounded(download_chunk_task, ({"config_path": config_path, "overrides": overrides,
                                                    "chunk": c} for c in chunks), limit)
    failed, written = [], []
    for i, fut in enumerate(futures):
        try:
            written += fut.result()
        except Exception as exc:  # noqa: BLE001 - the others go on; reported below
            failed.append(f"{chunks[i].label}: {exc}")
        update_progress_artifact(progress, 100.0 * (i + 1) / len(chunks),
                                 description=f"{i + 1}/{len(chunks)} download tasks done")
    retry = None
    if cfg.download.retry_replaced and not failed:  # after the new rows: their shards are complete
        retry = retry_task(config_path, overrides)
        print(f"download: {gained_line(retry)}")
    summary, this_run = finalize_task(config_path, overrides, written)
    gained = f"; {gained_line(retry)}" if retry is not None else ""
    stats_table("download-stats", run_rows(this_run, summary) + (retry_stat_rows(retry) if retry else []),
                f"{note}{gained}. Rows in, filtered before download, succeeded and replaced by reason"
                f"{', retried, recovered and still failed by the retry pass' if retry else ''}: 'this run' counts "
                "the shards this run wrote, 'dataset' every current shard")
    if failed:
        raise RuntimeError(f"{len(failed)} download task(s) failed (re-run to finish them): " + "; ".join(failed))
    out = {**summary, "note": note, "this_run": {k: this_run[k] for k in ("rows_in", "succeeded")}
           | {"shards": len(this_run["shards"])}}
    return out if retry is None else {**out, "retry": retry}
