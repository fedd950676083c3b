"""Compositional prompts: the demo's pipeline trained on the two-object world, timed and scored.

Runs download -> encode -> train -> sample through `muse` itself (no Prefect) on the compose
world (`muse.testing.shapes2`: "a red circle left of a blue square", "... above ..."), then
`muse.testing.compose.score`: prompts of training scenes and of held-out scenes (never in
training) sampled at guidance 1 and at the configured scale, judged by the deterministic
scorer (both objects' colour and shape, and the relation). Prints each phase's wall and CPU
seconds (this process and its children: the trainer's process time), the load average, the
VQ's stats and the table.

    python bench/compose.py                               # compose's settings (muse.testing.compose)
    python bench/compose.py --set train.max_steps=3000    # any pipeline override
    python bench/compose.py --scales 2 3                  # more guidance scales in the table
    python bench/compose.py --quick --rows 48             # a smoke run: a VQ of seconds, 40 steps
Goal (issue 29, item 4): all three right >= 70% after <= 15 minutes of CPU on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from muse.cli import main as muse
from muse.config import load_config
from muse.models import model_config
from muse.testing import compose, demo
from muse.testing.imageserver import ImageServer


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the trainer, when torchrun starts one)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(times: dict, name: str, fn):
    t, c = time.time(), cpu_seconds()
    out = fn()
    times[name] = (time.time() - t, cpu_seconds() - c)
    return out


def run(out: Path, overrides: list[str], rows: int, seed: int, scales: tuple, quick: bool = False) -> dict:
    times = {}
    config, images = timed(times, "prepare (world, T5, VQ)",
                           lambda: compose.prepare(out, quick, rows=rows, seed=seed, overrides=overrides))
    with ImageServer(images) as srv:
        demo.write_urls(out, srv.url())
        for phase in ("download", "encode", "train", "sample"):
            rc = timed(times, phase, lambda: muse([phase, "--config", str(config)]))
            if rc:
                raise SystemExit(f"muse {phase} failed with exit code {rc}")
    results = timed(times, "score", lambda: compose.score(config, 2 if quick else compose.PER_PART, scales))
    cfg = load_config(config)
    vq = json.loads((Path(cfg.encode.vq_model) / "stats.json").read_text())
    return {"times": times, "results": results, "vq": vq, "cfg": cfg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rows", type=int, default=compose.ROWS, help="training pictures")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed")
    ap.add_argument("--scales", type=float, nargs="*", default=[], help="guidance scales beside 1 and the config's")
    ap.add_argument("--quick", action="store_true", help="the tests' subset: a VQ of seconds, 40 steps (a smoke run)")
    ap.add_argument("--output", default=None, help="keep the run here (default: a temp dir)")
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(args.output or tmp).resolve(), args.overrides, args.rows, args.seed, tuple(args.scales),
                args.quick)
    print(f"\nload average (1, 5, 15 min) at the start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| phase | wall s | CPU s |\n|---|---|---|")
    for k, (wall, cpu) in r["times"].items():
        print(f"| {k} | {wall:.0f} | {cpu:.0f} |")
    vq, cfg = r["vq"], r["cfg"]
    print(f"\nVQ tokenizer: PSNR {vq['psnr']} dB, {vq['codes_used']}/{vq['codebook_size']} codes used, trained "
          f"{vq['seconds']} s (cached per machine); all three right on its reconstructions "
          f"{vq.get('recon_all', float('nan')):.0%} (the ceiling)")
    m = model_config(cfg.model)
    print(f"model: preset {cfg.model.preset}, hidden {m.hidden_size}, depth {m.depth}, heads {m.num_heads}, "
          f"downsample {m.downsample}; {cfg.train.max_steps} steps of batch {cfg.train.batch_size}, "
          f"lr {cfg.train.lr:g}, {args.rows} rows, {cfg.encode.text_max_length} text tokens\n")
    print(compose.adherence_table(r["results"]))


if __name__ == "__main__":
    main()
