"""How often the VQ's ids under faster precisions agree with exact fp32 (issue 25, slowdown 2).

    python bench/vq_precision.py                 # tiny VQ + real-size random VQGAN f16, on the GPU if any
    python bench/vq_precision.py --images 4 --device cpu

`muse encode` runs the VQ in exact fp32 (`muse.encode.image.exact_fp32`: TF32 off, matmul
precision "highest"): ids are data, an id near a codebook tie must not move with the GPU. This
prints, per model, the share of ids that bf16 autocast (the encoder in bf16, the nearest-code
search in fp32) and TF32 (CUDA only: on the CPU the flags change nothing, so it is not
measured there) give unchanged, and the time of each. Pictures with structure, not noise: the
demo's shapes at 256 px and smooth colour fields (8x8 random colours, bilinear to 256 px).
Weights are random (no hub here): VQGAN f16 at the published config (`VQGAN_F16_CONFIG`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def pictures(n: int, size: int = 256) -> np.ndarray:
    from muse.testing.image_shards import picture
    from muse.testing.shapes import COLOURS, SHAPES, random_scene, render

    rng = np.random.default_rng(0)
    shapes = [render(random_scene(list(COLOURS)[i % 6], SHAPES[i % 4], rng, size), size) for i in range((n + 1) // 2)]
    smooth = [np.asarray(picture(100 + i, size).convert("RGB")) for i in range(n // 2)]
    return np.stack(shapes + smooth)


def models(tmp: str) -> dict:
    from diffusers import VQModel

    from muse.encode.image import VQGAN_F16_CONFIG
    from muse.testing.tiny import build_tiny_vq

    torch.manual_seed(0)
    vq = VQModel(**VQGAN_F16_CONFIG, lookup_from_codebook=True, sample_size=256).eval()
    tiny = VQModel.from_pretrained(build_tiny_vq(f"{tmp}/tiny")).eval()
    return {"tiny VQ (f16, 64 codes)": tiny, "VQGAN f16 8192, random init": vq}


def ids_at(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    """ids (B, h, w) of pixels x (B, 3, H, W) in [0, 1] under `mode`: fp32 (exact), bf16, tf32."""
    from muse.encode.image import exact_fp32

    with torch.inference_mode():
        if mode == "fp32":
            with exact_fp32():
                latents = model.encode(x).latents
                _, _, (_, _, idx) = model.quantize(latents)
        elif mode == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                latents = model.encode(x).latents
            with exact_fp32():  # the nearest-code search in fp32
                _, _, (_, _, idx) = model.quantize(latents.float())
        else:
            saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                latents = model.encode(x).latents
                _, _, (_, _, idx) = model.quantize(latents)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return idx.reshape(latents.shape[0], *latents.shape[2:]).cpu()


def timed(fn, device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main(argv=None) -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    pix = pictures(args.images)
    x = torch.as_tensor(pix).permute(0, 3, 1, 2).float().div(255.0).to(dev)
    modes = ["bf16", "tf32"] if dev.type == "cuda" else ["bf16"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# VQ id agreement with exact fp32: {len(pix)} pictures at 256 px (shapes + smooth fields), {name}, "
          f"torch {torch.__version__}")
    print(f"{'model':<30}{'mode':<6}{'ids agree':>11}{'distinct ids':>14}{'s/batch':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models(tmp).items():
            model = model.to(dev)
            exact, t = timed(lambda: ids_at(model, x, "fp32"), dev)
            print(f"{label:<30}{'fp32':<6}{'(ref)':>11}{len(exact.unique()):>14}{t:>9.2f}")
            for mode in modes:
                got, t = timed(lambda: ids_at(model, x, mode), dev)
                agree = (got == exact).float().mean().item()
                print(f"{label:<30}{mode:<6}{100 * agree:>10.2f}%{len(got.unique()):>14}{t:>9.2f}")
    if dev.type != "cuda":
        print("tf32: not measured (CUDA only; on the CPU the TF32 flags change nothing)")


if __name__ == "__main__":
    main()
