"""The Prefect flows on the tiny demo subset, under Prefect's test harness, writing to the GCS emulator."""

import asyncio
import json
import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,  # noqa: E402
                                            FlowRunFilterParentFlowRunId)
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from muse.config import load_config  # noqa: E402
from muse import checkpoint  # noqa: E402
from muse.layout import dataset_dir, done_marker, read_manifest  # noqa: E402
from muse.storage import Storage  # noqa: E402

pytestmark = pytest.mark.slow  # Prefect's test harness and the demo subset, end to end


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_run_id(state):
    return state.state_details.flow_run_id


async def _task_runs(flow_run_id):
    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


async def _artifacts(keys):
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))


async def _child_task_run_names(flow_run_id) -> list[str]:
    """Names of the task runs of the flow run's subflows (download, encode, ...)."""
    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return [t.name for child in children for t in await _task_runs(child.id)]


def test_pipeline_flow_end_to_end_on_gcs(harness, demo_subset, gcs_root, tmp_path, capsys):
    from flows.pipeline import pipeline_flow
    from muse.cli import main

    out, config = demo_subset
    # one shard per task: the demo's 2 shards make 2 download and 2 encode tasks for the plan to count
    overrides = [f"storage.root={gcs_root}", f"storage.work_dir={tmp_path / 'work'}",
                 "download.shards_per_task=1", "encode.shards_per_task=1"]
    cfg = load_config(config, overrides)
    storage = Storage.from_config(cfg)
    assert main(["plan", "--config", str(config), *[a for o in overrides for a in ("--set", o)], "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    storage.invalidate()
    assert storage.fs.find(storage.path("")) == []  # `muse plan` wrote nothing to the bucket
    state = pipeline_flow(str(config), overrides, return_state=True)
    result = state.result()
    # the plan's numbers are what the run then did: shards, tasks, steps per epoch
    manifest = read_manifest(storage, dataset_dir(cfg))
    names = asyncio.run(_child_task_run_names(_flow_run_id(state)))
    assert plan["download"]["shards"] == plan["encode"]["shards_to_encode"] == len(manifest["shards"]) == 2
    assert plan["download"]["tasks"] == sum(n.startswith("download-") for n in names) == 2
    assert plan["encode"]["tasks"] == sum(n.startswith("encode-shards-") for n in names) == 2
    last = [r for r in checkpoint.read_metrics(storage, cfg.train.run_name) if "epoch" in r][-1]
    assert plan["train"]["steps"] == last["step"] == cfg.train.max_steps
    # the trainer's epoch = micro-batches consumed / its batches_per_epoch (grad_accum 1: one a step)
    assert last["epoch"] == last["step"] / plan["train"]["batches_per_epoch"]
    assert plan["train"]["steps_per_epoch"] == plan["train"]["batches_per_epoch"] == 50 // 16
    assert result["rows"] == 50 and result["succeeded"] == 48 and result["encoded_rows"] == 50
    assert manifest["rows"] == 50 and manifest["replaced"] == 2
    assert storage.exists("images/_config.yaml") and storage.exists(f"{dataset_dir(cfg)}/_config.yaml")
    assert result["checkpoint"].startswith(gcs_root) and storage.exists("checkpoints/demo/LATEST")
    assert len(result["samples"]) == 3 and all(s.startswith(gcs_root) for s in result["samples"])
    assert storage.read_bytes("samples/demo-grid.png")[:8] == b"\x89PNG\r\n\x1a\n"
    arts = asyncio.run(_artifacts(["download-stats", "encode-stats", "training-summary"]))
    keys = {a.key for a in arts}
    assert keys == {"download-stats", "encode-stats", "training-summary"}
    summaries = [a for a in arts if a.key == "training-summary"]
    assert len(summaries) == 1          # one per run (train inside pipeline leaves it to pipeline)
    md = summaries[0].data
    assert "loss" in md and len(md) < 60_000, len(md)   # links and small thumbnails, not full PNGs
    assert "data:image/png;base64," not in md
    cfg_prompts = cfg.sample.prompts
    for i, prompt in enumerate(cfg_prompts):   # each sample labelled with its prompt, linked to its file
        assert f"| {prompt} | ![{prompt}](data:image/jpeg;base64," in md
        assert f"[demo-{i:03d}.png]({storage.url(f'samples/demo-{i:03d}.png').replace('gs://', 'https://storage.cloud.google.com/')})" in md
    assert "[demo-grid.png](" in md and "[loss.png](" in md
    progress = asyncio.run(_artifacts(["training-progress"]))   # updated at each checkpoint, 100 at the last
    assert progress and float(progress[-1].data) == 100.0 and "loss" in progress[-1].description


def test_failing_shard_fails_its_task_only_and_a_rerun_finishes(harness, demo_subset, tmp_path):
    from flows.download import download_flow
    from flows.encode import encode_flow

    out, config = demo_subset
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}"]
    download_flow(str(config), overrides)
    storage = Storage.from_config(load_config(config, overrides))
    good = storage.read_bytes("images/00001.parquet")
    storage.write_bytes("images/00001.parquet", b"PAR1 corrupt")
    state = encode_flow(str(config), overrides, return_state=True)
    assert state.is_failed() and "00001" in state.message
    runs = {r.name: r for r in asyncio.run(_task_runs(_flow_run_id(state)))}
    chunk = runs["encode-shards-00000-00001"]  # both shards in one task (encode.shards_per_task)
    assert chunk.state.is_failed() and "00001" in chunk.state.message and "00000" not in chunk.state.message
    assert chunk.run_count == 1                            # bad data is not retried
    cfg = load_config(config, overrides)
    assert storage.exists(done_marker(dataset_dir(cfg), 0))  # the good shard of the chunk was encoded
    storage.write_bytes("images/00001.parquet", good)      # the data is fixed: a re-run finishes the rest
    state = encode_flow(str(config), overrides, return_state=True)
    assert state.is_completed()
    assert [r.name for r in asyncio.run(_task_runs(_flow_run_id(state))) if r.name.startswith("encode-shards")] == [
        "encode-shards-00001-00001"]
    assert state.result()["rows"] == 50
