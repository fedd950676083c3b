"""Streaming training data: encoded Parquet row groups -> padded batches, with exact resume.

The order of samples is a pure function of (seed, manifest, world size, batch size, streams,
grad_accum), independent of the number of DataLoader workers, so a run resumed with a different
`train.num_workers` sees the same sequence as an uninterrupted one. One epoch is one pass:

* a *unit* is one Parquet row group of a shard listed in `_MANIFEST.json` (nothing else is read);
  its trainable rows (not in the eval slice, not dropped as replaced) are counted before any
  batch is cut: from the manifest (row counts, or the per-row-group counts encode recorded for
  the filter, `layout.trainable_counts`), else from the key/replaced columns;
* epoch e visits the units in the permutation `rng([seed, e])`: a sequence of N trainable rows.
  Each of the W ranks gets M micro-batches of B rows per epoch, M the largest multiple of
  lcm(S, grad_accum) with W*M*B <= N; the N - W*M*B rows at the end of the sequence are
  dropped this epoch (`dropped_rows`; a different unit order drops other rows next epoch);
* rank r reads the contiguous slice [r*M*B, (r+1)*M*B) of the sequence; its stream s of S
  (`train.loader_streams`) reads the sub-slice s of S through its own shuffle buffer (seeded by
  seed, rank, stream, epoch), which drains at the end of the epoch, so every row of the epoch
  is cut into a batch exactly once;
* rank-local micro-batch g lies in epoch g // M and comes from stream g % S (S divides M).
  Worker w of k (k divides S) produces batches g0+w, g0+w+k, ..., which are exactly the
  streams it owns, and DataLoader's round-robin returns g0, g0+1, ... whatever k is.

The eval slice (`train.eval_holdout` = f): a row whose key hashes below f (`layout.eval_position`:
blake2b-64 of the UTF-8 key as a fraction of 2**64) is never put in a shuffle buffer, so the
trainer never sees it; `iter_eval_rows` yields exactly those rows. The hash ignores the seed
and the world size, so the slice is the same for every run on the data, and a larger f
holds out a superset.

Resume state: every batch carries the state of its stream after it was cut (epoch, rows of its
slice read, the buffer as (unit, row) indices, RNG state) in keys that only this module reads:
`StreamingDataset.consume(batch)` strips them and keeps the last one per stream and the next batch
number, which `state_dict()` returns (the loader state saved in checkpoints) and
`load_state_dict()` continues from. A DataError in a DataLoader worker comes back in-band and
`consume` raises it (raised in the main process it is raised as usual).

Under faults: a row group that cannot be read once the storage layer's retries are spent (an I/O
error, a corrupt page, a row count that is not the planned one) is a `RowGroupError` naming the
shard and row group. With `on_data_error="skip"` the stream skips it instead: its rows are not in
this epoch's slice, the stream reads on (into its next epoch when the slice runs dry, so it still
cuts full batches: the rank's batch count, and so its collectives, do not change) and the batch
carries the skipped row group's message (`consume` keeps it for `take_skipped`). A stream that
can read none of `MAX_FAILED_IN_A_ROW` row groups in a row (or of all of them) stops with a
DataError: the storage is down, not one shard.
"""

from __future__ import annotations

import hashlib
import math
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from muse.layout import (GRID_BASE, GRID_SUPERRES, IMAGES, MANIFEST, DataError, check_encoded_columns,
                         format_shard_id, in_eval_slice, open_shard, parse_shard_id, read_manifest, read_problem,
                         read_shard_table, shard_name, t5_from_bytes, trainable_column, trainable_mask)
from muse.lifecycle import die_with_parent
from muse.masking import pad_embeddings
from muse.storage import RetryPolicy, Storage

if TYPE_CHECKING:
    from muse.config import PipelineConfig


@dataclass(frozen=True)
class Unit:
    path: str        # relative to the storage root
    row_group: int
    rows: int


class RowGroupError(DataError):
    """A row group that cannot be read (storage error after the retries, corrupt bytes, a footer
    that is not an encoded shard's) or holds other rows than planned; the message names the shard
    and row group. `on_data_error="skip"` skips exactly these."""


MAX_FAILED_IN_A_ROW = 64  # distinct unreadable row groups in a row after which skipping stops


class Units:
    """The loader's units as arrays (shard index, row group, rows): 12 bytes a row group where a
    `Unit` object costs ~125 (LAION-2B: 9.2M row groups, ~1.1 GB per rank and loader worker)."""

    def __init__(self, paths: list[str], shard: np.ndarray, row_group: np.ndarray, rows: np.ndarray):
        self.paths = paths
        self.shard, self.row_group, self.rows = (np.asarray(a, dtype=np.int32) for a in (shard, row_group, rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, u: int) -> Unit:
        return Unit(self.paths[self.shard[u]], int(self.row_group[u]), int(self.rows[u]))

    def __iter__(self):
        return (self[u] for u in range(len(self)))


def list_units(storage: Storage, dataset_dir: str, manifest: dict) -> Units:
    """Row groups of the manifest's shards (by id), from row counts and the fixed row-group size."""
    rg = (manifest.get("encode") or {}).get("row_group_size")
    shards = sorted(manifest["shards"], key=lambda s: s["id"])
    paths = [f"{dataset_dir}/{s['path']}" for s in shards]
    if rg:  # every row group full but each shard's last
        rows = np.array([s["rows"] for s in shards], dtype=np.int64)
        groups = -(-rows // rg)
        shard = np.repeat(np.arange(len(shards)), groups)
        row_group = np.arange(int(groups.sum())) - np.repeat(np.cumsum(groups) - groups, groups)
        units = Units(paths, shard, row_group, np.minimum(rg, rows[shard] - row_group * rg))
    else:  # no row-group size recorded: read the footers
        found = []
        for i, path in enumerate(paths):
            with storage.open(path) as f:
                md = pq.ParquetFile(f).metadata
                found += [(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)
                          if md.row_group(g).num_rows > 0]
        found = np.array(found, dtype=np.int64).reshape(-1, 3)
        units = Units(paths, found[:, 0], found[:, 1], found[:, 2])
    if not len(units):
        raise DataError(f"{storage.url(dataset_dir)}/{MANIFEST} lists no rows; re-run `muse encode`")
    return units


def verify_shards(storage: Storage, dataset_dir: str, manifest: dict, sha256: bool = False,
                  rank: int = 0, world: int = 1) -> None:
    """Each shard's byte size and, on GCS, its crc32c (both from one listing of the folder, whatever
    the shard count: GCS lists every object's crc32c) and, with sha256, its hash (a full read)
    against the manifest; rank r checks shards r, r + world, ... -> DataError naming it."""
    listing = storage.stat(dataset_dir)
    for shard in sorted(manifest["shards"], key=lambda s: s["id"])[rank::world]:
        rel = f"{dataset_dir}/{shard['path']}"
        fix = "re-run `muse encode` (or set train.verify: none to train on it anyway)"
        if rel not in listing:
            raise DataError(f"{storage.url(rel)}: listed in the manifest but missing: {fix}")
        size, crc = listing[rel]
        if "bytes" in shard and size != shard["bytes"]:
            raise DataError(f"{storage.url(rel)}: {size} bytes, the manifest says {shard['bytes']}: "
                            f"the shard changed or was cut short after encoding: {fix}")
        if crc and shard.get("crc32c") and crc != shard["crc32c"]:
            raise DataError(f"{storage.url(rel)}: crc32c {crc}, the manifest says {shard['crc32c']}: "
                            f"the shard changed after encoding: {fix}")
        if sha256 and "sha256" in shard:
            h = hashlib.sha256()
            with storage.open(rel) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise DataError(f"{storage.url(rel)}: sha256 {h.hexdigest()[:12]}..., the manifest says "
                                f"{shard['sha256'][:12]}...: the shard changed after encoding: {fix}")


LOADER_VERSION = 2  # 2: epochs are exact passes (the plan in the module docstring)
FINGERPRINT_BLOCK = 1024  # shard ids per block digest: a change is named to within this many ids


def loader_fingerprint(manifest: dict, *, seed: int, streams: int, batch_size: int, shuffle_buffer: int,
                       world_size: int, replaced_rows: str, grad_accum: int = 1) -> dict:
    """What a saved loader state is valid for: the manifest's shards (`shards_fingerprint`, with each
    shard's generation) and the settings that fix the sample order. Saved with the loader state;
    see `loader_changes`."""
    shards = {int(s["id"]): s.get("sha256") or f"{s.get('bytes')}b/{s['rows']}r" for s in manifest["shards"]}
    generations = {int(s["id"]): int(s.get("generation") or 0) for s in manifest["shards"]}
    return {"shards": shards_fingerprint(shards, generations), "loader_version": LOADER_VERSION, "seed": seed,
            "loader_streams": streams, "batch_size": batch_size, "grad_accum": grad_accum,
            "shuffle_buffer": shuffle_buffer, "replaced_rows": replaced_rows, "world_size": world_size}


def _ranges(ids: list[int]) -> str:
    """Sorted ids as ranges: [0, 1, 2, 7] -> "0-2,7" (`_ids_of` is its inverse)."""
    ranges: list[list[int]] = []
    for i in ids:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges)


def shards_fingerprint(shards: dict[int, str], generations: dict[int, int] | None = None) -> dict:
    """{id: sha256 (or bytes/rows)} -> a few kB whatever the shard count: the count, the ids as
    ranges ("0-229999"), a sha256 of everything and a 64-bit digest per block of FINGERPRINT_BLOCK
    ids, so a change is named: added and removed ids exactly, a changed shard by its block.
    `generations` {id: generation}: the ids of each generation >= 1 as ranges ({"1": "3,17-19"};
    absent when every shard is generation 0), so a shard that a retry pass rewrote is named exactly."""
    ids = sorted(shards)
    blocks = {}
    for i in ids:
        blocks.setdefault(i // FINGERPRINT_BLOCK, hashlib.sha256()).update(f"{i}:{shards[i]}\n".encode())
    everything = hashlib.sha256("".join(f"{i}:{shards[i]}\n" for i in ids).encode()).hexdigest()
    out = {"count": len(ids), "ids": _ranges(ids), "sha256": everything,
           "blocks": {format_shard_id(b * FINGERPRINT_BLOCK): h.hexdigest()[:16] for b, h in blocks.items()}}
    by_gen: dict[int, list[int]] = {}
    for i in ids:
        if (generations or {}).get(i):
            by_gen.setdefault(generations[i], []).append(i)
    if by_gen:
        out["generations"] = {str(g): _ranges(members) for g, members in sorted(by_gen.items())}
    return out


def _ids_of(ranges: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, ranges.split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _generations_of(fingerprint: dict) -> dict[int, int]:
    """{id: generation} of the shards of generation >= 1 (a fingerprint saved before generations: none)."""
    return {i: int(g) for g, ranges in (fingerprint.get("generations") or {}).items() for i in _ids_of(ranges)}


def _named(what: str, names: list[str]) -> str:
    return f"{what}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def shards_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two `shards_fingerprint`s, one phrase each ([] = the same). A shard whose
    generation changed is named with both ("shard 00003: generation 0 -> 1 ..."); its block is not
    named again as changed."""
    if saved["sha256"] == now["sha256"]:
        return []
    old, new = _ids_of(saved["ids"]), _ids_of(now["ids"])
    g_old, g_new = _generations_of(saved), _generations_of(now)
    regen = sorted(i for i in old & new if g_old.get(i, 0) != g_new.get(i, 0))
    # blocks with added or removed ids, or a shard of another generation: named as such
    moved = {i // FINGERPRINT_BLOCK for i in (old ^ new) | set(regen)}
    changed = sorted((b for b in set(saved["blocks"]) | set(now["blocks"]) if saved["blocks"].get(b) !=
                      now["blocks"].get(b) and parse_shard_id(b) // FINGERPRINT_BLOCK not in moved), key=parse_shard_id)
    out = []
    for what, ids in (("shards added", sorted(new - old)), ("shards removed", sorted(old - new)),
                      ("shards changed in ids", [f"{b}-{format_shard_id(parse_shard_id(b) + FINGERPRINT_BLOCK - 1)}"
                                                 for b in changed])):
        if ids:
            out.append(_named(what, [format_shard_id(i) if isinstance(i, int) else i for i in ids]))
    for i in regen[:5]:
        a, b = g_old.get(i, 0), g_new.get(i, 0)
        why = "a retry pass re-fetched rows" if b > a else "an older generation is in force again"
        out.append(f"shard {format_shard_id(i)}: generation {a} -> {b} ({why})")
    if len(regen) > 5:
        out.append(f"and {len(regen) - 5} more shards of another generation")
    return out or [f"shards changed ({saved['count']} -> {now['count']} shards)"]


def loader_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two `loader_fingerprint`s, one phrase each ([] = the same)."""
    out = shards_changes(saved["shards"], now["shards"])
    for key, value in now.items():
        if key != "shards" and saved.get(key) != value:
            name = {"world_size": "world size", "loader_version": "loader version"}.get(key, f"train.{key}")
            out.append(f"{name} {saved.get(key)} -> {value}")
    return out


def recorded_counts(storage: Storage, dataset_dir: str, manifest: dict, eval_holdout: float,
                    drop_replaced: bool) -> np.ndarray | None:
    """Trainable rows per row group (shards by id, row groups in order) as encode recorded them in
    the shard table (`layout.trainable_counts`); None when not recorded for these settings."""
    column = trainable_column(eval_holdout, drop_replaced)
    table = read_shard_table(storage, dataset_dir, manifest, ["id", "rows", "sha256", column]) if column else None
    if table is None or column not in table.column_names or table.column(column).null_count:
        return None
    listed = sorted(manifest["shards"], key=lambda s: s["id"])  # a manifest edited by hand lists others
    if [(s["id"], s["rows"], s.get("sha256")) for s in listed] != list(zip(*(table.column(c).to_pylist()
                                                                            for c in ("id", "rows", "sha256")))):
        return None
    return table.column(column).combine_chunks().flatten().to_numpy().astype(np.int64)


class _UnitData:
    """One decoded row group: T5 packed [sum L, D] fp16 + offsets, ids, keys, replaced."""

    def __init__(self, table: pa.Table, text_dim: int, superres: bool, where: str):
        n = table.num_rows
        self.keys = table.column("key").to_pylist()
        self.replaced = table.column("replaced").to_numpy(zero_copy_only=False)
        lens = table.column("t5_len").to_numpy().astype(np.int64)
        t5 = table.column("t5").combine_chunks()
        # Zero-copy view of the binary column's data buffer: rows are contiguous fp16 bytes.
        offsets = np.frombuffer(t5.buffers()[1], dtype=np.int32, count=n + 1, offset=t5.offset * 4)
        data = np.frombuffer(t5.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        if data.size != int(lens.sum()) * text_dim * 2:
            raise DataError(f"{where}: t5 bytes do not match t5_len x text_dim ({text_dim}); "
                            "was it encoded with another text model? re-run `muse encode`")
        self.t5 = torch.frombuffer(bytearray(data), dtype=torch.float16).view(-1, text_dim)
        self.start = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)[:-1]]))
        self.lens = torch.from_numpy(lens)
        self.vq16 = torch.from_numpy(_ids(table, "vq16", GRID_BASE ** 2, where))
        self.vq64 = torch.from_numpy(_ids(table, "vq64", GRID_SUPERRES ** 2, where)) if superres else None


def _ids(table: pa.Table, col: str, size: int, where: str) -> np.ndarray:
    if col not in table.column_names:
        raise DataError(f"{where}: no column {col!r}; encode with encode.superres=true for the superres model")
    values = table.column(col).combine_chunks().flatten().to_numpy()
    return values.astype(np.int64).reshape(-1, size)


def collate(rows: list[tuple[_UnitData, int]], replaced_weight: float | None = None) -> dict:
    """Rows -> batch: T5 padded to the longest caption + bool mask (True = real token)."""
    hidden, mask = pad_embeddings([u.t5[int(u.start[i]):int(u.start[i] + u.lens[i])] for u, i in rows],
                                  dtype=torch.float16)
    out = {
        "encoder_hidden_states": hidden, "encoder_attention_mask": mask,
        "vq16": torch.stack([u.vq16[i] for u, i in rows]),
        "replaced": torch.tensor([bool(u.replaced[i]) for u, i in rows]),
        "keys": [u.keys[i] for u, i in rows],
    }
    if rows[0][0].vq64 is not None:
        out["vq64"] = torch.stack([u.vq64[i] for u, i in rows])
    if replaced_weight is not None:
        out["weights"] = torch.where(out["replaced"], replaced_weight, 1.0)
    return out


def batches_per_epoch(train_rows: int, world_size: int, batch_size: int, streams: int, grad_accum: int) -> int:
    """M: micro-batches per rank per epoch, a multiple of lcm(streams, grad_accum) (the epoch plan
    of the module docstring; `StreamingDataset` and `muse plan` both call this)."""
    if not train_rows:
        raise DataError("no row of the dataset can be trained on: every row is a replaced "
                        "placeholder (set train.replaced_rows to keep or downweight) or in the "
                        "eval slice (lower train.eval_holdout)")
    step = math.lcm(streams, grad_accum)
    m = train_rows // (world_size * batch_size) // step * step
    if not m:
        raise DataError(f"{train_rows} trainable rows make fewer than {step} batches of "
                        f"{batch_size} per rank for {world_size} rank(s): an epoch needs at least "
                        f"lcm(train.loader_streams, train.grad_accum) = {step} per rank; lower "
                        "train.loader_streams or train.batch_size, or encode more data")
    return m


def total_steps(max_steps: int | None, epochs: int, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of a run: train.max_steps, else train.epochs exact passes (M is a multiple of
    grad_accum, so the last step ends the last epoch exactly). The trainer and `muse plan` use it."""
    return max_steps or epochs * batches_per_epoch // grad_accum


@dataclass(frozen=True)
class LoaderSettings:
    """What fixes the batches and their order: the `train.*` keys of pipeline.yaml named in
    `from_config` (and model.kind, for the 64x64 ids of the super-res model)."""
    seed: int = 0
    batch_size: int = 16               # per rank, per micro-step
    grad_accum: int = 1                # an epoch ends on a whole optimizer step
    streams: int = 8                   # train.loader_streams: fixed order whatever num_workers
    shuffle_buffer: int = 2048         # rows per stream
    superres: bool = False             # also read the 64x64 ids (vq64)
    replaced_rows: str = "keep"        # keep | drop | downweight
    replaced_weight: float = 0.1
    eval_holdout: float = 0.0          # rows hashing below it are never trained on
    on_data_error: str = "stop"        # stop | skip a RowGroupError (same order while every read succeeds)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> LoaderSettings:
        t = cfg.train
        return cls(seed=t.seed, batch_size=t.batch_size, grad_accum=t.grad_accum, streams=t.loader_streams,
                   shuffle_buffer=t.shuffle_buffer, superres=cfg.model.kind == "superres",
                   replaced_rows=t.replaced_rows, replaced_weight=t.replaced_weight, eval_holdout=t.eval_holdout,
                   on_data_error=t.on_data_error)


class StreamingDataset(IterableDataset):
    """Endless stream of batches (dicts, see `collate`) for one rank; see the module docstring.

    Use with `DataLoader(ds, batch_size=None, num_workers=k)`, k dividing `settings.streams` (0 = all
    streams in the main process). Storage is created inside each worker (gcsfs is not fork-safe).
    `batches_per_epoch` (M) and `dropped_rows` are known once it is built.

    Resume: pass every batch taken from the loader through `consume`; `state_dict()` is then the
    position after it (one rank's entry of loader.json), `load_state_dict` continues from one, and
    `fingerprint()` says what such a state is valid for.
    """

    def __init__(self, root_uri: str, dataset_dir: str, settings: LoaderSettings = LoaderSettings(),
                 rank: int = 0, world_size: int = 1, *, gcs_project: str | None = None,
                 retry: RetryPolicy | None = None, page_checksums: bool = True):
        s = self.settings = settings
        self.page_checksums = page_checksums  # off only to measure their cost (bench/loader.py)
        self.retry = retry  # storage.retries / timeout_s / deadline_s, in every worker too
        storage = Storage(root_uri, gcs_project, retry)
        self.manifest = read_manifest(storage, dataset_dir)
        self.units = list_units(storage, dataset_dir, self.manifest)
        self.root_uri, self.gcs_project, self.dataset_dir = root_uri, gcs_project, dataset_dir
        self.rank, self.world_size, self.seed = rank, world_size, s.seed
        self.buffer_size, self.batch_size, self.streams = max(s.shuffle_buffer, s.batch_size), s.batch_size, s.streams
        self.superres, self.replaced_rows, self.replaced_weight = s.superres, s.replaced_rows, s.replaced_weight
        self.text_dim = int(self.manifest["text_dim"])
        self.eval_holdout, self.on_data_error = s.eval_holdout, s.on_data_error
        self._skipped: list[str] = []                  # skipped row groups' messages (`take_skipped`)
        self._start = {"batch": 0, "streams": {}}      # where iteration starts (load_state_dict)
        self._position = {"batch": 0, "streams": {}}   # after the last consumed batch
        self.counts = self._trainable_counts(storage)
        self.train_rows = int(self.counts.sum())
        self.batches_per_epoch = self._plan(s.grad_accum)
        self.dropped_rows = self.train_rows - world_size * self.batches_per_epoch * s.batch_size
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._fingerprint = loader_fingerprint(self.manifest, seed=s.seed, streams=s.streams, batch_size=s.batch_size,
                                               shuffle_buffer=s.shuffle_buffer, world_size=world_size,
                                               replaced_rows=s.replaced_rows, grad_accum=s.grad_accum)
        # the shard records (~143 MB of dicts at 230,000 shards) are in `units` now: not carried to workers
        self.manifest = {k: v for k, v in self.manifest.items() if k != "shards"}

    # -- the epoch plan
    def trainable(self, keys: list[str], replaced) -> np.ndarray:
        """Indices of a unit's rows the trainer may see (the same filter at planning and loading)."""
        return np.flatnonzero(trainable_mask(keys, replaced, self.eval_holdout, self.replaced_rows == "drop"))

    def _trainable_counts(self, storage: Storage) -> np.ndarray:
        """Trainable rows per unit: the manifest's row counts, or (with a filter) the counts encode
        recorded in the shard table for it, or else (older data, an unrecorded eval_holdout) the
        key/replaced columns read once (small next to the T5 column), so the plan is exact."""
        if not self.eval_holdout and self.replaced_rows != "drop":
            return self.units.rows.astype(np.int64)
        recorded = recorded_counts(storage, self.dataset_dir, self.manifest, self.eval_holdout,
                                   self.replaced_rows == "drop")
        if recorded is not None and len(recorded) == len(self.units):
            return recorded
        return np.array([len(self.trainable(t.column("key").to_pylist(), t.column("replaced").to_numpy(zero_copy_only=False)))
                         for t in (read_unit(storage, u, ["key", "replaced"], self.page_checksums)
                                   for u in self.units)], dtype=np.int64)

    def _plan(self, grad_accum: int) -> int:
        return batches_per_epoch(self.train_rows, self.world_size, self.batch_size, self.streams, grad_accum)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit permutation, cumulative trainable rows before each position [U + 1]) of an epoch."""
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
            self._orders[epoch] = (perm, np.concatenate([[0], np.cumsum(self.counts[perm])]))
            for old in [e for e in self._orders if e < epoch - 1]:  # streams differ by one epoch at most
                del self._orders[old]
        return self._orders[epoch]

    def stream_slice(self, stream: int) -> tuple[int, int]:
        """(first row, rows) of a stream's part of every epoch's row sequence."""
        rows = self.batches_per_epoch // self.streams * self.batch_size
        return self.rank * self.batches_per_epoch * self.batch_size + stream * rows, rows

    def mixing_warning(self) -> str | None:
        """Why the shuffle buffers may mix too little: a stream's buffer holds rows of fewer than
        two row groups at a time, so a batch comes mostly from one or two of them."""
        per_unit = int(np.median(self.counts))
        if self.buffer_size < 2 * per_unit:
            return (f"train.shuffle_buffer {self.buffer_size} is less than two row groups ({per_unit} rows each): "
                    "batches mix rows of only one or two row groups at a time; raise it to at least "
                    f"{2 * per_unit} (memory: rows x T5 size per stream)")
        return None

    # -- resume state
    def fingerprint(self) -> dict:
        """What this loader's states are valid for (`loader_fingerprint`; see `loader_changes`)."""
        return dict(self._fingerprint)

    def consume(self, batch: dict) -> dict:
        """A batch as the trainer takes it from the DataLoader -> the batch without the position
        keys `__iter__` added (recorded for `state_dict`); a DataError from a worker is raised here."""
        if "_error" in batch:  # a DataError in a worker, passed on as one line (see __iter__)
            raise DataError(batch["_error"])
        self._skipped += batch.pop("_skipped")
        self._position["streams"][batch.pop("_stream")] = batch.pop("_state")
        self._position["batch"] = batch.pop("_batch") + 1
        return batch

    def take_skipped(self) -> list[str]:
        """Messages of the row groups skipped (on_data_error="skip") in the batches consumed since
        the last call, one per skip."""
        out, self._skipped = self._skipped, []
        return out

    @property
    def next_batch(self) -> int:
        """Rank-local number of the next micro-batch (batches_per_epoch of them an epoch)."""
        return self._position["batch"]

    def state_dict(self) -> dict:
        """The position after the last consumed batch, as JSON: each stream's state after its last
        batch and the next batch number (this rank's entry of a checkpoint's loader.json)."""
        return {"batch": self._position["batch"], "eval_holdout": self.eval_holdout,
                "streams": {str(s): _stream_json(v) for s, v in self._position["streams"].items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state["batch"]` with the saved stream states (a `state_dict()`); call
        before iterating."""
        saved = float(state.get("eval_holdout", 0.0))
        if saved != self.eval_holdout:  # the saved buffers hold row indices chosen with the old slice
            raise DataError(f"the checkpoint was trained with train.eval_holdout={saved}, this run has "
                            f"{self.eval_holdout}; keep it (exact resume) or start over with --resume none")
        if any("epoch" not in v for v in state["streams"].values()):
            raise DataError(f"the checkpoint's loader state was written by an older loader (version < "
                            f"{LOADER_VERSION}): --set train.on_data_change=new_pass or --resume none")
        self._start = {"batch": int(state["batch"]), "streams": {int(k): v for k, v in state["streams"].items()}}
        self._position = {"batch": self._start["batch"], "streams": dict(self._start["streams"])}

    # -- iteration
    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.streams % nw:
            raise ValueError(f"train.num_workers ({nw}) must divide train.loader_streams ({self.streams})")
        if info:
            torch.set_num_threads(1)  # decoding threads fight the trainer on small machines
        storage = Storage(self.root_uri, self.gcs_project, self.retry)  # per worker: gcsfs is not fork-safe
        g = self._start["batch"] + wid
        streams: dict[int, _Stream] = {}
        while True:
            s = g % self.streams  # == (g % M) % S: S divides M
            try:
                if s not in streams:
                    streams[s] = _Stream(self, storage, s, self._start["streams"].get(s))
                batch = streams[s].next_batch()
            except DataError as e:
                if not info:
                    raise
                # from a worker: in-band, so the trainer can print this one line (DataLoader
                # would re-raise it with the worker's traceback inside the message)
                yield {"_error": str(e)}
                return
            batch["_batch"], batch["_stream"], batch["_state"] = g, s, streams[s].state()  # see `consume`
            batch["_skipped"] = streams[s].take_skipped()
            yield batch
            g += nw


def _stream_json(stream_state: dict) -> dict:
    return {"epoch": int(stream_state["epoch"]), "pos": int(stream_state["pos"]), "rng": stream_state["rng"],
            "buffer": np.asarray(stream_state["buffer"]).tolist()}


def read_unit(storage: Storage, unit: Unit, columns: list[str] | None = None,
              page_checksums: bool = True) -> pa.Table:
    """One row group (optionally some columns), its page checksums verified, every read error
    (a checksum mismatch, a storage error after its retries) as a RowGroupError naming the shard
    and row group."""
    where = f"{storage.url(unit.path)} row group {unit.row_group}"
    try:
        with storage.open(unit.path) as f:
            pf = open_shard(f, page_checksums)
            check_encoded_columns(pf.schema_arrow, where)
            table = pf.read_row_group(unit.row_group, columns=columns)
    except FileNotFoundError:
        raise RowGroupError(f"{where}: listed in the manifest but missing: re-run `muse encode`") from None
    except DataError as e:  # a footer that parses but is not an encoded shard's
        raise RowGroupError(str(e)) from None
    except Exception as e:  # truncated, corrupt, unreachable; anything else is a bug: raised as is
        if not _read_failed(e):
            raise
        raise RowGroupError(f"{where}: {read_problem(e)}: re-run `muse encode` "
                            "for this shard, or check the storage") from None
    if table.num_rows != unit.rows:
        raise RowGroupError(f"{where}: {table.num_rows} rows, the manifest says {unit.rows}; "
                            "the shard changed after encoding, re-run `muse encode`")
    return table


def _read_failed(e: BaseException) -> bool:
    """An error of reading stored bytes: I/O (OSError: the storage's IntegrityError, a 403, a
    reset), Parquet decoding (ArrowException), or what gcsfs raises once its retries are spent
    (HttpError, requests/aiohttp errors: not OSErrors)."""
    from gcsfs.retry import HttpError

    from muse.transient import is_transient

    return isinstance(e, (OSError, pa.ArrowException, HttpError)) or is_transient(e)


class _Stream:
    """One stream: its slice of each epoch's row sequence through a shuffle buffer of (unit, row)."""

    def __init__(self, ds: StreamingDataset, storage: Storage, stream: int, state: dict | None):
        self.ds, self.storage, self.stream = ds, storage, stream
        self.cache: dict[int, tuple[_UnitData, np.ndarray]] = {}
        self.skipped: list[str] = []        # messages of skipped row groups, until the next batch takes them
        self.failing: set[int] = set()      # units that failed since the last one read (on_data_error=skip)
        self.first, self.rows = ds.stream_slice(stream)
        self._start_epoch(int(state["epoch"]) if state else 0)
        if state:
            self.j = int(state["pos"])
            self.rng.bit_generator.state = state["rng"]
            self.buffer = [tuple(x) for x in state["buffer"]]

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.j, self.buffer = epoch, 0, []  # j: rows of this epoch's slice read
        self.rng = np.random.default_rng([self.ds.seed, self.ds.rank, self.stream, epoch, 7])

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.j, "rng": self.rng.bit_generator.state,
                "buffer": np.asarray(self.buffer, dtype=np.int64).reshape(-1, 2)}

    def take_skipped(self) -> list[str]:
        out, self.skipped = self.skipped, []
        return out

    def _load(self, u: int) -> tuple[_UnitData, np.ndarray] | None:
        """A unit's data and its trainable row indices; None when it cannot be read and
        on_data_error is skip (the message goes to `skipped`)."""
        if u not in self.cache:
            try:
                self.cache[u] = self._read(u)
            except RowGroupError as e:
                if self.ds.on_data_error != "skip":
                    raise
                self._skip(u, e)
                return None
            self.failing.clear()
        return self.cache[u]

    def _read(self, u: int) -> tuple[_UnitData, np.ndarray]:
        unit = self.ds.units[u]
        where = f"{self.storage.url(unit.path)} row group {unit.row_group}"
        data = _UnitData(read_unit(self.storage, unit, page_checksums=self.ds.page_checksums),
                         self.ds.text_dim, self.ds.superres, where)
        rows = self.ds.trainable(data.keys, data.replaced)
        if len(rows) != self.ds.counts[u]:
            raise RowGroupError(f"{where}: {len(rows)} trainable rows, {self.ds.counts[u]} when the run "
                                "started: the shard changed during the run, re-run `muse encode`")
        return data, rows

    def _skip(self, u: int, e: RowGroupError) -> None:
        """Skip a unit that cannot be read; give up when every recent read failed (storage down)."""
        self.failing.add(u)
        if len(self.failing) >= min(MAX_FAILED_IN_A_ROW, len(self.ds.units)):
            raise DataError(f"rank {self.ds.rank}: the last {len(self.failing)} row groups read all failed, "
                            f"the last with {e}: stopping although train.on_data_error is skip")
        self.skipped.append(str(e))
        self.buffer = [x for x in self.buffer if x[0] != u]  # rows of it restored from a checkpoint

    def _fill(self) -> None:
        """Read on through the slice until the buffer is full (or the slice is read); a skipped
        unit's rows are passed over."""
        perm, cum = self.ds.epoch_order(self.epoch)
        while len(self.buffer) < self.ds.buffer_size and self.j < self.rows:
            at = self.first + self.j
            p = int(np.searchsorted(cum, at, side="right")) - 1  # cum[p] <= at < cum[p + 1]
            u = int(perm[p])
            k = at - int(cum[p])
            take = min(int(self.ds.counts[u]) - k, self.rows - self.j)
            if (loaded := self._load(u)) is not None:
                self.buffer += [(u, int(i)) for i in loaded[1][k:k + take]]
            self.j += take

    def _pick(self) -> tuple[int, int]:
        """One (unit, row) drawn from the buffer, refilled first. Only after skips can the slice
        run dry mid-batch: the stream then goes on into its next epoch."""
        while True:
            self._fill()
            if not self.buffer:
                self._start_epoch(self.epoch + 1)
                continue
            k = int(self.rng.integers(len(self.buffer)))
            self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
            u, i = self.buffer.pop()
            if self._load(u) is not None:  # None: a unit of a restored buffer, unreadable now
                return u, i

    def next_batch(self) -> dict:
        if self.j == self.rows and not self.buffer:  # the slice has B * M / S rows: batches end with it
            self._start_epoch(self.epoch + 1)
        picked = [self._pick() for _ in range(self.ds.batch_size)]
        rows = [(self.cache[u][0], i) for u, i in picked]
        live = {u for u, _ in self.buffer}
        for u in [u for u in self.cache if u not in live]:
            del self.cache[u]  # no row of it left in the buffer
        weight = self.ds.replaced_weight if self.ds.replaced_rows == "downweight" else None
        return collate(rows, weight)


def iter_eval_rows(storage: Storage, dataset_dir: str, eval_holdout: float):
    """The eval slice in shard order: dicts {key, caption, replaced, shard_id, source, t5 [L, D] float32};
    `source`: the image shard (generation) the row was encoded from, as its record names it.

    Reads the key column of each row group and the other columns only where a key is in the slice.
    """
    manifest = read_manifest(storage, dataset_dir)
    dim = int(manifest["text_dim"])
    if not eval_holdout:
        return
    for shard in sorted(manifest["shards"], key=lambda s: s["id"]):
        rel = f"{dataset_dir}/{shard['path']}"
        if not storage.exists(rel):
            raise DataError(f"{storage.url(rel)}: listed in the manifest but missing: re-run `muse encode`")
        with storage.open(rel) as f:
            pf = _open_checked(f, storage.url(rel))
            for rg in range(pf.metadata.num_row_groups):
                cols = _eval_slice(pf, rg, eval_holdout, f"{storage.url(rel)} row group {rg}")
                for key, caption, replaced, t5 in zip(*(cols.column(c).to_pylist() for c in cols.column_names)):
                    yield {"key": key, "caption": caption, "replaced": bool(replaced), "shard_id": shard["id"],
                           "source": shard.get("source") or shard_name(IMAGES, shard["id"]),
                           "t5": t5_from_bytes(t5, dim).astype(np.float32)}


def _open_checked(f, where: str) -> pq.ParquetFile:
    """An encoded shard for `iter_eval_rows`, page checksums on; a bad footer is a DataError."""
    try:
        pf = open_shard(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{where}: {read_problem(e)}: re-run `muse encode` for this shard") from None
    check_encoded_columns(pf.schema_arrow, where)
    return pf


def _eval_slice(pf: pq.ParquetFile, rg: int, eval_holdout: float, where: str) -> pa.Table:
    """The eval-slice rows of one row group (the key column first, the others only where a key is
    in the slice); a read error (a page checksum mismatch included) is a DataError naming it."""
    try:
        keys = pf.read_row_group(rg, columns=["key"]).column("key").to_pylist()
        picked = [i for i, k in enumerate(keys) if in_eval_slice(k, eval_holdout)]
        columns = ["key", "caption", "replaced", "t5"]
        if not picked:
            return pf.schema_arrow.empty_table().select(columns)
        return pf.read_row_group(rg, columns=columns).take(picked)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{where}: {read_problem(e)}: re-run `muse encode` for this shard") from None


def worker_init(_: int) -> None:
    """DataLoader workers leave SIGTERM and Ctrl-C to the trainer, which checkpoints and then
    exits; they die with it when it is killed (the parent-death signal), never outliving the job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def close_loader(it) -> None:
    """Stop DataLoader workers: they ignore SIGTERM (see worker_init), so the usual
    terminate() at exit would leave the interpreter joining them forever."""
    workers = list(getattr(it, "_workers", []))
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # asks them to stop and unregisters them from the SIGCHLD check
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()
