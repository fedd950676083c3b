"""Phase 2 end to end on tiny encoders built here and reloaded through the users' code path."""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from muse.config import load_config
from muse.encode import EncodeError, plan_encode, run_encode
from muse.encode.shards import Encoders, finalize_manifest
from muse.encode.image import load_paella, load_vq
from muse.encode.text import TextEncoder
from muse.data import LoaderSettings, StreamingDataset, recorded_counts
from muse.layout import dataset_dir, make_key, read_manifest, shard_name, t5_from_bytes
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.scale import write_synthetic_shards
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

CAPTIONS = ["a red fox", "", "日本の風景 🦊 café", "x " * 200, "a blue square"]


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    return build_tiny_encoders(tmp_path_factory.mktemp("enc"), superres=True)


def make_cfg(tmp_path, root, encoders, *extra):
    data = {"storage": {"root": root}, "source": {"paths": ["unused.parquet"]},
            "encode": {"batch_size": 2, "row_group_size": 2}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    overrides = tiny_encode_overrides(encoders) + list(extra)
    return load_config(path, overrides), path, overrides


def test_encode_end_to_end(tmp_path, any_root, tiny_encoders):
    cfg, _, _ = make_cfg(tmp_path, any_root, tiny_encoders)
    storage = Storage.from_config(cfg)
    images = {0: write_image_shard(storage, 0, CAPTIONS, replaced=[False, True, False, False, False]),
              1: write_image_shard(storage, 1, ["one", "two", "three"])}
    summary = run_encode(cfg)
    assert summary["rows"] == 8 and summary["shards"] == 2 and summary["replaced"] == 1
    ds = dataset_dir(cfg)
    manifest = read_manifest(storage, ds)
    assert [s["id"] for s in manifest["shards"]] == [0, 1] and manifest["rows"] == 8
    # trainable rows per row group of 2, recorded for the loader: row 1 of shard 0 is replaced
    assert recorded_counts(storage, ds, manifest, 0.0, drop_replaced=True).tolist() == [1, 2, 1, 2, 1]
    assert recorded_counts(storage, ds, manifest, 0.01, drop_replaced=False).tolist() == [2, 2, 1, 2, 1]
    text = TextEncoder.from_pretrained(tiny_encoders["text_model"])
    vq = load_vq(tiny_encoders["vq_model"])
    for rec in manifest["shards"]:
        data = storage.read_bytes(f"{ds}/{rec['path']}")
        assert len(data) == rec["bytes"] and hashlib.sha256(data).hexdigest() == rec["sha256"]
        pf = pq.ParquetFile(io.BytesIO(data))
        info = json.loads(pf.schema_arrow.metadata[b"muse.info"])
        assert info["text_dim"] == 32 and info["grid"] == 16 and info["codebook_size"] == 64
        assert pf.metadata.row_group(0).num_rows == 2  # fixed row-group size
        table = pf.read()
        assert table.num_rows == rec["rows"]
        caps = table.column("caption").to_pylist()
        want = text.encode(caps)
        for i, row in enumerate(table.to_pylist()):
            emb = t5_from_bytes(row["t5"], 32)
            assert emb.shape[0] == row["t5_len"] == want[i].shape[0]
            np.testing.assert_allclose(emb.astype(np.float32), want[i], rtol=2e-3, atol=2e-3)
        from PIL import Image
        pix = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[rec["id"]]])
        ids = vq.encode(pix).reshape(len(pix), -1).numpy()
        assert np.array_equal(np.array(table.column("vq16").to_pylist()), ids)
    assert caps == ["one", "two", "three"]
    empty = base64.b64decode(manifest["empty_caption"]["t5"])
    assert t5_from_bytes(empty, 32).shape[0] == manifest["empty_caption"]["t5_len"] == 1  # EOS only
    # idempotent: nothing left to do, a re-run writes nothing new
    assert plan_encode(cfg) == [] and run_encode(cfg)["encoded_now"] == 0


def test_changed_encoder_config_is_a_new_version(tmp_path, tiny_encoders):
    root = str(tmp_path / "root")
    cfg, _, _ = make_cfg(tmp_path, root, tiny_encoders)
    storage = Storage.from_config(cfg)
    write_image_shard(storage, 0, ["a", "b"])
    run_encode(cfg)
    cfg2, _, _ = make_cfg(tmp_path, root, tiny_encoders, "encode.text_max_length=8")
    assert dataset_dir(cfg2) != dataset_dir(cfg) and plan_encode(cfg2) == [0]
    run_encode(cfg2)
    assert storage.exists(f"{dataset_dir(cfg)}/_MANIFEST.json") and storage.exists(f"{dataset_dir(cfg2)}/_MANIFEST.json")


def test_finalize_does_not_load_the_models(tmp_path, tiny_encoders):
    # A manifest task on a CPU-only worker must not load T5 and the VQ again.
    cfg, _, _ = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders)
    storage = Storage.from_config(cfg)
    write_image_shard(storage, 0, ["a", "b"])
    run_encode(cfg)
    first = read_manifest(storage, dataset_dir(cfg))
    Encoders._cache.clear()
    again = finalize_manifest(cfg, storage)
    assert Encoders._cache == {}
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in first.items() if k != "created"}


def test_corrupt_shard_is_named_and_others_complete(tmp_path, tiny_encoders):
    cfg, _, _ = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders)
    storage = Storage.from_config(cfg)
    write_image_shard(storage, 0, ["a", "b"])
    write_image_shard(storage, 1, ["c"])
    write_image_shard(storage, 2, ["d", "e"])
    storage.write_bytes("images/00001.parquet", b"PAR1 this is not parquet")
    with pytest.raises(EncodeError, match="00001"):
        run_encode(cfg)
    manifest = read_manifest(storage, dataset_dir(cfg))
    assert [s["id"] for s in manifest["shards"]] == [0, 2] and manifest["pending"] == [1]


SPARSE = [7, 99999, 100000, 123456]


def test_sparse_shard_ids_past_five_digits(tmp_path, tiny_encoders):
    """Ids past 99,999 go through plan, encode, manifest and the loader like small ones; a stray
    file named 42.parquet (beside a real 00042_stats.json) is not taken for shard 42."""
    cfg, _, _ = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders)
    storage = Storage.from_config(cfg)
    for sid in SPARSE:
        write_image_shard(storage, sid, [f"shard {sid} row {i}" for i in range(3)], size=64)
    storage.write_bytes("images/42.parquet", storage.read_bytes(shard_name("images", 7)))
    storage.write_json("images/00042_stats.json", {"rows_in": 3})
    assert plan_encode(cfg, storage) == SPARSE
    run_encode(cfg)
    ds = dataset_dir(cfg)
    manifest = read_manifest(storage, ds)
    assert [s["id"] for s in manifest["shards"]] == SPARSE and manifest["pending"] == []
    assert [s["path"] for s in manifest["shards"]][-2:] == ["100000.parquet", "123456.parquet"]
    keys = pq.read_table(io.BytesIO(storage.read_bytes(shard_name(ds, 123456)))).column("key").to_pylist()
    assert keys == [make_key(123456, i, 3) for i in range(3)] == ["12345600000", "12345600001", "12345600002"]
    assert plan_encode(cfg, storage) == []
    loader = StreamingDataset(storage.uri, ds, LoaderSettings(batch_size=2, streams=1, shuffle_buffer=4))
    assert sum(u.rows for u in loader.units) == 12
    assert set(next(iter(loader))["keys"]) <= {make_key(s, i, 3) for s in SPARSE for i in range(3)}


def test_finalize_cost_does_not_grow_with_shards(tmp_path, gcs_root, monkeypatch):
    """finalize_manifest on the GCS emulator: the same number of listings and requests made one
    after another for 3 shards as for 30 (the records come in one concurrent batch), and the
    manifest lists them all."""
    counts = {}
    for n in (3, 30):
        root = f"{gcs_root}/n{n}"
        cfg = load_config(_plain_config(tmp_path, root))
        storage = Storage.from_config(cfg)
        ids = list(range(0, 100 * n, 100))
        write_synthetic_shards(storage, dataset_dir(cfg), ids, rows=10)
        calls: dict[str, int] = {}
        for name in ("ls", "exists", "info", "cat_file", "cat", "open", "pipe_file"):
            method = getattr(storage.fs, name)
            monkeypatch.setattr(storage.fs, name, _counted(calls, name, method))
        manifest = finalize_manifest(cfg, storage)
        monkeypatch.undo()
        assert [s["id"] for s in manifest["shards"]] == ids and manifest["rows"] == 10 * n
        counts[n] = calls
    assert counts[3] == counts[30] and counts[30]["ls"] <= 2 and counts[30]["cat"] == 1


def _counted(calls: dict, name: str, method):
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return method(*args, **kwargs)
    return wrapper


def _plain_config(tmp_path, root: str) -> Path:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": root}, "source": {"paths": ["unused.parquet"]}}))
    return path


def test_superres_tokens(tmp_path, tiny_encoders):
    cfg, _, _ = make_cfg(tmp_path, str(tmp_path / "root"), tiny_encoders, "encode.superres=true",
                         "download.image_size=512")
    storage = Storage.from_config(cfg)
    imgs = write_image_shard(storage, 0, ["a", "b", "c"], size=512)
    run_encode(cfg)
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{dataset_dir(cfg)}/00000.parquet")))
    assert table.schema.field("vq64").type.list_size == 4096
    from PIL import Image
    pix = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs])
    ids = load_paella(tiny_encoders["superres_vq_model"]).encode(pix).reshape(3, -1).numpy()
    assert np.array_equal(np.array(table.column("vq64").to_pylist()), ids)
    small = np.stack([np.asarray(Image.fromarray(p).resize((256, 256), Image.BICUBIC, reducing_gap=None)) for p in pix])
    ids16 = load_vq(tiny_encoders["vq_model"]).encode(small).reshape(3, -1).numpy()
    assert np.array_equal(np.array(table.column("vq16").to_pylist()), ids16)


@pytest.mark.slow
def test_killed_run_then_rerun_is_byte_identical(tmp_path, tiny_encoders):
    """SIGKILL the encoder after its first shard, re-run: same bytes as an uninterrupted run."""
    roots = {}
    for name in ("killed", "clean"):
        (tmp_path / name).mkdir()
        cfg, path, overrides = make_cfg(tmp_path / name, str(tmp_path / name / "root"), tiny_encoders)
        storage = Storage.from_config(cfg)
        for sid in range(4):
            write_image_shard(storage, sid, [f"caption {sid} {i}" for i in range(6)])
        roots[name] = (cfg, path, overrides, storage)
    cfg, path, overrides, storage = roots["killed"]
    cmd = [sys.executable, "-m", "muse.cli", "encode", "--config", str(path)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not storage.exists(f"{dataset_dir(cfg)}/00000.json"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not storage.exists(f"{dataset_dir(cfg)}/_MANIFEST.json")   # nothing a reader trusts yet
    assert 0 < len(plan_encode(cfg)) < 4
    run_encode(cfg)
    run_encode(roots["clean"][0])
    ds = dataset_dir(cfg)
    for sid in range(4):
        a = storage.read_bytes(f"{ds}/{sid:05d}.parquet")
        b = roots["clean"][3].read_bytes(f"{ds}/{sid:05d}.parquet")
        assert a == b, sid
