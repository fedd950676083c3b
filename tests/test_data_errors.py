"""The loader and the trainer under data faults (issue 27 items 3 and 5): a row group that cannot be
read is a RowGroupError naming the shard and row group; the trainer stops every rank (default) or,
with train.on_data_error: skip, skips it, says so in the log and metrics.jsonl, and trains on;
`muse train`'s last line is the failing rank's cause."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from gcsfs.retry import HttpError

from muse import checkpoint
from muse.config import load_config
from muse.data import LoaderSettings, RowGroupError, StreamingDataset, _read_failed, worker_init
from muse.layout import DataError, dataset_dir, metrics_file, shard_name
from muse.storage import RetryPolicy, Storage
from muse.testing.datasets import write_test_dataset
from tests.test_integrity import flip, page_byte
from tests.train_helpers import REPO, make_data, read_trace, run_train, tiny_config

DS = "encoded/v"


def bad_row_group(st: Storage, rel: str, row_group: int) -> set[str]:
    """Flip one bit in a data page of the row group (same size, manifest untouched) -> its keys."""
    flip(st, rel, page_byte(st.read_bytes(rel), row_group, "t5"))
    sid = int(rel.rsplit("/", 1)[1][:5])
    return {f"{sid:05d}{i:04d}" for i in range(8 * row_group, 8 * row_group + 8)}


def take(ds: StreamingDataset, batches: int, loader=None) -> tuple[list[dict], list[str]]:
    """Batches as the trainer takes them (through `consume`) and the skip messages they carried."""
    it = iter(loader if loader is not None else ds)
    out = [ds.consume(next(it)) for _ in range(batches)]
    return out, ds.take_skipped()


def test_storage_errors_after_retries_count_as_read_failures():
    """gcsfs raises HttpError (not an OSError) once its retries are spent; a bug is not a read failure."""
    assert _read_failed(HttpError({"code": 503, "message": "Service Unavailable"}))
    assert _read_failed(ConnectionResetError()) and not _read_failed(KeyError("t5"))


def test_skip_passes_over_a_corrupt_row_group_and_keeps_full_batches(tmp_path):
    """Default: the read stops with the shard and row group named. skip: no row of it is ever
    trained on, every batch is full, and each skip comes back as one message naming it."""
    st = Storage(str(tmp_path))
    write_test_dataset(st, DS, shards=2, rows=24, row_group_size=8)
    rel = shard_name(DS, 1)
    bad = bad_row_group(st, rel, 1)
    settings = dict(batch_size=4, streams=2, shuffle_buffer=8)
    with pytest.raises(RowGroupError, match=rf"{rel} row group 1: corrupt: a page checksum"):
        take(StreamingDataset(str(tmp_path), DS, LoaderSettings(**settings)), 30)
    ds = StreamingDataset(str(tmp_path), DS, LoaderSettings(**settings, on_data_error="skip"))
    batches, skipped = take(ds, 30)  # 2.5 epochs of 12 batches
    keys = [k for b in batches for k in b["keys"]]
    assert all(len(b["keys"]) == 4 for b in batches) and not bad & set(keys)
    assert len(set(keys)) == 40  # every other row
    assert len(skipped) >= 2 and all(f"{rel} row group 1: corrupt: a page checksum" in m for m in skipped)


def test_skip_in_dataloader_workers_and_after_resume(tmp_path):
    """The skip messages come back in-band from DataLoader workers; a row group that becomes
    unreadable while rows of it sit in a saved shuffle buffer is skipped after the resume too."""
    st = Storage(str(tmp_path))
    write_test_dataset(st, DS, shards=2, rows=24, row_group_size=8)
    settings = LoaderSettings(batch_size=2, streams=2, shuffle_buffer=16, on_data_error="skip")
    ds = StreamingDataset(str(tmp_path), DS, settings)
    take(ds, 2)
    state = ds.state_dict()
    u = state["streams"]["0"]["buffer"][0][0]  # a unit with rows waiting in stream 0's buffer
    unit = ds.units[u]
    bad = bad_row_group(st, unit.path, unit.row_group)
    resumed = StreamingDataset(str(tmp_path), DS, settings)
    resumed.load_state_dict(state)
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=2, worker_init_fn=worker_init)
    batches, skipped = take(resumed, 16, loader)
    assert not bad & {k for b in batches for k in b["keys"]}
    assert skipped and all(f"{unit.path} row group {unit.row_group}: corrupt" in m for m in skipped)


def test_an_object_replaced_mid_run_on_gcs(gcs_root):
    """On the real fake-gcs-server: a shard replaced by other bytes while the loader runs is named
    at its next read (stop), or skipped (skip); a stream that can read nothing gives up."""
    st = Storage(gcs_root)
    write_test_dataset(st, DS, shards=2, rows=24, row_group_size=8)
    settings = dict(batch_size=4, streams=1, shuffle_buffer=8)
    stop = StreamingDataset(gcs_root, DS, LoaderSettings(**settings))
    skip = StreamingDataset(gcs_root, DS, LoaderSettings(**settings, on_data_error="skip"))
    stop_it, skip_it = iter(stop), iter(skip)
    for _ in range(2):
        stop.consume(next(stop_it)), skip.consume(next(skip_it))
    rel = shard_name(DS, 0)
    st.write_bytes(rel, b"x" * st.size(rel))  # same size: only the read can tell
    with pytest.raises(RowGroupError, match=rf"{st.url(rel)} row group \d: unreadable"):
        for _ in range(24):
            stop.consume(next(stop_it))
    keys = [k for _ in range(24) for k in skip.consume(next(skip_it))["keys"]]
    assert skip.take_skipped() and not any(k.startswith("00000") for k in keys[-40:])
    st.write_bytes(shard_name(DS, 1), b"x" * st.size(shard_name(DS, 1)))  # nothing readable left
    with pytest.raises(DataError, match="row groups read all failed.*on_data_error is skip"):
        for _ in range(24):
            skip.consume(next(skip_it))


def test_the_loader_reads_with_the_configured_retry_policy(gcs_root, gcs_proxy):
    """A permanent 503 on one shard's reads, behind the fault proxy: the loader (and the streams it
    builds per worker) retries as storage.retries says, then names the shard and row group."""
    st = Storage(gcs_root)
    write_test_dataset(st, DS, shards=1, rows=16, row_group_size=8)
    policy = RetryPolicy(retries=2, timeout_s=2.0, deadline_s=30, base_s=0.01, cap_s=0.05)
    ds = StreamingDataset(gcs_root, DS, LoaderSettings(batch_size=4, streams=1, shuffle_buffer=4), retry=policy)
    assert pickle.loads(pickle.dumps(ds)).retry == policy  # what a DataLoader worker gets
    gcs_proxy.reset_counts()
    gcs_proxy.fail_always(shard_name(DS, 0).rsplit("/", 1)[1], "503", kind="read")
    with pytest.raises(RowGroupError, match=rf"{st.url(shard_name(DS, 0))} row group \d"):
        next(iter(ds))
    assert gcs_proxy.counts().get("read") == policy.retries + 1  # one failing read: 1 try + 2 retries


def _metrics(storage: Storage, run: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(metrics_file(run)).decode().splitlines()]


@pytest.mark.slow  # a 2-rank torchrun job (~30 s on 2 shared cores)
def test_two_ranks_skip_a_corrupt_row_group_and_train_on(tmp_path):
    """train.on_data_error: skip under DDP: the rank that meets the row group skips it and the ranks
    stay in step (the job ends, exit 0); the log names it, metrics.jsonl counts it, no row of it is
    trained on."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=6, on_data_error="skip")
    make_data(config, shards=2, rows=24, row_group_size=8)
    cfg = load_config(config)
    st = Storage.from_config(cfg)
    rel = shard_name(dataset_dir(cfg), 1)
    bad = bad_row_group(st, rel, 1)
    out = run_train(config, nproc=2, env={"MUSE_TRACE": str(tmp_path / "trace")}, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    said = [x for x in out.stdout.splitlines() if f"skipped {st.url(rel)} row group 1: corrupt" in x]
    assert said and all(x.startswith("rank ") and "(train.on_data_error: skip)" in x for x in said), out.stdout
    records = _metrics(st, "t")
    assert records[-1]["step"] == 6 and records[-1]["skipped_row_groups"] == len(said)
    trained = {k for r in (0, 1) for rec in read_trace(tmp_path / "trace", r).values() for k in rec["keys"]}
    assert len(trained) == 40 and not bad & trained


@pytest.mark.slow  # a 2-rank `muse train` job (~50 s on 2 shared cores)
def test_muse_train_stops_at_a_row_group_corrupted_mid_run(tmp_path):
    """A bit flipped in every row group of a shard while the ranks wait after step 2: every rank
    stops (no hang), exit 1, the last line of `muse train` names the shard and row group, no
    torchrun traceback; step 2's checkpoint stays, nothing after the failing step is written."""
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=6, checkpoint_every=2)
    make_data(config, shards=2, rows=24, row_group_size=8)
    cfg = load_config(config)
    st = Storage.from_config(cfg)
    rel = shard_name(dataset_dir(cfg), 1)
    go, trace = tmp_path / "go", tmp_path / "trace"
    cmd = [sys.executable, "-m", "muse.testing.faults", "cli", "train", "--config", str(config),
           "--set", "train.nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MUSE_TRACE": str(trace),
           "MUSE_PAUSE_AT_STEP": "2", "MUSE_CONTINUE_FILE": str(go)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while not all(2 in read_trace(trace, r) for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never reached step 2"
            time.sleep(0.1)
        for rg in range(3):  # the next epoch (steps 4-6) reads each of them again
            bad_row_group(st, rel, rg)
        go.touch()
        log = proc.communicate(timeout=120)[0]  # the hang guard
    finally:
        proc.kill()
    lines = log.strip().splitlines()
    assert proc.returncode == 1, log
    assert lines[-1].startswith("muse train: TrainError: ") and f"{st.url(rel)} row group " in lines[-1], log
    assert "corrupt: a page checksum" in lines[-1] and "muse encode" in lines[-1], lines[-1]
    assert "ChildFailedError" not in log and "Traceback" not in log, log
    last = max(max(read_trace(trace, r)) for r in (0, 1))
    assert last < 6 and checkpoint.load_state(st, checkpoint.latest(st, "t")).step == last - last % 2, log


def test_torchrun_ends_with_one_line_unless_debug(tmp_path, monkeypatch, capsys):
    """`python -m muse.launch` (`launch.torchrun`, here in-process) is torchrun ending a failed job
    with one line; MUSE_DEBUG=1 keeps torchrun's ChildFailedError (a rank that cannot even start)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from muse.launch import first_cause, torchrun

    argv = ["--standalone", "--nproc-per-node=1", "-m", "muse.no_such_module"]
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:  # torchrun leaves its signal handlers installed: fine in its own process, not in pytest's
        monkeypatch.delenv("MUSE_DEBUG", raising=False)
        assert torchrun(argv) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("torchrun: 1 rank(s) failed, rank 0 first (exit code 1)"), err
        monkeypatch.setenv("MUSE_DEBUG", "1")
        with pytest.raises(ChildFailedError):
            torchrun(argv)
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
    # the cause `muse train` leads its error with: the first written (the others may only follow it)
    assert first_cause(tmp_path) is None
    (tmp_path / "rank1").write_text("rank 1's cause")
    time.sleep(0.01)
    (tmp_path / "rank0").write_text("rank 0 stopped after rank 1")
    assert first_cause(tmp_path) == (1, "rank 1's cause")


def test_on_data_error_is_stop_or_skip(tmp_path):
    from muse.config import ConfigError

    config = tiny_config(tmp_path, "r")
    assert load_config(config).train.on_data_error == "stop"
    with pytest.raises(ConfigError, match="train.on_data_error: Input should be 'stop' or 'skip'"):
        load_config(config, ["train.on_data_error=ignore"])
