"""The demo: the whole pipeline on a world small enough to learn on a CPU, ending with a score.

- 1,200 pictures of coloured shapes with captions (`muse.testing.shapes`), plus two rows
  that must fail (a 404 and a `file://` URL) to show the replacement path;
- a threaded HTTP server on 127.0.0.1 serving them (`muse.testing.imageserver`; LAION URLs are
  unreachable here), on port `PORT` when it is free so the URL list stays the same between runs;
- a tiny T5 built on the spot and a VQ tokenizer trained on the world (`muse.testing.shapes_vq`,
  cached per machine), both loaded through the real code path; a tiny CLIP and FID feature
  extractor for `muse eval` (random weights: offline, so FID and CLIP score only compare runs);
- a pipeline config: the config's defaults (what `pipeline.yaml` lists) with the one list of
  overrides in `demo_overrides`, written resolved to `<output>/pipeline.yaml`;
- `score(config)`: every colour x shape prompt sampled at guidance 1 and at the configured
  scale, judged by the shapes scorer, printed as an adherence table, saved as captioned grids;
- `shapes_adherence`: the same scorer as a `muse eval` metric, named in the config's
  `eval.metrics`, so `muse eval` and the in-training evaluations (`train.eval_every`) import it
  and the library itself never imports this package;
- `THREADS`: every torch computation of the demo (encode, training, scoring; the VQ has its
  recipe's `threads`) on a fixed number of threads, so the table is the same on any machine with
  the same package versions.
`flows/demo.py` runs the Prefect pipeline on it; `run_library(...)` does the same without Prefect.
`quick=True` is the same on 48 rows with a VQ trained for seconds (the tests' subset).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from PIL import Image

from muse.testing import shapes

ROWS = 1200
PORT = 8765   # the demo's image server; any free port when it is taken
QUICK_VQ = dict(images=128, steps=200, decoder_steps=20, batch_size=16)
# T5 tokens kept per caption: the world's longest caption is 16 tokens with its colour and shape
# words whole (`text_encoder`); 32 leaves room. (At 16 with those words in pieces, 21 tokens,
# "a picture of a yellow ..." lost its shape word.)
TEXT_MAX_LENGTH = 32
# torch threads of the demo's process and its trainer: CPU sums depend on the thread count, not on the
# cores, so a fixed count is the same table on any machine (2 threads gave the same weights on one
# core, `taskset -c 0`, as on two). 2, not 1: ~1.9x the training samples/s on a quiet 2-core machine,
# which the 8-minute budget needs; the cost of 2 threads on a busy or 1-core machine (OpenMP threads
# spinning while they wait on a descheduled peer, 8x slower) is removed by OMP_WAIT_POLICY=PASSIVE,
# which flows/demo.py sets (bench/threads.py, bench/RESULTS.md "demo threads")
THREADS = 2
# rows kept out of training for `muse eval` (~60 of 1,200): a fraction encode counts (layout.EVAL_LEVELS)
EVAL_HOLDOUT = 0.05


def text_encoder(out_dir: Path, extra_words: tuple[str, ...] = ()) -> str:
    """The tiny T5, with each colour and shape word one token: the model's cross-attention then
    finds "triangle" in one place instead of spread over 3 pieces shared with other words.

    Built once per output folder: the tokenizer's training is not bit-for-bit repeatable (its
    scores differ in the last digits), and a rebuilt T5 at the same path is other weights to
    the dataset's encoder fingerprint, which then refuses the shards a re-run adds.
    `extra_words`: more words kept whole (the compose world's relations)."""
    from muse.testing.tiny import build_tiny_t5

    if (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists():
        return str(out_dir)
    return build_tiny_t5(out_dir, words=tuple(shapes.COLOURS) + tuple(shapes.SHAPES) + tuple(extra_words))


def make_images(folder: Path, n: int, seed: int = 0, world=shapes.make_world) -> list[tuple[str, str]]:
    """Write n PNGs of the shapes world (or of `world`, a make_world like shapes2's); -> [(file name, caption)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (img, caption) in enumerate(world(n, seed=seed)):
        name = f"{i:05d}.png"
        if not (folder / name).exists():
            Image.fromarray(img).save(folder / name)
        out.append((name, caption))
    return out


def write_source(path: Path, base_url: str, items: list[tuple[str, str]]) -> int:
    rows = [{"url": f"{base_url}/{name}", "caption": caption, "sample_id": i} for i, (name, caption) in enumerate(items)]
    rows.append({"url": f"{base_url}/missing.jpg", "caption": "a picture that is gone (404)", "sample_id": len(rows)})
    rows.append({"url": "file:///etc/hostname", "caption": "not an http URL", "sample_id": len(rows)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # unchanged file: the download skips it
        path.write_text(text)
    return len(rows)


def demo_overrides(out: Path, encoders: dict, source: Path, quick: bool, seed: int = 0) -> list[str]:
    """The demo's settings as `--set` overrides of the config's defaults: one list, read top to bottom.

    `quick` (the tests' subset) changes four: shards of 25 rows, 40 steps, two prompts, an
    evaluation at the end only."""
    prompts = shapes.all_prompts()[:2] if quick else shapes.all_prompts()
    sets = [f"storage.root={out / 'data'}", f"storage.work_dir={out / 'work'}",
            f"source.paths=[{source}]", "source.url_column=url", "source.caption_column=caption",
            "source.format=jsonl",
            "download.image_size=64", "download.processes=1", "download.threads=16",
            f"download.shard_size={25 if quick else 250}",
            "download.timeout_s=3", "download.retries=0", "download.deadline_s=300",
            f"encode.text_model={encoders['text_model']}", f"encode.vq_model={encoders['vq_model']}",
            "encode.vq_subfolder=null", "encode.vq_format=diffusers", f"encode.text_max_length={TEXT_MAX_LENGTH}",
            "encode.batch_size=64", "encode.row_group_size=64", "encode.device=cpu",
            "model.preset=demo",
            f"model.codebook_size={encoders['codebook_size']}", f"model.text_dim={encoders['text_dim']}",
            # the demo preset merges 2x2 tokens per position (model.downsample): fast enough on 2 cores
            # that 2,500 steps learn the stars and the first run, VQ training included, fits 8 minutes
            # (measured: bench/RESULTS.md, "2026-12-02 14:35-15:36Z, "it learns": 2x2 merged tokens")
            f"train.seed={seed}", f"sample.seed={seed}", f"eval.seed={seed}",
            "train.run_name=demo", f"train.batch_size={16 if quick else 32}", "train.grad_accum=1",
            f"train.max_steps={40 if quick else 2500}", "train.warmup_steps=50", "train.lr=3e-3",
            "train.weight_decay=0.0", "train.label_smoothing=0.0", "train.num_workers=0",
            "train.shuffle_buffer=256", "train.loader_streams=1", "train.checkpoint_every=1000",
            "train.log_every=50", "train.nproc_per_node=1", "train.device=cpu", "train.mixed_precision=false",
            f"train.cpu_threads={THREADS}", f"train.eval_holdout={EVAL_HOLDOUT}",
            f"train.eval_every={40 if quick else 500}",  # <= 32 eval rows each, curves in TensorBoard (eval/*)
            f"sample.prompts=[{', '.join(prompts)}]", "sample.steps=16",
            # guidance 1.5: the most pictures with colour and shape right; 4 puts specks in the shapes,
            # 2 costs colour, a linear ramp to 2 gains less (the same RESULTS.md entry)
            "sample.guidance_scale=1.5",
            # choice temperature 1 (was 4.5): more colours right, shapes the same (bench/RESULTS.md,
            # "2026-12-02 (03:00-03:40Z), "it learns": what shape misses, sampler settings")
            "sample.temperature=1.0", "sample.out=samples/demo.png", "sample.device=cpu",
            # every prompt of `score` (96) in one batch, as bench/RESULTS.md measured the table: a
            # smaller batch draws other pictures from the one generator (and CPU memory is no limit)
            f"sample.batch_size={len(shapes.all_prompts(4))}",
            # `muse eval`: the decoding of the table above, the local tiny CLIP and feature extractor
            f"eval.clip_model={encoders['clip_model']}", f"eval.fid_features={encoders['fid_features']}",
            "eval.metrics=[muse.testing.demo:shapes_adherence]", "eval.max_samples=64", "eval.steps=16",
            "eval.guidance_scale=1.5", "eval.temperature=1.0", "eval.batch_size=64", "eval.device=cpu"]
    return sets


def shapes_adherence(images, captions: list) -> dict:
    """A `muse eval` metric: prompt adherence on the shapes world; nothing for captions it cannot read."""
    if not any(shapes.parse_caption(c) for c in captions):
        return {}
    r = shapes.adherence(images, captions)["all"]
    return {f"adherence_{k}": v for k, v in r.items() if k != "n"}


def prepare(out: str | Path, quick: bool = False, rows: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Images, encoders, config (without the URL list, which needs the server's port).

    `seed` draws another demo: the world's pictures, the VQ (its own world and draws) and the
    training and sampling; 0 is the demo. -> (config path, images folder)."""
    from muse.config import load_config
    from muse.testing.shapes_vq import VQRecipe, shapes_vq
    from muse.testing.tiny import TEXT_DIM

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items = make_images(out / "images", rows or (48 if quick else ROWS), seed=seed)
    (out / "captions.json").write_text(json.dumps(items))
    recipe = VQRecipe(**QUICK_VQ) if quick else VQRecipe()
    if seed:   # the VQ's world and draws follow the seed too (0: the recipe's own, the cached demo VQ)
        recipe = replace(recipe, world_seed=recipe.world_seed + seed, seed=recipe.seed + seed)
    vq_path, vq_stats = shapes_vq(recipe)
    encoders = {"text_model": text_encoder(out / "encoders" / "t5"), "vq_model": vq_path,
                "codebook_size": vq_stats["codebook_size"], "text_dim": TEXT_DIM, **eval_models(out / "encoders")}
    source = out / "source" / "urls.jsonl"
    source.parent.mkdir(exist_ok=True)
    # from the defaults, not the repo's pipeline.yaml (the same values, checked by a test):
    # an installed package has no repo, and the config is validated before anything runs
    cfg = load_config(None, demo_overrides(out, encoders, source, quick, seed), data={})
    path = out / "pipeline.yaml"
    path.write_text(cfg.to_yaml())
    return path, out / "images"


def eval_models(folder: Path) -> dict:
    """The tiny CLIP and FID feature extractor of `muse eval` (random, seeded), built once per folder."""
    from muse.testing.tiny import build_tiny_clip, build_tiny_fid_features

    clip, features = folder / "clip", folder / "fid-features.pt2"
    if not (clip / "model.safetensors").exists():  # written last
        build_tiny_clip(clip)
    if not features.exists():
        build_tiny_fid_features(features)
    return {"clip_model": str(clip), "fid_features": str(features)}


def write_urls(out: str | Path, base_url: str) -> int:
    out = Path(out).resolve()
    items = [tuple(x) for x in json.loads((out / "captions.json").read_text())]
    return write_source(out / "source" / "urls.jsonl", base_url, items)


def run_library(config_path: str | Path) -> None:
    """download -> encode -> train -> sample without Prefect (what `muse run` does)."""
    from muse.cli import main

    rc = main(["run", "--config", str(config_path)])
    if rc:
        raise SystemExit(rc)


def score(config_path: str | Path, per_pair: int = 4) -> dict:
    """Sample every colour x shape prompt `per_pair` times at guidance 1 and at sample.guidance_scale,
    judge each picture, print the adherence table, write captioned grids next to the samples."""
    from muse.config import load_config
    from muse.sample import load_models, make_grid, png_bytes, sample_images
    from muse.storage import Storage

    cfg = load_config(config_path)
    storage = Storage.from_config(cfg)
    prompts = shapes.all_prompts(per_pair)
    models = load_models(cfg, storage)
    results = {}
    for scale in sorted({1.0, cfg.sample.guidance_scale}):
        images = sample_images(cfg, prompts, storage, guidance_scale=scale, models=models)
        results[scale] = shapes.adherence(images, prompts)
        storage.write_bytes(f"samples/adherence-g{scale:g}.png",
                            png_bytes(make_grid(images, captions=prompts), {"prompt": "\n".join(prompts)}))
    print(adherence_table(results), flush=True)
    storage.write_json("samples/adherence.json", {f"{k:g}": v for k, v in results.items()})
    return results


def adherence_table(results: dict) -> str:
    """{guidance scale: shapes.adherence(...)} -> a fixed-width table."""
    lines = [f"{'guidance':>8} | {'pairs':<10} | {'n':>3} | {'colour':>6} | {'shape':>6} | {'both':>6}"]
    for scale, r in results.items():
        for part in ("train_pairs", "held_out"):
            x = r[part]
            lines.append(f"{scale:>8g} | {part:<10} | {x['n']:>3} | {x['colour']:>6.0%} | {x['shape']:>6.0%} | "
                         f"{x['both']:>6.0%}")
    return "\n".join(lines)
