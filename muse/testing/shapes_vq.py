"""A VQ tokenizer that really reconstructs the shapes world, trained here in a minute or two.

It is a diffusers `VQModel` (the class and the loading path of the real open-muse VQGAN),
f4 so that 64 px pictures become the base model's 16x16 grid, trained with a
reconstruction + commitment loss. Two tricks make a short CPU run enough: the codebook
starts from encoder outputs, and codes nobody used for a while are restarted on encoder
outputs far from every code (otherwise most of the codebook dies, edges blur and two colours
share a code). Its stats include the shapes scorer on its reconstructions: the ceiling of
any transformer that samples its tokens. The result is
saved with `save_pretrained` and cached per machine under a key of everything that
shapes it, so the demo trains it once.

The training is bit-identical on any machine with the same package versions: it runs on
`VQRecipe.threads` torch threads whatever the core count (1 and 2 threads give other weights,
and other demo tables), with deterministic algorithms and every draw from seeded generators.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muse.encode.image import decode_latents

CACHE_VERSION = 3  # bump when the training code changes what comes out


@dataclass(frozen=True)
class VQRecipe:
    block_out_channels: tuple = (16, 32, 32)   # 3 levels: f4
    latent_channels: int = 4
    codebook_size: int = 64
    images: int = 1200
    steps: int = 600
    crop: int = 32                 # train on random crops: the model is convolutional, crops are 4x cheaper
    decoder_steps: int = 300       # then the decoder alone on whole pictures: borders, and colours (100: 89%)
    batch_size: int = 32
    lr: float = 2e-3
    restart_every: int = 25
    world_seed: int = 1234
    seed: int = 0
    # torch intra-op threads of the training: the weights depend on the count, so it is fixed.
    # 1: on a 2-core machine shared with other work, 2 threads spin-wait on each other (the quick
    # VQ took 630 s at 2 threads, 74 s at 1, bench/RESULTS.md "reproducible demo"). The demo's
    # trainer now runs 2 with OMP_WAIT_POLICY=PASSIVE, which removes that ("demo threads"); 2 here,
    # with PASSIVE and the spin count, still took 2.2x the time of 1 beside other work (60 + 30 steps:
    # 69 s vs 31 s, load 5-6; bench/RESULTS.md "demo budget and seeds"), and other weights: kept at 1
    threads: int = 1
    # the module of muse.testing whose make_world / adherence it trains on and is judged by: "shapes"
    # (the demo) or "shapes2" (the compose world, two smaller objects: the demo's VQ blurs them)
    world: str = "shapes"

    def key(self) -> str:
        mod = world_module(self.world)
        recipe = asdict(self)
        if self.world == "shapes":   # not in the demo's key: its cached VQ stays where it was
            recipe.pop("world")
        world = {k.lower(): getattr(mod, k) for k in WORLD_SETTINGS if hasattr(mod, k)}  # what it trains on
        text = json.dumps({**recipe, "world": world, "v": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# the worlds' module constants that shape their pictures, in the cache key
WORLD_SETTINGS = ("WIDTH", "JITTER", "CENTRE", "ACROSS")


def world_module(name: str):
    import importlib

    if name not in ("shapes", "shapes2"):
        raise ValueError(f"VQRecipe.world: {name!r} is not a world of muse.testing (shapes, shapes2)")
    return importlib.import_module(f"muse.testing.{name}")


def build_vq(r: VQRecipe):
    from diffusers import VQModel

    n = len(r.block_out_channels)
    return VQModel(block_out_channels=r.block_out_channels, layers_per_block=1, latent_channels=r.latent_channels,
                   vq_embed_dim=r.latent_channels, num_vq_embeddings=r.codebook_size, norm_num_groups=8,
                   mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * n,
                   up_block_types=("UpDecoderBlock2D",) * n, lookup_from_codebook=True, sample_size=64)


def _forward(vq, x):
    h = vq.encode(x).latents                                    # (B, C, 16, 16)
    zq, qloss, (_, _, idx) = vq.quantize(h)
    return decode_latents(vq, zq), qloss, h, idx


def _restart_dead(vq, h: torch.Tensor, used: torch.Tensor, gen: torch.Generator) -> int:
    """Put every unused code on an encoder output of this batch, drawn with probability ~ its squared
    distance to the nearest code (k-means++ seeding). Uniform draws land mostly on the background
    (3/4 of the pixels) and left green and blue sharing one teal code (bench/RESULTS.md)."""
    dead = (~used).nonzero().flatten()
    if len(dead):
        flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        err = torch.cdist(flat, vq.quantize.embedding.weight.data).min(dim=1).values.square()
        pick = torch.multinomial(err + 1e-12, len(dead), replacement=len(dead) > len(flat), generator=gen)
        vq.quantize.embedding.weight.data[dead] = flat[pick]
    return len(dead)


@contextmanager
def reproducible(threads: int):
    """`threads` torch threads and deterministic algorithms inside; the caller's settings after."""
    was_threads, was_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(was_threads)


def train_vq(r: VQRecipe, log=print) -> tuple[object, dict]:
    """-> (trained VQModel in eval mode, stats {psnr, codes_used, recon_colour, recon_shape, steps, seconds});
    the same weights on every machine (`reproducible`)."""
    with reproducible(r.threads):
        return _train_vq(r, log)


def _train_vq(r: VQRecipe, log) -> tuple[object, dict]:
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    world = world_module(r.world).make_world(r.images, seed=r.world_seed)
    data = torch.from_numpy(np.stack([img for img, _ in world]))
    data = data.permute(0, 3, 1, 2).float().div_(255)          # open-muse VQ input: RGB in [0, 1]
    vq = build_vq(r)
    opt = torch.optim.Adam(vq.parameters(), lr=r.lr)
    used = torch.zeros(r.codebook_size, dtype=torch.bool)
    t0 = time.time()
    for step in range(r.steps):
        x = _crops(data[torch.randint(0, len(data), (r.batch_size,), generator=gen)], r.crop, gen)
        if step == 0:
            with torch.no_grad():
                _restart_dead(vq, vq.encode(x).latents, used, gen)    # the codebook starts on the data
        xr, qloss, h, idx = _forward(vq, x)
        loss = F.mse_loss(xr, x) + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:                               # cosine decay to 10%
            g["lr"] = r.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step + 1) / r.steps)))
        used[idx.flatten()] = True
        if (step + 1) % r.restart_every == 0 and step + 1 < r.steps * 0.8:
            _restart_dead(vq, h, used, gen)
            used[:] = False
        if (step + 1) % 100 == 0:
            log(f"shapes VQ: step {step + 1}/{r.steps} mse {F.mse_loss(xr, x).item():.5f} "
                f"({time.time() - t0:.0f} s)")
    _tune_decoder(vq, data, r, gen, log)
    vq.eval()
    stats = evaluate_vq(vq, data[:256], [caption for _, caption in world[:256]], world=r.world)
    return vq, {**stats, "steps": r.steps, "seconds": round(time.time() - t0, 1)}


def _crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size crop per picture, on the token grid (multiples of 4 px)."""
    if size >= x.shape[-1]:
        return x
    n = (x.shape[-1] - size) // 4 + 1
    oy, ox = (torch.randint(0, n, (2,), generator=gen) * 4).tolist()
    return x[..., oy:oy + size, ox:ox + size]


def _tune_decoder(vq, data: torch.Tensor, r: VQRecipe, gen: torch.Generator, log) -> None:
    """Whole pictures through the frozen encoder + codebook: the tokens stay as they are."""
    params = list(vq.post_quant_conv.parameters()) + list(vq.decoder.parameters())
    opt = torch.optim.Adam(params, lr=r.lr * 0.25)
    for step in range(r.decoder_steps):
        x = data[torch.randint(0, len(data), (r.batch_size // 2,), generator=gen)]
        with torch.no_grad():
            zq = vq.quantize(vq.encode(x).latents)[0]
        loss = F.mse_loss(decode_latents(vq, zq), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log(f"shapes VQ: decoder tuned on whole pictures, mse {loss.item():.5f}")


@torch.no_grad()
def evaluate_vq(vq, x: torch.Tensor, captions: list[str] | None = None, world: str = "shapes") -> dict:
    """PSNR, codes used and, given the pictures' captions, the world's scorer on the reconstructions:
    the most a transformer sampling this VQ's tokens can score (PSNR hides a green that decodes teal).
    shapes: recon_colour / recon_shape; shapes2: recon_all (both objects and the relation right)."""
    xr, _, _, idx = _forward(vq, x)
    mse = F.mse_loss(xr.clamp(0, 1), x).item()
    out = {"psnr": round(10 * np.log10(1 / max(mse, 1e-12)), 2),
           "codes_used": int(idx.unique().numel()), "codebook_size": int(vq.config.num_vq_embeddings)}
    if captions is not None:
        pictures = (xr.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        score = world_module(world).adherence(pictures, captions)["all"]
        if world == "shapes":
            out.update(recon_colour=round(score["colour"], 3), recon_shape=round(score["shape"], 3))
        else:
            out.update(recon_all=round(score["all"], 3))
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MUSE_CACHE", Path.home() / ".cache" / "muse-pipeline"))


def shapes_vq(r: VQRecipe = VQRecipe(), log=print) -> tuple[str, dict]:
    """The trained VQ's folder (trained now or taken from the cache) and its stats."""
    out = cache_dir() / "shapes-vq" / r.key()
    if (out / "stats.json").exists():
        return str(out), json.loads((out / "stats.json").read_text())
    log(f"shapes VQ: training {r} (once per machine; cached in {out})")
    vq, stats = train_vq(r, log)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vq.save_pretrained(str(tmp))
    (tmp / "stats.json").write_text(json.dumps({**stats, "recipe": asdict(r)}, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    recon = ", ".join(f"{k[6:]} {v:.0%}" for k, v in stats.items() if k.startswith("recon_"))
    log(f"shapes VQ: PSNR {stats['psnr']} dB, {stats['codes_used']}/{stats['codebook_size']} codes used, "
        f"scorer on its reconstructions {recon}, {stats['seconds']} s")
    return str(out), json.loads((out / "stats.json").read_text())
