"""Run tracking: TensorBoard events of real training runs (local and gs://), wandb offline."""

import math
import sys

import numpy as np
import pytest
import yaml

from muse import checkpoint, train
from muse.config import apply_overrides, load_config
from muse.storage import Storage
from tests.train_helpers import make_data, read_tb, run_train, tiny_config

SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/skipped", "train/epoch",
           "train/samples_per_s", "train/tokens_per_s"]


def _storage(config) -> Storage:
    return Storage.from_config(load_config(config))


@pytest.mark.slow
def test_training_writes_tensorboard_scalars(any_root, tmp_path):
    config = tiny_config(tmp_path, any_root, max_steps=4, checkpoint_every=100)
    make_data(config)
    out = run_train(config)
    assert out.returncode == 0, out.stdout + out.stderr
    storage = _storage(config)
    acc = read_tb(storage, "t", tmp_path)
    assert set(SCALARS) <= set(acc.Tags()["scalars"])
    assert "train/mfu" not in acc.Tags()["scalars"]  # CPU: no peak FLOP/s, no MFU
    metrics = {m["step"]: m for m in checkpoint.read_metrics(storage, "t")}
    for tag in SCALARS:
        pts = acc.Scalars(tag)
        assert [p.step for p in pts] == [1, 2, 3, 4], tag
        key = tag.split("/", 1)[1]
        assert all(math.isfinite(p.value) for p in pts), tag
        assert all(p.value == pytest.approx(metrics[p.step][key], rel=1e-6) for p in pts), tag


@pytest.mark.slow
def test_resumed_run_shows_each_step_once(tmp_path):
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=4, checkpoint_every=2)
    make_data(config)
    assert run_train(config).returncode == 0
    # replay steps 3-4 from the step-2 checkpoint: a second event file that purges the first's 3-4
    out = run_train(config, "--resume", "checkpoints/t/step-00000002")
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout + out.stderr
    storage = _storage(config)
    assert len(storage.list("checkpoints/t/tb")) == 2
    acc = read_tb(storage, "t", tmp_path)
    assert [p.step for p in acc.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sample_grid_goes_to_tensorboard(tmp_path):
    from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

    enc = build_tiny_encoders(tmp_path / "enc")
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, checkpoint_every=2, sample_every=2)
    data = yaml.safe_load(config.read_text())
    data["sample"] = {"prompts": ["a red fox", "a blue square"], "steps": 2, "device": "cpu"}
    config.write_text(yaml.safe_dump(data))
    config.write_text(yaml.safe_dump(apply_overrides(data, tiny_encode_overrides(enc))))
    make_data(config, text_dim=32)
    out = run_train(config)
    assert out.returncode == 0 and "sampling skipped" not in out.stdout, out.stdout + out.stderr
    acc = read_tb(_storage(config), "t", tmp_path)
    imgs = acc.Images("samples")
    assert [i.step for i in imgs] == [2]
    assert imgs[0].width == 2 * 256 and imgs[0].height > 256  # 2 cells + caption strips
    from tensorboard.util import tensor_util

    tag = next(t for t in acc.Tags()["tensors"] if t.startswith("samples/caption"))
    text = tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto).item().decode()
    assert "a red fox" in text and "a blue square" in text


def test_wandb_configured_but_missing_fails_at_start(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path, str(tmp_path / "root"))
    make_data(config)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like
    rc = train.main(["--config", str(config), "--set", "train.wandb.project=p"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.wandb" in err and "pip install wandb" in err
    assert len(err.strip().splitlines()) == 1
    assert not _storage(config).exists("checkpoints/t")  # nothing trained


@pytest.mark.slow
def test_wandb_offline_writes_a_run(tmp_path):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    config = tiny_config(tmp_path, str(tmp_path / "root"), max_steps=2, checkpoint_every=100)
    make_data(config)
    out = run_train(config, "--set", "train.wandb.mode=offline", "--set", "train.wandb.project=muse-test",
                    env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stdout + out.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert (tmp_path / "root/checkpoints/t/tb").is_dir()  # TensorBoard as well


def test_nonzero_ranks_get_a_no_op_tracker(tmp_path):
    from muse.tracking import NullTracker, Tracker

    cfg = load_config(tiny_config(tmp_path, str(tmp_path / "root")))
    t = Tracker.start(cfg, Storage.from_config(cfg), rank=1)
    assert type(t) is NullTracker
    t.scalars(1, {"loss": 1.0})
    t.image(1, "x", np.zeros((2, 2, 3), np.uint8), "c")
    t.close()
    assert not (tmp_path / "root").exists()
