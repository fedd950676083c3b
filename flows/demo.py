"""The README's main job: the whole pipeline on a tiny bundled subset, offline, on CPU.

    python -m flows.demo --output demo-output            # Prefect pipeline flow (temporary local server)
    python -m flows.demo --output demo-output --no-prefect   # the same through `muse run`

Makes 1,200 coloured-shape pictures and serves them on 127.0.0.1, builds a tiny T5 and
trains a VQ tokenizer on the shapes (once per machine), writes `<output>/pipeline.yaml`,
runs download -> encode -> train (evaluating every 500 steps) -> sample, then scores every
colour x shape prompt (`muse.testing.demo.score`) and prints the adherence table and where
everything is. Everything runs on `demo.THREADS` torch threads: the same table on any machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the demo's fixed torch thread count (demo.THREADS) may exceed the free cores (a busy or 1-core
# machine): threads that sleep while they wait, rather than spin, keep that from costing 8x
# (bench/RESULTS.md, "demo threads"). Read when torch loads, so set before it; the trainer inherits it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ...but a short spin first (torch's libgomp; other OpenMP runtimes ignore it): a thread that sleeps
# at once pays a wake-up per parallel region, 22% of a quiet machine's training step; 20,000 spins
# cost nothing measurable on one core or on busy ones (bench/RESULTS.md, "wait policy")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
# the temporary server's first start (database set-up) can pass Prefect's 20 s on 2 busy cores
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv=None) -> int:
    from muse.testing import demo
    from muse.testing.imageserver import ImageServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="demo-output")
    ap.add_argument("--no-prefect", action="store_true", help="run the library directly (muse run)")
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch

    torch.set_num_threads(demo.THREADS)  # encode and scoring here; the trainer has train.cpu_threads
    config, images = demo.prepare(args.output)
    with ImageServer(images, port=demo.PORT) as srv:
        url = srv.url()
        rows = demo.write_urls(args.output, url)
        print(f"demo: {rows} URLs served from {url}; config {config}", flush=True)
        if args.no_prefect:
            demo.run_library(config)
        else:
            from flows.pipeline import pipeline_flow

            pipeline_flow(str(config), [])
    print("\nprompt adherence (muse.testing.shapes scorer; held-out pairs were never trained on):", flush=True)
    demo.score(config)
    out = os.path.abspath(args.output)
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Outputs under {out}:\n"
          f"  config          {config}\n"
          f"  image shards    {out}/data/images/\n"
          f"  encoded shards  {out}/data/encoded/<version>/ (+ _MANIFEST.json)\n"
          f"  checkpoints     {out}/data/checkpoints/demo/ (+ metrics.jsonl, loss.png, tb/)\n"
          f"  evaluations     {out}/data/checkpoints/demo/eval/ (every 500 steps; curves in tb/ as eval/*)\n"
          f"  samples         {out}/data/samples/\n"
          f"Re-run the phases yourself: muse run --config {config}\n"
          f"Evaluate the last checkpoint on the held-out rows: muse eval --config {config}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
