"""Text -> image by MaskGIT-style parallel decoding, outside the models.

`generate` starts from a fully masked grid; each step samples every masked position,
keeps the most confident samples and re-masks the rest so that the masked fraction
follows the cosine schedule (24 steps for the base model, 8 for super-resolution, as in
the paper). Confidence = log p(sampled token) + Gumbel noise whose temperature anneals
linearly to zero; the least confident are re-masked by rank, ties broken at random (at
temperature 0 a model equally sure everywhere still follows the schedule). Only masked
positions are sampled and scored, so no (batch, tokens, vocab) tensor is made besides the
model's logits. Classifier-free guidance runs the conditional and unconditional
inputs in ONE batched forward. The conditioning memory never changes while decoding, so its
cross-attention keys/values (and the super-res low-res encoder) run once per call. Every random draw comes from the given generator, so a
seed reproduces an image exactly.

`generate_images` is the one path from caption embeddings to pictures (base -> optional super-res
-> VQ decode, in batches), for `muse sample` (`sample_images`: T5 first) and `muse eval` (stored
embeddings). `run_sample(cfg)` is `muse sample`: prompts -> pictures -> PNG.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from muse.config import GuidanceSchedule, resolve_device
from muse.masking import pad_embeddings, pad_to


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))  # -log(u) > 0 for u in (0, 1)


def _conditioning(hidden, attn_mask, uncond_hidden, uncond_mask, low_res_ids, guided: bool) -> tuple:
    """The model's conditioning inputs (hidden, mask, low_res_ids), the same at every step: with
    guidance the conditional and unconditional ones stacked (2B), for ONE batched forward."""
    if not guided:
        return hidden, attn_mask, low_res_ids
    B = hidden.shape[0]
    L = max(hidden.shape[1], uncond_hidden.shape[1])
    h = torch.cat([pad_to(hidden, L, 1), pad_to(uncond_hidden.expand(B, -1, -1), L, 1)])
    m = torch.cat([pad_to(attn_mask.bool(), L, 1), pad_to(uncond_mask.bool().expand(B, -1), L, 1)])
    low = None if low_res_ids is None else torch.cat([low_res_ids, low_res_ids])
    return h, m, low


def guidance_at(step: int, steps: int, scale: float, schedule: str = "constant") -> float:
    """The guidance scale of decoding step `step` (0-based) of `steps`. "linear" rises from 1 (no
    guidance) at the first step to `scale` at the last: the first steps decide the layout from
    the model's own distribution, where a full scale at once broke small models' rarer shapes
    into fragments (measured: bench/RESULTS.md, "2026-12-02 11:20-12:45Z, "it learns": why stars
    fail, a guidance schedule")."""
    if schedule not in get_args(GuidanceSchedule):
        raise ValueError(f"guidance_schedule must be one of {get_args(GuidanceSchedule)}, got {schedule!r}")
    if schedule == "constant" or steps <= 1:
        return scale
    return 1.0 + (scale - 1.0) * step / (steps - 1)


def _guided_logits(model, ids, cond: tuple, cache, guidance_scale, masked) -> torch.Tensor:
    """fp32 logits (M, V) at the M masked positions only: decided tokens are never resampled, so
    their rows would be memory for nothing. The guided mix runs in place on the model's output,
    which nothing else holds, so no second (B, N, V) tensor is made. `cache`: the model's
    memory_cache of `cond` (None: the model computes it from `cond`)."""
    guided = cond[0].shape[0] != ids.shape[0]
    x = torch.cat([ids, ids]) if guided else ids
    out = model(x, memory_cache=cache) if cache is not None else model(x, *cond)
    if not guided:
        return out[masked].float()
    cond_logits, uncond = out.float().chunk(2)
    return cond_logits.sub_(uncond).mul_(guidance_scale).add_(uncond)[masked]  # uncond + s (cond - uncond)


def _sample_rows(logits: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One categorical sample per row of logits (M, V) -> (ids (M,), log p(id) (M,)), by inverse
    CDF: one uniform draw per row, where Gumbel-max (and torch.multinomial, which uses it inside)
    draws an (M, V) noise tensor. The CDF is the one extra (M, V) tensor."""
    lse = logits.logsumexp(-1, keepdim=True)                                   # (M, 1)
    cdf = (logits - lse).exp_().cumsum_(-1)                                    # (M, V)
    u = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device) * cdf[:, -1:]
    # right=True: the first token whose CDF exceeds u, never one of zero probability
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[1] - 1)   # (M, 1)
    return ids.squeeze(1), (logits.gather(1, ids) - lse).squeeze(1)


def _remask_by_rank(conf: torch.Tensor, n_mask: torch.Tensor, generator) -> torch.Tensor:
    """True at the n_mask (B, 1) least confident positions of conf (B, N), ties broken at random:
    a threshold (conf <= cutoff) would re-mask every token tied with the cutoff."""
    B, N = conf.shape
    shuffle = torch.rand((B, N), generator=generator, device=conf.device).argsort(1)
    order = shuffle.gather(1, conf.gather(1, shuffle).argsort(dim=1, stable=True))  # positions, least sure first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=conf.device).expand(B, N))
    return rank < n_mask


@torch.inference_mode()
def generate(model, hidden: torch.Tensor, attn_mask: torch.Tensor, uncond_hidden: torch.Tensor | None = None,
             uncond_mask: torch.Tensor | None = None, steps: int = 24, guidance_scale: float = 4.0,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             low_res_ids: torch.Tensor | None = None, cache_memory: bool = True,
             guidance_schedule: str = "constant", dtype: torch.dtype | None = None) -> torch.Tensor:
    """-> token ids (B, grid*grid). hidden (B, L, D), attn_mask (B, L) bool; uncond_* (1, Lu, D), (1, Lu).

    `cache_memory`: the memory (projected text, the super-res model's low-res encoder) and its
    cross-attention keys/values are computed once, not at every step (a model without
    `memory_cache`, e.g. bench/model.py's reference, recomputes them).
    `dtype`: the models run under autocast to it (`decode_dtype`); None: as they are (fp32). The
    logits are upcast to fp32 before guidance and sampling either way."""
    c = model.config
    B, N, device = hidden.shape[0], c.grid_size * c.grid_size, hidden.device
    ids = torch.full((B, N), c.mask_token_id, dtype=torch.long, device=device)
    guided = uncond_hidden is not None and guidance_scale != 1.0
    if guided:
        uncond_hidden = uncond_hidden.reshape(1, -1, hidden.shape[-1]).to(hidden.dtype)
        uncond_mask = uncond_mask.reshape(1, -1)
    cond = _conditioning(hidden, attn_mask, uncond_hidden, uncond_mask, low_res_ids, guided)

    def amp():  # the models' forward only: sampling and re-masking stay fp32
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    with amp():
        cache = model.memory_cache(*cond) if cache_memory and hasattr(model, "memory_cache") else None
    for step in range(steps):
        masked = ids == c.mask_token_id                                            # (B, N)
        scale = guidance_at(step, steps, guidance_scale, guidance_schedule)
        with amp():
            logits = _guided_logits(model, ids, cond, cache, scale, masked)        # (M, V) fp32
        sampled, logp = _sample_rows(logits, generator)                           # (M,), (M,)
        del logits                                                                 # before the next forward
        ratio = (step + 1) / steps
        n_mask_next = math.floor(N * math.cos(math.pi / 2 * ratio))               # cosine schedule
        ids = ids.masked_scatter(masked, sampled)
        if n_mask_next == 0:
            break
        noise = temperature * (1.0 - ratio) * _gumbel(logp.shape, generator, device)
        conf = torch.full((B, N), float("inf"), device=device)                    # decided tokens stay
        conf[masked] = logp + noise
        # never re-mask more than were masked minus one: each step decides at least one token
        n_mask_next = torch.clamp(masked.sum(1, keepdim=True) - 1, max=n_mask_next).clamp(min=0)
        ids = ids.masked_fill(_remask_by_rank(conf, n_mask_next, generator), c.mask_token_id)
    return ids


def decode_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`sample.precision` / `eval.precision` on `device` -> the autocast dtype of `generate` (None:
    fp32). auto: bf16 on GPUs with native bf16 (`muse.gpus.amp_dtype`), fp32 elsewhere (the CPU,
    and T4/V100, where fp16 logits could overflow)."""
    from muse.gpus import amp_dtype

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if amp_dtype(device, True) == torch.bfloat16 else None


# ----------------------------------------------------------------------------- muse sample

def load_checkpoint_model(storage, ref: str | None, run_name: str, use_ema: bool = False):
    """A model from a local folder, a path/URL under the storage root, or the run's latest checkpoint;
    with `use_ema`, its EMA weights (model_ema.safetensors) when it has them."""
    from safetensors.torch import load_file

    from muse import checkpoint
    from muse.models import load_pretrained

    if ref and Path(ref).is_dir() and (Path(ref) / "config.json").exists():
        model = load_pretrained(ref)
        if use_ema and (Path(ref) / checkpoint.EMA_FILE).exists():
            model.load_state_dict(load_file(str(Path(ref) / checkpoint.EMA_FILE)))
        return model
    rel = storage.relative(ref) if ref else checkpoint.latest(storage, run_name)
    if rel is None:
        raise FileNotFoundError(f"no checkpoint: {ref or 'latest of run ' + repr(run_name)} "
                                f"(train first, or pass --checkpoint DIR)")
    return checkpoint.load_model(storage, rel, ema=use_ema and checkpoint.has_ema(storage, rel))


def png_bytes(img: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes; `text` becomes iTXt chunks (`Image.open(f).text` reads them back)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(k, v)  # iTXt: UTF-8, prompts are not Latin-1
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _caption_lines(draw, font, text: str, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line ends in "..." when text is left over."""
    lines, words = [], text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        if draw.textlength(line, font=font) > width:  # one word wider than the cell: break it
            cut = len(line) - 1
            while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                cut -= 1
            words.insert(0, line[cut:])
            line = line[:cut]
        lines.append(line)
    if words:
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def make_grid(images: np.ndarray, captions: list[str] | None = None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one image, ceil(sqrt(B)) columns; with `captions`, each cell has a
    white strip under it with its caption (wrapped, at most 3 lines)."""
    B, H, W, _ = images.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    strip = 0
    if captions is not None:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        wrapped = [_caption_lines(draw, font, c, W - 4) for c in captions]
        _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
        line_h = bottom - top + 2
        strip = max(len(w) for w in wrapped) * line_h + 4
    cell_h = H + strip
    grid = np.zeros((rows * cell_h, cols * W, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * cell_h:r * cell_h + H, c * W:(c + 1) * W] = img
    if captions is not None:
        canvas = Image.fromarray(grid)
        draw = ImageDraw.Draw(canvas)
        for i, lines in enumerate(wrapped):
            r, c = divmod(i, cols)
            draw.rectangle([c * W, r * cell_h + H, (c + 1) * W - 1, (r + 1) * cell_h - 1], fill="white")
            for j, line in enumerate(lines):
                draw.text((c * W + 2, r * cell_h + H + 2 + j * line_h - top), line, fill="black", font=font)
        grid = np.asarray(canvas)
    return grid


def _write(storage, out: str, data: bytes) -> str:
    rel = storage.relative(out)
    if rel is not None:
        storage.write_bytes(rel, data)
        return storage.url(rel)
    if "://" in out:
        raise ValueError(f"sample.out {out!r} is outside the storage root {storage.url('')}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(data)
    return out


def read_prompts(cfg) -> list[str]:
    """The prompts `muse sample` draws: `sample.prompts_file` (one a line) when set, else `sample.prompts`."""
    s = cfg.sample
    if s.prompts_file:
        lines = [ln.strip() for ln in Path(s.prompts_file).read_text().splitlines()]
        prompts = [ln for ln in lines if ln]
        if not prompts:
            raise ValueError(f"sample.prompts_file {s.prompts_file}: no prompts in it")
        return prompts
    return list(s.prompts)


def _parameters(cfg, storage, n_prompts: int) -> dict:
    """The generation settings stored in every PNG's `parameters` chunk. The images of one run
    share one generator, so an image is reproduced by the same seed AND the same prompt list
    (and batch_size, recorded when the prompts filled more than one batch)."""
    from muse import checkpoint

    s = cfg.sample
    ref = s.checkpoint
    if ref is None:  # what load_checkpoint_model used: the run's latest
        latest = checkpoint.latest(storage, cfg.train.run_name)
        ref = storage.url(latest) if latest else None
    out = {"checkpoint": ref, "steps": s.steps, "guidance_scale": s.guidance_scale,
           "guidance_schedule": s.guidance_schedule, "temperature": s.temperature, "seed": s.seed,
           "use_ema": s.use_ema}
    if s.superres_checkpoint:
        out.update(superres_checkpoint=s.superres_checkpoint, superres_steps=s.superres_steps)
    if n_prompts > s.batch_size:
        out.update(batch_size=s.batch_size)
    return out


def load_decoder(encode_cfg, device, superres: bool = False):
    """The VQ decoder of the encode section: VQGAN f16 (base) or PaellaVQ f8 (superres)."""
    from muse.encode.image import paella_from_ref, vq_from_ref

    if superres:
        return paella_from_ref(encode_cfg.superres_vq_ref, str(device))
    return vq_from_ref(encode_cfg.vq_ref, str(device))


def decode_ids(vq, ids: torch.Tensor, grid: int) -> np.ndarray:
    """ids (B, grid*grid) -> uint8 images (B, H, W, 3)."""
    return np.asarray(vq.decode(ids.view(-1, grid, grid).cpu()), dtype=np.uint8)


@dataclass
class SamplingModels:
    """Everything `generate_images` runs, loaded once (the demo samples at two guidance scales)."""
    text: object | None              # muse.encode.text.TextEncoder (None: the caller has the embeddings)
    base: torch.nn.Module
    superres: torch.nn.Module | None
    decoder: object                  # the VQTokenizer that decodes the last model's ids


def load_models(cfg, storage) -> SamplingModels:
    """T5, the base (and super-res) checkpoints and the VQ decoder that `cfg.sample` names."""
    from muse.encode.text import TextEncoder

    s, encode_cfg = cfg.sample, cfg.encode
    device = resolve_device(s.device)
    # the checkpoints first: a missing one is named before T5 spends time (or the hub) loading
    base = load_checkpoint_model(storage, s.checkpoint, cfg.train.run_name, s.use_ema).to(device).eval()
    sr = None
    if s.superres_checkpoint:
        sr = load_checkpoint_model(storage, s.superres_checkpoint, cfg.train.run_name, s.use_ema).to(device).eval()
    text = TextEncoder.from_ref(encode_cfg.text_ref, max_length=encode_cfg.text_max_length,
                                dtype=encode_cfg.text_dtype, device=str(device))
    return SamplingModels(text, base, sr, load_decoder(encode_cfg, device, superres=sr is not None))


def generate_images(models: SamplingModels, embeddings: list, empty, decode, device, batch_size: int,
                    guidance_scale: float | None = None, superres_steps: int = 8) -> np.ndarray:
    """Caption embeddings (one T5 [L_i, D] each; `empty`: the empty caption's, for guidance) -> uint8
    images (B, H, W, 3): base -> optional super-res -> VQ decode, `batch_size` captions at a time
    (what bounds the memory), one generator seeded by `decode.seed` running through the batches.
    `decode`: the DecodeConfig (cfg.sample or cfg.eval); `guidance_scale` overrides its scale."""
    m, d = models, decode
    scale = d.guidance_scale if guidance_scale is None else guidance_scale
    uncond, uncond_mask = pad_embeddings([empty], device=device)
    gen = torch.Generator(device=device).manual_seed(d.seed)
    last = m.base if m.superres is None else m.superres
    dtype = decode_dtype(d.precision, torch.device(device))
    out = []
    for i in range(0, len(embeddings), batch_size):
        hidden, mask = pad_embeddings(embeddings[i:i + batch_size], device=device)
        ids = generate(m.base, hidden, mask, uncond, uncond_mask, steps=d.steps, guidance_scale=scale,
                       temperature=d.temperature, generator=gen, guidance_schedule=d.guidance_schedule,
                       dtype=dtype)
        if m.superres is not None:
            ids = generate(m.superres, hidden, mask, uncond, uncond_mask, steps=superres_steps,
                           guidance_scale=scale, temperature=d.temperature, generator=gen, low_res_ids=ids,
                           guidance_schedule=d.guidance_schedule, dtype=dtype)
        out.append(decode_ids(m.decoder, ids, last.config.grid_size))
    return np.concatenate(out)


def sample_images(cfg, prompts: list[str], storage, guidance_scale: float | None = None,
                  models: SamplingModels | None = None) -> np.ndarray:
    """`muse sample`'s pictures: T5 -> `generate_images` with `cfg.sample`, uint8 (B, H, W, 3), one per
    prompt. `models` from `load_models(cfg, storage)` to reuse them across calls; loaded here otherwise."""
    s = cfg.sample
    m = models or load_models(cfg, storage)
    embeddings = []
    for i in range(0, len(prompts), s.batch_size):  # T5 too sees batch_size prompts at a time
        embeddings += m.text.encode(prompts[i:i + s.batch_size])
    empty = m.text.encode([""])[0]
    return generate_images(m, embeddings, empty, s, resolve_device(s.device), s.batch_size,
                           guidance_scale=guidance_scale, superres_steps=s.superres_steps)


def run_sample(cfg) -> list[str]:
    """`muse sample`: writes one PNG per prompt (+ a grid for several); returns their paths."""
    from muse.storage import Storage

    s = cfg.sample
    storage = Storage.from_config(cfg)
    prompts = read_prompts(cfg)
    images = sample_images(cfg, prompts, storage)
    params = json.dumps(_parameters(cfg, storage, len(prompts)))
    meta = [{"prompt": p, "parameters": params} for p in prompts]  # PNG text chunks
    out = s.out
    stem, suffix = (out[:-4], ".png") if out.lower().endswith(".png") else (out, ".png")
    written = []
    if len(prompts) == 1:
        written.append(_write(storage, stem + suffix, png_bytes(images[0], meta[0])))
    else:
        for i, img in enumerate(images):
            written.append(_write(storage, f"{stem}-{i:03d}{suffix}", png_bytes(img, meta[i])))
        grid = png_bytes(make_grid(images, captions=prompts), {"prompt": "\n".join(prompts), "parameters": params})
        written.append(_write(storage, f"{stem}-grid{suffix}", grid))
    for p in written:
        print(f"wrote {p}")
    return written
