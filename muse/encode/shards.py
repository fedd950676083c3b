"""Phase 2 per shard: images/NNNNN.parquet -> encoded/<version>/NNNNN.parquet (+ record) -> manifest.

One output shard per input shard, same id. A shard is done when its record
`encoded/<version>/NNNNN.json` exists (written after the Parquet file); the manifest is
rebuilt from the records of the current image shards and written last. So N workers can
encode disjoint shards of one dataset concurrently, a killed run leaves nothing that a
reader trusts, and a re-run does only what is missing. The version is a hash of the
encoder config, and `_ENCODERS.json` records a fingerprint of the weights loaded (hub commit or
sha256 of local files): shards from other weights are refused, so encoders never mix.

Generations (layout.py): encode reads each image shard's newest finished generation K and writes
encoded generation K beside the others (`00042.g1.parquet` + `00042.g1.json`; generation 0 keeps
the plain names), in the same dataset version (the encoders did not change); a shard is to do
while its image generation has no finished encoded one, so after a retry pass only the shards it
rewrote are encoded again and no other file is touched. The manifest lists per id the generation
matching the image's newest; until it exists the older one stays in force (`finalize_manifest`).

Throughput (`run_encode`): one thread reads the next image shard from storage, another
decodes the next batches of this one while the models run, and a writer thread serialises
and uploads the previous shard.
With `encode.devices` naming several devices, `run_encode` spawns one worker process per
device (its own models on its own cuda:N) and hands them chunks of shards; the manifest is
still written once, by the caller, from the records.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import queue
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse.config import resolve_device
from muse.encode.fingerprint import encoder_changes, weights_fingerprint
from muse.encode.loading import LOAD_LOCK
from muse.layout import (ENCODERS, GRID_BASE, GRID_SUPERRES, IMAGES, PAGE_CHECKSUMS, SCHEMA_VERSION, check_version,
                         dataset_dir, done_generations, done_marker, done_shards, empty_caption_record,
                         encoded_schema, finished_generations, format_shard_id, open_shard, prefix_listing,
                         read_problem, shard_name, t5_to_bytes, trainable_counts, write_manifest)
from muse.pictures import decode_picture
from muse.storage import Storage, crc32c


class EncodeError(RuntimeError):
    """A shard could not be encoded; the message names it."""


class Encoders:
    """T5 + VQ tokenizers, loaded once per process (cached by config)."""

    _cache: dict = {}

    def __init__(self, e):
        from muse.encode.image import paella_from_ref, vq_from_ref
        from muse.encode.text import TextEncoder

        dev = resolve_device(e.device)
        self.text = TextEncoder.from_ref(e.text_ref, e.text_max_length, e.text_dtype, str(dev))
        self.vq = vq_from_ref(e.vq_ref, str(dev))
        self.paella = paella_from_ref(e.superres_vq_ref, str(dev)) if e.superres else None
        self.fingerprints = _fingerprints(e)  # after the loads: a hub commit is known once it is cached
        self.runtime = _runtime(dev)
        # the base model's pictures are as large as its VQ needs for a 16x16 grid: 256px for the
        # open-muse VQGAN f16, 64px for the demo's f4 tokenizer; super-resolution stays at 512px
        self.base_px = GRID_BASE * self.vq.factor
        for name, tok, px, grid in [("vq_model", self.vq, self.base_px, GRID_BASE),
                                    ("superres_vq_model", self.paella, 512, GRID_SUPERRES)]:
            if tok is not None and px // tok.factor != grid:
                raise EncodeError(f"encode.{name}: downsamples by {tok.factor}, so {px}px gives "
                                  f"{px // tok.factor}x{px // tok.factor} ids, expected {grid}x{grid}")
        if self.paella is not None and self.paella.codebook_size != self.vq.codebook_size:
            raise EncodeError("encode: the two VQ tokenizers have different codebook sizes "
                              f"({self.vq.codebook_size} vs {self.paella.codebook_size})")

    @classmethod
    def get(cls, e) -> "Encoders":
        key = e.model_dump_json()
        with LOAD_LOCK:  # shard tasks in threads share one set of models
            if key not in cls._cache:
                cls._cache.clear()
                cls._cache[key] = cls(e)
            return cls._cache[key]

    def info(self, e) -> dict:
        return {"schema_version": SCHEMA_VERSION, "text_model": e.text_model, "text_dim": self.text.dim,
                "text_max_length": e.text_max_length, "text_dtype": e.text_dtype,
                "vq_model": e.vq_model, "vq_subfolder": e.vq_subfolder, "vq_format": e.vq_format,
                "codebook_size": self.vq.codebook_size, "grid": GRID_BASE,
                "superres_vq_model": e.superres_vq_model if e.superres else None,
                "superres_grid": GRID_SUPERRES if e.superres else None, "fingerprints": self.fingerprints}


def _fingerprints(e) -> dict:
    """Config key -> fingerprint of the weights it loaded (muse/encode/fingerprint.py)."""
    return {ref.key.removeprefix("encode."): weights_fingerprint(ref.path, ref.subfolder, ref.revision, ref.key)
            for ref in e.encoder_refs()}


def _runtime(dev) -> dict:
    """Where a shard was encoded, for its record: ids can differ across devices and library versions."""
    import diffusers
    import torch
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return {"device": name, "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                         "transformers": transformers.__version__}}


def _batches(table: pa.Table, batch_size: int, base_px: int, superres: bool, depth: int, where: str):
    """Decode image batches in a background thread, `depth` batches ahead of the models."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))

    def work():
        try:
            images = table.column("image").to_pylist()
            for start in range(0, table.num_rows, batch_size):
                chunk = images[start:start + batch_size]
                lo = np.stack([decode_picture(b, base_px) for b in chunk])
                hi = np.stack([decode_picture(b, 512) for b in chunk]) if superres else None
                q.put((start, lo, hi))
        except Exception as err:  # noqa: BLE001 - handed to the consumer with the shard named
            q.put(EncodeError(f"{where}: cannot decode an image: {type(err).__name__}: {err}"))
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, Exception):
            raise item
        yield item


def encode_table(table: pa.Table, enc: Encoders, e, where: str) -> pa.Table:
    """An image shard table -> the encoded table (layout.encoded_schema)."""
    captions = table.column("caption").to_pylist()
    t5, t5_len, vq16, vq64 = [], [], [], []
    for start, lo, hi in _batches(table, e.batch_size, enc.base_px, e.superres, e.prefetch_batches, where):
        for arr in enc.text.encode(captions[start:start + len(lo)]):
            t5.append(t5_to_bytes(arr))
            t5_len.append(arr.shape[0])
        vq16.append(enc.vq.encode(lo).reshape(len(lo), -1).numpy().astype(np.int16))
        if hi is not None:
            vq64.append(enc.paella.encode(hi).reshape(len(hi), -1).numpy().astype(np.int16))
    schema = encoded_schema(e.superres, enc.info(e))
    n = table.num_rows
    cols = {
        "key": table.column("key").cast(pa.string()), "caption": pa.array(captions, pa.string()),
        "replaced": table.column("replaced").cast(pa.bool_()), "t5": pa.array(t5, pa.binary()),
        "t5_len": pa.array(np.asarray(t5_len, dtype=np.int16)),
        "vq16": pa.FixedSizeListArray.from_arrays(np.concatenate(vq16).reshape(-1) if n else
                                                  np.zeros(0, np.int16), GRID_BASE * GRID_BASE),
    }
    if e.superres:
        cols["vq64"] = pa.FixedSizeListArray.from_arrays(np.concatenate(vq64).reshape(-1) if n else
                                                         np.zeros(0, np.int16), GRID_SUPERRES * GRID_SUPERRES)
    return pa.table(cols, schema=schema)


def _to_parquet(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd",
                   use_dictionary=["key", "caption"], write_statistics=False, **PAGE_CHECKSUMS)
    return buf.getvalue()


def _read_images(storage: Storage, shard_id: int, generation: int = 0) -> pa.Table:
    src = shard_name(IMAGES, shard_id, generation=generation)
    try:
        with storage.open(src) as f:  # page checksums verified: a changed byte is named, not encoded
            table = open_shard(f).read(columns=["key", "caption", "replaced", "image"])
    except Exception as err:  # noqa: BLE001
        raise EncodeError(f"{storage.url(src)}: image shard {read_problem(err)}; "
                          f"re-run `muse download` to rebuild it") from err
    return table


def encode_shard(cfg, shard_id: int, storage: Storage | None = None, table: pa.Table | None = None,
                 generation: int | None = None) -> dict:
    """Encode and write one shard; returns its record (id, path, rows, bytes, sha256, crc32c, source,
    generation, replaced, train_rows: `layout.trainable_counts`).
    `generation`: the image generation to encode (None: its newest finished one); `table`: that
    image shard, when the caller has already read it."""
    storage = storage or Storage.from_config(cfg)
    if generation is None:
        generation = image_generations(storage, [shard_id]).get(shard_id, 0)
    return _encode_then_write(cfg, shard_id, storage, table, generation)()


def _encode_then_write(cfg, shard_id: int, storage: Storage, table: pa.Table | None,
                       generation: int) -> Callable[[], dict]:
    """Run the models on one shard (image `generation`) now; return the function that writes it
    (Parquet, then the record), so that `run_encode` can upload in a writer thread while the next
    shard is encoded."""
    e, ds = cfg.encode, dataset_dir(cfg)
    enc = Encoders.get(e)
    src = shard_name(IMAGES, shard_id, generation=generation)
    table = _read_images(storage, shard_id, generation) if table is None else table
    out = encode_table(table, enc, e, storage.url(src))
    # Same content from every worker, so a race between two of them is harmless. Computed
    # here, not in the writer thread, which would run it beside the next shard's models.
    facts = encoder_facts_to_write(enc, e, storage, ds)

    def write() -> dict:
        if facts is not None:
            storage.write_json(f"{ds}/{ENCODERS}", facts)
        data = _to_parquet(out, e.row_group_size)
        rel = shard_name(ds, shard_id, generation=generation)  # a new generation never overwrites an older one
        storage.write_bytes(rel, data)
        record = {"id": shard_id, "path": rel.rsplit("/", 1)[-1], "rows": out.num_rows, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "crc32c": crc32c(data),  # crc32c: GCS's own
                  "source": src, "generation": generation,
                  "replaced": int(np.sum(out.column("replaced").to_numpy(zero_copy_only=False))),
                  # so a loader with an eval slice or dropped placeholders reads no row group to plan
                  "train_rows": trainable_counts(out.column("key").to_pylist(), out.column("replaced").to_numpy(
                      zero_copy_only=False), e.row_group_size), **enc.runtime}
        storage.write_json(done_marker(ds, shard_id, generation), record)  # the done marker, after the data
        return record

    return write


def image_generations(storage: Storage, ids: list[int] | None = None) -> dict[int, int]:
    """{image shard id: its newest finished generation} (of `ids` only, from one listing of the names
    that start like them; None: all)."""
    gens = done_generations(storage, IMAGES, prefix_listing(storage, IMAGES, ids))
    wanted = None if ids is None else set(ids)
    return gens if wanted is None else {s: g for s, g in gens.items() if s in wanted}


def encoded_among(storage: Storage, ds: str, ids: list[int], images: dict[int, int] | None = None) -> dict[int, int]:
    """{id: generation} of those of `ids` whose image shard's newest generation is encoded already
    (its record exists): what a chunk task skips, and whose records a chunk's outcome reads. An
    encoded shard of an older generation does not count: the retry pass's rows are not in it.
    `images`: `image_generations(storage, ids)` when the caller has it."""
    images = image_generations(storage, ids) if images is None else images
    encoded = finished_generations(storage, ds, prefix_listing(storage, ds, ids))
    return {s: g for s, g in images.items() if (s, g) in encoded}


def plan_encode(cfg, storage: Storage | None = None) -> list[int]:
    """Image shards whose newest generation is not yet encoded in this dataset version."""
    storage = storage or Storage.from_config(cfg)
    return shards_to_encode(done_generations(storage, IMAGES), finished_generations(storage, dataset_dir(cfg)))


def shards_to_encode(images: dict[int, int], encoded: set[tuple[int, int]]) -> list[int]:
    """The image shards ({id: newest finished generation}) without a finished encoded shard of that
    generation (`finished_generations`), in id order (also `muse plan`)."""
    return sorted(s for s, g in images.items() if (s, g) not in encoded)


def task_chunks(ids: list[int], shards_per_task: int) -> list[list[int]]:
    """Shard ids cut into the encode flow's tasks of `encode.shards_per_task` (also `muse plan`)."""
    return [ids[i:i + shards_per_task] for i in range(0, len(ids), shards_per_task)]


def encoder_facts_to_write(enc: Encoders, e, storage: Storage, ds: str) -> dict | None:
    """The `_ENCODERS.json` to write when the version has none; None when it has one that records
    the weights loaded now. EncodeError when it records other weights: adding shards would mix
    two encoders' values in one dataset (a folder rebuilt in place, an unpinned hub id that moved),
    or when it is of another SCHEMA_VERSION."""
    rel = f"{ds}/{ENCODERS}"
    if not storage.exists(rel):
        return _encoder_facts(enc, e)
    info = storage.read_json(rel)["info"]
    check_version(info.get("schema_version"), SCHEMA_VERSION, storage.url(rel),
                  f"delete {storage.url(ds)} and encode it again with this code", EncodeError)
    changes = encoder_changes(info["fingerprints"], enc.fingerprints)
    if changes:
        raise EncodeError(
            f"{storage.url(rel)}: dataset version {ds.rsplit('/', 1)[-1]} was encoded with other weights than "
            f"the ones loaded now ({'; '.join(changes)}); adding shards would mix two encoders in one dataset. "
            "Restore the recorded weights (for a hub model, set encode.*_revision to the recorded commit), "
            "or encode a new version (a new model folder or revision), or delete "
            f"{storage.url(ds)} to encode all of it again with these weights")
    return None


def _encoder_facts(enc: Encoders, e) -> dict:
    empty = enc.text.encode([""])[0]  # the unconditional text for guidance dropout and sampling
    return {"info": enc.info(e), "empty_caption": empty_caption_record(empty)}


def finalize_manifest(cfg, storage: Storage | None = None) -> dict:
    """Write the manifest (last) from the records of the current image shards: per id, the encoded
    generation of the image shard's newest generation; while that one is not encoded yet (a killed
    or failed re-encode), the newest older encoded generation stays in force and the id is listed
    in `pending` (as is an id with no encoded shard at all, which is not listed).

    Cost: one listing of each folder and the records fetched concurrently (`read_many`), not a
    round trip per shard in turn. The model facts come from `_ENCODERS.json`, written by the shard encoders, so a CPU-only
    finalize task does not load T5 and the VQ; only a dataset with no shard yet loads them."""
    storage = storage or Storage.from_config(cfg)
    e, ds = cfg.encode, dataset_dir(cfg)
    facts_rel = f"{ds}/{ENCODERS}"
    facts = storage.read_json(facts_rel) if storage.exists(facts_rel) else _encoder_facts(Encoders.get(e), e)
    info = facts["info"]
    encoded: dict[int, list[int]] = {}
    for sid, gen in finished_generations(storage, ds):
        encoded.setdefault(sid, []).append(gen)
    current = done_generations(storage, IMAGES)
    # never a generation newer than the image's (its image shard was deleted: not what is in force)
    chosen = {sid: max((g for g in encoded.get(sid, []) if g <= gen), default=None) for sid, gen in current.items()}
    records = storage.read_many([done_marker(ds, sid, g) for sid, g in chosen.items() if g is not None])
    # records written before generations were recorded are of generation 0
    shards = [{"generation": 0} | json.loads(data) for data in records.values()]
    storage.write_config(ds, cfg)
    return write_manifest(storage, ds, shards=shards, text_dim=info["text_dim"],
                          codebook_size=info["codebook_size"], empty_caption=facts["empty_caption"],
                          superres=e.superres, encode=e.model_dump(mode="json"),
                          models={k: info[k] for k in ("text_model", "vq_model", "superres_vq_model")},
                          pending=[sid for sid, gen in current.items() if chosen[sid] != gen])


def run_encode(cfg) -> dict:
    """`muse encode`: every image shard not yet encoded, then the manifest. Raises if any shard failed.
    With `encode.devices` naming several devices, the shards go to one worker process per device."""
    storage = Storage.from_config(cfg)
    todo = plan_encode(cfg, storage)
    total = len(done_shards(storage, IMAGES))
    devices = encode_devices(cfg.encode)
    where = f" on {len(devices)} worker processes ({', '.join(devices)})" if len(devices) > 1 else ""
    print(f"encode: {len(todo)} of {total} shards to do -> {storage.url(dataset_dir(cfg))}{where}", file=sys.stderr)
    if len(devices) > 1 and todo:
        rows, failed = _encode_on_workers(cfg, todo, devices)
    else:
        work = cfg if cfg.encode.devices is None else on_device(cfg, devices[0])
        if todo:  # refuse other weights once, before any shard is read
            encoder_facts_to_write(Encoders.get(work.encode), work.encode, storage, dataset_dir(cfg))
        rows, failed = _encode_ids(work, storage, todo)
    manifest = finalize_manifest(cfg, storage)
    pending = set(manifest["pending"])  # an older generation may be listed: pending is what is not encoded
    failed = {sid: err for sid, err in failed.items() if sid in pending}  # a broken pool's chunk may have landed
    summary = {"dataset": storage.url(dataset_dir(cfg)), "shards": len(manifest["shards"]),
               "rows": manifest["rows"], "replaced": manifest["replaced"], "encoded_now": len(todo) - len(failed),
               "failed": {format_shard_id(k): v for k, v in sorted(failed.items())}}
    print(f"encode: {summary['shards']} shards, {summary['rows']} rows ({summary['replaced']} replaced) "
          f"in {summary['dataset']}", file=sys.stderr)
    if failed:
        names = ", ".join(format_shard_id(k) for k in sorted(failed))
        raise EncodeError(f"{len(failed)} shard(s) failed: {names}; the others are in the manifest. "
                          f"First error: {failed[min(failed)]}")
    return summary


def _encode_ids(cfg, storage: Storage, todo: list[int]) -> tuple[int, dict[int, str]]:
    """Encode the shards `todo` in this process, in turn -> (rows written, {failed shard: error})."""
    failed: dict[int, str] = {}
    t0, rows = time.time(), 0
    gens = image_generations(storage, todo)  # each shard's newest image generation, fixed for this run
    # Reader, models and writer overlap: the next image shard downloads (a GCS read of a
    # 10k-row shard takes seconds) while this one is on the models and the last one uploads.
    with ThreadPoolExecutor(max_workers=1) as writer, ThreadPoolExecutor(max_workers=1) as reader:
        pending: list[tuple[int, Future]] = []
        reads = [reader.submit(_read_images, storage, sid, gens.get(sid, 0)) for sid in todo[:1]]
        for i, sid in enumerate(todo):
            if i + 1 < len(todo):
                reads.append(reader.submit(_read_images, storage, todo[i + 1], gens.get(todo[i + 1], 0)))
            try:
                table = reads.pop(0).result()
                pending.append((sid, writer.submit(_encode_then_write(cfg, sid, storage, table, gens.get(sid, 0)))))
            except Exception as err:  # noqa: BLE001 - one bad shard must not stop the others
                failed[sid] = str(err)
                print(f"encode: shard {format_shard_id(sid)} FAILED: {err}", file=sys.stderr)
            done = [(s, f) for s, f in pending if f.done()]
            for s, f in done:
                rows += _collect(s, f, failed)
                pending.remove((s, f))
            print(f"encode [{cfg.encode.device}]: {i + 1}/{len(todo)} shards, {rows} rows, "
                  f"{rows / max(time.time() - t0, 1e-9):.1f} rows/s", file=sys.stderr)
        for s, f in pending:
            rows += _collect(s, f, failed)
    return rows, failed


# ----------------------------------------------------------------------------- several devices

def encode_devices(e) -> list[str]:
    """The devices `muse encode` runs on: `encode.devices` ("all": every visible GPU, or the CPU
    alone), or `encode.device` alone when it is null."""
    if e.devices is None:
        return [e.device]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if e.devices == "all":
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    # checked here, not in a worker, whose failed start would only say "process pool broken"
    missing = [d for d in e.devices if d.startswith("cuda") and int(d.partition(":")[2] or 0) >= n]
    if missing:
        raise EncodeError(f"encode.devices: {missing} not visible here ({n} GPU(s)); use `all` or cpu")
    return list(e.devices)


def on_device(cfg, device: str):
    """`cfg` with the encoders on `device` alone (what one worker process runs)."""
    return cfg.model_copy(update={"encode": cfg.encode.model_copy(update={"device": device, "devices": None})})


_WORKER: dict = {}  # in a worker process: its config, pinned to its device


def _worker_start(slots, cfg, threads: int) -> None:
    """Initializer of an encode worker process: take one device from `slots`, for good. The TF32
    flags are set once here (this process only encodes), so no `exact_fp32` ever flips them."""
    import torch

    device = slots.get()
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(threads)  # CPU workers share the parent's threads, not one pool each
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    _WORKER["cfg"] = on_device(cfg, device)


def _worker_check() -> None:
    """In a worker: refuse other weights than `_ENCODERS.json` records, before any shard is read."""
    cfg = _WORKER["cfg"]
    encoder_facts_to_write(Encoders.get(cfg.encode), cfg.encode, Storage.from_config(cfg), dataset_dir(cfg))


def _worker_encode(ids: list[int]) -> tuple[int, dict[int, str]]:
    cfg = _WORKER["cfg"]
    return _encode_ids(cfg, Storage.from_config(cfg), ids)


def _encode_on_workers(cfg, todo: list[int], devices: list[str]) -> tuple[int, dict[int, str]]:
    """One spawned process per device, each with its own models; chunks of shards go to whichever
    is free (about 4 chunks a device, at most `shards_per_task` shards each: the last ones finish
    together). A worker that dies breaks the pool (Python stops the others): the shards without a
    record are failed, the caller writes the manifest of those with one."""
    import torch

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    slots = ctx.Queue()
    for device in devices:
        slots.put(device)
    threads = max(1, torch.get_num_threads() // max(1, devices.count("cpu")))
    size = max(1, min(cfg.encode.shards_per_task, math.ceil(len(todo) / (4 * len(devices)))))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    rows, failed = 0, {}
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_worker_start,
                             initargs=(slots, cfg, threads)) as pool:
        try:
            pool.submit(_worker_check).result()
        except BrokenProcessPool as err:
            raise EncodeError(f"encode.devices {devices}: a worker process died while starting (a device "
                              f"it cannot use, out of memory?); its error is printed above") from err
        futures = {pool.submit(_worker_encode, ids): ids for ids in chunks}
        for fut in as_completed(futures):
            try:
                n, bad = fut.result()
                rows, failed = rows + n, failed | bad
            except Exception as err:  # noqa: BLE001 - a dead worker: the pool is broken, these are not all done
                for sid in futures[fut]:
                    failed[sid] = f"encode worker: {type(err).__name__}: {err}"
    return rows, failed


def _collect(sid: int, fut: Future, failed: dict) -> int:
    try:
        return fut.result()["rows"]
    except Exception as err:  # noqa: BLE001
        failed[sid] = f"writing shard {format_shard_id(sid)}: {err}"
        return 0

