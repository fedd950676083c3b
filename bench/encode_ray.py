"""Encode throughput on a local Ray cluster (`encode.fanout: ray`) vs one local process, same run.

Reference: `run_encode` in this process (one device, one torch thread). Ray: the `encode` flow
under Prefect's test harness with `encode.fanout: ray` on a two-node cluster on 127.0.0.1
(muse/testing/raycluster.py: one logical GPU and one CPU per node, the work on the CPU),
`encode.max_parallel_shards` 1 and 2 (one and two workers), `--shards-per-task` shards per
chunk task, after one untimed one-shard run (the flow's first connect to the cluster). Ray starts a
fresh worker process for every task that holds a GPU (its default `max_calls=1` for GPU tasks,
so a process never keeps a GPU it was not given), so each chunk task pays a Python start, the
imports and a model load: small chunks show that cost. Ratio = samples/s / the reference's.

    PYTHONPATH=$PWD python bench/encode_ray.py [--shards 8] [--rows 64] [--shards-per-task 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from muse.config import load_config
from muse.encode import run_encode
from muse.storage import Storage
from muse.testing.raycluster import RayCluster
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import write_shards  # noqa: E402 - bench/encode.py's shards

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry write can hit a locked SQLite


def config(tmp: str, name: str, paths: dict, shards: int, rows: int, batch: int,
           per_task: int = 1) -> tuple[str, list[str]]:
    """A config over a fresh root `name` holding the image shards."""
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"storage": {"root": os.path.join(tmp, name)}, "source": {"paths": ["x.parquet"]},
                        "encode": {"batch_size": batch, "device": "cpu", "shards_per_task": per_task}}, f)
    overrides = tiny_encode_overrides(paths)
    write_shards(Storage.from_config(load_config(path, overrides)), shards, rows)
    return path, overrides


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shards-per-task", type=int, default=1, help="encode.shards_per_task of the Ray runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as each Ray worker (OMP_NUM_THREADS=1)
    n = args.shards * args.rows
    from prefect.testing.utilities import prefect_test_harness

    from flows.encode import encode_flow

    with tempfile.TemporaryDirectory() as tmp, \
            RayCluster(nodes=2, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}) as cluster, \
            prefect_test_harness(server_startup_timeout=120):
        paths = build_tiny_encoders(os.path.join(tmp, "enc"))
        size = (args.shards, args.rows, args.batch)
        run_encode(load_config(*config(tmp, "warm-local", paths, 1, args.rows, args.batch)))
        t0 = time.perf_counter()
        run_encode(load_config(*config(tmp, "local", paths, *size)))
        times = {"one local process": time.perf_counter() - t0}
        ray_sets = ["encode.fanout=ray", f"encode.ray_address={cluster.address}"]
        warm_path, warm_sets = config(tmp, "warm-ray", paths, 1, args.rows, args.batch)
        encode_flow(warm_path, warm_sets + ray_sets)  # the driver's first connect, the workers' first imports
        for workers in (1, 2):
            path, overrides = config(tmp, f"ray{workers}", paths, *size, args.shards_per_task)
            t0 = time.perf_counter()
            assert encode_flow(path, overrides + ray_sets + [f"encode.max_parallel_shards={workers}"])["rows"] == n
            times[f"Ray, {workers} worker(s)"] = time.perf_counter() - t0
    print(f"# encode on Ray: {args.shards} shards x {args.rows} rows, batch {args.batch}, tiny encoders, cpu, "
          f"2-node cluster on 127.0.0.1 (1 CPU + 1 logical GPU each), {args.shards_per_task} shard(s) per task")
    print(f"{'what':<28}{'samples/s':>12}{'ratio':>8}")
    ref = n / times["one local process"]
    for what, t in times.items():
        print(f"{what:<28}{n / t:>12.1f}{n / t / ref:>8.2f}")


if __name__ == "__main__":
    main()
