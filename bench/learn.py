"""Does it learn? The demo's pipeline on the shapes world, timed per phase and scored.

Runs download -> encode -> train -> sample through `muse` itself (no Prefect) on the
demo's 1,200 pictures, then `muse.testing.demo.score`: every colour x shape prompt sampled at
guidance 1 and at the configured scale and judged by the deterministic shapes scorer.
Prints the phases' wall times, the VQ tokenizer's PSNR and codebook use, the adherence
table (training pairs and held-out pairs), and last the ratio of guided to unguided
adherence (both colour and shape right), the reference measured in the same run.

    python bench/learn.py                    # the demo's settings
    python bench/learn.py --set train.max_steps=600     # any pipeline override
    python bench/learn.py --seeds 3 --output /tmp/x  # seeds 0, 1, 2 of world + VQ + training:
                                             # each one's table, then the mean and worst of each number
For the first-run cost, point MUSE_CACHE at an empty folder: "prepare" then trains the VQ.
Targets (issue "It learns"): <= 5 min of training on 2 CPU cores, colour >= 95%,
shape >= 80%, guidance above scale 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# the demo's thread settings (flows/demo.py): read when torch loads, so before any import of it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from muse.testing import demo  # noqa: E402
from muse.cli import main as muse  # noqa: E402
from muse.config import load_config  # noqa: E402
from muse.testing.imageserver import ImageServer  # noqa: E402


def run(out: Path, overrides: list[str], seed: int = 0) -> dict:
    times = {}
    t = time.time()
    config, images = demo.prepare(out, seed=seed)
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


def report(r: dict) -> None:
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


def summary(runs: list[dict]) -> str:
    """Mean and worst over the seeds of every table number, and of the phase times (worst: slowest)."""
    lines = ["| guidance | pairs | colour mean / worst | shape mean / worst | both mean / worst |", "|---|---|---|---|---|"]
    for scale in runs[0]["results"]:
        for part in ("train_pairs", "held_out"):
            cells = []
            for k in ("colour", "shape", "both"):
                xs = [r["results"][scale][part][k] for r in runs]
                cells.append(f"{sum(xs) / len(xs):.0%} / {min(xs):.0%}")
            lines.append(f"| {scale:g} | {part} | " + " | ".join(cells) + " |")
    lines += ["", "| phase | seconds mean / slowest |", "|---|---|"]
    for k in runs[0]["times"]:
        xs = [r["times"][k] for r in runs]
        lines.append(f"| {k} | {sum(xs) / len(xs):.0f} / {max(xs):.0f} |")
    total = [sum(r["times"].values()) for r in runs]
    lines.append(f"| all | {sum(total) / len(total):.0f} / {max(total):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", default=None, help="keep the run(s) here (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (0: the demo itself)")
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed, one run each")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(demo.THREADS)  # encode and scoring, as flows/demo.py; the trainer has train.cpu_threads
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.output or tmp).resolve()
        for seed in range(args.seed, args.seed + args.seeds):
            # one folder per seed: another world is other pictures, shards and checkpoints
            out = root if args.seeds == 1 else root / f"seed-{seed}"
            print(f"\n## seed {seed} ({out})", flush=True)
            runs.append(run(out, args.overrides, seed))
            report(runs[-1])
    if len(runs) > 1:
        print(f"\n## seeds {args.seed}..{args.seed + args.seeds - 1}: mean / worst\n\n" + summary(runs))


if __name__ == "__main__":
    main()
