"""The training loop: `torchrun --nproc-per-node=N -m muse.train --config pipeline.yaml`.

Read top to bottom: setup (DDP, config checks against the manifest), model + optimizer,
resume, then one loop of optimizer steps, each `grad_accum` micro-steps of masked-token
prediction. `muse train` calls `launch()`, which runs torchrun for you.

Test hooks (environment variables, used by tests/test_train.py, harmless otherwise):
  MUSE_INJECT_NONFINITE_STEPS=3,4  make the loss of those optimizer steps NaN
  MUSE_TRACE=/path/prefix          each rank appends {step, keys, weights hash} per step to
                                   /path/prefix.rank<R>.jsonl
  MUSE_PAUSE_AT_STEP=N             after step N wait (<=120 s) for SIGTERM/SIGKILL
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from muse import checkpoint, tracking
from muse.config import ConfigError, PipelineConfig, load_config
from muse.data import DataError, StreamingDataset, worker_init
from muse.layout import dataset_dir, empty_caption, read_manifest
from muse.storage import Storage

# bf16 dense peak FLOP/s for MFU; unknown GPUs report no MFU rather than a wrong one.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class TrainError(RuntimeError):
    """The training job failed; its own log says why."""


def launch(cfg: PipelineConfig, config_path: str | None, overrides: list[str], resume: str = "latest") -> None:
    """`muse train`: run torchrun with one process per GPU (train.nproc_per_node)."""
    n = cfg.train.nproc_per_node
    if n in ("auto", "gpu"):
        n = str(max(torch.cuda.device_count(), 1))
    # --standalone: a free local rendezvous port; multi-node runs call torchrun directly
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "muse.train", "--config", str(config_path), "--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    print("muse train:", " ".join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc:
        raise TrainError(f"training failed: torchrun exited with code {rc} (see the log above)")


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


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "mask": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["mask"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def close_loader(it) -> None:
    """Stop DataLoader workers: they ignore SIGTERM (see data.worker_init), so the usual
    terminate() at exit would leave the interpreter joining them forever."""
    workers = list(getattr(it, "_workers", []))
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # asks them to stop and unregisters them from the SIGCHLD check
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()


def all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m muse.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="pipeline.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default="latest", help="latest (default), none, or a checkpoint dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        storage = Storage.from_config(cfg)
        manifest = read_manifest(storage, dataset_dir(cfg))
        tracking.require(cfg)
    except (ConfigError, DataError) as e:
        print(f"muse train: {e}", file=sys.stderr)
        return 2
    t = cfg.train
    if t.loader_streams % max(t.num_workers, 1):
        print(f"muse train: train.num_workers ({t.num_workers}) must divide train.loader_streams "
              f"({t.loader_streams})", file=sys.stderr)
        return 2

    # ---- distributed setup: torchrun sets RANK/WORLD_SIZE; plain `python -m` is one process
    ddp = "WORLD_SIZE" in os.environ
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available() and t.device != "cpu"
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    torch.manual_seed(t.seed)  # same init on every rank; per-rank streams below
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # ---- model, checked against the data
    from muse.masking import drop_condition, mask_tokens, masked_loss
    from muse.models import build_model

    raw_model = build_model(cfg.model).to(device)
    try:
        check_data(cfg, manifest, raw_model)
    except ConfigError as e:
        print(f"muse train: {e}", file=sys.stderr)
        return 2
    model = raw_model
    if t.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

    # ---- precision: bf16 autocast where supported, else fp16 + GradScaler; CPU runs fp32
    amp_dtype = None
    if t.mixed_precision and cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    global_batch = t.batch_size * t.grad_accum * world
    train_rows = manifest["rows"] * (1 - t.eval_holdout)  # expected size: the eval slice is a key hash
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * train_rows / global_batch))
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=tuple(t.betas), fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    ema = [p.detach().clone() for p in raw_model.parameters()] if t.ema else None
    gen = torch.Generator(device=device).manual_seed(t.seed * 1000 + rank)

    # ---- resume
    step, skipped, records = 0, 0, []
    loader_state = None
    rel = checkpoint.resolve(storage, t.run_name, args.resume)
    if rel:
        state, loader_json = checkpoint.load_trainer_state(storage, rel)
        # through the model's own from_pretrained, as the sampler loads it
        raw_model.load_state_dict(checkpoint.load_model(storage, rel).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema = [e.to(device) for e in state["ema"]]
        step, skipped = state["step"], state["skipped"]
        if len(loader_json["ranks"]) != world:
            print(f"muse train: {rel} was written by {len(loader_json['ranks'])} ranks, this run has "
                  f"{world}; exact resume needs the same world size (or --resume none)", file=sys.stderr)
            return 2
        loader_state = loader_json["ranks"][rank]
        set_rng_state(state["rng"][rank], gen)
        records = [r for r in checkpoint.read_metrics(storage, t.run_name) if r["step"] <= step]
        log(f"resumed from {storage.url(rel)} at step {step}")
    tracker = tracking.Tracker.start(cfg, storage, rank, step)  # TensorBoard (+ wandb) on rank 0

    # ---- data
    ds = StreamingDataset(cfg.storage.root, dataset_dir(cfg), rank, world, t.seed, t.shuffle_buffer,
                          t.batch_size, t.loader_streams, cfg.model.kind == "superres", t.replaced_rows,
                          t.replaced_weight, cfg.storage.gcs_project, t.eval_holdout)
    if loader_state:
        try:
            ds.load_state(loader_state)
        except DataError as e:
            print(f"muse train: {e}", file=sys.stderr)
            return 2
    stream_states = dict(ds.state["streams"])
    next_batch = ds.state["batch"]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=t.num_workers, pin_memory=cuda,
                                         worker_init_fn=worker_init if t.num_workers else None,
                                         prefetch_factor=4 if t.num_workers else None)
    batches = iter(loader)
    empty = empty_caption(manifest).to(device)
    empty_mask = torch.ones(1, empty.shape[0], dtype=torch.bool, device=device)
    target_key, low_key = ("vq64", "vq16") if cfg.model.kind == "superres" else ("vq16", None)
    mask_id = raw_model.config.mask_token_id
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"model {cfg.model.kind} {n_params / 1e6:.2f}M params | world {world} x batch {t.batch_size} x "
        f"accum {t.grad_accum} = global batch {global_batch} | {total_steps} steps | "
        f"precision {amp_dtype or 'fp32'} | data {storage.url(dataset_dir(cfg))} ({manifest['rows']} rows)")

    # ---- signals and test hooks
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    inject = {int(s) for s in os.environ.get("MUSE_INJECT_NONFINITE_STEPS", "").split(",") if s.strip()}
    pause_at = int(os.environ.get("MUSE_PAUSE_AT_STEP", "0") or 0)
    trace = os.environ.get("MUSE_TRACE")

    def save(final: bool = False) -> None:
        rngs = all_gather(rng_state(gen), world)
        loaders = all_gather({"batch": next_batch, "eval_holdout": t.eval_holdout, "streams": {
            str(s): StreamingDataset.state_json(v) for s, v in stream_states.items()}}, world)
        if master:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema, "step": step, "skipped": skipped,
                     "rng": rngs}
            where = checkpoint.save(storage, t.run_name, step, raw_model, state, {"ranks": loaders},
                                    cfg.to_yaml(), t.keep_checkpoints)
            checkpoint.write_metrics(storage, t.run_name, records)
            tracker.flush()
            log(f"step {step}: checkpoint {storage.url(where)}" + (" (final)" if final else ""))
        if ddp:
            dist.barrier()

    if step >= total_steps:
        log(f"nothing to do: {rel} is at step {step} of {total_steps} (raise train.max_steps or --resume none)")
    # ---- the loop
    nonfinite_run, t0 = 0, time.time()
    samples_since, tokens_per_sample = 0, raw_model.config.grid_size ** 2
    while step < total_steps:
        model.train()
        loss_sum = torch.zeros((), device=device)
        keys = []
        for micro in range(t.grad_accum):
            batch = next(batches)
            stream_states[batch["_stream"]] = batch["_state"]
            next_batch = batch["_batch"] + 1
            keys += batch["keys"]
            hidden = batch["encoder_hidden_states"].to(device, non_blocking=True).float()
            attn = batch["encoder_attention_mask"].to(device, non_blocking=True)
            targets = batch[target_key].to(device, non_blocking=True)
            low = batch[low_key].to(device, non_blocking=True) if low_key else None
            weights = batch["weights"].to(device) if "weights" in batch else None
            hidden, attn, _ = drop_condition(hidden, attn, empty, empty_mask, t.cond_dropout, gen)
            input_ids, mask = mask_tokens(targets, mask_id, gen)
            sync = contextlib.nullcontext() if (not ddp or micro == t.grad_accum - 1) else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(input_ids, hidden, attn, low)
                loss = masked_loss(logits.float(), targets, mask, t.label_smoothing, weights) / t.grad_accum
                if step + 1 in inject:
                    loss = loss * float("nan")
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        step += 1
        samples_since += t.batch_size * t.grad_accum * world

        # ---- non-finite guard: grads are all-reduced, so every rank takes the same branch
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip or float("inf"))
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum))
        if finite:
            scaler.step(optimizer)
            nonfinite_run = 0
            if ema is not None:
                torch._foreach_lerp_(ema, [p.detach() for p in raw_model.parameters()], 1 - t.ema_decay)
        else:
            skipped += 1
            nonfinite_run += 1
            log(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if nonfinite_run >= t.max_nonfinite_steps:
            if t.nonfinite_fallback and (amp_dtype is not None):
                log(f"step {step}: {nonfinite_run} non-finite steps in a row: continuing in fp32")
                amp_dtype, nonfinite_run = None, 0
                scaler = torch.amp.GradScaler("cuda", enabled=False)
            else:
                print(f"muse train: stopping at step {step}: {nonfinite_run} non-finite steps in a row "
                      f"({skipped} skipped in total). Set train.mixed_precision: false (or "
                      "train.nonfinite_fallback: true), or lower train.lr. The last checkpoint is intact.",
                      file=sys.stderr, flush=True)
                close_loader(batches)
                tracker.close()
                if ddp:
                    dist.destroy_process_group()
                return 3

        # ---- logging
        rec = {"step": step, "loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm),
               "skipped": skipped, "epoch": step * global_batch / train_rows}
        if trace:
            with open(f"{trace}.rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "keys": keys, "hash": weights_hash(raw_model),
                                    "loss": rec["loss"], "lr": lr, "skipped": skipped}) + "\n")
        if step % t.log_every == 0 or step == total_steps:
            dt = max(time.time() - t0, 1e-9)
            rec["samples_per_s"] = samples_since / dt
            rec["tokens_per_s"] = rec["samples_per_s"] * tokens_per_sample
            peak = next((v for k, v in PEAK_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
            if peak and hasattr(raw_model, "num_flops_per_sample"):
                rec["mfu"] = raw_model.num_flops_per_sample() * rec["samples_per_s"] / (peak * world)
            log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            tracker.scalars(step, rec)
            t0, samples_since = time.time(), 0
        records.append(rec)

        if step == pause_at:
            deadline = time.time() + 120
            while not stop["flag"] and time.time() < deadline:
                time.sleep(0.05)
        if ddp:  # a SIGTERM seen by any rank stops all of them at this step boundary
            flag = torch.tensor(float(stop["flag"]), device=device)
            dist.all_reduce(flag)
            stop["flag"] = bool(flag.item())
        if stop["flag"]:
            log(f"step {step}: SIGTERM received, writing a checkpoint and exiting")
            save()
            break
        if step % t.checkpoint_every == 0 or step == total_steps:
            save(final=step == total_steps)
        if t.sample_every and step % t.sample_every == 0 and master:
            _sample_best_effort(cfg, step, storage, tracker)
        if t.eval_every and step % t.eval_every == 0:
            if master:
                _eval_best_effort(cfg, step, raw_model, device, storage, tracker)
            if ddp:  # the other ranks wait for rank 0's evaluation
                dist.barrier()

    close_loader(batches)
    tracker.close()
    if ddp:
        dist.destroy_process_group()
    return 0


def _sample_best_effort(cfg: PipelineConfig, step: int, storage: Storage, tracker=None) -> None:
    """`muse sample` on the latest checkpoint (sample.prompts), its grid (or single image) sent to
    the tracker as `samples` with the prompts as caption; a failure is logged, never fatal."""
    rel = checkpoint.latest(storage, cfg.train.run_name)
    if rel is None:
        return
    try:
        from muse.sample import run_sample

        data = cfg.model_dump(mode="json")
        data["sample"].update(checkpoint=storage.url(rel),
                              out=storage.url(f"{checkpoint.run_dir(cfg.train.run_name)}/samples/step-{step:08d}.png"))
        written = run_sample(PipelineConfig.model_validate(data))
        if tracker is not None:
            _track_png(tracker, step, "samples", storage, storage.relative(written[-1]))
    except Exception as e:  # needs T5 + the VQ decoder; training must go on without them
        print(f"step {step}: sampling skipped ({type(e).__name__}: {e})", flush=True)


def _eval_best_effort(cfg: PipelineConfig, step: int, model, device, storage: Storage,
                      tracker=None) -> dict | None:
    """A small `muse eval` of the in-memory weights (<= IN_TRAINING_SAMPLES eval rows) -> metrics,
    or None: a failure is logged, never fatal. The global RNG is restored, so training goes on
    exactly as without it. The tracker gets the metrics as `eval/<name>` and the result grid as
    `eval/samples`."""
    try:
        from muse.evaluate import IN_TRAINING_SAMPLES, results_rel, run_eval

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = run_eval(cfg, model=model, step=step, device=device,
                               max_samples=min(cfg.eval.max_samples, IN_TRAINING_SAMPLES))
    except Exception as e:  # needs the VQ decoder, CLIP and FID features; training must go on
        print(f"step {step}: evaluation skipped ({type(e).__name__}: {e})", flush=True)
        return None
    print(f"step {step}: eval " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    if tracker is not None:
        tracker.scalars(step, metrics, prefix="eval")
        try:
            _track_png(tracker, step, "eval/samples", storage, results_rel(cfg.train.run_name, step) + ".png")
        except Exception as e:  # the metrics are in; a missing picture is not worth more
            print(f"step {step}: eval grid not tracked ({type(e).__name__}: {e})", flush=True)
    return metrics


def _track_png(tracker, step: int, tag: str, storage: Storage, rel: str) -> None:
    """A PNG written under the storage root to the tracker, its `prompt` text chunk as caption."""
    from PIL import Image

    png = Image.open(io.BytesIO(storage.read_bytes(rel)))
    tracker.image(step, tag, np.asarray(png.convert("RGB")), png.text.get("prompt"))


if __name__ == "__main__":
    sys.exit(main())
