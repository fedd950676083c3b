"""The `training-summary` artifact: small markdown that links to pictures under the storage root.

Prefect keeps artifacts in its database, so pictures are not embedded: each is a link to its
file (a console URL for gs://) with its prompt, plus a thumbnail of at most THUMB px.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from muse import checkpoint
from muse.layout import loss_curve_file
from muse.storage import Storage

THUMB = 96  # px, longest side: a few KB of JPEG per picture


def link(storage: Storage, rel: str) -> str:
    """Where a browser opens the file: the Cloud console for gs://, the path otherwise."""
    url = storage.url(rel)
    if url.startswith("gs://"):
        return "https://storage.cloud.google.com/" + url[len("gs://"):]
    return url


def thumbnail(data: bytes) -> str:
    """A data: URL of a small JPEG of the PNG `data`."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table(record: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in record.items()]


def pictures(storage: Storage, run: str, samples: list[str], prompts: list[str]) -> list[str]:
    """One row per picture: label (its prompt), thumbnail, link. The grid is labelled as such."""
    labels = [f"loss curve of {run}"] + prompts[:len(samples)]
    refs = [loss_curve_file(run)] + list(samples)
    if len(samples) > len(prompts):
        labels += ["grid: " + " / ".join(prompts)]
    rows = ["| picture | | file |", "|---|---|---|"]
    for label, ref in zip(labels, refs):
        rel = storage.relative(ref)
        if rel is None or not storage.exists(rel):
            continue
        rows.append(f"| {label} | ![{label}]({thumbnail(storage.read_bytes(rel))}) | [{Path(rel).name}]({link(storage, rel)}) |")
    return rows if len(rows) > 2 else []


def summary_markdown(cfg, samples: list[str] | None, prompts: list[str]) -> str:
    storage = Storage.from_config(cfg)
    run = cfg.train.run_name
    records = checkpoint.read_metrics(storage, run)
    latest = checkpoint.latest(storage, run)
    lines = [f"# Training `{run}`", "", f"- checkpoint: `{storage.url(latest) if latest else 'none'}`",
             f"- steps: {records[-1]['step'] if records else 0}", ""]
    train = [r for r in records if "loss" in r]
    if train:
        lines += metrics_table(train[-1])
        lines += ["", f"loss: {train[0]['loss']:.4f} at the first step -> {train[-1]['loss']:.4f} now"]
    evals = [r for r in records if any(k.startswith("eval") for k in r)]
    if evals:
        lines += ["", "## Evaluation", ""] + metrics_table(evals[-1])
    table = pictures(storage, run, samples or [], prompts)
    if table:
        lines += ["", "## Pictures", ""] + table
    return "\n".join(lines)
