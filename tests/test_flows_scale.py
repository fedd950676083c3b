"""A 10,000-shard plan through the download and encode flows on a local Prefect server.

The per-chunk work (img2dataset, the models) is replaced by writing the shard records it
would write, so what runs for real is the planning, the fan-out into tasks of
`*.shards_per_task` shards, the Prefect server's bookkeeping and the finalizing."""

import asyncio
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import flows.download  # noqa: E402
import flows.encode  # noqa: E402
from muse.config import load_config  # noqa: E402
from muse.layout import ENCODERS, IMAGES, dataset_dir, done_marker, done_shards, shard_name  # noqa: E402
from muse.storage import Storage  # noqa: E402

pytestmark = pytest.mark.slow  # a Prefect server and ~300 task runs

SHARDS, PER_TASK = 10_000, 200


async def _task_run_names(flow_run_id) -> list[str]:
    names: list[str] = []
    async with get_client() as client:
        while True:  # the server answers at most 200 at a time
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200, offset=len(names))
            names += [r.name for r in runs]
            if len(runs) < 200:
                return names


def fake_download_chunk(cfg, chunk) -> list[dict]:
    storage = Storage.from_config(cfg)
    stats = []
    for sid in chunk.shard_ids():
        st = {"shard": sid, "rows_in": 1, "succeeded": 1, "replaced": 0, "replaced_by_reason": {}}
        storage.write_bytes(shard_name(IMAGES, sid), b"")
        storage.write_json(done_marker(IMAGES, sid), st)
        stats.append(st)
    return stats


def fake_encode_shard(cfg, sid, generation=0) -> dict:
    storage, ds = Storage.from_config(cfg), dataset_dir(cfg)
    rec = {"id": sid, "path": shard_name(ds, sid).rsplit("/", 1)[-1], "rows": 1, "bytes": 0, "sha256": "",
           "source": shard_name(IMAGES, sid), "replaced": 0}
    storage.write_bytes(shard_name(ds, sid), b"")
    storage.write_json(done_marker(ds, sid), rec)
    return rec


def test_a_10000_shard_plan_runs_in_tasks_of_many_shards(tmp_path, monkeypatch):
    src = tmp_path / "urls.parquet"  # one row per shard: 10,000 shards of 1 row
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(SHARDS)],
                             "TEXT": ["c"] * SHARDS}), src)
    overrides = [f"storage.root={tmp_path / 'root'}", f"source.paths=['{src}']", "download.shard_size=1",
                 f"download.shards_per_task={PER_TASK}", f"encode.shards_per_task={PER_TASK}"]
    config = tmp_path / "pipeline.yaml"
    config.write_text("{}\n")
    cfg = load_config(config, overrides)
    storage = Storage.from_config(cfg)
    storage.write_json(f"{dataset_dir(cfg)}/{ENCODERS}", {  # what the encoders would have recorded
        "info": {"text_dim": 8, "codebook_size": 16, "text_model": "t", "vq_model": "v", "superres_vq_model": None},
        "empty_caption": {}})
    monkeypatch.setattr(flows.download, "download_chunk", fake_download_chunk)
    monkeypatch.setattr(flows.encode, "encode_shard", fake_encode_shard)
    tasks = -(-SHARDS // PER_TASK)  # 50
    with prefect_test_harness(server_startup_timeout=120):
        state = flows.download.download_flow(str(config), overrides, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["rows_in"] == SHARDS
        names = asyncio.run(_task_run_names(state.state_details.flow_run_id))
        assert len([n for n in names if n.startswith("download-")]) == tasks, len(names)
        assert len(done_shards(storage, IMAGES)) == SHARDS

        state = flows.encode.encode_flow(str(config), overrides, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["rows"] == SHARDS and state.result()["shards"] == SHARDS
        names = asyncio.run(_task_run_names(state.state_details.flow_run_id))
        assert len([n for n in names if n.startswith("encode-shards-")]) == tasks, len(names)
