"""Prefect flow for phase 2: one task per image shard, then the manifest (written last)."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.common import RETRY_DELAYS, cfg_from, stats_table, transient
from flows.limits import encode_parallelism, submit_bounded
from muse.encode import encode_shard, finalize_manifest, plan_encode


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient,
      task_run_name="encode-shard-{shard_id:05d}")
def encode_shard_task(config_path: str, overrides: list[str], shard_id: int) -> dict:
    """Encode one shard; returns its record (rows, bytes, sha256). Safe to run on N workers at once."""
    return encode_shard(cfg_from(config_path, overrides), shard_id)


@task
def plan_task(config_path: str, overrides: list[str]) -> list[int]:
    return plan_encode(cfg_from(config_path, overrides))


@task
def manifest_task(config_path: str, overrides: list[str]) -> dict:
    m = finalize_manifest(cfg_from(config_path, overrides))
    return {k: m[k] for k in ("version", "rows", "replaced", "pending")} | {"shards": len(m["shards"])}


@flow(name="encode", log_prints=True)
def encode_flow(config_path: str = "pipeline.yaml", overrides: list[str] | None = None) -> dict:
    """Image shards -> T5 + VQ token shards + _MANIFEST.json. Failing shards fail their task only."""
    overrides = list(overrides or [])
    shards = plan_task(config_path, overrides)
    progress = create_progress_artifact(0.0, key="encode-progress", description="shards encoded")
    limit = encode_parallelism(cfg_from(config_path, overrides))
    futures = submit_bounded(encode_shard_task, ({"config_path": config_path, "overrides": overrides,
                                                  "shard_id": sid} for sid in shards), limit)
    failed, rows = {}, []
    for i, (sid, fut) in enumerate(zip(shards, futures)):
        try:
            rec = fut.result()
            rows.append({"shard": f"{sid:05d}", "rows": rec["rows"], "replaced": rec.get("replaced", 0),
                         "bytes": rec["bytes"]})
        except Exception as exc:  # noqa: BLE001 - the others complete; reported below
            failed[sid] = str(exc)
        update_progress_artifact(progress, 100.0 * (i + 1) / max(len(shards), 1))
    summary = manifest_task(config_path, overrides)
    stats_table("encode-stats", rows + [{"shard": "total", "rows": summary["rows"], "replaced": summary["replaced"],
                                         "bytes": ""}], f"dataset version {summary['version']}")
    if failed:
        raise RuntimeError(f"{len(failed)} shard(s) failed, the rest are in the manifest (re-run to retry): "
                           + "; ".join(f"{k:05d}: {v}" for k, v in failed.items()))
    return summary
