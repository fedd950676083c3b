"""`encode.fanout: deployments` on a real Prefect server on 127.0.0.1 with two process workers on
pool `gpu`: the encode-chunk deployment from prefect.yaml, a worker killed mid-chunk (with its flow
run: a machine dying), Prefect's heartbeat automation marking the run Crashed, the chunk re-run."""

import contextvars
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests import test_deployments
from tests.test_deployments import PREFECT, REPO, _cli
from tests.test_deployments import _with_api as _api

server = test_deployments.server  # the deployments tests' Prefect server, one for this module too

SHARDS, ROWS = 4, 16  # ~1 s a shard on one core: a chunk of 2 lasts long enough to be killed mid-way


async def _create_gpu_pool():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:  # docker in production; process here (no docker engine)
        await client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))


async def _chunk_runs():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["encode-chunk"])))


def _kill_machine(worker: psutil.Process) -> None:
    """SIGKILL the worker's process group and every process below it: the flow run's process
    sits in a session of its own (Prefect isolates it), so the group alone would leave it running."""
    groups = {os.getpgid(p.pid) for p in [worker] + worker.children(recursive=True)}
    assert len(groups) > 1, "the flow run shares the worker's process group"  # what docs/encode.md says
    for g in groups:
        os.killpg(g, signal.SIGKILL)


def _config(tmp_path, root, encoders, *extra):
    from muse.testing.tiny import tiny_encode_overrides

    path = tmp_path / f"{Path(root).name}.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "source": {"paths": ["unused.parquet"]},
                                    "encode": {"batch_size": 8, "row_group_size": 8, "device": "cpu",
                                               "shards_per_task": 2, "max_parallel_shards": 2}}))
    return str(path), tiny_encode_overrides(encoders) + list(extra)


def _images(root):
    from muse.storage import Storage
    from muse.testing.image_shards import write_image_shard

    storage = Storage(str(root))
    for sid in range(SHARDS):
        write_image_shard(storage, sid, [f"shard {sid} picture {i}" for i in range(ROWS)])


@pytest.mark.slow
@pytest.mark.timeout(420)  # hang guard: a chunk run left Running forever would hold the flow
def test_chunks_as_flow_runs_survive_a_killed_worker_with_identical_bytes(server, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.demo_ui import stop
    from flows.encode import encode_flow
    from muse.config import load_config
    from muse.layout import dataset_dir, done_marker, read_manifest
    from muse.storage import Storage
    from muse.testing.tiny import build_tiny_encoders

    _api(server, _create_gpu_pool)
    # first, so that their start overlaps the set-up below. Heartbeats at Prefect's minimum (30 s)
    # so the killed run is found within the test; the pool polled each second, not each 10 s
    env = server | {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(tmp_path / "workers.log", "wb")
    workers = [subprocess.Popen(PREFECT + ["worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1",
                                           "--name", f"gpu-{i}"], env=env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    try:
        _cli(server, "--no-prompt", "deploy", "--name", "encode-chunk")
        encoders = build_tiny_encoders(tmp_path / "enc")
        for name in ("local", "remote"):
            _images(tmp_path / name)
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            local = _config(tmp_path, tmp_path / "local", encoders)
            assert encode_flow(*local, return_state=True).is_completed()   # the threads fan-out, for the bytes
            remote = _config(tmp_path, tmp_path / "remote", encoders, "encode.fanout=deployments",
                             "encode.crashed_after_s=45")
            result = {}
            ctx = contextvars.copy_context()  # the thread sees this server's API URL
            parent = threading.Thread(target=ctx.run, args=(
                lambda: result.update(state=encode_flow(*remote, return_state=True)),))
            parent.start()
            killed = _kill_mid_chunk(server, load_config(*remote), workers, deadline=time.time() + 150)
            parent.join(300)
        assert not parent.is_alive(), "the encode flow did not finish"
        state = result["state"]
        assert state.is_completed(), f"{state.name}: {state.message}"
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            # Prefect keeps one log and one events worker per process: send this server's before it
            # stops, or they keep trying it during later tests (as in tests/test_deployments.py)
            APILogWorker.drain_all(timeout=60)
            EventsWorker.drain_all(timeout=60)
        for w in workers:
            if w.poll() is None:
                stop(w)
        log.close()

    cfg_l, cfg_r = load_config(*local), load_config(*remote)
    sl, sr = Storage.from_config(cfg_l), Storage.from_config(cfg_r)
    dl, dr = dataset_dir(cfg_l), dataset_dir(cfg_r)
    assert dl == dr
    manifest = read_manifest(sr, dr)
    assert [s["id"] for s in manifest["shards"]] == list(range(SHARDS)) and manifest["rows"] == SHARDS * ROWS
    for sid in range(SHARDS):   # byte-identical to the local encode
        name = f"{dr}/{sid:05d}.parquet"
        assert sr.read_bytes(name) == sl.read_bytes(name), name
    # the shard finished before the kill was not encoded again by the re-run (its record untouched)
    sid, mtime = killed["done_shard"], killed["record_mtime"]
    assert os.stat(sr.path(done_marker(dr, sid))).st_mtime_ns == mtime
    runs = _api(server, _chunk_runs)
    states = sorted((r.name, r.state.name) for r in runs)
    assert (killed["run"], "Crashed") in states, states
    crash = next(r.state for r in runs if r.name == killed["run"])
    assert crash.message.startswith("no heartbeat for 45 s"), crash.message  # by the automation, not a worker
    assert (killed["run"] + " (try 2)", "Completed") in states, states     # and the chunk ran again
    # every chunk completed (a healthy run marked Crashed for a late heartbeat on a loaded machine
    # would be re-run too: harmless, same bytes, one record per shard id)
    completed = {tuple(r.parameters["shard_ids"]) for r in runs if r.state.is_completed()}
    assert completed == {(0, 1), (2, 3)}, states


def _kill_mid_chunk(env, cfg, workers, deadline: float) -> dict:
    """Wait for a chunk run that has finished its first shard but not its second, then kill the
    worker running it (and that flow run). Returns the run's name, the done shard, its record mtime."""
    from muse.layout import dataset_dir, done_marker
    from muse.storage import Storage

    storage, ds = Storage.from_config(cfg), dataset_dir(cfg)
    by_pid = {w.pid: w for w in workers}
    while time.time() < deadline:
        for run in _api(env, _chunk_runs):
            ids = run.parameters["shard_ids"]
            first, last = (storage.path(done_marker(ds, s)) for s in (ids[0], ids[-1]))
            if run.state.is_running() and run.infrastructure_pid and os.path.exists(first) \
                    and not os.path.exists(last):
                child = psutil.Process(int(run.infrastructure_pid.rsplit(":", 1)[-1]))
                worker = next(p for p in child.parents() if p.pid in by_pid)
                mtime = os.stat(first).st_mtime_ns
                _kill_machine(worker)
                by_pid[worker.pid].wait(10)
                return {"run": run.name, "done_shard": ids[0], "record_mtime": mtime}
        time.sleep(0.2)
    raise AssertionError("no chunk run was caught between its two shards")
