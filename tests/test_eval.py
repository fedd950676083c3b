"""Evaluation: the eval slice never reaches the trainer; FID and CLIP score through the users' code
path with tiny models built here; `muse eval` and `train.eval_every` end to end on the tiny world."""

import io
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from muse import evaluate
from muse.config import ConfigError, load_config
from muse.data import in_eval_slice, iter_eval_rows
from muse.storage import Storage
from muse.testing.tiny import build_tiny_clip, build_tiny_fid_features, build_tiny_vq
from tests.train_helpers import REPO, make_data, read_tb, read_trace, run_train, tiny_config

HOLDOUT = 0.25
STEPS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalmodels")
    return {"clip": build_tiny_clip(tmp / "clip"), "features": build_tiny_fid_features(tmp / "features.pt2"),
            "vq": build_tiny_vq(tmp / "vq")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, models):
    """The trainer's tiny world with an eval slice, real images, a tiny VQ decoder and CLIP; one
    run without and one with `train.eval_every`, both traced."""
    tmp = tmp_path_factory.mktemp("evalworld")
    config = tiny_config(tmp, str(tmp / "root"), max_steps=STEPS, eval_holdout=HOLDOUT)
    data = yaml.safe_load(config.read_text())
    data["encode"] = {"vq_model": models["vq"], "vq_subfolder": None}
    data["eval"] = {"clip_model": models["clip"], "fid_features": models["features"], "steps": 2,
                    "batch_size": 8, "max_samples": 12, "device": "cpu"}
    config.write_text(yaml.safe_dump(data))
    make_data(config, shards=2, rows=24, row_group_size=8, replaced_every=7, image_size=32)
    plain = run_train(config, env={"MUSE_TRACE": str(tmp / "plain")})
    assert plain.returncode == 0, plain.stdout + plain.stderr
    evals = run_train(config, "--set", "train.run_name=withevals", "--set", "train.eval_every=4",
                      env={"MUSE_TRACE": str(tmp / "withevals")})
    assert evals.returncode == 0, evals.stdout + evals.stderr
    return config, tmp, evals


def _all_keys(storage, cfg):
    keys = []
    for p in storage.list(f"encoded/{cfg.encode.version()}", ".parquet"):
        if p.rsplit("/", 1)[-1].startswith("_"):  # the manifest's shard table, _SHARDS.parquet
            continue
        with storage.open(p) as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


def test_eval_slice_is_a_stable_hash_of_the_key():
    keys = [f"{i:09d}" for i in range(20000)]
    small = {k for k in keys if in_eval_slice(k, 0.05)}
    large = {k for k in keys if in_eval_slice(k, 0.2)}
    assert abs(len(small) / len(keys) - 0.05) < 0.01 and abs(len(large) / len(keys) - 0.2) < 0.015
    assert small < large  # a larger holdout is a superset: earlier eval rows stay held out
    assert not any(in_eval_slice(k, 0.0) for k in keys)


@pytest.mark.slow
def test_trainer_never_sees_the_eval_rows_and_the_reader_yields_exactly_them(world):
    config, tmp, _ = world
    cfg = load_config(config)
    storage = Storage.from_config(cfg)
    keys = _all_keys(storage, cfg)
    eval_keys = {k for k in keys if in_eval_slice(k, HOLDOUT)}
    trained = {k for rec in read_trace(tmp / "plain").values() for k in rec["keys"]}
    assert eval_keys and len(read_trace(tmp / "plain")) == STEPS
    assert not trained & eval_keys
    assert len(trained) > 0.8 * (len(keys) - len(eval_keys))  # 64 samples over ~36 rows: most were trained on
    rows = list(iter_eval_rows(storage, f"encoded/{cfg.encode.version()}", HOLDOUT))
    assert [r["key"] for r in rows] == [k for k in keys if k in eval_keys]
    assert all(r["t5"].shape[1] == 16 and r["caption"].startswith("caption ") for r in rows)


@pytest.mark.slow
def test_exact_resume_with_an_eval_slice(world):
    config, tmp, _ = world
    out = run_train(config, "--set", "train.run_name=resumed", "--resume", str(tmp / "root/checkpoints/t/step-00000004"),
                    env={"MUSE_TRACE": str(tmp / "resumed")})
    assert out.returncode == 0, out.stdout + out.stderr
    ref, got = read_trace(tmp / "plain"), read_trace(tmp / "resumed")
    assert sorted(got) == list(range(5, STEPS + 1))
    assert [(got[s]["keys"], got[s]["hash"]) for s in got] == [(ref[s]["keys"], ref[s]["hash"]) for s in got]
    # another slice would put held-out rows in the saved shuffle buffers: refused
    out = run_train(config, "--set", "train.run_name=other", "--set", "train.eval_holdout=0.1",
                    "--resume", str(tmp / "root/checkpoints/t/step-00000004"))
    assert out.returncode == 2 and "train.eval_holdout=0.25" in out.stderr, out.stderr


@pytest.mark.slow
def test_eval_every_writes_results_and_leaves_training_unchanged(world):
    config, tmp, log = world
    storage = Storage.from_config(load_config(config))
    ref, got = read_trace(tmp / "plain"), read_trace(tmp / "withevals")
    assert [(got[s]["keys"], got[s]["hash"]) for s in got] == [(ref[s]["keys"], ref[s]["hash"]) for s in ref]
    for step in (4, 8):
        rec = storage.read_json(f"checkpoints/withevals/eval/step-{step:08d}.json")
        assert rec["step"] == step and rec["checkpoint"] == "in-training weights"
        assert all(math.isfinite(v) for v in rec["metrics"].values()) and set(rec["metrics"]) == {"fid", "clip_score"}
    assert "step 4: eval fid" in log.stdout


@pytest.mark.slow
def test_eval_every_metrics_and_grid_go_to_tensorboard(world):
    config, tmp, _ = world
    storage = Storage.from_config(load_config(config))
    acc = read_tb(storage, "withevals", tmp)
    for name in ("fid", "clip_score"):
        points = acc.Scalars(f"eval/{name}")
        assert [p.step for p in points] == [4, 8], name
        for p in points:
            rec = storage.read_json(f"checkpoints/withevals/eval/step-{p.step:08d}.json")
            assert p.value == pytest.approx(rec["metrics"][name], rel=1e-6), name
    grids = acc.Images("eval/samples")
    assert [g.step for g in grids] == [4, 8]
    png = Image.open(io.BytesIO(storage.read_bytes("checkpoints/withevals/eval/step-00000008.png")))
    assert (grids[1].width, grids[1].height) == png.size
    from tensorboard.util import tensor_util

    caption = next(t for t in acc.Tags()["tensors"] if t.startswith("eval/samples/caption"))
    texts = [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(caption)]
    assert len(texts) == 2 and all(png.text["prompt"] in text for text in texts)
    assert [p.step for p in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_eval_every_failure_is_logged_not_fatal(world):
    config, tmp, _ = world
    out = run_train(config, "--set", "train.run_name=broken", "--set", "train.eval_every=4", "--set", "train.max_steps=4",
                    "--set", "eval.clip_model=/nonexistent/clip")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step 4: evaluation skipped (EvalError: eval.clip_model='/nonexistent/clip'" in out.stdout


@pytest.mark.slow
def test_muse_eval_end_to_end(world):
    config, tmp, _ = world
    cmd = [sys.executable, "-m", "muse.cli", "eval", "--config", str(config), "--max-samples", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    storage = Storage.from_config(load_config(config))
    rec = storage.read_json(f"checkpoints/t/eval/step-{STEPS:08d}.json")
    assert rec["checkpoint"] == storage.url(f"checkpoints/t/step-{STEPS:08d}")
    assert all(math.isfinite(v) for v in rec["metrics"].values())
    assert rec["metrics"]["fid"] > 0 and rec["metrics"]["clip_score"] >= 0
    eval_rows = [r for r in iter_eval_rows(storage, f"encoded/{load_config(config).encode.version()}", HOLDOUT)]
    real = [r for r in eval_rows if not r["replaced"]]
    assert rec["counts"]["samples"] == min(10, len(real))
    assert rec["settings"]["max_samples"] == 10 and rec["settings"]["fid_features"].endswith("features.pt2")
    png = Image.open(io.BytesIO(storage.read_bytes(f"checkpoints/t/eval/step-{STEPS:08d}.png")))
    n = rec["counts"]["samples"]
    cols = math.ceil(math.sqrt(n))
    assert png.size[0] == cols * 256 and png.size[1] > math.ceil(n / cols) * 256  # caption strips
    assert png.text["prompt"].split("\n") == [r["caption"] for r in real[:n]]
    assert json.loads(png.text["parameters"])["checkpoint"] == rec["checkpoint"]


@pytest.mark.slow
def test_extra_metrics_plug_in(world):
    config, tmp, _ = world
    cfg = load_config(config)
    seen = {}

    def count(images, captions):
        seen.update(shape=images.shape, dtype=images.dtype, n=len(captions))
        return {"adherence": 0.5}

    metrics = evaluate.run_eval(cfg, max_samples=4, metrics=[count])
    assert metrics["adherence"] == 0.5 and set(metrics) == {"fid", "clip_score", "adherence"}
    assert seen == {"shape": (4, 256, 256, 3), "dtype": np.uint8, "n": 4}


def test_the_library_has_no_demo_metric_and_eval_metrics_names_the_demos():
    """`muse eval` scores shapes adherence only where the config's eval.metrics names it: the
    pipeline never imports muse.testing (ARCHITECTURE.md), so a real run pays for no demo scorer;
    a process that evaluates the demo's config (`muse eval`, the trainer's ranks) imports it."""
    code = ("import sys, muse.evaluate, muse.sample, muse.cli, muse.preflight, muse.encode.shards; "
            "assert not [m for m in sys.modules if m.startswith('muse.testing')], 'imported muse.testing'; "
            "assert muse.evaluate.EXTRA_METRICS == []")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr

    from muse.testing import demo, shapes

    assert evaluate.configured_metrics(["muse.testing.demo:shapes_adherence"]) == [demo.shapes_adherence]
    rows = shapes.make_world(21, seed=1)
    images, captions = np.stack([r[0] for r in rows]), [r[1] for r in rows]
    assert demo.shapes_adherence(images, captions) == {"adherence_colour": 1.0, "adherence_shape": 1.0,
                                                       "adherence_both": 1.0}
    assert demo.shapes_adherence(images, ["a photograph of a fox"] * 21) == {}
    for spec, why in [("muse.nowhere:f", "No module named 'muse.nowhere'"), ("muse.testing.demo:nothing", "no attribute"),
                      ("muse.testing.demo:THREADS", "not a function")]:
        with pytest.raises(evaluate.EvalError, match=f"eval.metrics: {spec}.*{why}"):
            evaluate.configured_metrics([spec])
    with pytest.raises(ConfigError, match="eval.metrics: 'shapes_adherence' is not module:function"):
        load_config(None, ["source.paths=[x]", "eval.metrics=[shapes_adherence]"], data={})


def test_fid_is_zero_on_itself_and_grows_with_noise(models):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)  # (24, 64, 64, 3)
    fid = evaluate.make_fid(evaluate.fid_extractor(models["features"], None, "cpu"), "cpu")
    same = evaluate.frechet_distance(images, images.copy(), fid, batch_size=5)
    noisy = [evaluate.frechet_distance(images, np.clip(images + rng.normal(0, s, images.shape), 0, 255)
                                       .astype(np.uint8), fid) for s in (4, 16, 48, 128)]
    assert abs(same) < 1e-4 * noisy[0]
    assert noisy == sorted(noisy) and noisy[0] > 0
    with pytest.raises(evaluate.EvalError, match="at least 2"):
        evaluate.frechet_distance(images[:1], images, fid)


def test_clip_score_is_clamped_scaled_cosine(models):
    clip = evaluate.Clip(models["clip"], torch.device("cpu"))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    captions = ["a red fox in the snow", "a blue square", "two cats", "café crème", "a very long caption " * 30, ""]
    img, txt = clip.image_features(images), clip.text_features(captions)
    cos = (img * txt).sum(-1)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert clip.score(images, captions, batch_size=4) == pytest.approx(float((100 * cos).clamp(min=0).mean()), rel=1e-5)
    # the same model scored the torchmetrics way: processor + CLIPModel forward, logits_per_image / logit_scale
    inputs = clip.processor(text=captions, images=list(images), return_tensors="pt", padding=True, truncation=True,
                            max_length=77)
    with torch.inference_mode():
        out = clip.model(**inputs)
        ref = (out.logits_per_image.diagonal() / clip.model.logit_scale.exp() * 100).clamp(min=0).mean()
    assert clip.score(images, captions) == pytest.approx(float(ref), rel=1e-4, abs=1e-4)


def test_feature_and_inception_errors_are_one_line(models):
    with pytest.raises(evaluate.EvalError, match="expected inception, clip or an existing torch.export file"):
        evaluate.fid_extractor("/no/such/extractor.pt", None, "cpu")
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed here")
    except ImportError:
        pass
    with pytest.raises(evaluate.EvalError) as err:
        evaluate.make_fid(evaluate.fid_extractor("inception", None, "cpu"), "cpu")
    msg = str(err.value)
    assert "\n" not in msg and "pip install torch-fidelity" in msg and "eval.fid_features" in msg


def test_eval_without_a_slice_says_which_key(tmp_path):
    # the default keeps a slice (train.eval_holdout 0.001): no slice is a user's explicit 0
    cfg = load_config(tiny_config(tmp_path, str(tmp_path / "root"), eval_holdout=0))
    with pytest.raises(evaluate.EvalError, match="train.eval_holdout"):
        evaluate.eval_rows(cfg, Storage.from_config(cfg), 4)
    from muse.config import ConfigError

    with pytest.raises(ConfigError, match="train.eval_every needs an eval slice"):
        load_config(tiny_config(tmp_path, str(tmp_path / "root"), eval_holdout=0, eval_every=2))


@pytest.mark.slow
def test_results_json_is_plain_json(world):
    config, tmp, _ = world
    rec = json.loads((tmp / "root/checkpoints/withevals/eval/step-00000008.json").read_text())
    assert {"step", "checkpoint", "metrics", "counts", "settings", "seconds"} <= set(rec)


@pytest.mark.slow
def test_eval_flow_makes_a_metrics_table(world):
    import asyncio
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.evaluate import eval_flow

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-metrics"])))

    config, tmp, _ = world
    with prefect_test_harness(server_startup_timeout=120):
        metrics = eval_flow(str(config), ["eval.max_samples=4"], checkpoint=str(tmp / "root/checkpoints/t/step-00000004"))
        arts = asyncio.run(artifacts())
    assert set(metrics) == {"fid", "clip_score"}
    assert len(arts) == 1 and "fid" in str(arts[0].data) and "clip_score" in str(arts[0].data)
    assert (tmp / "root/checkpoints/t/eval/step-00000004.json").exists()
