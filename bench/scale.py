"""How planning, finalizing and loader start-up grow with the shard count, on the GCS emulator.

For each size N, a fresh bucket on fake-gcs-server gets N synthetic shards (image shard + marker,
encoded shard + record; the Parquet files are 4-byte stand-ins, see muse/testing/scale.py), ids
spread past 99,999, then we time the user's calls: `plan_download` (one registered source of N
shards, all done), `plan_encode` (all done), `finalize_manifest`, and the loader's start-up
(`StreamingDataset`: manifest + units). The reference in the same run is main's finalize: one
record read after another (`read_json` per shard), timed at the sizes up to 10k, and one listing
of images/ (what the emulator's listing costs: its filesystem backend, used here because the
memory backend's writes slow down with every object stored, lists in time that grows faster
than the object count; GCS lists 1,000 objects per request).

The last lines are the growth exponents log(t2/t1)/log(N2/N1) between sizes (goal: <= 1.1).

    python bench/scale.py --tiny    # 10 and 50 shards, seconds (the test)
    python bench/scale.py           # 1k and 10k shards, a few minutes
    python bench/scale.py --full    # + 100k shards
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path

import pandas  # noqa: F401 - pyarrow imports it on the first Parquet write: a one-off cost kept out of the timings
import yaml

from muse.config import load_config
from muse.data import LoaderSettings, StreamingDataset
from muse.download import plan_download
from muse.download.sources import REGISTRY, selection_spec, source_fingerprint
from muse.encode.shards import finalize_manifest, plan_encode
from muse.layout import IMAGES_VERSION, dataset_dir, done_marker
from muse.storage import Storage
from muse.testing.gcs import GCSEmulator
from muse.testing.scale import write_synthetic_shards

ROWS = 10_000  # rows per shard, LAION-sized


def setup(gcs: GCSEmulator, tmp: Path, n: int):
    """(cfg, storage, ids): a bucket with n synthetic shards and a registry that owns them."""
    source = tmp / f"source-{n}.parquet"
    source.write_bytes(b"stand-in: plan_download fingerprints it, never reads it")
    path = tmp / f"pipeline-{n}.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": gcs.new_root()}, "source": {"paths": [str(source)]}}))
    cfg = load_config(path)
    storage = Storage.from_config(cfg)
    first = 100_000 - n // 2  # half the ids below 100,000, half past it
    ids = list(range(first, first + n))
    t0 = time.perf_counter()
    write_synthetic_shards(storage, dataset_dir(cfg), ids, rows=ROWS)
    entry = {"fingerprint": source_fingerprint(str(source)), "rows": n * ROWS, "max_samples": None,
             "first_shard": first, "num_shards": n, "shard_size": ROWS, "selection": selection_spec(cfg.source),
             "rows_in": n * ROWS, "filtered": {}}
    storage.write_json(REGISTRY, {"schema_version": IMAGES_VERSION, "next_shard": first + n,
                                  "sources": {str(source): entry}})
    return cfg, storage, ids, time.perf_counter() - t0


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(gcs: GCSEmulator, tmp: Path, n: int, reference: bool) -> dict:
    cfg, storage, ids, t_write = setup(gcs, tmp, n)
    ds = dataset_dir(cfg)
    out = {"write synthetic records": t_write}
    out["plan_download"], parts = timed(lambda: plan_download(cfg))
    out["plan_encode"], todo = timed(lambda: plan_encode(cfg, Storage.from_config(cfg)))
    out["finalize_manifest"], manifest = timed(lambda: finalize_manifest(cfg, Storage.from_config(cfg)))
    settings = LoaderSettings(batch_size=16, streams=8)
    out["loader start-up"], loader = timed(lambda: StreamingDataset(storage.uri, ds, settings))
    assert parts == [] and todo == [] and len(manifest["shards"]) == n, "the synthetic shards are all done"
    assert loader.train_rows == n * ROWS
    out["reference: one listing of images/"], _ = timed(lambda: Storage.from_config(cfg).list("images"))
    if reference:
        s = Storage.from_config(cfg)
        out["reference: records read in turn"], _ = timed(lambda: [s.read_json(done_marker(ds, i)) for i in ids])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="10 and 50 shards (seconds)")
    p.add_argument("--full", action="store_true", help="add 100,000 shards")
    a = p.parse_args()
    sizes = [10, 50] if a.tiny else [1_000, 10_000] + ([100_000] if a.full else [])
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, GCSEmulator(filesystem_root=f"{tmp}/gcs") as gcs:
        for n in sizes:
            results[n] = measure(gcs, Path(tmp), n, reference=n <= 10_000)
            print(f"{n} shards: " + ", ".join(f"{k} {v:.2f}s" for k, v in results[n].items()), flush=True)
    names = [k for k in results[sizes[0]] if k != "write synthetic records"]
    print(f"{'seconds':<34}" + "".join(f"{n:>12,}" for n in sizes))
    for k in names:
        print(f"{k:<34}" + "".join(f"{results[n][k]:>12.3f}" if k in results[n] else f"{'-':>12}" for n in sizes))
    for n1, n2 in itertools.pairwise(sizes):
        for k in names:
            if k in results[n2]:
                t1, t2 = max(results[n1][k], 1e-3), max(results[n2][k], 1e-3)
                print(f"exponent {k} {n1}->{n2}: {math.log(t2 / t1) / math.log(n2 / n1):.2f}")


if __name__ == "__main__":
    main()
