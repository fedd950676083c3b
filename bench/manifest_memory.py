"""Memory of the manifest's shard table at LAION scale (issue 16 follow-up): what a trainer rank
and each of its loader workers holds after start-up, for N synthetic shard records.

Records are what `muse encode` writes (id, path, rows, bytes, sha256, source, replaced and the
trainable rows per row group, `layout.trainable_counts`), 10,000 rows in row groups of 256 (the
defaults: 40 row groups a shard), written with `write_manifest` to a local root (no shard files:
nothing here opens one). Measured, each in a fresh state:

* the table: `_SHARDS.parquet` bytes (and without the count columns, as written before them), and
  one record's JSON bytes (what finalize reads per shard);
* `read_manifest`: the shard records as a list of dicts (tracemalloc: Python heap retained, peak);
* one recorded count column read as Arrow (`read_shard_table` + numpy; Arrow's own allocator);
* `list_units`: the loader's units, one object per row group (tracemalloc, on N / 10 shards,
  scaled x10: it is linear in the shards).

    python bench/manifest_memory.py              # 230,000 shards (re-LAION-2B-en), ~1-2 min
    python bench/manifest_memory.py --shards 1000
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse.data import list_units
from muse.layout import (MANIFEST, SHARD_RECORD_SCHEMA, SHARD_TABLE, TRAINABLE_COLUMNS, read_manifest,
                         read_shard_table, write_manifest)
from muse.storage import Storage

ROWS, ROW_GROUP = 10_000, 256


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    groups = np.array([min(ROW_GROUP, ROWS - i) for i in range(0, ROWS, ROW_GROUP)])
    counts = {c: (groups - rng.binomial(groups, 0.3 if "drop" in c else 0.01, (n, len(groups)))).tolist()
              for c in TRAINABLE_COLUMNS}  # ~30% replaced (failed downloads), a few % held out
    out = []
    for sid in range(n):
        out.append({"id": sid, "path": f"{sid:05d}.parquet", "rows": ROWS, "bytes": 300_000_000 + sid,
                    "sha256": rng.bytes(32).hex(), "source": f"images/{sid:05d}.parquet",
                    "replaced": 3000, "train_rows": {c: v[sid] for c, v in counts.items()}})
    return out


def table_bytes(table: pa.Table) -> int:
    """The table as write_manifest writes it (zstd), in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return len(buf.getvalue())


def traced(fn):
    """(result, MB retained, MB peak) of fn() on the Python heap. Tracing is started once and never
    stopped: tracemalloc.stop() after pyarrow reads crashed the process about one run in two."""
    gc.collect()
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.time()
    result = fn()
    took = time.time() - t0
    now, peak = tracemalloc.get_traced_memory()
    return result, (now - base) / 2 ** 20, (peak - base) / 2 ** 20, took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=230_000)
    n = ap.parse_args().shards
    with tempfile.TemporaryDirectory() as tmp:
        st, ds = Storage(tmp), "encoded/v1"
        recs = records(n)
        print(f"{n} shards x {ROWS} rows, row groups of {ROW_GROUP}; one record: "
              f"{len(json.dumps(recs[0]))} bytes of JSON")
        write_manifest(st, ds, shards=recs, text_dim=8, codebook_size=64, empty_caption={}, superres=False,
                       encode={"row_group_size": ROW_GROUP})
        del recs
        size = st.size(f"{ds}/{SHARD_TABLE}")
        records_only = table_bytes(read_shard_table(st, ds, st.read_json(f"{ds}/{MANIFEST}"), SHARD_RECORD_SCHEMA.names))
        print(f"{SHARD_TABLE}: {size / 2 ** 20:.1f} MB, {size / n:.0f} B a shard ({records_only / n:.0f} B of it "
              f"without the count columns, as written before them: x{size / records_only:.1f})")
        manifest, now, peak, took = traced(lambda: read_manifest(st, ds))
        print(f"read_manifest (list of dicts): {now:.0f} MB retained, {peak:.0f} MB peak, {took:.1f} s")
        before = pa.total_allocated_bytes()
        col, _, _, took = traced(lambda: read_shard_table(st, ds, manifest, [TRAINABLE_COLUMNS[-1]]))
        counts = col.column(0).combine_chunks().flatten().to_numpy()
        print(f"one count column as Arrow: {(pa.total_allocated_bytes() - before) / 2 ** 20:.0f} MB, "
              f"{len(counts)} counts ({counts.nbytes / 2 ** 20:.0f} MB as numpy), {took:.1f} s")
        part = {**manifest, "shards": manifest["shards"][: max(1, n // 10)]}
        units, now, _, took = traced(lambda: list_units(st, ds, part))
        scale = n / len(part["shards"])
        print(f"list_units: {len(units)} units for {len(part['shards'])} shards, {now:.0f} MB "
              f"-> x{scale:.0f}: {now * scale:.0f} MB, {took * scale:.0f} s for all {n}")


if __name__ == "__main__":
    main()
