"""Streaming training data: encoded Parquet row groups -> padded batches, with exact resume.

The order of samples is a pure function of (seed, manifest), independent of the number of
DataLoader workers, so a run resumed with a different `train.num_workers` sees the same
sequence as an uninterrupted one:

* a *unit* is one Parquet row group of a shard listed in `_MANIFEST.json` (nothing else is read);
* epoch e visits the units in the permutation `rng([seed, e])`; the epochs are concatenated
  into one endless sequence of unit positions P (epoch = P // #units);
* each rank r of W owns `train.loader_streams` (S) streams; stream s takes the positions
  P = r + W*s (mod W*S); it mixes its rows through its own shuffle buffer (seeded RNG) and
  cuts batches of `batch_size`;
* global batch g of a rank comes from stream g % S. Worker w of k (k divides S) produces
  batches g0+w, g0+w+k, ..., which are exactly the streams it owns, so no row group is read
  twice and DataLoader's round-robin returns g0, g0+1, ... whatever k is.

The eval slice (`train.eval_holdout` = f): a row whose key hashes below f (`eval_position`:
blake2b-64 of the UTF-8 key as a fraction of 2**64) is never put in a shuffle buffer, so the
trainer never sees it; `iter_eval_rows` yields exactly those rows. The hash ignores the seed
and the world size, so the slice is the same for every run on the data, and a larger f
holds out a superset.

A DataError in a DataLoader worker comes back as a batch `{"_error": message}` (raised in
the main process it is raised as usual).

Every batch carries the state of its stream after it was cut (unit position, the buffer as
(position, row) indices, RNG state); the trainer keeps the state of the last consumed
batch per stream and the next batch number: that is the loader state saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from muse.layout import GRID_BASE, GRID_SUPERRES, MANIFEST, DataError, read_manifest, t5_from_bytes
from muse.lifecycle import die_with_parent
from muse.masking import pad_embeddings
from muse.storage import Storage


def eval_position(key: str) -> float:
    """A row's stable place in [0, 1): blake2b-64 of its key / 2**64 (the eval slice is [0, f))."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def in_eval_slice(key: str, eval_holdout: float) -> bool:
    return eval_holdout > 0 and eval_position(key) < eval_holdout


@dataclass(frozen=True)
class Unit:
    path: str        # relative to the storage root
    row_group: int
    rows: int


def list_units(storage: Storage, dataset_dir: str, manifest: dict) -> list[Unit]:
    """Row groups of the manifest's shards, from row counts and the fixed row-group size."""
    rg = (manifest.get("encode") or {}).get("row_group_size")
    units = []
    for shard in sorted(manifest["shards"], key=lambda s: s["id"]):
        path = f"{dataset_dir}/{shard['path']}"
        if rg:
            counts = [min(rg, shard["rows"] - i) for i in range(0, shard["rows"], rg)]
        else:  # no row-group size recorded: read the footer
            with storage.open(path) as f:
                md = pq.ParquetFile(f).metadata
                counts = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        units += [Unit(path, i, n) for i, n in enumerate(counts) if n > 0]
    if not units:
        raise DataError(f"{storage.url(dataset_dir)}/{MANIFEST} lists no rows; re-run `muse encode`")
    return units


def verify_shards(storage: Storage, dataset_dir: str, manifest: dict, sha256: bool = False,
                  rank: int = 0, world: int = 1) -> None:
    """Each shard's byte size (one metadata call; cheap on GCS) and, with sha256, its hash (a full
    read) against the manifest; rank r checks shards r, r + world, ... -> DataError naming it."""
    for shard in sorted(manifest["shards"], key=lambda s: s["id"])[rank::world]:
        rel = f"{dataset_dir}/{shard['path']}"
        fix = "re-run `muse encode` (or set train.verify: none to train on it anyway)"
        try:
            size = storage.size(rel)
        except FileNotFoundError:
            raise DataError(f"{storage.url(rel)}: listed in the manifest but missing: {fix}") from None
        if "bytes" in shard and size != shard["bytes"]:
            raise DataError(f"{storage.url(rel)}: {size} bytes, the manifest says {shard['bytes']}: "
                            f"the shard changed or was cut short after encoding: {fix}")
        if sha256 and "sha256" in shard:
            h = hashlib.sha256()
            with storage.open(rel) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise DataError(f"{storage.url(rel)}: sha256 {h.hexdigest()[:12]}..., the manifest says "
                                f"{shard['sha256'][:12]}...: the shard changed after encoding: {fix}")


def loader_fingerprint(manifest: dict, *, seed: int, streams: int, batch_size: int, shuffle_buffer: int,
                       world_size: int, replaced_rows: str) -> dict:
    """What a saved loader state is valid for: the manifest's shards (id -> sha256, else bytes and
    rows) and the settings that fix the sample order. Saved with the loader state; see
    `fingerprint_changes`."""
    shards = {f"{int(s['id']):05d}": s.get("sha256") or f"{s.get('bytes')}b/{s['rows']}r"
              for s in manifest["shards"]}
    return {"shards": shards, "seed": seed, "loader_streams": streams, "batch_size": batch_size,
            "shuffle_buffer": shuffle_buffer, "replaced_rows": replaced_rows, "world_size": world_size}


def fingerprint_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two `loader_fingerprint`s, one phrase each ([] = the same)."""
    out = []
    old, new = saved.get("shards", {}), now["shards"]
    for what, ids in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
                      ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k]))):
        if ids:
            out.append(f"shards {what}: {', '.join(ids[:5])}" + (f" and {len(ids) - 5} more" if len(ids) > 5 else ""))
    for key in now:
        if key != "shards" and saved.get(key) != now[key]:
            name = "world size" if key == "world_size" else f"train.{key}"
            out.append(f"{name} {saved.get(key)} -> {now[key]}")
    return out


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


class StreamingDataset(IterableDataset):
    """Endless stream of batches (dicts, see `collate`) for one rank; see the module docstring.

    Use with `DataLoader(ds, batch_size=None, num_workers=k)`, k dividing `streams` (0 = all
    streams in the main process). Storage is created inside each worker (gcsfs is not fork-safe).
    """

    def __init__(self, root_uri: str, dataset_dir: str, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 2048, batch_size: int = 16,
                 streams: int = 8, superres: bool = False, replaced_rows: str = "keep",
                 replaced_weight: float = 0.1, gcs_project: str | None = None, eval_holdout: float = 0.0):
        storage = Storage(root_uri, gcs_project)
        self.manifest = read_manifest(storage, dataset_dir)
        self.units = list_units(storage, dataset_dir, self.manifest)
        self.root_uri, self.gcs_project, self.dataset_dir = root_uri, gcs_project, dataset_dir
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_size, self.batch_size, self.streams = max(shuffle_buffer, batch_size), batch_size, streams
        self.superres, self.replaced_rows, self.replaced_weight = superres, replaced_rows, replaced_weight
        self.text_dim = int(self.manifest["text_dim"])
        self.eval_holdout = eval_holdout
        self.state = {"batch": 0, "streams": {}}
        self._perms: dict[int, np.ndarray] = {}

    # -- resume state
    def load_state(self, state: dict) -> None:
        """Continue at `state["batch"]` with the saved stream states (JSON form)."""
        saved = float(state.get("eval_holdout", 0.0))
        if saved != self.eval_holdout:  # the saved buffers hold row indices chosen with the old slice
            raise DataError(f"the checkpoint was trained with train.eval_holdout={saved}, this run has "
                            f"{self.eval_holdout}; keep it (exact resume) or start over with --resume none")
        self.state = {"batch": int(state["batch"]), "streams": {int(k): v for k, v in state["streams"].items()}}

    @staticmethod
    def state_json(stream_state: dict) -> dict:
        return {"pos": int(stream_state["pos"]), "rng": stream_state["rng"],
                "buffer": np.asarray(stream_state["buffer"]).tolist()}

    # -- order
    def unit_at(self, pos: int) -> Unit:
        epoch, i = divmod(pos, len(self.units))
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return self.units[int(self._perms[epoch][i])]

    def _position(self, stream: int, j: int) -> int:
        """j-th unit position of a stream of this rank."""
        stride = self.world_size * self.streams
        return self.rank + self.world_size * stream + j * stride

    # -- iteration
    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.streams % nw:
            raise ValueError(f"train.num_workers ({nw}) must divide train.loader_streams ({self.streams})")
        if info:
            torch.set_num_threads(1)  # decoding threads fight the trainer on small machines
        storage = Storage(self.root_uri, self.gcs_project)  # per worker: gcsfs is not fork-safe
        g = self.state["batch"] + wid
        streams: dict[int, _Stream] = {}
        while True:
            s = g % self.streams
            try:
                if s not in streams:
                    streams[s] = _Stream(self, storage, s, self.state["streams"].get(s))
                batch = streams[s].next_batch()
            except DataError as e:
                if not info:
                    raise
                # from a worker: in-band, so the trainer can print this one line (DataLoader
                # would re-raise it with the worker's traceback inside the message)
                yield {"_error": str(e)}
                return
            batch["_batch"], batch["_stream"], batch["_state"] = g, s, streams[s].state()
            yield batch
            g += nw


class _Stream:
    """One stream: sequential units through a shuffle buffer of (position, row) indices."""

    def __init__(self, ds: StreamingDataset, storage: Storage, stream: int, state: dict | None):
        self.ds, self.storage, self.stream = ds, storage, stream
        self.rng = np.random.default_rng([ds.seed, ds.rank, stream, 7])
        self.j, self.buffer = 0, []
        if state:
            self.j = int(state["pos"])
            self.rng.bit_generator.state = state["rng"]
            self.buffer = [tuple(x) for x in state["buffer"]]
        self.cache: dict[int, _UnitData] = {}

    def state(self) -> dict:
        return {"pos": self.j, "rng": self.rng.bit_generator.state,
                "buffer": np.asarray(self.buffer, dtype=np.int64).reshape(-1, 2)}

    def _load(self, pos: int) -> _UnitData:
        if pos not in self.cache:
            unit = self.ds.unit_at(pos)
            where = f"{self.storage.url(unit.path)} row group {unit.row_group}"
            try:
                with self.storage.open(unit.path) as f:
                    table = pq.ParquetFile(f).read_row_group(unit.row_group)
            except FileNotFoundError:
                raise DataError(f"{where}: listed in the manifest but missing: re-run `muse encode`") from None
            except (OSError, pa.ArrowException) as e:  # truncated, corrupt, unreachable
                raise DataError(f"{where}: unreadable ({type(e).__name__}: {e}): re-run `muse encode` "
                                "for this shard, or check the storage") from None
            if table.num_rows != unit.rows:
                raise DataError(f"{where}: {table.num_rows} rows, the manifest says {unit.rows}; "
                                "the shard changed after encoding, re-run `muse encode`")
            self.cache[pos] = _UnitData(table, self.ds.text_dim, self.ds.superres, where)
        return self.cache[pos]

    def _fill(self) -> None:
        empty_loads = 0
        while len(self.buffer) < self.ds.buffer_size:
            pos = self.ds._position(self.stream, self.j)
            self.j += 1
            data = self._load(pos)
            rows = range(len(data.keys))
            if self.ds.eval_holdout:
                rows = [i for i in rows if not in_eval_slice(data.keys[i], self.ds.eval_holdout)]
            if self.ds.replaced_rows == "drop":
                rows = [i for i in rows if not data.replaced[i]]
            self.buffer += [(pos, i) for i in rows]
            empty_loads = empty_loads + 1 if not rows else 0
            if empty_loads > len(self.ds.units):
                raise DataError("no row of the dataset can be trained on: every row is a replaced "
                                "placeholder (set train.replaced_rows to keep or downweight) or in the "
                                "eval slice (lower train.eval_holdout)")

    def next_batch(self) -> dict:
        picked = []
        for _ in range(self.ds.batch_size):
            self._fill()
            k = int(self.rng.integers(len(self.buffer)))
            self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
            picked.append(self.buffer.pop())
        rows = [(self._load(p), i) for p, i in picked]
        live = {p for p, _ in self.buffer}
        for p in [p for p in self.cache if p not in live]:
            del self.cache[p]  # no row of it left in the buffer
        weight = self.ds.replaced_weight if self.ds.replaced_rows == "downweight" else None
        return collate(rows, weight)


def iter_eval_rows(storage: Storage, dataset_dir: str, eval_holdout: float):
    """The eval slice in shard order: dicts {key, caption, replaced, shard_id, t5 [L, D] float32}.

    Reads the key column of each row group and the other columns only where a key is in the slice.
    """
    manifest = read_manifest(storage, dataset_dir)
    dim = int(manifest["text_dim"])
    if not eval_holdout:
        return
    for shard in sorted(manifest["shards"], key=lambda s: s["id"]):
        with storage.open(f"{dataset_dir}/{shard['path']}") as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.metadata.num_row_groups):
                keys = pf.read_row_group(rg, columns=["key"]).column("key").to_pylist()
                picked = [i for i, k in enumerate(keys) if in_eval_slice(k, eval_holdout)]
                if not picked:
                    continue
                cols = pf.read_row_group(rg, columns=["key", "caption", "replaced", "t5"]).take(picked)
                for key, caption, replaced, t5 in zip(*(cols.column(c).to_pylist() for c in cols.column_names)):
                    yield {"key": key, "caption": caption, "replaced": bool(replaced), "shard_id": shard["id"],
                           "t5": t5_from_bytes(t5, dim).astype(np.float32)}


def worker_init(_: int) -> None:
    """DataLoader workers leave SIGTERM and Ctrl-C to the trainer, which checkpoints and then
    exits; they die with it when it is killed (the parent-death signal), never outliving the job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
