"""Training checkpoints on the storage root (local or gs://), atomic, last K kept.

    checkpoints/<run>/step-00000100/model.safetensors, config.json   the model's own format
                                    trainer.pt    optimizer, scheduler, scaler, EMA, RNG, counters
                                    loader.json   loader state of every rank
                                    pipeline.yaml resolved config
    checkpoints/<run>/LATEST        "step-00000100", written after every file above
    checkpoints/<run>/metrics.jsonl, loss.png

A directory without LATEST pointing at it is never read, so a run killed while saving
resumes from the previous checkpoint. `trainer.pt` holds only tensors and plain types and
is loaded with `weights_only=True`; weights are safetensors.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import torch

from muse.storage import Storage

MODEL_FILES = ("model.safetensors", "config.json")


def run_dir(run_name: str) -> str:
    return f"checkpoints/{run_name}"


def step_dir(run_name: str, step: int) -> str:
    return f"{run_dir(run_name)}/step-{step:08d}"


def latest(storage: Storage, run_name: str) -> str | None:
    """Relative dir of the newest complete checkpoint of a run, or None."""
    rel = f"{run_dir(run_name)}/LATEST"
    if not storage.exists(rel):
        return None
    return f"{run_dir(run_name)}/{storage.read_bytes(rel).decode().strip()}"


def save(storage: Storage, run_name: str, step: int, model, trainer_state: dict,
         loader_state: dict, config_yaml: str, keep: int) -> str:
    """Write one checkpoint, then LATEST, then drop all but the newest `keep`."""
    rel = step_dir(run_name, step)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for name in sorted(p.name for p in Path(tmp).iterdir()):
            storage.upload_file(Path(tmp) / name, f"{rel}/{name}")
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    storage.write_bytes(f"{rel}/trainer.pt", buf.getvalue())
    storage.write_json(f"{rel}/loader.json", loader_state)
    storage.write_text(f"{rel}/pipeline.yaml", config_yaml)
    storage.write_text(f"{run_dir(run_name)}/LATEST", rel.rsplit("/", 1)[1] + "\n")
    _prune(storage, run_name, keep)
    return rel


def _prune(storage: Storage, run_name: str, keep: int) -> None:
    storage.invalidate()
    base = storage.path(run_dir(run_name))
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in storage.fs.ls(base, detail=False))
    steps = [n for n in names if n.startswith("step-")]
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
    if not storage.exists(f"{rel}/trainer.pt"):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there ({storage.url(rel)}/trainer.pt missing)")
    return rel


def download_model(storage: Storage, rel: str, local_dir: str | Path) -> Path:
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if not storage.exists(f"{rel}/{name}"):
            raise FileNotFoundError(f"{storage.url(rel)}/{name} missing: not a complete checkpoint")
        (local_dir / name).write_bytes(storage.read_bytes(f"{rel}/{name}"))
    return local_dir


def load_model(storage: Storage, rel: str):
    """The model saved in checkpoint `rel` (relative to the root), via its own from_pretrained."""
    from muse.models import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        return load_pretrained(str(download_model(storage, rel, tmp)))


def load_trainer_state(storage: Storage, rel: str) -> tuple[dict, dict]:
    """(trainer.pt contents, loader.json) of a checkpoint."""
    state = torch.load(io.BytesIO(storage.read_bytes(f"{rel}/trainer.pt")), map_location="cpu",
                       weights_only=True)
    return state, storage.read_json(f"{rel}/loader.json")


def write_metrics(storage: Storage, run_name: str, records: list[dict]) -> None:
    """metrics.jsonl (whole file: GCS has no append) and the loss curve PNG."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    storage.write_text(f"{run_dir(run_name)}/metrics.jsonl", text)
    storage.write_bytes(f"{run_dir(run_name)}/loss.png", loss_png(records))


def read_metrics(storage: Storage, run_name: str) -> list[dict]:
    rel = f"{run_dir(run_name)}/metrics.jsonl"
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
