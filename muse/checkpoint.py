"""Training checkpoints on the storage root (local or gs://), atomic, last K kept.

    checkpoints/<run>/step-00000100/  model.safetensors, config.json, model_ema.safetensors,
                                      trainer.pt, loader.json, pipeline.yaml
    checkpoints/<run>/LATEST          "step-00000100", written after every file above
    checkpoints/<run>/metrics.jsonl, loss.png
(each name and what it holds: muse/layout.py, "The run folder"; loader.json records
CHECKPOINT_VERSION and a checkpoint of another version is refused).

A directory without LATEST pointing at it is never read, so a run killed while saving
resumes from the previous checkpoint. `trainer.pt` holds only tensors and plain types and
is loaded with `weights_only=True`; weights are safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muse.layout import (CHECKPOINT_VERSION, EMA_FILE, LOADER_FILE, MODEL_FILES, RUN_CONFIG, STEP_PREFIX,
                         TRAINER_FILE, check_version, latest_file, loss_curve_file, metrics_file, run_dir,
                         step_dir)
from muse.storage import Storage


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and says what to do."""


@dataclass
class TrainState:
    """Everything an exact resume needs besides the weights. `loader` goes to loader.json (JSON,
    one entry per rank), the rest to trainer.pt; `rng` also holds one entry per rank."""
    step: int = 0
    skipped: int = 0                  # non-finite steps skipped so far
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None        # {} when the GradScaler was disabled (bf16, fp32, CPU)
    ema: list | dict | None = None    # trainer's list; as read back: {parameter name: tensor}
    rng: list = field(default_factory=list)
    loader: list = field(default_factory=list)
    fp32_fallback: bool = False       # train.nonfinite_fallback switched the run to fp32
    data_pass: int = 0                # new passes started on changed data (train.on_data_change)
    skipped_row_groups: int = 0       # unreadable row groups skipped, all ranks (train.on_data_error)
    fingerprint: dict | None = None   # what `loader` is valid for (data.loader_fingerprint); loader.json


def latest(storage: Storage, run_name: str) -> str | None:
    """Relative dir of the newest complete checkpoint of a run, or None."""
    rel = latest_file(run_name)
    if not storage.exists(rel):
        return None
    return f"{run_dir(run_name)}/{storage.read_bytes(rel).decode().strip()}"


def save(storage: Storage, run_name: str, model, state: TrainState, config_yaml: str, keep: int) -> str:
    """Write one checkpoint, then LATEST, then drop all but the newest `keep`. The EMA (a list
    in `model.parameters()` order) goes to model_ema.safetensors, not trainer.pt."""
    from safetensors.torch import save_file

    from muse import ema

    rel = step_dir(run_name, state.step)
    averages, state = state.ema, dataclasses.replace(state, ema=None)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        if averages is not None:
            save_file(ema.state_dict(model, averages), str(Path(tmp) / EMA_FILE))
        for name in sorted(p.name for p in Path(tmp).iterdir()):
            storage.upload_file(Path(tmp) / name, f"{rel}/{name}")
    trainer = dataclasses.asdict(state)
    loader, fingerprint = trainer.pop("loader"), trainer.pop("fingerprint")
    buf = io.BytesIO()
    torch.save(trainer, buf)
    storage.write_bytes(f"{rel}/{TRAINER_FILE}", buf.getvalue())
    storage.write_json(f"{rel}/{LOADER_FILE}", {"schema_version": CHECKPOINT_VERSION, "ranks": loader,
                                                "fingerprint": fingerprint})
    storage.write_text(f"{rel}/{RUN_CONFIG}", config_yaml)
    storage.write_text(latest_file(run_name), rel.rsplit("/", 1)[1] + "\n")
    _prune(storage, run_name, keep)
    return rel


def _prune(storage: Storage, run_name: str, keep: int) -> None:
    storage.invalidate()
    base = storage.path(run_dir(run_name))
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in storage.fs.ls(base, detail=False))
    steps = [n for n in names if n.startswith(STEP_PREFIX)]
    for name in steps[:-keep]:
        storage.delete(f"{run_dir(run_name)}/{name}", recursive=True)


def resolve(storage: Storage, run_name: str, resume: str) -> str | None:
    """--resume latest|none|PATH -> relative checkpoint dir or None (fresh start)."""
    if resume == "none":
        return None
    if resume == "latest":
        return latest(storage, run_name)
    rel = storage.relative(resume)
    if rel is None:
        raise ValueError(f"--resume {resume}: not under the storage root {storage.url('')}")
    rel = rel.strip("/")
    if not storage.exists(f"{rel}/{TRAINER_FILE}"):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there ({storage.url(rel)}/{TRAINER_FILE} missing)")
    return rel


def has_ema(storage: Storage, rel: str) -> bool:
    return storage.exists(f"{rel}/{EMA_FILE}")


def download_model(storage: Storage, rel: str, local_dir: str | Path, ema: bool = False) -> Path:
    """config.json + the weights into `local_dir`; with `ema`, model_ema.safetensors is the one
    copied as model.safetensors (the checkpoint must have it)."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        src = EMA_FILE if ema and name == "model.safetensors" else name
        if not storage.exists(f"{rel}/{src}"):
            raise FileNotFoundError(f"{storage.url(rel)}/{src} missing: not a complete checkpoint")
        (local_dir / name).write_bytes(storage.read_bytes(f"{rel}/{src}"))
    return local_dir


def load_model(storage: Storage, rel: str, ema: bool = False):
    """The model saved in checkpoint `rel` (relative to the root), via its own from_pretrained;
    with `ema`, its EMA weights. Any failure is a CheckpointError naming the checkpoint (the
    files are read from a temp dir)."""
    from muse.models import load_pretrained

    weights = EMA_FILE if ema else "model.safetensors"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return load_pretrained(str(download_model(storage, rel, tmp, ema=ema)))
    except Exception as e:
        raise _unreadable(storage, rel, f"{weights}/config.json", e) from e


def load_state(storage: Storage, rel: str) -> TrainState:
    """The TrainState of a checkpoint (trainer.pt + loader.json + model_ema.safetensors if there);
    CheckpointError if unreadable or of another CHECKPOINT_VERSION."""
    loader_rel = f"{rel}/{LOADER_FILE}"
    try:
        loader_json = storage.read_json(loader_rel)
    except Exception as e:
        raise _unreadable(storage, rel, LOADER_FILE, e) from e
    check_version(loader_json.get("schema_version") if isinstance(loader_json, dict) else None, CHECKPOINT_VERSION, storage.url(loader_rel),
                  "resume from a checkpoint this code wrote (--resume DIR) or start over (--resume none)",
                  CheckpointError)
    try:
        trainer = torch.load(io.BytesIO(storage.read_bytes(f"{rel}/{TRAINER_FILE}")), map_location="cpu",
                             weights_only=True)
        loader, fingerprint = loader_json["ranks"], loader_json["fingerprint"]
        if has_ema(storage, rel):
            from safetensors.torch import load as load_safetensors

            trainer["ema"] = load_safetensors(storage.read_bytes(f"{rel}/{EMA_FILE}"))
    except Exception as e:
        raise _unreadable(storage, rel, f"{TRAINER_FILE}/{LOADER_FILE}/{EMA_FILE}", e) from e
    known = {f.name for f in dataclasses.fields(TrainState)}
    known -= {"loader", "fingerprint"}
    return TrainState(**{k: v for k, v in trainer.items() if k in known}, loader=loader, fingerprint=fingerprint)


def _unreadable(storage: Storage, rel: str, files: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{storage.url(rel)}: {files} unreadable ({type(e).__name__}: {e}): "
                           "resume from an older checkpoint (--resume DIR) or start over (--resume none)")


def rng_state(gen: torch.Generator) -> dict:
    """This rank's RNG for TrainState.rng: the global CPU (and CUDA) state and the masking
    generator's, with the device that generator was on (its state's format depends on it)."""
    state = {"torch": torch.get_rng_state(), "mask": gen.get_state(), "mask_device": gen.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> str | None:
    """Restore `rng_state`'s RNG. A masking generator saved on another device type (a CPU
    checkpoint resumed on CUDA: the states differ in size and format) cannot take the saved
    state: it is re-seeded from a hash of it, the same seed every time -> what was done, or None."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("mask_device", gen.device.type)
    if saved == gen.device.type:
        gen.set_state(state["mask"])
        return None
    seed = int.from_bytes(hashlib.sha256(state["mask"].numpy().tobytes()).digest()[:8], "little")
    gen.manual_seed(seed)
    return (f"the masking generator was saved on {saved}, this run has it on {gen.device.type}: "
            f"re-seeded it from the saved state (seed {seed}); exact resume holds on the same device type only")


def write_metrics(storage: Storage, run_name: str, records: list[dict]) -> None:
    """metrics.jsonl (whole file: GCS has no append) and the loss curve PNG."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    storage.write_text(metrics_file(run_name), text)
    storage.write_bytes(loss_curve_file(run_name), loss_png(records))


def read_metrics(storage: Storage, run_name: str) -> list[dict]:
    rel = metrics_file(run_name)
    if not storage.exists(rel):
        return []
    return [json.loads(line) for line in storage.read_bytes(rel).decode().splitlines() if line]


def loss_png(records: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if pts:
        ax.plot(*zip(*pts))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
