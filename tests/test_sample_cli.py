"""`muse sample`: T5 -> base -> (super-resolution) -> VQ decode -> PNGs, through the real loaders."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from muse.config import ModelConfig
from muse.models import build_model
from muse.testing.tiny import CODEBOOK, TEXT_DIM, build_tiny_encoders, tiny_encode_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    enc = build_tiny_encoders(tmp / "enc", superres=True)
    torch.manual_seed(0)
    for kind in ("base", "superres"):
        build_model(ModelConfig(kind=kind, preset="tiny", codebook_size=CODEBOOK, text_dim=TEXT_DIM)).save_pretrained(
            tmp / kind)
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"root": str(tmp / "root")}, "source": {"paths": ["x.parquet"]},
                                   "download": {"image_size": 512}, "encode": {"superres": True},
                                   "sample": {"steps": 4, "superres_steps": 2, "device": "cpu"}}))
    sets = []
    for o in tiny_encode_overrides(enc):
        sets += ["--set", o]
    return tmp, cfg, sets


def _run(cfg, sets, *args):
    out = subprocess.run([sys.executable, "-m", "muse.cli", "sample", "--config", str(cfg), *sets, *args],
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO),
                                                                           "PATH": "/usr/bin:/bin",
                                                                           "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow
def test_base_sample_writes_a_256px_png(setup):
    tmp, cfg, sets = setup
    _run(cfg, sets, "--prompt", "a red circle", "--checkpoint", str(tmp / "base"), "--out", str(tmp / "one.png"))
    png = Image.open(tmp / "one.png")
    assert png.size == (256, 256)
    assert png.text["prompt"] == "a red circle"
    assert json.loads(png.text["parameters"]) == {"checkpoint": str(tmp / "base"), "steps": 4,
                                                  "guidance_scale": 4.0, "guidance_schedule": "constant",
                                                  "temperature": 1.0, "seed": 0,
                                                  "use_ema": True}


@pytest.mark.slow
def test_superres_batch_writes_512px_pngs_and_a_grid(setup):
    tmp, cfg, sets = setup
    (tmp / "prompts.txt").write_text("a red circle\n\na blue square\na green star\n")
    _run(cfg, sets, "--prompts-file", str(tmp / "prompts.txt"), "--checkpoint", str(tmp / "base"),
         "--superres-checkpoint", str(tmp / "superres"), "--out", "samples/sr.png")
    root = tmp / "root" / "samples"  # a relative --out lands under the storage root
    prompts = ["a red circle", "a blue square", "a green star"]
    for i in range(3):
        png = Image.open(root / f"sr-{i:03d}.png")
        assert png.size == (512, 512) and png.text["prompt"] == prompts[i]
        params = json.loads(png.text["parameters"])
        assert params["superres_checkpoint"] == str(tmp / "superres") and params["superres_steps"] == 2
    grid = Image.open(root / "sr-grid.png")
    assert grid.size[0] == 1024 and 1024 < grid.size[1] < 1024 + 2 * 80  # a caption strip under each row
    assert grid.text["prompt"] == "\n".join(prompts)
    assert json.loads(grid.text["parameters"]) == params


@pytest.mark.slow
def test_same_seed_same_image(setup):
    tmp, cfg, sets = setup
    for name in ("a.png", "b.png"):
        _run(cfg, sets, "--prompt", "a cat", "--checkpoint", str(tmp / "base"), "--out", str(tmp / name),
             "--set", "sample.seed=7")
    assert (tmp / "a.png").read_bytes() == (tmp / "b.png").read_bytes()


def test_missing_checkpoint_is_a_clear_error(setup):
    tmp, cfg, sets = setup
    out = subprocess.run([sys.executable, "-m", "muse.cli", "sample", "--config", str(cfg), *sets, "--prompt", "x"],
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                                           "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "no checkpoint" in out.stderr and "train first" in out.stderr  # a user mistake
