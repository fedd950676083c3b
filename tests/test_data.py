"""The streaming loader: manifest-only reads, padding, worker-count-independent order, resume."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from muse.data import DataError, StreamingDataset, worker_init
from muse.testing.datasets import write_test_dataset
from muse.storage import Storage

DIR = "encoded/v1"


def _take(root, n, workers=0, state=None, **kw):
    opts = dict(seed=3, shuffle_buffer=10, batch_size=4, streams=4) | kw
    ds = StreamingDataset(root, DIR, **opts)
    if state:
        ds.load_state(state)
    dl = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init if workers else None)
    batches, streams = [], {}
    for b in itertools.islice(dl, n):
        batches.append(b)
        streams[b["_stream"]] = StreamingDataset.state_json(b["_state"])
    return batches, {"batch": batches[-1]["_batch"] + 1, "streams": streams}


def test_batches_cover_manifest_rows_only_and_pad(any_root):
    storage = Storage(any_root)
    manifest = write_test_dataset(storage, DIR, shards=3, rows=12, row_group_size=5, max_len=9)
    manifest["shards"] = manifest["shards"][:2]  # shard 2 exists but is not in the manifest
    manifest["rows"] = 24
    storage.write_json(f"{DIR}/_MANIFEST.json", manifest)
    batches, _ = _take(any_root, 18, streams=1)  # 72 samples = three passes over the 24 listed rows
    keys = [k for b in batches for k in b["keys"]]
    assert set(keys) == {f"{s:05d}{i:04d}" for s in range(2) for i in range(12)}
    assert max(keys.count(k) for k in set(keys)) <= 4  # each row once per pass (+1 held in the buffer)
    b = batches[0]
    assert b["encoder_hidden_states"].shape[:2] == b["encoder_attention_mask"].shape
    assert b["encoder_hidden_states"].shape[2] == 16 and b["vq16"].shape == (4, 256)
    lens = b["encoder_attention_mask"].sum(1)
    assert lens.max() == b["encoder_attention_mask"].shape[1]
    for row, n in zip(b["encoder_hidden_states"], lens):  # padding is zeros, real tokens are not
        assert torch.all(row[n:] == 0) and torch.all(row[:n].abs().sum(-1) > 0)


def test_same_order_any_worker_count_and_exact_resume(tmp_path):
    root = str(tmp_path / "root")
    write_test_dataset(Storage(root), DIR, shards=3, rows=20, row_group_size=8)
    ref, _ = _take(root, 12, workers=0)
    two, _ = _take(root, 12, workers=2)
    assert [b["keys"] for b in ref] == [b["keys"] for b in two]
    first, state = _take(root, 5, workers=4)
    rest, _ = _take(root, 7, workers=1, state=state)
    assert [b["keys"] for b in first + rest] == [b["keys"] for b in ref]
    other, _ = _take(root, 12, workers=0, seed=4)
    assert [b["keys"] for b in other] != [b["keys"] for b in ref]


def test_ranks_see_disjoint_units(tmp_path):
    root = str(tmp_path / "root")
    write_test_dataset(Storage(root), DIR, shards=2, rows=16, row_group_size=4)
    seen = [{k for b in _take(root, 2, rank=r, world_size=2, streams=2)[0] for k in b["keys"]}
            for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_replaced_rows_drop_and_downweight(tmp_path):
    root = str(tmp_path / "root")
    write_test_dataset(Storage(root), DIR, shards=1, rows=12, row_group_size=4, replaced_every=3)
    dropped, _ = _take(root, 4, replaced_rows="drop")
    assert not any(b["replaced"].any() for b in dropped)
    weighted, _ = _take(root, 3, replaced_rows="downweight", replaced_weight=0.25)
    w = torch.cat([b["weights"] for b in weighted])
    r = torch.cat([b["replaced"] for b in weighted])
    assert r.any() and torch.all(w[r] == 0.25) and torch.all(w[~r] == 1.0)


def test_missing_manifest_and_missing_shard_are_clear(tmp_path):
    root = str(tmp_path / "root")
    with pytest.raises(DataError, match="muse encode"):
        StreamingDataset(root, DIR)
    write_test_dataset(Storage(root), DIR, shards=1, rows=8, row_group_size=4)
    Storage(root).delete(f"{DIR}/00000.parquet")
    with pytest.raises(DataError, match="00000.parquet.*missing"):
        _take(root, 1)


def test_corrupt_shard_error_names_shard_and_row_group(tmp_path):
    """pyarrow's own message ("Parquet magic bytes not found") names no file; ours does, and from a
    worker it comes back in-band as one line instead of a worker traceback."""
    root = str(tmp_path / "root")
    storage = Storage(root)
    write_test_dataset(storage, DIR, shards=1, rows=8, row_group_size=4)
    data = storage.read_bytes(f"{DIR}/00000.parquet")
    storage.write_bytes(f"{DIR}/00000.parquet", data[: len(data) // 2])
    with pytest.raises(DataError, match=r"00000.parquet row group \d: unreadable \(ArrowInvalid.*muse encode"):
        _take(root, 1, streams=2)
    ds = StreamingDataset(root, DIR, seed=3, shuffle_buffer=4, batch_size=2, streams=2)
    batch = next(iter(DataLoader(ds, batch_size=None, num_workers=2, worker_init_fn=worker_init)))
    assert "00000.parquet row group" in batch["_error"] and "\n" not in batch["_error"]
