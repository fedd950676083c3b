"""The streaming loader: manifest-only reads, padding, worker-count-independent order, resume."""

import collections
import hashlib
import io
import itertools
import json

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from muse import checkpoint
from muse.data import (DataError, LoaderSettings, StreamingDataset, Unit, in_eval_slice, list_units,
                       loader_changes, loader_fingerprint, verify_shards, worker_init)
from muse.layout import MANIFEST, SHARD_TABLE, read_manifest
from muse.testing.datasets import write_test_dataset
from muse.storage import Storage

DIR = "encoded/v1"


def _take(root, n, workers=0, state=None, rank=0, world_size=1, **kw):
    opts = dict(seed=3, shuffle_buffer=10, batch_size=4, streams=4) | kw
    ds = StreamingDataset(root, DIR, LoaderSettings(**opts), rank, world_size)
    if state:
        ds.load_state_dict(state)
    dl = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init if workers else None)
    batches = [ds.consume(b) for b in itertools.islice(dl, n)]
    return batches, ds.state_dict()


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
    dropped, _ = _take(root, 4, replaced_rows="drop", streams=1)  # 8 rows left: 2 batches an epoch
    assert not any(b["replaced"].any() for b in dropped)
    weighted, _ = _take(root, 3, replaced_rows="downweight", replaced_weight=0.25, streams=1)
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
        _take(root, 1, streams=2)


def test_manifest_shard_table(tmp_path):
    """The shard table is read with the header (two reads for any shard count); a table that is
    missing or does not match its header (finalized again while read) is named."""
    st = Storage(str(tmp_path / "root"))
    written = write_test_dataset(st, DIR, shards=3, rows=8, row_group_size=4)
    header = st.read_json(f"{DIR}/{MANIFEST}")
    assert "shards" not in header and header["shard_table"]["shards"] == 3
    assert read_manifest(st, DIR) == written
    st.delete(f"{DIR}/{SHARD_TABLE}")
    with pytest.raises(DataError, match="_SHARDS.parquet.*missing"):
        read_manifest(st, DIR)
    st.write_bytes(f"{DIR}/{SHARD_TABLE}", b"PAR1 other")
    with pytest.raises(DataError, match="finalized again"):
        read_manifest(st, DIR)


def test_verify_shards_from_one_listing(tmp_path):
    st = Storage(str(tmp_path / "root"))
    manifest = write_test_dataset(st, DIR, shards=3, rows=8, row_group_size=4)
    verify_shards(st, DIR, manifest, sha256=True)
    st.write_bytes(f"{DIR}/00002.parquet", st.read_bytes(f"{DIR}/00002.parquet") + b"x")
    verify_shards(st, DIR, manifest, rank=1, world=2)  # rank 1 of 2 checks shard 1 only
    with pytest.raises(DataError, match="00002.parquet: .* bytes, the manifest says"):
        verify_shards(st, DIR, manifest)
    st.delete(f"{DIR}/00001.parquet")
    with pytest.raises(DataError, match="00001.parquet: listed in the manifest but missing"):
        verify_shards(st, DIR, manifest, rank=1, world=2)


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
    ds = StreamingDataset(root, DIR, LoaderSettings(seed=3, shuffle_buffer=4, batch_size=2, streams=2))
    batch = next(iter(DataLoader(ds, batch_size=None, num_workers=2, worker_init_fn=worker_init)))
    assert "00000.parquet row group" in batch["_error"] and "\n" not in batch["_error"]


def _uneven(storage, sizes, row_group_size=4, **kw):
    """Shards of the given row counts: written equal, then cut (manifest rows/bytes/sha256 kept true)."""
    manifest = write_test_dataset(storage, DIR, shards=len(sizes), rows=max(sizes), row_group_size=row_group_size, **kw)
    for entry, n in zip(manifest["shards"], sizes):
        rel = f"{DIR}/{entry['path']}"
        table = pq.read_table(io.BytesIO(storage.read_bytes(rel))).slice(0, n)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size)
        storage.write_bytes(rel, buf.getvalue())
        entry.update(rows=n, bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    manifest["rows"] = sum(sizes)
    storage.write_json(f"{DIR}/_MANIFEST.json", manifest)
    return {f"{s:05d}{i:04d}" for s, n in enumerate(sizes) for i in range(n)}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_sees_every_row_once_across_ranks(tmp_path, world, workers):
    """On main `epochs: 1` saw 64-76% of the rows (some several times): the order was an endless
    unit stream per rank. Now epoch e of every rank together is one pass; only the remainder of
    the last global batch (reported as dropped_rows) is left out, other rows each epoch."""
    root, epochs = str(tmp_path / "root"), 3
    keys = _uneven(Storage(root), [13, 7, 20])  # 40 rows, row groups of 4 with tails of 1 and 3
    per_epoch = [collections.Counter() for _ in range(epochs)]
    for rank in range(world):
        ds = StreamingDataset(root, DIR, LoaderSettings(seed=5, shuffle_buffer=6, batch_size=2, streams=2),
                              rank, world)
        m = ds.batches_per_epoch
        assert m % 2 == 0 and ds.dropped_rows == 40 - world * m * 2 and 0 <= ds.dropped_rows < world * 2 * 2
        dl = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init if workers else None)
        for b in itertools.islice(dl, epochs * m):
            keys_of = ds.consume(b)["keys"]
            per_epoch[(ds.next_batch - 1) // m].update(keys_of)
    for seen in per_epoch:
        assert set(seen) <= keys and max(seen.values()) == 1 and sum(seen.values()) == 40 - ds.dropped_rows
    total = sum(per_epoch, collections.Counter())
    if ds.dropped_rows == 0:  # 1 and 2 ranks: every row exactly `epochs` times
        assert total == {k: epochs for k in keys}
    else:  # 4 ranks: 8 rows left out per epoch, other ones in other epochs
        assert len(set(total)) > 40 - ds.dropped_rows


def test_plan_counts_filtered_rows_and_whole_optimizer_steps(tmp_path):
    """With replaced_rows=drop and an eval slice the plan counts the rows that are left, so the
    epoch is still exactly one pass over them; M is a multiple of lcm(streams, grad_accum)."""
    root = str(tmp_path / "root")
    keys = _uneven(Storage(root), [10, 17], replaced_every=3)
    replaced = {f"{s:05d}{i:04d}" for s, n in enumerate([10, 17]) for i in range(0, n, 3)}
    ds = StreamingDataset(root, DIR, LoaderSettings(seed=1, shuffle_buffer=5, batch_size=1, streams=2, grad_accum=3,
                                                    replaced_rows="drop", eval_holdout=0.2))
    held = {k for k in keys if in_eval_slice(k, 0.2)}
    left = keys - replaced - held
    assert held and ds.train_rows == len(left) and ds.batches_per_epoch == len(left) // 6 * 6
    seen = collections.Counter(k for b in itertools.islice(ds, ds.batches_per_epoch) for k in b["keys"])
    assert set(seen) <= left and max(seen.values()) == 1 and len(seen) == ds.batches_per_epoch


def test_recorded_trainable_counts_equal_reading_and_start_reads_no_row_group(tmp_path, monkeypatch):
    """Encode records trainable rows per row group for the EVAL_LEVELS fractions (replaced rows kept
    or dropped); with them a loader with an eval slice or replaced_rows=drop reads no row group at
    start (on main every rank read the key/replaced columns of every row group); another fraction
    still reads them, and both ways give the counts the rows themselves give."""
    root = str(tmp_path / "root")
    st = Storage(root)
    write_test_dataset(st, DIR, shards=3, rows=64, row_group_size=8, replaced_every=3)
    truth = {}  # counts from the rows themselves, with the public rule
    for f, drop in [(0.05, True), (0.05, False), (0.0, True), (0.2, True)]:
        truth[f, drop] = [sum(not in_eval_slice(k, f) and not (drop and r) for k, r in zip(
            t.column("key").to_pylist(), t.column("replaced").to_pylist()))
            for sid in range(3) for pf in [pq.ParquetFile(io.BytesIO(st.read_bytes(f"{DIR}/{sid:05d}.parquet")))]
            for t in (pf.read_row_group(i) for i in range(pf.num_row_groups))]
    assert truth[0.05, True] != truth[0.05, False] != [8] * 24  # held-out and dropped rows both occur
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **kw: reads.append(a) or real(self, *a, **kw))
    for (f, drop), want in truth.items():
        reads.clear()
        ds = StreamingDataset(root, DIR, LoaderSettings(batch_size=1, streams=1, eval_holdout=f,
                                                        replaced_rows="drop" if drop else "keep"))
        assert ds.counts.tolist() == want
        assert len(reads) == (24 if f == 0.2 else 0)  # 0.2 is not recorded: read, as before
    header = st.read_json(f"{DIR}/{MANIFEST}")  # a table written before the counts: read them
    table = pq.read_table(io.BytesIO(st.read_bytes(f"{DIR}/{SHARD_TABLE}"))).select(["id", "path", "rows", "sha256"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    st.write_bytes(f"{DIR}/{SHARD_TABLE}", buf.getvalue())
    st.write_json(f"{DIR}/{MANIFEST}", header | {"shard_table": header["shard_table"] | {
        "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}})
    reads.clear()
    assert StreamingDataset(root, DIR, LoaderSettings(batch_size=1, streams=1, eval_holdout=0.05, replaced_rows="drop")
                            ).counts.tolist() == truth[0.05, True] and len(reads) == 24


def _fingerprint(ids, changed=()):
    shards = [{"id": i, "rows": 10_000, "sha256": f"{i + (i in changed):064x}"} for i in ids]
    return loader_fingerprint({"shards": shards}, seed=0, streams=8, batch_size=4, shuffle_buffer=8,
                              world_size=1, replaced_rows="keep")


def test_fingerprint_is_compact_at_scale_and_names_what_changed():
    """On main loader.json held every shard's id and sha256 (~90 bytes a shard, ~20 MB at LAION's
    230,000 shards, compared at each resume); now a few kB that still name added and removed
    shards exactly and a changed one to within FINGERPRINT_BLOCK ids."""
    ids = list(range(30_000)) + [150_000, 150_001]
    now = _fingerprint(ids)
    assert len(json.dumps(now)) < 2_000 and now["shards"]["ids"] == "0-29999,150000-150001"
    assert loader_changes(now, _fingerprint(ids)) == []
    assert loader_changes(now, _fingerprint(ids + [230_000])) == ["shards added: 230000"]
    assert loader_changes(now, _fingerprint([i for i in ids if i not in (7, 8)])) == [
        "shards removed: 00007, 00008"]
    assert loader_changes(now, _fingerprint(ids, changed={5000, 150_001})) == [
        "shards changed in ids: 04096-05119, 149504-150527"]
    assert loader_changes(now, _fingerprint(ids[1:], changed={5000})) == [
        "shards removed: 00000", "shards changed in ids: 04096-05119"]


def test_units_are_arrays_at_laion_scale_and_match_the_footers(tmp_path):
    """230,000 shards of 10,000 rows in row groups of 256 are 9.2M units: on main a list of Unit
    objects (~1.1 GB and ~2 min per rank and worker, bench/manifest_memory.py); now three int32
    arrays built in one pass. Without a recorded row-group size the footers give the same units."""
    shards = [{"id": i, "path": f"{i:05d}.parquet", "rows": 10_000} for i in range(230_000)]
    units = list_units(None, DIR, {"shards": shards[::-1], "encode": {"row_group_size": 256}})
    assert len(units) == 230_000 * 40 and units.rows.nbytes + units.shard.nbytes + units.row_group.nbytes == 12 * len(units)
    assert units[40 * 123_456 + 39] == Unit(f"{DIR}/123456.parquet", 39, 10_000 - 39 * 256)
    assert units[40] == Unit(f"{DIR}/00001.parquet", 0, 256) and int(units.rows.sum()) == 2_300_000_000
    st = Storage(str(tmp_path / "root"))
    _uneven(st, [13, 7, 20])
    manifest = read_manifest(st, DIR)
    from_size = list(list_units(st, DIR, manifest))
    assert len(from_size) == 4 + 2 + 5 and from_size == list(list_units(st, DIR, {**manifest, "encode": {}}))


def test_too_little_data_for_the_streams_is_a_clear_error(tmp_path):
    root = str(tmp_path / "root")
    write_test_dataset(Storage(root), DIR, shards=1, rows=8, row_group_size=4)
    with pytest.raises(DataError, match="lower train.loader_streams or train.batch_size"):
        StreamingDataset(root, DIR, LoaderSettings(batch_size=4, streams=4))


@pytest.mark.slow  # a training job
def test_trainer_epochs_are_exact_passes(tmp_path):
    """train.epochs without max_steps: the step count comes from the plan, each epoch's steps see
    every kept row once, the dropped remainder and a too-small shuffle buffer are reported."""
    from tests.train_helpers import make_data, read_trace, run_train, tiny_config

    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=None, epochs=2, shuffle_buffer=8,
                         checkpoint_every=100)
    make_data(config, shards=2, rows=25, row_group_size=8)  # 50 rows: 12 batches of 4 + 2 dropped
    out = run_train(config, env={"MUSE_TRACE": str(tmp_path / "trace")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "50 trainable rows = 1 ranks x 12 batches x 4 + 2 dropped" in out.stdout
    assert "warning: train.shuffle_buffer 8 is less than two row groups (8 rows each)" in out.stdout
    trace = read_trace(tmp_path / "trace")
    assert sorted(trace) == list(range(1, 13))  # 2 epochs x 12 micro-batches / grad_accum 2
    for steps in (range(1, 7), range(7, 13)):
        keys = [k for s in steps for k in trace[s]["keys"]]
        assert len(keys) == len(set(keys)) == 48
    metrics = {m["step"]: m for m in checkpoint.read_metrics(Storage(str(tmp_path / "root")), "t")}
    assert metrics[6]["epoch"] == 1.0 and metrics[12]["epoch"] == 2.0


def test_states_of_the_old_loader_are_refused_clearly(tmp_path):
    """Loader version 1 states (unit positions of an endless stream) mean nothing to the epoch plan."""
    root = str(tmp_path / "root")
    manifest = write_test_dataset(Storage(root), DIR, shards=1, rows=16, row_group_size=4)
    now = loader_fingerprint(manifest, seed=0, streams=2, batch_size=4, shuffle_buffer=8, world_size=1,
                             replaced_rows="keep", grad_accum=2)
    old = {k: v for k, v in now.items() if k not in ("loader_version", "grad_accum")}
    assert loader_changes(old, now) == ["loader version None -> 2", "train.grad_accum None -> 2"]
    ds = StreamingDataset(root, DIR, LoaderSettings(batch_size=4, streams=2))
    with pytest.raises(DataError, match="older loader.*on_data_change=new_pass"):
        ds.load_state_dict({"batch": 3, "streams": {"0": {"pos": 2, "rng": {}, "buffer": []}}})


def test_loader_changes_name_shards_in_id_order():
    """Shard names in id order (99999 before 100000, unlike string order); at most 5 named."""
    from muse.data import shards_fingerprint

    old = {"shards": shards_fingerprint({1: "a", 3: "a", 100001: "a"}), "seed": 0}
    new = {"shards": shards_fingerprint({1: "b", 3: "a", 100000: "a", 99999: "a"}), "seed": 0}
    assert loader_changes(old, new) == ["shards added: 99999, 100000", "shards removed: 100001",
                                             "shards changed in ids: 00000-01023"]
    many = {"shards": shards_fingerprint({i: "a" for i in range(7)})}
    assert loader_changes({"shards": shards_fingerprint({})}, many) == ["shards added: 00000, 00001, 00002, 00003, 00004 and 2 more"]


def test_loader_changes_name_a_shard_of_another_generation():
    """Issue 28: a shard a retry pass rewrote is named with both generations, not as a changed block;
    a fingerprint saved before generations were recorded reads as all generation 0."""
    from muse.data import shards_fingerprint

    before = shards_fingerprint({i: "a" for i in range(10)})
    assert "generations" not in before  # generation 0 everywhere: the fingerprint of old checkpoints
    after = shards_fingerprint({i: "b" if i == 3 else "a" for i in range(10)}, {3: 1})
    assert after["generations"] == {"1": "3"}
    assert loader_changes({"shards": before}, {"shards": after}) == [
        "shard 00003: generation 0 -> 1 (a retry pass re-fetched rows)"]
    assert loader_changes({"shards": after}, {"shards": before}) == [
        "shard 00003: generation 1 -> 0 (an older generation is in force again)"]
    many = shards_fingerprint({i: "c" for i in range(10)}, {i: 2 for i in range(1, 8)})
    assert many["generations"] == {"2": "1-7"}
    assert loader_changes({"shards": after}, {"shards": many}) == [
        "shard 00001: generation 0 -> 2 (a retry pass re-fetched rows)",
        "shard 00002: generation 0 -> 2 (a retry pass re-fetched rows)",
        "shard 00003: generation 1 -> 2 (a retry pass re-fetched rows)",
        "shard 00004: generation 0 -> 2 (a retry pass re-fetched rows)",
        "shard 00005: generation 0 -> 2 (a retry pass re-fetched rows)",
        "and 2 more shards of another generation"]
    # another shard's bytes changed in a block without a generation change: still named by its block
    far = shards_fingerprint({**{i: "b" if i == 3 else "a" for i in range(10)}, 5000: "x"}, {3: 1})
    farther = shards_fingerprint({**{i: "a" for i in range(10)}, 5000: "y"})
    assert loader_changes({"shards": far}, {"shards": farther}) == [
        "shards changed in ids: 04096-05119", "shard 00003: generation 1 -> 0 (an older generation is in force again)"]
