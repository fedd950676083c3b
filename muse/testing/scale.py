"""Synthetic datasets of many shards for scale tests and bench/scale.py: the files that planning,
finalizing and loader start-up read (markers, records, tiny stand-ins for the Parquet files),
written concurrently, so 10^4-10^5 shards take seconds to minutes, not hours."""

from __future__ import annotations

import json

from muse.layout import ENCODERS, IMAGES, SCHEMA_VERSION, done_marker, empty_caption_record, shard_name
from muse.storage import Storage


def encoder_facts(text_dim: int = 8, codebook_size: int = 64) -> dict:
    """A `_ENCODERS.json` as the shard encoders write it, so finalizing loads no model."""
    import numpy as np

    info = {"schema_version": SCHEMA_VERSION, "text_model": "synthetic", "text_dim": text_dim,
            "codebook_size": codebook_size, "vq_model": "synthetic", "superres_vq_model": None}
    return {"info": info, "empty_caption": empty_caption_record(np.zeros((1, text_dim)))}


def write_synthetic_shards(storage: Storage, ds: str, ids: list[int], rows: int = 10_000,
                           encoded: bool = True, batch: int = 4096) -> None:
    """For each id: images/<id>.parquet + marker, and (with `encoded`) <ds>/<id>.parquet + record.
    The Parquet files are placeholders (b"PAR1"): nothing here reads them."""
    if encoded:
        storage.write_json(f"{ds}/{ENCODERS}", encoder_facts())
    for start in range(0, len(ids), batch):
        files: dict[str, bytes] = {}
        for sid in ids[start:start + batch]:
            files[shard_name(IMAGES, sid)] = b"PAR1"
            files[done_marker(IMAGES, sid)] = json.dumps({"rows_in": rows, "bytes": 4}).encode()
            if encoded:
                rel = shard_name(ds, sid)
                record = {"id": sid, "path": rel.rsplit("/", 1)[-1], "rows": rows, "bytes": 4,
                          "sha256": f"{sid:064x}", "source": shard_name(IMAGES, sid), "replaced": sid % 3}
                files[rel] = b"PAR1"
                files[done_marker(ds, sid)] = json.dumps(record).encode()
        storage.write_many(files)
