"""Bounded fan-out and one writer per storage root.

Prefect's default task runner starts every submitted task at once: 25 encode tasks on one
GPU machine run out of memory. `submit_bounded` runs a fan-out on its own thread pool of
`limit` (from the config: download.max_parallel_tasks, encode.max_parallel_shards).
`root_lease` holds a Prefect global concurrency limit of 1 named after the storage root,
so `pipeline` and `data-refresh` (a scheduled and a manual run, two deployments) queue
behind each other instead of both rewriting images/_SOURCES.json.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from muse.config import PipelineConfig
from muse.storage import Storage


def submit_bounded(task, params: Iterable[dict[str, Any]], limit: int) -> Iterator[PrefectFuture]:
    """Submit `task` once per parameter dict, at most `limit` running at once; yield the
    futures in submission order, each once it has finished (its result may be a failure)."""
    with ThreadPoolTaskRunner(max_workers=limit) as runner:
        futures = [runner.submit(task, p) for p in params]
        for fut in futures:
            fut.wait()
            yield fut


def encode_parallelism(cfg: PipelineConfig) -> int:
    """encode.max_parallel_shards, or one shard per visible GPU (1 on CPU); on Ray, as many as
    the cluster has GPUs for (Ray's scheduler holds a task until its `gpus_per_task` are free)."""
    if cfg.encode.max_parallel_shards:
        return cfg.encode.max_parallel_shards
    if cfg.encode.fanout == "ray":
        return sys.maxsize
    if cfg.encode.device == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def lease_name(cfg: PipelineConfig) -> str:
    """The global concurrency limit that stands for one storage root (local paths resolved)."""
    return "muse-root-" + hashlib.sha256(Storage.from_config(cfg).url().encode()).hexdigest()[:16]


@contextmanager
def root_lease(cfg: PipelineConfig, timeout_s: float | None = None):
    """Hold the storage root: a second pipeline / data-refresh on it waits here until we are done."""
    from prefect.client.orchestration import get_client

    name = lease_name(cfg)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        # said only when another run holds the root (on main every run said it waits). Read just
        # before asking, not by a failed try: Prefect logs a refused try as an ERROR in the worker
        held = client.read_global_concurrency_limit_by_name(name).active_slots > 0
    if held:
        get_run_logger().info(f"waiting for the storage root {cfg.storage.root}: another pipeline or "
                              f"data-refresh run holds it (concurrency limit {name})")
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield name
