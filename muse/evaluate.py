"""`muse eval`: how good are a checkpoint's pictures, on rows training never saw.

The eval slice is `train.eval_holdout` of the encoded rows, chosen by a hash of the row key
(`muse.layout.in_eval_slice`); the trainer skips it. For up to `eval.max_samples` of its rows
(placeholders of failed downloads excluded) this module

1. generates a picture from the row's stored T5 embedding (the very caption embedding the
   model would have trained on; no text encoder is loaded) with `muse.sample`'s decoding,
   `eval.steps` steps at `eval.guidance_scale`, seeded by `eval.seed`;
2. reads the row's real image from the phase-1 shard with the same id (`images/NNNNN.parquet`),
   resized to the generated size;
3. scores them:
   - `fid`: Frechet distance between features of real and generated pictures (torchmetrics
     `FrechetInceptionDistance` with the extractor of `eval.fid_features`);
   - `clip_score`: mean over rows of max(100 x cos(CLIP image, CLIP caption), 0), as
     torchmetrics' CLIPScore, with `eval.clip_model` (transformers `CLIPModel`);
   - whatever the functions of `eval.metrics` (module:function, imported here) and those
     registered in `EXTRA_METRICS` (`register_metric`) return.
4. writes `checkpoints/<run>/eval/step-NNNNNNNN.json` (metrics, counts, settings, checkpoint)
   and `step-NNNNNNNN.png` (a grid of the first 16 pictures, each caption under its picture and
   in the PNG's `prompt` chunk, the settings in its `parameters` chunk) on the storage root.

FID on a few hundred rows is biased upwards and only comparable between evaluations with the
same `max_samples`, extractor and slice; use it to compare checkpoints of one setup.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

import numpy as np
import torch

from muse import checkpoint
from muse.config import PipelineConfig, resolve_device
from muse.data import iter_eval_rows
from muse.layout import (dataset_dir, empty_caption, eval_results, open_shard, read_manifest, read_problem, shard_name,
                         step_of)
from muse.sample import SamplingModels, generate_images, load_checkpoint_model, load_decoder, make_grid, png_bytes
from muse.storage import Storage

IN_TRAINING_SAMPLES = 32  # the cap of `train.eval_every` evaluations: a few dozen rows, seconds on a GPU
GRID_IMAGES = 16

# Extra metrics: each gets the generated pictures, uint8 [B, H, W, 3], and their captions, and
# returns {name: float}; the results are merged into the metrics. The library has none of its
# own: a config names them in `eval.metrics` (the demo's shapes-adherence scorer,
# muse.testing.demo:shapes_adherence), which every process that evaluates imports (`muse eval`
# and the trainer's ranks alike); a caller may also `register_metric` (this process only) or
# pass `metrics=` to run_eval.
MetricFn = Callable[[np.ndarray, list], dict]

EXTRA_METRICS: list[MetricFn] = []


def register_metric(fn: MetricFn) -> MetricFn:
    """Add `fn` to every later `run_eval` of this process (once; usable as a decorator)."""
    if fn not in EXTRA_METRICS:
        EXTRA_METRICS.append(fn)
    return fn


class EvalError(RuntimeError):
    """Evaluation cannot run; the message says which key or file to change."""


def configured_metrics(specs: list[str]) -> list[MetricFn]:
    """`eval.metrics` (module:function each) -> the functions; EvalError naming the key otherwise."""
    import importlib

    fns = []
    for spec in specs:
        module, name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"eval.metrics: {spec} cannot be loaded ({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise EvalError(f"eval.metrics: {spec} is not a function")
        fns.append(fn)
    return fns


# ----------------------------------------------------------------------------- CLIP score

class Clip:
    """transformers `CLIPModel` + `CLIPProcessor` from a hub id or a local folder."""

    def __init__(self, name_or_path: str, device):
        from transformers import CLIPModel, CLIPProcessor

        from muse.hub import HubUnavailable, hub_kwargs

        try:
            hub = hub_kwargs(name_or_path, "eval.clip_model")  # no minute of hub retries when offline
        except HubUnavailable as e:
            raise EvalError(str(e)) from None
        try:
            self.model = CLIPModel.from_pretrained(name_or_path, **hub).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path, **hub)
        except OSError as e:
            raise EvalError(f"eval.clip_model={name_or_path!r} cannot be loaded ({str(e).splitlines()[0]}); "
                            "give a local folder saved with CLIPModel/CLIPProcessor.save_pretrained, "
                            "or a hub id where the hub is reachable") from None
        self.device = device
        self.max_length = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 / 4

    @torch.inference_mode()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> unit-norm image embeddings [B, D]."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return torch.nn.functional.normalize(self._pooled(self.model.get_image_features(pixel_values=pixels)).float(),
                                             dim=-1)

    @torch.inference_mode()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """captions -> unit-norm text embeddings [B, D] (truncated to CLIP's context)."""
        tok = self.processor.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return torch.nn.functional.normalize(self._pooled(out).float(), dim=-1)

    def score(self, images: np.ndarray, captions: list[str], batch_size: int = 32) -> float:
        """Mean of max(100 x cos(image, caption), 0) over the rows (torchmetrics' CLIPScore)."""
        scores = []
        for i in range(0, len(images), batch_size):
            img = self.image_features(images[i:i + batch_size])
            txt = self.text_features(captions[i:i + batch_size])
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return float(torch.cat(scores).mean())


class ClipImageFeatures(torch.nn.Module):
    """CLIP image embeddings as an FID feature extractor: uint8 [B, 3, H, W] -> [B, D]."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(x.permute(0, 2, 3, 1).cpu().numpy())


# ----------------------------------------------------------------------------- FID

def fid_extractor(spec: str, clip: Callable[[], Clip], device):
    """`eval.fid_features` -> an nn.Module uint8 [B, 3, H, W] -> [B, D], or 2048 for torch-fidelity's
    InceptionV3 (the standard FID; loaded lazily by torchmetrics). `clip` builds the CLIP model on demand."""
    from pathlib import Path

    if spec == "inception":
        return 2048
    if spec == "clip":
        return ClipImageFeatures(clip())
    if Path(spec).is_file():
        try:
            return torch.export.load(spec).module().to(device)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise EvalError(f"eval.fid_features={spec}: not a torch.export program "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise EvalError(f"eval.fid_features={spec!r}: expected inception, clip or an existing torch.export file "
                    "(torch.export.save of a module mapping uint8 [B,3,H,W] to features [B,D], dynamic B/H/W)")


def make_fid(feature, device):
    """torchmetrics' FrechetInceptionDistance over `feature`; one-line error when Inception is unavailable."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=False)
    except Exception as e:  # noqa: BLE001 - torch-fidelity missing, or its weights not downloadable
        if feature != 2048:
            raise
        raise EvalError("eval.fid_features=inception needs torch-fidelity and its InceptionV3 weights "
                        "(pip install torch-fidelity with the torchvision build of your torch; the weights "
                        f"download on first use) [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]; "
                        "or set eval.fid_features to clip or to a local torch.export extractor") from None
    return metric.to(device)


def frechet_distance(real: np.ndarray, fake: np.ndarray, metric, batch_size: int = 32) -> float:
    """FID between two uint8 [N, H, W, 3] sets (>= 2 each) through a `make_fid` metric."""
    if len(real) < 2 or len(fake) < 2:
        raise EvalError(f"FID needs at least 2 pictures per side (got {len(real)} real, {len(fake)} generated): "
                        "raise eval.max_samples or train.eval_holdout")
    metric.reset()
    with torch.inference_mode():
        for images, is_real in ((real, True), (fake, False)):
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
                metric.update(x.to(metric.device), real=is_real)
        return float(metric.compute())


# ----------------------------------------------------------------------------- the slice

def _check_slice(cfg: PipelineConfig) -> None:
    if not cfg.train.eval_holdout:
        raise EvalError("no eval slice: set train.eval_holdout (e.g. 0.01) before training, so the trainer "
                        "keeps those rows out")


def eval_rows(cfg: PipelineConfig, storage: Storage, max_samples: int) -> tuple[list[dict], int]:
    """Up to max_samples non-placeholder rows of the eval slice, and how many placeholders were passed."""
    _check_slice(cfg)
    rows, skipped = [], 0
    for row in iter_eval_rows(storage, dataset_dir(cfg), cfg.train.eval_holdout):
        if row["replaced"]:
            skipped += 1
            continue
        rows.append(row)
        if len(rows) == max_samples:
            break
    if not rows:
        raise EvalError(f"the eval slice (train.eval_holdout={cfg.train.eval_holdout}) of "
                        f"{dataset_dir(cfg)} has no real picture; raise train.eval_holdout")
    return rows, skipped


def real_images(storage: Storage, rows: list[dict], size: int) -> np.ndarray:
    """The rows' phase-1 images, decoded RGB and resized to size x size: from the image shard each
    row was encoded from (`source`: the generation its encoded shard's record names; a row without
    one, the shard id's generation 0), so the real picture is the one its tokens describe."""
    import pyarrow as pa

    from muse.pictures import decode_picture

    out: dict[str, np.ndarray] = {}
    source = {r["key"]: r.get("source") or shard_name("images", r["shard_id"]) for r in rows}
    for rel in sorted(set(source.values())):
        if not storage.exists(rel):
            raise EvalError(f"{storage.url(rel)} is missing: the eval slice's real images come from the "
                            "phase-1 shards (run `muse download`, or keep them next to the encoded data)")
        wanted = {k for k, src in source.items() if src == rel}
        try:
            with storage.open(rel) as f:  # page checksums verified: a changed byte is named
                table = open_shard(f).read(columns=["key", "image"])
        except (OSError, pa.ArrowException) as e:
            raise EvalError(f"{storage.url(rel)}: image shard {read_problem(e)}; re-run `muse download` "
                            "to rebuild it") from None
        for key, jpeg in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            if key in wanted:
                out[key] = decode_picture(jpeg, size)
    missing = [r["key"] for r in rows if r["key"] not in out]
    if missing:
        raise EvalError(f"{len(missing)} eval rows have no image in images/ (e.g. key {missing[0]}): "
                        "the encoded data does not belong to these image shards")
    return np.stack([out[r["key"]] for r in rows])


# ----------------------------------------------------------------------------- muse eval

def run_eval(cfg: PipelineConfig, checkpoint_ref: str | None = None, max_samples: int | None = None,
             model=None, step: int | None = None, device=None, metrics: list[MetricFn] | None = None) -> dict:
    """`muse eval`: generate for the eval slice, score, write checkpoints/<run>/eval/step-N.json.

    `checkpoint_ref`: a checkpoint dir (local folder, or path/URL under the root); default the
    latest of train.run_name. The trainer passes its in-memory `model`, `step` and `device`
    instead. Returns the metrics dict ({"fid", "clip_score", + extra metrics}).
    """
    t0 = time.time()
    eval_cfg, run = cfg.eval, cfg.train.run_name
    if cfg.model.kind != "base":
        raise EvalError("muse eval covers the base model (model.kind=base); evaluate the superres model "
                        "through the base run that feeds it")
    _check_slice(cfg)
    storage = Storage.from_config(cfg)
    device = torch.device(device) if device is not None else resolve_device(eval_cfg.device)
    max_samples = max_samples or eval_cfg.max_samples
    if model is None:
        model, step, where = _load_checkpoint(storage, checkpoint_ref, run, step, eval_cfg.use_ema)
    else:
        where = "in-training weights"
    was_training = model.training
    model = model.to(device).eval()

    clip_cache: list[Clip] = []

    def clip() -> Clip:
        if not clip_cache:
            clip_cache.append(Clip(eval_cfg.clip_model, device))
        return clip_cache[0]

    extra = configured_metrics(eval_cfg.metrics)  # fail before generating
    fid = make_fid(fid_extractor(eval_cfg.fid_features, clip, device), device)
    clip()
    rows, skipped = eval_rows(cfg, storage, max_samples)
    manifest = read_manifest(storage, dataset_dir(cfg))
    vq = load_decoder(cfg.encode, device)
    try:
        fake = generate_images(SamplingModels(None, model, None, vq), [r["t5"] for r in rows],
                               empty_caption(manifest), eval_cfg, device, eval_cfg.batch_size)
    finally:
        model.train(was_training)
    real = real_images(storage, rows, fake.shape[1])
    captions = [r["caption"] for r in rows]
    result = {"fid": frechet_distance(real, fake, fid, eval_cfg.batch_size),
              "clip_score": clip().score(fake, captions, eval_cfg.batch_size)}
    for fn in dict.fromkeys(extra + EXTRA_METRICS + list(metrics or [])):  # each once
        result.update({k: float(v) for k, v in fn(fake, captions).items()})

    record = {"step": step, "checkpoint": where, "metrics": result,
              "counts": {"samples": len(rows), "skipped_replaced": skipped, "max_samples": max_samples},
              "settings": {**eval_cfg.model_dump(mode="json"), "max_samples": max_samples,
                           "eval_holdout": cfg.train.eval_holdout, "dataset": dataset_dir(cfg),
                           "device": str(device)},
              "seconds": round(time.time() - t0, 2)}
    _write_results(storage, run, record, fake, captions)
    return result


def _load_checkpoint(storage: Storage, checkpoint_ref: str | None, run: str, step: int | None,
                     use_ema: bool):
    """-> (model, step, where): `where` is the checkpoint's URL, recorded with the results."""
    where = checkpoint_ref or checkpoint.latest(storage, run)
    model = load_checkpoint_model(storage, checkpoint_ref, run, use_ema)  # says "no checkpoint" when there is none
    step = step_of(where) if step is None else step
    rel = storage.relative(where)
    return model, step, (storage.url(rel) if rel is not None else where)


def _write_results(storage: Storage, run: str, record: dict, fake: np.ndarray, captions: list[str]) -> None:
    """checkpoints/<run>/eval/step-N.json + a captioned grid .png (text chunks like a sample's)."""
    step, where, result = record["step"], record["checkpoint"], record["metrics"]
    rel = eval_results(run, step if step is not None else re.sub(r"[^\w.-]", "_", where.rstrip("/").rsplit("/", 1)[-1]))
    name = rel.rsplit("/", 1)[1]
    storage.write_json(f"{rel}.json", record)
    shown = captions[:GRID_IMAGES]  # like a sample grid: captions under the pictures and in the text chunks
    text = {"prompt": "\n".join(shown),
            "parameters": json.dumps({"checkpoint": where, "step": step, **record["settings"]})}
    storage.write_bytes(f"{rel}.png", png_bytes(make_grid(fake[:GRID_IMAGES], captions=shown), text))
    print(f"eval {name}: " + " | ".join(f"{k} {v:.4g}" for k, v in result.items())
          + f" ({len(captions)} rows) -> {storage.url(rel + '.json')}", flush=True)


__all__ = ["run_eval", "EXTRA_METRICS", "register_metric", "configured_metrics", "EvalError", "Clip", "fid_extractor", "make_fid",
           "frechet_distance", "IN_TRAINING_SAMPLES"]
