"""Parquet schemas shared by the phases: the contract between download, encode and train.

Phase 1, `images/NNNNN.parquet` (one row per input row, failures replaced):
    key str, caption str, caption_was_null bool, url str, image binary (JPEG, RGB,
    image_size x image_size), width int32, height int32, replaced bool, status str,
    error_message str, reason str (normalised), + carried source columns (e.g. SAMPLE_ID, similarity).

Phase 2, `encoded/<version>/NNNNN.parquet`:
    key str, caption str, replaced bool,
    t5      binary   raw little-endian fp16 bytes of a C-order [t5_len, text_dim] array
                     (real tokens only, EOS included, no padding)
    t5_len  int16    (stored as int32: Parquet has no int16)
    vq16    fixed_size_list<int16>[256]   16x16 ids, row-major
    vq64    fixed_size_list<int16>[4096]  64x64 ids, row-major (only with encode.superres)
Both are zstd-compressed with a fixed row-group size; the file's key-value metadata
holds `muse.schema_version` and `muse.info` (JSON: model ids, dims, grid sizes).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
GRID_BASE = 16      # 256px / f16
GRID_SUPERRES = 64  # 512px / f8

IMAGE_COLUMNS = ["key", "caption", "caption_was_null", "url", "image", "width", "height",
                 "replaced", "status", "error_message", "reason"]


def encoded_schema(superres: bool, info: dict | None = None) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("replaced", pa.bool_(), nullable=False),
        pa.field("t5", pa.binary(), nullable=False),
        pa.field("t5_len", pa.int16(), nullable=False),
        pa.field("vq16", pa.list_(pa.int16(), GRID_BASE * GRID_BASE), nullable=False),
    ]
    if superres:
        fields.append(pa.field("vq64", pa.list_(pa.int16(), GRID_SUPERRES * GRID_SUPERRES), nullable=False))
    meta = {"muse.schema_version": SCHEMA_VERSION, "muse.info": json.dumps(info or {}, sort_keys=True)}
    return pa.schema(fields, metadata=meta)


def t5_to_bytes(emb: np.ndarray) -> bytes:
    """[L, D] float array -> raw little-endian fp16 bytes, C order."""
    return np.ascontiguousarray(emb, dtype="<f2").tobytes()


def t5_from_bytes(buf: bytes, text_dim: int) -> np.ndarray:
    """Inverse of t5_to_bytes: -> [L, text_dim] float16 (a view, no copy)."""
    return np.frombuffer(buf, dtype="<f2").reshape(-1, text_dim)
