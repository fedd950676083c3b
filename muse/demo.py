"""The tiny bundled subset: everything the end-to-end demo needs, made on the spot, offline.

- 48 small pictures of coloured shapes with matching captions, plus two rows that must
  fail (a 404 and a `file://` URL) to show the replacement path;
- a threaded HTTP server on 127.0.0.1 serving them (LAION URLs are unreachable here);
- tiny random-init T5 / VQGAN built by `muse.tiny` and loaded through the real code path;
- a pipeline config derived from `pipeline.yaml` with tiny sizes (tiny model, a few
  training steps, CPU-friendly batch).
`flows/demo.py` runs the Prefect pipeline on it; `run_library(...)` does the same without Prefect.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from muse.tiny import CODEBOOK, TEXT_DIM  # the demo model must match the tiny encoders

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
REPO = Path(__file__).resolve().parents[1]


def draw(shape: str, color: tuple, size: int = 320, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c, r = size / 2 + rng.integers(-30, 30), size / 3
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=color)
    elif shape == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=color)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=color)
    else:
        pts = [(c + (r if i % 2 == 0 else r / 2.5) * np.cos(np.pi / 2 + i * np.pi / 5),
                c - (r if i % 2 == 0 else r / 2.5) * np.sin(np.pi / 2 + i * np.pi / 5)) for i in range(10)]
        d.polygon(pts, fill=color)
    return img


def make_images(folder: Path, n: int = 48) -> list[tuple[str, str]]:
    """Write n JPEGs; -> [(file name, caption)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    names = list(COLORS)
    for i in range(n):
        color, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        name = f"{i:03d}-{color}-{shape}.jpg"
        draw(shape, COLORS[color], seed=i).save(folder / name, quality=92)
        out.append((name, f"a {color} {shape} on a light background"))
    return out


class ImageServer:
    """`with ImageServer(folder) as url:` serves `folder` on 127.0.0.1 (a free port)."""

    def __init__(self, folder: Path, port: int = 8765):
        handler = partial(_QuietHandler, directory=str(folder))
        try:  # a stable port keeps the URL list unchanged between demo runs (nothing re-fetched)
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # img2dataset's own progress is enough
        pass


def write_source(path: Path, base_url: str, items: list[tuple[str, str]]) -> int:
    rows = [{"url": f"{base_url}/{name}", "caption": caption, "sample_id": i} for i, (name, caption) in enumerate(items)]
    rows.append({"url": f"{base_url}/missing.jpg", "caption": "a picture that is gone (404)", "sample_id": len(rows)})
    rows.append({"url": "file:///etc/hostname", "caption": "not an http URL", "sample_id": len(rows)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:  # unchanged file: the download skips it
        path.write_text(text)
    return len(rows)


def demo_config(out: Path, encoders: dict, source: Path) -> dict:
    """pipeline.yaml with tiny sizes for 2 CPU cores."""
    data = yaml.safe_load((REPO / "pipeline.yaml").read_text()) if (REPO / "pipeline.yaml").exists() else {}
    data["storage"] = {**data.get("storage", {}), "root": str(out / "data"), "work_dir": str(out / "work")}
    data["source"] = {**data.get("source", {}), "paths": [str(source)], "url_column": "url",
                      "caption_column": "caption", "format": "jsonl"}
    data["download"] = {**data.get("download", {}), "processes": 1, "threads": 8, "shard_size": 25,
                        "timeout_s": 3, "retries": 0, "deadline_s": 300}
    data["encode"] = {**data.get("encode", {}), "text_model": encoders["text_model"], "vq_model": encoders["vq_model"],
                      "vq_subfolder": None, "vq_format": "diffusers", "batch_size": 16, "row_group_size": 16,
                      "device": "cpu"}
    data["model"] = {**data.get("model", {}), "preset": "tiny", "codebook_size": CODEBOOK, "text_dim": TEXT_DIM}
    data["train"] = {**data.get("train", {}), "run_name": "demo", "batch_size": 8, "grad_accum": 1, "max_steps": 40,
                     "warmup_steps": 5, "lr": 3e-3, "num_workers": 0, "shuffle_buffer": 64,
                     "checkpoint_every": 20, "log_every": 5, "nproc_per_node": 1, "device": "cpu",
                     "mixed_precision": False}
    data["sample"] = {**data.get("sample", {}), "prompts": ["a red circle on a light background",
                                                            "a blue square on a light background"],
                      "steps": 8, "guidance_scale": 2.0, "out": "samples/demo.png", "device": "cpu"}
    return data


def prepare(out: str | Path) -> tuple[Path, Path]:
    """Images, tiny encoders, config (without the URL list, which needs the server's port).

    -> (config path, images folder)."""
    from muse.tiny import build_tiny_encoders

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items = make_images(out / "images")
    (out / "captions.json").write_text(json.dumps(items))
    encoders = build_tiny_encoders(out / "encoders")
    source = out / "source" / "urls.jsonl"
    source.parent.mkdir(exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(demo_config(out, encoders, source), sort_keys=False))
    return path, out / "images"


def write_urls(out: str | Path, base_url: str) -> int:
    out = Path(out).resolve()
    items = [tuple(x) for x in json.loads((out / "captions.json").read_text())]
    return write_source(out / "source" / "urls.jsonl", base_url, items)


def run_library(config_path: str | Path) -> None:
    """download -> encode -> train -> sample without Prefect (what `muse run` does)."""
    from muse.cli import main

    rc = main(["run", "--config", str(config_path)])
    if rc:
        raise SystemExit(rc)
