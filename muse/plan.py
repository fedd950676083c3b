"""`muse plan`: what a run of the config will do and roughly cost, before anything runs.

    plan_run(cfg, rows=None, encode_rate=None, gpu=DEFAULT_GPU) -> dict   (`--json` prints it)
    format_plan(plan) -> str                                              (the table `muse plan` prints)

Read-only: nothing is written anywhere (no registry, no retired shard, no marker deleted). The
counts come from the functions the phases run, not from a second copy of their arithmetic:
`download.sources.plan_sources` (shard ids per source file; `plan_parts` is it plus the writes),
`download.todo_chunks` (download tasks), `encode.shards.shards_to_encode` and `task_chunks`
(encode tasks of the flow; a shard whose newest image generation, e.g. a retry pass's, has no
encoded shard yet counts as to encode), `data.batches_per_epoch` and `data.total_steps` (the trainer's epoch
plan), `launch.procs_per_node` (the world size), `memory.resolve_batch` (train.global_batch).
So shards, tasks and steps per epoch are exact for the data the plan sees.

Estimates, each labelled in the output: encode time from a measured rate (`--encode-rate`, images/s
per device, e.g. `bash bench/gpu_check.sh`'s encode row) or, without one, from the encoders' FLOPs
per picture (counted on the meta device from their configs) at ENCODE_EFFICIENCY of the GPU's fp32
peak (encode runs the VQ in exact fp32, no TF32); training time from the model's FLOPs per sample at
TRAIN_MFU of the bf16 peak; download CPU at DOWNLOAD_CPU_S an image; bytes per row of images/ and
encoded/ (see `storage_bytes`).
"""

from __future__ import annotations

import json

from muse.config import PipelineConfig
from muse.download import todo_chunks
from muse.download.intact import check_image_shards
from muse.download.sources import plan_sources
from muse.encode.shards import shards_to_encode, task_chunks
from muse.layout import (GRID_BASE, GRID_SUPERRES, IMAGES, DataError, dataset_dir, done_generations, done_marker,
                         finished_generations)
from muse.storage import Storage

DEFAULT_GPU = "H100 80GB HBM3"
ENCODE_EFFICIENCY = 0.5   # assumed share of the fp32 peak the encoders reach (convolutions, batch 64)
TRAIN_MFU = 0.4           # assumed model FLOPs utilisation of a bf16 training step
# JPEG bytes per pixel when no image shard exists yet to measure: ~150 MB per 10,000-row shard at
# 256 px (docs/download.md, "Planning a LAION-size run"), ~15 KB a row; the plan uses the mean of the
# finished shards' markers when there are some
JPEG_BYTES_PER_PIXEL = 0.23
# CPU per downloaded image: img2dataset ~12 ms (FACTS: ~10 ms of it decode + resize) + muse's writer
# ~3 ms (docs/download.md); the network is not counted
DOWNLOAD_CPU_S = 0.015
INT32 = 4                 # Parquet has no int16: the VQ ids are stored as int32 (before zstd)


def plan_data(cfg: PipelineConfig, storage: Storage, whole: list[int], broken: dict,
              rows: int | None = None) -> dict:
    """Source rows, image shards, download and encode tasks, exactly as download/encode will cut them.
    `whole`, `broken`: `check_image_shards` (a broken shard is fetched again: not done)."""
    done = set(whole)
    sp = plan_sources(storage, cfg, done, rows)
    chunks = todo_chunks(sp.parts, cfg.download.shards_per_task, done)
    retired = {s for e in sp.retired for s in range(e["first_shard"], e["first_shard"] + e["num_shards"])}
    current = {s for p in sp.current for s in p.shard_ids()}
    images_after = (done - retired) | current  # files dropped from source.paths keep their shards
    # generations: a shard a retry pass rewrote is to encode again (its newest generation), a
    # shard still to download will be generation 0
    gens = done_generations(storage, IMAGES)
    encoded = finished_generations(storage, dataset_dir(cfg))
    encode_ids = shards_to_encode({s: gens.get(s, 0) for s in images_after}, encoded)
    rows_of = {s: p.row_range(s)[1] - p.row_range(s)[0] for p in sp.current for s in p.shard_ids()}
    entries = list(sp.registry["sources"].values())
    filtered: dict[str, int] = {}
    for e in entries:
        for reason, n in e.get("filtered", {}).items():
            filtered[reason] = filtered.get(reason, 0) + n
    selected = sum(e["rows"] for e in entries)
    return {
        "source": {"files": len(sp.current), "declared": rows is not None,
                   "rows_in": sum(e.get("rows_in", e["rows"]) for e in entries),
                   "filtered": filtered, "rows": selected},
        "download": {"shards": len(images_after), "shards_done": len(done & images_after),
                     "shards_to_fetch": sum(len(c.shard_ids()) for c in chunks), "broken": len(broken),
                     "retired": len(retired & done), "tasks": len(chunks),
                     "shards_per_task": cfg.download.shards_per_task, "shard_size": cfg.download.shard_size,
                     "cpu_hours": sum(c.row_range()[1] - c.row_range()[0] for c in chunks) * DOWNLOAD_CPU_S / 3600},
        "encode": {"dataset": dataset_dir(cfg), "shards_done": len(images_after) - len(encode_ids),
                   "shards_to_encode": len(encode_ids),
                   "rows_to_encode": sum(rows_of.get(s, cfg.download.shard_size) for s in encode_ids),
                   "tasks": len(task_chunks(encode_ids, cfg.encode.shards_per_task)),
                   "shards_per_task": cfg.encode.shards_per_task},
    }


def plan_train(cfg: PipelineConfig, rows: int) -> dict:
    """World size, batch, steps per epoch and in all, samples and image tokens seen: the trainer's
    epoch plan on `rows` trainable rows (the eval slice taken off as its expected share)."""
    from muse.data import batches_per_epoch, total_steps
    from muse.launch import procs_per_node
    from muse.memory import resolve_batch

    t = cfg.train
    nproc = procs_per_node(t)
    world = t.nnodes * nproc
    # batch_size auto: the GPU's free memory picks the micro-batch at start; planned with the CPU
    # rule (same global batch; steps per epoch can differ by the rounding to whole batches)
    cfg, why = resolve_batch(cfg, world, None)
    t = cfg.train
    trainable = rows - round(rows * t.eval_holdout)
    out = {"nnodes": t.nnodes, "nproc_per_node": nproc, "world_size": world, "batch_size": t.batch_size,
           "grad_accum": t.grad_accum, "global_batch": t.batch_size * t.grad_accum * world,
           "trainable_rows": trainable, "trainable_exact": not t.eval_holdout and t.replaced_rows != "drop",
           "batch_note": why}
    try:
        m = batches_per_epoch(trainable, world, t.batch_size, t.loader_streams, t.grad_accum)
    except DataError as e:
        return out | {"error": str(e)}
    steps = total_steps(t.max_steps, t.epochs, m, t.grad_accum)
    grid = GRID_SUPERRES if cfg.model.kind == "superres" else GRID_BASE
    samples = steps * out["global_batch"]
    return out | {"batches_per_epoch": m, "steps_per_epoch": m // t.grad_accum, "steps": steps,
                  "dropped_rows_per_epoch": trainable - world * m * t.batch_size,
                  "samples": samples, "epochs": samples / trainable, "image_tokens": samples * grid * grid}


def model_facts(cfg: PipelineConfig) -> dict:
    """Parameters, training FLOPs per sample and checkpoint bytes, from the model built on the meta
    device (no memory, no weights). A checkpoint holds fp32 weights (model.safetensors), the EMA
    with train.ema, and AdamW's two fp32 moments in trainer.pt."""
    import torch

    from muse.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    parts = {"model": 4 * params, "ema": 4 * params if cfg.train.ema else 0, "optimizer": 8 * params}
    return {"params": params, "flops_per_sample": float(model.num_flops_per_sample()),
            "checkpoint_bytes": sum(parts.values()), "checkpoint_parts": parts,
            "checkpoints_kept": cfg.train.keep_checkpoints}


def _arch_config(ref, known: dict, default_path: str) -> dict | None:
    """A model's architecture as its config.json states it (a local folder, or the hub cache), the
    published config of the default model, or None when neither is at hand (nothing is fetched)."""
    from pathlib import Path

    folder = Path(ref.path).expanduser() / (ref.subfolder or "")
    if (folder / "config.json").is_file():
        return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    if ref.path == default_path:
        return known
    try:
        from huggingface_hub import hf_hub_download

        name = f"{ref.subfolder}/config.json" if ref.subfolder else "config.json"
        path = hf_hub_download(ref.path, name, revision=ref.revision, local_files_only=True)
        return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    except Exception:  # noqa: BLE001 - not cached: the plan says the FLOPs are unknown
        return None


def encode_flops(cfg: PipelineConfig) -> tuple[float | None, str]:
    """FLOPs of encoding one picture (T5 on text_max_length tokens, an upper bound: a batch is
    padded to its longest caption; the base VQ encoder + quantizer), counted by torch's
    FlopCounterMode on the meta device -> (FLOPs or None, what was counted)."""
    import torch
    from diffusers import VQModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5EncoderModel

    from muse.config import EncodeConfig
    from muse.encode.image import VQGAN_F16_CONFIG
    from muse.encode.text import T5_BASE_CONFIG

    e, defaults = cfg.encode, EncodeConfig()
    text = _arch_config(e.text_ref, T5_BASE_CONFIG, defaults.text_model)
    vq = _arch_config(e.vq_ref, dict(VQGAN_F16_CONFIG), defaults.vq_model) if e.vq_format == "diffusers" else None
    if text is None or vq is None:
        missing = "encode.text_model" if text is None else "encode.vq_model"
        return None, f"{missing}: its config is not at hand (not local, not cached, not the default)"
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**text))
        tok = VQModel.from_config(vq)
        px = GRID_BASE * 2 ** (len(tok.config.block_out_channels) - 1)  # as encode sizes the pictures
        with FlopCounterMode(display=False) as counter:
            t5(input_ids=torch.zeros(1, e.text_max_length, dtype=torch.long))
            tok.quantize(tok.encode(torch.zeros(1, 3, px, px)).latents)
    what = f"T5 on {e.text_max_length} tokens + VQ encoder at {px} px"
    return float(counter.get_total_flops()), what + (" (the super-res VQ not counted)" if e.superres else "")


def encode_cost(cfg: PipelineConfig, rows: int, rate: float | None, gpu: str) -> dict:
    """Device-hours to encode `rows` pictures at a measured rate, else the FLOP-derived one."""
    from muse.gpus import peak_flops_fp32

    flops, what = encode_flops(cfg)
    out = {"flops_per_picture": flops, "counted": what, "gpu": gpu}
    if rate is not None:
        out |= {"rate": rate, "rate_from": "measured (--encode-rate)"}
    elif flops and (peak := peak_flops_fp32(gpu)):
        out |= {"rate": peak * ENCODE_EFFICIENCY / flops,
                "rate_from": f"FLOP-derived: {ENCODE_EFFICIENCY:.0%} of the {gpu}'s fp32 peak (no measured rate)"}
    else:
        return out | {"rate": None, "rate_from": "unknown: pass --encode-rate (images/s per device)"}
    return out | {"device_hours": rows / out["rate"] / 3600}


def storage_bytes(cfg: PipelineConfig, storage: Storage, rows: int, whole: list[int], model: dict) -> dict:
    """Bytes each phase leaves under the storage root. images/: the mean row of up to 32 finished
    shards' markers, else JPEG_BYTES_PER_PIXEL; encoded/: T5 fp16 at text_max_length tokens + the
    int32 ids, an upper bound before zstd; checkpoints/: train.keep_checkpoints of them."""
    markers = storage.read_many([done_marker(IMAGES, s) for s in whole[:32]]).values()
    stats = [json.loads(m) for m in markers]
    measured = sum(s["rows_in"] for s in stats)
    per_image = (sum(s["bytes"] for s in stats) / measured if measured
                 else JPEG_BYTES_PER_PIXEL * cfg.download.image_size ** 2)
    text_dim = cfg.model.text_dim
    per_row = text_dim * 2 * cfg.encode.text_max_length + INT32 * GRID_BASE ** 2
    per_row += INT32 * GRID_SUPERRES ** 2 if cfg.encode.superres else 0
    return {"images": rows * per_image, "images_per_row": per_image, "images_measured": bool(measured),
            "encoded_at_most": rows * per_row, "encoded_per_row_at_most": per_row,
            "checkpoints": model["checkpoint_bytes"] * model["checkpoints_kept"]}


def plan_run(cfg: PipelineConfig, rows: int | None = None, encode_rate: float | None = None,
             gpu: str = DEFAULT_GPU) -> dict:
    """The whole plan (see the module docstring); reads the storage root and the sources, writes nothing."""
    from muse.gpus import peak_flops

    storage = Storage.from_config(cfg)
    whole, broken = check_image_shards(storage)
    plan = {"storage_root": storage.url(), "dataset": dataset_dir(cfg)} | plan_data(cfg, storage, whole, broken, rows)
    data_rows = plan["source"]["rows"]
    plan["encode"] |= encode_cost(cfg, plan["encode"]["rows_to_encode"], encode_rate, gpu)
    plan["train"] = plan_train(cfg, data_rows)
    model = plan["model"] = model_facts(cfg)
    if "samples" in plan["train"] and (peak := peak_flops(gpu)):
        flops = model["flops_per_sample"] * plan["train"]["samples"]
        plan["train"] |= {"flops": flops, "gpu_hours": flops / (peak * TRAIN_MFU) / 3600,
                          "gpu_hours_from": f"{TRAIN_MFU:.0%} MFU on the {gpu}'s bf16 peak"}
    plan["storage"] = storage_bytes(cfg, storage, data_rows, whole, model)
    return plan


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if x < 1000 or unit == "PB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return ""


def _si(x: float) -> str:
    for unit, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= f:
            return f"{x / f:.1f}{unit}"
    return _n(x)


def format_plan(plan: dict) -> str:
    """The plan as the lines `muse plan` prints: what each phase does, then what it costs."""
    s, d, e, t, m, b = (plan[k] for k in ("source", "download", "encode", "train", "model", "storage"))
    filt = "".join(f"; filtered {r}: {_n(n)}" for r, n in sorted(s["filtered"].items(), key=lambda x: -x[1]))
    lines = [f"muse plan for {plan['storage_root']} (nothing written)",
             f"source    {_n(s['rows_in'])} rows in{' (declared with --rows)' if s['declared'] else ''} from "
             f"{s['files']} file(s){filt}; {_n(s['rows'])} rows selected",
             f"download  {_n(d['shards'])} image shards of {_n(d['shard_size'])} rows ({_n(d['shards_done'])} done"
             f"{', %s broken' % _n(d['broken']) if d['broken'] else ''}"
             f"{', %s to retire' % _n(d['retired']) if d['retired'] else ''}); "
             f"{_n(d['shards_to_fetch'])} to fetch in {_n(d['tasks'])} task(s) of <= {d['shards_per_task']} shards, "
             f"~{d['cpu_hours']:,.1f} CPU core-hours at {DOWNLOAD_CPU_S * 1000:.0f} ms an image",
             f"encode    {plan['dataset']}: {_n(e['shards_done'])} shards done, {_n(e['shards_to_encode'])} to encode "
             f"({_n(e['rows_to_encode'])} rows) in {_n(e['tasks'])} task(s) of <= {e['shards_per_task']} shards"]
    flops = f"{_si(e['flops_per_picture'])}FLOP/picture ({e['counted']})" if e["flops_per_picture"] else e["counted"]
    if e["rate"]:
        lines.append(f"          {flops}; {e['rate']:,.1f} pictures/s per device, {e['rate_from']}: "
                     f"{e['device_hours']:,.1f} device-hours ({e['device_hours'] / 24:,.1f} device-days)")
    else:
        lines.append(f"          {flops}; rate {e['rate_from']}")
    lines.append(f"train     {t['nnodes']} node(s) x {t['nproc_per_node']} = {t['world_size']} rank(s) x batch "
                 f"{t['batch_size']} x accum {t['grad_accum']} = global batch {_n(t['global_batch'])}; "
                 f"{_n(t['trainable_rows'])} trainable rows{'' if t['trainable_exact'] else ' (about)'}")
    if "error" in t:
        lines.append(f"          cannot train: {t['error']}")
    else:
        lines.append(f"          {_n(t['steps_per_epoch'])} steps per epoch ({_n(t['batches_per_epoch'])} batches per rank, "
                     f"{_n(t['dropped_rows_per_epoch'])} rows dropped per epoch); {_n(t['steps'])} steps in all = "
                     f"{_n(t['samples'])} samples ({t['epochs']:.2f} epochs), {_si(t['image_tokens'])} image tokens")
        if "gpu_hours" in t:
            lines.append(f"          {_si(t['flops'])}FLOP: {t['gpu_hours']:,.1f} GPU-hours at {t['gpu_hours_from']} "
                         f"({t['gpu_hours'] / t['world_size']:,.1f} h on the {t['world_size']} rank(s))")
    parts = m["checkpoint_parts"]
    lines += [f"model     {m['params'] / 1e6:,.1f}M params; a checkpoint {_bytes(m['checkpoint_bytes'])} (weights "
              f"{_bytes(parts['model'])}, EMA {_bytes(parts['ema'])}, AdamW {_bytes(parts['optimizer'])}), "
              f"{m['checkpoints_kept']} kept",
              f"storage   images/ {_bytes(b['images'])} ({_bytes(b['images_per_row'])} a row, "
              f"{'measured on the finished shards' if b['images_measured'] else 'estimated'}); "
              f"encoded/ <= {_bytes(b['encoded_at_most'])} ({_bytes(b['encoded_per_row_at_most'])} a row: every caption "
              f"at encode.text_max_length T5 tokens, before zstd); checkpoints/ {_bytes(b['checkpoints'])}"]
    return "\n".join(lines)
