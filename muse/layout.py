"""The on-disk contract between the phases: every name, rule and schema under the storage root.

    images/NNNNN.parquet             phase 1 shard (IMAGE_SCHEMA + carried source columns)
    images/NNNNN_stats.json          its done marker, written after the Parquet file
    images/_SOURCES.json             the source registry (REGISTRY, see download/sources.py)
    encoded/<version>/NNNNN.parquet  phase 2 shard (`encoded_schema`)
    encoded/<version>/NNNNN.json     its record and done marker, written after the Parquet file
    encoded/<version>/_ENCODERS.json what the manifest needs from the models (ENCODERS)
    encoded/<version>/_SHARDS.parquet the manifest's shard table, one row per shard (SHARD_TABLE_SCHEMA:
                                     the record + trainable rows per row group, `trainable_counts`)
    encoded/<version>/_MANIFEST.json the dataset a trainer reads, written last (MANIFEST)

Shard ids: NNNNN is `format_shard_id(id)`, the id in decimal zero-padded to 5 digits (00042),
with more digits past 99,999 (123456); `parse_shard_id` is its exact inverse and rejects any
other spelling (042, 0123456), so a stray file never passes for a shard. Listings sort as
strings, so code orders shards by their parsed ids, never by name.

Row keys (`make_key`): shard id as above + the row in the shard, zero-padded to
`key_row_width(shard_size)` (>= 5) digits: shard 42, row 7 -> "0004200007". A key is the decimal
numeral of shard_id * 10**width + row, so keys are unique within a dataset (one shard_size, one
width) and sort in (shard, row) order *as numbers* (`key_order`), for any shard id. As strings
they sort that way only while shard ids have 5 digits ("1000000..." < "99999..."); keys of
ids < 100,000 are the ones written before ids could grow, so existing data (and its eval slice,
a hash of the key) stays valid.

A shard is done when its Parquet file and its marker both exist (`done_shards`): a killed
writer leaves no marker, so nothing half-written is ever trusted.

Generations (issue 28: a retry pass re-fetches a shard's transiently failed rows): a finished
shard is never rewritten in place; its rewrite is the next generation beside it, generation 0
being the names above and generation K >= 1 tagged ".gK" after the id:
    images/00042.g1.parquet, images/00042.g1_stats.json
    encoded/<version>/00042.g1.parquet, encoded/<version>/00042.g1.json  (encoded from images' g1)
A generation is finished by the same rule (Parquet + marker); readers take each id's newest
finished generation (`done_generations`), so a killed rewrite leaves the one before in force.
Rows and keys are the same in every generation of a shard; only rows fetched again differ.

Phase 1, `images/NNNNN.parquet` (one row per input row, failures replaced):
    key str, caption str, caption_was_null bool, url str, image binary (JPEG, RGB,
    image_size x image_size), width int32, height int32, replaced bool, status str,
    error_message str, reason str (normalised), + carried source columns (e.g. SAMPLE_ID, similarity).
    Generations K >= 1 (the retry pass, muse/download/retry.py) add, last, retries int32: times the
    row was fetched again (absent in generation 0: 0); their markers record `written` (Unix seconds).

Phase 2, `encoded/<version>/NNNNN.parquet`:
    key str, caption str, replaced bool,
    t5      binary   raw little-endian fp16 bytes of a C-order [t5_len, text_dim] array
                     (real tokens only, EOS included, no padding)
    t5_len  int16    (stored as int32: Parquet has no int16)
    vq16    fixed_size_list<int16>[256]   16x16 ids, row-major
    vq64    fixed_size_list<int16>[4096]  64x64 ids, row-major (only with encode.superres)
Both are zstd-compressed with a fixed row-group size; the file's key-value metadata
holds `muse.schema_version` and `muse.info` (JSON: model ids, dims, grid sizes).

The run folder (names below: `run_dir`, `step_dir`, ...; written by checkpoint.py, tracking.py,
evaluate.py, train_callbacks.py):

    checkpoints/<run>/step-NNNNNNNN/  one checkpoint (`step_dir`; NNNNNNNN: the step, 8 digits)
        model.safetensors, config.json  the model's own format (MODEL_FILES; config.json holds
                                        `_schema_version`, MODEL_CONFIG_VERSION)
        model_ema.safetensors           the EMA weights (EMA_FILE, train.ema; see muse/ema.py)
        trainer.pt                      optimizer, scheduler, scaler, RNG, counters (TRAINER_FILE)
        loader.json                     loader state of every rank + what it is valid for, and
                                        `schema_version` (LOADER_FILE, CHECKPOINT_VERSION)
        pipeline.yaml                   the resolved config (RUN_CONFIG)
    checkpoints/<run>/LATEST          "step-NNNNNNNN", written after every file above (`latest_file`)
    checkpoints/<run>/metrics.jsonl   one JSON record per logged step (`metrics_file`)
    checkpoints/<run>/loss.png        the loss curve (`loss_curve_file`)
    checkpoints/<run>/tb/             TensorBoard event files (`tb_dir`)
    checkpoints/<run>/eval/step-NNNNNNNN.json, .png   `muse eval` results (`eval_results`)
    checkpoints/<run>/samples/step-NNNNNNNN.png       samples taken while training (`training_sample`)

Elsewhere under the root: `<folder>/_config.yaml` (CONFIG_COPY) beside images/ and each
encoded/<version>/ (`Storage.write_config`), and what `sample.out` names (default
samples/sample.png; the demo adds samples/adherence*).

Schema versions, one per on-disk format; a reader refuses any other (`check_version`) with an
error naming the file; no reader keeps a branch for a format no release wrote:
    images/ (shards, markers, _SOURCES.json; in _SOURCES.json)        IMAGES_VERSION
    encoded data (shards, records, _ENCODERS.json, _MANIFEST.json)  SCHEMA_VERSION
    a checkpoint (in loader.json; trainer.pt and the weights go with it) CHECKPOINT_VERSION
    a model's config.json (`save_pretrained`, `_schema_version`)     MODEL_CONFIG_VERSION
An image shard's marker must record `bytes` (muse/download/intact.py); one that does not is
fetched again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse.storage import Storage

SCHEMA_VERSION = "1"     # encoded data: bump when a reader of the old files would misread them
IMAGES_VERSION = 1       # images/: shards, markers and the source registry (in _SOURCES.json)
CHECKPOINT_VERSION = 1   # checkpoints (in loader.json)
MODEL_CONFIG_VERSION = 1  # a model's config.json (`_schema_version`)
GRID_BASE = 16      # 256px / f16
GRID_SUPERRES = 64  # 512px / f8

IMAGES = "images"
REGISTRY = f"{IMAGES}/_SOURCES.json"
MANIFEST = "_MANIFEST.json"
ENCODERS = "_ENCODERS.json"  # what the manifest needs from the models, so finalizing never loads them
SHARD_TABLE = "_SHARDS.parquet"
SHARD_ID_DIGITS = 5  # the minimum: names and keys of ids below 10**5 are the ones data was written with

IMAGE_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("caption", pa.string()), pa.field("caption_was_null", pa.bool_()),
    pa.field("url", pa.string()), pa.field("image", pa.binary()), pa.field("width", pa.int32()),
    pa.field("height", pa.int32()), pa.field("replaced", pa.bool_()), pa.field("status", pa.string()),
    pa.field("error_message", pa.string()), pa.field("reason", pa.string()),
])
IMAGE_COLUMNS = IMAGE_SCHEMA.names


class DataError(RuntimeError):
    """Encoded data that cannot be trained on; the message says which file and what to do."""


def check_version(found, expected, where: str, fix: str, error: type[Exception] | None = None) -> None:
    """Refuse a file of another schema version than the one this code writes: `error` (DataError
    by default) naming `where` (the file's URL) and saying what to do (`fix`)."""
    if found != expected:
        raise (error or DataError)(f"{where}: schema version {found!r}, this code reads only {expected!r} "
                                   f"(None: written before versions were recorded): {fix}")


# ----------------------------------------------------------------------------- names and done rule

def format_shard_id(shard_id: int) -> str:
    """The one spelling of a shard id in names and keys: 42 -> "00042", 123456 -> "123456"."""
    if shard_id < 0:
        raise ValueError(f"a shard id is >= 0, got {shard_id}")
    return f"{shard_id:0{SHARD_ID_DIGITS}d}"


def parse_shard_id(text: str) -> int | None:
    """Inverse of `format_shard_id`: "00042" -> 42, "123456" -> 123456; None for anything that
    is not exactly how an id is spelled ("042", "0123456", "4a", "")."""
    if not text.isdigit() or not text.isascii():
        return None
    sid = int(text)
    return sid if format_shard_id(sid) == text else None


def shard_name(phase: str, shard_id: int, suffix: str = ".parquet", generation: int = 0) -> str:
    """Deterministic shard path: ("images", 42) -> "images/00042.parquet"; generation 1 and on
    (a retry pass's rewrite, see "Generations" above) -> "images/00042.g1.parquet"."""
    if generation < 0:
        raise ValueError(f"a generation is >= 0, got {generation}")
    gen = f".g{generation}" if generation else ""
    return f"{phase}/{format_shard_id(shard_id)}{gen}{suffix}"


_SHARD_FILE = re.compile(r"([0-9]+)(?:\.g([0-9]+))?(?:[._](?!g).*)?", re.S)


def parse_shard_name(path: str) -> tuple[int, int] | None:
    """(shard id, generation) of a shard file or marker: ".../00042.parquet" -> (42, 0),
    "00042.g3_stats.json" -> (42, 3), "00042.g1.json" -> (42, 1); None for any other name
    (a stray "42.parquet", "00042.g01.parquet", "00042.g0.parquet": generation 0 has no tag)."""
    m = _SHARD_FILE.fullmatch(path.rsplit("/", 1)[-1])
    sid = parse_shard_id(m.group(1)) if m else None
    gen = m.group(2) if m else None
    if sid is None or (gen is not None and (gen == "0" or gen != str(int(gen)))):
        return None
    return sid, int(gen or 0)


def shard_id_of(path: str) -> int | None:
    """The id in a shard file's name, ".../00042.parquet", ".../00042_stats.json" or
    ".../00042.g1.parquet" -> 42; None when the name is not a shard's."""
    parsed = parse_shard_name(path)
    return parsed[0] if parsed else None


def key_row_width(shard_size: int) -> int:
    """Digits of the row part of a key: enough for shard_size - 1, at least 5."""
    return max(5, len(str(shard_size - 1)))


def make_key(shard_id: int, row: int, shard_size: int) -> str:
    """A row's key, stable and unique in the dataset: format_shard_id + the row, zero-padded."""
    return f"{format_shard_id(shard_id)}{row:0{key_row_width(shard_size)}d}"


def key_order(key: str) -> int:
    """Sort keys with this, not as strings: (shard, row) order for shard ids of any size."""
    return int(key)


def dataset_dir(cfg) -> str:
    """Where the encoded dataset of `cfg.encode` lives: a changed encoder gets a new folder."""
    return f"encoded/{cfg.encode.version()}"


def done_marker(phase: str, shard_id: int, generation: int = 0) -> str:
    """The file written after a shard's Parquet file: ("images", 42) -> images/00042_stats.json
    (img2dataset's name), (dataset_dir, 42) -> <dataset_dir>/00042.json (the encode record);
    generation 2 -> images/00042.g2_stats.json, <dataset_dir>/00042.g2.json."""
    return shard_name(phase, shard_id, "_stats.json" if phase == IMAGES else ".json", generation)


def finished_generations(storage: Storage, phase: str, listing: Iterable[str] | None = None) -> set[tuple[int, int]]:
    """Every finished (shard id, generation) of `phase` (IMAGES or a dataset_dir): its Parquet
    file and its marker both exist. `listing`: as in `done_shards`."""
    names = {p.rsplit("/", 1)[-1] for p in (storage.list(phase) if listing is None else listing)}
    out = set()
    for name in names:
        parsed = parse_shard_name(name) if name.endswith(".parquet") else None
        if parsed is None:
            continue
        sid, gen = parsed
        if (shard_name(phase, sid, generation=gen).rsplit("/", 1)[-1] == name  # not 00042_x.parquet
                and done_marker(phase, sid, gen).rsplit("/", 1)[-1] in names):
            out.add(parsed)
    return out


def done_generations(storage: Storage, phase: str, listing: Iterable[str] | None = None) -> dict[int, int]:
    """{shard id: its newest finished generation} of `phase` (`finished_generations`), so a
    generation being written (or killed half way) leaves the one before it in force."""
    newest: dict[int, int] = {}
    for sid, gen in finished_generations(storage, phase, listing):
        newest[sid] = max(gen, newest.get(sid, gen))
    return dict(sorted(newest.items()))


def done_shards(storage: Storage, phase: str, listing: Iterable[str] | None = None) -> list[int]:
    """Ids of the finished shards of `phase` (IMAGES or a dataset_dir): Parquet and marker both
    exist, of any generation (`done_generations` says which one is in force).
    `listing`: the paths (or names) of the files under `phase` when the caller has listed it
    already (e.g. the keys of `storage.sizes(phase)`), so one listing serves several uses."""
    return list(done_generations(storage, phase, listing))


def prefix_listing(storage: Storage, phase: str, ids: Iterable[int] | None) -> list[str]:
    """The names under `phase` that start like all of `ids` (the common prefix of the lowest and
    highest id's spelling): for one task's consecutive ids a few hundred names, however many
    shards the folder holds. None: the whole folder."""
    if ids is None:
        return storage.list(phase)
    wanted = set(ids)
    if not wanted:
        return []
    start = os.path.commonprefix([format_shard_id(min(wanted)), format_shard_id(max(wanted))])
    return storage.list(phase, name_prefix=start)


def done_among(storage: Storage, phase: str, ids: Iterable[int]) -> list[int]:
    """Which of `ids` (one task's shards) are done, by the rule of `done_shards`, from one
    `prefix_listing` of only the names that start like all of them."""
    wanted = set(ids)
    return [s for s in done_shards(storage, phase, prefix_listing(storage, phase, wanted)) if s in wanted]


# ----------------------------------------------------------------------------- the run folder

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
LATEST = "LATEST"
MODEL_FILES = ("model.safetensors", "config.json")
EMA_FILE = "model_ema.safetensors"  # same keys as model.safetensors: config.json + it is a model
TRAINER_FILE = "trainer.pt"
LOADER_FILE = "loader.json"
RUN_CONFIG = "pipeline.yaml"
CONFIG_COPY = "_config.yaml"  # Storage.write_config's name (storage.py cannot import this module)


def run_dir(run_name: str) -> str:
    """checkpoints/<run>: everything a training run writes."""
    return f"{CHECKPOINTS}/{run_name}"


def step_name(step: int) -> str:
    """The one spelling of a step in names: 100 -> "step-00000100"."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(ref: str | None) -> int | None:
    """The step a checkpoint folder or result is named after (".../step-00000100" -> 100), or None."""
    m = re.search(rf"{STEP_PREFIX}(\d+)$", (ref or "").rstrip("/"))
    return int(m.group(1)) if m else None


def step_dir(run_name: str, step: int) -> str:
    return f"{run_dir(run_name)}/{step_name(step)}"


def latest_file(run_name: str) -> str:
    """The pointer to the newest complete checkpoint (its folder name), written after it."""
    return f"{run_dir(run_name)}/{LATEST}"


def metrics_file(run_name: str) -> str:
    return f"{run_dir(run_name)}/metrics.jsonl"


def loss_curve_file(run_name: str) -> str:
    return f"{run_dir(run_name)}/loss.png"


def tb_dir(run_name: str) -> str:
    """The run's TensorBoard folder."""
    return f"{run_dir(run_name)}/tb"


def eval_results(run_name: str, step_or_name: int | str) -> str:
    """`checkpoints/<run>/eval/step-NNNNNNNN` (or `.../eval/<name>`): where `muse eval` writes its
    `.json` and `.png`."""
    name = step_name(step_or_name) if isinstance(step_or_name, int) else step_or_name
    return f"{run_dir(run_name)}/eval/{name}"


def training_sample(run_name: str, step: int) -> str:
    """The picture `train.sample_every` writes at `step`."""
    return f"{run_dir(run_name)}/samples/{step_name(step)}.png"


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


# Every shard (images/ and encoded/) is written with Parquet page checksums (a CRC32 of each data
# and dictionary page) and read with them verified, so a byte changed after writing is an error at
# its row group whatever train.verify says. Readers take files without checksums (written before)
# as they are: re-encode to protect them.
PAGE_CHECKSUMS = {"write_page_checksum": True}  # the pq.write_table argument of every shard writer


def open_shard(f, verify: bool = True) -> pq.ParquetFile:
    """A Parquet shard from an open file, its page checksums checked on every read (`verify`)."""
    return pq.ParquetFile(f, page_checksum_verification=verify)


def read_problem(e: BaseException) -> str:
    """A Parquet read error as the phrase a DataError gives: a checksum mismatch says the bytes
    changed after writing, anything else (truncated, corrupt footer, unreachable) is unreadable."""
    text = " ".join(str(e).split())
    if "checksum" in text.lower():
        return f"corrupt: a page checksum does not match, the bytes changed after writing ({text})"
    return f"unreadable ({type(e).__name__}: {text})"


def check_encoded_columns(schema: pa.Schema, where: str) -> None:
    """The columns a reader uses must have `encoded_schema`'s types: a flipped byte in the footer
    can rename a column or drop the Arrow schema (vq16 as a variable-size list) and still parse."""
    want = encoded_schema(superres=True)
    for field in want:
        i = schema.get_field_index(field.name)
        if i < 0 and field.name != "vq64":  # vq64: only with encode.superres (the reader says so)
            raise DataError(f"{where}: no column {field.name!r} (columns: {', '.join(schema.names)}): "
                            "the footer is corrupt or this is not an encoded shard; re-run `muse encode`")
        if i >= 0 and schema.field(i).type != field.type:
            raise DataError(f"{where}: column {field.name!r} is {schema.field(i).type}, encoded shards have "
                            f"{field.type}: the footer is corrupt; re-run `muse encode` for this shard")


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


# ----------------------------------------------------------------------------- the eval slice

def eval_position(key: str) -> float:
    """A row's stable place in [0, 1): blake2b-64 of its key / 2**64 (the eval slice is [0, f))."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def in_eval_slice(key: str, eval_holdout: float) -> bool:
    return eval_holdout > 0 and eval_position(key) < eval_holdout


def eval_positions(keys: list[str]) -> np.ndarray:
    """`eval_position` of each key (float64, the same values)."""
    return np.array([eval_position(k) for k in keys], dtype=np.float64)


def trainable_mask(keys: list[str], replaced, eval_holdout: float, drop_replaced: bool,
                   positions: np.ndarray | None = None) -> np.ndarray:
    """The rows the trainer may see: not in the eval slice, and not replaced when those are dropped
    (the one rule, used by the loader and for the counts encode records). `positions`: the keys'
    `eval_positions` when the caller has them (hashed once for several fractions)."""
    keep = np.ones(len(keys), dtype=bool)
    if eval_holdout > 0:  # in_eval_slice, for every key at once
        keep &= ~((eval_positions(keys) if positions is None else positions) < eval_holdout)
    if drop_replaced:
        keep &= ~np.asarray(replaced, dtype=bool)
    return keep


# Trainable rows per row group are recorded at encode time for these eval fractions (each with
# replaced rows kept and dropped; no slice and kept is the row count itself), so a loader with one
# of them counts without reading a row group; any other train.eval_holdout reads the key/replaced
# columns at start as before. Few on purpose: each is a count per row group in every shard record
# and in the shard table (9.2M row groups at LAION-2B scale).
EVAL_LEVELS = (0.0, 0.001, 0.01, 0.05)
TRAINABLE_SETTINGS = [(f, drop) for f in EVAL_LEVELS for drop in (False, True) if f or drop]


def trainable_column(eval_holdout: float, drop_replaced: bool) -> str | None:
    """The shard-table column of trainable rows per row group for these settings (None: not recorded)."""
    if (eval_holdout, drop_replaced) not in TRAINABLE_SETTINGS:
        return None
    return f"train_rows{'_drop' if drop_replaced else ''}@{float(eval_holdout)!r}"


def trainable_counts(keys: list[str], replaced, row_group_size: int) -> dict[str, list[int]]:
    """{trainable_column: trainable rows of each row group} for each of TRAINABLE_SETTINGS: what the
    encoder records per shard (`train_rows` of its record) and the shard table carries."""
    out: dict[str, list[int]] = {}
    positions = eval_positions(keys)  # each key hashed once, not once per setting
    for f, drop in TRAINABLE_SETTINGS:
        mask = trainable_mask(keys, replaced, f, drop, positions)
        out[trainable_column(f, drop)] = [int(mask[i:i + row_group_size].sum())
                                          for i in range(0, len(keys), row_group_size)]
    return out


SHARD_RECORD_SCHEMA = pa.schema([
    pa.field("id", pa.int64()), pa.field("path", pa.string()), pa.field("rows", pa.int64()),
    pa.field("bytes", pa.int64()), pa.field("sha256", pa.string()), pa.field("source", pa.string()),
    pa.field("replaced", pa.int64()),
    pa.field("crc32c", pa.string()),  # GCS's checksum of the file (`storage.crc32c`); null before it was recorded
    pa.field("generation", pa.int64()),  # the image (and encoded) generation this shard is; null: 0, written before
])
TRAINABLE_COLUMNS = [trainable_column(f, drop) for f, drop in TRAINABLE_SETTINGS]
SHARD_TABLE_SCHEMA = pa.schema(list(SHARD_RECORD_SCHEMA) + [pa.field(c, pa.list_(pa.int32()))
                                                              for c in TRAINABLE_COLUMNS])


def write_manifest(storage: Storage, ds: str, *, shards: list[dict], text_dim: int, codebook_size: int,
                   empty_caption: dict, superres: bool, encode: dict, models: dict | None = None,
                   pending: list[int] | None = None) -> dict:
    """Write `<ds>/_SHARDS.parquet` (the shard records, one row each, by id), then `<ds>/_MANIFEST.json`
    (a small header naming the table and its sha256); call it last (readers trust it). Returns the
    manifest as `read_manifest` does, shards included."""
    shards = sorted(shards, key=lambda r: r["id"])
    table = pa.Table.from_pylist([{k: r.get(k) for k in SHARD_RECORD_SCHEMA.names} | (r.get("train_rows") or {})
                                  for r in shards], schema=SHARD_TABLE_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(f"{ds}/{SHARD_TABLE}", buf.getvalue())
    manifest = {
        "schema_version": SCHEMA_VERSION, "version": ds.rsplit("/", 1)[-1],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": models or {},
        "encode": encode, "text_dim": text_dim, "grid": GRID_BASE,
        "superres_grid": GRID_SUPERRES if superres else None, "codebook_size": codebook_size,
        "empty_caption": empty_caption,
        "rows": sum(s["rows"] for s in shards), "replaced": sum(s.get("replaced") or 0 for s in shards),
        "shard_table": {"path": SHARD_TABLE, "shards": len(shards),
                        "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
        "pending": list(pending or []),
    }
    storage.write_json(f"{ds}/{MANIFEST}", manifest)
    return {**manifest, "shards": _shard_records(table)}


def _shard_records(table: pa.Table) -> list[dict]:
    """The table's rows as the records encode wrote, less the per-row-group counts (columns a record
    lacked are left out)."""
    table = table.select([c for c in SHARD_RECORD_SCHEMA.names if c in table.column_names])
    return [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]


def read_manifest(storage: Storage, ds: str) -> dict:
    """The manifest with its shard records under "shards": two reads whatever the shard count.
    A manifest edited by hand to list its shards inline (e.g. a subset) is used as it is.
    DataError for a manifest of another SCHEMA_VERSION."""
    rel = f"{ds}/{MANIFEST}"
    if not storage.exists(rel):
        raise DataError(f"no encoded dataset: {storage.url(rel)} does not exist; run `muse encode` "
                        "with the same encode settings first (the dataset version is a hash of them)")
    manifest = storage.read_json(rel)
    check_version(manifest.get("schema_version"), SCHEMA_VERSION, storage.url(rel),
                  f"encode the dataset again with this code (delete {storage.url(ds)}, then `muse encode`)")
    if "shards" in manifest:
        return manifest
    table = read_shard_table(storage, ds, manifest, list(SHARD_RECORD_SCHEMA.names))
    return {**manifest, "shards": _shard_records(table)}


def read_shard_table(storage: Storage, ds: str, manifest: dict, columns: list[str]) -> pa.Table:
    """Some columns of the manifest's shard table (rows by id; those it lacks are left out), checked
    against the header's sha256."""
    ref = manifest["shard_table"]
    table_rel = f"{ds}/{ref['path']}"
    try:
        data = storage.read_bytes(table_rel)
    except FileNotFoundError:
        raise DataError(f"{storage.url(table_rel)}: named by {storage.url(f'{ds}/{MANIFEST}')} but missing; "
                        "re-run `muse encode` to finalize the dataset again") from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise DataError(f"{storage.url(table_rel)} does not match {storage.url(f'{ds}/{MANIFEST}')} (sha256): "
                        "the dataset was finalized again while it was read; retry, or re-run `muse encode`")
    pf = pq.ParquetFile(io.BytesIO(data))
    return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
