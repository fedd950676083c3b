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


def test_prompts_go_through_the_models_and_the_vq_decoder_batch_size_at_a_time(setup):
    """Issue 25 crash 6: every prompt in one batch runs a long prompt list out of GPU memory. With
    sample.batch_size 2, five prompts reach each model and the VQ decoder in batches of at most 2
    (a guided forward stacks the conditional and unconditional halves: 2 x 2 rows), and a batch
    draws what it would draw alone: the first two pictures are those of the first two prompts."""
    from muse.config import load_config
    from muse.sample import load_models, sample_images
    from muse.storage import Storage

    tmp, cfg_path, sets = setup
    overrides = [s for s in sets if s != "--set"] + [
        f"sample.checkpoint={tmp / 'base'}", f"sample.superres_checkpoint={tmp / 'superres'}", "sample.batch_size=2"]
    cfg = load_config(cfg_path, overrides)
    storage = Storage.from_config(cfg)
    models = load_models(cfg, storage)
    rows = {"base": [], "superres": [], "decoder": []}
    hooks = [models.base.register_forward_pre_hook(lambda m, args: rows["base"].append(args[0].shape[0])),
             models.superres.register_forward_pre_hook(lambda m, args: rows["superres"].append(args[0].shape[0])),
             models.decoder._quantizer().embedding.register_forward_pre_hook(  # ids -> codes, once per decode
                 lambda m, args: rows["decoder"].append(args[0].numel() // 64 ** 2))]
    prompts = ["a red circle", "a blue square", "a green star", "a red star", "a blue circle"]
    try:
        images = sample_images(cfg, prompts, storage, models=models)
    finally:
        for h in hooks:
            h.remove()
    assert images.shape == (5, 512, 512, 3)
    assert rows["decoder"] == [2, 2, 1]
    assert set(rows["base"]) == {4, 2} and set(rows["superres"]) == {4, 2}   # 2 x (2, 2, 1) rows, guided
    assert len(rows["base"]) == 3 * cfg.sample.steps and len(rows["superres"]) == 3 * cfg.sample.superres_steps
    first_two = sample_images(cfg, prompts[:2], storage, models=models)
    assert (images[:2] == first_two).all()
