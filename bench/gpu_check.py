"""One table that proves a GPU machine (issue 25): encode, train, super-res train, generation.

Every model at its published size with random weights (no hub access needed): T5-base and the
open-muse VQGAN f16 for encode; the base preset (~632M) for a bf16 training step with and
without `torch.compile` (samples/s, MFU from `muse.gpus`, peak memory); the super-res preset at
the micro-batch `muse.memory.plan_batch` picks for this GPU's free memory, with activation
checkpointing; 12-step guided generation at 256 px, batch 1 and 8, VQ decode included (aMUSEd
publishes 508 ms and 756 ms on an A100 in fp16; the goal is below both).

    bash bench/gpu_check.sh            # CUDA, real sizes, <= ~8 minutes on an H100/A100
    bash bench/gpu_check.sh --tiny     # CPU, tiny sizes, seconds: the suite runs this (no timing asserts)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from muse.config import ModelConfig
from muse.gpus import amp_dtype, mfu_text, peak_flops
from muse.masking import mask_tokens, masked_loss
from muse.memory import GiB, plan_batch
from muse.models import build_model, model_config
from muse.sample import generate

AMUSED_A100_MS = {1: 508, 8: 756}  # 12 steps, 256 px, fp16 (aMUSEd's model card)


class Bench:
    """Device, precision and the timing/memory helpers every row shares."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.device = torch.device("cpu" if tiny else "cuda")
        self.dtype = amp_dtype(self.device, mixed_precision=True)
        self.name = "cpu" if tiny else torch.cuda.get_device_name()
        self.peak = None if tiny else peak_flops(self.name)
        self.rows: list[tuple[str, str, str, str]] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, warmup: int = 2, repeats: int = 5) -> float:
        """Best seconds of `repeats` calls after `warmup` (compile and autotune land there)."""
        for _ in range(warmup):
            fn()
        self.sync()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> str:
        return f"{torch.cuda.max_memory_allocated() / GiB:.1f}" if self.device.type == "cuda" else "-"

    def add(self, what: str, rate: str, extra: str) -> None:
        self.rows.append((what, rate, self.peak_gib(), extra))
        print(f"{what:<44}{rate:>16}{self.rows[-1][2]:>10}  {extra}", flush=True)


def model_cfg(b: Bench, kind: str) -> ModelConfig:
    if b.tiny:
        return ModelConfig(kind=kind, preset="tiny", codebook_size=64, text_dim=16)
    return ModelConfig(kind=kind, preset="base" if kind == "base" else "small")


def vq_model(b: Bench):
    """The open-muse VQGAN f16 at its published config (random init); a tiny one on CPU: the same
    VQ bench/model.py times (its `vq_decoder`; bench/ is on sys.path when this runs as a script)."""
    from model import vq_decoder

    torch.manual_seed(0)
    return vq_decoder(b.device, real=not b.tiny)


def t5_model(b: Bench):
    """T5 v1.1 base's encoder (random init) in fp32, `encode.text_dtype`'s default; tiny on CPU."""
    from transformers import T5Config, T5EncoderModel

    from muse.encode.text import T5_BASE_CONFIG

    size = dict(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4) if b.tiny else {}
    torch.manual_seed(0)
    cfg = T5Config(**{**T5_BASE_CONFIG, **size})
    return T5EncoderModel(cfg).to(b.device).eval()


def conditioning(b: Bench, mc: ModelConfig, batch: int):
    c = model_config(mc)
    text_len = 8 if b.tiny else 77  # padded to text_max_length: one shape, no recompiles
    g = torch.Generator(b.device).manual_seed(0)
    ids = torch.randint(0, c.codebook_size, (batch, c.grid_size ** 2), device=b.device, generator=g)
    hidden = torch.randn(batch, text_len, c.text_dim, device=b.device, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=b.device)
    low = (torch.randint(0, c.codebook_size, (batch, 256), device=b.device, generator=g)
           if mc.kind == "superres" else None)
    return ids, hidden, mask, low


def encode_rows(b: Bench, batch: int) -> None:
    """T5 on 77 tokens + the VQ on 256 px pictures, as `muse encode` runs them (VQ in exact fp32),
    and how often the VQ's ids under bf16 autocast agree with fp32 (whether fp32 is worth it)."""
    t5, vq = t5_model(b), vq_model(b)
    tokens = torch.randint(0, 32128, (batch, 77), device=b.device)
    pixels = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8)
    b.reset_peak()
    with torch.inference_mode():
        t_text = b.time(lambda: t5(input_ids=tokens), repeats=2 if b.tiny else 5)
    t_vq = b.time(lambda: vq.encode(pixels), repeats=2 if b.tiny else 5)
    b.add(f"encode T5 + VQGAN f16 fp32 b{batch}", f"{batch / (t_text + t_vq):.1f} img/s",
          f"T5 {batch / t_text:.0f}/s, VQ {batch / t_vq:.0f}/s")
    exact = vq.encode(pixels)
    dtype = b.dtype or torch.bfloat16
    x = torch.as_tensor(pixels).to(b.device).permute(0, 3, 1, 2).float().div_(255.0)

    def fast():
        with torch.inference_mode(), torch.autocast(b.device.type, dtype=dtype):
            _, _, (_, _, idx) = vq.model.quantize(vq.model.encode(x).latents.float())
        return idx

    t_fast = b.time(fast, repeats=2 if b.tiny else 5)
    agree = (fast().reshape(exact.shape).cpu() == exact).float().mean().item()
    b.add(f"VQ encode {str(dtype).removeprefix('torch.')} autocast b{batch}", f"{batch / t_fast:.1f} img/s",
          f"ids agree with fp32: {100 * agree:.1f}%")


def train_row(b: Bench, kind: str, batch: int, compile: bool, checkpointing: bool = False) -> None:
    mc = model_cfg(b, kind)
    b.reset_peak()
    torch.manual_seed(0)
    model = build_model(mc).to(b.device).train()
    model.activation_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=b.device.type == "cuda")
    run = torch.compile(model, backend="aot_eager" if b.tiny else "inductor") if compile else model
    ids, hidden, mask, low = conditioning(b, mc, batch)
    gen = torch.Generator(b.device).manual_seed(1)

    def step():
        inp, m = mask_tokens(ids, model.config.mask_token_id, gen)
        with torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype is not None):
            logits = run(inp, hidden, mask, low)
        masked_loss(logits, ids, m, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sps = batch / b.time(step, warmup=3, repeats=2 if b.tiny else 5)
    mfu = model.num_flops_per_sample() * sps / b.peak if b.peak else None
    label = f"train {kind} {'compiled' if compile else 'eager'} b{batch}{' ckpt' if checkpointing else ''}"
    b.add(label, f"{sps:.1f} samp/s", mfu_text(mfu))


def superres_batch(b: Bench) -> tuple[int, str]:
    """The micro-batch `plan_batch` picks for the super-res preset in this GPU's free memory."""
    if b.tiny:
        return 2, "tiny: batch 2"
    free, _ = torch.cuda.mem_get_info()
    plan = plan_batch(model_cfg(b, "superres"), 512, free, checkpointing=True)
    return plan.micro_batch, plan.explain()


def generation_row(b: Bench, vq, model, batch: int) -> None:
    _, hidden, mask, _ = conditioning(b, model_cfg(b, "base"), batch)
    g = model.config.grid_size

    def run():
        with torch.inference_mode(), torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype is not None):
            ids = generate(model, hidden, mask, hidden[:1, :1], mask[:1, :1], steps=12, guidance_scale=4.0,
                           generator=torch.Generator(b.device).manual_seed(0))
        vq.decode(ids.view(batch, g, g))

    b.reset_peak()
    ms = 1000 * b.time(run, warmup=1, repeats=2 if b.tiny else 5)
    b.add(f"generate 12 steps 256px b{batch} +VQ decode", f"{ms:.0f} ms",
          f"aMUSEd A100 fp16: {AMUSED_A100_MS[batch]} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny sizes (smoke test)")
    ap.add_argument("--batch", type=int, default=16, help="train and encode batch (base preset)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --tiny for the CPU smoke test)", file=sys.stderr)
        return 2
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    b = Bench(args.tiny)
    batch = 2 if args.tiny else args.batch
    peak = f"{b.peak / 1e12:.0f} TFLOP/s" if b.peak else "unknown peak (no MFU)"
    print(f"# gpu_check: {b.name}, torch {torch.__version__}, {b.dtype or 'fp32'}, {peak}")
    print(f"{'what':<44}{'rate':>16}{'peak GiB':>10}  notes")
    encode_rows(b, batch)
    train_row(b, "base", batch, compile=False)
    train_row(b, "base", batch, compile=True)
    sr_batch, why = superres_batch(b)
    print(f"# super-res {why}")
    train_row(b, "superres", sr_batch, compile=False, checkpointing=True)
    vq = vq_model(b)
    torch.manual_seed(0)
    model = build_model(model_cfg(b, "base")).to(b.device).eval()
    for n in (1, 8):
        generation_row(b, vq, model, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
