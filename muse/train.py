"""The training loop: `torchrun --nproc-per-node=N -m muse.train --config pipeline.yaml`.

`train()` runs everything a rank does: verify the shards, plan the data (`dataset`), `build` the
model, optimizer and precision, `resume` a checkpoint's `TrainState`, start the loader at its saved
position and run `train_loop`, optimizer steps of `grad_accum` masked-token micro-steps. `main`
joins the torchrun job around it (muse/distributed.py); `muse train` runs torchrun (muse/launch.py);
tests pass a fault injector as `main(argv, faults)` (muse/testing/faults.py).

A fatal error on any rank (bad shard, unreadable checkpoint) ends the job with one line
`muse train: <where>: <problem>: <what to do>` and a non-zero exit: the loader is closed on
every exit path, so its workers never keep the process alive. The line also goes to
`$MUSE_CAUSE_DIR/rank<R>` when `muse train` set it, which prints it last (muse/launch.py).
A row group that cannot be read (`data.RowGroupError`) is agreed on before the step's collectives
(`fetch`): every rank stops there, no new checkpoint (train.on_data_error: stop), or the rank that
met it skips it and the step goes on (skip).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from muse import checkpoint, ema, tracking
from muse.checkpoint import CheckpointError, TrainState, rng_state, set_rng_state
from muse.config import ConfigError, PipelineConfig, load_config
from muse.data import (DataError, LoaderSettings, StreamingDataset, close_loader, loader_changes, total_steps,
                       verify_shards, worker_init)
from muse.distributed import Dist, StopRequest, setup_distributed
from muse.gpus import amp_dtype, peak_flops
from muse.layout import dataset_dir, empty_caption, read_manifest
from muse.launch import CAUSE_DIR_ENV
from muse.lifecycle import exit_with_parent
from muse.memory import free_memory, resolve_batch
from muse.storage import RetryPolicy, Storage
from muse.train_callbacks import StepCallback

# ----------------------------------------------------------------------------- the job's pieces

def check_data(cfg: PipelineConfig, manifest: dict, model) -> None:
    """The model must match the data it is trained on; say which key to change."""
    m, mc = manifest, model.config
    problems = []
    if m["text_dim"] != mc.text_dim:
        problems.append(f"model.text_dim={mc.text_dim} but the data's T5 width is {m['text_dim']}")
    if m["codebook_size"] != mc.codebook_size:
        problems.append(f"model.codebook_size={mc.codebook_size} but the data has {m['codebook_size']} codes")
    grid = m["superres_grid"] if cfg.model.kind == "superres" else m["grid"]
    if grid is None:
        problems.append("model.kind=superres but the data has no 64x64 tokens (encode.superres=false)")
    elif grid != mc.grid_size:
        problems.append(f"model grid is {mc.grid_size}x{mc.grid_size} but the data's is {grid}x{grid}")
    if problems:
        raise ConfigError("model does not match the encoded data " f"({dataset_dir(cfg)}):\n  "
                          + "\n  ".join(problems))


def lr_lambda(cfg: PipelineConfig, total_steps: int):
    """Linear warmup from lr/warmup (never 0) to lr, then cosine to min_lr_ratio or constant."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(cfg: PipelineConfig, model, total_steps: int, fused: bool = False):
    """AdamW (no weight decay on biases and norms) and the warmup + cosine LambdaLR."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=tuple(t.betas), fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


@dataclasses.dataclass
class Job:
    """The model and everything that steps it, built once by `build`."""
    cfg: PipelineConfig
    d: Dist
    raw_model: torch.nn.Module         # the module itself: checkpoints, EMA, clipping
    model: torch.nn.Module             # compiled and/or DDP-wrapped: forward + backward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None      # None = fp32
    ema: list | None
    gen: torch.Generator               # masking and condition dropout, one stream per rank
    empty: torch.Tensor                # T5 of "" for condition dropout [L, D]
    total_steps: int
    global_batch: int
    batches_per_epoch: int             # micro-batches per rank per epoch (the loader's plan)
    nonfinite_run: int = 0


def build(cfg: PipelineConfig, manifest: dict, d: Dist, batches_per_epoch: int = 0) -> Job:
    """Model (checked against the data), DDP, precision, optimizer, schedule, EMA; without
    train.max_steps, train.epochs exact passes of `batches_per_epoch` (StreamingDataset's plan)."""
    from muse.models import build_model

    t = cfg.train
    torch.manual_seed(t.seed)  # same init on every rank; per-rank streams below
    raw_model = build_model(cfg.model).to(d.device)
    check_data(cfg, manifest, raw_model)
    raw_model.activation_checkpointing = t.activation_checkpointing
    model = raw_model
    if d.ddp:  # gradients live in DDP's buckets: no second copy of them
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.cuda else None,
                                                          gradient_as_bucket_view=True)
        if t.grad_compression == "bf16" and not d.cuda:
            raise ConfigError("train.grad_compression: bf16 needs NCCL (CUDA GPUs); on CPU use fp16 or none")
        if t.grad_compression != "none":  # across machines the all-reduce, not the GPU, is the bottleneck
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, getattr(default_hooks, f"{t.grad_compression}_compress_hook"))
    model = torch.compile(model) if t.compile else model  # compile(DDP): DDP's graph breaks overlap comms
    if d.cuda:  # fp32 matmuls (mixed_precision off, the fp32 fallback) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = amp_dtype(d.device, t.mixed_precision)  # bf16, fp16 + GradScaler on T4/V100, or fp32
    global_batch = t.batch_size * t.grad_accum * d.world
    if not (t.max_steps or batches_per_epoch):
        raise ValueError("build: train.epochs needs the loader's batches_per_epoch")
    steps = total_steps(t.max_steps, t.epochs, batches_per_epoch, t.grad_accum)
    optimizer, scheduler = build_optimizer(cfg, raw_model, steps, fused=d.cuda)
    return Job(cfg, d, raw_model, model, optimizer, scheduler,
               torch.amp.GradScaler("cuda", enabled=precision == torch.float16), precision,
               ema.init(raw_model) if t.ema else None,
               torch.Generator(device=d.device).manual_seed(t.seed * 1000 + d.rank),
               empty_caption(manifest).to(d.device), steps, global_batch, batches_per_epoch)


def to_fp32(job: Job) -> None:
    job.amp_dtype = None
    job.scaler = torch.amp.GradScaler("cuda", enabled=False)


def resume(job: Job, storage: Storage, which: str) -> tuple[TrainState, str | None]:
    """--resume latest|none|DIR: the checkpoint's TrainState applied to the job, or a fresh one."""
    try:
        rel = checkpoint.resolve(storage, job.cfg.train.run_name, which)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{e}: pass an existing checkpoint dir, latest or none") from None
    if not rel:
        return TrainState(), None
    st = checkpoint.load_state(storage, rel)
    if len(st.loader) != job.d.world:
        raise CheckpointError(f"{storage.url(rel)}: written by {len(st.loader)} ranks, this run has "
                              f"{job.d.world}: exact resume needs the same world size (or --resume none)")
    # through the model's own from_pretrained, as the sampler loads it
    job.raw_model.load_state_dict(checkpoint.load_model(storage, rel).state_dict())
    job.optimizer.load_state_dict(st.optimizer)
    job.scheduler.load_state_dict(st.scheduler)
    if st.fp32_fallback:  # the run had already fallen back: stay there
        to_fp32(job)
    # a scaler state exists only for fp16 runs; a run that changed precision starts a fresh one
    if job.scaler.is_enabled() and st.scaler:
        job.scaler.load_state_dict(st.scaler)
    if job.ema is not None and st.ema is not None:
        job.ema = ema.from_state_dict(job.raw_model, st.ema, job.d.device)
    job.d.log(f"resumed from {storage.url(rel)} at step {st.step}")
    return st, rel


def check_data_change(cfg: PipelineConfig, ds: StreamingDataset, st: TrainState, where: str, d: Dist) -> str | None:
    """The saved loader state is only valid for the data and loader settings it was written with
    (on main a refreshed manifest crashed with IndexError, a changed train.loader_streams silently
    reordered the samples). On a change: stop, or with train.on_data_change=new_pass drop the
    loader state (weights, optimizer, step and RNG stay) -> what changed, or None."""
    t = cfg.train
    now = ds.fingerprint()
    saved, st.fingerprint = st.fingerprint, now
    changes = loader_changes(saved, now) if st.loader and saved else []
    if not changes:
        return None
    if t.on_data_change == "stop":
        raise CheckpointError(f"{where}: the data or loader settings changed since this checkpoint "
                              f"({'; '.join(changes)}): exact resume needs the same ones. "
                              "--set train.on_data_change=new_pass keeps the weights, optimizer and step and "
                              "starts a new pass over the data (or --resume none)")
    st.loader, st.data_pass = [], st.data_pass + 1
    d.log(f"step {st.step}: the data or loader settings changed ({'; '.join(changes)}): "
          f"new pass {st.data_pass} over the data from its start (train.on_data_change=new_pass)")
    return "; ".join(changes)


def dataset(cfg: PipelineConfig, data_dir: str, d: Dist) -> StreamingDataset:
    """This rank's stream with its epoch plan; the plan (rows dropped per epoch, buffers too small to
    mix) is reported once, by rank 0."""
    t = cfg.train
    ds = StreamingDataset(cfg.storage.root, data_dir, LoaderSettings.from_config(cfg), d.rank, d.world,
                          gcs_project=cfg.storage.gcs_project, retry=RetryPolicy.from_config(cfg.storage))
    d.log(f"epoch: {ds.train_rows} trainable rows = {d.world} ranks x {ds.batches_per_epoch} batches x "
          f"{t.batch_size} + {ds.dropped_rows} dropped (the remainder of the last global batch; other rows "
          "each epoch)")
    if warning := ds.mixing_warning():
        d.log(f"warning: {warning}")
    return ds


def start_loader(cfg: PipelineConfig, ds: StreamingDataset, d: Dist, st: TrainState):
    """This rank's DataLoader at the saved position -> its iterator (batches go through `ds.consume`)."""
    t = cfg.train
    if st.loader:
        ds.load_state_dict(st.loader[d.rank])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=t.num_workers, pin_memory=d.cuda,
                                         worker_init_fn=worker_init if t.num_workers else None,
                                         prefetch_factor=4 if t.num_workers else None)
    return iter(loader)


# ----------------------------------------------------------------------------- one step

def forward_backward(job: Job, batch: dict, sync: bool, poison: bool) -> torch.Tensor:
    """One micro-step: condition dropout, masking, loss / grad_accum, backward -> detached loss."""
    from muse.masking import drop_condition, mask_tokens, masked_loss, pad_to

    t, dev = job.cfg.train, job.d.device
    target_key, low_key = ("vq64", "vq16") if job.cfg.model.kind == "superres" else ("vq16", None)
    hidden = batch["encoder_hidden_states"].to(dev, non_blocking=True).float()
    attn = batch["encoder_attention_mask"].to(dev, non_blocking=True)
    targets = batch[target_key].to(dev, non_blocking=True)
    low = batch[low_key].to(dev, non_blocking=True) if low_key else None
    weights = batch["weights"].to(dev) if "weights" in batch else None
    empty_mask = torch.ones(1, job.empty.shape[0], dtype=torch.bool, device=dev)
    hidden, attn, _ = drop_condition(hidden, attn, job.empty, empty_mask, t.cond_dropout, job.gen)
    if t.compile:  # one text length for every batch: no recompile per caption length
        L = max(job.cfg.encode.text_max_length, hidden.shape[1])
        hidden, attn = pad_to(hidden, L, 1), pad_to(attn, L, 1)
    input_ids, mask = mask_tokens(targets, job.raw_model.config.mask_token_id, job.gen)
    # DDP all-reduces gradients only on the last micro-step
    with contextlib.nullcontext() if sync or not job.d.ddp else job.model.no_sync():
        with torch.autocast(dev.type, dtype=job.amp_dtype, enabled=job.amp_dtype is not None):
            logits = job.model(input_ids, hidden, attn, low)
        loss = masked_loss(logits, targets, mask, t.label_smoothing, weights) / t.grad_accum  # fp32 rows
        if poison:
            loss = loss * float("nan")
        job.scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(job: Job, st: TrainState, loss_sum: torch.Tensor) -> tuple[float, float]:
    """Clip, step (skipped when the loss or gradient is not finite), EMA, schedule -> (lr, grad norm).
    Gradients and the loss are all-reduced, so every rank takes the same branch."""
    t = job.cfg.train
    job.scaler.unscale_(job.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(job.raw_model.parameters(), t.grad_clip or float("inf"))
    job.d.mean_(loss_sum)
    if bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum)):
        job.scaler.step(job.optimizer)
        job.nonfinite_run = 0
        if job.ema is not None:
            ema.update(job.ema, job.raw_model, t.ema_decay)
    else:
        st.skipped += 1
        job.nonfinite_run += 1
        job.d.log(f"step {st.step}: non-finite loss or gradient, step skipped ({st.skipped} so far)")
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    lr = job.scheduler.get_last_lr()[0]
    job.scheduler.step()
    return lr, float(grad_norm)


def too_many_nonfinite(job: Job, st: TrainState) -> bool:
    """After max_nonfinite_steps in a row: fall back to fp32 (recorded in the TrainState) or stop."""
    t = job.cfg.train
    if job.nonfinite_run < t.max_nonfinite_steps:
        return False
    if t.nonfinite_fallback and job.amp_dtype is not None:
        job.d.log(f"step {st.step}: {job.nonfinite_run} non-finite steps in a row: continuing in fp32")
        to_fp32(job)
        job.nonfinite_run, st.fp32_fallback = 0, True
        return False
    print(f"muse train: stopping at step {st.step}: {job.nonfinite_run} non-finite steps in a row "
          f"({st.skipped} skipped in total). Set train.mixed_precision: false (or "
          "train.nonfinite_fallback: true), or lower train.lr. The last checkpoint is intact.",
          file=sys.stderr, flush=True)
    return True


def throughput(job: Job, samples: int, seconds: float) -> dict:
    out = {"samples_per_s": samples / max(seconds, 1e-9)}
    out["tokens_per_s"] = out["samples_per_s"] * job.raw_model.config.grid_size ** 2
    peak = peak_flops(torch.cuda.get_device_name()) if job.d.cuda else None  # unknown GPU: no MFU
    if peak and hasattr(job.raw_model, "num_flops_per_sample"):
        out["mfu"] = job.raw_model.num_flops_per_sample() * out["samples_per_s"] / (peak * job.d.world)
    return out


def save(job: Job, st: TrainState, ds: StreamingDataset, storage: Storage, records: list, tracker,
         final: bool = False) -> None:
    """A checkpoint of every rank's RNG and loader position, written by rank 0; all ranks wait."""
    t, d = job.cfg.train, job.d
    rng = d.gather(rng_state(job.gen))
    loader = d.gather(ds.state_dict())
    if d.master:
        full = dataclasses.replace(st, optimizer=job.optimizer.state_dict(), scheduler=job.scheduler.state_dict(),
                                   scaler=job.scaler.state_dict(), ema=job.ema, rng=rng, loader=loader)
        where = checkpoint.save(storage, t.run_name, job.raw_model, full, job.cfg.to_yaml(), t.keep_checkpoints)
        checkpoint.write_metrics(storage, t.run_name, records)
        tracker.flush()
        d.log(f"step {st.step}: checkpoint {storage.url(where)}" + (" (final)" if final else ""))
    d.barrier(f"rank 0 to write the step-{st.step} checkpoint")


# ----------------------------------------------------------------------------- the loop

class PeerStopped(Exception):
    """Another rank could not read its data: this one stops too (that rank prints the cause)."""


def fetch(job: Job, st: TrainState, ds: StreamingDataset, batches) -> list[dict]:
    """The step's grad_accum micro-batches. The ranks agree first, in one all-reduce before any
    collective of the step: a DataError on one rank would leave the others waiting in DDP's
    all-reduce, so every rank stops here (the failing one raises its error, the others
    PeerStopped); the same all-reduce sums the row groups skipped (on_data_error: skip)."""
    d, micro, error = job.d, [], None
    try:
        for _ in range(job.cfg.train.grad_accum):
            micro.append(ds.consume(next(batches)))
    except DataError as e:
        error = e
    skipped = ds.take_skipped()
    for why in skipped:  # printed by the rank that skipped, not only rank 0
        print(f"{f'rank {d.rank}: ' if d.ddp else ''}step {st.step + 1}: skipped {why} "
              f"(train.on_data_error: skip)", flush=True)
    failed, n = d.sum([float(error is not None), float(len(skipped))])
    st.skipped_row_groups += int(n)
    if error is not None:
        raise error
    if failed:
        d.log(f"step {st.step + 1}: {int(failed)} rank(s) could not read their data (their error line says "
              "where): every rank stops, the last checkpoint stays for `muse train` to resume from")
        raise PeerStopped
    return micro


def train_loop(job: Job, st: TrainState, batches, ds: StreamingDataset, storage: Storage, records: list,
               tracker, stop: StopRequest, faults=None) -> int:
    t, d = job.cfg.train, job.d
    callback = StepCallback(job.cfg, storage, tracker, d)
    t0, samples = time.time(), 0
    while st.step < job.total_steps:
        job.model.train()
        loss_sum, keys = torch.zeros((), device=d.device), []
        for micro, batch in enumerate(fetch(job, st, ds, batches)):
            keys += batch["keys"]
            loss_sum += forward_backward(job, batch, sync=micro == t.grad_accum - 1,
                                         poison=faults is not None and faults.poison(st.step + 1))
        st.step += 1
        samples += job.global_batch
        lr, grad_norm = optimizer_step(job, st, loss_sum)
        if too_many_nonfinite(job, st):
            return 3

        rec = {"step": st.step, "loss": float(loss_sum), "lr": lr, "grad_norm": grad_norm,
               "skipped": st.skipped, "epoch": ds.next_batch / job.batches_per_epoch}  # of this data pass
        if t.on_data_error == "skip":  # all ranks, since the run began (resumes included)
            rec["skipped_row_groups"] = st.skipped_row_groups
        if st.step % t.log_every == 0 or st.step == job.total_steps:
            rec |= throughput(job, samples, time.time() - t0)
            d.log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            tracker.scalars(st.step, rec)
            t0, samples = time.time(), 0
        records.append(rec)
        if faults is not None:
            faults.after_step(d.rank, rec, keys, job.raw_model, lambda: bool(stop))

        if d.any(bool(stop)):  # a signal seen by any rank stops all of them at this step boundary
            d.log(f"step {st.step}: {stop.signal or 'a stop signal'} received, writing a checkpoint and exiting")
            save(job, st, ds, storage, records, tracker)
            break
        if st.step % t.checkpoint_every == 0 or st.step == job.total_steps:
            save(job, st, ds, storage, records, tracker, final=st.step == job.total_steps)
        callback(st.step, job.raw_model, d.device)
    return 0


def train(cfg: PipelineConfig, storage: Storage, manifest: dict, d: Dist, which: str, stop: StopRequest,
          faults=None) -> int:
    """Build, resume, start the loader, run the loop; the loader is closed however it ends.
    `faults`: a test's fault injection (muse/testing/faults.py), None in a real run."""
    t, data_dir = cfg.train, dataset_dir(cfg)
    if t.cpu_threads and not d.cuda:  # CPU kernels' sums depend on the thread count: fixed, the same weights
        torch.set_num_threads(t.cpu_threads)
    if t.verify != "none":
        verify_shards(storage, data_dir, manifest, sha256=t.verify == "sha256", rank=d.rank, world=d.world)
    ds = dataset(cfg, data_dir, d)  # before build: train.epochs counts its batches
    job = build(cfg, manifest, d, ds.batches_per_epoch)
    st, rel = resume(job, storage, which)
    changed = check_data_change(cfg, ds, st, storage.url(rel or ""), d)
    records = [r for r in checkpoint.read_metrics(storage, t.run_name) if r["step"] <= st.step] if rel else []
    if changed:  # in metrics.jsonl with the next checkpoint
        records.append({"step": st.step, "event": "new_pass", "data_pass": st.data_pass, "changes": changed})
    tracker = tracking.Tracker.start(cfg, storage, d.rank, st.step)  # TensorBoard (+ wandb) on rank 0
    batches = None
    try:
        batches = start_loader(cfg, ds, d, st)
        # after the loader started: its iterator draws a base seed from the global RNG
        if st.rng and (note := set_rng_state(st.rng[d.rank], job.gen)):
            d.log(f"step {st.step}: {note}")
        d.log(f"model {cfg.model.kind} {sum(p.numel() for p in job.raw_model.parameters()) / 1e6:.2f}M params | "
              f"world {d.world} x batch {t.batch_size} x accum {t.grad_accum} = global batch {job.global_batch} | "
              f"{job.total_steps} steps | precision {job.amp_dtype or 'fp32'} | "
              f"data {storage.url(data_dir)} ({manifest['rows']} rows)")
        if st.step >= job.total_steps:
            d.log(f"nothing to do: {rel} is at step {st.step} of {job.total_steps} "
                  "(raise train.max_steps or --resume none)")
        return train_loop(job, st, batches, ds, storage, records, tracker, stop, faults)
    finally:
        if batches is not None:
            close_loader(batches)
        tracker.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m muse.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="pipeline.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default="latest", help="latest (default), none, or a checkpoint dir")
    return p.parse_args(argv)


def load_job(args) -> tuple[PipelineConfig, Storage, dict]:
    """Config, storage and manifest; ConfigError/DataError before any process group exists."""
    cfg = load_config(args.config, args.overrides)
    storage = Storage.from_config(cfg)
    manifest = read_manifest(storage, dataset_dir(cfg))
    tracking.require(cfg)  # tensorboard (and a configured wandb) installed, before the job starts
    return cfg, storage, manifest


def fail(e: Exception, rc: int = 2) -> int:
    """Print the error as the rank's last line and leave it for `muse train` (MUSE_CAUSE_DIR)."""
    from muse.cli import one_line

    line = one_line(str(e))
    print(f"muse train: {line}", file=sys.stderr, flush=True)
    if cause_dir := os.environ.get(CAUSE_DIR_ENV):
        with contextlib.suppress(OSError):  # the cause is also in the log above
            Path(cause_dir, f"rank{os.environ.get('RANK', '0')}").write_text(line)
    return rc


def main(argv=None, faults=None) -> int:
    """`python -m muse.train`; the tests pass `faults` (see `train`)."""
    args = parse_args(argv)
    try:
        cfg, storage, manifest = load_job(args)
    except (ConfigError, DataError) as e:
        return fail(e)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank, in a session of its own: die with it
        exit_with_parent("torchrun")
    d = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        free = free_memory(d.device)  # train.global_batch / batch_size auto: every rank plans alike
        cfg, why = resolve_batch(cfg, d.world, None if free is None else min(d.gather(free)))
        if why:
            d.log(why)
        with StopRequest().installed() as stop:
            return train(cfg, storage, manifest, d, args.resume, stop, faults)
    except (ConfigError, DataError, CheckpointError) as e:
        return fail(e)
    except PeerStopped:
        return 2
    finally:
        d.close()


if __name__ == "__main__":
    sys.exit(main())
