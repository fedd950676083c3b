"""The whole cascade at tiny sizes (issue 13): encode with `encode.superres: true` -> train the
base and the super-res model (`model.kind: superres`, EMA on) -> `muse sample` base then
super-res -> a 512 px PNG, every step through the commands users run."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from muse import checkpoint
from muse.config import load_config
from muse.encode import run_encode
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides
from tests.train_helpers import REPO, run_train


@pytest.mark.slow  # two training runs and a sampling run as subprocesses
def test_encode_train_base_and_superres_then_sample_a_512px_png(tmp_path):
    enc = build_tiny_encoders(tmp_path / "enc", superres=True)
    sets = [s for o in tiny_encode_overrides(enc) for s in ("--set", o)]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "root")}, "source": {"paths": ["unused.parquet"]},
        "download": {"image_size": 512}, "encode": {"superres": True, "batch_size": 4},
        "model": {"preset": "tiny", "depth": 1, "low_res_depth": 1},
        "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 2, "warmup_steps": 0, "num_workers": 0,
                  "shuffle_buffer": 4, "loader_streams": 1, "ema": True, "ema_decay": 0.5},
        "sample": {"steps": 3, "superres_steps": 2, "device": "cpu"}}))
    cfg = load_config(config, tiny_encode_overrides(enc))
    storage = Storage.from_config(cfg)
    write_image_shard(storage, 0, ["a red circle", "a blue square", "a green star", "a dot"], size=512)
    assert run_encode(cfg)["rows"] == 4
    for run, kind in (("base", "base"), ("sr", "superres")):
        out = run_train(config, *sets, "--set", f"train.run_name={run}", "--set", f"model.kind={kind}")
        assert out.returncode == 0, out.stdout + out.stderr
        assert checkpoint.has_ema(storage, checkpoint.latest(storage, run))
    base, sr = (storage.url(checkpoint.latest(storage, r)) for r in ("base", "sr"))
    out = subprocess.run([sys.executable, "-m", "muse.cli", "sample", "--config", str(config), *sets,
                          "--prompt", "a red circle", "--checkpoint", base, "--superres-checkpoint", sr,
                          "--out", str(tmp_path / "fox.png")],
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    png = Image.open(tmp_path / "fox.png")
    assert png.size == (512, 512)
    params = json.loads(png.text["parameters"])
    assert params["superres_checkpoint"] == sr and params["use_ema"] is True
    sr_model = checkpoint.load_model(storage, checkpoint.latest(storage, "sr"), ema=True)
    assert sr_model.config.kind == "superres" and len(sr_model.low_res_layers) == 1
    assert not torch.equal(sr_model.low_res_emb.weight,
                           checkpoint.load_model(storage, checkpoint.latest(storage, "sr")).low_res_emb.weight)
