"""Encode phase throughput vs the bare model forward, same models and batch, same run.

Pipeline: `run_encode` over image shards in a storage root (JPEG decode, T5, VQ, Parquet
write, upload, manifest). Reference: the bare forwards (T5 on the captions + VQ encode on
pre-decoded pixel batches) that the pipeline cannot avoid. Ratio = pipeline / bare
(goal >= 0.85: decode and I/O must hide behind the models).

    python bench/encode.py            # tiny random-init encoders, 4 shards x 64 rows, CPU
    python bench/encode.py --tiny     # seconds (smoke test)
    python bench/encode.py --gpu      # + real-size VQGAN f16 images/s and T5-base captions/s (random init)
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import torch
import yaml
from PIL import Image

from muse.config import load_config
from muse.encode import run_encode
from muse.encode.shards import Encoders
from muse.storage import Storage
from muse.testing.image_shards import write_image_shard
from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides


def write_shards(storage: Storage, shards: int, rows: int) -> None:
    for sid in range(shards):
        write_image_shard(storage, sid, [f"a photo of object {sid} number {i} on a table" for i in range(rows)])


def bare_forward(enc: Encoders, storage: Storage, shards: int, batch: int) -> tuple[float, int]:
    """Models only: pixels decoded and captions read beforehand."""
    import pyarrow.parquet as pq

    work = []
    for sid in range(shards):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f"images/{sid:05d}.parquet")))
        caps = t.column("caption").to_pylist()
        pix = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in t.column("image").to_pylist()])
        work += [(caps[i:i + batch], pix[i:i + batch]) for i in range(0, len(caps), batch)]
    n = sum(len(c) for c, _ in work)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    for caps, pix in work:
        enc.text.encode(caps)
        enc.vq.encode(pix)
    sync()
    return time.perf_counter() - t0, n


def real_size_gpu(batch: int) -> None:
    from diffusers import VQModel
    from transformers import T5Config, T5EncoderModel

    from muse.encode.image import VQGAN_F16_CONFIG, VQTokenizer
    from muse.encode.text import T5_BASE_CONFIG

    dev = torch.device("cuda")
    # the encoder's own path (VQTokenizer.encode): exact fp32, TF32 off, as `muse encode` runs it
    # (a bare vq.encode would time cuDNN's default TF32 convolutions, which encode does not use)
    vq = VQTokenizer(VQModel(**VQGAN_F16_CONFIG, lookup_from_codebook=True), dev, 16)
    t5 = T5EncoderModel(T5Config(**T5_BASE_CONFIG)).to(dev, torch.bfloat16).eval()
    pixels = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8, device=dev)
    ids = torch.randint(0, 32128, (batch, 77), device=dev)
    with torch.inference_mode():
        for name, fn in [("VQGAN f16 256px images/s (fp32)", lambda: vq.encode(pixels)),
                         ("T5-base (bf16) captions/s", lambda: t5(input_ids=ids))]:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            print(f"{name:<36}{10 * batch / (time.perf_counter() - t):>12.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--shards", type=int)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved pipeline/bare rounds; best of each counts")
    args = ap.parse_args(argv)
    shards = args.shards or (2 if args.tiny else 4)
    rows = args.rows or (8 if args.tiny else 64)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_tiny_encoders(os.path.join(tmp, "enc"))
        cfg_path = os.path.join(tmp, "pipeline.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump({"storage": {"root": os.path.join(tmp, "root")}, "source": {"paths": ["x.parquet"]},
                            "encode": {"batch_size": args.batch}}, f)
        cfg = load_config(cfg_path, tiny_encode_overrides(paths))
        storage = Storage.from_config(cfg)
        write_shards(storage, shards, rows)
        enc = Encoders.get(cfg.encode)
        bare_forward(enc, storage, 1, args.batch)                  # warm-up
        # Interleaved rounds, best of each side: one-shot CPU timings vary by ~10%.
        t_bare, t_pipe = float("inf"), float("inf")
        for r in range(1 if args.tiny else args.rounds):
            t, n = bare_forward(enc, storage, shards, args.batch)
            t_bare = min(t_bare, t)
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.storage.root = os.path.join(tmp, f"root{r}")  # a fresh root: nothing encoded yet
            write_shards(Storage.from_config(run_cfg), shards, rows)
            t0 = time.perf_counter()
            run_encode(run_cfg)
            t_pipe = min(t_pipe, time.perf_counter() - t0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# encode bench: {shards} shards x {rows} rows, batch {args.batch}, tiny encoders, {dev}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'what':<36}{'samples/s':>12}")
    print(f"{'pipeline (decode+models+write)':<36}{n / t_pipe:>12.1f}")
    print(f"{'bare model forward':<36}{n / t_bare:>12.1f}")
    if args.gpu and torch.cuda.is_available():
        real_size_gpu(args.batch)
    print(f"ratio (pipeline / bare forward; goal >= 0.85): {t_bare / t_pipe:.3f}")


if __name__ == "__main__":
    main()
