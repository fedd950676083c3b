"""The on-disk contract between the phases: every name, rule and schema under the storage root.

    images/NNNNN.parquet             phase 1 shard (IMAGE_SCHEMA + carried source columns)
    images/NNNNN_stats.json          its done marker, written after the Parquet file
    images/_SOURCES.json             the source registry (REGISTRY, see download/sources.py)
    encoded/<version>/NNNNN.parquet  phase 2 shard (`encoded_schema`)
    encoded/<version>/NNNNN.json     its record and done marker, written after the Parquet file
    encoded/<version>/_ENCODERS.json what the manifest needs from the models (ENCODERS)
    encoded/<version>/_MANIFEST.json the dataset a trainer reads, written last (MANIFEST)

A shard is done when its Parquet file and its marker both exist (`done_shards`): a killed
writer leaves no marker, so nothing half-written is ever trusted.

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

import base64
import json
import time

import numpy as np
import pyarrow as pa

from muse.storage import Storage, shard_id_of, shard_name

SCHEMA_VERSION = "1"
GRID_BASE = 16      # 256px / f16
GRID_SUPERRES = 64  # 512px / f8

IMAGES = "images"
REGISTRY = f"{IMAGES}/_SOURCES.json"
MANIFEST = "_MANIFEST.json"
ENCODERS = "_ENCODERS.json"  # what the manifest needs from the models, so finalizing never loads them

IMAGE_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("caption", pa.string()), pa.field("caption_was_null", pa.bool_()),
    pa.field("url", pa.string()), pa.field("image", pa.binary()), pa.field("width", pa.int32()),
    pa.field("height", pa.int32()), pa.field("replaced", pa.bool_()), pa.field("status", pa.string()),
    pa.field("error_message", pa.string()), pa.field("reason", pa.string()),
])
IMAGE_COLUMNS = IMAGE_SCHEMA.names


class DataError(RuntimeError):
    """Encoded data that cannot be trained on; the message says which file and what to do."""


# ----------------------------------------------------------------------------- names and done rule

def dataset_dir(cfg) -> str:
    """Where the encoded dataset of `cfg.encode` lives: a changed encoder gets a new folder."""
    return f"encoded/{cfg.encode.version()}"


def done_marker(phase: str, shard_id: int) -> str:
    """The file written after a shard's Parquet file: ("images", 42) -> images/00042_stats.json
    (img2dataset's name), (dataset_dir, 42) -> <dataset_dir>/00042.json (the encode record)."""
    return shard_name(phase, shard_id, "_stats.json" if phase == IMAGES else ".json")


def done_shards(storage: Storage, phase: str) -> list[int]:
    """Ids of the finished shards of `phase` (IMAGES or a dataset_dir): Parquet and marker both exist."""
    names = {p.rsplit("/", 1)[-1] for p in storage.list(phase)}
    ids = [shard_id_of(n) for n in names if n.endswith(".parquet") and not n.startswith("_")]
    return sorted(i for i in ids if done_marker(phase, i).rsplit("/", 1)[-1] in names)


# ----------------------------------------------------------------------------- phase 2 rows

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


# ----------------------------------------------------------------------------- the manifest

def empty_caption_record(emb: np.ndarray) -> dict:
    """The T5 embedding of "" as the manifest stores it (base64 fp16 bytes + length)."""
    return {"t5": base64.b64encode(t5_to_bytes(emb)).decode(), "t5_len": int(emb.shape[0])}


def empty_caption(manifest: dict):
    """The T5 embedding of "" from the manifest, [L, text_dim] float32 tensor (for cond dropout)."""
    import torch  # here, not at the top: download and encode planning read this module without torch

    raw = base64.b64decode(manifest["empty_caption"]["t5"])
    return torch.from_numpy(t5_from_bytes(raw, manifest["text_dim"]).astype(np.float32))


def write_manifest(storage: Storage, ds: str, *, shards: list[dict], text_dim: int, codebook_size: int,
                   empty_caption: dict, superres: bool, encode: dict, models: dict | None = None,
                   pending: list[int] | None = None) -> dict:
    """Write `<ds>/_MANIFEST.json` from the shard records; call it last (readers trust it)."""
    manifest = {
        "schema_version": SCHEMA_VERSION, "version": ds.rsplit("/", 1)[-1],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": models or {},
        "encode": encode, "text_dim": text_dim, "grid": GRID_BASE,
        "superres_grid": GRID_SUPERRES if superres else None, "codebook_size": codebook_size,
        "empty_caption": empty_caption,
        "rows": sum(s["rows"] for s in shards), "replaced": sum(s.get("replaced", 0) for s in shards),
        "shards": shards, "pending": list(pending or []),
    }
    storage.write_json(f"{ds}/{MANIFEST}", manifest)
    return manifest


def read_manifest(storage: Storage, ds: str) -> dict:
    rel = f"{ds}/{MANIFEST}"
    if not storage.exists(rel):
        raise DataError(f"no encoded dataset: {storage.url(rel)} does not exist; run `muse encode` "
                        "with the same encode settings first (the dataset version is a hash of them)")
    return storage.read_json(rel)
