"""Datasets written on the spot for tests and benchmarks, in the formats of `muse/layout.py`.

`write_test_dataset` makes random encoded shards + a manifest (what `muse encode` would
write), optionally with matching phase 1 image shards; the models never run.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse.layout import (GRID_BASE, GRID_SUPERRES, PAGE_CHECKSUMS, empty_caption_record, encoded_schema,
                         format_shard_id, shard_name, t5_to_bytes, trainable_counts, write_manifest)
from muse.storage import Storage, crc32c
from muse.testing.image_shards import write_image_table


def _write_test_images(storage: Storage, sid: int, cols: dict, rng, size: int) -> None:
    from PIL import Image

    jpegs = []
    for _ in cols["key"]:
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    write_image_table(storage, sid, cols["key"], cols["caption"], jpegs, size, cols["replaced"])


def write_test_dataset(storage: Storage, dataset_dir: str, shards: int = 2, rows: int = 24,
                       row_group_size: int = 8, text_dim: int = 16, codebook_size: int = 64,
                       superres: bool = False, max_len: int = 12, replaced_every: int = 0,
                       seed: int = 0, image_size: int | None = None) -> dict:
    """Random encoded shards + manifest in the phase 2 format (tests and benchmarks); with
    `image_size`, also the phase 1 shards `images/NNNNN.parquet` (random blocky JPEGs, same keys)."""
    rng = np.random.default_rng(seed)
    entries = []
    for sid in range(shards):
        lens = rng.integers(1, max_len + 1, rows)
        cols = {
            "key": [f"{format_shard_id(sid)}{i:04d}" for i in range(rows)],
            "caption": [f"caption {sid}-{i}" for i in range(rows)],
            "replaced": [bool(replaced_every and i % replaced_every == 0) for i in range(rows)],
            "t5": [t5_to_bytes(rng.standard_normal((n, text_dim))) for n in lens],
            "t5_len": lens.astype(np.int16),
            "vq16": list(rng.integers(0, codebook_size, (rows, GRID_BASE ** 2), dtype=np.int16)),
        }
        if superres:
            cols["vq64"] = list(rng.integers(0, codebook_size, (rows, GRID_SUPERRES ** 2), dtype=np.int16))
        if image_size:
            _write_test_images(storage, sid, cols, rng, image_size)
        table = pa.table(cols, schema=encoded_schema(superres))
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd", **PAGE_CHECKSUMS)
        data = buf.getvalue()
        rel = shard_name(dataset_dir, sid)
        storage.write_bytes(rel, data)
        entries.append({"id": sid, "path": rel.rsplit("/", 1)[-1], "rows": rows, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "crc32c": crc32c(data),
                        "replaced": sum(cols["replaced"]),
                        "train_rows": trainable_counts(cols["key"], cols["replaced"], row_group_size)})
    return write_manifest(storage, dataset_dir, shards=entries, text_dim=text_dim, codebook_size=codebook_size,
                          empty_caption=empty_caption_record(rng.standard_normal((2, text_dim))),
                          superres=superres, encode={"row_group_size": row_group_size})
