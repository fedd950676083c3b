"""The compose run: the demo's pipeline on the two-object world (`muse.testing.shapes2`), and its score.

The same steps and settings as the demo (`muse.testing.demo`: local image server, tiny T5, a VQ
trained on the world, `demo_overrides`) with what the compose world changes, listed in
`compose_overrides`: its pictures and VQ, the relation words as whole T5 tokens, its prompts, the
run's length. `bench/compose.py` runs it and prints `adherence_table`; `muse eval` on its config
scores the eval slice with `compose_adherence`.
"""

from __future__ import annotations

import json
from pathlib import Path

from muse.testing import demo, shapes2

ROWS = 2400
# the VQ trained on the compose world: the demo's (trained on one large object) blurs two small
# ones to 2% right on its own reconstructions; the demo's recipe on this world merged colours
# (purple into blue, 39% right); 1,000 + 600 decoder steps: 91% (bench/RESULTS.md "compose")
VQ = dict(world="shapes2", steps=1000, decoder_steps=600)
PER_PART = 120   # prompts scored per part (training scenes, held-out scenes: all 120) and guidance scale


def text_encoder(out_dir: Path) -> str:
    """The demo's tiny T5 with the relation words whole too ("left", "above", ...)."""
    return demo.text_encoder(out_dir, extra_words=shapes2.WORDS)


def score_prompts(per_part: int = PER_PART) -> list[str]:
    """per_part prompts of training scenes, then per_part of held-out scenes (distinct scenes, seeded)."""
    return shapes2.prompts(held=False)[:per_part] + shapes2.prompts(held=True)[:per_part]


def compose_overrides(quick: bool) -> list[str]:
    """What the compose run changes in `demo.demo_overrides` (applied after it, so these win)."""
    prompts = score_prompts(2 if quick else PER_PART)
    return ["train.run_name=compose", f"sample.prompts=[{', '.join(prompts)}]",
            f"sample.batch_size={len(prompts)}", "sample.out=samples/compose.png",
            "eval.metrics=[muse.testing.compose:compose_adherence]"]


def prepare(out: str | Path, quick: bool = False, rows: int | None = None, seed: int = 0,
            overrides: list[str] = ()) -> tuple[Path, Path]:
    """Images, encoders, config (without the URL list, which needs the server's port).

    -> (config path, images folder)."""
    from muse.config import load_config
    from muse.testing.shapes_vq import VQRecipe, shapes_vq
    from muse.testing.tiny import TEXT_DIM

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items = demo.make_images(out / "images", rows or (48 if quick else ROWS), seed=seed, world=shapes2.make_world)
    (out / "captions.json").write_text(json.dumps(items))
    vq_path, vq_stats = shapes_vq(VQRecipe(**demo.QUICK_VQ, **VQ) if quick else VQRecipe(**VQ))
    encoders = {"text_model": text_encoder(out / "encoders" / "t5"), "vq_model": vq_path,
                "codebook_size": vq_stats["codebook_size"], "text_dim": TEXT_DIM,
                **demo.eval_models(out / "encoders")}
    source = out / "source" / "urls.jsonl"
    source.parent.mkdir(exist_ok=True)
    sets = demo.demo_overrides(out, encoders, source, quick) + compose_overrides(quick) + list(overrides)
    cfg = load_config(None, sets, data={})
    path = out / "pipeline.yaml"
    path.write_text(cfg.to_yaml())
    return path, out / "images"


def compose_adherence(images, captions: list) -> dict:
    """A `muse eval` metric: all three right (both objects and the relation) on the compose world."""
    if not any(shapes2.parse_caption(c) for c in captions):
        return {}
    r = shapes2.adherence(images, captions)["all"]
    return {f"compose_{k}": v for k, v in r.items() if k != "n"}


def score(config_path: str | Path, per_part: int = PER_PART, scales: tuple = ()) -> dict:
    """Sample the score prompts at guidance 1, sample.guidance_scale and `scales`, judge each picture,
    print the table, write captioned grids and the numbers next to the samples."""
    from muse.config import load_config
    from muse.sample import load_models, make_grid, png_bytes, sample_images
    from muse.storage import Storage

    cfg = load_config(config_path)
    storage = Storage.from_config(cfg)
    prompts = score_prompts(per_part)
    models = load_models(cfg, storage)
    results = {}
    for scale in sorted({1.0, cfg.sample.guidance_scale, *scales}):
        images = sample_images(cfg, prompts, storage, guidance_scale=scale, models=models)
        results[scale] = shapes2.adherence(images, prompts)
        storage.write_bytes(f"samples/compose-g{scale:g}.png",
                            png_bytes(make_grid(images[:64], captions=prompts[:64]), {"prompt": "\n".join(prompts)}))
    print(adherence_table(results), flush=True)
    storage.write_json("samples/compose.json", {f"{k:g}": v for k, v in results.items()})
    return results


def adherence_table(results: dict) -> str:
    """{guidance scale: shapes2.adherence(...)} -> a fixed-width table."""
    lines = [f"{'guidance':>8} | {'scenes':<12} | {'n':>3} | {'first':>6} | {'second':>6} | {'relation':>8} | "
             f"{'all':>6}"]
    for scale, r in results.items():
        for part in ("train_scenes", "held_out"):
            x = r[part]
            lines.append(f"{scale:>8g} | {part:<12} | {x['n']:>3} | {x['first']:>6.0%} | {x['second']:>6.0%} | "
                         f"{x['relation']:>8.0%} | {x['all']:>6.0%}")
    return "\n".join(lines)
