"""The `training-summary` artifact: the run's numbers and pictures, readable in the Prefect UI.

Prefect keeps artifacts in its database, and its UI shows markdown images from https: and
data:image/ URLs. So the pictures are embedded as small data: URLs sized to the page: the sample
grid and the loss curve at most DISPLAY px wide (small ones enlarged by a whole factor, pixels
kept sharp, so the grid's captions can be read), each sample a thumbnail in the prompts table
below. Captions are short; the prompts are a table of their own (a grid labelled with all its
prompts made a first column thousands of pixels wide).

Each picture names its full-size file: a link where a browser can open one (gs:// roots: the
Cloud console's https URL, `Storage.browser_url`), the path as plain text otherwise (a local path
as a link resolves against the UI's own address: a 404). `grid_image_url` is the URL of the
`sample-grid` image artifact (flows/train.py).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from muse import checkpoint
from muse.layout import loss_curve_file
from muse.storage import Storage

DISPLAY = 640  # px, widest: the artifact page's text column is ~1,000 px at a 1,280 px window
THUMB = 96     # px, longest side of a sample in the prompts table
MAX_THUMBS = 48  # thumbnails in that table (~4 KB each); later prompts are in the grid only
SIGNED_S = 7 * 24 * 3600  # a V4 signed URL's longest life


def is_grid(rel: str) -> bool:
    """`muse sample` names its grid `<out>-grid.png` (muse/sample.py)."""
    return Path(rel).stem.endswith("-grid")


def file_ref(storage: Storage, rel: str) -> str:
    """The full-size file: a markdown link where a browser opens it, else its path as code."""
    url = storage.browser_url(rel)
    return f"[{Path(rel).name}]({url})" if url else f"`{storage.url(rel)}`"


def grid_image_url(storage: Storage, rel: str) -> tuple[str, str] | None:
    """(URL, what it is) for the image artifact of the grid, or None for a local root (no URL). A
    signed URL opens for anyone (until it expires) where the credentials can sign, else the
    console URL (for Google accounts with read access)."""
    if (url := storage.signed_url(rel, SIGNED_S)) is not None:
        return url, "signed URL, valid 7 days"
    if (url := storage.browser_url(rel)) is not None:
        return url, "opens for Google accounts that can read the bucket"
    return None


def embed(data: bytes, px: int) -> str:
    """A data: URL of the picture `data` at most `px` wide: larger ones scaled down, smaller ones
    enlarged by a whole factor with nearest-neighbour pixels; PNG or JPEG, whichever is smaller."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if w > px:
        img = img.resize((px, max(1, round(h * px / w))), Image.LANCZOS)
    elif px // w > 1:
        img = img.resize((w * (px // w), h * (px // w)), Image.NEAREST)
    encoded = {}
    for fmt, kwargs in (("png", {"optimize": True}), ("jpeg", {"quality": 85})):
        buf = io.BytesIO()
        img.save(buf, fmt.upper(), **kwargs)
        encoded[fmt] = buf.getvalue()
    fmt = min(encoded, key=lambda f: len(encoded[f]))
    return f"data:image/{fmt};base64," + base64.b64encode(encoded[fmt]).decode()


def metrics_table(record: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in record.items()]


def picture(storage: Storage, rel: str, caption: str) -> list[str]:
    """A picture shown at page size with its short caption and its full-size file."""
    return [f"![{caption}]({embed(storage.read_bytes(rel), DISPLAY)})", "", f"*{caption}*, full size: "
            f"{file_ref(storage, rel)}", ""]


def present(storage: Storage, refs: list[str]) -> list[str]:
    """The refs (URIs or paths) under the root whose files exist, relative to the root."""
    rels = [storage.relative(r) for r in refs]
    return [r for r in rels if r is not None and storage.exists(r)]


def pictures(storage: Storage, run: str, samples: list[str], prompts: list[str]) -> list[str]:
    """Samples (the grid, or the one sample), the loss curve, then the prompts with thumbnails."""
    samples = present(storage, samples)
    grid = [s for s in samples if is_grid(s)]
    singles = [s for s in samples if s not in grid]
    lines = []
    if grid or singles:
        n = len(singles)
        lines += ["## Samples", ""] + picture(storage, (grid or singles)[0],
                                              f"{n} sample{'s' * (n != 1)} of run {run}")
    if present(storage, [loss_curve_file(run)]):
        lines += ["## Loss curve", ""] + picture(storage, loss_curve_file(run), f"loss of run {run}")
    if singles:
        lines += ["## Prompts", "", "| # | prompt | sample | file |", "|---|---|---|---|"]
        for i, (rel, prompt) in enumerate(zip(singles, prompts)):
            thumb = f"![sample {i}]({embed(storage.read_bytes(rel), THUMB)})" if i < MAX_THUMBS else "in the grid"
            cell = prompt.replace("|", "\\|")  # a | in a prompt would end its table cell
            lines.append(f"| {i} | {cell} | {thumb} | {file_ref(storage, rel)} |")
    return lines


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
        lines += [""] + table
    return "\n".join(lines)
