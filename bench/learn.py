"""Does it learn? The demo's pipeline on the shapes world, timed per phase and scored.

Runs download -> encode -> train -> sample through `muse` itself (no Prefect) on the
demo's 1,200 pictures, then `muse.testing.demo.score`: every colour x shape prompt sampled at
guidance 1 and at the configured scale and judged by the deterministic shapes scorer.
Prints the phases' wall times, the VQ tokenizer's PSNR and codebook use, the adherence
table (training pairs and held-out pairs), and last the ratio of guided to unguided
adherence (both colour and shape right), the reference measured in the same run.

    python bench/learn.py                    # the demo's settings
    python bench/learn.py --set train.max_steps=600     # any pipeline override
Targets (issue "It learns"): <= 5 min of training on 2 CPU cores, colour >= 95%,
shape >= 80%, guidance above scale 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from muse.testing import demo
from muse.cli import main as muse
from muse.config import load_config
from muse.testing.imageserver import ImageServer


def run(out: Path, overrides: list[str]) -> dict:
    times = {}
    t = time.time()
    config, images = demo.prepare(out)
    times["prepare (world, T5, VQ)"] = time.time() - t
    with ImageServer(images) as srv:
        demo.write_urls(out, srv.url())
        for phase in ("download", "encode", "train", "sample"):
            t = time.time()
            rc = muse([phase, "--config", str(config)] + [a for o in overrides for a in ("--set", o)])
            if rc:
                raise SystemExit(f"muse {phase} failed with exit code {rc}")
            times[phase] = time.time() - t
    t = time.time()
    results = demo.score(config)
    times["score"] = time.time() - t
    cfg = load_config(config, overrides)
    vq = json.loads((Path(cfg.encode.vq_model) / "stats.json").read_text())
    return {"times": times, "results": results, "vq": vq, "max_steps": cfg.train.max_steps,
            "guidance_scale": cfg.sample.guidance_scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", default=None, help="keep the run here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(args.output or tmp).resolve(), args.overrides)
    print("\n| phase | seconds |\n|---|---|")
    for k, v in r["times"].items():
        print(f"| {k} | {v:.0f} |")
    vq = r["vq"]
    print(f"\nVQ tokenizer: PSNR {vq['psnr']} dB, {vq['codes_used']}/{vq['codebook_size']} codes used, "
          f"trained {vq['seconds']} s (cached per machine); the scorer on its reconstructions: colour "
          f"{vq.get('recon_colour', float('nan')):.0%}, shape {vq.get('recon_shape', float('nan')):.0%} (the ceiling)")
    print(f"training: {r['max_steps']} steps in {r['times']['train'] / 60:.1f} min (incl. torchrun start)\n")
    print(demo.adherence_table(r["results"]))
    one, guided = r["results"][1.0]["train_pairs"]["both"], r["results"][r["guidance_scale"]]["train_pairs"]["both"]
    print(f"\nadherence (both) at guidance {r['guidance_scale']:g} / at guidance 1: "
          f"{guided:.2f} / {one:.2f} = ratio {guided / max(one, 1e-9):.2f}")


if __name__ == "__main__":
    main()
