"""Encode throughput through `encode.fanout: deployments` with 1 and 2 process workers on pool
`gpu`, vs one local process (`run_encode` in a fresh Python), same run, same shards, CPU.

Each variant encodes the same image shards into a fresh root; times are wall clock from start to
manifest, so each chunk run's Python start and model load are in (what a deployment costs),
as is the local process's. Workers are started and online before their variant is timed.

    python bench/encode_deployments.py                    # 8 shards x 64 rows, 2 shards a chunk
    python bench/encode_deployments.py --shards 4 --rows 16
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
LOCAL = "import sys; from muse.config import load_config; from muse.encode import run_encode; " \
        "run_encode(load_config(sys.argv[1], sys.argv[2:]))"


def config(out: Path, name: str, args, encoders: dict, *extra: str) -> tuple[str, list[str]]:
    root = out / name
    storage = Storage(str(root))
    for sid in range(args.shards):
        write_image_shard(storage, sid, [f"a photo of object {sid} number {i}" for i in range(args.rows)])
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "source": {"paths": ["unused.parquet"]},
                                    "encode": {"batch_size": 32, "row_group_size": 32, "device": "cpu",
                                               "shards_per_task": args.shards_per_task}}))
    return str(path), tiny_encode_overrides(encoders) + list(extra)


async def online_workers(pool: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    async with get_client() as client:
        return len(await client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))))


def timed_deployments(env: dict, out: Path, args, encoders: dict, n: int) -> float:
    """Start n workers, wait until online, then time the encode flow with fanout=deployments."""
    from flows.demo_ui import stop
    from flows.encode import encode_flow

    path, overrides = config(out, f"workers{n}", args, encoders, "encode.fanout=deployments",
                             f"encode.max_parallel_shards={n}")
    log = open(out / f"workers{n}.log", "wb")
    workers = [subprocess.Popen(PREFECT + ["worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1",
                                           "--name", f"bench-{n}-{i}"], env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1"},
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT) for i in range(n)]
    try:
        while asyncio.run(online_workers("gpu")) < n:
            time.sleep(1)
        t = time.perf_counter()
        state = encode_flow(path, overrides, return_state=True)
        took = time.perf_counter() - t
        assert state.is_completed(), state.message
        return took
    finally:
        for w in workers:
            stop(w)
        log.close()
        time.sleep(2)  # let the stopped workers go offline before the next variant counts them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--shards-per-task", type=int, default=2)
    args = ap.parse_args()
    from flows.demo_ui import free_port, start_server, stop
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = Path(tempfile.mkdtemp(prefix="bench-encode-deployments-"))
    encoders = build_tiny_encoders(out / "enc")
    log = open(out / "server.log", "wb")
    server, env = start_server(out / "home", free_port(0), log)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            subprocess.run(PREFECT + ["work-pool", "create", "gpu", "--type", "process"], env=env, check=True,
                           capture_output=True)
            subprocess.run(PREFECT + ["--no-prompt", "deploy", "--name", "encode-chunk"], env=env, cwd=REPO,
                           check=True, capture_output=True)
            path, overrides = config(out, "local", args, encoders)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", LOCAL, path, *overrides], env=env, cwd=REPO, check=True,
                           capture_output=True)
            times = {"one local process (run_encode)": time.perf_counter() - t}
            for n in (1, 2):
                times[f"deployments, {n} worker(s)"] = timed_deployments(env, out, args, encoders, n)
    finally:
        stop(server)
        log.close()
    pictures = args.shards * args.rows
    ref = next(iter(times.values()))
    print(f"{args.shards} shards x {args.rows} rows, {args.shards_per_task} shards a chunk, tiny encoders, CPU")
    print(f"{'variant':36s} {'seconds':>8s} {'pictures/s':>11s} {'ratio':>6s}")
    for name, took in times.items():
        print(f"{name:36s} {took:8.1f} {pictures / took:11.1f} {ref / took:6.2f}")


if __name__ == "__main__":
    main()
