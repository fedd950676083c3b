"""Orchestration rules that need no Prefect server: which errors are retried."""

import json
from pathlib import Path

import pytest


def _errors():
    """(label, exception, retried?) for the errors a pipeline task meets in practice."""
    import aiohttp
    import gcsfs.retry
    import pyarrow as pa
    import pydantic
    import requests
    import torch

    from muse.config import ConfigError
    from muse.download.runner import DownloadDeadlineError, DownloadError
    from muse.layout import DataError

    def gcs(code):
        return gcsfs.retry.HttpError({"code": code, "message": "gcs says"})

    def json_error():
        try:
            json.loads("{not json")
        except json.JSONDecodeError as e:
            return e

    def validation_error():
        try:
            pydantic.TypeAdapter(int).validate_python("x")
        except pydantic.ValidationError as e:
            return e

    def caused(outer, cause):
        outer.__cause__ = cause
        return outer

    return [
        ("connection reset", ConnectionResetError("peer reset"), True),
        ("connection refused", ConnectionRefusedError(), True),
        ("socket timeout", TimeoutError("timed out"), True),
        ("TimeoutError", TimeoutError(), True),
        ("requests connection", requests.exceptions.ConnectionError("down"), True),
        ("requests read timeout", requests.exceptions.ReadTimeout("slow"), True),
        ("aiohttp connection", aiohttp.ClientConnectionError("down"), True),
        ("GCS 429", gcs(429), True),
        ("GCS 500", gcs(500), True),
        ("GCS 503", gcs(503), True),
        ("download deadline", DownloadDeadlineError("ran past download.deadline_s"), True),
        ("wrapped connection error", caused(RuntimeError("while writing"), ConnectionResetError()), True),
        ("GCS 403", gcs(403), False),
        ("GCS 404", gcs(404), False),
        ("JSONDecodeError", json_error(), False),
        ("ArrowInvalid", pa.ArrowInvalid("bad parquet"), False),
        ("pydantic ValidationError", validation_error(), False),
        ("IndexError", IndexError("list index out of range"), False),
        ("AssertionError", AssertionError(), False),
        ("PermissionError", PermissionError(13, "denied"), False),
        ("FileNotFoundError", FileNotFoundError("x.parquet"), False),
        ("CUDA out of memory", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), False),
        ("CUDA OOM as RuntimeError", RuntimeError("CUDA out of memory."), False),
        ("ConfigError", ConfigError("train.lr: must be > 0"), False),
        ("DataError", DataError("shard 3 corrupt"), False),
        ("other DownloadError", DownloadError("shard 2 has 9 rows, expected 10"), False),
        ("RuntimeError (a bug)", RuntimeError("a bug"), False),
    ]


ERRORS = _errors()


@pytest.mark.parametrize("label,exc,retried", ERRORS, ids=[e[0] for e in ERRORS])
def test_only_transient_errors_are_retried(label, exc, retried):
    """The tasks' retry_condition_fn, fed the Failed state Prefect gives it."""
    from prefect.states import Failed

    from flows.common import transient

    assert transient(None, None, Failed(data=exc)) is retried, label


def test_a_completed_state_is_not_retried():
    from prefect.states import Completed

    from flows.common import transient

    assert transient(None, None, Completed(data=1)) is False


def test_flow_parameters_explain_themselves_in_the_custom_run_form():
    """The schema Prefect builds for the UI: choices as enums, every parameter described."""
    from prefect.utilities.callables import parameter_schema

    from flows.encode_remote import encode_chunk_flow
    from flows.pipeline import data_refresh_flow, pipeline_flow
    from flows.train import train_flow

    props = parameter_schema(pipeline_flow.fn).model_dump()["properties"]
    assert props["train_on"]["enum"] == ["local", "deployment"]
    assert {"enum": ["latest", "none"], "type": "string"} in props["resume"]["anyOf"]
    for fn in (pipeline_flow, data_refresh_flow, train_flow, encode_chunk_flow):
        props = parameter_schema(fn.fn).model_dump()["properties"]
        missing = [k for k, v in props.items() if not v.get("description")]
        assert not missing, f"{fn.name}: no description for {missing}"
    assert "gs://" in props["config_path"]["description"]


def test_config_path_may_be_a_gs_url(gcs_root):
    from muse.config import ConfigError, load_config
    from muse.storage import Storage

    Storage(gcs_root).write_text("pipeline.yaml", "source: {paths: [urls.jsonl]}\ntrain: {max_steps: 7}\n")
    cfg = load_config(f"{gcs_root}/pipeline.yaml", ["train.lr=0.001"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.001
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(f"{gcs_root}/missing.yaml")


def test_code_directory_is_read_on_the_worker_when_the_run_starts(tmp_path, monkeypatch):
    """prefect.yaml's pull step: the worker's $MUSE_PIPELINE_DIR at run time, not the deployer's path."""
    import yaml

    from flows.steps import set_code_directory

    repo = Path(__file__).resolve().parents[1]
    pull = yaml.safe_load((repo / "prefect.yaml").read_text())["pull"]
    assert pull == [{"flows.steps.set_code_directory": {"default": "/opt/muse-pipeline"}}]
    (tmp_path / "code" / "flows").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUSE_PIPELINE_DIR", str(tmp_path / "code"))
    assert set_code_directory() == {"directory": str(tmp_path / "code")}
    assert Path.cwd() == tmp_path / "code"
    monkeypatch.delenv("MUSE_PIPELINE_DIR")
    with pytest.raises(FileNotFoundError, match="MUSE_PIPELINE_DIR"):
        set_code_directory(default=str(tmp_path / "nowhere"))


def test_an_encode_task_retry_skips_the_shards_its_first_try_did_from_one_listing(tmp_path, monkeypatch):
    """encode_chunk_task (the function under the Prefect task): the chunk's shards already done
    (Parquet + record of the image shard's newest generation) come from one listing of each folder,
    not one request per shard; the others are encoded (a retry pass's generation by its number), and
    a failing one is named as layout spells ids (past 5 digits too)."""
    import flows.encode as enc
    from muse.config import load_config
    from muse.layout import IMAGES, dataset_dir, done_marker, shard_name
    from muse.storage import Storage

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"storage: {{root: {tmp_path / 'root'}}}\nsource: {{paths: [urls.jsonl]}}\n")
    storage = Storage.from_config(load_config(config))
    ds = dataset_dir(load_config(config))
    for sid, gen in [(s, 0) for s in range(99998, 100005)] + [(100003, 1)]:  # 100003: a retry pass's too
        storage.write_bytes(shard_name(IMAGES, sid, generation=gen), b"")
        storage.write_json(done_marker(IMAGES, sid, gen), {})
    for sid in (99999, 100001, 100003):  # done by the first try (100003: generation 0 only, so not done)
        storage.write_bytes(shard_name(ds, sid), b"")
        storage.write_json(done_marker(ds, sid), {})
    storage.write_bytes(shard_name(ds, 100000), b"")  # its data without its record: not done
    encoded, calls = [], {}

    def encode_shard(cfg, sid, generation):
        if sid == 100002:
            raise ValueError("bad data")
        encoded.append((sid, generation))
        return {"rows": 1}

    monkeypatch.setattr(enc, "encode_shard", encode_shard)
    for name in ("ls", "exists"):  # the task's Storage shares this (cached) filesystem
        method = getattr(storage.fs, name)
        monkeypatch.setattr(storage.fs, name, lambda *a, _n=name, _m=method, **k: calls.update(
            {_n: calls.get(_n, 0) + 1}) or _m(*a, **k))
    with pytest.raises(RuntimeError, match=r"1 shard\(s\) failed: 100002: bad data"):
        enc.encode_chunk_task.fn(str(config), [], list(range(99998, 100005)))
    assert encoded == [(99998, 0), (100000, 0), (100003, 1), (100004, 0)]
    # one listing (and at most one exists) per folder, images/ and the dataset; was: one exists per shard
    assert calls.get("ls") == 2 and calls.get("exists", 0) <= 2, calls


def test_training_progress_is_updated_at_each_metrics_line_with_step_loss_rate_and_eta(monkeypatch):
    """Issue 30, item 2: live progress at the log cadence (train.log_every), not only at checkpoints."""
    import logging

    import flows.train_log as tl

    updates = []
    monkeypatch.setattr(tl, "get_run_logger", lambda: logging.getLogger("test-train-log"))
    monkeypatch.setattr(tl, "create_progress_artifact", lambda progress, key, description: (key, progress))
    monkeypatch.setattr(tl, "update_progress_artifact",
                        lambda artifact, progress, description: updates.append((artifact, progress, description)))
    clock = iter([100.0, 110.0, 120.0, 121.0, 140.0])   # __init__, then one reading per update
    monkeypatch.setattr(tl.time, "monotonic", lambda: next(clock))
    log = tl.TrainLog("demo")
    for line in ["model base 1.10M params | world 1 x batch 8 x accum 1 = global batch 8 | 40 steps | precision fp32",
                 "step 10 | loss 3.72 | lr 0.001 | samples_per_s 6.5 | tokens_per_s 1664",
                 "step 20 | loss 2.9 | lr 0.001 | samples_per_s 7.1 | tokens_per_s 1818",
                 "step 20: checkpoint /tmp/root/checkpoints/demo/step-00020",
                 "step 40 | loss 2.01 | lr 0.001 | samples_per_s 7 | tokens_per_s 1792"]:
        log(line)
    assert [(p, d) for _, p, d in updates] == [
        (25.0, "step 10/40, loss 3.72, samples/s 6.5, ETA 30 s"),          # 10 s for 10 steps, 30 to go
        (50.0, "step 20/40, loss 2.9, samples/s 7.1, ETA 20 s"),
        (50.0, "step 20/40, loss 2.9, samples/s 7.1, ETA 21 s (checkpoint written)"),
        (100.0, "step 40/40, loss 2.01, samples/s 7, ETA 0 s")]
    assert all(a == ("training-progress", 0.0) for a, _, _ in updates)
