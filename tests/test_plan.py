"""`muse plan`: read-only, and its numbers are the ones the download registers. (The demo run that
then matches its shards, tasks and steps per epoch is in tests/test_flows.py, end to end.)"""

import json
import math

import pytest

from muse.cli import main
from muse.config import load_config
from muse.download.sources import plan_parts
from muse.storage import Storage


def _snapshot(root) -> dict:
    """Every file under the root with its bytes: what 'nothing written' is checked against."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path):
    src = tmp_path / "urls.jsonl"
    src.write_text("".join(json.dumps({"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"c {i}",
                                       "w": 100 + i}) + "\n" for i in range(95)))
    sets = [f"storage.root={tmp_path / 'root'}", f"source.paths=[{src}]", "source.format=jsonl",
            "source.url_column=url", "source.caption_column=caption", "download.shard_size=10",
            "download.shards_per_task=3", "encode.shards_per_task=4", "model.preset=tiny",
            "train.batch_size=4", "train.grad_accum=2", "train.loader_streams=1", "train.num_workers=1", "train.nproc_per_node=2",
            "train.epochs=3"]
    (tmp_path / "pipeline.yaml").write_text(load_config(None, sets, data={}).to_yaml())
    return tmp_path, ["--config", str(tmp_path / "pipeline.yaml")]


def _plan(capsys, args) -> dict:
    rc = main(["plan", *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_plan_counts_what_the_download_registers_and_writes_nothing(setup, capsys):
    tmp_path, args = setup
    plan = _plan(capsys, args)
    assert not (tmp_path / "root").exists()  # a fresh root stays absent: no registry, no probe
    assert plan["source"]["rows"] == 95 and plan["download"]["shards"] == 10
    assert plan["download"]["tasks"] == 4 and plan["encode"]["tasks"] == 3  # ceil(10/3), ceil(10/4)
    t = plan["train"]
    # 95 rows over 2 ranks x batch 4 = 11 micro-batches each, rounded down to whole steps of 2
    assert (t["world_size"], t["batches_per_epoch"], t["steps_per_epoch"], t["steps"]) == (2, 10, 5, 15)
    assert t["dropped_rows_per_epoch"] == 95 - 2 * 10 * 4

    cfg = load_config(tmp_path / "pipeline.yaml")
    parts = plan_parts(Storage.from_config(cfg), cfg)  # the download's own registration (writes)
    assert sum(p.num_shards for p in parts) == plan["download"]["shards"]

    # a changed selection: the plan re-selects under new ids, yet nothing is retired or rewritten
    before = _snapshot(tmp_path / "root")
    again = _plan(capsys, args + ["--set", "source.max_samples=25"])
    assert _snapshot(tmp_path / "root") == before
    assert again["source"]["rows"] == 25 and again["download"]["shards"] == 3
    cfg = load_config(tmp_path / "pipeline.yaml", ["source.max_samples=25"])
    parts = plan_parts(Storage.from_config(cfg), cfg)
    assert [p.shard_ids() for p in parts] == [list(range(10, 13))]  # what the plan counted, new ids


def test_plan_text_declared_rows_and_errors(setup, capsys):
    tmp_path, args = setup
    assert main(["plan", *args, "--rows", "1000000", "--encode-rate", "250"]) == 0
    out = capsys.readouterr().out
    assert "nothing written" in out and "1,000,000 rows in (declared with --rows)" in out
    assert f"{math.ceil(1e6 / 10):,} image shards" in out and "250.0 pictures/s per device, measured" in out
    assert "1.1 device-hours" in out  # 1e6 / 250 / 3600
    assert main(["plan", *args, "--set", f"source.paths=[{tmp_path / 'gone.jsonl'}]"]) == 2
    err = capsys.readouterr().err
    assert "muse plan: source.paths: file not found" in err and "gone.jsonl" in err
    with pytest.raises(SystemExit):
        main(["plan", *args, "--rows", "0"])
    assert "--rows: must be > 0" in capsys.readouterr().err
    assert main(["plan", *args, "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_plan_counts_a_retried_shard_as_to_encode(setup, capsys):
    """Issue 28: an image shard whose newest generation (a retry pass's) has no encoded shard is to
    encode again, whatever generation 0's encoded shard says; once encoded it is done."""
    from muse.layout import dataset_dir, done_marker, shard_name
    from muse.testing.image_shards import write_image_shard

    tmp_path, args = setup
    cfg = load_config(tmp_path / "pipeline.yaml")
    storage = Storage.from_config(cfg)
    ids = [s for p in plan_parts(storage, cfg) for s in p.shard_ids()]
    ds = dataset_dir(cfg)
    for sid in ids:  # every shard downloaded and encoded (the planner reads names and markers only)
        write_image_shard(storage, sid, [f"c {i}" for i in range(10)], size=8)
        storage.write_bytes(shard_name(ds, sid), b"PAR1")
        storage.write_json(done_marker(ds, sid), {"id": sid})
    assert _plan(capsys, args)["encode"]["shards_to_encode"] == 0
    write_image_shard(storage, ids[3], [f"c {i}" for i in range(10)], size=8, generation=1, changed=[4])
    e = _plan(capsys, args)["encode"]
    assert (e["shards_done"], e["shards_to_encode"], e["rows_to_encode"], e["tasks"]) == (9, 1, 10, 1)
    storage.write_bytes(shard_name(ds, ids[3], generation=1), b"PAR1")
    assert _plan(capsys, args)["encode"]["shards_to_encode"] == 1  # no record: not finished
    storage.write_json(done_marker(ds, ids[3], 1), {"id": ids[3]})
    assert _plan(capsys, args)["encode"]["shards_to_encode"] == 0
