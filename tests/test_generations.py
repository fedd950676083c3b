"""Shard generations on the encode and train side (issue 28, items 3 and 4): a retry pass's new
image generation is encoded alone into the same dataset version, the manifest and the loader take
it, a killed re-encode leaves the old generation in force, and a training run resuming across the
refresh stops or starts a new pass as train.on_data_change says, naming the shard."""

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from muse import checkpoint, train
from muse.config import load_config
from muse.data import LoaderSettings, StreamingDataset, iter_eval_rows
from muse.encode import plan_encode, run_encode
from muse.encode.image import load_vq
from muse.encode.shards import Encoders, encoded_among, finalize_manifest
from muse.evaluate import real_images
from muse.layout import dataset_dir, done_marker, make_key, read_manifest, read_shard_table, shard_name
from muse.pictures import decode_picture
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides
from tests.train_helpers import run_train, tiny_config

torch.set_num_threads(1)

ROWS = 4
CHANGED = [1, 2]  # the rows of shard 1 that the retry pass fetched again


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    return build_tiny_encoders(tmp_path_factory.mktemp("enc"))


def _world(tmp_path: Path, encoders: dict, **train_keys):
    """A trainer config on the tiny encoders, 3 image shards of ROWS rows (shard 1's rows CHANGED
    replaced, as failed downloads are), encoded -> (config path, `--set` overrides, cfg)."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), **train_keys)
    data = yaml.safe_load(config.read_text())
    data["encode"] = {"batch_size": 2, "row_group_size": 2}
    config.write_text(yaml.safe_dump(data))
    overrides = tiny_encode_overrides(encoders)
    cfg = load_config(config, overrides)
    storage = Storage.from_config(cfg)
    for sid in range(3):
        write_image_shard(storage, sid, [f"shape {sid} {i}" for i in range(ROWS)],
                          replaced=[sid == 1 and i in CHANGED for i in range(ROWS)])
    Encoders._cache.clear()
    run_encode(cfg)
    return config, overrides, cfg


def _retry_pass(storage: Storage) -> list[bytes]:
    """Generation 1 of image shard 1 as the retry pass writes it: rows CHANGED fetched for real."""
    return write_image_shard(storage, 1, [f"shape 1 {i}" for i in range(ROWS)], generation=1, changed=CHANGED)


def _files(root: Path, ds: str) -> dict[str, tuple[str, int]]:
    """{name: (sha256, mtime_ns)} of the dataset folder's shards, records and _ENCODERS.json."""
    out = {}
    for p in (root / ds).iterdir():
        if p.name not in ("_MANIFEST.json", "_SHARDS.parquet", "_config.yaml"):
            out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _tokens(cfg) -> dict[str, list[int]]:
    """{key: vq16} of one epoch of the loader, which reads the shards the manifest names."""
    ds = StreamingDataset(Storage.from_config(cfg).uri, dataset_dir(cfg),
                          LoaderSettings(batch_size=4, streams=1, shuffle_buffer=16))
    out = {}
    for batch in itertools.islice(ds, 3 * ROWS // 4):
        batch = ds.consume(batch)
        out.update(zip(batch["keys"], batch["vq16"].tolist()))
    return out


def test_a_new_image_generation_is_encoded_alone_and_the_loader_reads_it(tmp_path, tiny_encoders):
    _, _, cfg = _world(tmp_path, tiny_encoders)
    storage, ds, root = Storage.from_config(cfg), dataset_dir(cfg), tmp_path / "root"
    before, old_tokens = _files(root, ds), _tokens(cfg)
    assert len(old_tokens) == 3 * ROWS and plan_encode(cfg, storage) == []
    pictures = _retry_pass(storage)
    assert plan_encode(cfg, storage) == [1]  # the encode flow's chunk task: shard 1 is not done
    assert encoded_among(storage, ds, [0, 1, 2]) == {0: 0, 2: 0}

    # a killed re-encode: generation 1's Parquet half written, no record -> generation 0 in force
    storage.write_bytes(shard_name(ds, 1, generation=1), b"PAR1 half a shard")
    manifest = finalize_manifest(cfg, storage)
    assert [(s["id"], s["generation"], s["path"]) for s in manifest["shards"]] == [
        (0, 0, "00000.parquet"), (1, 0, "00001.parquet"), (2, 0, "00002.parquet")]
    assert manifest["pending"] == [1] and _tokens(cfg) == old_tokens and plan_encode(cfg, storage) == [1]

    summary = run_encode(cfg)
    assert summary["encoded_now"] == 1 and summary["shards"] == 3 and summary["replaced"] == 0
    after = _files(root, ds)
    assert {k: v for k, v in after.items() if ".g1." not in k} == before  # bytes and mtimes untouched
    assert sorted(set(after) - set(before)) == ["00001.g1.json", "00001.g1.parquet"]
    manifest = read_manifest(storage, ds)
    rec = manifest["shards"][1]
    assert (rec["path"], rec["generation"], rec["source"], manifest["pending"]) == (
        "00001.g1.parquet", 1, "images/00001.g1.parquet", [])
    assert storage.read_json(done_marker(ds, 1, 1))["generation"] == 1
    assert read_shard_table(storage, ds, manifest, ["generation"]).column("generation").to_pylist() == [0, 1, 0]
    assert plan_encode(cfg, storage) == [] and run_encode(cfg)["encoded_now"] == 0

    # the loader yields generation 1's tokens: the VQ ids of the re-fetched pictures
    vq = load_vq(tiny_encoders["vq_model"])
    enc = Encoders.get(cfg.encode)
    want = vq.encode(np.stack([decode_picture(pictures[i], enc.base_px) for i in CHANGED])).reshape(len(CHANGED), -1)
    new_tokens = _tokens(cfg)
    for j, i in enumerate(CHANGED):
        key = make_key(1, i, ROWS)
        assert new_tokens[key] == want[j].tolist() != old_tokens[key]
    unchanged = [make_key(s, i, ROWS) for s in range(3) for i in range(ROWS) if s != 1 or i not in CHANGED]
    assert all(new_tokens[k] == old_tokens[k] for k in unchanged)
    # muse eval's real pictures come from the generation the tokens were made from
    rows = [r for r in iter_eval_rows(storage, ds, 0.999999) if r["shard_id"] == 1]
    assert {r["source"] for r in rows} == {"images/00001.g1.parquet"} and len(rows) == ROWS
    real = real_images(storage, rows, 32)
    assert np.array_equal(real, np.stack([decode_picture(pictures[int(r["key"][-5:])], 32) for r in rows]))
    g1 = pq.read_table(root / ds / "00001.g1.parquet")
    assert g1.column("key").to_pylist() == [make_key(1, i, ROWS) for i in range(ROWS)]
    assert not any(g1.column("replaced").to_pylist())


@pytest.mark.slow  # two training jobs (~10 s each on 2 shared cores) and an in-process refusal
def test_resuming_across_a_retry_pass_stops_or_starts_a_new_pass_naming_the_shard(tmp_path, tiny_encoders, capsys):
    config, overrides, cfg = _world(tmp_path, tiny_encoders, max_steps=2, checkpoint_every=2)
    sets = [x for o in overrides for x in ("--set", o)]
    out = run_train(config, *sets)
    assert out.returncode == 0, out.stdout + out.stderr
    storage = Storage.from_config(cfg)
    _retry_pass(storage)
    assert run_encode(cfg)["encoded_now"] == 1
    said = "shard 00001: generation 0 -> 1 (a retry pass re-fetched rows)"

    assert train.main(["--config", str(config), *sets, "--set", "train.max_steps=4"]) == 2  # on_data_change: stop
    err = capsys.readouterr().err
    assert "step-00000002: the data or loader settings changed" in err and said in err, err
    assert "train.on_data_change=new_pass" in err and "changed in ids" not in err

    out = run_train(config, *sets, "--set", "train.max_steps=4", "--set", "train.on_data_change=new_pass")
    assert out.returncode == 0 and "new pass 1" in out.stdout and said in out.stdout, out.stdout + out.stderr
    st = checkpoint.load_state(storage, checkpoint.latest(storage, "t"))
    assert st.step == 4 and st.data_pass == 1 and st.fingerprint["shards"]["generations"] == {"1": "1"}
    events = [m for m in checkpoint.read_metrics(storage, "t") if m.get("event")]
    assert events == [{"step": 2, "event": "new_pass", "data_pass": 1, "changes": said}]
    assert os.path.exists(tmp_path / "root" / dataset_dir(cfg) / "00001.parquet")  # generation 0 stays on disk
