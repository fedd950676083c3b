"""Where the encode flow's chunk tasks run (`encode.fanout`).

threads: `flows.limits.submit_bounded`, a thread pool in the flow's own process (one machine).
ray: prefect-ray's `RayTaskRunner` on the cluster at `encode.ray_address` (or $RAY_ADDRESS); each
chunk task is a Ray task asking for `encode.gpus_per_task` GPUs, so Ray places it on a node with
a free GPU and starts it in a process of its own, which loads its own models. Ray re-runs a task
whose node died (its `max_retries`); the chunk task skips the shards an earlier try finished, so
a lost node costs only its chunk in flight and nothing is encoded twice into the manifest.
Every node runs the same environment as the flow (this project and its `ray` extra installed).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from prefect.futures import PrefectFuture

from flows.limits import submit_bounded
from muse.config import ConfigError, PipelineConfig, ray_address
from muse.encode.shards import on_device

# Ray's re-runs of a chunk task whose worker or node died (not of a failed task: Prefect's
# retries handle those, and a failed Prefect task comes back as a Failed state, not an exception)
NODE_LOSS_RETRIES = 3


def submit_encode_chunks(cfg: PipelineConfig, task, params: Iterable[dict[str, Any]],
                         limit: int) -> Iterator[PrefectFuture]:
    """Submit `task` once per parameter dict where `encode.fanout` says, at most `limit` running
    at once; yield the futures in submission order, each once it has finished."""
    if cfg.encode.fanout == "threads":
        return submit_bounded(task, params, limit)
    if cfg.encode.fanout == "ray":
        return submit_on_ray(task, params, limit, ray_address(cfg.encode.ray_address, "encode.ray_address"),
                             cfg.encode.gpus_per_task)
    raise ConfigError(f"encode.fanout={cfg.encode.fanout}: not handled by flows/fanout.py")


def submit_on_ray(task, params: Iterable[dict[str, Any]], limit: int, address: str,
                  gpus_per_task: float) -> Iterator[PrefectFuture]:
    """`submit_bounded` on a Ray cluster: each task a Ray task with `num_gpus=gpus_per_task`."""
    import ray
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    with RayTaskRunner(address=address) as runner, \
            remote_options(num_gpus=gpus_per_task, max_retries=NODE_LOSS_RETRIES):
        futures: list = []
        running: set = set()  # the Ray refs of those not seen finished
        head = 0  # futures[:head] are yielded
        for p in params:
            # Ray would start every task it has resources for at once; holding back keeps `limit`
            # in flight, as the thread pool does
            if running:
                if len(running) >= limit:
                    ray.wait(list(running), num_returns=1)
                running -= set(ray.wait(list(running), num_returns=len(running), timeout=0)[0])
            fut = runner.submit(task, p)
            futures.append(fut)
            running.add(fut.wrapped_future)
            while head < len(futures) and futures[head].wrapped_future not in running:
                futures[head].wait()  # finished: this reads its Prefect state
                yield futures[head]
                head += 1
        for fut in futures[head:]:
            fut.wait()
            yield fut


def on_worker_device(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` as one chunk task runs it: in a Ray worker, the device Ray gave it (cuda:0 of its
    CUDA_VISIBLE_DEVICES when it holds a GPU, else cpu), whatever `encode.device` says (that names
    the flow's machine); elsewhere unchanged."""
    ray = sys.modules.get("ray")  # a Ray worker has it imported; anywhere else we need not look
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return cfg
    import torch

    return on_device(cfg, "cuda:0" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
