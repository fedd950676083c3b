"""Loader vs trainer throughput: can the data stream keep the accelerator busy?

Writes encoded shards in the base-model row format (fp16 T5 of LAION-like caption lengths +
16x16 ids) to a local root and to the GCS emulator, streams them through
`muse.data.StreamingDataset` + DataLoader workers, and times a training step of the
configured model on the same batch size. The last line is loader / trainer samples/s
(above 1: the loader is not what the model waits for).

    python bench/loader.py --tiny         # seconds (used by the test)
    python bench/loader.py                # small CPU sizes
    python bench/loader.py --gpu          # real sizes on CUDA (T5-base 768, base preset)
    python bench/loader.py --checksum-cost  # + the loader with page checksums verified vs not
    python bench/loader.py --faults 0,0.05,0.2  # + the loader from gs:// through the fault proxy

The shards carry Parquet page checksums and the loader verifies them (muse/layout.py
`PAGE_CHECKSUMS`); `--checksum-cost` times each root with verification on and off, alternated
over `--rounds` rounds in the same run (best of each), and prints off / on per root: through the
whole loader (samples/s) and for the row-group reads alone (`data.read_unit` of every row group in
one thread, MB/s of shard: the part the checksums add to, without the loader's other work).

`--faults` reads the emulator's shards through `muse.testing.gcs_faults.GCSFaultProxy` at each
rate (every kind of request, the proxy's whole menu: 429/503 with and without Retry-After, resets,
stalls of `--stall-s`, short and flipped bodies), rates alternated over `--rounds` rounds in the
same run (best of each), and prints each rate's samples/s and its ratio to 0%. The loader runs
under the default retry policy (muse/storage.py `RetryPolicy`: it builds its own Storage).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import torch

from muse.config import ModelConfig
from muse.data import LoaderSettings, StreamingDataset, list_units, read_unit, worker_init
from muse.layout import read_manifest
from muse.storage import Storage
from muse.testing.datasets import write_test_dataset
from muse.testing.gcs import GCSEmulator
from muse.testing.gcs_faults import GCSFaultProxy

DIR = "encoded/bench"


def loader_rate(root: str, a, warmup: int = 2, page_checksums: bool = True) -> float:
    ds = StreamingDataset(root, DIR, LoaderSettings(shuffle_buffer=a.buffer, batch_size=a.batch, streams=a.streams),
                          page_checksums=page_checksums)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=a.workers,
                                     worker_init_fn=worker_init if a.workers else None,
                                     prefetch_factor=4 if a.workers else None)
    it = iter(dl)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, a.batches):
        pass
    return a.batches * a.batch / (time.perf_counter() - t0)


def checksum_rates(root: str, a) -> tuple[float, float]:
    """Best samples/s with page checksums verified and not, alternated so that both see the same
    machine (a shared one swings 2-3x between minutes)."""
    on, off = [], []
    for _ in range(a.rounds):
        on.append(loader_rate(root, a, page_checksums=True))
        off.append(loader_rate(root, a, page_checksums=False))
    return max(on), max(off)


def read_rates(root: str, a) -> tuple[float, float]:
    """Best MB/s of shard through `read_unit` (every row group, this thread), verified and not."""
    storage = Storage(root)
    units = list(list_units(storage, DIR, read_manifest(storage, DIR)))
    size = sum(storage.sizes(DIR).get(u.path, 0) for u in {u.path: u for u in units}.values()) / 1e6
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for verify in (True, False):
            t0 = time.perf_counter()
            for unit in units:
                read_unit(storage, unit, page_checksums=verify)
            rates[verify].append(size / (time.perf_counter() - t0))
    return max(rates[True]), max(rates[False])


def fault_rates(gcs: GCSEmulator, root: str, a) -> dict[float, float]:
    """Best samples/s of the loader on `root` through the fault proxy at each of `a.faults`,
    the rates alternated round by round so that all see the same machine."""
    best: dict[float, float] = {}
    with GCSFaultProxy(gcs.url, seed=1, stall_s=a.stall_s, retry_after_s=0.5) as proxy:
        for _ in range(a.rounds):
            for rate in a.faults:
                proxy.rate = rate
                best[rate] = max(best.get(rate, 0.0), loader_rate(root, a))
        print(f"faults injected: {sum(proxy.faults().values())} of {sum(proxy.counts().values())} requests")
    return best


def trainer_rate(a, device: torch.device) -> float:
    from muse.masking import mask_tokens, masked_loss
    from muse.models import build_model

    mc = ModelConfig(preset=a.preset, text_dim=a.text_dim, codebook_size=8192,
                     **({"hidden_size": a.hidden, "depth": a.depth, "num_heads": a.heads} if a.hidden else {}))
    model = build_model(mc).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, 8192, (a.batch, 256), device=device)
    hidden = torch.randn(a.batch, a.max_len, a.text_dim, device=device)
    mask = torch.ones(a.batch, a.max_len, dtype=torch.bool, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step():
        inp, m = mask_tokens(ids, model.config.mask_token_id, gen)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(inp, hidden, mask, None)
        masked_loss(logits.float(), ids, m, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return a.steps * a.batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checksum-cost", action="store_true", help="also time the loader without page checksums")
    p.add_argument("--rounds", type=int, default=3, help="on/off rounds per root with --checksum-cost")
    p.add_argument("--batches", type=int, help="batches timed per loader measurement (default: by size)")
    p.add_argument("--faults", type=lambda v: [float(x) for x in v.split(",")], default=[],
                   help="fault rates for the loader from gs:// through the fault proxy, e.g. 0,0.05,0.2")
    p.add_argument("--stall-s", type=float, default=1.0, help="how long the proxy's stalls last (--faults)")
    a = p.parse_args()
    batches = a.batches
    # sizes: (shards, rows, text_dim, max_len, batches, trainer steps, preset/hidden)
    a.batch, a.streams, a.buffer = 16, 2, 256
    a.shards, a.rows, a.text_dim, a.max_len, a.batches, a.steps = 2, 512, 768, 77, 40, 3
    a.preset, a.hidden, a.depth, a.heads = "tiny", None, None, None
    if a.tiny:
        a.shards, a.rows, a.text_dim, a.max_len, a.batches, a.steps, a.buffer = 1, 64, 64, 16, 4, 1, 32
        a.hidden, a.depth, a.heads = 32, 1, 2
    if a.gpu:
        a.shards, a.rows, a.batches, a.steps, a.preset, a.workers = 4, 4096, 200, 20, "base", max(a.workers, 4)
        a.streams = 8
    a.batches = batches or a.batches
    torch.set_num_threads(1 if not a.gpu else torch.get_num_threads())
    device = torch.device("cuda" if a.gpu and torch.cuda.is_available() else "cpu")

    def fill(root: str) -> None:
        write_test_dataset(Storage(root), DIR, shards=a.shards, rows=a.rows, row_group_size=256,
                           text_dim=a.text_dim, codebook_size=8192, max_len=a.max_len)

    rows, cost = [], []
    with tempfile.TemporaryDirectory() as tmp, GCSEmulator() as gcs:
        for name, root in [("local", os.path.join(tmp, "root")), ("gcs-emulator", gcs.new_root())]:
            fill(root)
            if a.faults and name == "gcs-emulator":
                got = fault_rates(gcs, root, a)
                for rate, v in got.items():
                    rows.append((f"loader gs:// through the proxy, {rate:.0%} faults", v))
                    cost.append((f"  {rate:.0%} faults / {min(got):.0%}", v / got[min(got)]))
            if not a.checksum_cost:
                rows.append((f"loader {name} ({a.workers} workers)", loader_rate(root, a)))
                continue
            on, off = checksum_rates(root, a)
            rows.append((f"loader {name} ({a.workers} workers)", on))
            rows.append(("  same, page checksums not verified", off))
            cost.append((f"loader {name}: not verified / verified", off / on))
            on, off = read_rates(root, a)
            cost.append((f"  row-group reads {name}: MB/s verified", on))
            cost.append((f"  row-group reads {name}: MB/s not verified", off))
            cost.append((f"  row-group reads {name}: not verified / verified", off / on))
    train = trainer_rate(a, device)
    rows.append((f"trainer step ({a.preset if not a.hidden else f'hidden {a.hidden}'}, {device.type})", train))
    print(f"batch {a.batch}, T5 dim {a.text_dim}, captions 1..{a.max_len} tokens")
    print(f"{'what':<52}{'samples/s':>12}")
    for name, v in rows:
        print(f"{name:<52}{v:>12.1f}")
    for name, v in cost:
        print(f"{name:<52}{v:>12.3f}")
    slowest = min(v for name, v in rows if name.startswith("loader"))  # the verified rates
    print(f"{'ratio slowest loader / trainer':<52}{slowest / train:>12.2f}")


if __name__ == "__main__":
    main()
