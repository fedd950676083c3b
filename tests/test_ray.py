"""Ray on a real two-node cluster on 127.0.0.1 (muse/testing/raycluster.py: `ray start` twice, one
logical GPU and one CPU each, the work on the CPU): the encode flow with `encode.fanout: ray`
writes the bytes of the threads fan-out, also when a node's raylet is killed mid-run, and
img2dataset's ray distributor downloads what multiprocessing does.

One cluster for the module (its start takes ~30-60 s on 2 busy cores); the node-loss test kills
the second node, so it runs last.
"""

import asyncio
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from muse.config import ConfigError, load_config, ray_address
from muse.layout import dataset_dir
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.imageserver import ImageServer
from muse.testing.raycluster import RayCluster
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

pytestmark = pytest.mark.slow  # a Ray cluster and a Prefect test server

REPO = Path(__file__).resolve().parents[1]
SHARDS = 6
torch.set_num_threads(1)  # as the Ray workers (OMP_NUM_THREADS=1): the same float sums


@pytest.fixture(scope="module")
def cluster():
    # the workers import flows/ and muse/ from this checkout; one thread each, as this process
    with RayCluster(nodes=2, gpus=1, cpus=1, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}) as c:
        yield c


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return build_tiny_encoders(tmp_path_factory.mktemp("enc"))


def _config(folder: Path, encoders, *extra) -> tuple[str, list[str]]:
    """A config file over `folder`/root with SHARDS image shards in it, and its overrides."""
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(folder / "root"), "work_dir": str(folder / "work")},
                                    "source": {"paths": ["unused.parquet"]},
                                    "encode": {"batch_size": 2, "row_group_size": 2, "device": "cpu",
                                               "shards_per_task": 2, "max_parallel_shards": 2}}))
    overrides = tiny_encode_overrides(encoders) + list(extra)
    storage = Storage.from_config(load_config(path, overrides))
    for sid in range(SHARDS):
        write_image_shard(storage, sid, [f"caption {sid} {i}" for i in range(3)], size=64,
                          replaced=[i == sid % 3 for i in range(3)])
    return str(path), overrides


def _dataset(config: str, overrides: list[str]) -> tuple[dict, dict]:
    """{file name: bytes} of the encoded dataset (manifest and config aside), and the manifest
    without what says when and how it ran."""
    cfg = load_config(config, overrides)
    storage, ds = Storage.from_config(cfg), dataset_dir(cfg)
    files = {p.rsplit("/", 1)[-1]: storage.read_bytes(p) for p in storage.list(ds)}
    manifest = storage.read_json(f"{ds}/_MANIFEST.json")
    files.pop("_MANIFEST.json"), files.pop("_config.yaml", None)
    manifest.pop("created")
    for key in ("fanout", "ray_address", "max_parallel_shards"):
        manifest["encode"].pop(key)
    return files, manifest


@pytest.fixture(scope="module")
def threads_run(tmp_path_factory, encoders, harness):
    """The reference: the same shards encoded by the threads fan-out in this process."""
    from flows.encode import encode_flow

    config, overrides = _config(tmp_path_factory.mktemp("threads"), encoders)
    assert encode_flow(config, overrides)["rows"] == 3 * SHARDS
    return _dataset(config, overrides)


def _ray_overrides(cluster) -> list[str]:
    return ["encode.fanout=ray", f"encode.ray_address={cluster.address}"]


def test_ray_address_falls_back_to_the_environment_then_names_the_key(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_address(None, "encode.ray_address") == "head:6379"
    assert ray_address("other:6379", "encode.ray_address") == "other:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="encode.ray_address"):
        ray_address(None, "encode.ray_address")


def _chunk_spans(state) -> list[tuple]:
    """(start, end) of the flow run's encode chunk task runs, as the Prefect server has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return sorted((r.start_time, r.end_time) for r in asyncio.run(read()) if r.name.startswith("encode-shards"))


def test_encode_on_ray_gives_the_bytes_of_threads(cluster, harness, encoders, threads_run, tmp_path):
    from flows.encode import encode_flow

    # one chunk in flight although the cluster has two GPUs: the flow, not Ray, holds the rest back
    config, overrides = _config(tmp_path, encoders, *_ray_overrides(cluster), "encode.max_parallel_shards=1")
    state = encode_flow(config, overrides, return_state=True)
    assert state.is_completed(), state.message
    spans = _chunk_spans(state)
    assert len(spans) == SHARDS // 2 and all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans
    files, manifest = _dataset(config, overrides)
    ref_files, ref_manifest = threads_run
    assert sorted(files) == sorted(ref_files) and len(files) == 2 * SHARDS + 2  # + _ENCODERS.json, _SHARDS.parquet
    assert all(files[name] == ref_files[name] for name in files)
    assert manifest == ref_manifest and manifest["rows"] == 3 * SHARDS


def test_download_with_the_ray_distributor_matches_multiprocessing(cluster, tmp_path):
    from muse.download import run_download

    summaries, shards = {}, {}
    with ImageServer() as srv:
        urls = [srv.url("/img/1.jpg"), srv.url("/img/2.jpg"), srv.url("/404"), "file:///etc/hostname",
                srv.url("/png/3.png"), srv.url("/html")]
        pq.write_table(pa.table({"URL": urls, "TEXT": list("abcdef")}), tmp_path / "s.parquet")
        for distributor in ("multiprocessing", "ray"):
            cfg = load_config(None, data={
                "storage": {"root": str(tmp_path / distributor), "work_dir": str(tmp_path / f"work-{distributor}")},
                "source": {"paths": [str(tmp_path / "s.parquet")]},
                "download": {"image_size": 32, "processes": 1, "threads": 2, "shard_size": 3, "timeout_s": 5,
                             "retries": 0, "distributor": distributor, "ray_address": cluster.address}})
            summaries[distributor] = run_download(cfg)
            storage = Storage.from_config(cfg)
            shards[distributor] = [pq.read_table(storage.open(p, "rb")).drop_columns(["image"]).to_pylist()
                                   for p in sorted(storage.list("images")) if p.endswith(".parquet")]
        log = next((tmp_path / "work-ray").glob("*/img2dataset.log")).read_text()
    ray_sum, mp_sum = summaries["ray"], summaries["multiprocessing"]
    assert (ray_sum["rows_in"], ray_sum["succeeded"]) == (mp_sum["rows_in"], mp_sum["succeeded"]) == (6, 3)
    assert ray_sum["replaced_by_reason"] == mp_sum["replaced_by_reason"] and sum(mp_sum["replaced_by_reason"].values()) == 3
    assert shards["ray"] == shards["multiprocessing"] and len(shards["ray"]) == 2
    assert "Connected to Ray cluster" in log  # joined the cluster, not a private local Ray


def _chunk_running_on(cluster, node: int) -> bool:
    """A worker of `node` is running an encode chunk (Ray titles a busy worker ray::<task name>)."""
    for pid in cluster.pids(node):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::encode_chunk_task"):
                return True
        except OSError:
            pass
    return False


def test_killing_a_raylet_mid_run_still_gives_the_same_bytes_and_manifest(cluster, harness, encoders,
                                                                           threads_run, tmp_path):
    from flows.encode import encode_flow

    config, overrides = _config(tmp_path, encoders, *_ray_overrides(cluster))
    result = {}
    run = threading.Thread(target=lambda: result.update(state=encode_flow(config, overrides, return_state=True)))
    run.start()
    deadline = time.monotonic() + 120
    while not _chunk_running_on(cluster, 1) and run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _chunk_running_on(cluster, 1), "the second node never ran a chunk"
    cluster.kill_raylet(1)  # that chunk's worker dies with it; Ray re-runs the task on the head
    run.join(timeout=240)
    assert not run.is_alive() and result["state"].is_completed(), result.get("state")
    files, manifest = _dataset(config, overrides)
    ref_files, ref_manifest = threads_run
    assert sorted(files) == sorted(ref_files) and all(files[name] == ref_files[name] for name in files)
    assert manifest == ref_manifest
