"""Prefect flow for phase 2: one task per chunk of `encode.shards_per_task` image shards, then
the manifest (written last). Chunks keep a LAION-size run at a few thousand task runs."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import task_run

from flows.common import RETRY_DELAYS, cfg_from, stats_table, transient
from flows.encode_remote import run_chunks
from flows.fanout import on_worker_device, submit_encode_chunks
from flows.limits import encode_parallelism
from muse.encode import encode_shard, finalize_manifest, plan_encode
from muse.encode.shards import encoded_among, image_generations, task_chunks
from muse.layout import dataset_dir, format_shard_id
from muse.storage import Storage
from muse.transient import is_transient


def chunk_name() -> str:
    ids = task_run.parameters["shard_ids"]
    return f"encode-shards-{format_shard_id(ids[0])}-{format_shard_id(ids[-1])}"


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient,
      task_run_name=chunk_name)
def encode_chunk_task(config_path: str, overrides: list[str], shard_ids: list[int]) -> dict:
    """Encode a chunk of shards in turn; returns {shard id: record}. A failing shard does not stop
    the others; the task then fails naming it (a retry redoes only the shards not yet done)."""
    cfg = on_worker_device(cfg_from(config_path, overrides))  # on a Ray worker: the device Ray gave it
    storage, ds = Storage.from_config(cfg), dataset_dir(cfg)
    # done by an earlier try of this task: one listing of each folder; an encoded shard of an older
    # image generation is not done (a retry pass rewrote the image shard since)
    images = image_generations(storage, shard_ids)
    done = set(encoded_among(storage, ds, shard_ids, images))
    records, failed = {}, {}
    for sid in shard_ids:
        if sid in done:
            continue
        try:
            records[sid] = encode_shard(cfg, sid, generation=images.get(sid, 0))
        except Exception as exc:  # noqa: BLE001 - the others go on; raised below
            failed[sid] = exc
    if failed:
        msg = "; ".join(f"{format_shard_id(sid)}: {exc}" for sid, exc in failed.items())
        # chained to a transient failure if there is one, so the task's retry (which redoes only the
        # shards not yet done) happens; all permanent: it fails at once
        cause = next((exc for exc in failed.values() if is_transient(exc)), None)
        raise RuntimeError(f"{len(failed)} shard(s) failed: {msg}") from cause
    return records


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
    cfg = cfg_from(config_path, overrides)  # once; tasks get the path (docs/flows.md) and load their own
    shards = plan_task(config_path, overrides)
    chunks = task_chunks(shards, cfg.encode.shards_per_task)
    # nothing to do is done: 100%, not a bar left at 0% (issue 30, item 5)
    progress = create_progress_artifact(0.0 if chunks else 100.0, key="encode-progress",
                                        description=f"0/{len(shards)} shards encoded" if chunks else
                                        "nothing to do: every image shard is encoded already")
    limit = encode_parallelism(cfg)
    futures = run_chunks(cfg, config_path, overrides, chunks) if cfg.encode.fanout == "deployments" else \
        submit_encode_chunks(cfg, encode_chunk_task, ({"config_path": config_path, "overrides": overrides,
                                                       "shard_ids": ids} for ids in chunks), limit)
    failed, rows = [], []
    for i, fut in enumerate(futures):
        try:
            for sid, rec in fut.result().items():
                rows.append({"shard": format_shard_id(sid), "rows": rec["rows"], "replaced": rec.get("replaced", 0),
                             "bytes": rec["bytes"]})
        except Exception as exc:  # noqa: BLE001 - the others complete; reported below
            failed.append(str(exc))
        done = sum(len(ids) for ids in chunks[:i + 1])
        update_progress_artifact(progress, 100.0 * (i + 1) / len(chunks), description=f"{done}/{len(shards)} shards encoded")
    summary = manifest_task(config_path, overrides)
    this_run = f"{len(rows)} shard(s) encoded by this run" if rows else "nothing new: no shard to encode"
    stats_table("encode-stats", rows + [{"shard": "total", "rows": summary["rows"], "replaced": summary["replaced"],
                                         "bytes": ""}], f"dataset version {summary['version']}: {this_run}, "
                                                        "then the dataset's total")
    if failed:
        raise RuntimeError(f"{len(failed)} encode task(s) failed, the rest are in the manifest (re-run to "
                           "retry): " + "; ".join(failed))
    return summary
