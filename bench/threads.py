"""The demo's torch thread count: 1 vs 2 threads on the two computations the count fixes.

Times, in one process with the thread counts alternated round by round (so a load change hits
both): (1) a training step of the demo's model (`model.preset=demo`, 64 codes, 32-d text, batch
32 of 16x16 tokens, fp32, forward + backward + AdamW), as `train.cpu_threads` runs it; (2) a short
run of the shapes VQ's recipe (`VQRecipe.threads`: deterministic algorithms on). Best and median
of the rounds; the last line is the 2-thread / 1-thread time of a training step (below 1: 2
threads are faster). The weights depend on the count, so the demo fixes one (issue 29 item 1):
run it as is and under `taskset -c 0` (one core, as a 1-core machine or a loaded one sees it).

    python bench/threads.py                  # both counts, 5 rounds
    taskset -c 0 python bench/threads.py     # on one core
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

import torch

from muse.config import ModelConfig
from muse.masking import mask_tokens, masked_loss
from muse.models import build_model
from muse.testing.shapes_vq import VQRecipe, train_vq

COUNTS = (1, 2)
BATCH, TEXT_DIM, TEXT_LEN, CODES = 32, 32, 32, 64


def weights_sha(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def train_steps(steps: int) -> tuple[float, str]:
    """Seconds for `steps` training steps of the demo model on the current thread count, and the
    weights' sha256 after them (the same on any core count for one thread count, or the count
    would not fix the table)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="demo", codebook_size=CODES, text_dim=TEXT_DIM))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    c, g = model.config, torch.Generator().manual_seed(0)
    targets = torch.randint(0, CODES, (BATCH, c.grid_size ** 2), generator=g)
    hidden, mask = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    t = time.perf_counter()
    for _ in range(steps):
        inp, m = mask_tokens(targets, c.mask_token_id, g)
        masked_loss(model(inp, hidden, mask).float(), targets, m, 0.0).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, weights_sha(model)


def vq_run(threads: int) -> float:
    """Seconds for a short run of the VQ recipe (its own thread setting and deterministic mode)."""
    t = time.perf_counter()
    train_vq(VQRecipe(images=64, steps=40, decoder_steps=4, batch_size=16, threads=threads), log=lambda *a: None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="training steps per round")
    ap.add_argument("--no-vq", action="store_true")
    args = ap.parse_args()
    times: dict = {(what, n): [] for what in ("train", "vq") for n in COUNTS}
    shas: dict = {n: set() for n in COUNTS}
    for r in range(args.rounds):
        for n in COUNTS if r % 2 == 0 else COUNTS[::-1]:
            torch.set_num_threads(n)
            seconds, sha = train_steps(args.steps)
            times["train", n].append(seconds)
            shas[n].add(sha)
            if not args.no_vq:
                times["vq", n].append(vq_run(n))
    print(f"torch {torch.__version__}, affinity {sorted(os.sched_getaffinity(0))}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {args.rounds} rounds alternated")
    print("weights after the training steps:", {n: sorted(s) for n, s in shas.items()})
    print("| what | threads | best s | median s |\n|---|---|---|---|")
    for (what, n), ts in times.items():
        if ts:
            print(f"| {what} | {n} | {min(ts):.2f} | {statistics.median(ts):.2f} |")
    for what in ("vq", "train"):
        if times[what, 1]:
            print(f"{what}: 2 threads / 1 thread, median {statistics.median(times[what, 2]) / statistics.median(times[what, 1]):.2f}, "
                  f"best {min(times[what, 2]) / min(times[what, 1]):.2f}")


if __name__ == "__main__":
    main()
